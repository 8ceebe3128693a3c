"""hypertriton.hypercorrelation on every backend against the einsum reference."""

from unittest import mock

import pytest
import torch
from helpers import (BACKEND_IDS, LAYOUTS, MASK_KINDS, assert_gradients_match, available_backends,
                     check_second_derivatives, make_mask, make_tensor, seeds)
from hypothesis import example, given
from hypothesis import strategies as st

import hypertriton
from hypertriton import reference
from hypertriton.ops import _columns
from hypertriton.testing import assert_close_dtype

DEVICES = dict(available_backends())


@st.composite
def pyramids(draw):
    """1-3 levels of 1-2 layers each, channels 1-8, query and support sides 1-9 chosen independently."""
    levels = draw(st.integers(1, 3))
    layers = []
    for _ in range(levels):
        query_size = (draw(st.integers(1, 9)), draw(st.integers(1, 9)))
        support_size = (draw(st.integers(1, 9)), draw(st.integers(1, 9)))
        for _ in range(draw(st.integers(1, 2))):
            layers.append((draw(st.integers(1, 8)), query_size, support_size))
    return layers


def build(layers, batch, seed, layout, dtype, device):
    query = [make_tensor((batch, c, *qs), seed + 2 * i, layout, dtype, device) for i, (c, qs, _) in enumerate(layers)]
    support = [make_tensor((batch, c, *ss), seed + 2 * i + 1, layout, dtype, device)
               for i, (c, _, ss) in enumerate(layers)]
    return query, support


def expected_levels(query, support, mask):
    """The reference in float64 on the very same (already rounded) inputs."""
    return reference.hypercorrelation([q.double().cpu() for q in query], [s.double().cpu() for s in support],
                                      None if mask is None else mask.double().cpu())


@pytest.mark.parametrize("backend", BACKEND_IDS)
@given(layers=pyramids(), batch=st.integers(1, 3), seed=seeds, mask_kind=st.sampled_from(MASK_KINDS),
       layout=st.sampled_from(LAYOUTS), dtype=st.sampled_from([torch.float32, torch.float16]))
@example(layers=[(1, (1, 1), (1, 1))], batch=1, seed=0, mask_kind="none", layout="contiguous", dtype=torch.float32)
@example(layers=[(3, (5, 5), (5, 5)), (3, (5, 5), (5, 5)), (4, (3, 3), (3, 3))], batch=2, seed=1,
         mask_kind="blob", layout="channels_last", dtype=torch.float32)
@example(layers=[(8, (7, 4), (2, 9))], batch=3, seed=2, mask_kind="zero", layout="strided", dtype=torch.float16)
@example(layers=[(2, (9, 9), (9, 9))], batch=1, seed=3, mask_kind="pixel", layout="contiguous", dtype=torch.float32)
def test_matches_reference(backend, layers, batch, seed, mask_kind, layout, dtype):
    device = DEVICES[backend]
    query, support = build(layers, batch, seed, layout, dtype, device)
    mask = make_mask(mask_kind, batch, 11, 13, seed)
    mask = None if mask is None else mask.to(device)
    actual = hypertriton.hypercorrelation(query, support, mask, backend=backend)
    expected = expected_levels(query, support, mask)
    assert len(actual) == len(expected)
    for got, want in zip(actual, expected):
        assert got.shape == want.shape and got.dtype == dtype
        assert_close_dtype(got.cpu(), want, dtype)


@pytest.mark.parametrize("backend", BACKEND_IDS)
@pytest.mark.parametrize("upstream", ["random", "sum"])
@pytest.mark.parametrize("mask_kind", ["blob", "pixel"])  # pixel: few active positions, the sparse path
def test_gradients_match_reference(backend, upstream, mask_kind):
    device = DEVICES[backend]
    layers = [(3, (4, 3), (5, 2)), (3, (4, 3), (5, 2)), (5, (2, 2), (3, 3))]
    query, support = build(layers, 2, 7, "contiguous", torch.float32, device)
    mask = make_mask(mask_kind, 2, 9, 9, 0).to(device)
    leaves = [t.clone().requires_grad_() for t in query + support]
    ref_leaves = [t.detach().double().cpu().requires_grad_() for t in leaves]
    outputs = hypertriton.hypercorrelation(leaves[:3], leaves[3:], mask, backend=backend)
    ref_outputs = reference.hypercorrelation(ref_leaves[:3], ref_leaves[3:], mask.double().cpu())
    assert_gradients_match(outputs, ref_outputs, leaves, ref_leaves, upstream, scale=10)


