"""Backend selection: automatic choice, the environment override, and no silent fallback."""

import pytest
import torch

import hypertriton
from hypertriton.backend import resolve_backend


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
