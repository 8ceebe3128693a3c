"""The benchmarks' test episodes by name, without reading any image.

Each benchmark draws its test episodes once, from the legacy numpy stream seeded with 0, in the order
the original test run draws them (see the docstrings of :mod:`.pascal`, :mod:`.coco`, :mod:`.fss`):

- PASCAL-5i: 1000 episodes, queries cycling through the fold's val list, supports drawn per query;
- COCO-20i: 1000 episodes, each drawing a class, a query, then the supports;
- FSS-1000: every image of the sorted classes (images sorted by path string), supports drawn per query.

Only the split files are read (for FSS-1000 also the folder listing of ``datapath/FSS-1000``).

Example::

    >>> from hypertriton.data.episodes import list_episodes
    >>> eps = list_episodes("pascal", "hsnet/data/splits", fold=0, nshot=1, count=2)  # doctest: +SKIP
    >>> eps[0].to_json()                                                                    # doctest: +SKIP
    {'query': '2007_000033', 'supports': [...], 'class_id': 0}
"""

from __future__ import annotations

from pathlib import Path

from .common import Episode, check_split

__all__ = ["Episode", "list_episodes"]

BENCHMARKS = ("pascal", "coco", "fss", "synthetic")


def list_episodes(benchmark: str, splits, fold: int, nshot: int, datapath=None, split: str = "test",
                  count: int | None = None) -> list[Episode]:
    """The first ``count`` (default: all) episodes of a benchmark's val/test run.

    Args:
        benchmark: "pascal", "coco", "fss" or "synthetic".
        splits: folder holding the split files (``pascal/``, ``coco/``, ``fss/`` or one of them); not
            used by the synthetic benchmark, whose episodes are generated.
        fold: 0..3 (ignored for FSS-1000).
        nshot: supports per episode.
        datapath: data root; needed only for FSS-1000 (its episodes come from the folder listing).
        split: "test" or "val" (the same for PASCAL and COCO; FSS-1000 has separate val classes).
        count: keep only the first ``count`` episodes (a prefix: the draws do not depend on it).

    Returns:
        list of :class:`Episode` (query, supports, 0-based class id), in test order.
    """
    if check_split(split) == "trn":
        raise ValueError("split must be 'val' or 'test' for fixed episodes; training episodes are random")
    if isinstance(nshot, bool) or not isinstance(nshot, int) or nshot < 1:
        raise ValueError(f"nshot must be a positive int, got {nshot!r}")
    if count is not None and (isinstance(count, bool) or not isinstance(count, int) or count < 0):
        raise ValueError(f"count must be a non-negative int or None, got {count!r}")
    if benchmark == "pascal":
        from . import pascal

        metadata, files = pascal.read_metadata(splits, fold, split)
        total = pascal.TEST_EPISODES if count is None else min(count, pascal.TEST_EPISODES)
        return pascal.draw_test_episodes(metadata, nshot, total, source=str(files[0]))
    if benchmark == "coco":
        from . import coco

        lists, class_ids, path = coco.read_metadata(splits, fold, split)
        total = coco.TEST_EPISODES if count is None else min(count, coco.TEST_EPISODES)
        return coco.draw_test_episodes(lists, class_ids, nshot, total, source=str(path))
    if benchmark == "fss":
        from . import fss

        if datapath is None:
            raise ValueError("datapath is required for fss: its episodes come from the folder listing")
        categories, path = fss.read_categories(splits, split)
        queries = fss.list_queries(Path(datapath) / "FSS-1000", categories, path)
        offset = fss.CLASS_OFFSET[split]
        index = {name: offset + i for i, name in enumerate(categories)}
        return fss.draw_test_episodes(queries, index, nshot, count=count, source=str(path))
    if benchmark == "synthetic":
        from .synthetic import SyntheticDataset

        return SyntheticDataset(fold=fold, split=split, nshot=nshot).episode_names(count)
    raise ValueError(f"benchmark must be one of {BENCHMARKS}, got {benchmark!r}")