# Gradients at the edge cases, features and a soft support mask alike (the mask's gradient was checked
# nowhere: detaching it inside the op passed every test).
GRADIENT_CASES = {  # layers [(channels, query size, support size)], batch, layout, mask kind
    "batch1-1x1-no-mask": ([(2, (1, 1), (1, 1))], 1, "contiguous", "none"),
    "odd-sizes-no-mask": ([(3, (5, 3), (3, 7)), (3, (5, 3), (3, 7))], 2, "contiguous", "none"),
    "full-mask": ([(3, (4, 3), (5, 2))], 2, "contiguous", "full"),
    "zero-mask": ([(3, (4, 3), (5, 2))], 2, "contiguous", "zero"),
    "strided-blob": ([(3, (4, 3), (5, 2)), (2, (2, 2), (3, 3))], 2, "strided", "blob"),
    "channels-last-pixel": ([(3, (4, 3), (5, 2))], 1, "channels_last", "pixel"),
}


@pytest.mark.parametrize("backend", BACKEND_IDS)
@pytest.mark.parametrize("upstream", ["random", "sum"])
@pytest.mark.parametrize("case", list(GRADIENT_CASES))
def test_gradients_at_the_edge_cases_including_the_mask(backend, upstream, case):
    layers, batch, layout, mask_kind = GRADIENT_CASES[case]
    device, n = DEVICES[backend], len(layers)
    query, support = build(layers, batch, 5, layout, torch.float32, device)
    leaves = [t.detach().requires_grad_() for t in query + support]  # detach() keeps the layout
    assert layout == "contiguous" or not all(t.is_contiguous() for t in leaves)
    ref_leaves = [t.detach().double().cpu().requires_grad_() for t in leaves]
    mask = make_mask(mask_kind, batch, 7, 9, 0)
    if mask is not None:  # soft values (zeros kept), so that the mask's gradient is not all zero
        mask = mask * (0.5 + torch.rand(mask.shape, generator=torch.Generator().manual_seed(1)))
        leaves.append(mask.to(device).requires_grad_())
        ref_leaves.append(mask.double().requires_grad_())
    outputs = hypertriton.hypercorrelation(leaves[:n], leaves[n:2 * n], leaves[2 * n] if mask is not None else None,
                                           backend=backend)
    ref_outputs = reference.hypercorrelation(ref_leaves[:n], ref_leaves[n:2 * n],
                                             ref_leaves[2 * n] if mask is not None else None)
    for got, want in zip(outputs, ref_outputs):  # with gradients the forward takes another path
        assert_close_dtype(got.detach().cpu(), want.detach(), torch.float32)
    if mask_kind in ("full", "blob"):  # the case exercises the property: the mask has a gradient
        mask_grad, = torch.autograd.grad(sum(o.sum() for o in ref_outputs), ref_leaves[-1], retain_graph=True)
        assert mask_grad.abs().max() > 0
    assert_gradients_match(outputs, ref_outputs, leaves, ref_leaves, upstream, scale=10)


@pytest.mark.parametrize("backend", BACKEND_IDS)
def test_fp16_features_whose_norms_pass_the_fp16_range(backend):
    # A channel vector's norm can pass fp16's 65504 while every feature fits: norms must be taken in fp32
    # (computing them in the features' dtype passed every other test of the ops).
    generator = torch.Generator().manual_seed(0)
    query = torch.randn(1, 64, 3, 3, generator=generator) * 1e4
    support = torch.randn(1, 64, 4, 4, generator=generator) * 1e4
    assert query.norm(dim=1).min() > 65504 and query.abs().max() < 65504
    device = DEVICES[backend]
    got = hypertriton.hypercorrelation([query.half().to(device)], [support.half().to(device)], backend=backend)[0]
    want = reference.hypercorrelation([query.half().double()], [support.half().double()])[0]
    assert want.max() > 0.2
    assert_close_dtype(got.cpu(), want, torch.float16)


