"""The query-major layout (hypertriton.ops.layout): conversions, GroupNorm, query-dim resizing, the
support convolution as a matrix, and that the torch backend's learner stays in the layout."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import examples, make_tensor, seeds, watching_forward
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st

from hypertriton.learner import HPNLearner, _resize_pair
from hypertriton.modules import GroupNorm4d
from hypertriton.ops.center_pivot_conv4d import support_conv_matrix
from hypertriton.ops.fused_first_layer import fused_hypercorrelation_cp_conv4d
from hypertriton.ops.layout import group_norm, is_query_major, resize_query_dims, to_query_major
from hypertriton.testing import assert_close_dtype, tolerance

sides = st.integers(1, 5)


def test_to_query_major_keeps_values_and_is_idempotent():
    x = torch.randn(2, 3, 4, 5, 2, 3)
    q = to_query_major(x)
    assert torch.equal(q, x) and q.shape == x.shape
    assert is_query_major(q) and not is_query_major(x)
    assert to_query_major(q) is q
    assert q.permute(0, 2, 3, 4, 5, 1).is_contiguous()


@settings(max_examples=examples(20), deadline=None)
@given(batch=st.integers(1, 2), groups=st.integers(1, 4), per_group=st.integers(1, 4), sizes=st.tuples(*[sides] * 4),
       offset=st.sampled_from([0.0, 100.0]), affine=st.booleans(), seed=seeds)
@example(batch=1, groups=4, per_group=4, sizes=(5, 5, 3, 3), offset=100.0, affine=True, seed=0)
@example(batch=2, groups=2, per_group=1, sizes=(2, 1, 1, 1), offset=0.0, affine=False, seed=1)
def test_group_norm_matches_torch_values_and_gradients(batch, groups, per_group, sizes, offset, affine, seed):
    assume(per_group * sizes[0] * sizes[1] * sizes[2] * sizes[3] > 1)  # one value per group: next test
    channels = groups * per_group
    x = make_tensor((batch, channels, *sizes), seed, "channels_last", torch.float64) + offset
    gen = torch.Generator().manual_seed(seed + 1)
    weight = torch.randn(channels, generator=gen, dtype=torch.float64, requires_grad=True) if affine else None
    bias = torch.randn(channels, generator=gen, dtype=torch.float64, requires_grad=True) if affine else None
    upstream = torch.randn(x.shape, generator=gen, dtype=torch.float64)
    ours_x, want_x = x.clone().requires_grad_(), x.contiguous().requires_grad_()
    ours = group_norm(ours_x, groups, weight, bias)
    want = F.group_norm(want_x, groups, weight, bias)
    assert is_query_major(ours) or channels == 1
    torch.testing.assert_close(ours, want, rtol=1e-10, atol=1e-10)
    params = [p for p in (weight, bias) if p is not None]
    got_grads = torch.autograd.grad(ours, [ours_x, *params], upstream)
    want_grads = torch.autograd.grad(want, [want_x, *params], upstream)
    for got, expected in zip(got_grads, want_grads):
        torch.testing.assert_close(got, expected, rtol=1e-8, atol=1e-9)


@settings(max_examples=examples(10), deadline=None)
@given(batch=st.integers(1, 2), groups=st.integers(1, 3), per_group=st.integers(1, 3), sizes=st.tuples(*[sides] * 4),
       affine=st.booleans(), relu=st.booleans(), seed=seeds)
@example(batch=1, groups=2, per_group=2, sizes=(3, 2, 2, 3), affine=True, relu=False, seed=0)
@example(batch=2, groups=1, per_group=3, sizes=(1, 1, 2, 1), affine=False, relu=True, seed=1)
def test_group_norm_second_derivatives_match_torch(batch, groups, per_group, sizes, affine, relu, seed):
    """A gradient penalty through the query-major GroupNorm (``create_graph=True``, then a gradient of
    the gradients) equals the same penalty through ``F.group_norm``, for the input and the affine
    parameters; an explicit backward that is not differentiable would lose its terms silently."""
    assume(per_group * sizes[0] * sizes[1] * sizes[2] * sizes[3] > 1)
    channels = groups * per_group
    x = make_tensor((batch, channels, *sizes), seed, "channels_last", torch.float64)
    gen = torch.Generator().manual_seed(seed + 1)
    weight = torch.randn(channels, generator=gen, dtype=torch.float64) if affine else None
    bias = torch.randn(channels, generator=gen, dtype=torch.float64) if affine else None
    upstream = torch.randn(x.shape, generator=gen, dtype=torch.float64)
    probe = torch.randn(x.numel(), generator=gen, dtype=torch.float64)

    def penalty_gradients(norm, x):
        inputs = [x.requires_grad_()] + [p.clone().requires_grad_() for p in (weight, bias) if p is not None]
        out = norm(inputs[0], groups, *inputs[1:]) if affine else norm(inputs[0], groups)
        out = torch.relu(out) if relu else out
        first = torch.autograd.grad(out, inputs, upstream, create_graph=True)
        penalty = sum((g * probe[:g.numel()].view(g.shape)).square().sum() for g in first)
        # The bias's is zero (the first gradients do not depend on it); whether autograd's graph still
        # reaches it differs between torch versions.
        second = torch.autograd.grad(penalty, inputs, allow_unused=True)
        return [torch.zeros_like(t) if g is None else g for g, t in zip(second, inputs)]

    got = penalty_gradients(group_norm, x.clone())
    want = penalty_gradients(F.group_norm, x.contiguous())
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-8, atol=1e-9)


def test_group_norm_refuses_one_value_per_group_as_torch_does():
    x = to_query_major(torch.randn(1, 4, 1, 1, 1, 1))
    with pytest.raises(ValueError, match="more than 1 value"):
        F.group_norm(x, 4)
    with pytest.raises(ValueError, match="more than 1 value"):
        group_norm(x, 4)


def test_group_norm_float32_keeps_its_digits_for_a_large_offset():
    """Two-pass statistics: a mean of 1000 over 160k values costs the one-pass formula most digits."""
    x = make_tensor((1, 8, 20, 20, 10, 10), 3, "channels_last", torch.float64) + 1000.0
    exact = F.group_norm(x, 4)
    ours = group_norm(x.float(), 4)
    assert is_query_major(ours)
    assert (ours.double() - exact).abs().max() < 1e-3  # fp32 input rounding alone is ~6e-5 / std 1


@pytest.mark.parametrize("inplace", [False, True])
def test_group_norm_bfloat16_takes_fp32_statistics(inplace):
    """bf16 input (as under autocast): statistics accumulate in fp32 over many cache-sized chunks; only the
    output's own rounding is left, large offset included."""
    x = (make_tensor((1, 8, 20, 20, 10, 10), 4, "channels_last", torch.float64) + 50.0).bfloat16()
    exact = F.group_norm(x.double(), 4)
    with torch.no_grad():
        ours = group_norm(x.clone(), 4, inplace=inplace)
    assert ours.dtype == torch.bfloat16 and is_query_major(ours)
    torch.testing.assert_close(ours.double(), exact, rtol=2 ** -7, atol=2 ** -7)


