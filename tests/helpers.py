"""Helpers shared by the op tests: which backends can run here, and tensor builders for hypothesis."""

from __future__ import annotations

import contextlib
import sys
from unittest import mock

import pytest
import torch
from hypothesis import settings
from hypothesis import strategies as st

from hypertriton.backend import triton_unavailable_reason


def keep_first_autotune_config(monkeypatch) -> None:
    """Every Triton kernel runs its first GPU config only, until the test ends: numerics do not depend on
    the tile size, and autotuning would compile and time every config again for each new shape and dtype
    (``tests/test_kernel_configs.py`` runs each config on its own)."""
    from hypertriton import kernels

    for autotuned in kernels.autotuned_kernels().values():
        monkeypatch.setattr(autotuned, "configs", autotuned.configs[:1])
        monkeypatch.setattr(autotuned, "cache", {})


def examples(count: int) -> int:
    """A test's own example count, scaled like the loaded hypothesis profile's against the default one
    (tests/conftest.py): ``count`` by default, 12x under ``HYPOTHESIS_PROFILE=thorough`` (a fixed count
    ignored the profile)."""
    default = settings.get_profile("default").max_examples
    return max(1, round(count * settings.default.max_examples / default))


def kernel_device() -> str:
    """Where the Triton kernels run in this process: ``"cpu"`` under the interpreter (``tests/conftest.py``
    sets ``TRITON_INTERPRET=1`` without a GPU, before anything imports them), else ``"cuda"``. Skips the
    calling test module when neither is possible (the variable set too late, no GPU)."""
    import pytest

    from hypertriton.backend import triton_installed

    if not triton_installed():
        pytest.skip("the triton package is not installed (torch's macOS and Windows wheels do not bring it)",
                    allow_module_level=True)
    from hypertriton import kernels

    if not kernels.INTERPRETED and not torch.cuda.is_available():
        pytest.skip("the Triton kernels need a CUDA GPU or TRITON_INTERPRET=1 set before hypertriton.kernels "
                    "was first imported", allow_module_level=True)
    return "cpu" if kernels.INTERPRETED else "cuda"


def available_backends() -> list[tuple[str, str]]:
    """``(backend, device)`` pairs that can run in this process."""
    backends = [("reference", "cpu"), ("torch", "cpu")]
    if torch.cuda.is_available():
        backends.append(("triton", "cuda"))
    elif triton_unavailable_reason(torch.device("cpu")) is None:
        backends.append(("triton", "cpu"))
    return backends


BACKEND_IDS = [name for name, _ in available_backends()]
TRITON_RUNS = "triton" in BACKEND_IDS
needs_triton = pytest.mark.skipif(not TRITON_RUNS, reason="the Triton kernels cannot run here: "
                                  f"{triton_unavailable_reason(torch.device('cpu'))}")


# os.kill(pid, SIGINT) on Windows terminates the process (only CTRL_C_EVENT reaches a handler there, and
# it goes to the whole console), and os.killpg does not exist: these tests would kill pytest itself.
posix_signals = pytest.mark.skipif(sys.platform == "win32", reason="sends POSIX signals (SIGINT/SIGTERM) to "
                                   "a running process; on Windows os.kill terminates it instead")


def backend_params(*names: str) -> list:
    """``names`` for ``pytest.mark.parametrize``, the triton backend skipped (with the reason) where it
    cannot run."""
    return [pytest.param(name, marks=needs_triton) if name == "triton" else name for name in names]
LAYOUTS = ("contiguous", "channels_last", "strided")


def make_tensor(shape, seed: int, layout: str = "contiguous", dtype=torch.float32, device="cpu") -> torch.Tensor:
    """A random tensor with the given memory layout (values drawn in float64, then cast).

    ``channels_last`` stores the channel dim (dim 1) innermost; ``strided`` is a non-contiguous view
    (every other element of a twice-as-large last dim).
    """
    generator = torch.Generator().manual_seed(seed)
    if layout == "strided":
        big = torch.randn(*shape[:-1], 2 * shape[-1], generator=generator, dtype=torch.float64)
        return big.to(dtype)[..., ::2].to(device)
    values = torch.randn(*shape, generator=generator, dtype=torch.float64).to(dtype)
    if layout == "channels_last":
        order = (0, *range(2, len(shape)), 1)
        inverse = [order.index(i) for i in range(len(shape))]
        values = values.permute(order).contiguous().permute(inverse)
    return values.to(device)


