"""Writing a matrix product's columns into the wider buffer whose columns they stand for.

The sparse paths multiply only the active support positions (``[R, N]`` products) and then place them
at those positions of a wider buffer (``[R, M]``: the whole support map, or a window's grid).
``index_copy_`` does that element by element (about 3 ns per element on the 2-core AMD EPYC dev VMs).
An object's active positions come in runs along its rows (23 runs for the 537 active positions of a
typical 400-px object mask at ResNet-50's layer2 level), and one slice copy per run moves them as
contiguous blocks: 0.26 ms instead of 0.90 for one ``[547, 537]`` chunk into a ``[547, 957]`` grid.
"""

from __future__ import annotations

import torch

# Below this many elements per run on average, a Python slice copy per run costs more than index_copy_
# (each costs about 7 us of overhead; index_copy_ about 3 ns per element more than a slice copy).
MIN_ELEMENTS_PER_RUN = 8192


def column_runs(positions: torch.Tensor) -> list[tuple[int, int, int]]:
    """Maximal runs of consecutive ``positions`` ``[N]`` (distinct indices): ``(first source column, first
    target column, length)`` each, in source order."""
    if positions.numel() == 0:
        return []
    positions = positions.cpu()
    starts = [0] + ((positions[1:] != positions[:-1] + 1).nonzero().squeeze(1) + 1).tolist()
    ends = starts[1:] + [positions.numel()]
    return [(start, first, end - start) for start, first, end in zip(starts, positions[starts].tolist(), ends)]


def runs_pay_off(runs: list, rows: int, columns: int, device: torch.device) -> bool:
    """Whether :func:`copy_columns_` of ``rows`` x ``columns`` source elements should go run by run (on CPU,
    with runs long enough to beat ``index_copy_``)."""
    return device.type == "cpu" and bool(runs) and rows * columns >= MIN_ELEMENTS_PER_RUN * len(runs)


def copy_columns_(target: torch.Tensor, source: torch.Tensor, positions: torch.Tensor,
                  runs: list[tuple[int, int, int]] | None = None, zero_rest: bool = False) -> torch.Tensor:
    """``target[:, positions] = source`` in place, returning ``target``.

    Args:
        target: ``[R, M]`` (rows may be strided).
        source: ``[R, N]``.
        positions: ``[N]`` distinct column indices of ``target``.
        runs: :func:`column_runs` of ``positions`` (None: computed here when it may pay off). Slice copies
            run by run where :func:`runs_pay_off`, else ``index_copy_``.
        zero_rest: also set every other column of ``target`` to 0.
    """
    if runs is None and target.device.type == "cpu":
        runs = column_runs(positions)
    if not runs_pay_off(runs or [], *source.shape, target.device):
        if zero_rest:
            target.zero_()
        return target.index_copy_(1, positions, source)
    end = 0  # the columns before it are written
    for start, first, length in sorted(runs, key=lambda run: run[1]):
        if zero_rest and first > end:
            target[:, end:first].zero_()
        target[:, first:first + length].copy_(source[:, start:start + length])
        end = first + length
    if zero_rest and end < target.shape[1]:
        target[:, end:].zero_()
    return target
