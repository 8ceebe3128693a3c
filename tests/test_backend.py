"""Backend selection: automatic choice, the environment override, and no silent fallback; whether reduced
precision runs natively."""

import re
import warnings

import pytest
import torch

import hypertriton
from hypertriton import backend
from hypertriton.backend import resolve_backend, triton_installed


def test_cpu_default_is_torch(monkeypatch):
    monkeypatch.delenv("HYPERTRITON_BACKEND", raising=False)
    assert resolve_backend(None, torch.device("cpu")) == "torch"


def test_environment_variable_overrides_and_argument_overrides_environment(monkeypatch):
    monkeypatch.setenv("HYPERTRITON_BACKEND", "reference")
    assert resolve_backend(None, torch.device("cpu")) == "reference"
    assert resolve_backend("torch", torch.device("cpu")) == "torch"


def test_unknown_backend_names_its_source(monkeypatch):
    with pytest.raises(ValueError, match="backend: unknown backend 'cuda'"):
        resolve_backend("cuda", torch.device("cpu"))
    monkeypatch.setenv("HYPERTRITON_BACKEND", "fast")
    with pytest.raises(ValueError, match="HYPERTRITON_BACKEND: unknown backend 'fast'"):
        resolve_backend(None, torch.device("cpu"))


def test_backend_of_the_wrong_type_is_named_and_device_may_be_a_name():
    with pytest.raises(TypeError, match="backend: expected one of .* got 3"):
        resolve_backend(3, torch.device("cpu"))
    assert resolve_backend("torch", "cpu") == resolve_backend(None, "cpu") == "torch"
    with pytest.raises(ValueError, match="backend: expected one of"):
        hypertriton.HyperCorr(backend="fast")
    with pytest.raises(TypeError, match="backend: expected one of .* got 3"):  # as resolve_backend's
        hypertriton.HPNLearner([3, 6, 4], 3)