# fp16 bound on a correlation of fp16 features, with fp32 accumulation: each normalized feature rounded to fp16
# (relative 2^-11, so at most 2^-10 on a dot product of unit vectors) plus the output's rounding (2^-12 below 1).
FP16_CORRELATION_BOUND = 2.0 ** -10 + 2.0 ** -12 + 1e-5


@pytest.mark.parametrize("backend", BACKEND_IDS)
@pytest.mark.parametrize("mask_kind", ["none", "blob"])
def test_fp16_correlations_keep_fp16_precision(backend, mask_kind):
    # The shared fp16 tolerance (rtol 1e-2, atol 5e-3) also accepts a result rounded to bf16 on the way; this
    # bound does not, on data where bf16's rounding of the output alone passes it (checked below).
    generator = torch.Generator().manual_seed(3)
    device = DEVICES[backend]
    errors, bf16_errors = [], []
    for channels in (2, 8, 64):
        # Non-negative features: cosines spread over about [0.3, 1], where an output ulp is largest.
        query = (torch.randn(2, channels, 5, 6, generator=generator).abs() * 30).half()
        support = (torch.randn(2, channels, 7, 4, generator=generator).abs() * 30).half()
        mask = make_mask(mask_kind, 2, 14, 8, channels)
        got = hypertriton.hypercorrelation([query.to(device)], [support.to(device)],
                                           None if mask is None else mask.to(device), backend=backend)[0]
        want = reference.hypercorrelation([query.double()], [support.double()],
                                          None if mask is None else mask.double())[0]
        assert got.dtype == torch.float16
        errors.append(float((got.cpu().double() - want).abs().max()))
        bf16_errors.append(float((want.to(torch.bfloat16).double() - want).abs().max()))
    assert max(bf16_errors) > FP16_CORRELATION_BOUND  # the data tells fp16 from bf16
    assert max(errors) <= FP16_CORRELATION_BOUND, errors


@pytest.mark.parametrize("backend", BACKEND_IDS)
@pytest.mark.parametrize("scale", [255.0, 3e-8], ids=["0-255", "tiny"])
def test_fp16_features_are_masked_in_fp32(backend, scale):
    # The original's fp32 mask promotes the masked support to fp32. Masked in fp16, a 0/255 mask overflows
    # features past 257 (NaN correlations) and mask values below 6e-8 round to 0 or to a subnormal.
    generator = torch.Generator().manual_seed(1)
    query = (torch.randn(1, 8, 3, 3, generator=generator).abs() * 300).half()
    support = (torch.randn(1, 8, 3, 3, generator=generator).abs() * 300).half()
    mask = (torch.rand(1, 3, 3, generator=generator) + 0.1) * scale
    device = DEVICES[backend]
    got = hypertriton.hypercorrelation([query.to(device)], [support.to(device)], mask.to(device), backend=backend)[0]
    want = reference.hypercorrelation([query.double()], [support.double()], mask.double())[0]
    assert want.max() > 0.3
    assert float((got.cpu().double() - want).abs().max()) <= FP16_CORRELATION_BOUND


