"""COCO-20i: COCO 2014, 80 classes in 4 folds of 20 (fold ``i`` tests the 0-based classes ``i + 4k``).

Layout under ``datapath``: ``COCO2014/{train2014,val2014}/<name>.jpg`` and masks
``COCO2014/annotations/{train2014,val2014}/<name>.png`` (pixel = 0-based class id + 1). Split files
``coco/{trn,val}/fold{i}.pkl``: a pickled dict ``class id -> list of image names`` (names as
``val2014/COCO_val2014_000000000042.jpg``, relative to ``COCO2014/``). The pickles are read with
:func:`load_class_lists`, which accepts only plain containers, strings and numbers.

- Test (``val`` and ``test`` both read ``val/fold{i}.pkl``): 1000 episodes, each drawn from the legacy
  numpy stream seeded with 0 in this order: the class (``np.random.choice(class_ids, 1, replace=False)``
  over the fold's 20 classes in increasing order), the query (the same over that class's list), then
  the supports one at a time, skipping draws equal to the query (repeats among supports are kept).
- Training ignores the index as the original does (the loader's length is the number of distinct
  images): class, query and supports are drawn the same way from torch's RNG.
"""

from __future__ import annotations

import io
import pickle
import pickletools
import reprlib
from pathlib import Path

import numpy as np
import torch

from .common import (DatasetError, Episode, FewShotDataset, benchmark_split_dir, check_fold, check_split,
                     draw_supports, numpy_choice, torch_choice)

__all__ = ["CocoDataset", "safe_load_pickle", "NCLASS", "NFOLDS"]

NCLASS = 80
NFOLDS = 4
TEST_EPISODES = 1000

# What a split pickle may build: dicts, lists, str, bytes, int, float, bool and None need no global and no
# tuple. Tuples and sets (and so any global at all) are refused too: hashing a key that nests a tuple
# in itself 60 times (a 505-byte file) takes 2^60 steps, and a million levels crash the interpreter.
_REFUSED_OPCODES = {"TUPLE", "TUPLE1", "TUPLE2", "TUPLE3", "EMPTY_TUPLE", "EMPTY_SET", "ADDITEMS", "FROZENSET"}
_ALLOWED_GLOBALS: set[tuple[str, str]] = set()


