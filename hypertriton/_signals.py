"""Ctrl-C / SIGTERM handling shared by the long-running commands (training, evaluation).

The first signal only asks the work to stop at its next safe point; a second Ctrl-C (SIGINT) interrupts
at once (``KeyboardInterrupt``). A repeated SIGTERM does not: a scheduler's stop (SLURM's scancel,
preemption, time limit; systemd) signals every process of a job, and torchrun, stopped too, forwards its
own SIGTERM to its workers, so each worker gets two at once, and the scheduler follows with SIGKILL after
its grace period anyway. DataLoader workers ignore both, since they reach the whole process group.
"""

from __future__ import annotations

import multiprocessing
import signal
import sys
import threading
from typing import Any


def ignore_stop_signals_in_worker(_worker_id: int) -> None:
    """A DataLoader ``worker_init_fn``: Ctrl-C (SIGINT) reaches the whole process group, and so does the
    SIGTERM of torchrun (which signals its workers' process groups) or of a cluster scheduler. The main
    process decides when to stop, so workers must not die and turn a clean stop into a "DataLoader worker
    exited unexpectedly" error (nor print the main process's handler message again: they inherit it).
    They still exit when the main process does (PyTorch's workers watch their parent)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if hasattr(signal, "pthread_sigmask"):  # blocked from birth by start_loader: ignored now, so unblocked
        signal.pthread_sigmask(signal.SIG_UNBLOCK, (signal.SIGINT, signal.SIGTERM))


ignore_stop_signals_in_worker.unblocks_stop_signals = True  # what start_loader requires of a worker's set-up


def start_loader(loader):
    """``iter(loader)``; where its workers start by ``spawn`` (macOS's default) on a POSIX system and
    their ``worker_init_fn`` is :func:`ignore_stop_signals_in_worker` (or calls it first), with SIGINT and
    SIGTERM blocked in the main thread while they start, so that the workers are born with both blocked
    until they ignore them. Such a worker is a fresh interpreter that imports torch for seconds before its
    ``worker_init_fn`` runs (longer while the parent writes it a large dataset): a Ctrl-C then killed it
    and the run crashed ("DataLoader worker exited unexpectedly") instead of stopping cleanly. A blocked
    signal stays blocked across the start of a process and waits there; ignoring it drops it.

    The main process loses nothing: a signal to the process is taken by another of its threads (torch
    has some), and Python runs the handler in the main thread as always. Forked workers start with the
    parent's handler and set their own within milliseconds, as before; ``forkserver`` workers come from a
    server that must not be started with the signals blocked, so they are left as they are; a worker whose
    ``worker_init_fn`` would not unblock them is not born blocking them; Windows has no signal masks.
    """
    if loader.num_workers == 0 or getattr(loader, "_iterator", None) is not None:  # no workers to start
        return iter(loader)
    context = loader.multiprocessing_context
    method = context.get_start_method() if context is not None else multiprocessing.get_start_method()
    init = loader.worker_init_fn
    unblocks = getattr(getattr(init, "func", init), "unblocks_stop_signals", False)
    if (method != "spawn" or not unblocks or threading.current_thread() is not threading.main_thread()
            or not hasattr(signal, "pthread_sigmask")):
        return iter(loader)
    # Started now, not inside the window: it unblocks both signals when it starts, which would let the
    # workers be born with them unblocked.
    from multiprocessing import resource_tracker

    resource_tracker.ensure_running()
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, (signal.SIGINT, signal.SIGTERM))
    try:
        return iter(loader)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)


def refuse_while_a_spawned_process_imports(call: str) -> None:
    """Raise when ``call`` runs while a process started by spawn (macOS's and Windows' data-loader
    workers) imports the caller's script: a script that calls ``train()``/``evaluate()`` outside an
    ``if __name__ == "__main__":`` block runs it again in every worker, which then rewrote the run's
    files and failed with multiprocessing's bootstrapping error, far from its cause."""
    if getattr(multiprocessing.current_process(), "_inheriting", False):  # set while spawn prepares a child
        raise RuntimeError(f"{call} was called while a process started by spawn (macOS's and Windows' default, "
                           "and how data-loader workers start there) was importing your script: put the call "
                           "under 'if __name__ == \"__main__\":', or pass nworker=0")


def stop_loader_workers(loader_or_iterator) -> None:
    """Stop a DataLoader's worker processes now (a DataLoader with persistent workers, or an iterator of
    one); nothing for a loader without workers, or one already stopped.

    Workers that ignore SIGTERM (:func:`ignore_stop_signals_in_worker`) stop only when told to by their
    iterator: PyTorch's fallback, ``terminate()``, is a SIGTERM, and so is what ``multiprocessing`` sends
    its children at exit before waiting for them. An error raised in a worker leaves the iterator in a
    reference cycle (the re-raised error's traceback), and when the garbage collector frees it, the
    queues may go before the iterator sends that message: the worker is left running and the interpreter
    waits for it forever at exit. So the code that owns the iterator stops it here, while all is alive.
    (``_shutdown_workers`` is private to PyTorch, idempotent, and the same in torch 2.11 to 2.14.)
    """
    iterator = getattr(loader_or_iterator, "_iterator", loader_or_iterator)
    shutdown = getattr(iterator, "_shutdown_workers", None)
    if callable(shutdown):
        shutdown()


class StopRequest:
    """First SIGINT/SIGTERM sets :attr:`requested` and, when ``verbose``, prints what happens next
    (:meth:`describe`); a later SIGINT raises ``KeyboardInterrupt``, a later SIGTERM is ignored (see the
    module's docstring). Handlers are installed only from the main thread (elsewhere signals are left
    alone); usable as a context manager."""

    def __init__(self, verbose: bool):
        self.requested = False
        self.verbose = verbose
        self._previous: dict[int, Any] = {}

    def describe(self) -> str:
        """What the first signal makes happen, for its message."""
        return "stopping at the next safe point"

    def on_first_signal(self) -> None:
        """Called after the first signal is recorded (and announced)."""

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set from the main thread
        for signum in (signal.SIGINT, signal.SIGTERM):
            self._previous[signum] = signal.signal(signum, self._handle)

    def restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def __enter__(self) -> StopRequest:
        self.install()
        return self

    def __exit__(self, *exc) -> None:
        self.restore()

    def _handle(self, signum, _frame) -> None:
        if self.requested:
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            return
        self.requested = True
        if self.verbose:
            again = "press Ctrl-C again" if signum == signal.SIGINT else "send SIGINT (Ctrl-C)"
            print(f"\n{signal.Signals(signum).name} received: {self.describe()} ({again} to stop at once)",
                  file=sys.stderr, flush=True)
        self.on_first_signal()
