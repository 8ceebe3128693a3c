"""FSS-1000: 1000 classes of 10 images, split 520 (trn) / 240 (val) / 240 (test) by class.

Layout under ``datapath``: ``FSS-1000/<class>/<n>.jpg`` with mask ``<n>.png`` (grey, foreground where
``>= 128``), n = 1..10. Split files ``fss/{trn,val,test}.txt``, one class name per line.

- Classes are the split file's names sorted; class id = position + offset (trn 0, val 520, test 760),
  as the original numbers them over all 1000 classes.
- Episodes (val and test; ``trn`` likewise in its queries): every ``.jpg`` of every class is a query, in
  class order, the images of a class sorted by path string (so ``1.jpg, 10.jpg, 2.jpg, ...``); test
  has 2400. Supports are ``<n>.jpg`` with ``n = np.random.choice(range(1, 11), 1, replace=False)``
  drawn one at a time from the legacy numpy stream seeded with 0, skipping the query (repeats among
  supports are kept). Listing episodes needs the folder listing, not the image contents.
- Training draws the supports the same way from torch's RNG.
- Unlike the original (which always resizes the query mask), ``use_original_imgsize`` is honoured.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from .common import (DatasetError, Episode, FewShotDataset, benchmark_split_dir, check_split, draw_supports,
                     numpy_choice, read_split_lines, torch_choice)

__all__ = ["FssDataset"]

CLASS_OFFSET = {"trn": 0, "val": 520, "test": 760}
IMAGES_PER_CLASS = 10


def read_categories(splits, split: str) -> tuple[list[str], Path]:
    """The sorted class names of ``split`` and the split file they came from."""
    split = check_split(split)
    path = benchmark_split_dir(splits, "fss", f"{split}.txt") / f"{split}.txt"
    return sorted(read_split_lines(path)), path


def _is_jpg(filename: str) -> bool:
    # The original keeps files whose name's second dot-separated part is 'jpg'.
    parts = filename.split(".")
    return len(parts) > 1 and parts[1] == "jpg"


def list_queries(base: Path, categories: list[str], split_file: Path) -> list[str]:
    """Every query as ``class/file.jpg``: classes in the given order, images sorted by path string."""
    queries = []
    for category in categories:
        folder = base / category
        try:
            names = os.listdir(folder)
        except FileNotFoundError:
            raise DatasetError(
                f"class {category!r} listed in {split_file} has no folder: {folder} does not exist") from None
        except OSError as error:
            raise DatasetError(f"cannot list class folder {folder}: {error}") from None
        # glob('*') skips dot files; sorting full paths of one folder is sorting the names.
        images = sorted(name for name in names if not name.startswith(".") and _is_jpg(name))
        if not images:
            raise DatasetError(f"empty class: folder {folder} (listed in {split_file}) holds no .jpg image")
        queries += [f"{category}/{name}" for name in images]
    return queries


def support_pool(query: str) -> list[str]:
    category = query.rsplit("/", 1)[0]
    return [f"{category}/{n}.jpg" for n in range(1, IMAGES_PER_CLASS + 1)]


def draw_test_episodes(queries: list[str], class_index: dict[str, int], nshot: int, seed: int = 0,
                       count: int | None = None, source: str = "the split file") -> list[Episode]:
    """The original test episodes (see the module docstring); ``count`` keeps only the first ones."""
    rng = np.random.RandomState(seed)
    choose = numpy_choice(rng)
    episodes = []
    for query in queries[:count]:
        category = query.rsplit("/", 1)[0]
        supports = draw_supports(choose, support_pool(query), query, nshot, f"class {category!r} of {source}")
        episodes.append(Episode(query, supports, class_index[category]))
    return episodes


class FssDataset(FewShotDataset):
    """FSS-1000 episodes as the original batch dicts (see the module docstring and
    :class:`~hypertriton.data.common.FewShotDataset` for the item keys). ``fold`` does not apply."""

    benchmark = "fss"
    nclass = 1000
    grey_masks = True

    def __init__(self, datapath, splits, fold: int | None, split: str, nshot: int, img_size: int = 400,
                 use_original_imgsize: bool = False):
        super().__init__(split, nshot, img_size, use_original_imgsize)
        self.fold = fold
        self.base = (Path(datapath) if datapath is not None else Path(".")) / "FSS-1000"
        self.categories, self.split_file = read_categories(splits, self.split)
        offset = CLASS_OFFSET[self.split]
        self.class_index = {name: offset + i for i, name in enumerate(self.categories)}
        self.class_ids = [offset + i for i in range(len(self.categories))]
        self.queries = list_queries(self.base, self.categories, self.split_file)
        if self.split != "trn":
            self.episodes = draw_test_episodes(self.queries, self.class_index, self.nshot,
                                               source=str(self.split_file))

    def class_name(self, class_id: int) -> str | None:
        index = class_id - CLASS_OFFSET[self.split]
        return self.categories[index] if 0 <= index < len(self.categories) else None

    def image_path(self, name: str) -> Path:
        return self.base / name

    def mask_path(self, name: str) -> Path:
        category, filename = name.rsplit("/", 1)
        return self.base / category / (filename.split(".")[0] + ".png")

    def binarize(self, raw_mask: torch.Tensor, class_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        return (raw_mask >= 128).float(), torch.zeros_like(raw_mask, dtype=torch.float32)

    def train_length(self) -> int:
        return len(self.queries)

    def sample_train_episode(self, index: int) -> Episode:
        query = self.queries[index]
        category = query.rsplit("/", 1)[0]
        supports = draw_supports(torch_choice, support_pool(query), query, self.nshot,
                                 f"class {category!r} of {self.split_file}")
        return Episode(query, supports, self.class_index[category])
