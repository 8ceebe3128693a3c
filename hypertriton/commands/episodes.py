"""``hypertriton episodes``: print a benchmark's test episodes as JSON lines.

One line per episode, in test order: ``{"query": ..., "supports": [...], "class_id": ...}`` with names as
the split files spell them (PASCAL image id, COCO path as stored, FSS ``class/n.jpg``) and 0-based
class ids as the original uses them. Only the split files are read (FSS-1000: also the folder listing).

Example::

    hypertriton episodes --benchmark pascal --fold 0 --nshot 1 --splits hsnet/data/splits --count 3
"""

from __future__ import annotations

import argparse
import json
import sys

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--benchmark", required=True, choices=["pascal", "coco", "fss", "synthetic"])
    parser.add_argument("--fold", type=int, default=0, help="0..3 (ignored for fss; default: %(default)s)")
    parser.add_argument("--nshot", type=int, default=1, help="supports per episode (default: %(default)s)")
    parser.add_argument("--splits", metavar="DIR",
                        help="folder with the original split files (pascal/, coco/, fss/); not for synthetic")
    parser.add_argument("--datapath", metavar="DIR", help="data root (needed for fss: FSS-1000/ is listed)")
    parser.add_argument("--split", default="test", choices=["test", "val"],
                        help="which fixed episodes: the test run's or the validation run's (default: "
                        "%(default)s; they differ for fss and synthetic; pascal and coco validate on their test "
                        "episodes, as the original)")
    parser.add_argument("--count", type=int, metavar="N", help="print only the first N episodes")


def run(args: argparse.Namespace) -> int:
    from hypertriton.data.episodes import list_episodes

    if args.splits is None and args.benchmark != "synthetic":
        print(f"hypertriton episodes: error: --splits DIR is required for {args.benchmark}", file=sys.stderr)
        return 2
    try:
        episodes = list_episodes(args.benchmark, args.splits, args.fold, args.nshot, datapath=args.datapath,
                                 split=args.split, count=args.count)
    except ValueError as error:  # DatasetError included: bad arguments or split files
        print(f"hypertriton episodes: error: {error}", file=sys.stderr)
        return 2
    out = sys.stdout
    for episode in episodes:
        out.write(json.dumps(episode.to_json()) + "\n")
    out.flush()
    return 0
