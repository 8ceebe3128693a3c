"""Few-shot segmentation benchmarks in the original HSNet layouts: PASCAL-5i, COCO-20i, FSS-1000
(and a synthetic one for tests and demos).

Example::

    >>> from hypertriton.data import build_dataset
    >>> ds = build_dataset("pascal", "/data", "hsnet/data/splits", fold=0, split="test", nshot=1)  # doctest: +SKIP
    >>> item = ds[0]; item["query_img"].shape, item["support_masks"].shape                           # doctest: +SKIP
    (torch.Size([3, 400, 400]), torch.Size([1, 400, 400]))
"""

from __future__ import annotations

import importlib
from pathlib import Path

from .common import DatasetError, Episode, FewShotDataset
from .episodes import list_episodes

__all__ = ["BENCHMARKS", "DatasetError", "Episode", "FewShotDataset", "build_dataset", "list_episodes"]

BENCHMARKS = {
    "pascal": ("hypertriton.data.pascal", "PascalDataset"),
    "coco": ("hypertriton.data.coco", "CocoDataset"),
    "fss": ("hypertriton.data.fss", "FssDataset"),
    "synthetic": ("hypertriton.data.synthetic", "SyntheticDataset"),
}
# The folder each real benchmark's files live in, under the data root.
DATA_FOLDERS = {"pascal": "VOC2012", "coco": "COCO2014", "fss": "FSS-1000"}
DATA_HINT = ("where to get the images, masks and split files: README.md, 'Data and weights' (the original HSNet "
             "repository, https://github.com/juhongm999/hsnet, has the split files in data/splits)")


def build_dataset(benchmark: str, datapath, splits, fold: int, split: str, nshot: int, img_size: int = 400,
                  use_original_imgsize: bool = False):
    """A benchmark's episodes as a torch ``Dataset`` of the original batch dicts.

    Args:
        benchmark: "pascal", "coco", "fss" or "synthetic".
        datapath: data root holding ``VOC2012/``, ``COCO2014/`` or ``FSS-1000/``.
        splits: folder holding the split files (the original ``data/splits``: ``pascal/``, ``coco/``,
            ``fss/``), or the benchmark's own split folder.
        fold: 0..3 (ignored for FSS-1000).
        split: "trn" (random episodes), "val" or "test" (the fixed seed-0 episodes of the original test
            run; PASCAL and COCO read their val files for both).
        nshot: supports per episode.
        img_size: side of the square resized images (and masks, unless ``use_original_imgsize``).
        use_original_imgsize: keep the query mask (and ignore map) at the image's original size.

    Returns:
        A dataset with ``benchmark``, ``class_ids`` (the split's 0-based classes), ``nshot``, ``split``;
        items as described in :class:`~hypertriton.data.common.FewShotDataset`.
    """
    if benchmark not in BENCHMARKS:
        raise ValueError(f"benchmark must be one of {sorted(BENCHMARKS)}, got {benchmark!r}")
    folder = DATA_FOLDERS.get(benchmark)
    root = Path(datapath) if datapath is not None else Path(".")
    if folder is not None and not (root / folder).is_dir():
        # Otherwise the first episode's image would be reported missing, without a word of datapath.
        where = f"{str(root)!r} holds" if datapath is not None else "none given, and the current folder holds"
        raise DatasetError(f"datapath: {where} no {folder}/ folder; expected the data root of {benchmark}'s "
                           f"original layout (the folder that holds {folder}/); {DATA_HINT}")
    module_name, class_name = BENCHMARKS[benchmark]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        if error.name != module_name:
            raise
        raise ValueError(f"benchmark {benchmark!r} is not available: {module_name} is not installed") from None
    dataset_class = getattr(module, class_name)
    return dataset_class(datapath, splits, fold, split, nshot, img_size=img_size,
                         use_original_imgsize=use_original_imgsize)
