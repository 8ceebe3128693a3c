"""hypertriton.ops.cpu_conv: NNPACK convolutions in CPU inference, against float64 convolutions, and the
cases where PyTorch's own convolution must run instead."""

import os
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from helpers import counting_nnpack, make_tensor, seeds
from hypothesis import example, given
from hypothesis import strategies as st

from hypertriton import reference
from hypertriton.learner import HPNLearner, _run_decoder
from hypertriton.ops import cpu_conv
from hypertriton.ops.center_pivot_conv4d import center_pivot_conv4d
from hypertriton.ops.layout import to_query_major
from hypertriton.testing import assert_close_dtype

pytestmark = pytest.mark.skipif(not cpu_conv._nnpack_present(), reason="this PyTorch build has no NNPACK")


def side_for_nnpack() -> int:
    """The smallest square map side that NNPACK gets at this process's thread count."""
    side = 1
    while side * side < cpu_conv.MIN_POSITIONS_PER_THREAD * torch.get_num_threads():
        side += 1
    return side


def conv_case(batch, cin, cout, height, width, kernel, seed, bias=True):
    """Inputs of order 1 and weights scaled so that outputs are of order 1 (the tolerance's scale)."""
    x = make_tensor((batch, cin, height, width), seed)
    weight = make_tensor((cout, cin, kernel, kernel), seed + 1) / (cin * kernel * kernel) ** 0.5
    b = make_tensor((cout,), seed + 2) if bias else None
    return x, weight, b


@given(batch=st.integers(1, 3), cin=st.sampled_from([16, 32, 33]), cout=st.sampled_from([64, 65]),
       extra=st.tuples(st.integers(0, 7), st.integers(0, 7)), kernel=st.sampled_from([3, 5]),
       bias=st.booleans(), channels_last=st.booleans(), seed=seeds)
