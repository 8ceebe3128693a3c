"""Loading, transforms and errors shared by the few-shot benchmarks (PASCAL-5i, COCO-20i, FSS-1000).

Everything here follows the original HSNet data pipeline:

- images: read as RGB, resized to ``img_size x img_size`` (aspect ratio not kept, PIL bilinear as
  ``torchvision.transforms.Resize`` does it), scaled to [0, 1], ImageNet mean/std normalization;
- masks: read as class-index (or grey-level) maps and resized with nearest neighbour
  (``F.interpolate(mode="nearest")``);
- every problem with the data on disk raises :class:`DatasetError` naming the offending file; a mask of
  another size than its image only warns (the benchmarks hold a few; the original resizes each on
  its own).

The :class:`FewShotDataset` base turns an episode (query name, support names, class id) into the
original batch dict; the benchmark modules only say where files live and how a raw mask becomes a
0/1 mask plus an ignore map.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

__all__ = ["DatasetError", "Episode", "FewShotDataset", "ImageTransform", "build_transform", "read_image",
           "read_mask", "resize_mask", "check_entry_name", "IMAGENET_MEAN", "IMAGENET_STD", "SPLITS"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SPLITS = ("trn", "val", "test")


class DatasetError(ValueError):
    """Bad data on disk: a missing or unreadable file, a mask that is not a single-channel map, a split
    entry without a file, a class without images. The message always names the file."""


@dataclass(frozen=True)
class Episode:
    """One few-shot episode, by name (as the split files spell them).

    Attributes:
        query: query image name (PASCAL image id, COCO path as stored, FSS ``class/n.jpg``).
        supports: the ``nshot`` support image names, in draw order (repeats are possible, as in the
            original, which only rejects the query itself).
        class_id: 0-based class id as the original uses it (FSS: 0..999 over trn/val/test).
    """

    query: str
    supports: tuple[str, ...]
    class_id: int

    def to_json(self) -> dict:
        return {"query": self.query, "supports": list(self.supports), "class_id": int(self.class_id)}


_MEAN = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
_STD = torch.tensor(IMAGENET_STD).view(3, 1, 1)


class ImageTransform:
    """The original image transform, torchvision's ``Compose([Resize((s, s)), ToTensor(), Normalize(
    ImageNet mean, std)])`` on a PIL image, stated directly (bit-identical; importing torchvision
    would double the start-up time of every data command). A class, not a closure, so that datasets
    holding one pickle: data-loader workers started by ``spawn`` (macOS's and Windows' default) get
    the dataset pickled.

    Calling it maps a PIL RGB image to a float32 tensor ``[3, s, s]``.
    """

    def __init__(self, img_size: int):
        if isinstance(img_size, bool) or not isinstance(img_size, int) or img_size < 1:
            raise ValueError(f"img_size must be a positive int, got {img_size!r}")
        self.img_size = img_size

    def __call__(self, image: Image.Image) -> torch.Tensor:
        size = self.img_size
        resized = image.resize((size, size), Image.BILINEAR)  # what Resize does to a PIL image
        tensor = torch.from_numpy(np.array(resized, dtype=np.uint8)).permute(2, 0, 1).float().div(255)
        return tensor.sub_(_MEAN).div_(_STD)

    def __repr__(self) -> str:
        return f"ImageTransform({self.img_size})"


def build_transform(img_size: int) -> ImageTransform:
    """:class:`ImageTransform` for ``img_size``: maps a PIL RGB image to a float32 tensor ``[3, s, s]``."""
    return ImageTransform(img_size)


def check_split(split: str) -> str:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return split


def check_nshot(nshot) -> int:
    if isinstance(nshot, bool) or not isinstance(nshot, (int, np.integer)) or nshot < 1:
        raise ValueError(f"nshot must be a positive int, got {nshot!r}")
    return int(nshot)


def check_fold(fold, nfolds: int = 4) -> int:
    if isinstance(fold, bool) or not isinstance(fold, (int, np.integer)) or not 0 <= fold < nfolds:
        raise ValueError(f"fold must be an int in [0, {nfolds - 1}], got {fold!r}")
    return int(fold)


def benchmark_split_dir(splits: str | os.PathLike, benchmark: str, marker: str) -> Path:
    """The folder holding one benchmark's split files.

    ``splits`` may be the folder holding ``pascal/``, ``coco/``, ``fss/`` (as the original
    ``data/splits``) or the benchmark's own folder; ``marker`` is a path that must exist inside
    (e.g. ``"val"`` or ``"test.txt"``).
    """
    if splits is None:
        raise ValueError(f"splits: a folder with the {benchmark} split files is required, got None")
    root = Path(splits)
    for candidate in (root / benchmark, root):
        if (candidate / marker).exists():
            return candidate
    from . import DATA_HINT

    raise DatasetError(f"no {benchmark} split files under {root}: expected {root / benchmark / marker}; {DATA_HINT}")


def read_split_lines(path: Path) -> list[str]:
    """Non-empty lines of a text split file (universal newlines, so CRLF files read the same)."""
    try:
        with open(path, "r") as handle:
            text = handle.read()
    except FileNotFoundError:
        raise DatasetError(f"split file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as error:
        raise DatasetError(f"cannot read split file {path}: {error}") from None
    # The original drops the text after the last '\n' (the files end with one); skipping empty lines
    # is the same on those files and also tolerates a missing final newline.
    return [line for line in text.split("\n") if line]


def check_entry_name(name: str) -> str:
    """A split entry names a file inside the data folder: refuse an absolute name or one climbing out with
    ``..`` (a split file from elsewhere would otherwise read any image the user can read)."""
    posix, windows = PurePosixPath(name), PureWindowsPath(name)
    if not name or posix.is_absolute() or windows.drive or windows.root or ".." in windows.parts:
        raise DatasetError(f"split entry {name!r} does not name a file inside the data folder (absolute, or "
                           "climbing out with '..'); split files name images relative to it")
    return name


def read_image(path: str | os.PathLike) -> Image.Image:
    """An RGB PIL image, or :class:`DatasetError` naming ``path`` if missing or unreadable."""
    try:
        with Image.open(path) as image:
            image.load()
            return image.convert("RGB")
    except FileNotFoundError:
        raise DatasetError(f"image file not found: {path}") from None
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as error:
        raise DatasetError(f"cannot read image file {path}: {error}") from None


def read_mask(path: str | os.PathLike, grey: bool = False) -> torch.Tensor:
    """A mask as an integer tensor ``[H, W]`` (uint8 pixel values, as ``np.array(Image.open(path))``).

    Args:
        path: the mask file (PNG).
        grey: convert to 8-bit grey first (FSS-1000 masks may be stored as RGB).
    """
    try:
        with Image.open(path) as image:
            image.load()
            if grey:
                image = image.convert("L")
            array = np.array(image)
    except FileNotFoundError:
        raise DatasetError(f"mask file not found: {path}") from None
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as error:
        raise DatasetError(f"cannot read mask file {path}: {error}") from None
    if array.ndim != 2:
        raise DatasetError(f"mask file {path} has shape {array.shape}; expected a single-channel [H, W] mask")
    return torch.from_numpy(array.astype(np.int64))


def warn_if_mask_misfits(mask: torch.Tensor, path: str | os.PathLike, image_size: tuple[int, int]) -> None:
    """Warn (once per file and process) when a mask ``[H, W]`` is not the size ``(W, H)`` of its image.

    The benchmarks' own files have such pairs (FSS-1000's test split holds a few masks that are not
    224x224 beside 224x224 images). The original resizes image and mask to the input size each on its
    own and so runs over them; so do we, but say so, since for data of one's own it usually means a
    wrong file.
    """
    width, height = image_size
    if tuple(mask.shape) != (height, width):
        warnings.warn(f"mask file {path} is {mask.shape[1]}x{mask.shape[0]} (WxH) but its image is "
                      f"{width}x{height}; each is resized on its own, as the original does", stacklevel=2)


def resize_mask(mask: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Nearest-neighbour resize of a mask ``[H, W]`` to ``size = (H', W')``, as float (the original's
    ``F.interpolate(mask[None, None].float(), size, mode="nearest")``)."""
    return F.interpolate(mask[None, None].float(), size=tuple(size), mode="nearest")[0, 0]


