"""Stride-1 2D convolutions on CPU through NNPACK where it beats PyTorch's default, for inference.

PyTorch runs CPU convolutions through oneDNN's direct algorithm; NNPACK (bundled with PyTorch, but
picked by PyTorch itself only for batches of 16 or more, and then not with its fastest algorithm) computes
a 3x3 convolution with Winograd's F(6x6, 3x3) transform: about 5x fewer multiplications. HSNet's learner
spends about a third of its CPU time in 3x3 convolutions of 64-128 channels over the finest query map
(the mixing blocks' query branch and the decoder). Measured on the 2-core AMD EPYC dev VM, fp32, one
thread, one 128->128 3x3 convolution: 50x50 map 2.8 ms instead of 6.5 ms; 25x25 1.2 vs 1.7 ms; 13x13
0.8 vs 0.5 ms (slower: below about 600 output positions per thread NNPACK is not used). A 5x5 kernel
(16->64 channels, 50x50) takes 0.6 instead of 1.1 ms.

Precision: the Winograd transform rounds differently from a direct sum. One fp32 3x3 convolution
differs from the float64 result by about 1e-5 of its largest value (direct: 2e-7). The learner's logits
at 400 px (ResNet-50) differ from the original's by 3.7e-6 of their largest value, against 3.4e-6 without
NNPACK; backbone features by under 1e-5. Set ``HYPERTRITON_NNPACK=0`` (or ``torch.backends.nnpack.set_flags(False)``)
for PyTorch's own convolution everywhere.

Where it runs: fp32 CPU tensors, no autocast, no tensor requiring a gradient (training keeps PyTorch's
convolution and its exact gradient), not while ``torch.compile`` traces, kernel 3x3 or 5x5 with padding
``k // 2``, and enough work per image (NNPACK runs one image per call here: its batched entry point is
several times slower). NNPACK sizes its thread pool once per process, at its first call, from
``torch.get_num_threads()`` (which PyTorch keeps per calling thread); when the thread count differs
later, or in a forked child (which inherits none of the pool's threads; torch 2.14's NNPACK then runs
single-threaded, earlier builds are not known to), PyTorch's convolution runs instead.
:func:`nnpack_allowed` turns it off for a block of code (lean mode does, for memory).

Threads: with 2 threads the backbones still gain (ResNet-50 at 400 px 236 -> 219 ms, VGG16 642 -> 424 ms),
but the learner's center-pivot convolutions lost (its forward 306 -> 346 ms: between NNPACK's calls
OpenMP's idle threads spin on the cores NNPACK's pool needs), so those call sites pass
``max_threads=1`` (``CP_CONV_MAX_THREADS``).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import os

import torch
import torch.nn.functional as F

from .._hooks import has_forward_hooks
from ..backend import being_traced
from ._alloc import new_output

__all__ = ["conv2d", "run_conv_module", "nnpack_usable", "nnpack_allowed", "ENV_VARIABLE"]

ENV_VARIABLE = "HYPERTRITON_NNPACK"
# Measured thresholds (see the module docstring): output positions per thread, and Cin*Cout below
# which the per-image Python call costs more than NNPACK saves.
MIN_POSITIONS_PER_THREAD = 600
MIN_CHANNEL_PRODUCT = 1024
KERNEL_SIZES = (3, 5)
# Thread counts up to which the center-pivot convolutions' call sites gain from NNPACK (see above).
CP_CONV_MAX_THREADS = 1

# Threads NNPACK's pool was created with, and the process that created it (set at its first call).
_pool_threads: int | None = None
_pool_pid: int | None = None
_allowed_here = contextvars.ContextVar("hypertriton_nnpack_allowed", default=True)


@contextlib.contextmanager
def nnpack_allowed(allowed: bool):
    """Within the block, allow (True) or forbid (False) NNPACK for :func:`conv2d` and the ops that use it.
    ``HPNLearner``'s lean mode forbids it: NNPACK's layout copies would raise the peak memory that lean
    mode exists to lower."""
    token = _allowed_here.set(allowed)
    try:
        yield
    finally:
        _allowed_here.reset(token)


@functools.lru_cache(maxsize=1)
def _nnpack_present() -> bool:
    # _nnpack_available() also initializes NNPACK: without that first call every convolution fails.
    return hasattr(torch, "_nnpack_spatial_convolution") and bool(torch._nnpack_available())


def _enabled() -> bool:
    return (_allowed_here.get() and torch._C._get_nnpack_enabled()
            and os.environ.get(ENV_VARIABLE, "1").strip().lower() not in ("0", "false", "no", "off"))


def nnpack_usable(x: torch.Tensor, weight: torch.Tensor, bias, stride, padding, max_threads: int | None = None
                  ) -> bool:
    """Whether :func:`conv2d` runs ``x`` ``[N, Cin, H, W]`` through NNPACK (see the module docstring);
    never when ``torch.get_num_threads()`` exceeds ``max_threads`` (None: any count)."""
    if not (x.device.type == "cpu" and x.dim() == 4 and x.dtype == weight.dtype == torch.float32):
        return False
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                    or (bias is not None and bias.requires_grad)):
        return False
    if torch.is_autocast_enabled("cpu") or being_traced():
        return False
    kh, kw = weight.shape[-2:]
    if kh != kw or kh not in KERNEL_SIZES or tuple(padding) != (kh // 2, kw // 2) or tuple(stride) != (1, 1):
        return False
    threads = torch.get_num_threads()
    if max_threads is not None and threads > max_threads:
        return False
    # A forked child inherits none of the pool's threads (torch 2.14 then runs NNPACK single-threaded; no
    # build is trusted to): PyTorch's convolution there, as for another thread count.
    if _pool_threads is not None and (threads != _pool_threads or os.getpid() != _pool_pid):
        return False
    if x.shape[-2] * x.shape[-1] < MIN_POSITIONS_PER_THREAD * threads:
        return False
    if weight.shape[0] * weight.shape[1] < MIN_CHANNEL_PRODUCT:
        return False
    return _enabled() and _nnpack_present()


def _pair(value) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else tuple(value)


def conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, stride=1, padding=0,
           max_threads: int | None = None) -> torch.Tensor:
    """``F.conv2d(x, weight, bias, stride, padding)`` (no dilation, no groups), through NNPACK where
    :func:`nnpack_usable`; the result's memory layout may differ from ``F.conv2d``'s (NNPACK's is
    contiguous).

    Args:
        x: ``[N, Cin, H, W]``.
        weight: ``[Cout, Cin, kh, kw]``; bias: ``[Cout]`` or None.
        max_threads: NNPACK only up to this many torch threads (see :func:`nnpack_usable`).

    Returns:
        ``[N, Cout, H', W']``.
    """
    global _pool_threads, _pool_pid
    stride, padding = _pair(stride), _pair(padding)
    if not nnpack_usable(x, weight, bias, stride, padding, max_threads):
        return F.conv2d(x, weight, bias, stride, padding)
    if _pool_threads is None:
        _pool_threads, _pool_pid = torch.get_num_threads(), os.getpid()
    x = x.contiguous()
    # NNPACK's wrapper rejects a missing bias.
    bias = torch.zeros(weight.shape[0], dtype=x.dtype, device=x.device) if bias is None else bias
    if x.shape[0] == 1:  # NNPACK's own result: no copy into a batch (a pass over memory, ~0.4 ms at 128x50x50)
        return torch._nnpack_spatial_convolution(x, weight, bias, list(padding), [1, 1])
    out = new_output((x.shape[0], weight.shape[0], x.shape[2], x.shape[3]), x.dtype, x.device)
    for index in range(x.shape[0]):
        out[index:index + 1] = torch._nnpack_spatial_convolution(x[index:index + 1], weight, bias, list(padding),
                                                                 [1, 1])
    return out


def run_conv_module(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``module(x)``; a stride-1 ``nn.Conv2d`` (no dilation, groups or non-zero padding mode) that NNPACK
    can run (:func:`nnpack_usable`) and that has no hooks runs through :func:`conv2d` with its own
    parameters. Anything else is called as a module, so that its hooks run, as does a subclass of
    ``nn.Conv2d`` (quantization-aware or adapter layers have their own ``forward``)."""
    if (type(module) is torch.nn.Conv2d and module.stride == (1, 1) and module.dilation == (1, 1)
            and module.groups == 1 and isinstance(module.padding, tuple) and module.padding_mode == "zeros"
            and not has_forward_hooks(module) and nnpack_usable(x, module.weight, module.bias, (1, 1), module.padding)):
        return conv2d(x, module.weight, module.bias, 1, module.padding)
    return module(x)
