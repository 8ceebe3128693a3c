"""hypertriton.center_pivot_conv4d and CenterPivotConv4d on every backend against the einsum reference."""

from unittest import mock

import pytest
import torch
from helpers import (BACKEND_IDS, LAYOUTS, assert_gradients_match, available_backends, check_second_derivatives,
                     make_tensor, seeds)
from hypothesis import example, given
from hypothesis import strategies as st

import hypertriton
from hypertriton import reference
from hypertriton.ops import center_pivot_conv4d as cp_ops
from hypertriton.ops.layout import is_query_major, to_query_major
from hypertriton.testing import assert_close_dtype

DEVICES = dict(available_backends())


def weights(cout, cin, kernels, seed, bias, dtype=torch.float32, device="cpu"):
    wq = make_tensor((cout, cin, *kernels[:2]), seed, dtype=dtype, device=device)
    ws = make_tensor((cout, cin, *kernels[2:]), seed + 1, dtype=dtype, device=device)
    bq = make_tensor((cout,), seed + 2, dtype=dtype, device=device) if bias else None
    bs = make_tensor((cout,), seed + 3, dtype=dtype, device=device) if bias else None
    return wq, bq, ws, bs


def expected(x, wq, bq, ws, bs, stride):
    d = lambda t: None if t is None else t.double().cpu()  # noqa: E731
    padding = tuple(k // 2 for k in (*wq.shape[-2:], *ws.shape[-2:]))
    return reference.center_pivot_conv4d(d(x), d(wq), d(bq), d(ws), d(bs), stride, padding)


odd_kernels = st.sampled_from([1, 3, 5])


@pytest.mark.parametrize("backend", BACKEND_IDS)
@given(batch=st.integers(1, 3), cin=st.integers(1, 8), cout=st.integers(1, 8),
       sizes=st.tuples(*[st.integers(1, 9)] * 4), kernels=st.tuples(odd_kernels, odd_kernels, odd_kernels, odd_kernels),
       stride=st.tuples(st.integers(1, 2), st.integers(1, 2), st.integers(1, 5), st.integers(1, 5)),
       bias=st.booleans(), layout=st.sampled_from(LAYOUTS), dtype=st.sampled_from([torch.float32, torch.float16]),
       seed=seeds)
@example(batch=1, cin=1, cout=1, sizes=(1, 1, 1, 1), kernels=(1, 1, 1, 1), stride=(1, 1, 1, 1), bias=True,
         layout="contiguous", dtype=torch.float32, seed=0)
@example(batch=2, cin=3, cout=4, sizes=(5, 5, 7, 7), kernels=(3, 3, 3, 3), stride=(1, 1, 2, 2), bias=True,
         layout="channels_last", dtype=torch.float32, seed=1)
@example(batch=1, cin=8, cout=8, sizes=(3, 2, 3, 4), kernels=(5, 5, 5, 5), stride=(1, 1, 5, 5), bias=False,
         layout="strided", dtype=torch.float16, seed=2)
@example(batch=3, cin=2, cout=3, sizes=(9, 8, 6, 5), kernels=(5, 3, 1, 3), stride=(2, 1, 4, 3), bias=True,
         layout="contiguous", dtype=torch.float32, seed=3)
@example(batch=2, cin=4, cout=3, sizes=(4, 3, 2, 2), kernels=(3, 3, 3, 3), stride=(1, 1, 1, 1), bias=True,
         layout="channels_last", dtype=torch.float32, seed=4)  # query-major: support map as one matrix product
@example(batch=1, cin=3, cout=2, sizes=(3, 3, 4, 4), kernels=(3, 3, 3, 3), stride=(1, 1, 5, 5), bias=False,
         layout="channels_last", dtype=torch.float16, seed=5)  # query-major, stride past the map
@example(batch=2, cin=3, cout=5, sizes=(4, 3, 5, 4), kernels=(3, 1, 3, 3), stride=(1, 1, 1, 1), bias=True,
         layout="channels_last", dtype=torch.float32, seed=6)  # query-major, support stride 1: 3D conv + conv2d
@example(batch=2, cin=3, cout=4, sizes=(3, 3, 4, 4), kernels=(3, 3, 3, 3), stride=(1, 1, 2, 2), bias=True,
         layout="channels_last", dtype=torch.float32, seed=7)  # query-major, 4x4 -> 2x2: products per kernel row
@example(batch=1, cin=2, cout=3, sizes=(2, 3, 3, 5), kernels=(1, 3, 3, 3), stride=(1, 1, 3, 3), bias=False,
         layout="channels_last", dtype=torch.float16, seed=8)  # the same, 3x5 -> 1x2, no bias
@example(batch=2, cin=3, cout=2, sizes=(4, 3, 2, 2), kernels=(3, 3, 1, 1), stride=(1, 1, 1, 1), bias=True,
         layout="channels_last", dtype=torch.float32, seed=9)  # the same, added into the query branch's output
def test_matches_reference(backend, batch, cin, cout, sizes, kernels, stride, bias, layout, dtype, seed):
    device = DEVICES[backend]
    x = make_tensor((batch, cin, *sizes), seed, layout, dtype, device)
    wq, bq, ws, bs = weights(cout, cin, kernels, seed + 10, bias, dtype, device)
    got = hypertriton.center_pivot_conv4d(x, wq, bq, ws, bs, stride, backend=backend)
    want = expected(x, wq, bq, ws, bs, stride)
    assert got.shape == want.shape and got.dtype == dtype
    taps = cin * (kernels[0] * kernels[1] + kernels[2] * kernels[3])
    assert_close_dtype(got.cpu(), want, dtype, scale=max(1.0, taps / 25))


@pytest.mark.parametrize("backend", BACKEND_IDS)
@pytest.mark.parametrize("upstream", ["random", "sum"])
@pytest.mark.parametrize("stride, layout, support", [
    ((1, 1, 2, 2), "contiguous", (6, 5)),
    ((2, 1, 3, 1), "contiguous", (6, 5)),
    # query-major (the torch backend's learner layout): strided support branch, and with support stride 1
    # the 3D-conv query branch with the support branch added in place, as a conv and as a matrix product
    ((1, 1, 2, 2), "channels_last", (6, 5)),
    ((1, 1, 1, 1), "channels_last", (6, 5)),
    ((1, 1, 1, 1), "channels_last", (2, 3)),
])
def test_gradients_match_reference(backend, upstream, stride, layout, support):
    device = DEVICES[backend]
    x = make_tensor((2, 3, 5, 4, *support), 0, layout, device=device).requires_grad_()
    params = [p.requires_grad_() for p in weights(4, 3, (3, 3, 5, 3), 1, True, device=device)]
    ref_inputs = [t.detach().double().cpu().requires_grad_() for t in (x, *params)]
    out = hypertriton.center_pivot_conv4d(x, *params, stride, backend=backend)
    ref_out = expected(*ref_inputs, stride)
    assert_gradients_match([out], [ref_out], [x, *params], ref_inputs, upstream, scale=20)


GRADIENT_CASES = {  # batch, cin, cout, map sizes, kernels, stride, bias, layout
    "batch1-1x1-kernel3": (1, 2, 3, (1, 1, 1, 1), (3, 3, 3, 3), (1, 1, 1, 1), True, "contiguous"),
    "support-stride-past-the-map": (2, 3, 2, (3, 4, 3, 4), (3, 3, 5, 5), (1, 1, 5, 5), True, "contiguous"),
    "query-stride-past-the-map": (1, 2, 2, (1, 3, 4, 4), (3, 3, 3, 3), (2, 2, 2, 2), True, "contiguous"),
    "strided-no-bias": (2, 3, 4, (5, 4, 6, 5), (3, 3, 5, 3), (1, 1, 2, 2), False, "strided"),
    "query-major-no-bias": (2, 3, 4, (4, 3, 2, 2), (3, 3, 3, 3), (1, 1, 1, 1), False, "channels_last"),
    # 1x1 kernels on both branches: the Triton backward returned both weight gradients as views of one
    # buffer, which a custom op refuses (it raised as soon as weight gradients were asked for)
    "1x1-kernels": (2, 3, 4, (3, 2, 4, 4), (1, 1, 1, 1), (1, 1, 1, 1), True, "contiguous"),
    "1x1-kernels-support-stride": (1, 2, 3, (2, 3, 5, 4), (1, 1, 1, 1), (1, 1, 2, 2), False, "contiguous"),
}


@pytest.mark.parametrize("backend", BACKEND_IDS)
@pytest.mark.parametrize("upstream", ["random", "sum"])
@pytest.mark.parametrize("case", list(GRADIENT_CASES))
def test_gradients_at_the_edge_cases(backend, upstream, case):
    batch, cin, cout, sizes, kernels, stride, bias, layout = GRADIENT_CASES[case]
    device = DEVICES[backend]
    x = make_tensor((batch, cin, *sizes), 0, layout, device=device).requires_grad_()
    params = [p if p is None else p.requires_grad_() for p in weights(cout, cin, kernels, 1, bias, device=device)]
    leaves = [t for t in (x, *params) if t is not None]
    ref_inputs = [None if t is None else t.detach().double().cpu().requires_grad_() for t in (x, *params)]
    out = hypertriton.center_pivot_conv4d(x, *params, stride, backend=backend)
    ref_out = expected(*ref_inputs, stride)
    assert_close_dtype(out.detach().cpu(), ref_out.detach(), torch.float32, scale=4)
    assert_gradients_match([out], [ref_out], leaves, [t for t in ref_inputs if t is not None], upstream, scale=20)


def test_a_support_window_wholly_in_the_padding_holds_the_biases():
    # Legal padding (never HSNet's) puts a support window outside the map: the torch backend's query-major
    # path by tap products must give it the biases (an output of 0 there passed every other test).
    x = to_query_major(make_tensor((2, 3, 3, 3, 4, 4), 2))
    wq, bq, ws, bs = weights(2, 3, (3, 3, 1, 1), 3, True)
    stride, padding = (1, 1, 8, 8), (1, 1, 1, 1)
    with torch.no_grad():
        got = hypertriton.center_pivot_conv4d(x, wq, bq, ws, bs, stride, padding, backend="torch")
    want = reference.center_pivot_conv4d(x.double(), wq.double(), bq.double(), ws.double(), bs.double(), stride,
                                         padding)
    assert got.shape == want.shape == (2, 2, 3, 3, 1, 1)
    assert_close_dtype(got, want, torch.float32)


@pytest.mark.parametrize("backend", BACKEND_IDS)
def test_nan_lands_where_reference_puts_it(backend):
    device = DEVICES[backend]
    x = make_tensor((1, 2, 5, 5, 6, 6), 3, device=device)
    x[0, 1, 2, 2, 3, 3] = float("nan")
    params = weights(3, 2, (3, 3, 3, 3), 4, True, device=device)
    got = hypertriton.center_pivot_conv4d(x, *params, (1, 1, 2, 2), backend=backend).cpu()
    want = expected(x, *params, (1, 1, 2, 2))
    assert torch.equal(got.isnan(), want.isnan()) and got.isnan().any()
    assert_close_dtype(got, want, torch.float32)


@pytest.mark.parametrize("backend", BACKEND_IDS)
def test_empty_batch(backend):
    device = DEVICES[backend]
    x = torch.zeros(0, 2, 4, 4, 5, 5, device=device)
    out = hypertriton.center_pivot_conv4d(x, *weights(3, 2, (3, 3, 3, 3), 0, True, device=device), (1, 1, 2, 2),
                                          backend=backend)
    assert out.shape == (0, 3, 4, 4, 3, 3)


@pytest.mark.parametrize("backend", BACKEND_IDS)
def test_module_regressions_of_the_original(backend):
    """The original cached its pruning indices (wrong after a size change) and squeezed batch 1 away."""
    device = DEVICES[backend]
    conv = hypertriton.CenterPivotConv4d(2, 3, 3, (1, 1, 2, 2), 1, backend=backend).to(device)
    params = (conv.conv1.weight, conv.conv1.bias, conv.conv2.weight, conv.conv2.bias)
    for shape in [(2, 2, 4, 4, 7, 7), (1, 2, 3, 5, 4, 6), (1, 2, 4, 4, 7, 7)]:
        x = make_tensor(shape, sum(shape), device=device)
        with torch.no_grad():
            got = conv(x)
        assert got.shape[0] == shape[0]
        assert_close_dtype(got.cpu(), expected(x, *params, (1, 1, 2, 2)), torch.float32)


def test_module_loads_original_state_dict_keys():
    conv = hypertriton.CenterPivotConv4d(4, 8, (5, 5, 5, 5), (1, 1, 4, 4), (2, 2, 2, 2))
    assert sorted(conv.state_dict()) == ["conv1.bias", "conv1.weight", "conv2.bias", "conv2.weight"]
    assert conv.conv1.weight.shape == (8, 4, 5, 5) and conv.conv2.stride == (4, 4)
    assert conv.conv1.stride == (1, 1) and conv.conv2.padding == (2, 2)


def test_bad_input_errors():
    wq, bq, ws, bs = weights(3, 2, (3, 3, 3, 3), 0, True)
    conv = hypertriton.CenterPivotConv4d(2, 3, 3, (1, 1, 2, 2), 1)
    with pytest.raises(ValueError, match=r"6D.*\[2, 2, 4, 4, 5\]"):
        hypertriton.center_pivot_conv4d(torch.zeros(2, 2, 4, 4, 5), wq, bq, ws, bs)
    with pytest.raises(ValueError, match=r"expects 2 input channels.*\[1, 5, 4, 4, 4, 4\]"):
        conv(torch.zeros(1, 5, 4, 4, 4, 4))
    with pytest.raises(ValueError, match=r"weight_query expects 2 input channels.*x has 4"):
        hypertriton.center_pivot_conv4d(torch.zeros(1, 4, 3, 3, 3, 3), wq, bq, ws, bs)
    with pytest.raises(TypeError, match="floating"):
        hypertriton.center_pivot_conv4d(torch.zeros(1, 2, 3, 3, 3, 3, dtype=torch.long), wq, bq, ws, bs)
    with pytest.raises(ValueError, match=r"padding.*query h.*expected padding 1"):
        hypertriton.center_pivot_conv4d(torch.zeros(1, 2, 4, 4, 4, 4), wq, bq, ws, bs, 1, (0, 1, 1, 1))
    with pytest.raises(ValueError, match=r"bias_support.*\[3\].*\[4\]"):
        hypertriton.center_pivot_conv4d(torch.zeros(1, 2, 3, 3, 3, 3), wq, bq, ws, torch.zeros(4))
    with pytest.raises(ValueError, match="meta"):
        hypertriton.center_pivot_conv4d(torch.zeros(1, 2, 3, 3, 3, 3, device="meta"), wq, bq, ws, bs)
    with pytest.raises(TypeError, match="stride"):
        hypertriton.center_pivot_conv4d(torch.zeros(1, 2, 3, 3, 3, 3), wq, bq, ws, bs, (1, 2))
    with pytest.raises(ValueError, match=r"x has no input channels \(shape \[1, 0, 3, 3, 3, 3\]\)"):
        hypertriton.center_pivot_conv4d(torch.zeros(1, 0, 3, 3, 3, 3), wq[:, :0], bq, ws[:, :0], bs)
    with pytest.raises(ValueError, match=r"x: the map is empty along support w"):
        hypertriton.center_pivot_conv4d(torch.zeros(1, 2, 3, 3, 3, 0), wq, bq, ws, bs)
    even = torch.zeros(3, 2, 2, 2)  # the user's padding 1 must not be what the message asks for
    with pytest.raises(ValueError, match=r"weight_query: kernel size 2 is even.*expected an odd kernel"):
        hypertriton.center_pivot_conv4d(torch.zeros(1, 2, 5, 5, 5, 5), even, bq, ws, bs, 1, 1)


@pytest.mark.parametrize("kwargs, match", [
    ({"kernel_size": 0}, r"kernel_size: expected values >= 1.*\(0, 0, 0, 0\)"),
    ({"stride": (1, 1, 0, 2)}, r"stride: expected values >= 1.*\(1, 1, 0, 2\)"),
    ({"padding": -1}, r"padding: expected values >= 0"),
    ({"backend": "bogus"}, r"backend: expected one of .*'bogus'"),
])
def test_module_refuses_impossible_arguments_when_built(kwargs, match):
    """Not at the first forward, where the message would speak of padding for a kernel of 0."""
    with pytest.raises(ValueError, match=match):
        hypertriton.CenterPivotConv4d(2, 3, **kwargs)


def test_other_padding_accepted_where_branches_agree():
    """Kernel 1 with padding 0 is the original's non-k//2 case where both branches agree."""
    x = make_tensor((1, 2, 3, 4, 5, 6), 0)
    wq, bq, ws, bs = weights(3, 2, (1, 1, 1, 1), 1, True)
    got = hypertriton.center_pivot_conv4d(x, wq, bq, ws, bs, (1, 1, 2, 2), 0, backend="torch")
    assert_close_dtype(got, expected(x, wq, bq, ws, bs, (1, 1, 2, 2)), torch.float32)


def with_constant_columns(batch, cin, sizes, share, seed):
    """A query-major ``[B, C, Hq, Wq, Hs, Ws]`` whose flagged support columns ``[B, Hs*Ws]`` (about ``share``
    of them) hold one random value per channel at every query position."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, cin, *sizes, generator=generator)
    flags = torch.rand(batch, sizes[2] * sizes[3], generator=generator) < share
    columns = x.flatten(4)  # a view: writes land in x
    for b in range(batch):
        for column in flags[b].nonzero().flatten().tolist():
            columns[b, :, :, :, column] = torch.randn(cin, 1, 1, generator=generator)
    return to_query_major(x), flags


@given(batch=st.integers(1, 2), cin=st.integers(1, 5), cout=st.integers(1, 5),
       sizes=st.tuples(*[st.integers(1, 9)] * 4), kernels=st.tuples(odd_kernels, odd_kernels, odd_kernels, odd_kernels),
       support_stride=st.tuples(st.integers(1, 5), st.integers(1, 5)), share=st.sampled_from([0.0, 0.5, 0.8, 1.0]),
       bias=st.booleans(), seed=seeds)
@example(batch=1, cin=1, cout=1, sizes=(1, 1, 1, 1), kernels=(1, 1, 1, 1), support_stride=(1, 1), share=1.0,
         bias=True, seed=0)  # 1x1 maps, all constant
@example(batch=2, cin=3, cout=4, sizes=(7, 6, 9, 9), kernels=(5, 5, 5, 5), support_stride=(4, 4), share=0.8,
         bias=True, seed=1)  # HSNet's second layer at level 2, odd sizes
@example(batch=1, cin=2, cout=3, sizes=(3, 2, 4, 5), kernels=(5, 3, 3, 3), support_stride=(5, 5), share=0.5,
         bias=False, seed=2)  # query map smaller than the kernel, stride past the support map
@example(batch=2, cin=2, cout=2, sizes=(5, 5, 6, 6), kernels=(3, 3, 3, 3), support_stride=(2, 2), share=0.0,
         bias=True, seed=3)  # nothing constant
@example(batch=1, cin=1, cout=2, sizes=(1, 1, 1, 2), kernels=(1, 1, 1, 1), support_stride=(1, 1), share=0.0,
         bias=False, seed=0)  # one input channel (both layouts at once) through the plain path
def test_constant_columns_match_reference(batch, cin, cout, sizes, kernels, support_stride, share, bias, seed):
    """The second squeeze layer's sparse form (constant support columns: per-window constants, products
    over the varying positions only, constant pivots through a k x k map) equals the dense conv; forced
    on every case (no share threshold), and through the threshold."""
    x, flags = with_constant_columns(batch, cin, sizes, share, seed)
    wq, bq, ws, bs = weights(cout, cin, kernels, seed + 10, bias)
    stride = (1, 1, *support_stride)
    padding = tuple(k // 2 for k in kernels)
    want = expected(x, wq, bq, ws, bs, stride)
    taps = cin * (kernels[0] * kernels[1] + kernels[2] * kernels[3])
    for threshold in (0.0, cp_ops.MIN_CONSTANT_SHARE):
        with torch.no_grad(), mock.patch.object(cp_ops, "MIN_CONSTANT_SHARE", threshold):
            got = cp_ops.center_pivot_conv4d_constant_columns(x, flags, wq, bq, ws, bs, stride, padding)
        assert is_query_major(got) and got.shape == want.shape
        assert_close_dtype(got, want, torch.float32, scale=max(1.0, taps / 25))


@pytest.mark.parametrize("case", ["float16", "float64", "autocast", "empty batch"])
@pytest.mark.parametrize("share", [0.0, 1.0], ids=["plain-path", "split-path"])
def test_constant_columns_follow_the_ops_dtype_rules(case, share):
    """Whichever path the share of constant columns picks, the output follows ``center_pivot_conv4d``'s
    rules (fp32 weights cast to x's dtype, autocast's dtype under autocast) and equals it; an empty batch
    gives an empty output. The plain path once skipped the casts (fp16 and fp64 x raised) and read an
    empty batch's share as NaN."""
    batch = 0 if case == "empty batch" else 2
    dtype = {"float16": torch.float16, "float64": torch.float64}.get(case, torch.float32)
    # Constant over the query dims in every support column, so that flagging all of them is true.
    x = to_query_major(make_tensor((batch, 3, 1, 1, 4, 5), 0).expand(batch, 3, 3, 4, 4, 5).contiguous()).to(dtype)
    flags = torch.full((batch, 20), share == 1.0)
    wq, bq, ws, bs = weights(4, 3, (3, 3, 3, 3), 1, True)
    stride, padding = (1, 1, 2, 2), (1, 1, 1, 1)
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16, enabled=case == "autocast"):
        want = hypertriton.center_pivot_conv4d(x, wq, bq, ws, bs, stride, padding, backend="torch")
        got = cp_ops.center_pivot_conv4d_constant_columns(x, flags, wq, bq, ws, bs, stride, padding)
    assert got.dtype == want.dtype == (torch.bfloat16 if case == "autocast" else dtype)
    assert got.shape == want.shape and is_query_major(got)
    assert_close_dtype(got.float(), want.float(), dtype=want.dtype)