class _PlainUnpickler(pickle.Unpickler):
    def __init__(self, file, path):
        super().__init__(file)
        self._path = path

    def find_class(self, module, name):
        if (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        raise DatasetError(f"refusing to load {self._path}: it asks for {module}.{name}; only dicts, lists, "
                           f"strings and numbers are allowed in split pickles")

    def persistent_load(self, pid):
        raise DatasetError(f"refusing to load {self._path}: it uses persistent ids; only plain containers, "
                           f"strings and numbers are allowed in split pickles")


def safe_load_pickle(path: Path):
    """Unpickle ``path`` allowing only dicts, lists, strings and numbers (no code runs; no tuple or set
    whose hashing could take forever)."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise DatasetError(f"split file not found: {path}") from None
    except OSError as error:
        raise DatasetError(f"cannot read split file {path}: {error}") from None
    try:
        # Read, not run: the whole file is checked before anything is built.
        strings, named, refused = [], [], None
        for opcode, argument, _position in pickletools.genops(data):
            if opcode.name == "GLOBAL":
                named.append(argument.replace(" ", "."))
            elif opcode.name == "STACK_GLOBAL":
                named.append(".".join(strings[-2:]))
            elif isinstance(argument, str):
                strings.append(argument)
            if opcode.name in _REFUSED_OPCODES and refused is None:
                refused = opcode.name
        if named:
            raise DatasetError(f"refusing to load {path}: it asks for {named[0]}; only dicts, lists, strings and "
                               "numbers are allowed in split pickles")
        if refused is not None:
            raise DatasetError(f"refusing to load {path}: it builds tuples or sets ({refused}); split pickles hold "
                               "a dict of class ids to lists of names")
        return _PlainUnpickler(io.BytesIO(data), path).load()
    except DatasetError:
        raise
    except Exception as error:  # a corrupt pickle raises many kinds of errors
        raise DatasetError(f"cannot unpickle split file {path}: {type(error).__name__}: {error}") from None


def load_class_lists(path: Path) -> dict[int, list[str]]:
    """A COCO split pickle as ``{0-based class id: [image name, ...]}``, checked for that shape."""
    data = safe_load_pickle(path)
    if not isinstance(data, dict):
        raise DatasetError(f"split file {path} holds a {type(data).__name__}; expected a dict class id -> names")
    lists: dict[int, list[str]] = {}
    for key, names in data.items():
        if isinstance(key, bool) or not isinstance(key, int) or not isinstance(names, (list, tuple)) \
                or not all(isinstance(name, str) for name in names):
            shown = reprlib.repr(key)  # (a file's own key: its repr may be huge)
            raise DatasetError(f"split file {path}: entry {shown} is not 'int class id -> list of str names'")
        lists[key] = list(names)
    return lists


def fold_class_ids(fold: int, split: str) -> list[int]:
    """0-based classes of ``fold``: ``fold + 4k`` (k = 0..19) for val/test, the other 60 for trn."""
    val = [fold + NFOLDS * k for k in range(NCLASS // NFOLDS)]
    return val if split != "trn" else [c for c in range(NCLASS) if c not in val]


def read_metadata(splits, fold: int, split: str) -> tuple[dict[int, list[str]], list[int], Path]:
    """``(class lists, class ids, pickle path)`` for a fold and split; every class id must have images."""
    fold = check_fold(fold, NFOLDS)
    kind = "trn" if check_split(split) == "trn" else "val"
    path = benchmark_split_dir(splits, "coco", kind) / kind / f"fold{fold}.pkl"
    lists = load_class_lists(path)
    class_ids = fold_class_ids(fold, kind)
    for class_id in class_ids:
        if not lists.get(class_id):
            raise DatasetError(f"empty class: split file {path} lists no images for class {class_id}")
    return lists, class_ids, path


def draw_test_episodes(lists: dict[int, list[str]], class_ids: list[int], nshot: int,
                       count: int = TEST_EPISODES, seed: int = 0, source: str = "the split file") -> list[Episode]:
    """The original test episodes (see the module docstring)."""
    rng = np.random.RandomState(seed)
    choose = numpy_choice(rng)
    episodes = []
    for _ in range(count):
        class_id = class_ids[choose(len(class_ids))]
        pool = lists[class_id]
        query = pool[choose(len(pool))]
        supports = draw_supports(choose, pool, query, nshot, f"class {class_id} of {source}")
        episodes.append(Episode(query, supports, class_id))
    return episodes


class CocoDataset(FewShotDataset):
    """COCO-20i episodes as the original batch dicts (see the module docstring and
    :class:`~hypertriton.data.common.FewShotDataset` for the item keys)."""

    benchmark = "coco"
    nclass = NCLASS

    def __init__(self, datapath, splits, fold: int, split: str, nshot: int, img_size: int = 400,
                 use_original_imgsize: bool = False):
        super().__init__(split, nshot, img_size, use_original_imgsize)
        self.fold = check_fold(fold, NFOLDS)
        self.base = (Path(datapath) if datapath is not None else Path(".")) / "COCO2014"
        self.lists, self.class_ids, self.split_file = read_metadata(splits, self.fold, self.split)
        if self.split != "trn":
            self.episodes = draw_test_episodes(self.lists, self.class_ids, self.nshot, source=str(self.split_file))
        else:
            self.num_images = len({name for names in self.lists.values() for name in names})

    def image_path(self, name: str) -> Path:
        return self.base / name

    def mask_path(self, name: str) -> Path:
        stem = name[:name.index(".jpg")] if ".jpg" in name else str(Path(name).with_suffix(""))
        return self.base / "annotations" / f"{stem}.png"

    def binarize(self, raw_mask: torch.Tensor, class_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        return (raw_mask == class_id + 1).float(), torch.zeros_like(raw_mask, dtype=torch.float32)

    def train_length(self) -> int:
        return self.num_images

    def sample_train_episode(self, index: int) -> Episode:
        class_id = self.class_ids[torch_choice(len(self.class_ids))]
        pool = self.lists[class_id]
        query = pool[torch_choice(len(pool))]
        supports = draw_supports(torch_choice, pool, query, self.nshot, f"class {class_id} of {self.split_file}")
        return Episode(query, supports, class_id)