def test_group_norm_bfloat16_gradients_in_fp32_arithmetic():
    """The explicit backward on bf16 rows (training under autocast) with a large offset: fp32 weights get
    fp32 gradients, and every gradient is within bf16 rounding of the fp64 one."""
    x = (make_tensor((1, 8, 12, 12, 6, 6), 5, "channels_last", torch.float64) + 50.0).bfloat16()
    gen = torch.Generator().manual_seed(6)
    weight, bias = torch.randn(8, generator=gen), torch.randn(8, generator=gen)
    upstream = torch.randn(x.shape, generator=gen, dtype=torch.float64)
    ours_in = [x.clone().requires_grad_(), weight.clone().requires_grad_(), bias.clone().requires_grad_()]
    want_in = [t.detach().double().contiguous().requires_grad_() for t in ours_in]
    got = torch.autograd.grad(group_norm(ours_in[0], 4, ours_in[1], ours_in[2]), ours_in, upstream.bfloat16())
    want = torch.autograd.grad(F.group_norm(want_in[0], 4, want_in[1], want_in[2]), want_in, upstream)
    assert [g.dtype for g in got] == [torch.bfloat16, torch.float32, torch.float32]
    for g, w in zip(got, want):
        torch.testing.assert_close(g.double(), w, rtol=2 ** -6, atol=2 ** -6 * float(w.abs().max()))


