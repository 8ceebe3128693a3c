"""Helpers shared by the kernel launchers: autotune configs, dot precision, index width."""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from . import INTERPRETED

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
INT32_MAX = 2**31 - 1


def autotune_configs(gpu_configs: list[triton.Config], interpreted_config: triton.Config) -> list[triton.Config]:
    """The configs to autotune over: ``gpu_configs`` on a GPU, only ``interpreted_config`` under the
    interpreter (it cannot benchmark, and autotuning several configs there fails)."""
    return [interpreted_config] if INTERPRETED else gpu_configs


def matmul_allows_tf32() -> bool:
    """Whether PyTorch's own fp32 matrix products on CUDA may use TF32 tensor cores.

    PyTorch has two switches for it: ``torch.backends.cuda.matmul.fp32_precision`` ("tf32", "ieee", or
    "none" = not set; it reports ``torch.backends.fp32_precision`` when only that is set) and the older
    ``torch.backends.cuda.matmul.allow_tf32``, which raises once the newer one has been used.
    """
    precision = getattr(torch.backends.cuda.matmul, "fp32_precision", "none")
    if precision in ("tf32", "ieee"):
        return precision == "tf32"
    try:
        return bool(torch.backends.cuda.matmul.allow_tf32)
    except RuntimeError:  # the two switches mixed; the newer one said nothing definite
        return False


def dot_precision(dtype: torch.dtype) -> str:
    """``input_precision`` for ``tl.dot`` on inputs of ``dtype``.

    fp32 products use TF32 tensor cores exactly when PyTorch's own matmuls would
    (:func:`matmul_allows_tf32`); the interpreter always computes in IEEE fp32. The flag only affects
    fp32 inputs: fp16/bf16 products are exact in an fp32 accumulator, and for them Triton's default
    ("tf32", ignored) is kept.
    """
    if INTERPRETED:
        return "ieee"
    if dtype != torch.float32:
        return "tf32"
    return "tf32" if matmul_allows_tf32() else "ieee"


def on_the_inputs_device(launcher):
    """Decorate a launcher so that its kernels run on its first tensor argument's CUDA device.

    Triton launches on PyTorch's current device, not on the tensors': tensors on ``cuda:1`` while
    ``cuda:0`` is current (a model moved with ``.to("cuda:1")``) would fail to launch.
    """
    @functools.wraps(launcher)
    def launch(*args, **kwargs):
        first = next((value for value in (*args, *kwargs.values()) if isinstance(value, torch.Tensor)), None)
        if first is None or first.device.type != "cuda":
            return launcher(*args, **kwargs)
        with torch.cuda.device(first.device):
            return launcher(*args, **kwargs)

    return launch


def check_float_dtype(name: str, tensor: torch.Tensor) -> None:
    """Raise ``TypeError`` unless ``tensor`` is fp32, fp16 or bf16 (what ``tl.dot`` takes here)."""
    if tensor.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{name}: expected a float32, float16 or bfloat16 tensor, got {tensor.dtype}")


def largest_offset(*tensors: torch.Tensor) -> int:
    """The largest element offset (in elements) any of ``tensors`` can reach through its strides.

    Kernels index with int32 arithmetic when this (and every flat position count) stays below 2^31,
    and switch to int64 otherwise.
    """
    reach = 0
    for t in tensors:
        if t.numel() == 0:
            continue
        reach = max(reach, sum((size - 1) * abs(stride) for size, stride in zip(t.shape, t.stride())))
    return reach


def needs_int64(*tensors: torch.Tensor, extra: int = 0) -> bool:
    """Whether an offset into ``tensors`` or ``extra`` (a flat count) can pass int32.

    Offsets of masked-off lanes may wrap in int32; they are never dereferenced.
    """
    # The margin keeps ``start + arange(BLOCK)`` of a last, partly masked tile from wrapping.
    margin = 1 << 16
    return max(largest_offset(*tensors), extra) + margin > INT32_MAX


_UPCAST_BF16 = tl.constexpr(INTERPRETED)


@triton.jit
def dot_acc(a, b, acc, INPUT_PRECISION: tl.constexpr):
    """``acc + a @ b`` with ``tl.dot``, fp32 accumulator ``acc``.

    Triton's interpreter multiplies bf16 tiles as raw integers, so there bf16 operands are widened to
    fp32 first; bf16 products are exact in fp32, so this computes what a GPU's bf16 dot computes.
    """
    if _UPCAST_BF16:
        if a.dtype == tl.bfloat16:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