@pytest.mark.skipif(not triton_installed(), reason="without triton the reason given is that it is not installed")
def test_forcing_triton_without_interpreter_on_cpu_is_an_error(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        resolve_backend("triton", torch.device("cpu"))
    x = torch.randn(1, 2, 3, 3, 3, 3)
    w = torch.randn(2, 2, 3, 3)
    with pytest.raises(RuntimeError, match="backend 'triton' cannot run"):
        hypertriton.center_pivot_conv4d(x, w, None, w, None, backend="triton")
    monkeypatch.setenv("HYPERTRITON_BACKEND", "triton")
    with pytest.raises(RuntimeError, match="backend 'triton' cannot run"):
        hypertriton.hypercorrelation([x[..., 0, 0]], [x[..., 0, 0]])


# --------------------------------------------------------------------------------------------------
# Reduced precision: native, emulated by oneDNN, or PyTorch's scalar fallback

def _cpu_with(monkeypatch, features=(), onednn=False):
    """Pretend this CPU has exactly ``features`` (names of ``torch.cpu._is_<name>_supported``)."""
    monkeypatch.setattr(backend, "_cpu_feature", lambda name: name in features)
    monkeypatch.setattr(backend, "_onednn_takes", lambda dtype: onednn)


@pytest.mark.parametrize("features, onednn, dtype, expected", [
    (("avx512_bf16",), True, torch.bfloat16, None),
    (("amx_tile",), True, torch.bfloat16, None),
    ((), True, torch.bfloat16, "oneDNN only emulates bf16"),
    ((), False, torch.bfloat16, "scalar fallback loops"),
    (("avx512_bf16",), True, torch.float16, "no AMX-FP16"),
    (("avx512_bf16",), False, torch.float16, "oneDNN does not take fp16 on it"),  # AVX-512 without AVX512-FP16
    (("amx_fp16",), True, torch.float16, None),
    ((), False, torch.float32, None),
    ((), False, torch.float64, None),
])
def test_reduced_precision_is_slow_without_native_units(monkeypatch, features, onednn, dtype, expected):
    _cpu_with(monkeypatch, features, onednn)
    reason = backend.reduced_precision_slow_reason(dtype, torch.device("cpu"))
    if expected is None:
        assert reason is None
    else:
        assert expected in reason and torch.backends.cpu.get_cpu_capability() in reason


@pytest.mark.parametrize("capability, dtype, slow", [
    ((7, 5), torch.bfloat16, True), ((8, 0), torch.bfloat16, False), ((9, 0), torch.bfloat16, False),
    ((7, 5), torch.float16, False), ((7, 5), torch.float32, False)])
def test_gpu_bf16_is_native_from_ampere(monkeypatch, capability, dtype, slow):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    reason = backend.reduced_precision_slow_reason(dtype, torch.device("cuda", 0))
    assert (reason is not None) == slow
    if slow:
        assert f"compute capability {capability[0]}.{capability[1]}" in reason


def test_reduced_precision_reason_follows_this_cpus_own_flags():
    """The real probes: a CPU that reports AVX512-BF16 or AMX computes bf16 natively, and one without
    AVX-512 has no oneDNN bf16 (its reason names the fallback loops)."""
    reason = backend.reduced_precision_slow_reason(torch.bfloat16, torch.device("cpu"))
    assert backend.reduced_precision_slow_reason(torch.bfloat16, "cpu") == reason  # a device name works too
    native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    assert (reason is None) == native
    if not native and not torch.cpu._is_avx512_supported():
        assert "scalar fallback loops" in reason


def test_slow_reduced_precision_warns_once(monkeypatch):
    _cpu_with(monkeypatch)
    monkeypatch.setattr(backend, "_WARNED_SLOW", set())
    with pytest.warns(RuntimeWarning, match="the thing runs in bf16, but this CPU .* scalar fallback loops"):
        backend.warn_if_reduced_precision_slow(torch.bfloat16, torch.device("cpu"), "the thing")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        backend.warn_if_reduced_precision_slow(torch.bfloat16, torch.device("cpu"), "the thing")
        backend.warn_if_reduced_precision_slow(torch.float32, torch.device("cpu"), "the thing")
    _cpu_with(monkeypatch, ("avx512_bf16",), True)
    monkeypatch.setattr(backend, "_WARNED_SLOW", set())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        backend.warn_if_reduced_precision_slow(torch.bfloat16, torch.device("cpu"), "the thing")


def test_fused_layer_warns_when_its_reduced_precision_is_slow_here(monkeypatch):
    from hypertriton.ops.fused_first_layer import fused_hypercorrelation_cp_conv4d

    _cpu_with(monkeypatch)
    monkeypatch.setattr(backend, "_WARNED_SLOW", set())
    q, s = [torch.randn(1, 3, 4, 4)], [torch.randn(1, 3, 4, 4)]
    w = torch.randn(2, 1, 3, 3)
    with pytest.warns(RuntimeWarning, match="the fused layer's correlation runs in bf16"):
        fused_hypercorrelation_cp_conv4d(q, s, None, w, None, w, None, (1, 1, 2, 2), (1, 1, 1, 1),
                                         correlation_dtype=torch.bfloat16, backend="torch")
    monkeypatch.setattr(backend, "_WARNED_SLOW", set())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # fp32, the default: nothing to say
        fused_hypercorrelation_cp_conv4d(q, s, None, w, None, w, None, (1, 1, 2, 2), (1, 1, 1, 1), backend="torch")


@pytest.mark.parametrize("native", [True, False])
def test_amp_auto_picks_bf16_on_cpu_only_where_it_is_native(monkeypatch, native):
    from hypertriton.training import _resolve_amp

    _cpu_with(monkeypatch, ("avx512_bf16",) if native else ())
    monkeypatch.setattr(backend, "_WARNED_SLOW", set())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # auto decides silently
        assert _resolve_amp("auto", torch.device("cpu")) == (torch.bfloat16 if native else None)
    if native:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert _resolve_amp("bf16", torch.device("cpu")) == torch.bfloat16
    else:  # asked for explicitly: as asked, with a warning
        with pytest.warns(RuntimeWarning, match="amp='bf16' runs in bf16"):
            assert _resolve_amp("bf16", torch.device("cpu")) == torch.bfloat16


def test_triton_backend_names_the_float64_input_it_cannot_take():
    """``tl.dot`` takes fp32, fp16 and bf16: the message names the caller's argument, not the kernel's."""
    from helpers import kernel_device

    device = kernel_device()
    feats = [torch.randn(1, 4, 5, 5, dtype=torch.float64, device=device)]
    weight = torch.randn(2, 1, 3, 3, dtype=torch.float64, device=device)
    calls = {
        "query_feats[0]": lambda: hypertriton.hypercorrelation(feats, feats, None, backend="triton"),
        "fused query_feats[0]": lambda: hypertriton.fused_hypercorrelation_cp_conv4d(
            feats, feats, None, weight, None, weight, None, backend="triton"),
        "x": lambda: hypertriton.center_pivot_conv4d(torch.randn(1, 1, 3, 3, 3, 3, dtype=torch.float64, device=device),
                                                     weight, None, weight, None, backend="triton"),
    }
    for name, call in calls.items():
        argument = re.escape(name.split()[-1])
        with pytest.raises(TypeError, match=rf"^{argument}: the triton backend takes .* got torch.float64"):
            call()