def test_group_norm_module_output_accepts_inplace_relu_and_loads_groupnorm_state():
    norm = GroupNorm4d(2, 4)
    norm.load_state_dict(torch.nn.GroupNorm(2, 4).state_dict())
    x = to_query_major(torch.randn(2, 4, 3, 3, 2, 2)).requires_grad_()
    y = torch.relu_(norm(x))  # a custom Function's output must not be a view, or this is refused
    y.sum().backward()
    expected = torch.relu(torch.nn.functional.group_norm(x.detach().contiguous(), 2, norm.weight, norm.bias))
    torch.testing.assert_close(y.detach(), expected)
    assert x.grad is not None


@settings(max_examples=examples(15), deadline=None)
@given(batch=st.integers(1, 2), channels=st.integers(1, 3), sizes=st.tuples(*[sides] * 4),
       target=st.tuples(st.integers(1, 7), st.integers(1, 7)), seed=seeds)
def test_resize_query_dims_equals_the_channels_first_resize(batch, channels, sizes, target, seed):
    x = make_tensor((batch, channels, *sizes), seed, "contiguous", torch.float64)
    got = resize_query_dims(to_query_major(x), target)
    assert is_query_major(got) or channels == 1
    torch.testing.assert_close(got, _resize_pair(x, target, "query"), rtol=1e-12, atol=1e-12)


@settings(max_examples=examples(20), deadline=None)
@given(cin=st.integers(1, 4), cout=st.integers(1, 4), size=st.tuples(sides, sides),
       kernel=st.tuples(st.sampled_from([1, 3, 5]), st.sampled_from([1, 3, 5])),
       stride=st.tuples(st.integers(1, 3), st.integers(1, 3)), seed=seeds)