@pytest.mark.parametrize("grad", [False, True], ids=["no-grad", "grad"])
def test_torch_backend_multiplies_active_support_positions_only(grad):
    """The cost follows the object's area: the matrix products cover the active support positions (mask
    != 0 after resizing) of each batch element, none for an empty mask, all of them for a mask past
    SPARSE_SHARE (where the dense product costs less)."""
    from torch.utils.flop_counter import FlopCounterMode

    from hypertriton.ops.hypercorrelation import SPARSE_SHARE

    channels, query_size, support_size = 6, (5, 4), (8, 8)
    query, support = build([(channels, query_size, support_size)] * 2, 2, 3, "contiguous", torch.float32, "cpu")
    leaves = [t.requires_grad_(grad) for t in query + support]
    positions = support_size[0] * support_size[1]
    counts = {}
    for kind in ("zero", "pixel", "blob", "full"):
        mask = make_mask(kind, 2, 16, 16, 0)
        active = counts[kind] = (reference.resize_mask(mask, support_size) != 0).flatten(1).sum(dim=1).tolist()
        multiplied = [n if n <= SPARSE_SHARE * positions else positions for n in active]
        expected = sum(2 * 20 * channels * n for n in multiplied) * 2  # 20 query positions, 2 layers
        with FlopCounterMode(display=False) as counter:
            levels = hypertriton.hypercorrelation(leaves[:2], leaves[2:], mask, backend="torch")
        assert counter.get_total_flops() == expected, (kind, active)
        assert_close_dtype(levels[0].detach(), expected_levels(query, support, mask)[0], torch.float32)
    assert 0 < counts["blob"][0] <= SPARSE_SHARE * positions  # the blob: a partly active support map


@pytest.mark.parametrize("backend", BACKEND_IDS)
def test_nan_lands_where_reference_puts_it(backend):
    device = DEVICES[backend]
    query, support = build([(4, (3, 3), (4, 4))], 2, 11, "contiguous", torch.float32, device)
    query[0][1, 2, 1, 2] = float("nan")
    support[0][0, 0, 3, 0] = float("nan")
    mask = make_mask("random", 2, 6, 6, 1).to(device)
    got = hypertriton.hypercorrelation(query, support, mask, backend=backend)[0].cpu()
    want = expected_levels(query, support, mask)[0]
    assert torch.equal(got.isnan(), want.isnan()) and got.isnan().any()
    assert_close_dtype(got, want, torch.float32)


@pytest.mark.parametrize("backend", BACKEND_IDS)
def test_empty_batch_gives_empty_levels(backend):
    device = DEVICES[backend]
    query, support = build([(2, (3, 3), (3, 3)), (2, (2, 2), (2, 2))], 0, 0, "contiguous", torch.float32, device)
    levels = hypertriton.hypercorrelation(query, support, torch.zeros(0, 5, 5, device=device), backend=backend)
    assert [tuple(t.shape) for t in levels] == [(0, 1, 2, 2, 2, 2), (0, 1, 3, 3, 3, 3)]


def test_module_equals_functional():
    query, support = build([(3, (4, 4), (4, 4)), (3, (2, 2), (2, 2))], 2, 5, "contiguous", torch.float32, "cpu")
    mask = make_mask("blob", 2, 8, 8, 0)
    module_out = hypertriton.HyperCorr(backend="torch")(query, support, mask)
    functional_out = hypertriton.hypercorrelation(query, support, mask, backend="torch")
    for a, b in zip(module_out, functional_out):
        assert torch.equal(a, b)


def test_boolean_and_integer_masks_equal_float_masks():
    query, support = build([(3, (4, 4), (5, 5))], 2, 9, "contiguous", torch.float32, "cpu")
    mask = make_mask("random", 2, 7, 7, 3)
    want = hypertriton.hypercorrelation(query, support, mask, backend="torch")[0]
    for variant in (mask.bool(), mask.long()):
        assert torch.equal(hypertriton.hypercorrelation(query, support, variant, backend="torch")[0], want)


def feats(*shapes, dtype=torch.float32, device="cpu"):
    return [torch.randn(*shape, dtype=dtype, device=device) for shape in shapes]