def make_mask(kind: str, batch: int, height: int, width: int, seed: int) -> torch.Tensor | None:
    """Support masks of every kind: none, all zero, all one, random pixels, a single pixel, a blob."""
    if kind == "none":
        return None
    generator = torch.Generator().manual_seed(seed)
    if kind == "zero":
        return torch.zeros(batch, height, width)
    if kind == "full":
        return torch.ones(batch, height, width)
    if kind == "random":
        return (torch.rand(batch, height, width, generator=generator) > 0.5).float()
    mask = torch.zeros(batch, height, width)
    if kind == "pixel":
        mask[:, height // 2, width // 2] = 1
        return mask
    assert kind == "blob"
    mask[:, height // 4: max(height // 4 + 1, 3 * height // 4), width // 3: max(width // 3 + 1, 2 * width // 3)] = 1
    return mask


MASK_KINDS = ("none", "zero", "full", "random", "pixel", "blob")
seeds = st.integers(0, 2**31 - 1)


def assert_gradients_match(outputs, ref_outputs, inputs, ref_inputs, upstream: str, scale: float):
    """Backpropagate the same upstream gradient through a backend and the float64 reference; compare.

    ``upstream="sum"`` backpropagates ``.sum()``, whose gradient has stride 0; ``"random"`` a random
    weighting.
    """
    from hypertriton.testing import assert_close_dtype

    if upstream == "sum":
        loss = sum(o.sum() for o in outputs)
        ref_loss = sum(o.sum() for o in ref_outputs)
    else:
        weights = [torch.randn(o.shape, generator=torch.Generator().manual_seed(i), dtype=torch.float64)
                   for i, o in enumerate(ref_outputs)]
        loss = sum((o * w.to(o)).sum() for o, w in zip(outputs, weights))
        ref_loss = sum((o * w).sum() for o, w in zip(ref_outputs, weights))
    grads = torch.autograd.grad(loss, inputs)
    ref_grads = torch.autograd.grad(ref_loss, ref_inputs)
    for got, want in zip(grads, ref_grads):
        assert_close_dtype(got.cpu(), want, torch.float32, scale=scale)


@contextlib.contextmanager
def watching_forward(modules, callback, before: bool = False):
    """``callback(module, args, output)`` after each forward of each of ``modules`` (``before=True``:
    ``callback(module, args)`` before it), without hooks: a learner with hooks inside runs another path,
    the one hooks need (``HPNLearner.hooks_inside``), not the fast path a test wants to watch."""
    for module in modules:
        def watched(*args, module=module, forward=module.forward, **kwargs):
            if before:
                callback(module, args)
            out = forward(*args, **kwargs)
            if not before:
                callback(module, args, out)
            return out
        module.forward = watched  # an instance attribute, which nn.Module.__call__ takes
    try:
        yield
    finally:
        for module in modules:
            del module.forward


@contextlib.contextmanager
def counting_nnpack():
    """Yields a list that records the input shape of every call reaching NNPACK (calls go through)."""
    calls = []
    original = torch._nnpack_spatial_convolution

    def counting(*args):
        calls.append(tuple(args[0].shape))
        return original(*args)

    with mock.patch.object(torch, "_nnpack_spatial_convolution", counting):
        yield calls


TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def launch_gloo_ranks(argv: list[str], world_size: int, workdir, timeout: float = 240.0) -> list[str]:
    """Run the Python command line ``argv`` as ranks 0..world_size-1 of a gloo job, as torchrun would;
    returns each rank's stdout, after asserting that every rank exited with 0.

    The rendezvous store is served from here, on a port the system picks, for the whole job (as torchrun's
    agent does): a port probed free and released could be taken before rank 0 binds it. Output goes to files
    in ``workdir`` (a full pipe stalls a rank inside a collective until the other times out). A rank still
    running at ``timeout`` gets SIGABRT, which makes Python's faulthandler print every thread's stack into
    the failure message, so that a hang names where it hangs.
    """
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    import torch.distributed as dist

    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    store = dist.TCPStore("127.0.0.1", 0, None, is_master=True, wait_for_workers=False)
    base = {key: value for key, value in os.environ.items() if key not in TORCHRUN_VARS}
    base.update(WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(store.port),
                TORCHELASTIC_USE_AGENT_STORE="True", OMP_NUM_THREADS="1", PYTHONFAULTHANDLER="1")
    procs, logs = [], []
    try:
        for rank in range(world_size):
            out, err = workdir / f"rank{rank}.out", workdir / f"rank{rank}.err"
            with open(out, "w") as stdout, open(err, "w") as stderr:
                env = dict(base, RANK=str(rank), LOCAL_RANK=str(rank))
                procs.append(subprocess.Popen([sys.executable, *map(str, argv)], env=env, stdout=stdout,
                                              stderr=stderr))
            logs.append((out, err))
        deadline = time.monotonic() + timeout
        hung = []
        for rank, proc in enumerate(procs):
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                hung.append(rank)
        for rank in hung:
            procs[rank].send_signal(signal.SIGABRT)
        for rank in hung:
            try:
                procs[rank].wait(timeout=10)
            except subprocess.TimeoutExpired:
                procs[rank].kill()
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        del store
    stacks = "\n".join(f"rank {rank} hung past {timeout:g} s; its stacks:\n{logs[rank][1].read_text()[-6000:]}"
                       for rank in hung)
    assert not hung, stacks
    for rank, (proc, (_, err)) in enumerate(zip(procs, logs)):
        assert proc.returncode == 0, f"rank {rank} failed ({proc.returncode}):\n{err.read_text()[-6000:]}"
    return [out.read_text() for out, _ in logs]


def check_second_derivatives(backend: str, device: str, penalty_gradients) -> None:
    """``penalty_gradients(backend, device, dtype)`` (gradients of a gradient penalty, taken with
    ``create_graph=True``) equals the float64 einsum reference's: in float64 on the CPU backends, in
    float32 on Triton (which takes no float64). Absolute tolerances follow the largest gradient of the
    set: a support mask's gradient through the normalization nearly cancels (the features' scale drops
    out), so in float32 it keeps only the digits the largest terms leave it."""
    dtype = torch.float32 if backend == "triton" else torch.float64
    tolerance = 1e-5 if dtype == torch.float32 else 1e-9
    got = penalty_gradients(backend, device, dtype)
    want = penalty_gradients("reference", "cpu", torch.float64)
    assert len(got) == len(want)
    largest = max(float(w.abs().max()) for w in want)
    for g, w in zip(got, want):
        torch.testing.assert_close(g.cpu().double(), w, rtol=tolerance, atol=tolerance * largest)


class SignalDispositionProbe(torch.utils.data.Dataset):
    """Items say which signals a data-loader worker blocked when it unpickled this dataset (which a spawned
    worker does while it starts, before any ``worker_init_fn`` runs) and when it read the item."""

    def __init__(self, length: int = 2):
        self.length = length
        self.at_start = None

    def __getstate__(self):
        return {"length": self.length}

    def __setstate__(self, state):
        import signal

        self.length = state["length"]
        self.at_start = sorted(int(signum) for signum in signal.pthread_sigmask(signal.SIG_BLOCK, []))

    def __len__(self):
        return self.length

    def __getitem__(self, index):
        import signal

        blocked = sorted(int(signum) for signum in signal.pthread_sigmask(signal.SIG_BLOCK, []))
        return {"at_start": self.at_start, "blocked_later": blocked}


# Set to "parent" by a test before it starts loader workers: a forked worker sees that, a spawned one the
# module's own value.
PROCESS_MARK = "fresh"


def record_worker_start(path: str, worker_id: int) -> None:
    """A ``worker_init_fn`` (with ``functools.partial``): writes ``PROCESS_MARK`` to ``path``."""
    with open(path, "a") as handle:
        handle.write(f"{worker_id} {PROCESS_MARK}\n")
