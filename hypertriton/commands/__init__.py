"""The subcommands of the ``hypertriton`` command line, one module each."""

from __future__ import annotations

import sys


def print_error(command: str, error, same_on_every_rank: bool) -> None:
    """``hypertriton COMMAND: error: ...`` on stderr. Under torchrun, an error that every rank meets alike
    (``same_on_every_rank``: a check of the arguments) is printed by rank 0 alone; any other is printed by
    each rank that meets it, naming the rank (it may be that rank's alone: a file only it reads)."""
    from hypertriton.distributed import env_ranks

    try:
        rank, world_size, _ = env_ranks()
    except ValueError:  # a broken torchrun environment is itself the error being reported
        rank, world_size = 0, 1
    if world_size > 1 and same_on_every_rank and rank != 0:
        return
    where = f" (rank {rank} of {world_size})" if world_size > 1 and not same_on_every_rank else ""
    print(f"hypertriton {command}: error{where}: {error}", file=sys.stderr)
