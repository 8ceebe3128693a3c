"""Atomic file writes: readers (and an interrupted run) see the old file or the complete new one,
never a truncated one."""

from __future__ import annotations

import glob
import hashlib
import os
import re
import socket
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from ._pickle_guard import check_torch_file


def temporary_path(path: Path) -> Path:
    """A fresh hidden name next to ``path`` to write it under before renaming. Create it with
    ``open(..., "x")`` rather than ``mkstemp``: the file then gets the umask's permissions, not 0600.
    The name holds the writer's host and process id, for :func:`remove_stale_temporaries`."""
    return path.with_name(f".{_temporary_stem(path.name)}.{_HOST}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")


# What a temporary adds to its target's name is about 32 bytes; file systems allow 255 per name. A longer
# target name is shortened in its temporaries (a digest keeps them apart), so that a name that fits
# the file system never fails only in its temporary.
_TEMPORARY_STEM_BYTES = 200


def _temporary_stem(name: str) -> str:
    encoded = name.encode("utf-8", "surrogateescape")
    if len(encoded) <= _TEMPORARY_STEM_BYTES:
        return name
    digest = hashlib.sha1(encoded).hexdigest()[:12]
    return encoded[:_TEMPORARY_STEM_BYTES - 13].decode("utf-8", "ignore") + "~" + digest


# How torch's zip writer reports a write that failed (in torch 2.11 to 2.14).
_WRITE_FAILED = re.compile(r"inline_container|PytorchStreamWriter failed|unexpected pos")
# The host in temporaries' names: a digest, so that no two host names read alike once made file-safe.
_HOST = hashlib.sha1(socket.gethostname().encode()).hexdigest()[:8]


def remove_stale_temporaries(path: Path) -> list[Path]:
    """Remove the temporaries of ``path`` that a killed writer left (``kill -9``, a node lost mid-save:
    a 170 MB checkpoint each): those of this host whose process no longer runs. Another host's, or a
    running process's, are left alone (a shared file system may hold a live writer's). Returns those
    removed."""
    removed = []
    stem = _temporary_stem(path.name)
    pattern = re.compile(rf"\.{re.escape(stem)}\.{re.escape(_HOST)}\.(\d+)\.[0-9a-f]{{8}}\.tmp")
    try:
        candidates = list(path.parent.glob(f".{glob.escape(stem)}.{_HOST}.*.tmp"))
    except OSError:
        return removed
    for candidate in candidates:
        found = pattern.fullmatch(candidate.name)
        if found and not _process_runs(int(found.group(1))):
            try:
                candidate.unlink()
                removed.append(candidate)
            except OSError:  # gone already, or not ours to remove
                pass
    return removed


def _process_runs(pid: int) -> bool:
    if _WINDOWS:  # os.kill(pid, 0) would terminate the process there
        return _windows_process_runs(pid)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by another user
        return True
    return True


# Win32: OpenProcess fails with ERROR_INVALID_PARAMETER for a process id that names no process; a
# process that ended but whose handle someone still holds reports STILL_ACTIVE no longer.
_WINDOWS = os.name == "nt"
_PROCESS_QUERY_LIMITED_INFORMATION = 0x1000
_ERROR_INVALID_PARAMETER = 87
_STILL_ACTIVE = 259


def _windows_process_runs(pid: int, kernel32: Any = None, last_error: Any = None) -> bool:
    """Whether process ``pid`` runs, asked of Windows' kernel32 (``kernel32`` and ``last_error`` stand in
    for ctypes' in tests). Anything unexpected counts as running: a live writer's file is never removed."""
    import ctypes
    if kernel32 is None:
        kernel32 = ctypes.WinDLL("kernel32", use_last_error=True)  # type: ignore[attr-defined]
        last_error = ctypes.get_last_error  # type: ignore[attr-defined]
    handle = kernel32.OpenProcess(_PROCESS_QUERY_LIMITED_INFORMATION, False, pid)
    if not handle:  # access denied: it exists, another user's
        return last_error() != _ERROR_INVALID_PARAMETER
    try:
        exit_code = ctypes.c_ulong()
        if not kernel32.GetExitCodeProcess(handle, ctypes.byref(exit_code)):
            return True
        return exit_code.value == _STILL_ACTIVE
    finally:
        kernel32.CloseHandle(handle)


@contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "wb", durable: bool = False):
    """Yield a handle to a temporary file next to ``path``; on success it is synced and renamed over
    ``path`` (``os.replace`` is atomic within one file system); on any error it is removed.

    ``durable`` (checkpoints, large and written once per epoch or so): temporaries of ``path`` that killed
    writers left are removed first (:func:`remove_stale_temporaries`), and the folder is synced after the
    rename, so that a host crash cannot lose it. Off for the many small files (panels, configs), where a
    folder listing and sync per file would cost more than the writes (3000 panels: 12 s -> 45 s)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if durable:
        remove_stale_temporaries(path)
    tmp = temporary_path(path)
    try:
        with open(tmp, mode.replace("w", "x")) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        _replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        _sync_folder(path.parent)


# Windows refuses to replace a file another process holds open (a virus scanner reading the last
# checkpoint, a concurrent torch.load), for a moment: such a refusal is retried for about two seconds.
_REPLACE_RETRIES = (0.05, 0.1, 0.2, 0.4, 0.8) if os.name == "nt" else ()


def _replace(source: Path, target: Path) -> None:
    for wait in _REPLACE_RETRIES:
        try:
            os.replace(source, target)
            return
        except PermissionError:
            time.sleep(wait)
    os.replace(source, target)


def _sync_folder(folder: Path) -> None:
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:  # a platform or file system without folder handles: the rename stands as written
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def atomic_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save(obj, path)``, atomically and durably (see :func:`atomic_file`).

    Raises:
        OSError: the file could not be written (a full disk, a file size limit), naming it; torch's own
            error for that ("unexpected pos ...") names neither.
    """
    with atomic_file(path, durable=True) as handle:
        try:
            torch.save(obj, handle)
        except (OSError, RuntimeError) as error:
            if isinstance(error, RuntimeError) and not _WRITE_FAILED.search(str(error)):
                raise  # not a failed write (an object that cannot be pickled, say)
            summary = str(error).strip().splitlines()[0] if str(error).strip() else ""
            raise OSError(f"cannot write {str(path)!r}: {type(error).__name__}: {summary} (is the disk full?); "
                          "the file as it was before is kept") from error
    return Path(path)


def load_on_cpu(path: str | os.PathLike) -> Any:
    """``torch.load`` onto the CPU, tensors and plain containers only (``weights_only``: a loaded file
    can run no code; a checkpoint saved on a GPU loads on a machine without one), after a read of its
    pickle (:mod:`hypertriton._pickle_guard`) that refuses what the loader would hash unchecked (a small
    file could make that take forever).

    Raises:
        UnsafeFileError: such a file, named (nothing was built from it).
    """
    with open(path, "rb") as handle:  # once: the file checked is the file loaded
        check_torch_file(handle, str(path))
        # mmap=False: torch's global mmap default (a config flag) would refuse a handle
        return torch.load(handle, map_location="cpu", weights_only=True, mmap=False)


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


def nearest_existing(path: str | os.PathLike) -> Path:
    """``path`` (made absolute) or its nearest ancestor that exists; the root where none does (a missing
    Windows drive: a root's parent is itself)."""
    path = Path(path).absolute()
    while not path.exists() and path.parent != path:
        path = path.parent
    return path


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
    existing = nearest_existing(path if folder else path.parent)
    if not existing.exists():
        raise ValueError(f"{name}: cannot create {str(path)!r}: not even {str(existing)!r} exists")
    if not existing.is_dir():
        raise ValueError(f"{name}: cannot create {str(path)!r}: {str(existing)!r} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"{name}: cannot write {str(path)!r}: no permission to write in {str(existing)!r}")
    return path