@example(cin=3, cout=2, size=(2, 2), kernel=(3, 3), stride=(1, 1), seed=0)  # the mixing blocks' case
def test_support_conv_matrix_is_the_convolution(cin, cout, size, kernel, stride, seed):
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(cout, cin, *kernel, generator=gen, dtype=torch.float64)
    maps = torch.randn(3, cin, *size, generator=gen, dtype=torch.float64)
    padding = (kernel[0] // 2, kernel[1] // 2)
    want = F.conv2d(maps, weight, None, stride, padding)  # [3, Cout, Hs', Ws']
    matrix = support_conv_matrix(weight, size, stride, padding)
    got = maps.permute(0, 2, 3, 1).reshape(3, -1) @ matrix
    torch.testing.assert_close(got.view(3, *want.shape[2:], cout).permute(0, 3, 1, 2), want)


def test_torch_backend_learner_runs_query_major_and_equals_the_reference_backend():
    torch.manual_seed(0)
    ours = HPNLearner([3, 6, 4], backend="torch").double()
    reference = HPNLearner([3, 6, 4], backend="reference").double()
    reference.load_state_dict(ours.state_dict())
    pyramid = [torch.rand(2, c, s, s, s, s, dtype=torch.float64) for c, s in ((3, 2), (6, 4), (4, 8))]
    seen = []
    norms = [module for module in ours.modules() if isinstance(module, GroupNorm4d)]
    with watching_forward(norms, lambda _m, _i, out: seen.append(is_query_major(out))):
        torch.testing.assert_close(ours(pyramid), reference(pyramid), rtol=1e-9, atol=1e-10)
    # every GroupNorm after each block's first layer saw (and returned) the query-major layout
    assert len(seen) == 15 and all(seen)


def test_fused_first_layer_returns_query_major_and_allows_inplace_ops():
    gen = torch.Generator().manual_seed(0)
    query = [torch.randn(1, 4, 5, 5, generator=gen, requires_grad=True) for _ in range(2)]
    support = [torch.randn(1, 4, 6, 6, generator=gen) for _ in range(2)]
    wq, ws = torch.randn(3, 2, 3, 3, generator=gen), torch.randn(3, 2, 3, 3, generator=gen)
    out = fused_hypercorrelation_cp_conv4d(query, support, torch.ones(1, 6, 6), wq, None, ws, None, (1, 1, 2, 2),
                                           backend="torch")
    assert is_query_major(out) and out.shape == (1, 3, 5, 5, 3, 3)
    doubled = out * 2
    torch.relu_(out)
    out.sum().backward()
    assert_close_dtype(out, torch.relu(doubled / 2))
    assert query[0].grad is not None


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_group_norm_falls_back_to_torch_for_other_layouts_and_ranks(layout):
    x = make_tensor((2, 4, 3, 3), 0, layout)
    torch.testing.assert_close(group_norm(x, 2), F.group_norm(x, 2))


@pytest.mark.parametrize("inplace", [False, True])
def test_group_norm_inference_path_and_inplace_option(inplace):
    x = make_tensor((2, 8, 3, 4, 3, 2), 11, "channels_last") + 5
    weight, bias = torch.randn(8), torch.randn(8)
    expected = F.group_norm(x.contiguous(), 4, weight, bias)
    before = x.clone()
    with torch.no_grad():
        out = group_norm(x, 4, weight, bias, inplace=inplace)
    torch.testing.assert_close(out, expected)
    assert is_query_major(out)
    assert (out.data_ptr() == x.data_ptr()) == inplace
    if not inplace:
        assert torch.equal(x, before)
    # With a gradient being recorded the input is never overwritten.
    y = x.clone().requires_grad_()
    group_norm(y, 4, weight, bias, inplace=True).sum().backward()
    assert torch.equal(y.detach(), x)


@settings(max_examples=examples(20), deadline=None)
@given(batch=st.integers(1, 2), groups=st.integers(1, 3), per_group=st.integers(1, 3), sizes=st.tuples(*[sides] * 4),
       share=st.sampled_from([0.0, 0.5, 1.0]), offset=st.sampled_from([0.0, 100.0]), relu=st.booleans(), seed=seeds)
@example(batch=1, groups=2, per_group=2, sizes=(1, 1, 1, 1), share=1.0, offset=0.0, relu=True, seed=0)  # 1x1 maps
@example(batch=2, groups=2, per_group=3, sizes=(5, 4, 3, 5), share=0.5, offset=100.0, relu=False, seed=1)
@example(batch=1, groups=1, per_group=1, sizes=(1, 2, 1, 1), share=0.5, offset=100.0, relu=False,
         seed=76683352)  # one group of two equal values at 101.6: variance 0, the output all rounding
def test_group_norm_of_a_column_split_equals_the_whole(batch, groups, per_group, sizes, share, offset, relu, seed):
    """``split_constant_columns`` keeps every value (the varying columns whole, the constant ones once), and
    ``group_norm_split`` on it equals ``group_norm`` of the whole activation (statistics of the constant
    columns in closed form), with or without the ReLU."""
    from hypertriton.ops.layout import group_norm_split, split_constant_columns

    channels = groups * per_group
    assume(per_group * sizes[0] * sizes[1] * sizes[2] * sizes[3] > 1)  # torch's GroupNorm refuses one value
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, channels, *sizes, generator=generator) + offset
    flags = torch.rand(batch, sizes[2] * sizes[3], generator=generator) < share
    columns = x.flatten(4)
    for b in range(batch):
        for column in flags[b].nonzero().flatten().tolist():
            columns[b, :, :, :, column] = torch.randn(channels, 1, 1, generator=generator) + offset
    x = to_query_major(x)
    weight, bias = torch.randn(channels, generator=generator), torch.randn(channels, generator=generator)
    with torch.no_grad():
        want = group_norm(x.clone(), groups, weight, bias, 1e-5, relu=relu)
        splits = group_norm_split(split_constant_columns(x, flags), groups, weight, bias, 1e-5, relu=relu)
    want_columns = want.permute(0, 2, 3, 4, 5, 1).reshape(batch, -1, sizes[2] * sizes[3], channels)
    # Both forms (and torch's fp32 GroupNorm, which the whole takes with one channel) compute
    # x * scale + shift, whose terms reach |mean| * rstd * |gamma| and cancel to the output: a group of
    # (nearly) equal values far from zero loses 2^-24 of that to rounding, beyond the usual tolerance.
    grouped = x.double().permute(0, 2, 3, 4, 5, 1).reshape(batch, -1, groups, per_group).transpose(1, 2).flatten(2)
    rstd = (grouped.var(dim=2, unbiased=False) + 1e-5).rsqrt()
    cancelled = float((grouped.mean(dim=2).abs() * rstd).max() * weight.abs().max())
    scale = max(10.0, 8 * 2.0 ** -24 * cancelled / tolerance(torch.float32)[1])
    for b, split in enumerate(splits):
        assert torch.equal(split.is_constant, flags[b])
        assert_close_dtype(split.varying, want_columns[b][:, split.varying_index], scale=scale)
        assert_close_dtype(split.first_row, want_columns[b][0], scale=scale)