def draw_supports(choose: Callable[[int], int], pool: Sequence[str], query: str, nshot: int,
                  where: str) -> tuple[str, ...]:
    """Draw ``nshot`` supports from ``pool`` as the original does: draw one at a time, drop a draw
    equal to the query, stop at ``nshot`` (repeats among supports are kept).

    Args:
        choose: ``choose(n)`` returns an index in ``[0, n)``; it is what consumes the random stream.
        where: names the class and split file for the error when no support can be drawn (the
            original loops forever there).
    """
    if not any(name != query for name in pool):
        raise DatasetError(f"empty class: {where} has no image other than the query {query!r} to use as support")
    supports: list[str] = []
    while len(supports) < nshot:
        name = pool[choose(len(pool))]
        if name != query:
            supports.append(name)
    return tuple(supports)


def numpy_choice(rng: np.random.RandomState) -> Callable[[int], int]:
    """``np.random.choice(seq, 1, replace=False)[0]`` as an index: a full permutation per draw, exactly
    the original's consumption of the legacy numpy stream."""
    return lambda n: int(rng.choice(n, 1, replace=False)[0])


def torch_choice(n: int) -> int:
    """A uniform index in ``[0, n)`` from torch's global RNG (seeded per DataLoader worker, saved and
    restored with the training state), used for training episodes."""
    return int(torch.randint(n, (1,)).item())