@example(batch=1, cin=16, cout=64, extra=(0, 0), kernel=3, bias=False, channels_last=False, seed=0)
def test_matches_float64_convolution(batch, cin, cout, extra, kernel, bias, channels_last, seed):
    side = side_for_nnpack()
    x, weight, b = conv_case(batch, cin, cout, side + extra[0], side + extra[1], kernel, seed, bias)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad(), counting_nnpack() as nnpack_calls:
        out = cpu_conv.conv2d(x, weight, b, 1, kernel // 2)
    assert len(nnpack_calls) == batch  # one image per call
    expected = F.conv2d(x.double(), weight.double(), None if b is None else b.double(), 1, kernel // 2)
    assert out.shape == expected.shape
    assert_close_dtype(out, expected, "winograd")


def fallback_cases():
    side = side_for_nnpack()
    big = dict(batch=1, cin=32, cout=32, height=side, width=side, kernel=3)
    return {
        "gradient": (big, {"requires_grad": True}),
        "stride 2": (big, {"stride": 2}),
        "kernel 1": ({**big, "kernel": 1}, {}),
        "kernel 7": ({**big, "kernel": 7}, {}),
        "other padding": (big, {"padding": 0}),
        "small map": ({**big, "height": side // 2}, {}),
        "few channels": ({**big, "cin": 4, "cout": 16}, {}),
        "float64": (big, {"dtype": torch.float64}),
        "autocast": (big, {"autocast": True}),
        "disabled by variable": (big, {"env": "0"}),
        "disabled by torch": (big, {"torch_flag": False}),
        "other thread count": (big, {"pool": (torch.get_num_threads() + 1, os.getpid())}),
        "forked process": (big, {"pool": (torch.get_num_threads(), os.getpid() + 1)}),
        "forbidden in a block": (big, {"allowed": False}),
        "more threads than allowed": (big, {"max_threads": torch.get_num_threads() - 1}),
    }


@pytest.mark.parametrize("name", list(fallback_cases()))
def test_falls_back_to_pytorch(monkeypatch, name):
    shape, options = fallback_cases()[name]
    x, weight, b = conv_case(shape["batch"], shape["cin"], shape["cout"], shape["height"], shape["width"],
                             shape["kernel"], seed=1)
    dtype = options.get("dtype", torch.float32)
    x, weight, b = x.to(dtype), weight.to(dtype), b.to(dtype)
    stride, padding = options.get("stride", 1), options.get("padding", shape["kernel"] // 2)
    if "env" in options:
        monkeypatch.setenv(cpu_conv.ENV_VARIABLE, options["env"])
    if "pool" in options:  # as if NNPACK's pool had been created with these threads, in that process
        monkeypatch.setattr(cpu_conv, "_pool_threads", options["pool"][0])
        monkeypatch.setattr(cpu_conv, "_pool_pid", options["pool"][1])
    weight.requires_grad_(options.get("requires_grad", False))
    with torch.backends.nnpack.flags(enabled=options.get("torch_flag", True)), \
            cpu_conv.nnpack_allowed(options.get("allowed", True)), \
            torch.autocast("cpu", torch.bfloat16, enabled=options.get("autocast", False)), \
            counting_nnpack() as nnpack_calls:
        out = cpu_conv.conv2d(x, weight, b, stride, padding, max_threads=options.get("max_threads"))
        expected = F.conv2d(x, weight, b, stride, padding)
    assert nnpack_calls == []
    assert torch.equal(out, expected)


@given(batch=st.integers(1, 2), support=st.sampled_from([(1, 1), (2, 2), (2, 3)]), extra=st.integers(0, 3),
       layout=st.sampled_from(["query_major", "contiguous"]), thread_limit_met=st.booleans(), seed=seeds)
@example(batch=2, support=(2, 2), extra=1, layout="query_major", thread_limit_met=True, seed=0)
@example(batch=1, support=(2, 2), extra=0, layout="query_major", thread_limit_met=False, seed=0)
def test_mixing_layer_query_branch(batch, support, extra, layout, thread_limit_met, seed):
    """A center-pivot conv with support stride 1 (HSNet's mixing blocks) runs its query branch through NNPACK
    when the input is query-major and the thread count is within ``CP_CONV_MAX_THREADS``, and equals the
    reference either way."""
    side = side_for_nnpack()
    channels = 32
    x = make_tensor((batch, channels, side + extra, side, *support), seed)
    if layout == "query_major":
        x = to_query_major(x)
    wq = make_tensor((channels, channels, 3, 3), seed + 1) / (channels * 9) ** 0.5
    ws = make_tensor((channels, channels, 3, 3), seed + 2) / (channels * 9) ** 0.5
    bq, bs = make_tensor((channels,), seed + 3), make_tensor((channels,), seed + 4)
    limit = torch.get_num_threads() - (0 if thread_limit_met else 1)
    with torch.no_grad(), counting_nnpack() as nnpack_calls, mock.patch.object(cpu_conv, "CP_CONV_MAX_THREADS", limit):
        out = center_pivot_conv4d(x, wq, bq, ws, bs, (1, 1, 1, 1), 1, backend="torch")
    used = layout == "query_major" and thread_limit_met
    assert len(nnpack_calls) == (batch * support[0] * support[1] if used else 0)
    expected = reference.center_pivot_conv4d(x.double(), wq.double(), bq.double(), ws.double(), bs.double(),
                                             (1, 1, 1, 1), (1, 1, 1, 1))
    assert_close_dtype(out, expected, "winograd", scale=2)


def test_decoder_uses_nnpack_in_inference_only():
    learner = HPNLearner([3, 6, 4]).eval()
    side = side_for_nnpack()
    encoded = torch.randn(1, 128, side, side)
    with torch.no_grad(), counting_nnpack() as nnpack_calls:
        fast = _run_decoder(learner.decoder1, encoded)
        plain = learner.decoder1(encoded)
    assert len(nnpack_calls) == 2  # both 3x3 convolutions of decoder1
    assert_close_dtype(fast, plain, "winograd", scale=float(plain.abs().max().clamp(min=1)))
    with counting_nnpack() as nnpack_calls:
        trained = _run_decoder(learner.decoder1, encoded)  # gradients recorded for the parameters
    assert nnpack_calls == [] and torch.equal(trained, plain)


def test_lean_learner_forward_uses_no_nnpack():
    """Lean mode exists for its memory: it keeps PyTorch's convolutions (NNPACK's layout copies would raise
    its peak); the default forward uses NNPACK and gives the same logits within the Winograd tolerance."""
    side = side_for_nnpack()
    learner = HPNLearner([3, 6, 4]).eval()
    generator = torch.Generator().manual_seed(3)
    levels = []
    for layers, level_side in zip((3, 6, 4), (-(-side // 4), -(-side // 2), side)):
        feats = [[torch.randn(1, 8, level_side, level_side, generator=generator) for _ in range(layers)]
                 for _ in range(2)]
        levels.append(tuple(feats))
    mask = torch.zeros(1, 4 * side, 4 * side)
    mask[:, side:3 * side, side // 2:2 * side] = 1
    with torch.no_grad():
        with counting_nnpack() as lean_calls:
            lean = learner.forward_fused(levels, mask, lean=True)
        with counting_nnpack() as default_calls:
            default = learner.forward_fused(levels, mask)
    assert lean_calls == [] and default_calls
    assert_close_dtype(default, lean, "winograd", scale=float(lean.abs().max().clamp(min=1)))


def test_hooked_convolutions_run_as_modules():
    """A convolution with a forward hook of its own (feature capture, weight_norm's pre-hook) is called as a
    module, so that its hooks run and change what they change, with and without gradients; an unhooked
    one beside it still takes NNPACK in inference. Global hooks (profilers, FlopCounterMode's module
    tracker) do not change the path they watch."""
    learner = HPNLearner([3, 6, 4])
    side = side_for_nnpack()
    encoded = torch.randn(1, 128, side, side)
    seen = []

    def zero_output(module, args, output):
        seen.append(module)
        return torch.zeros_like(output)

    hooked = learner.decoder1[0]
    handle = hooked.register_forward_hook(zero_output)
    try:
        with torch.no_grad():
            relu_of_bias = torch.relu(learner.decoder1[2](torch.zeros(1, 128, side, side)))
        for grad_mode in (True, False):
            seen.clear()
            with torch.set_grad_enabled(grad_mode), counting_nnpack() as nnpack_calls:
                out = _run_decoder(learner.decoder1, encoded)
            assert seen == [hooked]
            assert len(nnpack_calls) == (0 if grad_mode else 1)  # only the unhooked second convolution
            assert_close_dtype(out, relu_of_bias, "winograd", scale=float(relu_of_bias.abs().max().clamp(min=1)))
    finally:
        handle.remove()
    watched = []
    handle = torch.nn.modules.module.register_module_forward_hook(lambda module, args, output: watched.append(1))
    try:
        with torch.no_grad(), counting_nnpack() as nnpack_calls:
            _run_decoder(learner.decoder1, encoded)
    finally:
        handle.remove()
    assert len(nnpack_calls) == 2 and len(watched) == 2  # the ReLUs, called as modules


def test_conv2d_subclasses_keep_their_own_forward():
    """A subclass of nn.Conv2d (quantization-aware training, adapters) runs its own forward in inference
    too: NNPACK took every nn.Conv2d, and inference silently differed from training."""
    class Doubled(torch.nn.Conv2d):
        def forward(self, x):
            return 2 * super().forward(x)

    learner = HPNLearner([3, 6, 4])
    plain = learner.decoder1[0]
    doubled = Doubled(plain.in_channels, plain.out_channels, 3, padding=1)
    doubled.load_state_dict(plain.state_dict())
    encoded = torch.randn(1, 128, side_for_nnpack(), side_for_nnpack())
    with torch.no_grad(), counting_nnpack() as nnpack_calls:
        got = cpu_conv.run_conv_module(doubled, encoded)
    assert nnpack_calls == []
    torch.testing.assert_close(got, 2 * F.conv2d(encoded, plain.weight, plain.bias, padding=1))