@pytest.mark.parametrize("query, support, mask, error, words", [
    (feats((1, 2, 3, 3)), feats((1, 2, 3, 3), (1, 2, 2, 2)), None, ValueError, ["1 layers", "2"]),
    (feats((2, 2, 3, 3)), feats((1, 2, 3, 3)), None, ValueError, ["batch 2", "batch 1", "[2, 2, 3, 3]"]),
    (feats((1, 2, 3, 3)), feats((1, 4, 3, 3)), None, ValueError, ["2 channels", "4", "query_feats[0]"]),
    (feats((1, 2, 3, 3)), feats((1, 2, 3, 3)), torch.ones(2, 5, 5), ValueError, ["support_mask", "batch 2", "1"]),
    (feats((1, 2, 3, 3)), feats((1, 2, 3, 3)), torch.ones(1, 1, 5, 5), ValueError,
     ["support_mask", "[1, 1, 5, 5]", "for a [B, 1, H, W] mask pass support_mask[:, 0]"]),
    (feats((1, 2, 3, 3)), feats((1, 2, 3, 3)), torch.ones(1, 2, 5, 5), ValueError, ["support_mask", "[1, 2, 5, 5]"]),
    ([torch.ones(1, 2, 3, 3, dtype=torch.long)], feats((1, 2, 3, 3)), None, TypeError, ["query_feats[0]", "int64"]),
    (feats((1, 2, 3)), feats((1, 2, 3, 3)), None, ValueError, ["query_feats[0]", "[1, 2, 3]", "4D"]),
    (torch.ones(1, 2, 3, 3), feats((1, 2, 3, 3)), None, TypeError, ["query_feats", "list"]),
    ([], [], None, ValueError, ["empty"]),
    (feats((1, 2, 3, 3)), feats((1, 2, 3, 3), device="meta"), None, ValueError, ["meta", "cpu"]),
    (feats((1, 2, 3, 3)), feats((1, 2, 3, 3), dtype=torch.float16), None, TypeError, ["float16", "float32"]),
    (feats((1, 2, 3, 3)) + feats((1, 2, 3, 3), dtype=torch.float16),
     feats((1, 2, 3, 3)) + feats((1, 2, 3, 3), dtype=torch.float16), None, TypeError,
     ["query_feats[1] is torch.float16", "query_feats[0] is torch.float32", "all layers"]),
    (feats((1, 2, 3, 3)), feats((1, 2, 0, 3)), None, ValueError, ["support_feats[0]", "[1, 2, 0, 3]", "one position"]),
    (feats((1, 0, 3, 3)), feats((1, 0, 3, 3)), None, ValueError, ["query_feats[0]", "[1, 0, 3, 3]", "one channel"]),
    (feats((1, 2, 3, 3)), feats((1, 2, 3, 3)), torch.ones(1, 0, 5), ValueError, ["support_mask", "[1, 0, 5]", "pixel"]),
])
def test_bad_input_names_argument_and_shapes(query, support, mask, error, words):
    with pytest.raises(error) as info:
        hypertriton.hypercorrelation(query, support, mask, backend="torch")
    for word in words:
        assert word in str(info.value), (word, str(info.value))


@pytest.mark.parametrize("mask_kind", MASK_KINDS)
def test_torch_backend_placing_products_run_by_run_matches_reference(mask_kind):
    """The active columns reach the output run by run (``hypertriton.ops._columns``, taken at 400 px; too
    short to pay off at test sizes, so forced here), every other column zero (outputs start as NaN)."""
    query, support = build([(3, (4, 5), (9, 8)), (2, (4, 5), (9, 8))], 2, 5, "contiguous", torch.float32, "cpu")
    mask = make_mask(mask_kind, 2, 18, 16, 5)
    run_by_run = []
    real_runs_pay_off = _columns.runs_pay_off

    def runs_pay_off(*args):
        run_by_run.append(real_runs_pay_off(*args))
        return run_by_run[-1]

    with mock.patch.object(_columns, "MIN_ELEMENTS_PER_RUN", 0), mock.patch.object(_columns, "runs_pay_off",
                                                                                   runs_pay_off):
        actual = hypertriton.hypercorrelation(query, support, mask, backend="torch")
    for got, want in zip(actual, expected_levels(query, support, mask)):
        assert_close_dtype(got, want, torch.float32)
    if mask_kind in ("blob", "pixel"):  # some support positions inactive (random masks resize to all active)
        assert any(run_by_run)


