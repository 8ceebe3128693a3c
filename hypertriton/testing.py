"""Tolerances for comparing a backend against the reference: one table, used by tests and benchmarks."""

from __future__ import annotations

import torch

__all__ = ["tolerance", "assert_close_dtype"]

# (rtol, atol) per dtype of the compared computation. Correlations are cosine similarities in [-1, 1]
# and conv outputs are sums of at most a few hundred such terms in tests, so absolute tolerances are
# meaningful at these scales.
TOLERANCES: dict[object, tuple[float, float]] = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (1e-4, 1e-5),
    torch.float16: (1e-2, 5e-3),
    torch.bfloat16: (5e-2, 3e-2),
    # fp32 inputs whose matrix products ran in TF32 on a GPU (10-bit mantissa)
    "tf32": (5e-3, 2e-3),
    # fp32 convolutions through NNPACK's Winograd transform (hypertriton.ops.cpu_conv), outputs of order 1:
    # about 1e-5 of the largest output measured, 50x the direct sum's rounding
    "winograd": (1e-4, 1e-4),
}


def tolerance(dtype: torch.dtype | str) -> tuple[float, float]:
    """The ``(rtol, atol)`` pair for ``dtype``, or for ``"tf32"`` (GPU fp32 matrix products) or
    ``"winograd"`` (NNPACK's fp32 convolutions)."""
    return TOLERANCES[dtype]


def assert_close_dtype(actual: torch.Tensor, expected: torch.Tensor, dtype=None, scale: float = 1.0, msg=None):
    """Assert ``actual`` matches ``expected`` within the table's tolerance for ``dtype``.

    ``expected`` is typically computed in float64 from the same inputs; both are compared in float64.
    NaNs must sit at the same places. ``scale`` widens the tolerances for long reductions.
    """
    dtype = actual.dtype if dtype is None else dtype
    rtol, atol = tolerance(dtype)
    torch.testing.assert_close(actual.double(), expected.double(), rtol=rtol * scale, atol=atol * scale,
                               equal_nan=True, msg=msg)
