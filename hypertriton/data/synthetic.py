"""A procedurally generated few-shot segmentation benchmark that needs no download.

Every class is one combination of three attributes: a shape (8), a texture family (4) and a colour
(6), 192 classes in all. Fold ``f`` (0..3) holds out the classes whose attribute indices sum to ``f``
modulo 4 (48 *unseen* classes, used by the ``val`` and ``test`` splits); the other 144 are *seen*
and used by ``trn``. Every shape, texture and colour occurs among the seen classes, so an unseen
class is a new combination of known attributes.

A query image holds one target object among three distractors: one shares the target's shape, one
its texture, one its colour, and each shares a second attribute half of the time, but never all
three. So no single cue solves an episode ("segment every red thing" also takes the red distractor);
only matching the support object as a whole does. The support images hold the target class
(different size, rotation, texture phase and colour jitter) among 1-2 random other objects.

Episodes are a pure function of ``(seed, fold, split, index)``: the same arguments always give the
same pixels. Drawing is vectorised numpy on object-sized crops; a 1-shot episode at 96 px takes
about 3 ms.

Also here: :func:`cue_baselines` (mIoU of one-cue segmenters, e.g. "segment every object") and
:func:`pretrain_backbone` (a backbone trained on the seen classes, since no ImageNet weights exist
offline). ``python -m hypertriton.data.synthetic {baselines,pretrain-backbone} --help``.

Example:
    >>> ds = SyntheticDataset(split="test", fold=0, nshot=1, img_size=96, episodes=10)
    >>> item = ds[0]
    >>> item["query_img"].shape, item["support_masks"].shape
    (torch.Size([3, 96, 96]), torch.Size([1, 96, 96]))
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset

from .common import IMAGENET_MEAN, IMAGENET_STD, SPLITS, check_fold, check_nshot, check_split

__all__ = ["SyntheticDataset", "SyntheticEpisode", "class_name", "class_attributes", "class_id_of", "seen_classes",
           "unseen_classes", "normalize_image", "denormalize_image", "NCLASS", "NFOLDS"]

SHAPES = ("circle", "square", "triangle", "crescent", "star", "cross", "ring", "hexagon")
TEXTURES = ("solid", "striped", "checkered", "dotted")
COLOURS = {
    "red": (0.88, 0.16, 0.12),
    "green": (0.16, 0.70, 0.20),
    "blue": (0.18, 0.32, 0.92),
    "yellow": (0.95, 0.85, 0.12),
    "magenta": (0.80, 0.20, 0.82),
    "cyan": (0.12, 0.78, 0.86),
}
COLOUR_NAMES = tuple(COLOURS)
_PALETTE = np.array([COLOURS[name] for name in COLOUR_NAMES], dtype=np.float32)
ATTRIBUTES = ("shape", "texture", "colour")
NFOLDS = 4
NCLASS = len(SHAPES) * len(TEXTURES) * len(COLOURS)

# Object radius as a fraction of the image side.
_RADIUS_RANGE = (0.13, 0.22)
_QUERY_DISTRACTORS = 3
_SUPPORT_DISTRACTORS = (1, 2)


def _attribute_table() -> np.ndarray:
    ids = np.arange(NCLASS)
    return np.stack([ids // (len(COLOURS) * len(TEXTURES)), (ids // len(COLOURS)) % len(TEXTURES),
                     ids % len(COLOURS)], axis=1)


_ATTRIBUTE_TABLE = _attribute_table()  # [NCLASS, 3]: shape, texture, colour of every class


def class_attributes(class_id: int) -> tuple[int, int, int]:
    """``(shape, texture, colour)`` indices of a class id in ``[0, NCLASS)``."""
    if not 0 <= int(class_id) < NCLASS:
        raise ValueError(f"class_id: expected an integer in [0, {NCLASS}), got {class_id!r}")
    class_id = int(class_id)
    colour = class_id % len(COLOURS)
    texture = (class_id // len(COLOURS)) % len(TEXTURES)
    shape = class_id // (len(COLOURS) * len(TEXTURES))
    return shape, texture, colour


def class_id_of(shape: int, texture: int, colour: int) -> int:
    """Inverse of :func:`class_attributes`."""
    return (shape * len(TEXTURES) + texture) * len(COLOURS) + colour


def class_name(class_id: int) -> str:
    """A readable name such as ``"red striped star"``."""
    shape, texture, colour = class_attributes(class_id)
    return f"{COLOUR_NAMES[colour]} {TEXTURES[texture]} {SHAPES[shape]}"


def unseen_classes(fold: int) -> list[int]:
    """The 48 class ids held out in ``fold`` (test/val classes), ascending."""
    check_fold(fold, NFOLDS)
    return [k for k in range(NCLASS) if sum(class_attributes(k)) % NFOLDS == fold]


def seen_classes(fold: int) -> list[int]:
    """The 144 class ids trained on in ``fold``, ascending."""
    held_out = set(unseen_classes(fold))
    return [k for k in range(NCLASS) if k not in held_out]


# --------------------------------------------------------------------------------------------------
# Drawing. Shapes are tested in object-local coordinates (u, v): rotated, scaled so the object's
# circumradius is 1. Textures are evaluated in image pixels so that their period does not shrink
# with the object (a stripe period is always 6-8 px, whatever the object's size). Objects turn freely,
# so no two shapes may be rotations of each other (hence no "diamond" next to the square).


def _regular_polygon(u, v, sides: int) -> np.ndarray:
    theta = np.arctan2(v, u)
    sector = 2 * np.pi / sides
    local = np.mod(theta, sector) - sector / 2
    return np.hypot(u, v) * np.cos(local) <= np.cos(np.pi / sides)


def _star(u, v, points: int = 5, inner: float = 0.42) -> np.ndarray:
    theta = np.arctan2(v, u)
    sector = 2 * np.pi / points
    tip_distance = np.abs(np.mod(theta, sector) / sector - 0.5) * 2  # 1 at a tip, 0 between tips
    return np.hypot(u, v) <= inner + (1 - inner) * tip_distance


def _shape_mask(shape: int, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    name = SHAPES[shape]
    if name == "circle":
        return u * u + v * v <= 0.92 ** 2
    if name == "square":
        return np.maximum(np.abs(u), np.abs(v)) <= 0.76
    if name == "triangle":
        return _regular_polygon(u, v, 3)
    if name == "crescent":
        return (u * u + v * v <= 1.0) & ((u - 0.5) ** 2 + v * v >= 0.8 ** 2)
    if name == "star":
        return _star(u, v)
    if name == "cross":
        au, av = np.abs(u), np.abs(v)
        return ((au <= 0.32) & (av <= 0.95)) | ((av <= 0.32) & (au <= 0.95))
    if name == "ring":
        rho2 = u * u + v * v
        return (rho2 <= 1.0) & (rho2 >= 0.5 ** 2)
    if name == "hexagon":
        return _regular_polygon(u, v, 6)
    raise AssertionError(name)


def _texture_pattern(texture: int, x: np.ndarray, y: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """True where the object shows its base colour, False where its dark shade shows."""
    name = TEXTURES[texture]
    angle = rng.uniform(0, np.pi)
    phase = rng.uniform(0, 1, size=2)
    xr = np.cos(angle) * x + np.sin(angle) * y
    yr = -np.sin(angle) * x + np.cos(angle) * y
    if name == "solid":
        return np.ones(np.broadcast(x, y).shape, dtype=bool)
    if name == "striped":
        period = rng.uniform(6.0, 8.0)
        return np.mod(xr / period + phase[0], 1.0) < 0.5
    if name == "checkered":
        cell = rng.uniform(3.5, 4.5)
        return (np.floor(xr / cell + phase[0]) + np.floor(yr / cell + phase[1])) % 2 == 0
    if name == "dotted":
        spacing = rng.uniform(7.0, 8.5)
        fx = np.mod(xr / spacing + phase[0], 1.0) - 0.5
        fy = np.mod(yr / spacing + phase[1], 1.0) - 0.5
        return fx * fx + fy * fy > 0.28 ** 2
    raise AssertionError(name)


def _background(size: int, rng: np.random.Generator) -> np.ndarray:
    """A low-saturation colour gradient with pixel noise, ``[H, W, 3]`` in [0, 1]."""
    grey = rng.uniform(0.35, 0.75, size=(2, 1))
    tint = rng.uniform(-0.06, 0.06, size=(2, 3))
    ends = np.clip(grey + tint, 0, 1).astype(np.float32)
    angle = rng.uniform(0, 2 * np.pi)
    coords = np.arange(size, dtype=np.float32) / max(size - 1, 1)
    ramp = np.cos(angle) * coords[None, :] + np.sin(angle) * coords[:, None]
    ramp = (ramp - ramp.min()) / max(float(ramp.max() - ramp.min()), 1e-6)
    image = ends[0] + (ends[1] - ends[0]) * ramp[..., None]
    image += 0.03 * rng.standard_normal(image.shape, dtype=np.float32)
    return image


@dataclass
class _Placed:
    class_id: int
    cy: float
    cx: float
    radius: float


def _place(n: int, size: int, rng: np.random.Generator) -> list[tuple[float, float, float]]:
    """``n`` non-overlapping discs (cy, cx, radius) inside a ``size`` x ``size`` image."""
    placed: list[tuple[float, float, float]] = []
    scale = 1.0
    while len(placed) < n:
        for _attempt in range(60):
            radius = rng.uniform(*_RADIUS_RANGE) * size * scale
            cy, cx = rng.uniform(radius + 1, size - radius - 1, size=2)
            if all((cy - py) ** 2 + (cx - px) ** 2 > (radius + pr + 2) ** 2 for py, px, pr in placed):
                placed.append((float(cy), float(cx), float(radius)))
                break
        else:
            # Crowded: start over with smaller objects (rare; keeps the loop finite).
            placed, scale = [], scale * 0.85
    return placed


def _draw(image: np.ndarray, labels: np.ndarray, label: int, obj: _Placed, rng: np.random.Generator) -> None:
    """Paint one object into ``image`` ``[H, W, 3]`` and write ``label`` into ``labels`` ``[H, W]``."""
    shape, texture, colour = class_attributes(obj.class_id)
    size = image.shape[0]
    y0, y1 = max(int(obj.cy - obj.radius) - 1, 0), min(int(obj.cy + obj.radius) + 2, size)
    x0, x1 = max(int(obj.cx - obj.radius) - 1, 0), min(int(obj.cx + obj.radius) + 2, size)
    y = np.arange(y0, y1, dtype=np.float32)[:, None] + 0.5
    x = np.arange(x0, x1, dtype=np.float32)[None, :] + 0.5
    rotation = rng.uniform(0, 2 * np.pi)
    dy, dx = (y - obj.cy) / obj.radius, (x - obj.cx) / obj.radius
    u = np.cos(rotation) * dx + np.sin(rotation) * dy
    v = -np.sin(rotation) * dx + np.cos(rotation) * dy
    inside = _shape_mask(shape, u, v)
    base = np.clip(_PALETTE[colour] * rng.uniform(0.85, 1.1) + rng.normal(0, 0.035, 3), 0, 1)
    # The second tone: a dark shade, except dotted objects whose dots are light (so that dots and
    # checks still differ once a backbone has pooled them over 8 px).
    shade = base * 0.3 + 0.65 if TEXTURES[texture] == "dotted" else base * 0.32
    pattern = np.broadcast_to(_texture_pattern(texture, x, y, rng), inside.shape)
    pixels = np.where(pattern[..., None], base, shade).astype(np.float32)
    pixels += 0.02 * rng.standard_normal(pixels.shape, dtype=np.float32)
    crop = image[y0:y1, x0:x1]
    crop[inside] = pixels[inside]
    labels[y0:y1, x0:x1][inside] = label


def _render(class_ids: list[int], size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """An image ``[H, W, 3]`` in [0, 1] and its instance labels ``[H, W]`` (0 = background,
    ``i + 1`` = ``class_ids[i]``; objects never overlap)."""
    image = _background(size, rng)
    labels = np.zeros((size, size), dtype=np.int64)
    for index, (class_id, (cy, cx, radius)) in enumerate(zip(class_ids, _place(len(class_ids), size, rng))):
        _draw(image, labels, index + 1, _Placed(class_id, cy, cx, radius), rng)
    np.clip(image, 0, 1, out=image)
    return image, labels


def _sharing_distractor(target: int, shared: list[int], pool: list[int], rng: np.random.Generator) -> int:
    """A class from ``pool`` that equals ``target`` exactly in the attributes ``shared`` (indices
    into ``ATTRIBUTES``) and differs in all the others."""
    pool = np.asarray(pool)
    same = _ATTRIBUTE_TABLE[pool] == _ATTRIBUTE_TABLE[target]  # [len(pool), 3]
    wanted = np.isin(np.arange(len(ATTRIBUTES)), shared)
    candidates = pool[(same == wanted).all(axis=1)]
    return int(candidates[rng.integers(len(candidates))])


@dataclass
class SyntheticEpisode:
    """One episode before conversion to tensors.

    Attributes:
        class_id: the target class.
        query_image: ``[H, W, 3]`` float32 in [0, 1].
        query_labels: ``[H, W]`` int64; 0 background, 1 the target, ``i + 1`` object ``i``.
        query_classes: class id of every query object (index 0 is the target).
        support_images: ``K`` arrays ``[H, W, 3]``.
        support_masks: ``K`` arrays ``[H, W]`` float32 in {0, 1} (the target-class object).
    """

    class_id: int
    query_image: np.ndarray
    query_labels: np.ndarray
    query_classes: list[int]
    support_images: list[np.ndarray]
    support_masks: list[np.ndarray]

    def query_mask(self) -> np.ndarray:
        """The ground truth ``[H, W]`` float32 in {0, 1}."""
        return (self.query_labels == 1).astype(np.float32)

    def cue_mask(self, cue: str) -> np.ndarray:
        """What a one-cue segmenter would predict, ``[H, W]`` float32 in {0, 1}.

        ``cue="all"`` segments every object; ``"shape"``, ``"texture"`` or ``"colour"`` segments
        every object that shares that attribute with the target (an oracle for that cue alone).
        """
        if cue == "all":
            keep = list(range(len(self.query_classes)))
        elif cue in ATTRIBUTES:
            a = ATTRIBUTES.index(cue)
            target = class_attributes(self.class_id)[a]
            keep = [i for i, k in enumerate(self.query_classes) if class_attributes(k)[a] == target]
        else:
            raise ValueError(f"cue: expected 'all' or one of {ATTRIBUTES}, got {cue!r}")
        return np.isin(self.query_labels, [i + 1 for i in keep]).astype(np.float32)


def normalize_image(image: np.ndarray) -> torch.Tensor:
    """``[H, W, 3]`` floats in [0, 1] -> ``[3, H, W]`` ImageNet-normalised tensor."""
    tensor = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32)).permute(2, 0, 1)
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (tensor - mean) / std


def denormalize_image(tensor: torch.Tensor) -> np.ndarray:
    """Inverse of :func:`normalize_image`: ``[3, H, W]`` -> ``[H, W, 3]`` float32 in [0, 1]."""
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (tensor.detach().float().cpu() * std + mean).clamp(0, 1).permute(1, 2, 0).numpy()


class SyntheticDataset(Dataset):
    """Few-shot episodes of the synthetic benchmark, as the original HSNet datasets return them.

    Args:
        datapath: ignored (nothing is read from disk); accepted so every benchmark is built alike.
        splits: ignored (the class split is a formula of the fold, see :func:`unseen_classes`).
        fold: 0..3, which 48 classes are held out.
        split: ``"trn"`` (targets from the 144 seen classes; distractors seen too), ``"val"`` or
            ``"test"`` (targets from the 48 unseen classes, cycled in order so every class gets the
            same number of episodes; ``val`` and ``test`` draw different episodes).
        nshot: supports per episode (K).
        img_size: side of the square images.
        use_original_imgsize: accepted for interface parity; images are drawn at ``img_size``, which
            is also their original size.
        episodes: number of episodes, the dataset's length (default: 100000 for ``trn``, an endless
            supply in practice; 1000 for ``val`` and ``test``, as the original test runs).
        seed: episodes are a pure function of ``(seed, fold, split, index)``.

    Each item is a dict: ``query_img`` ``[3, H, W]`` (ImageNet-normalised), ``query_mask``
    ``[H, W]`` {0, 1}, ``query_name`` str, ``query_ignore_idx`` ``[H, W]`` (all zero: no boundary
    pixels), ``org_query_imsize`` ``(W, H)``, ``support_imgs`` ``[K, 3, H, W]``, ``support_masks``
    ``[K, H, W]``, ``support_names`` list of str, ``support_ignore_idxs`` ``[K, H, W]``,
    ``class_id`` 0-dim int64 tensor (a global class id in ``[0, 192)``).
    """

    benchmark = "synthetic"
    nfolds = NFOLDS
    nclass = NCLASS

    def __init__(self, datapath=None, splits=None, fold: int = 0, split: str = "test", nshot: int = 1,
                 img_size: int = 96, use_original_imgsize: bool = False, episodes: int | None = None,
                 seed: int = 0):
        check_fold(fold, NFOLDS)
        check_split(split)
        check_nshot(nshot)
        if not isinstance(img_size, (int, np.integer)) or img_size < 32:
            raise ValueError(f"img_size: expected an integer >= 32 (objects must stay visible), got {img_size!r}")
        if episodes is None:
            episodes = 100_000 if split == "trn" else 1000
        if not isinstance(episodes, (int, np.integer)) or episodes < 1:
            raise ValueError(f"episodes: expected a positive integer, got {episodes!r}")
        self.fold, self.split, self.nshot = int(fold), split, int(nshot)
        self.img_size, self.episodes, self.seed = int(img_size), int(episodes), int(seed)
        self.use_original_imgsize = bool(use_original_imgsize)
        self.class_ids = seen_classes(fold) if split == "trn" else unseen_classes(fold)
        # Training never sees an unseen class, not even as a distractor.
        self._distractor_pool = self.class_ids if split == "trn" else list(range(NCLASS))

    def __len__(self) -> int:
        return self.episodes

    def class_name(self, class_id: int) -> str | None:
        """Such as ``"red striped star"`` (:func:`class_name`)."""
        return class_name(class_id) if 0 <= class_id < NCLASS else None

    def episode(self, index: int) -> SyntheticEpisode:
        """Draw episode ``index`` (numpy arrays and object metadata; see :class:`SyntheticEpisode`)."""
        if not 0 <= index < self.episodes:
            raise IndexError(f"episode index {index} out of range [0, {self.episodes})")
        rng = np.random.default_rng([self.seed, self.fold, SPLITS.index(self.split), int(index)])
        if self.split == "trn":
            target = int(self.class_ids[rng.integers(len(self.class_ids))])
        else:
            target = int(self.class_ids[index % len(self.class_ids)])
        classes = [target]
        for attribute in rng.permutation(len(ATTRIBUTES))[:_QUERY_DISTRACTORS]:
            shared = [int(attribute)]
            if rng.random() < 0.5:
                others = [a for a in range(len(ATTRIBUTES)) if a != attribute]
                shared.append(int(others[rng.integers(len(others))]))
            classes.append(_sharing_distractor(target, shared, self._distractor_pool, rng))
        query_image, query_labels = _render(classes, self.img_size, rng)

        others = [k for k in self._distractor_pool if k != target]
        support_images, support_masks = [], []
        for _shot in range(self.nshot):
            count = int(rng.integers(_SUPPORT_DISTRACTORS[0], _SUPPORT_DISTRACTORS[1] + 1))
            support_classes = [target] + [int(k) for k in rng.choice(others, size=count, replace=False)]
            image, labels = _render(support_classes, self.img_size, rng)
            support_images.append(image)
            support_masks.append((labels == 1).astype(np.float32))
        return SyntheticEpisode(target, query_image, query_labels, classes, support_images, support_masks)

    def _name(self, index: int) -> str:
        return f"synthetic/fold{self.fold}/{self.split}/{self.seed}/{index:06d}"

    def episode_names(self, count: int | None = None) -> list:
        """The first ``count`` (default: all) episodes by name, as :class:`~hypertriton.data.common.Episode`
        (what ``hypertriton episodes`` prints); names equal the items' ``query_name``/``support_names``.
        No image is drawn except for ``trn``, whose target class is a random draw."""
        from .common import Episode

        total = self.episodes if count is None else min(int(count), self.episodes)
        episodes = []
        for index in range(total):
            class_id = self.class_ids[index % len(self.class_ids)] if self.split != "trn" else \
                self.episode(index).class_id
            name = self._name(index)
            episodes.append(Episode(f"{name}/query", tuple(f"{name}/support{k}" for k in range(self.nshot)),
                                    int(class_id)))
        return episodes

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.episodes:
            raise IndexError(f"episode index {index} out of range [0, {self.episodes})")
        ep = self.episode(index)
        size = self.img_size
        name = self._name(index)
        return {
            "query_img": normalize_image(ep.query_image),
            "query_mask": torch.from_numpy(ep.query_mask()),
            "query_name": f"{name}/query",
            "query_ignore_idx": torch.zeros(size, size),
            "org_query_imsize": (size, size),
            "support_imgs": torch.stack([normalize_image(img) for img in ep.support_images]),
            "support_masks": torch.stack([torch.from_numpy(m) for m in ep.support_masks]),
            "support_names": [f"{name}/support{k}" for k in range(self.nshot)],
            "support_ignore_idxs": torch.zeros(self.nshot, size, size),
            "class_id": torch.tensor(ep.class_id),
        }


def cue_baselines(dataset: SyntheticDataset, cues=("all",) + ATTRIBUTES) -> dict[str, dict[str, float]]:
    """mIoU and FB-IoU (as :mod:`hypertriton.metrics` computes them) of one-cue segmenters.

    ``"all"`` is "segment every object"; ``"shape"``, ``"texture"``, ``"colour"`` are oracles that
    segment every object sharing that one attribute with the target (see
    :meth:`SyntheticEpisode.cue_mask`). A benchmark where one of them scores high could be solved
    without matching the support as a whole.

    Returns:
        ``{cue: {"miou": ..., "fb_iou": ...}}`` over all of ``dataset``'s episodes.
    """
    from ..metrics import SegmentationMeter

    meters = {cue: SegmentationMeter(dataset.class_ids) for cue in cues}
    for index in range(len(dataset)):
        episode = dataset.episode(index)
        batch = {"query_mask": torch.from_numpy(episode.query_mask())[None],
                 "class_id": torch.tensor([episode.class_id])}
        for cue, meter in meters.items():
            meter.update(torch.from_numpy(episode.cue_mask(cue))[None], batch)
    return {cue: {"miou": meter.miou(), "fb_iou": meter.fb_iou()} for cue, meter in meters.items()}


# --------------------------------------------------------------------------------------------------
# Backbone pretraining on the seen classes.
#
# HSNet keeps its backbone frozen and the original starts from ImageNet weights, which a machine
# without internet does not have. For the synthetic benchmark the backbone is instead trained here,
# on images of the SEEN classes only, to label every pixel with its object's shape, texture and colour
# (or background): one 1x1-conv head per attribute on the last block of layer2, layer3 and layer4.
# Unseen classes are new combinations of these attributes, so nothing about them leaks in.


def attribute_labels(labels: np.ndarray, classes: list[int]) -> np.ndarray:
    """Per-pixel ``(shape, texture, colour)`` targets ``[H, W, 3]`` int64 from instance ``labels``
    ``[H, W]`` (0 = background, ``i + 1`` = ``classes[i]``); background is 0, attributes are 1-based."""
    table = np.concatenate([np.full((1, 3), -1), _ATTRIBUTE_TABLE[np.asarray(classes, dtype=np.int64)]]) + 1
    return table[labels]


def pretrain_backbone(out, backbone: str = "resnet18", fold: int = 0, img_size: int = 96, steps: int = 600,
                      bsz: int = 16, lr: float = 1e-3, seed: int = 0, progress: bool = True,
                      lr_schedule: str = "constant") -> dict:
    """Train a torchvision backbone from scratch on seen-class images (per-pixel attribute labels) and
    save its state_dict in torchvision's format (loadable by ``HSNet(backbone, backbone_weights=out)``).

    Args:
        out: path of the weights file (written atomically; rewritten every 100 steps, so a stopped run
            leaves usable weights).
        backbone: a ResNet name of :data:`hypertriton.backbones.BACKBONES`.
        fold: which classes are seen (only those are drawn).
        steps, bsz, lr: Adam steps, images per step, learning rate.
        lr_schedule: ``"constant"`` or ``"cosine"`` (decay to 0 over ``steps``; see
            :func:`hypertriton.training.scheduled_lr`).

    Returns:
        ``{"steps", "loss" (mean of the last 50 steps), "seconds"}``.
    """
    import time

    import torch.nn.functional as F
    from tqdm.auto import tqdm

    from ..backbones import build_backbone, extract_features, get_spec
    from ..checkpoint import atomic_save
    from ..training import scheduled_lr

    spec = get_spec(backbone)
    if spec.family != "resnet":
        raise ValueError(f"backbone: pretraining supports ResNets, got {backbone!r}")
    torch.manual_seed(seed)
    model = build_backbone(backbone)
    for parameter in model.parameters():
        parameter.requires_grad_(True)
    model.train()
    # The last feature of each stage (stride 8, 16, 32) gets one head per attribute (+1 for background).
    sizes = (len(SHAPES) + 1, len(TEXTURES) + 1, len(COLOURS) + 1)
    last_of_stage = np.cumsum(list(reversed(spec.layers_per_level))) - 1
    heads = torch.nn.ModuleList(torch.nn.Conv2d(spec.channels[i], sum(sizes), 1) for i in last_of_stage)
    optimizer = torch.optim.Adam(list(model.parameters()) + list(heads.parameters()), lr=lr)
    seen = seen_classes(fold)
    losses, start = [], time.time()
    for step in tqdm(range(steps), desc="pretraining backbone", disable=not progress):
        images, targets = [], []
        for j in range(bsz):
            rng = np.random.default_rng([seed, fold, 7, step, j])
            classes = [int(k) for k in rng.choice(seen, size=int(rng.integers(2, 5)), replace=False)]
            image, labels = _render(classes, img_size, rng)
            images.append(normalize_image(image))
            targets.append(torch.from_numpy(attribute_labels(labels, classes)))
        for group in optimizer.param_groups:
            group["lr"] = scheduled_lr(lr, lr_schedule, step, steps)
        images, targets = torch.stack(images), torch.stack(targets).permute(0, 3, 1, 2).float()
        feats = extract_features(model, spec, images)
        loss = 0.0
        for head, index in zip(heads, last_of_stage):
            logits = head(F.relu(feats[index])).split(sizes, dim=1)
            target = F.interpolate(targets, feats[index].shape[-2:], mode="nearest").long()
            loss = loss + sum(F.cross_entropy(logit, target[:, a]) for a, logit in enumerate(logits))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if (step + 1) % 100 == 0 or step + 1 == steps:
            atomic_save({k: v.detach().clone() for k, v in model.state_dict().items()}, out)
    return {"steps": steps, "loss": float(np.mean(losses[-50:])), "seconds": time.time() - start}


_BUNDLE_DEFAULTS = {"backbone": "resnet18", "img_size": 96, "fold": 0}  # the bundled run's, when nothing says
_BUNDLE_PROG = "python -m hypertriton.data.synthetic bundle"


def _bundle(args) -> int:
    """The ``bundle`` command: ``args.checkpoint`` -> the compact file ``args.out``, with the training run's
    backbone, image size and fold as metadata (see the command's help). Returns the exit code: 2, with the
    reason on stderr, when refused."""
    import os
    import sys
    from pathlib import Path

    from ..checkpoint import CheckpointError, infer_backbone, read_state_dict, strip_prefix
    from ..model import MIN_IMAGE_SIZE
    from ..predict import MAX_IMG_SIZE, read_train_config, save_compact

    def note(message: str) -> None:
        print(f"{_BUNDLE_PROG}: note: {message}", file=sys.stderr)

    def refuse(message: str) -> int:
        print(f"{_BUNDLE_PROG}: error: {message}; nothing was written", file=sys.stderr)
        return 2

    try:
        state_dict = strip_prefix(read_state_dict(args.checkpoint))
    except (CheckpointError, FileNotFoundError) as error:
        return refuse(str(error))
    given = {name: getattr(args, name) for name in _BUNDLE_DEFAULTS}
    config_path = Path(args.checkpoint).parent / "config.json"
    try:
        config = read_train_config(args.checkpoint)
    except ValueError as why:
        if None in given.values():  # a config.json of unknown origin must not be silently replaced by defaults
            return refuse(f"{str(config_path)!r} is not the config.json that 'hypertriton train' writes ({why}); "
                          "pass --backbone, --img-size and --fold")
        config = None
    recorded = None if config is None else {name: config[name] for name in _BUNDLE_DEFAULTS if name in config}
    benchmark = "synthetic" if config is None else str(config["benchmark"])
    values, origins, defaulted = {}, {}, []
    for name, default in _BUNDLE_DEFAULTS.items():
        flag = "--" + name.replace("_", "-")
        if given[name] is not None:
            values[name], origins[name] = given[name], "given"
            if recorded is not None and name in recorded and recorded[name] != given[name]:
                note(f"{flag} {given[name]} overrides {name}={recorded[name]!r} recorded in {str(config_path)!r}")
        elif recorded is not None and name in recorded:
            values[name], origins[name] = recorded[name], f"in {str(config_path)!r}"
        else:
            values[name], origins[name] = default, "the default"
            defaulted.append((name, f"{flag} {default}"))
    if defaulted:
        why = (f"no config.json of 'hypertriton train' next to {args.checkpoint!r}" if recorded is None
               else f"{str(config_path)!r} records no {', '.join(name for name, _ in defaulted)}")
        note(f"{why}: using the defaults {', '.join(flag for _, flag in defaulted)}; pass the flags if the run used "
             "others")
    img_size, fold, backbone = values["img_size"], values["fold"], values["backbone"]
    if type(img_size) is not int or not MIN_IMAGE_SIZE <= img_size <= MAX_IMG_SIZE:
        return refuse(f"img_size {img_size!r} ({origins['img_size']}) is not an integer from {MIN_IMAGE_SIZE} to "
                      f"{MAX_IMG_SIZE}, which a bundle needs to be loaded; pass --img-size")
    if type(fold) is not int or fold < 0:
        return refuse(f"fold {fold!r} ({origins['fold']}) is not an integer >= 0; pass --fold")
    try:
        from_keys = infer_backbone(state_dict)
    except CheckpointError as error:
        if any(key.startswith("backbone.") for key in state_dict):  # a backbone of no known kind: no bundle
            return refuse(str(error))
        from_keys = backbone  # a learner-only file: the keys do not decide, so the given name stands
    if backbone != from_keys:
        return refuse(f"backbone {backbone!r} ({origins['backbone']}) does not fit {args.checkpoint!r}, whose keys "
                      f"are those of {from_keys!r}, so the bundle could not be loaded; pass --backbone {from_keys}")
    metadata = {"backbone": backbone, "img_size": img_size, "benchmark": benchmark, "fold": fold}
    # 4-bit codebooks for the backbone, 8-bit for the learner: a resnet18 HSNet fits in about 9 MB.
    state_dict = {"module." + key: value for key, value in state_dict.items()}
    path = save_compact(state_dict, args.out, bits={"": 4, "module.hpn_learner.": 8}, metadata=metadata)
    print(f"wrote {path} ({os.path.getsize(path) / 1e6:.1f} MB): backbone {backbone}, img_size {img_size}, "
          f"fold {fold}")
    return 0


def _main(argv=None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m hypertriton.data.synthetic",
                                     description="tools for the synthetic few-shot benchmark")
    sub = parser.add_subparsers(dest="tool", required=True)
    defaults = argparse.ArgumentDefaultsHelpFormatter  # each --help lists every default
    pre = sub.add_parser("pretrain-backbone", help="train a backbone on the seen classes (per-pixel attributes)",
                         description="train a backbone on the seen classes (per-pixel attributes); the bundled "
                         "checkpoint's recipe (docs/synthetic.md in the source) is --steps 1500 --lr-schedule cosine",
                         formatter_class=defaults)
    pre.add_argument("--out", required=True, default=argparse.SUPPRESS, help="torchvision-format weights file to write")
    pre.add_argument("--backbone", default="resnet18", help="backbone to train")
    pre.add_argument("--fold", type=int, default=0, help="fold whose classes stay unseen")
    pre.add_argument("--img-size", type=int, default=96, help="image side")
    pre.add_argument("--steps", type=int, default=600, help="optimizer steps")
    pre.add_argument("--bsz", type=int, default=16, help="images per step")
    pre.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate")
    pre.add_argument("--lr-schedule", default="constant", choices=("constant", "cosine"), help="rate schedule")
    pre.add_argument("--seed", type=int, default=0, help="seed of the initialization and the images")
    base = sub.add_parser("baselines", help="mIoU of one-cue segmenters on test episodes",
                          description="mIoU of one-cue segmenters on test episodes", formatter_class=defaults)
    base.add_argument("--fold", type=int, default=0, help="fold whose test classes are scored")
    base.add_argument("--img-size", type=int, default=96, help="image side")
    base.add_argument("--episodes", type=int, default=1000, help="test episodes")
    base.add_argument("--seed", type=int, default=0, help="seed of the episodes")
    bundle = sub.add_parser(
        "bundle", help="compress a trained checkpoint into the package's bundled-weights format",
        description="Compress CHECKPOINT into the compact format, recording the backbone, image size and fold "
                    "it was trained with (predict and evaluate read them). They are read from the config.json "
                    "that 'hypertriton train' writes next to CHECKPOINT; a flag given here wins over it (with a "
                    "note on stderr). Without a config.json they default to resnet18, 96 and 0 (with a note). "
                    "A backbone that contradicts CHECKPOINT's keys is refused.")
    bundle.add_argument("checkpoint", help="best_model.pt written by 'hypertriton train --benchmark synthetic'")
    bundle.add_argument("--out", required=True, help="e.g. hypertriton/weights/synthetic_resnet18.pt")
    bundle.add_argument("--backbone", default=None, help="default: train's config.json, else resnet18")
    bundle.add_argument("--fold", type=int, default=None, help="default: train's config.json, else 0")
    bundle.add_argument("--img-size", type=int, default=None, help="default: train's config.json, else 96")
    args = parser.parse_args(argv)
    if args.tool == "bundle":
        return _bundle(args)
    if args.tool == "baselines":
        dataset = SyntheticDataset(fold=args.fold, split="test", img_size=args.img_size, episodes=args.episodes,
                                   seed=args.seed)
        for cue, result in cue_baselines(dataset).items():
            label = "segment every object" if cue == "all" else f"every object of the target's {cue}"
            print(f"{label:<36} mIoU {result['miou']:6.2f}  FB-IoU {result['fb_iou']:6.2f}")
        return 0
    summary = pretrain_backbone(args.out, args.backbone, args.fold, args.img_size, args.steps, args.bsz, args.lr,
                                args.seed, lr_schedule=args.lr_schedule)
    print(f"{summary['steps']} steps in {summary['seconds']:.0f} s, final loss {summary['loss']:.3f}; "
          f"weights in {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
