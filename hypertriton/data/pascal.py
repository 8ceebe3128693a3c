"""PASCAL-5i: PASCAL VOC 2012 with SBD augmented masks, 20 classes in 4 folds of 5.

Layout under ``datapath``: ``VOC2012/JPEGImages/<id>.jpg`` and ``VOC2012/SegmentationClassAug/<id>.png``
(pixel = 1-based VOC class index, 0 background, 255 boundary). Split files
``pascal/{trn,val}/fold{i}.txt``, one ``<id>__<cc>`` per line (``cc`` the 1-based class, two digits).

- Fold ``i`` tests the 0-based classes ``5i .. 5i+4``; training on fold ``i`` reads the trn files of the
  other three folds and uses their classes.
- Test (``val`` and ``test`` both read ``val/fold{i}.txt``): 1000 episodes. Episode ``j`` takes the
  query ``val_list[j % len(val_list)]`` and its class; supports are drawn with
  ``np.random.choice(images_of_class, 1, replace=False)`` one at a time from the legacy numpy stream
  seeded with 0, skipping draws equal to the query (repeats among supports are kept). Episodes are
  drawn in order 0..999, each query's supports before the next query's, as the original test loop does.
- Training: query = list entry ``index`` (the loader shuffles), supports drawn the same way from
  torch's RNG.
- The boundary (255) is returned as ``query_ignore_idx`` / ``support_ignore_idxs`` and is 0 in the masks.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .common import (DatasetError, Episode, FewShotDataset, benchmark_split_dir, check_fold, check_split,
                     draw_supports, numpy_choice, read_split_lines, torch_choice)

__all__ = ["PascalDataset", "NCLASS", "NFOLDS", "CLASS_NAMES"]

NCLASS = 20
NFOLDS = 4
# VOC's class indices 1..20 (SegmentationClassAug's pixel values), in order: 0-based class k is index k + 1.
CLASS_NAMES = ("aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable",
               "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor")
TEST_EPISODES = 1000


def fold_class_ids(fold: int, split: str) -> list[int]:
    """0-based classes of ``fold``: the 5 tested ones for val/test, the other 15 for trn."""
    per_fold = NCLASS // NFOLDS
    val = [fold * per_fold + i for i in range(per_fold)]
    return val if split != "trn" else [c for c in range(NCLASS) if c not in val]


def read_fold_file(path: Path) -> list[tuple[str, int]]:
    """``(image id, 0-based class)`` per line of one ``fold{i}.txt``."""
    entries = []
    for number, line in enumerate(read_split_lines(path), start=1):
        name, sep, cls = line.rpartition("__")
        if not sep or not name or not cls.strip().isdigit():
            raise DatasetError(f"{path}, line {number}: expected '<image id>__<class id>', got {line!r}")
        class_id = int(cls) - 1
        if not 0 <= class_id < NCLASS:
            raise DatasetError(f"{path}, line {number}: class id {int(cls)} outside 1..{NCLASS}")
        entries.append((name, class_id))
    return entries


def read_metadata(splits, fold: int, split: str) -> tuple[list[tuple[str, int]], list[Path]]:
    """The episode list of ``split`` (val/test: the fold's val file; trn: the other folds' trn files)
    and the files it came from."""
    fold = check_fold(fold, NFOLDS)
    kind = "trn" if check_split(split) == "trn" else "val"
    root = benchmark_split_dir(splits, "pascal", kind)
    folds = [f for f in range(NFOLDS) if f != fold] if kind == "trn" else [fold]
    files = [root / kind / f"fold{f}.txt" for f in folds]
    metadata: list[tuple[str, int]] = []
    for path in files:
        metadata += read_fold_file(path)
    return metadata, files


def classwise(metadata: list[tuple[str, int]]) -> dict[int, list[str]]:
    by_class: dict[int, list[str]] = {c: [] for c in range(NCLASS)}
    for name, class_id in metadata:
        by_class[class_id].append(name)
    return by_class


def draw_test_episodes(metadata: list[tuple[str, int]], nshot: int, count: int = TEST_EPISODES, seed: int = 0,
                  source: str = "the split file") -> list[Episode]:
    """The original test episodes (see the module docstring)."""
    if not metadata:
        raise DatasetError(f"{source} lists no images")
    rng = np.random.RandomState(seed)
    by_class = classwise(metadata)
    episodes = []
    for index in range(count):
        query, class_id = metadata[index % len(metadata)]
        where = f"class {class_id + 1} of {source}"
        supports = draw_supports(numpy_choice(rng), by_class[class_id], query, nshot, where)
        episodes.append(Episode(query, supports, class_id))
    return episodes


class PascalDataset(FewShotDataset):
    """PASCAL-5i episodes as the original batch dicts (see the module docstring and
    :class:`~hypertriton.data.common.FewShotDataset` for the item keys)."""

    benchmark = "pascal"
    nclass = NCLASS

    def __init__(self, datapath, splits, fold: int, split: str, nshot: int, img_size: int = 400,
                 use_original_imgsize: bool = False):
        super().__init__(split, nshot, img_size, use_original_imgsize)
        self.fold = check_fold(fold, NFOLDS)
        self.class_ids = fold_class_ids(self.fold, self.split)
        root = Path(datapath) if datapath is not None else Path(".")
        self.img_dir = root / "VOC2012" / "JPEGImages"
        self.ann_dir = root / "VOC2012" / "SegmentationClassAug"
        self.metadata, self.split_files = read_metadata(splits, self.fold, self.split)
        self.source = ", ".join(str(p) for p in self.split_files)
        self.by_class = classwise(self.metadata)
        if self.split != "trn":
            self.episodes = draw_test_episodes(self.metadata, self.nshot, source=self.source)
        elif not self.metadata:
            raise DatasetError(f"{self.source} lists no images")

    def class_name(self, class_id: int) -> str | None:
        return CLASS_NAMES[class_id] if 0 <= class_id < NCLASS else None

    def image_path(self, name: str) -> Path:
        return self.img_dir / f"{name}.jpg"

    def mask_path(self, name: str) -> Path:
        return self.ann_dir / f"{name}.png"

    def binarize(self, raw_mask: torch.Tensor, class_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        boundary = (raw_mask / 255).floor()
        return (raw_mask == class_id + 1).float(), boundary

    def train_length(self) -> int:
        return len(self.metadata)

    def sample_train_episode(self, index: int) -> Episode:
        query, class_id = self.metadata[index]
        supports = draw_supports(torch_choice, self.by_class[class_id], query, self.nshot,
                                 f"class {class_id + 1} of {self.source}")
        return Episode(query, supports, class_id)
