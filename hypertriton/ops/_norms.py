"""Channel norms of feature maps, shared by the ops: the values of :func:`hypertriton.reference.normalize`
up to rounding, computed without gradients as ``sqrt(sum(f * f))`` (a strided ``norm`` over dim 1 costs
two to three times as much on CPU)."""

from __future__ import annotations

import math

import torch

from .. import reference

# Elements per step of the no-grad squared norm: its temporary stays in cache.
NORM_STEP_ELEMENTS = 1 << 16


def squared_norm(features: torch.Tensor) -> torch.Tensor:
    """``sum(f * f)`` over dim 1 of ``[B, C, H, W]`` -> ``[B, 1, H, W]``, in steps of channels (a temporary
    of the features' size costs more than the arithmetic). No gradient path: see :func:`channel_norm`."""
    total = None
    # On CPU, steps of channels keep the temporary in cache; elsewhere each step would be a kernel launch.
    step = max(1, NORM_STEP_ELEMENTS // max(1, math.prod(features.shape[2:]))) if features.device.type == "cpu" \
        else max(1, features.shape[1])
    for start in range(0, features.shape[1], step):
        part = features[:, start:start + step]
        partial = (part * part).sum(dim=1, keepdim=True)
        total = partial if total is None else total.add_(partial)
    if total is None:  # no channels
        return features.new_zeros(features.shape[0], 1, *features.shape[2:])
    return total


def channel_norm(features: torch.Tensor) -> torch.Tensor:
    """``||f||_2`` over dim 1 of ``[B, C, H, W]`` -> ``[B, 1, H, W]``."""
    if torch.is_grad_enabled() and features.requires_grad:
        # vector_norm's gradient at a zero vector is 0, the reference's; sqrt(sum(f * f))'s would be NaN.
        return torch.linalg.vector_norm(features, dim=1, keepdim=True)
    return squared_norm(features).sqrt()


def normalize_with_norms(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(f / (||f|| + eps), ||f||)`` over dim 1 of ``[B, C, H, W]`` (norms ``[B, 1, H, W]``). Differentiable."""
    norms = channel_norm(features)
    return features / (norms + reference.NORM_EPS), norms


def normalize(features: torch.Tensor) -> torch.Tensor:
    """:func:`hypertriton.reference.normalize`, faster without gradients. Differentiable."""
    return normalize_with_norms(features)[0]
