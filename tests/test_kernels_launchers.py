"""The Triton launchers alone (no autograd, no op layer) against the einsum references and autograd.

On a machine without a GPU the kernels run under Triton's interpreter, which is slow: shapes stay
tiny and hypothesis draws few examples. bf16 runs there too (under the interpreter only, the kernels
widen bf16 tiles to fp32 before ``tl.dot``: the interpreter's bf16 products are wrong). Every output
buffer starts as NaN, so an element a kernel fails to write, or writes outside its slice, is caught.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import examples, kernel_device, make_tensor, seeds
from hypothesis import example, given, settings
from hypothesis import strategies as st

from hypertriton import reference
from hypertriton.testing import assert_close_dtype

DEVICE = kernel_device()  # skips this module where no kernel can run

from hypertriton.kernels.center_pivot_conv4d import center_pivot_conv4d_backward, center_pivot_conv4d_into  # noqa: E402
from hypertriton.kernels.hypercorrelation import correlation_backward, correlation_into  # noqa: E402
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
NAN = float("nan")


def nan_buffer(shape, dtype, order=None) -> torch.Tensor:
    """A NaN-filled tensor of ``shape`` whose memory follows the dim permutation ``order``."""
    order = list(range(len(shape))) if order is None else order
    stored = torch.full([shape[d] for d in order], NAN, dtype=dtype, device=DEVICE)
    return stored.permute([order.index(d) for d in range(len(shape))])


def relayout(tensor: torch.Tensor, layout: str) -> torch.Tensor:
    """The same values in the memory layout named as in ``helpers.make_tensor``."""
    if layout == "channels_last":
        return tensor.to(memory_format=torch.channels_last)
    if layout == "strided":  # every other element of a twice-as-long last dim
        return torch.stack([tensor, torch.full_like(tensor, NAN)], -1).flatten(-2)[..., ::2]
    return tensor.contiguous()


# ---------------------------------------------------------------------------------------------------
# correlation_into


sides = st.integers(1, 7)


@settings(max_examples=examples(15))
@given(batch=st.integers(1, 2), channels=st.integers(1, 8), hq=sides, wq=sides, hs=sides, ws=sides,
       layers=st.integers(1, 3), layout=st.sampled_from(["contiguous", "channels_last", "strided"]),
       out_order=st.sampled_from(["standard", "support_major"]), dtype=st.sampled_from(sorted(DTYPES)),
       nan_input=st.booleans(), seed=seeds)
@example(batch=1, channels=1, hq=1, wq=1, hs=1, ws=1, layers=1, layout="contiguous", out_order="standard",
         dtype="fp32", nan_input=False, seed=0).via("1x1 maps")
@example(batch=2, channels=8, hq=5, wq=3, hs=7, ws=6, layers=3, layout="channels_last",
         out_order="support_major", dtype="fp32", nan_input=False, seed=1).via("channels-last, permuted stack")
@example(batch=2, channels=3, hq=4, wq=7, hs=2, ws=5, layers=2, layout="strided", out_order="standard",
         dtype="fp16", nan_input=False, seed=2).via("fp16, non-contiguous")
@example(batch=2, channels=5, hq=3, wq=4, hs=5, ws=2, layers=2, layout="contiguous", out_order="standard",
         dtype="fp32", nan_input=True, seed=3).via("NaN in a query and a support feature")
@example(batch=1, channels=7, hq=6, wq=5, hs=3, ws=7, layers=2, layout="channels_last", out_order="standard",
         dtype="bf16", nan_input=False, seed=4).via("bf16")
def test_correlation_matches_reference(batch, channels, hq, wq, hs, ws, layers, layout, out_order, dtype,
                                       nan_input, seed):
    dtype = DTYPES[dtype]
    query = make_tensor((batch, channels, hq, wq), seed, layout, dtype)
    support = make_tensor((batch, channels, hs, ws), seed + 1, layout, dtype)
    if nan_input:
        query[-1, channels // 2, hq // 2, wq // 2] = NAN
        support[0, 0, hs - 1, 0] = NAN
    expected = reference.correlation(query.double(), support.double())
    # The launcher takes features the caller already normalized.
    q, s = (relayout(reference.normalize(f.double()).to(dtype).to(DEVICE), layout) for f in (query, support))

    order = [0, 1, 2, 3, 4, 5] if out_order == "standard" else [0, 4, 5, 1, 2, 3]
    stacked = nan_buffer((batch, layers, hq, wq, hs, ws), dtype, order)
    layer = layers // 2
    result = correlation_into(q, s, stacked[:, layer])

    assert result.data_ptr() == stacked[:, layer].data_ptr()
    assert_close_dtype(stacked[:, layer].cpu(), expected, dtype)
    others = torch.cat([stacked[:, :layer], stacked[:, layer + 1:]], 1)
    assert others.isnan().all(), "the kernel wrote outside its layer's slice"
    if nan_input:
        got = stacked[:, layer].cpu()
        assert got[-1, hq // 2, wq // 2].isnan().all()  # the ReLU keeps NaN (tl.maximum would not)
        assert got[0, :, :, hs - 1, 0].isnan().all()


def test_correlation_negative_products_are_zero_and_exact():
    # Hand-computed: q = (1, 0), (0, 1), (1, 1); s = (1, -1), (-2, 0).
    query = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 1.0]], device=DEVICE).view(1, 2, 1, 3)
    support = torch.tensor([[1.0, -2.0], [-1.0, 0.0]], device=DEVICE).view(1, 2, 2, 1)
    out = nan_buffer((1, 1, 3, 2, 1), torch.float32)
    correlation_into(query, support, out)
    expected = torch.tensor([[1.0, 0.0], [0.0, 0.0], [0.0, 0.0]]).view(1, 1, 3, 2, 1)
    assert torch.equal(out.cpu(), expected)


def active_pattern(pattern: str, batch: int, hs: int, ws: int, seed: int) -> torch.Tensor:
    """``[B, Hs*Ws]`` bool active support positions: random, a block of rows from the middle on (the first
    tiles have none), none, all, or only the first."""
    if pattern == "random":
        return torch.rand(batch, hs * ws, generator=torch.Generator().manual_seed(seed)) < 0.4
    if pattern == "block":
        return (torch.arange(hs * ws) >= (hs // 2) * ws).expand(batch, -1)
    active = torch.zeros(batch, hs * ws, dtype=torch.bool)
    active[:, :{"none": 0, "all": hs * ws, "one": 1}[pattern]] = True
    return active


@settings(max_examples=examples(10))
@given(batch=st.integers(1, 3), channels=st.integers(1, 6), hq=sides, wq=sides, hs=st.integers(1, 9),
       ws=st.integers(1, 9), pattern=st.sampled_from(["random", "none", "all", "one", "block"]),
       layout=st.sampled_from(["contiguous", "channels_last", "strided"]), dtype=st.sampled_from(sorted(DTYPES)),
       flags=st.sampled_from([torch.bool, torch.uint8]), seed=seeds)
@example(batch=2, channels=3, hq=2, wq=3, hs=9, ws=9, pattern="block", layout="contiguous", dtype="fp32",
         flags=torch.bool, seed=0).via("a block: whole tiles skipped, others partly active")
@example(batch=1, channels=1, hq=1, wq=1, hs=1, ws=1, pattern="none", layout="contiguous", dtype="fp32",
         flags=torch.uint8, seed=1).via("1x1, none active")
@example(batch=2, channels=5, hq=3, wq=3, hs=7, ws=8, pattern="random", layout="channels_last", dtype="bf16",
         flags=torch.bool, seed=2).via("bf16")
def test_correlation_with_active_positions_matches_reference(batch, channels, hq, wq, hs, ws, pattern, layout, dtype,
                                                             flags, seed):
    """Active support positions (inactive ones have zero features, as a mask leaves them; given as bool or
    0/1 integers): the same output as the dense product, every element written."""
    dtype = DTYPES[dtype]
    active = active_pattern(pattern, batch, hs, ws, seed)
    query = make_tensor((batch, channels, hq, wq), seed, layout, dtype).to(DEVICE)
    support = make_tensor((batch, channels, hs, ws), seed + 1, layout, dtype).to(DEVICE)
    support = support * active.view(batch, 1, hs, ws).to(DEVICE, dtype)
    out = correlation_into(query, support, nan_buffer((batch, hq, wq, hs, ws), dtype), active.to(DEVICE, flags))
    expected = torch.relu(torch.einsum("bcij,bckl->bijkl", query.cpu().double(), support.cpu().double()))
    assert_close_dtype(out.cpu(), expected, dtype)


def test_correlation_skips_tiles_without_active_positions():
    """No product is computed where no position of a tile is active: with nonzero features left there
    (breaking the caller's guarantee on purpose), those outputs are still exactly zero; the active batch
    element is computed in full."""
    query = make_tensor((2, 4, 3, 3), 3).to(DEVICE)
    support = make_tensor((2, 4, 5, 5), 4).to(DEVICE)
    active = torch.tensor([[False] * 25, [True] * 25], device=DEVICE)
    out = correlation_into(query, support, nan_buffer((2, 3, 3, 5, 5), torch.float32), active)
    expected = torch.relu(torch.einsum("bcij,bckl->bijkl", query.cpu().double(), support.cpu().double()))
    assert expected[0].any(), "the skipped element would have had nonzero correlations"
    assert torch.equal(out[0].cpu(), torch.zeros(3, 3, 5, 5))
    assert_close_dtype(out[1].cpu(), expected[1], torch.float32)
    with pytest.raises(ValueError, match=r"active: expected a \[B, Hs\*Ws\]"):
        correlation_into(query, support, out, active[:, :24])


@settings(max_examples=examples(8))
@given(batch=st.integers(1, 2), channels=st.integers(1, 6), hq=sides, wq=sides, hs=st.integers(1, 9),
       ws=st.integers(1, 9), pattern=st.sampled_from(["random", "none", "one", "block"]),
       upstream=st.sampled_from(["random", "sum"]), seed=seeds)
@example(batch=2, channels=3, hq=3, wq=2, hs=9, ws=9, pattern="block", upstream="random", seed=0).via(
    "a block: support tiles and reduction blocks skipped")
def test_correlation_backward_with_active_positions_matches_autograd(batch, channels, hq, wq, hs, ws, pattern,
                                                                    upstream, seed):
    active = active_pattern(pattern, batch, hs, ws, seed)
    query = make_tensor((batch, channels, hq, wq), seed).to(DEVICE)
    support = (make_tensor((batch, channels, hs, ws), seed + 1) * active.view(batch, 1, hs, ws)).to(DEVICE)
    out = correlation_into(query, support, torch.empty(batch, hq, wq, hs, ws, device=DEVICE), active.to(DEVICE))
    leaves = [t.cpu().double().requires_grad_() for t in (query, support)]
    if upstream == "sum":
        grad = torch.ones((), device=DEVICE).expand(out.shape)
    else:
        grad = make_tensor(out.shape, seed + 2).to(DEVICE)
    grad_corr = torch.ops.aten.threshold_backward(grad.cpu().double(), out.cpu().double(), 0)
    expected = torch.autograd.grad(torch.einsum("bcij,bckl->bijkl", *leaves), leaves, grad_corr)
    got = correlation_backward(grad, out, query, support, active=active.to(DEVICE))
    for name, actual, wanted in zip(("grad_query", "grad_support"), got, expected):
        assert_close_dtype(actual.cpu(), wanted, torch.float32, msg=lambda m, name=name: f"{name}: {m}")


def test_correlation_backward_skips_inactive_support():
    """With no active support position nothing is reduced: given a positive output everywhere (breaking the
    forward's guarantee on purpose), both gradients of that batch element are still exactly zero; the
    fully active element gets the dense gradients."""
    query = make_tensor((2, 3, 2, 3), 5).to(DEVICE)
    support = make_tensor((2, 3, 4, 4), 6).to(DEVICE)
    out = torch.ones(2, 2, 3, 4, 4, device=DEVICE)  # ReLU passes every gradient
    grad = make_tensor(out.shape, 7).to(DEVICE)
    active = torch.tensor([[False] * 16, [True] * 16], device=DEVICE)
    grad_query, grad_support = correlation_backward(grad, out, query, support, active=active)
    g, q, s = grad.cpu().double(), query.cpu().double(), support.cpu().double()
    dense_query = torch.einsum("bijkl,bckl->bcij", g, s)
    dense_support = torch.einsum("bijkl,bcij->bckl", g, q)
    assert dense_query[0].abs().sum() > 0 and dense_support[0].abs().sum() > 0
    assert not grad_query[0].any() and not grad_support[0].any()
    assert_close_dtype(grad_query[1].cpu(), dense_query[1], torch.float32)
    assert_close_dtype(grad_support[1].cpu(), dense_support[1], torch.float32)


@pytest.mark.parametrize("shape", [(0, 3, 2, 2, 4, 4), (2, 3, 0, 2, 4, 4), (2, 3, 2, 2, 4, 0)],
                         ids=["batch0", "empty-query", "empty-support"])
def test_correlation_empty_returns_untouched_out(shape):
    batch, channels, hq, wq, hs, ws = shape
    out = nan_buffer((batch, hq, wq, hs, ws), torch.float32)
    result = correlation_into(torch.zeros(batch, channels, hq, wq, device=DEVICE),
                              torch.zeros(batch, channels, hs, ws, device=DEVICE), out)
    assert result is out and result.shape == (batch, hq, wq, hs, ws)


def test_correlation_bad_input_raises():
    q = torch.zeros(1, 3, 2, 2, device=DEVICE)
    with pytest.raises(ValueError, match="out: expected shape"):
        correlation_into(q, q, torch.empty(1, 2, 2, 2, 3, device=DEVICE))
    with pytest.raises(ValueError, match="support: expected batch and channels"):
        correlation_into(q, torch.zeros(1, 4, 2, 2, device=DEVICE), torch.empty(1, 2, 2, 2, 2, device=DEVICE))
    with pytest.raises(TypeError, match="support: expected dtype"):
        correlation_into(q, q.half(), torch.empty(1, 2, 2, 2, 2, device=DEVICE))
    with pytest.raises(TypeError, match="query: expected a float32"):
        correlation_into(q.long(), q.long(), torch.empty(1, 2, 2, 2, 2, device=DEVICE))


@settings(max_examples=examples(10))
@given(batch=st.integers(1, 2), channels=st.integers(1, 8), hq=sides, wq=sides, hs=sides, ws=sides,
       layout=st.sampled_from(["contiguous", "channels_last", "strided"]), upstream=st.sampled_from(["random", "sum"]),
       dtype=st.sampled_from(sorted(DTYPES)), seed=seeds)
@example(batch=1, channels=1, hq=1, wq=1, hs=1, ws=1, layout="contiguous", upstream="random", dtype="fp32",
         seed=0).via("1x1 maps")
@example(batch=2, channels=6, hq=5, wq=3, hs=4, ws=7, layout="channels_last", upstream="sum", dtype="fp32",
         seed=1).via("stride-0 upstream, channels-last")
@example(batch=2, channels=3, hq=4, wq=7, hs=2, ws=5, layout="strided", upstream="random", dtype="fp16",
         seed=2).via("fp16, non-contiguous")
@example(batch=1, channels=8, hq=6, wq=6, hs=5, ws=5, layout="contiguous", upstream="random", dtype="bf16",
         seed=3).via("bf16")
def test_correlation_backward_matches_autograd(batch, channels, hq, wq, hs, ws, layout, upstream, dtype, seed):
    dtype = DTYPES[dtype]
    query = relayout(make_tensor((batch, channels, hq, wq), seed, "contiguous", dtype).to(DEVICE), layout)
    support = relayout(make_tensor((batch, channels, hs, ws), seed + 1, "contiguous", dtype).to(DEVICE), layout)
    # The forward output as the op saves it: a slice of a stacked tensor.
    stacked = nan_buffer((batch, 2, hq, wq, hs, ws), dtype)
    out = correlation_into(query, support, stacked[:, 1])
    if upstream == "sum":
        grad = torch.ones((), dtype=dtype, device=DEVICE).expand(out.shape)
    else:
        grad = make_tensor((batch, 3, hq, wq, hs, ws), seed + 2, "contiguous", dtype).to(DEVICE)[:, 2]

    leaves = [t.cpu().double().requires_grad_() for t in (query, support)]
    corr = torch.einsum("bcij,bckl->bijkl", *leaves)
    # torch's ReLU rule applied to the saved output: zero where out <= 0.
    grad_corr = torch.ops.aten.threshold_backward(grad.cpu().double(), out.cpu().double(), 0)
    expected = torch.autograd.grad(corr, leaves, grad_corr)

    got = correlation_backward(grad, out, query, support)
    for name, actual, wanted in zip(("grad_query", "grad_support"), got, expected):
        assert actual.dtype == dtype and actual.shape == wanted.shape, name
        assert_close_dtype(actual.cpu(), wanted, dtype, msg=lambda m, name=name: f"{name}: {m}")


def test_correlation_backward_relu_mask_hand_computed():
    # q = (1, 0), (0, 1); s = (1, -1): out = relu(1, -1) = (1, 0), so only the first pair passes grad.
    query = torch.tensor([[1.0, 0.0], [0.0, 1.0]], device=DEVICE).view(1, 2, 1, 2)
    support = torch.tensor([1.0, -1.0], device=DEVICE).view(1, 2, 1, 1)
    out = correlation_into(query, support, nan_buffer((1, 1, 2, 1, 1), torch.float32))
    grad = torch.full((1, 1, 2, 1, 1), 3.0, device=DEVICE)
    grad_query, grad_support = correlation_backward(grad, out, query, support, needs_input_grad=(True, True))
    assert torch.equal(grad_query.cpu().flatten(), torch.tensor([3.0, 0.0, -3.0, 0.0]))  # [c, position]
    assert torch.equal(grad_support.cpu().flatten(), torch.tensor([3.0, 0.0]))  # 3 * q(first position)
    assert correlation_backward(grad, out, query, support, needs_input_grad=(False, True))[0] is None


# ---------------------------------------------------------------------------------------------------
# center_pivot_conv4d_into


def conv_case(batch, cin, cout, shape, kernel_q, kernel_s, bias, seed, dtype, layout):
    """x, weights and biases of a conv test: weights scaled like PyTorch's init (outputs ~ N(0, 1)). The
    "strided" layout gives weights and biases other strides too (views into packed tensors)."""
    x = make_tensor((batch, cin, *shape), seed, layout, dtype)
    generator = torch.Generator().manual_seed(seed + 7)
    params = []
    for kernel, has_bias in zip((kernel_q, kernel_s), bias):
        fan_in = cin * kernel[0] * kernel[1]
        weight = torch.randn(cout, cin, *kernel, generator=generator, dtype=torch.float64) / fan_in ** 0.5
        b = torch.randn(cout, generator=generator, dtype=torch.float64) if has_bias else None
        weight, b = weight.to(DEVICE, dtype), None if b is None else b.to(DEVICE, dtype)
        if layout == "strided":  # after the casts, which would make them contiguous
            weight = torch.stack([weight, torch.full_like(weight, NAN)], dim=-1)[..., 0]
            b = None if b is None else torch.stack([torch.full_like(b, NAN), b], dim=-1)[:, 1]
        params += [weight, b]
    return x.to(DEVICE), params


def conv_expected(x, params, stride, padding):
    return reference.center_pivot_conv4d(x.cpu().double(), *[None if p is None else p.cpu().double() for p in params],
                                         stride, padding)


kernel_sides = st.sampled_from([1, 3, 5])
conv_sides = st.integers(1, 6)


@settings(max_examples=examples(15))
@given(batch=st.integers(1, 2), cin=st.integers(1, 8), cout=st.integers(1, 6),
       shape=st.tuples(conv_sides, conv_sides, conv_sides, conv_sides),
       kernel=st.tuples(kernel_sides, kernel_sides, kernel_sides, kernel_sides),
       stride=st.tuples(st.integers(1, 2), st.integers(1, 2), st.integers(1, 5), st.integers(1, 5)),
       bias=st.tuples(st.booleans(), st.booleans()), layout=st.sampled_from(["contiguous", "channels_last", "strided"]),
       out_layout=st.sampled_from(["contiguous", "slice", "channels_last"]), dtype=st.sampled_from(sorted(DTYPES)),
       nan_input=st.booleans(), seed=seeds)
@example(batch=1, cin=1, cout=1, shape=(1, 1, 1, 1), kernel=(3, 3, 3, 3), stride=(1, 1, 1, 1), bias=(True, True),
         layout="contiguous", out_layout="contiguous", dtype="fp32", nan_input=False, seed=0).via("1x1 maps")
@example(batch=2, cin=3, cout=4, shape=(3, 2, 2, 3), kernel=(3, 3, 5, 5), stride=(1, 1, 5, 5), bias=(True, False),
         layout="channels_last", out_layout="slice", dtype="fp32", nan_input=False, seed=1).via(
             "stride larger than the map, channels-last, output slice")
@example(batch=1, cin=6, cout=5, shape=(5, 4, 6, 6), kernel=(5, 5, 5, 5), stride=(1, 1, 4, 4), bias=(True, True),
         layout="strided", out_layout="channels_last", dtype="fp16", nan_input=False, seed=2).via(
             "HSNet-like squeeze layer, fp16, non-contiguous")
@example(batch=2, cin=2, cout=3, shape=(4, 5, 5, 4), kernel=(1, 3, 3, 5), stride=(2, 1, 2, 3), bias=(False, True),
         layout="contiguous", out_layout="contiguous", dtype="fp32", nan_input=True, seed=3).via(
             "NaN input, non-square kernels, query stride")
@example(batch=2, cin=5, cout=6, shape=(3, 4, 5, 5), kernel=(3, 3, 3, 3), stride=(1, 1, 2, 2), bias=(True, True),
         layout="contiguous", out_layout="slice", dtype="bf16", nan_input=False, seed=4).via("bf16")
def test_conv_matches_reference(batch, cin, cout, shape, kernel, stride, bias, layout, out_layout, dtype,
                                nan_input, seed):
    dtype = DTYPES[dtype]
    kernel_q, kernel_s = kernel[:2], kernel[2:]
    padding = tuple(k // 2 for k in kernel)
    x, params = conv_case(batch, cin, cout, shape, kernel_q, kernel_s, bias, seed, dtype, layout)
    if nan_input:
        # At the pivot of output (0, 0, 0, 0), so both branches read it, and somewhere inside the map.
        x[-1, cin - 1, 0, 0, 0, 0] = NAN
        x[0, 0, shape[0] // 2, shape[1] - 1, shape[2] - 1, shape[3] // 2] = NAN
    expected = conv_expected(x, params, stride, padding)

    out_shape = expected.shape
    if out_layout == "slice":
        # One channel block of a wider NaN tensor: everything outside the slice must stay NaN.
        parent = nan_buffer((batch, cout + 3, *out_shape[2:]), dtype)
        out = parent[:, 1:1 + cout]
    else:
        out = nan_buffer(out_shape, dtype, None if out_layout == "contiguous" else [0, 2, 3, 4, 5, 1])
    result = center_pivot_conv4d_into(x, params[0], params[1], params[2], params[3], stride, padding, out)

    assert result.data_ptr() == out.data_ptr()
    # fp16 outputs of unit scale: the table's fp16 tolerance; reductions are at most 8 * 50 terms.
    assert_close_dtype(out.cpu(), expected, dtype)
    if out_layout == "slice":
        assert parent[:, 0].isnan().all() and parent[:, 1 + cout:].isnan().all(), "wrote outside the slice"
    if nan_input:
        assert out[-1, :, 0, 0, 0, 0].isnan().all()


def test_conv_even_kernel_without_padding():
    # Kernel 2, padding 0, stride 2 on even maps: both branches give ceil(H / 2).
    x, params = conv_case(1, 3, 2, (4, 2, 4, 6), (2, 2), (2, 2), (True, True), 5, torch.float32, "contiguous")
    stride, padding = (2, 2, 2, 2), (0, 0, 0, 0)
    expected = conv_expected(x, params, stride, padding)
    out = center_pivot_conv4d_into(x, *params, stride, padding, nan_buffer(expected.shape, torch.float32))
    assert_close_dtype(out.cpu(), expected, torch.float32)


def test_conv_hand_computed_1x1():
    # 1x1 kernels, stride 1: out = (wq + ws) * x + bq + bs at every position.
    x = torch.arange(2 * 1 * 2 * 1 * 1 * 3, dtype=torch.float32, device=DEVICE).view(2, 1, 2, 1, 1, 3)
    wq, ws = torch.full((1, 1, 1, 1), 2.0, device=DEVICE), torch.full((1, 1, 1, 1), -0.5, device=DEVICE)
    bq, bs = torch.tensor([1.0], device=DEVICE), torch.tensor([0.25], device=DEVICE)
    out = center_pivot_conv4d_into(x, wq, bq, ws, bs, (1, 1, 1, 1), (0, 0, 0, 0),
                                   nan_buffer((2, 1, 2, 1, 1, 3), torch.float32))
    assert torch.equal(out, 1.5 * x + 1.25)


def test_conv_empty_batch_and_no_input_channels():
    out = nan_buffer((0, 4, 3, 3, 2, 2), torch.float32)
    x = torch.zeros(0, 2, 3, 3, 3, 3, device=DEVICE)
    w = torch.zeros(4, 2, 3, 3, device=DEVICE)
    assert center_pivot_conv4d_into(x, w, None, w, None, (1, 1, 2, 2), (1, 1, 1, 1), out) is out
    # Cin == 0: both sums are empty, only the biases remain (as in the reference's einsum).
    x = torch.zeros(1, 0, 2, 2, 2, 2, device=DEVICE)
    w = torch.zeros(4, 0, 3, 3, device=DEVICE)
    bias = torch.arange(4.0, device=DEVICE)
    out = center_pivot_conv4d_into(x, w, bias, w, bias, (1, 1, 1, 1), (1, 1, 1, 1),
                                   nan_buffer((1, 4, 2, 2, 2, 2), torch.float32))
    assert torch.equal(out.cpu(), (2 * torch.arange(4.0)).view(1, 4, 1, 1, 1, 1).expand(1, 4, 2, 2, 2, 2))


def test_conv_bad_input_raises():
    x = torch.zeros(1, 2, 3, 3, 3, 3, device=DEVICE)
    w = torch.zeros(4, 2, 3, 3, device=DEVICE)
    with pytest.raises(ValueError, match="x: expected"):
        center_pivot_conv4d_into(x[0], w, None, w, None, (1,) * 4, (1,) * 4, torch.empty(1))
    with pytest.raises(ValueError, match="out: expected shape"):
        center_pivot_conv4d_into(x, w, None, w, None, (1, 1, 2, 2), (1,) * 4, torch.empty(1, 4, 3, 3, 3, 3))
    with pytest.raises(ValueError, match="weight_support: expected"):
        center_pivot_conv4d_into(x, w, None, w[:, :1], None, (1,) * 4, (1,) * 4, torch.empty(1, 4, 3, 3, 3, 3))
    with pytest.raises(ValueError, match="bias_query: expected shape"):
        center_pivot_conv4d_into(x, w, torch.zeros(3), w, None, (1,) * 4, (1,) * 4, torch.empty(1, 4, 3, 3, 3, 3))
    with pytest.raises(ValueError, match="stride: expected 4 ints"):
        center_pivot_conv4d_into(x, w, None, w, None, (1, 1), (1,) * 4, torch.empty(1, 4, 3, 3, 3, 3))


# ---------------------------------------------------------------------------------------------------
# int64 indexing


def test_needs_int64_counts_strided_reach():
    from hypertriton.kernels._config import needs_int64

    assert not needs_int64(torch.empty(2, 3, 1000, 1000, device="meta"))
    assert needs_int64(torch.empty(3, 2**30, device="meta"))  # last offset 3 * 2^30 - 1
    assert needs_int64(torch.empty(4, device="meta"), extra=2**31)


@pytest.fixture
def fp32_precision_switches():
    """PyTorch's TF32 switches as they were, restored after the test through the older one (which sets
    both; resetting the newer one to "none" would leave reading allow_tf32 raising for later tests)."""
    matmul = torch.backends.cuda.matmul
    saved = (torch.backends.fp32_precision, matmul.allow_tf32)
    yield matmul
    torch.backends.fp32_precision, matmul.allow_tf32 = saved


@pytest.mark.skipif(not hasattr(torch.backends.cuda.matmul, "fp32_precision"),
                    reason="this PyTorch has only allow_tf32")
def test_dot_precision_follows_either_tf32_switch(monkeypatch, fp32_precision_switches):
    # Reading allow_tf32 raises once the newer fp32_precision switch is used: every fp32 launch on a GPU
    # used to fail then (the interpreter never reads the switch).
    from hypertriton.kernels import _config

    matmul = fp32_precision_switches
    monkeypatch.setattr(_config, "INTERPRETED", False)
    for setting, expected in [(lambda: setattr(matmul, "allow_tf32", True), "tf32"),
                              (lambda: setattr(matmul, "allow_tf32", False), "ieee"),
                              (lambda: setattr(matmul, "fp32_precision", "tf32"), "tf32"),
                              (lambda: setattr(matmul, "fp32_precision", "ieee"), "ieee"),
                              (lambda: setattr(torch.backends, "fp32_precision", "tf32"), "tf32")]:
        torch.backends.fp32_precision, matmul.fp32_precision = "none", "none"
        setting()
        assert _config.dot_precision(torch.float32) == expected, expected
        assert _config.dot_precision(torch.bfloat16) == "tf32"  # ignored by Triton for 16-bit inputs
    monkeypatch.setattr(_config, "INTERPRETED", True)
    assert _config.dot_precision(torch.float32) == "ieee"  # the interpreter computes IEEE fp32 only


def test_int64_index_path_matches_reference(monkeypatch):
    """The int64 variants of both kernels (used past 2^31 on GPUs) on tiny inputs."""
    from hypertriton.kernels import center_pivot_conv4d, hypercorrelation

    for module in (hypercorrelation, center_pivot_conv4d):
        monkeypatch.setattr(module, "needs_int64", lambda *tensors, extra=0: True)
    query = make_tensor((2, 5, 3, 4), 0, "channels_last").to(DEVICE)
    support = make_tensor((2, 5, 6, 2), 1, "strided").to(DEVICE)
    stacked = nan_buffer((2, 2, 3, 4, 6, 2), torch.float32)
    correlation_into(query, support, stacked[:, 1])
    expected = torch.relu(torch.einsum("bcij,bckl->bijkl", query.cpu().double(), support.cpu().double()))
    assert_close_dtype(stacked[:, 1].cpu(), expected, torch.float32)
    assert stacked[:, 0].isnan().all()
    leaves = [t.cpu().double().requires_grad_() for t in (query, support)]
    grad = make_tensor(expected.shape, 3, "strided").to(DEVICE)
    grad_corr = torch.ops.aten.threshold_backward(grad.cpu().double(), stacked[:, 1].cpu().double(), 0)
    wanted = torch.autograd.grad(torch.einsum("bcij,bckl->bijkl", *leaves), leaves, grad_corr)
    for actual, want in zip(correlation_backward(grad, stacked[:, 1], query, support), wanted):
        assert_close_dtype(actual.cpu(), want, torch.float32)

    x, params = conv_case(2, 3, 4, (4, 3, 5, 6), (3, 3), (5, 5), (True, True), 2, torch.float32, "strided")
    stride, padding = (1, 2, 2, 3), (1, 1, 2, 2)
    expected = conv_expected(x, params, stride, padding)
    out = center_pivot_conv4d_into(x, *params, stride, padding, nan_buffer(expected.shape, torch.float32))
    assert_close_dtype(out.cpu(), expected, torch.float32)


# Offsets past 2^31 for real, on any device: a tiny tensor's view with one far stride into a large
# allocation of which only the view's elements are ever touched (the pages behind the rest are never
# backed), so this runs under the interpreter too. The far stride stays below 2^31, so Triton passes it
# as int32 and only the kernel's own int64 index math keeps ``index * stride`` from wrapping; a wrapped
# offset lands outside the view: a wrong value, or a crash (the interpreter's int32 arithmetic wraps).

PAST_INT32 = 2**31 + 2**16  # past needs_int64's margin, so the last offset is truly out of int32 range


def far_view(values: torch.Tensor, dim: int) -> torch.Tensor:
    """``values`` copied into a view whose ``dim`` has a stride taking its last index past 2^31
    elements (the other dims packed below that stride, last dim innermost)."""
    size = values.shape[dim]
    assert size >= 3, "with 2 entries the far stride itself would pass 2^31 (an int64 argument)"
    far_stride = -(-PAST_INT32 // (size - 1))
    assert far_stride < 2**31
    strides, packed = [0] * values.dim(), 1
    for d in reversed(range(values.dim())):
        if d != dim:
            strides[d], packed = packed, packed * values.shape[d]
    strides[dim] = far_stride
    storage = torch.empty((size - 1) * far_stride + packed, dtype=values.dtype, device=values.device)
    view = storage.as_strided(values.shape, strides)
    view.copy_(values)
    return view


def far_cases(shapes: dict) -> list:
    """pytest params: every (tensor name, dim) of ``shapes`` (dims all >= 3), with readable ids."""
    return [pytest.param((name, dim), id=f"{name}-dim{dim}") for name, shape in shapes.items()
            for dim in range(len(shape))]


CORRELATION_SHAPES = {"query": (3, 3, 3, 4), "support": (3, 3, 4, 3), "out": (3, 3, 4, 4, 3)}


def correlation_case():
    """The inputs of a correlation test (``{"query": ..., "support": ...}``) and the expected output
    (float64)."""
    query = make_tensor(CORRELATION_SHAPES["query"], 20).to(DEVICE)
    support = make_tensor(CORRELATION_SHAPES["support"], 21).to(DEVICE)
    tensors = {"query": query, "support": support}
    expected = torch.relu(torch.einsum("bcij,bckl->bijkl", query.cpu().double(), support.cpu().double()))
    return tensors, expected


@pytest.mark.parametrize("far", far_cases(CORRELATION_SHAPES))
def test_correlation_offsets_past_int32(far):
    tensors, expected = correlation_case()
    tensors["out"] = torch.full(expected.shape, NAN, device=DEVICE)
    tensors[far[0]] = far_view(tensors[far[0]], far[1])
    out = correlation_into(tensors["query"], tensors["support"], tensors["out"])
    assert_close_dtype(out.cpu(), expected, torch.float32)


@pytest.mark.parametrize("far", far_cases({**CORRELATION_SHAPES, "grad_out": CORRELATION_SHAPES["out"]}))
def test_correlation_backward_offsets_past_int32(far):
    tensors, expected_out = correlation_case()
    leaves = [tensors[name].cpu().double().requires_grad_() for name in ("query", "support")]
    forward = torch.einsum("bcij,bckl->bijkl", *leaves)
    tensors["out"] = expected_out.float().to(DEVICE)
    tensors["grad_out"] = make_tensor(expected_out.shape, 24).to(DEVICE)
    grad_corr = torch.ops.aten.threshold_backward(tensors["grad_out"].cpu().double(), expected_out, 0)
    expected = torch.autograd.grad(forward, leaves, grad_corr)
    tensors[far[0]] = far_view(tensors[far[0]], far[1])
    got = correlation_backward(tensors["grad_out"], tensors["out"], tensors["query"], tensors["support"])
    for name, actual, wanted in zip(("grad_query", "grad_support"), got, expected):
        assert_close_dtype(actual.cpu(), wanted, torch.float32, msg=lambda m, name=name: f"{name}: {m}")


# batch, Cin, Cout 3; a support stride of 2 along one dim: the output is (3, 3, 3, 4) too.
CONV_SHAPES = {"x": (3, 3, 3, 3, 5, 4), "out": (3, 3, 3, 3, 3, 4)}
CONV_STRIDE, CONV_PADDING = (1, 1, 2, 1), (1, 1, 1, 1)


@pytest.mark.parametrize("far", far_cases(CONV_SHAPES))
def test_conv_offsets_past_int32(far):
    x, params = conv_case(3, 3, 3, CONV_SHAPES["x"][2:], (3, 3), (3, 3), (True, True), 25, torch.float32,
                          "contiguous")
    expected = conv_expected(x, params, CONV_STRIDE, CONV_PADDING)
    tensors = {"x": x, "out": torch.full(expected.shape, NAN, device=DEVICE)}
    tensors[far[0]] = far_view(tensors[far[0]], far[1])
    out = center_pivot_conv4d_into(tensors["x"], *params, CONV_STRIDE, CONV_PADDING, tensors["out"])
    assert_close_dtype(out.cpu(), expected, torch.float32)


@pytest.mark.parametrize("far", far_cases({"x": CONV_SHAPES["x"], "grad_out": CONV_SHAPES["out"]}))
def test_conv_backward_offsets_past_int32(far):
    x, params = conv_case(3, 3, 3, CONV_SHAPES["x"][2:], (3, 3), (3, 3), (True, True), 26, torch.float32,
                          "contiguous")
    leaves = [t.cpu().double().requires_grad_() for t in (x, *params)]
    out = reference.center_pivot_conv4d(*leaves, CONV_STRIDE, CONV_PADDING)
    tensors = {"x": x, "grad_out": make_tensor(out.shape, 27).to(DEVICE)}
    expected = torch.autograd.grad(out, leaves, tensors["grad_out"].cpu().double())
    tensors[far[0]] = far_view(tensors[far[0]], far[1])
    got = center_pivot_conv4d_backward(tensors["grad_out"], tensors["x"], params[0], params[2], CONV_STRIDE,
                                       CONV_PADDING)
    names = ("grad_x", "grad_weight_query", "grad_bias_query", "grad_weight_support", "grad_bias_support")
    for name, actual, wanted in zip(names, got, expected):
        assert_close_dtype(actual.cpu(), wanted, torch.float32, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("far", ["out", "support"])
def test_fused_support_branch_offsets_past_int32(far):
    """The fused kernel takes contiguous tensors only, so here one of them truly has 2^31 elements: the
    output (16 channels x 3 query positions x a 3-row support map, millions wide) or the support features
    (1024 channels over such a map). Only the active windows' taps and outputs are ever touched."""
    from hypertriton.kernels.fused_first_layer import support_branch_into

    cout, nq, height = 16, 3, 3
    channels = 3 if far == "out" else 1024
    # The last output entry, or the last channel's row of support features, lies past 2^31.
    width = PAST_INT32 // (cout * nq * height if far == "out" else (channels - 1) * height) + 1
    generator = torch.Generator().manual_seed(30)
    query = torch.randn(1, 1, channels, nq, generator=generator).to(DEVICE)
    weight = torch.randn(cout, 1, 3, 3, generator=generator).to(DEVICE)
    support = torch.empty(1, 1, channels, height * width, device=DEVICE)
    out = torch.empty(1, cout, nq, height * width, device=DEVICE)
    assert max(t.numel() for t in (support, out)) > PAST_INT32
    # Stride 1, padding 1: window (u, v) is centred on support position (u, v); its taps are all that is read.
    windows = [(0, 0), (1, width // 2), (2, width - 1)]
    taps = {}
    for u, v in windows:
        taps[u, v] = [(u + dy) * width + v + dx if 0 <= u + dy < height and 0 <= v + dx < width else None
                      for dy in (-1, 0, 1) for dx in (-1, 0, 1)]
        for position in taps[u, v]:
            if position is not None:
                support[0, 0, :, position] = torch.randn(channels, generator=generator).to(DEVICE)
        out[0, :, :, u * width + v] = torch.randn(cout, nq, generator=generator).to(DEVICE)  # prefilled
    expected = {}
    q, w = query[0, 0].cpu().double(), weight[:, 0].flatten(1).cpu().double()  # [C, NQ], [Cout, 9]
    for (u, v), positions in taps.items():
        columns = [support[0, 0, :, p].cpu().double() if p is not None else torch.zeros(channels, dtype=torch.float64)
                   for p in positions]
        corr = torch.relu(q.t() @ torch.stack(columns, 1))  # [NQ, 9]; padding taps are zero
        expected[u, v] = out[0, :, :, u * width + v].cpu().double() + w @ corr.t()

    flat = torch.tensor([[u * width + v for u, v in windows]], dtype=torch.int32, device=DEVICE)
    support_branch_into(query, support, weight, flat, torch.tensor([len(windows)], device=DEVICE), (height, width),
                        1, 1, out)
    for (u, v), wanted in expected.items():
        assert_close_dtype(out[0, :, :, u * width + v].cpu(), wanted, torch.float32,
                           msg=lambda m, u=u, v=v: f"window {(u, v)}: {m}")


def test_batches_beyond_the_launch_grid(monkeypatch):
    """Batches larger than CUDA's grid limit run in slices of it: with the limit set to 2, a batch of 5
    runs as 2 + 2 + 1, forward and backward, and gives the references' results."""
    from hypertriton.kernels import center_pivot_conv4d, hypercorrelation

    monkeypatch.setattr(hypercorrelation, "MAX_GRID_Y", 2)
    monkeypatch.setattr(center_pivot_conv4d, "MAX_GRID_Z", 2)
    query = make_tensor((5, 3, 2, 3), 40, "channels_last").to(DEVICE)
    support = make_tensor((5, 3, 3, 2), 41, "strided").to(DEVICE)
    leaves = [t.cpu().double().requires_grad_() for t in (query, support)]
    forward = torch.einsum("bcij,bckl->bijkl", *leaves)
    out = correlation_into(query, support, nan_buffer(forward.shape, torch.float32))
    assert_close_dtype(out.cpu(), torch.relu(forward.detach()), torch.float32)
    grad = make_tensor(forward.shape, 42).to(DEVICE)
    grad_corr = torch.ops.aten.threshold_backward(grad.cpu().double(), out.cpu().double(), 0)
    for actual, wanted in zip(correlation_backward(grad, out, query, support),
                              torch.autograd.grad(forward, leaves, grad_corr)):
        assert_close_dtype(actual.cpu(), wanted, torch.float32)

    x, params = conv_case(5, 2, 3, (3, 2, 4, 3), (3, 3), (3, 3), (True, True), 43, torch.float32, "strided")
    stride, padding = (1, 1, 2, 1), (1, 1, 1, 1)
    leaves = [t.cpu().double().requires_grad_() for t in (x, *params)]
    expected = reference.center_pivot_conv4d(*leaves, stride, padding)
    out = center_pivot_conv4d_into(x, *params, stride, padding, nan_buffer(expected.shape, torch.float32))
    assert_close_dtype(out.cpu(), expected.detach(), torch.float32)
    grad = make_tensor(expected.shape, 44).to(DEVICE)
    got = center_pivot_conv4d_backward(grad, x, params[0], params[2], stride, padding)
    for actual, wanted in zip(got, torch.autograd.grad(expected, leaves, grad.cpu().double())):
        assert_close_dtype(actual.cpu(), wanted, torch.float32)


# ---------------------------------------------------------------------------------------------------
# center_pivot_conv4d_backward


@settings(max_examples=examples(8))
@given(batch=st.integers(1, 2), cin=st.integers(1, 5), cout=st.integers(1, 5),
       shape=st.tuples(*[st.integers(1, 5)] * 4), kernel=st.tuples(*[kernel_sides] * 4),
       stride=st.tuples(st.integers(1, 2), st.integers(1, 2), st.integers(1, 5), st.integers(1, 5)),
       layout=st.sampled_from(["contiguous", "channels_last", "strided"]), upstream=st.sampled_from(["random", "sum"]),
       dtype=st.sampled_from(sorted(DTYPES)), nan_input=st.booleans(), seed=seeds)
@example(batch=1, cin=1, cout=1, shape=(1, 1, 1, 1), kernel=(3, 3, 3, 3), stride=(1, 1, 1, 1), layout="contiguous",
         upstream="random", dtype="fp32", nan_input=False, seed=0).via("1x1 maps")
@example(batch=2, cin=3, cout=4, shape=(3, 2, 2, 3), kernel=(3, 3, 5, 5), stride=(1, 1, 5, 5), layout="channels_last",
         upstream="sum", dtype="fp32", nan_input=False, seed=1).via("stride larger than the map, stride-0 upstream")
@example(batch=1, cin=4, cout=5, shape=(4, 4, 5, 5), kernel=(5, 5, 5, 5), stride=(1, 1, 4, 4), layout="strided",
         upstream="random", dtype="fp16", nan_input=False, seed=2).via("HSNet-like squeeze layer, fp16")
@example(batch=2, cin=2, cout=3, shape=(4, 5, 5, 4), kernel=(1, 3, 3, 5), stride=(2, 1, 2, 3), layout="contiguous",
         upstream="random", dtype="fp32", nan_input=True, seed=3).via("NaN input, non-square kernels, query stride")
@example(batch=2, cin=3, cout=4, shape=(3, 4, 4, 5), kernel=(3, 3, 3, 3), stride=(1, 1, 2, 2), layout="channels_last",
         upstream="random", dtype="bf16", nan_input=False, seed=4).via("bf16")
def test_conv_backward_matches_autograd(batch, cin, cout, shape, kernel, stride, layout, upstream, dtype, nan_input,
                                        seed):
    dtype = DTYPES[dtype]
    kernel_q, kernel_s = kernel[:2], kernel[2:]
    padding = tuple(k // 2 for k in kernel)
    x, params = conv_case(batch, cin, cout, shape, kernel_q, kernel_s, (True, True), seed, dtype, layout)
    if nan_input:
        x[-1, cin - 1, 0, 0, 0, 0] = NAN
    leaves = [t.cpu().double().requires_grad_() for t in (x, *params)]
    expected_out = reference.center_pivot_conv4d(*leaves, stride, padding)
    if upstream == "sum":  # what .sum() sends back: one element broadcast with stride 0
        grad = torch.ones((), dtype=dtype, device=DEVICE).expand(expected_out.shape)
    else:
        grad = make_tensor(expected_out.shape, seed + 3, "contiguous", dtype).to(DEVICE)
    expected = torch.autograd.grad(expected_out, leaves, grad.cpu().double())

    got = center_pivot_conv4d_backward(grad, x, params[0], params[2], stride, padding)
    names = ("grad_x", "grad_weight_query", "grad_bias_query", "grad_weight_support", "grad_bias_support")
    for name, actual, wanted in zip(names, got, expected):
        assert actual.dtype == dtype and actual.shape == wanted.shape, name
        assert_close_dtype(actual.cpu(), wanted, dtype, msg=lambda m, name=name: f"{name}: {m}")
    if nan_input:
        assert got[1][:, cin - 1].isnan().any() and not got[0].isnan().any()


def test_conv_backward_needs_and_degenerate_shapes():
    x, params = conv_case(1, 2, 3, (3, 3, 4, 4), (3, 3), (3, 3), (True, True), 0, torch.float32, "contiguous")
    # Seeded: the global generator's state depends on which tests a worker ran before.
    grad = torch.randn(1, 3, 3, 3, 2, 2, generator=torch.Generator().manual_seed(0)).to(DEVICE)
    # Bias gradients are sums of 54 terms: compared with the float64 sum at fp32's tolerance (torch.sum in
    # fp32 against the kernel's own order was 1.2e-7 apart on some draws, past allclose's default 8.9e-8).
    bias_grad = grad.cpu().double().sum(dim=(0, 2, 3, 4, 5))
    got = center_pivot_conv4d_backward(grad, x, params[0], params[2], (1, 1, 2, 2), (1, 1, 1, 1),
                                       needs_input_grad=(False, True, False, False, True))
    assert got[0] is None and got[2] is None and got[3] is None
    assert_close_dtype(got[4].cpu(), bias_grad, torch.float32)
    # No input channels: weight gradients are empty, bias gradients still sum grad_out.
    x = torch.zeros(1, 0, 3, 3, 4, 4, device=DEVICE)
    w = torch.zeros(3, 0, 3, 3, device=DEVICE)
    got = center_pivot_conv4d_backward(grad, x, w, w, (1, 1, 2, 2), (1, 1, 1, 1))
    assert got[0].shape == x.shape and got[1].shape == w.shape
    assert_close_dtype(got[2].cpu(), bias_grad, torch.float32)
    # Empty batch: zero weight and bias gradients.
    got = center_pivot_conv4d_backward(grad[:0], x[:0].new_zeros(0, 2, 3, 3, 4, 4), params[0], params[2],
                                       (1, 1, 2, 2), (1, 1, 1, 1))
    assert got[0].shape == (0, 2, 3, 3, 4, 4) and not got[1].any() and not got[2].any()
    with pytest.raises(ValueError, match="grad_out: expected shape"):
        center_pivot_conv4d_backward(grad[..., :1], x, w, w, (1, 1, 2, 2), (1, 1, 1, 1))


def test_conv_backward_split_reduction_and_int64(monkeypatch):
    """Several splits of the weight-gradient reduction (as on GPUs) and the int64 index variants."""
    from hypertriton.kernels import center_pivot_conv4d

    monkeypatch.setattr(center_pivot_conv4d, "MIN_SPLIT", 1)  # 256-element splits: 4 here
    monkeypatch.setattr(center_pivot_conv4d, "needs_int64", lambda *tensors, extra=0: True)
    x, params = conv_case(2, 3, 4, (4, 3, 6, 6), (3, 3), (5, 3), (True, True), 4, torch.float32, "strided")
    stride, padding = (1, 1, 1, 1), (1, 1, 2, 1)
    leaves = [t.cpu().double().requires_grad_() for t in (x, *params)]
    out = reference.center_pivot_conv4d(*leaves, stride, padding)
    assert out[:, 0].numel() > 3 * 256  # 4 splits, the last one partly masked
    grad = make_tensor(out.shape, 5, "channels_last").to(DEVICE)
    expected = torch.autograd.grad(out, leaves, grad.cpu().double())
    got = center_pivot_conv4d_backward(grad, x, params[0], params[2], stride, padding)
    for actual, wanted in zip(got, expected):
        assert_close_dtype(actual.cpu(), wanted, torch.float32)


def test_conv_rejects_negative_padding_and_zero_stride():
    x = torch.zeros(1, 2, 3, 3, 3, 3, device=DEVICE)
    w = torch.zeros(4, 2, 1, 1, device=DEVICE)
    out = torch.empty(1, 4, 3, 3, 3, 3, device=DEVICE)
    with pytest.raises(ValueError, match="padding: expected non-negative"):
        center_pivot_conv4d_into(x, w, None, w, None, (1,) * 4, (0, 0, -1, 0), out)
    with pytest.raises(ValueError, match="stride: expected positive"):
        center_pivot_conv4d_backward(out, x, w, w, (1, 0, 1, 1), (0,) * 4)


# ---------------------------------------------------------------------------------------------------
# GPU compilation without a GPU

REGISTER_TOOL = Path(__file__).resolve().parents[1] / "bench" / "kernel_registers.py"


@pytest.mark.slow
def test_kernels_compile_for_hopper_without_spilling():
    """CI has no GPU, and the interpreter never builds what only a GPU sees (tensor-core dot layouts,
    the int64 variants' types, register allocation): compile every GPU config of every kernel down to
    an sm_90 cubin with Triton's bundled ptxas (``bench/kernel_registers.py``), in fp32 (IEEE and TF32
    products), bf16 and fp16 (int64 indexing). A config that spills registers in its inner loop runs
    far below the GPU's rate; with int32 indexing none may spill more than a few registers."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas_version

        get_ptxas_version(90)  # runs the bundled ptxas once
    except Exception as error:  # noqa: BLE001 (any failure to find the tool means: cannot check here)
        pytest.skip(f"Triton's CUDA backend or its ptxas is unavailable: {error}")
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, str(REGISTER_TOOL), "--check", "--jobs", "2"], env=env,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    # Seven kernels (the correlation backward's two sides count apart), 35 GPU configs, 4 variants each.
    assert "compiled 140 of 140 (kernel, variant, config) for sm_90: 35 configs; 0 failed; 0 int32" in result.stdout, \
        result.stdout[-4000:]
