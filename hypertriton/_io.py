"""Atomic file writes: readers (and an interrupted run) see the old file or the complete new one,
never a truncated one."""

from __future__ import annotations

import os
import re
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch


def temporary_path(path: Path) -> Path:
    """A fresh hidden name next to ``path`` to write it under before renaming. Create it with
    ``open(..., "x")`` rather than ``mkstemp``: the file then gets the umask's permissions, not 0600."""
    return path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")


@contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "wb"):
    """Yield a handle to a temporary file next to ``path``; on success it is synced and renamed over
    ``path`` (``os.replace`` is atomic within one file system); on any error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_path(path)
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
    if "weights_only" in text or "Weights only load failed" in text:
        # torch's advice (reload with weights_only=False) would run code from the file: not offered here.
        found = re.search(r"Unsupported global: (?:GLOBAL )?([\w.]+)", text)
        what = f" (a {found.group(1)})" if found else ""
        return (f"{type(error).__name__}: it holds more than tensors and plain containers{what}, or is no PyTorch "
                "file at all; hypertriton loads only plain checkpoints, so that no file can run code")
    return f"{type(error).__name__}: {text.splitlines()[0] if text else ''}"


def check_writable(path: str | os.PathLike, name: str, folder: bool = False) -> Path:
    """Refuse, before any work, an output ``path`` that could not be written at the end: a folder
    where a file is wanted (or a file where a folder is), a parent that is a file, or no permission.

    Raises:
        ValueError: naming ``name`` (the flag or argument) and the reason.
    """
    path = Path(path)
    if folder and path.exists() and not path.is_dir():
        raise ValueError(f"{name}: {str(path)!r} exists and is not a folder")
    if not folder and path.is_dir():
        raise ValueError(f"{name}: {str(path)!r} is a folder; expected a file name")
    existing = path if folder else path.parent
    existing = existing.absolute()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"{name}: cannot create {str(path)!r}: {str(existing)!r} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"{name}: cannot write {str(path)!r}: no permission to write in {str(existing)!r}")
    return path
