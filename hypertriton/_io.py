"""Atomic file writes: readers (and an interrupted run) see the old file or the complete new one,
never a truncated one."""

from __future__ import annotations

import os
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch


@contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "wb"):
    """Yield a handle to a temporary file next to ``path``; on success it is synced and renamed over
    ``path`` (``os.replace`` is atomic within one file system); on any error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # open(..., "x") rather than mkstemp: the file gets the umask's permissions, not mkstemp's 0600.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, mode.replace("w", "x")) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save(obj, path)``, atomically (see :func:`atomic_file`)."""
    with atomic_file(path) as handle:
        torch.save(obj, handle)
    return Path(path)


def load_on_cpu(path: str | os.PathLike) -> Any:
    """``torch.load`` onto the CPU, tensors and plain containers only (``weights_only``: a loaded file
    can run no code; a checkpoint saved on a GPU loads on a machine without one)."""
    return torch.load(path, map_location="cpu", weights_only=True)


def load_error_summary(error: BaseException) -> str:
    """``"Type: first line"`` of a failed load, for messages that name the file."""
    text = str(error)
    return f"{type(error).__name__}: {text.splitlines()[0] if text else ''}"
