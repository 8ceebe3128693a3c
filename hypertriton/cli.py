"""The hypertriton command line (also: python -m hypertriton).

Each sub-command lives in its own module ``hypertriton.commands.<name>`` exposing
``add_arguments(parser)`` and ``run(args) -> int``; this file only dispatches.
"""

from __future__ import annotations

import argparse
import importlib
import sys

__all__ = ["main", "build_parser", "COMMANDS"]

COMMANDS = {
    "episodes": "print a benchmark's test episodes as JSON lines",
    "evaluate": "evaluate a checkpoint on a few-shot benchmark (mIoU, FB-IoU)",
    "train": "train HSNet on a few-shot benchmark (one or many GPUs via torchrun)",
    "predict": "segment your own images given k annotated supports",
}


def build_parser() -> argparse.ArgumentParser:
    from hypertriton import __version__

    parser = argparse.ArgumentParser(prog="hypertriton", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, help_text in COMMANDS.items():
        try:
            module = importlib.import_module(f"hypertriton.commands.{name}")
        except ModuleNotFoundError as error:
            if error.name != f"hypertriton.commands.{name}":
                raise
            continue  # not built yet
        sub = subparsers.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(sub)
        sub.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "_run", None) is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        return int(args._run(args) or 0)
    except KeyboardInterrupt:  # what each command wrote so far is whole (every output is written atomically)
        print(f"hypertriton {args.command}: interrupted", file=sys.stderr)
        return 130
