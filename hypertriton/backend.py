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

import torch

BACKENDS = ("triton", "torch", "reference")
ENV_VARIABLE = "HYPERTRITON_BACKEND"


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


def resolve_backend(requested: str | None, device: torch.device) -> str:
    """The backend that runs an op on ``device``.

    Args:
        requested: ``"triton"``, ``"torch"``, ``"reference"``, ``"auto"`` or None. None reads
            ``HYPERTRITON_BACKEND``, then falls back to ``"auto"``.
        device: where the op's inputs live.

    Raises:
        ValueError: an unknown backend name.
        RuntimeError: ``"triton"`` was asked for where it cannot run.
    """
    name = requested if requested is not None else os.environ.get(ENV_VARIABLE, "auto")
    name = name.strip().lower() or "auto"
    if name == "auto":
        return "triton" if device.type == "cuda" and triton_unavailable_reason(device) is None else "torch"
    if name not in BACKENDS:
        source = "backend" if requested is not None else ENV_VARIABLE
        raise ValueError(f"{source}: unknown backend {name!r}; expected one of {BACKENDS + ('auto',)}")
    if name == "triton":
        reason = triton_unavailable_reason(device)
        if reason is not None:
            raise RuntimeError(f"backend 'triton' cannot run on {device} tensors: {reason}")
    return name
