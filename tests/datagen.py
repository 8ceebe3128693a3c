"""Tiny few-shot datasets in the exact original folder layouts, written to a temporary folder.

Each ``make_*`` function writes images, masks and split files for one benchmark under ``root`` and
returns a :class:`Generated` with the ``datapath`` and ``splits`` to pass to
``hypertriton.data.build_dataset`` (or ``--datapath`` / ``--splits`` on the command line):

- :func:`make_pascal`: ``VOC2012/JPEGImages/*.jpg``, ``VOC2012/SegmentationClassAug/*.png`` (pixel =
  1-based class, 255 on a one-pixel ring around each object, as the VOC boundary), split files
  ``pascal/{trn,val}/fold{0..3}.txt`` with ``<id>__<cc>`` lines.
- :func:`make_coco`: ``COCO2014/{train2014,val2014}/*.jpg``, ``COCO2014/annotations/{...}/*.png`` (pixel =
  class + 1), split pickles ``coco/{trn,val}/fold{i}.pkl`` (dict class id -> names) for the given folds.
- :func:`make_fss`: ``FSS-1000/<class>/{1..10}.jpg`` + ``.png`` (0/255 grey masks), split files
  ``fss/{trn,val,test}.txt``.

Every image holds one rectangle of its class at a random place over a noisy background (PASCAL and
COCO images may hold a second object of another class); sizes vary per image (about 20-40 px) so that
resizing and ``use_original_imgsize`` are exercised. Everything is drawn from ``seed``.

Example (in a test)::

    from datagen import make_fss
    data = make_fss(tmp_path, {"test": ["bus", "cat"]})
    ds = build_dataset("fss", data.datapath, data.splits, 0, "test", nshot=1, img_size=32)
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image


@dataclass
class Generated:
    """Where a generated dataset lives.

    Attributes:
        datapath: the data root (holds ``VOC2012/``, ``COCO2014/`` or ``FSS-1000/``).
        splits: the split-file root (holds ``pascal/``, ``coco/`` or ``fss/``).
        images: image name (as episodes spell it) -> 0-based class ids present in its mask
            (FSS-1000: the class name).
    """

    datapath: Path
    splits: Path
    images: dict = field(default_factory=dict)


def _size(rng: np.random.Generator) -> tuple[int, int]:
    return int(rng.integers(24, 41)), int(rng.integers(20, 37))  # (W, H)


def _box(rng: np.random.Generator, width: int, height: int) -> tuple[slice, slice]:
    box_h, box_w = int(rng.integers(4, height // 2)), int(rng.integers(4, width // 2))
    top, left = int(rng.integers(1, height - box_h - 1)), int(rng.integers(1, width - box_w - 1))
    return slice(top, top + box_h), slice(left, left + box_w)


def _image(rng: np.random.Generator, width: int, height: int, labels: np.ndarray) -> Image.Image:
    """Noisy RGB whose objects (labels > 0) are tinted by label, so a model has something to see."""
    pixels = rng.integers(0, 96, size=(height, width, 3)).astype(np.int64)
    for label in np.unique(labels).tolist():
        if label > 0:
            tint = np.array([(label * 53) % 160, (label * 97) % 160, (label * 29) % 160]) + 96
            pixels[labels == label] = tint
    return Image.fromarray(pixels.clip(0, 255).astype(np.uint8), "RGB")


def _object_mask(rng, width, height, labels_in_image, boundary: bool) -> np.ndarray:
    """Boxes drawn in order (a later one covers an earlier one, so the image's own class goes last)."""
    labels = np.zeros((height, width), dtype=np.uint8)
    for label in labels_in_image:
        rows, cols = _box(rng, width, height)
        if boundary:
            ring_rows = slice(max(rows.start - 1, 0), rows.stop + 1)
            ring_cols = slice(max(cols.start - 1, 0), cols.stop + 1)
            labels[ring_rows, ring_cols] = 255
        labels[rows, cols] = label
    return labels


def _write(image: Image.Image, mask: np.ndarray, image_path: Path, mask_path: Path) -> None:
    image_path.parent.mkdir(parents=True, exist_ok=True)
    mask_path.parent.mkdir(parents=True, exist_ok=True)
    image.save(image_path, quality=95)
    Image.fromarray(mask, "L").save(mask_path)


def make_pascal(root, images_per_class: int = 3, seed: int = 0, second_object: float = 0.3) -> Generated:
    """A PASCAL-5i tree: ``images_per_class`` val and as many trn images for each of the 20 classes.

    Val image ``2007_<c><i>`` and trn image ``2008_<c><i>`` hold class ``c``; with probability
    ``second_object`` a second object of another class (listed in the split file too, like VOC images
    holding several classes). Split lines ``<id>__<c+1:02d>`` go to the fold of their class.
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    data = Generated(root, root / "splits")
    voc = root / "VOC2012"
    lines = {(kind, fold): [] for kind in ("trn", "val") for fold in range(4)}
    for kind, year in (("val", 2007), ("trn", 2008)):
        for class_id in range(20):
            for i in range(images_per_class):
                name = f"{year}_{class_id:02d}{i:04d}"
                classes = [class_id]
                if rng.random() < second_object:
                    classes.append(int((class_id + 1 + rng.integers(19)) % 20))
                width, height = _size(rng)
                labels = _object_mask(rng, width, height, [c + 1 for c in reversed(classes)], boundary=True)
                present = [c for c in classes if (labels == c + 1).any()]
                _write(_image(rng, width, height, labels), labels,
                       voc / "JPEGImages" / f"{name}.jpg", voc / "SegmentationClassAug" / f"{name}.png")
                data.images[name] = present
                for c in present:
                    lines[(kind, c // 5)].append(f"{name}__{c + 1:02d}")
    for (kind, fold), entries in lines.items():
        path = data.splits / "pascal" / kind / f"fold{fold}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(f"{entry}\n" for entry in sorted(entries)))
    return data


def make_coco(root, folds=(0,), images_per_class: int = 3, seed: int = 0) -> Generated:
    """A COCO-20i tree for ``folds``: val images for each fold's 20 test classes, trn images for its 60
    training classes, ``images_per_class`` each; the pickles hold every class of the 80 (empty lists for
    the classes of other folds, as the original files)."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    data = Generated(root, root / "splits")
    base = root / "COCO2014"
    next_id = 1
    for fold in folds:
        val_classes = [fold + 4 * k for k in range(20)]
        for kind, folder in (("val", "val2014"), ("trn", "train2014")):
            wanted = val_classes if kind == "val" else [c for c in range(80) if c not in val_classes]
            lists: dict[int, list[str]] = {c: [] for c in range(80)}
            for class_id in wanted:
                for _ in range(images_per_class):
                    name = f"{folder}/COCO_{folder}_{next_id:012d}.jpg"
                    next_id += 1
                    classes = [class_id]
                    if rng.random() < 0.3:
                        classes.append(int((class_id + 1 + rng.integers(79)) % 80))
                    width, height = _size(rng)
                    labels = _object_mask(rng, width, height, [c + 1 for c in reversed(classes)], boundary=False)
                    _write(_image(rng, width, height, labels), labels, base / name,
                           base / "annotations" / name.replace(".jpg", ".png"))
                    data.images[name] = [c for c in classes if (labels == c + 1).any()]
                    lists[class_id].append(name)
            path = data.splits / "coco" / kind / f"fold{fold}.pkl"
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "wb") as handle:
                pickle.dump(lists, handle, protocol=3)
    return data


def make_fss(root, classes: dict[str, list[str]], images_per_class: int = 10, seed: int = 0,
             crlf: bool = False) -> Generated:
    """An FSS-1000 tree: for each split in ``classes`` (``{"trn"|"val"|"test": [names]}``) a split file
    listing its names (in the given order, unsorted, CRLF line ends if ``crlf`` like the original
    test.txt) and ``images_per_class`` image/mask pairs ``1.jpg``/``1.png``... per class. Masks are
    grey 0/255 with a few pixels at 127 and 128 around the threshold."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    data = Generated(root, root / "splits")
    for split, names in classes.items():
        path = data.splits / "fss" / f"{split}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        ending = "\r\n" if crlf else "\n"
        path.write_bytes("".join(f"{name}{ending}" for name in names).encode())
        for name in names:
            for n in range(1, images_per_class + 1):
                width, height = _size(rng)
                labels = _object_mask(rng, width, height, [255], boundary=False)
                labels[0, 0], labels[0, 1] = 127, 128
                _write(_image(rng, width, height, labels), labels, root / "FSS-1000" / name / f"{n}.jpg",
                       root / "FSS-1000" / name / f"{n}.png")
                data.images[f"{name}/{n}.jpg"] = name
    return data