def test_constant_columns_refuse_what_they_cannot_do():
    x, flags = with_constant_columns(1, 2, (4, 4, 5, 5), 0.5, 0)
    wq, bq, ws, bs = weights(3, 2, (3, 3, 3, 3), 0, True)
    with torch.no_grad(), pytest.raises(ValueError, match="query stride 1"):
        cp_ops.center_pivot_conv4d_constant_columns(x, flags, wq, bq, ws, bs, (2, 1, 2, 2), (1, 1, 1, 1))
    with torch.no_grad(), pytest.raises(ValueError, match=r"constant \[B, Hs\*Ws\] = \[1, 25\]"):
        cp_ops.center_pivot_conv4d_constant_columns(x, flags[:, :5], wq, bq, ws, bs, (1, 1, 2, 2), (1, 1, 1, 1))
    with pytest.raises(ValueError, match="no gradient"):
        cp_ops.center_pivot_conv4d_constant_columns(x, flags, wq, bq, ws, bs, (1, 1, 2, 2), (1, 1, 1, 1))


@pytest.mark.parametrize("backend", BACKEND_IDS)
def test_autocast_computes_in_its_dtype_on_every_backend(backend):
    """Under torch.autocast the op runs as a convolution layer would, in the autocast dtype (fp16 here: the
    interpreter's bf16 products are wrong), on every backend (the Triton kernels ignored autocast)."""
    device = DEVICES[backend]
    x = make_tensor((2, 3, 4, 5, 6, 5), 30, device=device)
    wq, bq, ws, bs = weights(4, 3, (3, 3, 3, 3), 31, True, device=device)
    stride = (1, 1, 2, 2)
    want = expected(x, wq, bq, ws, bs, stride)
    with torch.autocast(torch.device(device).type, dtype=torch.float16):
        got = hypertriton.center_pivot_conv4d(x, wq, bq, ws, bs, stride, backend=backend)
    assert got.dtype == torch.float16
    torch.testing.assert_close(got.double().cpu(), want, atol=2e-2, rtol=1e-2)