@pytest.mark.parametrize("backend", BACKEND_IDS)
def test_autocast_keeps_the_features_dtype_on_every_backend(backend):
    """Under torch.autocast the products still run in the features' dtype (the Triton kernel's way), so
    every backend returns what it returns outside autocast (the reference followed autocast to bf16)."""
    device = DEVICES[backend]
    query, support = build([(3, (4, 4), (5, 5)), (2, (2, 3), (3, 2))], 2, 21, "contiguous", torch.float32, device)
    mask = make_mask("blob", 2, 8, 8, 4).to(device)
    want = hypertriton.hypercorrelation(query, support, mask, backend=backend)
    with torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
        got = hypertriton.hypercorrelation(query, support, mask, backend=backend)
    assert [g.dtype for g in got] == [torch.float32] * 2
    for g, w in zip(got, want):
        assert torch.equal(g, w)


@pytest.mark.parametrize("backend", BACKEND_IDS)
def test_second_derivatives_equal_the_references(backend):
    """A gradient penalty (``create_graph=True``) with a mask that leaves most support positions out equals
    the einsum reference's on every backend."""
    gen = torch.Generator().manual_seed(4)
    query0 = [torch.randn(1, 3, 4, 5, generator=gen, dtype=torch.float64) for _ in range(2)]
    support0 = [torch.randn(1, 3, 5, 4, generator=gen, dtype=torch.float64) for _ in range(2)]
    mask = torch.zeros(1, 5, 4, dtype=torch.float64)
    mask[0, 1:3, 1:3] = 1.0

    def penalty_gradients(backend, device, dtype):
        query = [q.to(device, dtype).requires_grad_() for q in query0]
        support = [s.to(device, dtype).requires_grad_() for s in support0]
        (level,) = hypertriton.hypercorrelation(query, support, mask.to(device, dtype), backend=backend)
        weights = torch.arange(level.numel(), device=device, dtype=dtype).view(level.shape).cos()
        grads = torch.autograd.grad((level * weights).sum(), query, create_graph=True)
        return torch.autograd.grad(sum(g.square().sum() for g in grads), query + support)

    check_second_derivatives(backend, DEVICES.get(backend, "cpu"), penalty_gradients)


def test_vmap_is_refused_by_name_and_the_conv_runs_under_it():
    """torch.func.vmap: the hypercorrelation's sparse paths read the data (refused, saying so, instead of
    PyTorch's "Cannot access data pointer"); the center-pivot conv runs and equals a loop."""
    gen = torch.Generator().manual_seed(5)
    feats = [torch.randn(3, 1, 2, 4, 4, generator=gen) for _ in range(4)]
    mask = torch.ones(3, 1, 8, 8)
    with pytest.raises(RuntimeError, match="do not run under torch.func.vmap"):
        torch.func.vmap(lambda q0, q1, s0, s1, m: hypertriton.hypercorrelation([q0, q1], [s0, s1], m)[0])(*feats, mask)
    # The per-sample-gradient pattern wraps the features in a gradient level first; a vmap over the mask
    # alone leaves them plain.
    per_sample = torch.func.vmap(torch.func.grad(
        lambda q0, q1, s0, s1, m: hypertriton.hypercorrelation([q0, q1], [s0, s1], m)[0].sum()))
    with pytest.raises(RuntimeError, match="do not run under torch.func.vmap"):
        per_sample(*feats, mask)
    plain = [f[0] for f in feats]
    with pytest.raises(RuntimeError, match="do not run under torch.func.vmap"):
        torch.func.vmap(lambda m: hypertriton.hypercorrelation(plain[:2], plain[2:], m)[0])(mask)
    conv = hypertriton.CenterPivotConv4d(2, 3, 3, (1, 1, 2, 2))
    x = torch.randn(4, 1, 2, 4, 4, 5, 5, generator=gen)
    with torch.no_grad():
        torch.testing.assert_close(torch.func.vmap(conv)(x), torch.stack([conv(item) for item in x]))
