"""Test set-up shared by every test module.

Triton decides when a kernel is decorated whether to interpret it, so ``TRITON_INTERPRET=1`` is set
here, before anything imports ``hypertriton.kernels``, whenever no GPU can compile the kernels.
"""

import os
import sys

import torch

if not torch.cuda.is_available():
    # Set, not defaulted: an inherited TRITON_INTERPRET=0 left the triton cases out of every op test
    # without a word, and the run stayed green.
    os.environ["TRITON_INTERPRET"] = "1"
# Tests choose backends explicitly; a developer's shell setting must not change what they check.
os.environ.pop("HYPERTRITON_BACKEND", None)
# Helper modules beside the tests (datagen.py, ...) are imported by name.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def share_cores_among_xdist_workers() -> None:
    """Under pytest-xdist, each worker takes its share of the cores, unless ``OMP_NUM_THREADS`` says
    otherwise. By default torch starts a thread per core in every worker; with ``-n 2`` on 2 cores the
    four threads' OpenMP spin-waits take the cores from one another, and the learner, prediction and
    reference tests ran 4x slower (121 s instead of 31 s on CI's 2-core machine). Subprocesses that tests
    start inherit the share through ``OMP_NUM_THREADS``."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers <= 1 or "OMP_NUM_THREADS" in os.environ:
        return
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    threads = max(1, cores // workers)
    torch.set_num_threads(threads)
    os.environ["OMP_NUM_THREADS"] = str(threads)


share_cores_among_xdist_workers()


def take_ctrl_c_as_a_terminal_would() -> None:
    """A shell without job control starts background commands with SIGINT ignored, and Python keeps that:
    the tests that press Ctrl-C (in this process or in the processes they start, which inherit it) then
    saw nothing happen. Python's own handler, as in a terminal."""
    import signal

    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


take_ctrl_c_as_a_terminal_would()

import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

settings.register_profile(
    "default", deadline=None, max_examples=25, derandomize=True, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
# Profiles inherit the loaded default's settings: "thorough" turns derandomize off explicitly, so that
# each of its runs draws new examples (the default's fixed ones keep CI reproducible).
settings.register_profile("thorough", deadline=None, max_examples=300, derandomize=False, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run on the GPU machine)")
    for item in items:
        if item.get_closest_marker("gpu") is not None:  # the marker, not any keyword (a test id) named "gpu"
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def seeded_global_generators():
    """Each test starts from the same torch, numpy and random states, whatever ran before it in its worker
    (under pytest-xdist that differs from run to run): a test drawing from the global generators draws the
    same numbers every run (one bias-gradient test failed about once in 200 such draws)."""
    import random

    import numpy as np

    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)


@pytest.fixture(autouse=True)
def poison_op_outputs(monkeypatch):
    """Every output an op allocates starts as NaN, so an element a kernel never writes fails the test."""
    from hypertriton.ops import _alloc

    monkeypatch.setattr(_alloc, "POISON_OUTPUTS", True)


@pytest.fixture(autouse=True)
def ieee_fp32_convolutions_on_cuda():
    """On a GPU, cuDNN's fp32 convolutions (the original's, and the fused op's query branch) may use TF32
    by default (``torch.backends.cudnn.allow_tf32``), which fp32 tolerances would not pass; our kernels
    follow the matmul flag, off by default. Tests of TF32 set the flags they check themselves."""
    if not torch.cuda.is_available():
        yield
        return
    saved = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32 = saved


@pytest.fixture(autouse=True)
def one_config_per_kernel_when_asked(monkeypatch):
    """``HYPERTRITON_TEST_ONE_CONFIG=1``: every Triton kernel keeps its first autotune config, so that a
    GPU run of the op tests compiles one config per new shape instead of timing every one."""
    if os.environ.get("HYPERTRITON_TEST_ONE_CONFIG") == "1":
        from helpers import keep_first_autotune_config

        keep_first_autotune_config(monkeypatch)
    yield
