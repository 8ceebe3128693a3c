"""Choosing the implementation that runs an op.

Three backends compute every op:

- ``"triton"``: the Triton kernels in :mod:`hypertriton.kernels`. CUDA tensors, or CPU tensors when
  Triton's interpreter is on (``TRITON_INTERPRET=1`` set before the kernels were first imported).
- ``"torch"``: fast plain-PyTorch code; the default wherever Triton cannot run (e.g. on CPU).
- ``"reference"``: the einsum definitions in :mod:`hypertriton.reference`, the readable oracle.

The choice is automatic (``triton`` for CUDA tensors, ``torch`` otherwise); the environment variable
``HYPERTRITON_BACKEND`` or an explicit ``backend=`` argument overrides it. Asking for ``triton`` where
it cannot run raises an error instead of silently falling back.
"""

from __future__ import annotations

import importlib.util
import os
import threading
import warnings

import torch

__all__ = ["BACKENDS", "BACKEND_CHOICES", "ENV_VARIABLE", "resolve_backend", "check_backend_name",
           "triton_installed", "interpreter_enabled", "triton_unavailable_reason", "being_traced",
           "reduced_precision_slow_reason", "warn_if_reduced_precision_slow"]

BACKENDS = ("triton", "torch", "reference")
ENV_VARIABLE = "HYPERTRITON_BACKEND"
# What a caller or the environment may name: a backend, or "auto" for the device's default.
BACKEND_CHOICES = BACKENDS + ("auto",)


# Looked up once: torch.compile (torch 2.11) refuses to trace importlib's find_spec, and every op
# resolves its backend inside the compiled graph.
_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None


def triton_installed() -> bool:
    return _TRITON_INSTALLED