def test_bias_sum_of_no_biases_is_made_like_the_weights():
    # The zeros standing for two missing biases were made on the CPU in fp32 whatever the weights: a
    # host-to-GPU copy (a synchronization) in every bias-less forward on a GPU (tests/test_gpu.py checks that).
    from hypertriton.ops.center_pivot_conv4d import bias_sum

    weight = torch.ones(3, 2, 1, 1, dtype=torch.float64, device="meta")
    zeros = bias_sum(None, None, 3, like=weight)
    assert (zeros.shape, zeros.dtype, zeros.device.type) == ((3,), torch.float64, "meta")
    assert torch.equal(bias_sum(None, None, 2), torch.zeros(2)) and bias_sum(None, None) is None
    bias = torch.tensor([1.0, 2.0])
    assert torch.equal(bias_sum(bias, None, 2, like=weight), bias)
    assert torch.equal(bias_sum(bias, bias), 2 * bias)


@pytest.mark.parametrize("stride", [(1, 1, 2, 2), (2, 1, 3, 2), (1, 1, 1, 1)])
def test_hooked_branch_convolutions_run_as_modules(stride):
    """Hooks on ``conv1``/``conv2`` run and see the original's 2D maps (``conv1``: query maps at the pivot
    support positions; ``conv2``: support maps at the pivot query positions), a hook's result is used,
    and ``weight_norm`` (a pre-hook recomputing the weight) is followed, in training too. The fused op
    read the weights and never called the branches: the hooks never ran, and weight_norm's weight
    went stale."""
    conv = hypertriton.CenterPivotConv4d(3, 4, (3, 3, 5, 5), stride)
    x = make_tensor((2, 3, 6, 7, 9, 8), 0)
    out_size = [-(-n // s) for n, s in zip(x.shape[2:], stride)]
    seen = []
    record = [branch.register_forward_hook(lambda m, args, out: seen.append((m, tuple(args[0].shape))))
              for branch in (conv.conv1, conv.conv2)]
    silence_query = conv.conv1.register_forward_hook(lambda m, args, out: torch.zeros_like(out))
    got = conv(x)
    assert seen == [(conv.conv1, (2 * out_size[2] * out_size[3], 3, 6, 7)),
                    (conv.conv2, (2 * out_size[0] * out_size[1], 3, 9, 8))]
    zero = torch.zeros_like(conv.conv1.weight)
    assert_close_dtype(got, expected(x, zero, None, conv.conv2.weight, conv.conv2.bias, stride), torch.float32)
    for handle in (*record, silence_query):
        handle.remove()

    with pytest.warns(FutureWarning):  # the old weight_norm: still in use, and the pre-hook kind
        torch.nn.utils.weight_norm(conv.conv1)
    with torch.no_grad():
        conv.conv1.weight_g.mul_(2)
    for _ in range(2):  # a stale weight from the first call would fail the second backward
        out = conv(x)
        out.sum().backward()
    assert_close_dtype(out, expected(x, conv.conv1.weight, conv.conv1.bias, conv.conv2.weight, conv.conv2.bias,
                                     stride), torch.float32)
    assert conv.conv1.weight_g.grad is not None
    # As nn.Conv2d modules the branches take x in their weights' dtype: said up front, naming x.
    with pytest.raises(TypeError, match=r"x: torch.float16 against conv1/conv2 weights in \[torch.float32\]"):
        conv(x.half())


@pytest.mark.parametrize("backend", BACKEND_IDS)
@pytest.mark.parametrize("query_major", [False, True], ids=["standard layout", "query-major"])
def test_second_derivatives_equal_the_references(backend, query_major):
    """A gradient penalty (``create_graph=True``) equals the einsum reference's on every backend (the
    Triton op's explicit backward recomputes through the reference there)."""
    gen = torch.Generator().manual_seed(3)
    x0 = torch.randn(1, 2, 4, 3, 5, 4, generator=gen, dtype=torch.float64)
    x0 = to_query_major(x0) if query_major else x0
    params0 = [torch.randn(shape, generator=gen, dtype=torch.float64) for shape in ((3, 2, 3, 3), 3, (3, 2, 3, 3), 3)]
    probe = torch.randn(3 * 4 * 3 * 3 * 2, generator=gen, dtype=torch.float64)

    def penalty_gradients(backend, device, dtype):
        x = x0.to(device, dtype).requires_grad_()
        params = [p.to(device, dtype).requires_grad_() for p in params0]
        out = hypertriton.center_pivot_conv4d(x, *params, stride=(1, 1, 2, 2), backend=backend)
        (grad_x,) = torch.autograd.grad((out * probe.to(device, dtype).view(out.shape)).sum(), [x], create_graph=True)
        return torch.autograd.grad((grad_x.square() * x).sum(), [x, params[0], params[2]])  # biases: no term

    check_second_derivatives(backend, DEVICES.get(backend, "cpu"), penalty_gradients)