class FewShotDataset(Dataset):
    """Base of the benchmark datasets: episodes by name -> the original batch dict.

    Subclasses set ``benchmark``, ``nclass``, ``class_ids``, ``split``, ``nshot`` and, for the val/test
    splits, ``episodes`` (a fixed list drawn once with seed 0); for ``trn`` they implement
    :meth:`sample_train_episode`. They implement :meth:`image_path`, :meth:`mask_path` and
    :meth:`binarize`.

    Item keys (tensors unbatched):
        query_img ``[3, S, S]`` float; query_mask ``[S, S]`` float 0/1 (original size ``[H, W]`` with
        ``use_original_imgsize``); query_name str; query_ignore_idx like query_mask (1 on PASCAL
        boundary pixels, else 0); org_query_imsize ``(W, H)`` ints as PIL gives it;
        support_imgs ``[K, 3, S, S]``; support_masks ``[K, S, S]``; support_names list of K str;
        support_ignore_idxs ``[K, S, S]``; class_id 0-d int64 tensor.
    """

    benchmark: str
    nclass: int
    class_ids: list[int]
    split: str
    nshot: int
    episodes: list[Episode] | None = None
    grey_masks = False

    def __init__(self, split: str, nshot: int, img_size: int = 400, use_original_imgsize: bool = False):
        self.split = check_split(split)
        self.nshot = check_nshot(nshot)
        self.img_size = img_size
        self.transform = build_transform(img_size)
        self.use_original_imgsize = bool(use_original_imgsize)

    def class_name(self, class_id: int) -> str | None:
        """The readable name of a 0-based class (for pictures and reports), or None where the benchmark's
        files do not say it."""
        return None

    # -- to implement ---------------------------------------------------------------------------
    def image_path(self, name: str) -> Path:
        raise NotImplementedError

    def mask_path(self, name: str) -> Path:
        raise NotImplementedError

    def binarize(self, raw_mask: torch.Tensor, class_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw mask (float) -> (0/1 mask, 0/1 ignore map), both float ``[H, W]``."""
        raise NotImplementedError

    def sample_train_episode(self, index: int) -> Episode:
        raise NotImplementedError

    def train_length(self) -> int:
        raise NotImplementedError

    # -- Dataset ----------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.episodes) if self.episodes is not None else self.train_length()

    def episode(self, index: int) -> Episode:
        if self.episodes is not None:
            return self.episodes[index]
        return self.sample_train_episode(index)

    def __getitem__(self, index: int) -> dict:
        if not -len(self) <= index < len(self):
            raise IndexError(f"episode index {index} out of range for {len(self)} episodes")
        index = index % len(self)
        episode = self.episode(index)
        image_size = (self.img_size, self.img_size)

        query_pil = self.load_image(episode.query)
        query_raw = self.load_mask(episode.query, query_pil.size)
        query_img = self.transform(query_pil)
        if not self.use_original_imgsize:
            query_raw = resize_mask(query_raw, image_size)
        elif query_raw.shape != (query_pil.size[1], query_pil.size[0]):
            # Scored at the image's own size: the prediction is upsampled to it, so its truth must be too.
            query_raw = resize_mask(query_raw, (query_pil.size[1], query_pil.size[0]))
        query_mask, query_ignore = self.binarize(query_raw.float(), episode.class_id)

        support_imgs, support_masks, support_ignores = [], [], []
        for name in episode.supports:
            pil = self.load_image(name)
            raw = self.load_mask(name, pil.size)
            support_imgs.append(self.transform(pil))
            mask, ignore = self.binarize(resize_mask(raw, image_size), episode.class_id)
            support_masks.append(mask)
            support_ignores.append(ignore)

        return {
            "query_img": query_img,
            "query_mask": query_mask,
            "query_name": episode.query,
            "query_ignore_idx": query_ignore,
            "org_query_imsize": tuple(query_pil.size),
            "support_imgs": torch.stack(support_imgs),
            "support_masks": torch.stack(support_masks),
            "support_names": list(episode.supports),
            "support_ignore_idxs": torch.stack(support_ignores),
            "class_id": torch.tensor(episode.class_id),
        }

    def load_image(self, name: str) -> Image.Image:
        check_entry_name(name)
        path = self.image_path(name)
        if not path.exists():
            raise DatasetError(f"split entry {name!r} has no image file: {path} does not exist")
        return read_image(path)

    def load_mask(self, name: str, image_size: tuple[int, int]) -> torch.Tensor:
        check_entry_name(name)
        path = self.mask_path(name)
        if not path.exists():
            raise DatasetError(f"split entry {name!r} has no mask file: {path} does not exist")
        mask = read_mask(path, grey=self.grey_masks)
        warn_if_mask_misfits(mask, path, image_size)
        return mask

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(split={self.split!r}, nshot={self.nshot}, episodes={len(self)}, "
                f"classes={len(self.class_ids)}, img_size={self.img_size}, "
                f"use_original_imgsize={self.use_original_imgsize})")
