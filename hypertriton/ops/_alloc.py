"""Allocation of op outputs. Tests set ``POISON_OUTPUTS`` so that every element a kernel forgets to
write stays NaN and fails the comparison with the reference."""

from __future__ import annotations

import torch

POISON_OUTPUTS = False


def new_output(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    if POISON_OUTPUTS:
        return torch.full(tuple(shape), float("nan"), dtype=dtype, device=device)
    return torch.empty(tuple(shape), dtype=dtype, device=device)