def interpreter_enabled() -> bool:
    """Whether Triton's CPU interpreter is on (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")


def triton_unavailable_reason(device: torch.device) -> str | None:
    """Why the Triton kernels cannot run on ``device``, or None when they can."""
    if not triton_installed():
        return "the triton package is not installed"
    if device.type == "cuda":
        return None
    if device.type == "cpu":
        if not interpreter_enabled():
            return ("Triton compiles only for GPUs; for CPU tensors set TRITON_INTERPRET=1 before "
                    "importing hypertriton (slow, for testing) or use backend='torch'")
        from . import kernels

        if not kernels.INTERPRETED:
            return ("TRITON_INTERPRET=1 was set after hypertriton.kernels was imported; set it before "
                    "the first import")
        return None
    return f"Triton kernels do not support {device.type!r} tensors"


def check_backend_name(backend, name: str = "backend") -> str | None:
    """``backend`` as a module stores it (resolved per call, when the inputs' device is known): None or
    a known name, checked at construction so that a typo fails there and not at the first forward."""
    if backend is None:
        return None
    if not isinstance(backend, str):  # as resolve_backend: a TypeError for what is no name at all
        raise TypeError(f"{name}: expected one of {BACKEND_CHOICES} or None, got {backend!r}")
    if backend.strip().lower() not in BACKEND_CHOICES:
        raise ValueError(f"{name}: expected one of {BACKEND_CHOICES} or None, got {backend!r}")
    return backend


def resolve_backend(requested: str | None, device: torch.device | str) -> str:
    """The backend that runs an op on ``device``.

    Args:
        requested: ``"triton"``, ``"torch"``, ``"reference"``, ``"auto"`` or None. None reads
            ``HYPERTRITON_BACKEND``, then falls back to ``"auto"``.
        device: where the op's inputs live (a ``torch.device`` or its name).

    Raises:
        TypeError: ``requested`` is neither None nor a string.
        ValueError: an unknown backend name.
        RuntimeError: ``"triton"`` was asked for where it cannot run.
    """
    if requested is not None and not isinstance(requested, str):
        raise TypeError(f"backend: expected one of {BACKEND_CHOICES} or None, got {requested!r}")
    device = torch.device(device)
    name = requested if requested is not None else os.environ.get(ENV_VARIABLE, "auto")
    name = name.strip().lower() or "auto"
    if name == "auto":
        return "triton" if device.type == "cuda" and triton_unavailable_reason(device) is None else "torch"
    if name not in BACKENDS:
        source = "backend" if requested is not None else ENV_VARIABLE
        raise ValueError(f"{source}: unknown backend {name!r}; expected one of {BACKEND_CHOICES}")
    if name == "triton":
        reason = triton_unavailable_reason(device)
        if reason is not None:
            raise RuntimeError(f"backend 'triton' cannot run on {device} tensors: {reason}")
    return name


# --------------------------------------------------------------------------------------------------
# Reduced precision: whether the hardware computes it, or PyTorch's fallback kernels do
# --------------------------------------------------------------------------------------------------

def _cpu_feature(name: str) -> bool:
    """A ``torch.cpu._is_<name>_supported()`` flag (private; False where this torch lacks it)."""
    probe = getattr(torch.cpu, f"_is_{name}_supported", None)
    try:
        return bool(probe()) if probe is not None else False
    except RuntimeError:
        return False


def _onednn_takes(dtype: torch.dtype) -> bool:
    """Whether oneDNN runs ``dtype`` matrix products and convolutions on this CPU (natively or emulated
    with AVX-512); without it PyTorch falls back to scalar reference loops."""
    probe = {torch.bfloat16: "_is_mkldnn_bf16_supported", torch.float16: "_is_mkldnn_fp16_supported"}.get(dtype)
    try:
        return bool(getattr(torch.ops.mkldnn, probe)())
    except (AttributeError, RuntimeError, TypeError):
        return False


def being_traced() -> bool:
    """Whether the calling code is being traced by ``torch.compile`` (dynamo) or ``torch.export``: then the
    data-dependent choices (sparse columns, NNPACK, cached index tensors) give way to traceable ones.

    Not ``torch.compiler.is_compiling()``: in torch 2.14 that is one flag for the whole process, True in
    every thread while any thread compiles, which switched other threads' eager inference to those paths
    (results about 1e-5 apart, as a threaded server answered the same request differently)."""
    is_exporting = getattr(torch.compiler, "is_exporting", None)
    return torch.compiler.is_dynamo_compiling() or (is_exporting is not None and is_exporting())


def reduced_precision_slow_reason(dtype: torch.dtype, device: torch.device | str) -> str | None:
    """Why matrix products and convolutions in ``dtype`` (bf16 or fp16) would not run faster than fp32 on
    ``device``, or None where the hardware computes them natively (and autocast in ``dtype`` pays off).

    On CPUs that means AVX512-BF16 or AMX for bf16 and AMX-FP16 for fp16. Without them oneDNN emulates
    the format with AVX-512 instructions, and without AVX-512 PyTorch runs bf16/fp16 matrix
    products and convolutions in scalar fallback loops: about 25x slower than fp32 on a 2-core AVX2 AMD
    EPYC (the learner forward at 400 px: 11.2 s in bf16, 0.43 s in fp32).
    """
    if dtype not in (torch.bfloat16, torch.float16):
        return None
    device = torch.device(device)
    name = "bf16" if dtype == torch.bfloat16 else "fp16"
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        if dtype == torch.bfloat16 and (major, minor) < (8, 0):
            return f"this GPU (compute capability {major}.{minor}) has no native bf16 (needs 8.0 or newer)"
        return None
    if device.type != "cpu":
        return None
    native = (_cpu_feature("avx512_bf16") or _cpu_feature("amx_tile")) if dtype == torch.bfloat16 else \
        _cpu_feature("amx_fp16")
    if native:
        return None
    needed = "AVX512-BF16 or AMX" if dtype == torch.bfloat16 else "AMX-FP16"
    capability = torch.backends.cpu.get_cpu_capability()
    if _onednn_takes(dtype):
        return f"this CPU ({capability}) has no {needed}: oneDNN only emulates {name} with AVX-512 instructions"
    # (oneDNN takes fp16 only with AMX-FP16 or AVX512-FP16, so an AVX-512 CPU can land here too.)
    return (f"this CPU ({capability}) has no {needed} and oneDNN does not take {name} on it: PyTorch runs {name} "
            f"matrix products and convolutions in scalar fallback loops, about 25x slower than fp32")


_WARNED_SLOW: set = set()
_WARNED_SLOW_LOCK = threading.Lock()


def warn_if_reduced_precision_slow(dtype: torch.dtype, device: torch.device, what: str) -> None:
    """Warn (once per process, device type and dtype) when ``what`` is about to run in a ``dtype`` that
    ``device`` does not compute natively (:func:`reduced_precision_slow_reason`). Silent while
    ``torch.compile`` traces (a warning there would break the graph)."""
    key = (device.type, dtype)
    if key in _WARNED_SLOW or being_traced():
        return
    reason = reduced_precision_slow_reason(dtype, device)
    if reason is not None:
        with _WARNED_SLOW_LOCK:  # once, also when threads get here together
            if key in _WARNED_SLOW:
                return
            _WARNED_SLOW.add(key)
        name = "bf16" if dtype == torch.bfloat16 else "fp16"
        warnings.warn(f"{what} runs in {name}, but {reason}; fp32 (no autocast) is at least as fast "
                      f"here, and more accurate", RuntimeWarning, stacklevel=3)
