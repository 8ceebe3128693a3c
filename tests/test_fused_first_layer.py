"""The fused hypercorrelation + first center-pivot layer against the dense einsum reference.

Oracle: ``reference.center_pivot_conv4d(reference.hypercorrelation(q, s, mask)[0], ...)``, in float64.
Masks of every kind (empty, full, blob, single pixel, random), support strides 1-4, kernels 1/3/5, odd
sizes; forward and gradients; chunking forced down to a few elements so multi-chunk code runs too.
"""

from __future__ import annotations

import math
from unittest import mock

import pytest
import torch
import helpers
from helpers import (TRITON_RUNS, assert_gradients_match, available_backends, backend_params, check_second_derivatives,
                     examples, make_tensor, needs_triton)
from hypothesis import example, given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

from hypertriton import reference
from hypertriton.ops import _columns
from hypertriton.ops import fused_first_layer as ffl
from hypertriton.testing import assert_close_dtype

MASK_KINDS = ("empty", "full", "blob", "pixel", "random")
DEVICES = dict(available_backends())  # the triton backend runs on CUDA where there is a GPU, else interpreted
EDGE_BACKEND = "triton" if TRITON_RUNS else "torch"  # the edge-case examples' backend, where it runs


def on_device(backend: str, *values):
    """``values`` (tensors, or lists/tuples of them; None kept) moved to the device ``backend`` runs on."""
    device = DEVICES.get(backend, "cpu")

    def move(value):
        if isinstance(value, (list, tuple)):
            return type(value)(move(item) for item in value)
        return value if value is None else value.to(device)

    return move(values) if len(values) > 1 else move(values[0])


def make_mask(kind: str, batch: int, h: int, w: int, gen: torch.Generator) -> torch.Tensor:
    """A ``[B, h, w]`` float mask of the given kind."""
    if kind == "empty":
        return torch.zeros(batch, h, w, dtype=torch.float64)
    if kind == "full":
        return torch.ones(batch, h, w, dtype=torch.float64)
    if kind == "pixel":
        mask = torch.zeros(batch, h, w, dtype=torch.float64)
        for b in range(batch):
            i = int(torch.randint(h, (1,), generator=gen))
            j = int(torch.randint(w, (1,), generator=gen))
            mask[b, i, j] = 1.0
        return mask
    if kind == "blob":
        yy, xx = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64),
                                indexing="ij")
        masks = []
        for _ in range(batch):
            cy, cx = torch.rand(2, generator=gen, dtype=torch.float64) * torch.tensor([h, w])
            radius = max(h, w) * (0.15 + 0.25 * float(torch.rand(1, generator=gen)))
            masks.append((((yy - cy) ** 2 + (xx - cx) ** 2) <= radius ** 2).double())
        return torch.stack(masks)
    return (torch.rand(batch, h, w, generator=gen, dtype=torch.float64) > 0.6).double()


def chunk_budget(elements: int):
    """Temporarily set the fused op's chunk budget (elements per chunk) so tiny cases span many chunks."""
    return mock.patch.object(ffl, "CHUNK_ELEMENTS", elements)


def make_case(seed, batch, layers, channels, hq, wq, hs, ws, k_query, k_support, out_channels=3,
              dtype=torch.float64, requires_grad=False):
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=gen, dtype=dtype).requires_grad_(requires_grad)

    query = [rand(batch, channels, hq, wq) for _ in range(layers)]
    support = [rand(batch, channels, hs, ws) for _ in range(layers)]
    weights = (rand(out_channels, layers, k_query, k_query), rand(out_channels),
               rand(out_channels, layers, k_support, k_support), rand(out_channels))
    return gen, query, support, weights


def dense(query, support, mask, weights, stride):
    padding = (weights[0].shape[-1] // 2,) * 2 + (weights[2].shape[-1] // 2,) * 2
    return reference.fused_hypercorrelation_cp_conv4d(query, support, mask, *weights, stride, padding)


shapes = dict(
    seed=st.integers(0, 2**31 - 1),
    batch=st.integers(1, 2),
    layers=st.integers(1, 3),
    channels=st.integers(1, 4),
    hq=st.integers(1, 7), wq=st.integers(1, 7), hs=st.integers(1, 9), ws=st.integers(1, 9),
    k_query=st.sampled_from([1, 3, 5]), k_support=st.sampled_from([1, 3, 5]),
    support_stride=st.integers(1, 4), query_stride=st.sampled_from([1, 1, 2]),
    mask_kind=st.sampled_from(MASK_KINDS), mask_size=st.integers(1, 12),
    chunk_elements=st.sampled_from([1, 7, 64, ffl.CHUNK_ELEMENTS]),
)


@settings(max_examples=examples(40), deadline=None)
@given(**shapes)
@example(seed=0, batch=1, layers=3, channels=4, hq=7, wq=7, hs=9, ws=9, k_query=3, k_support=5, support_stride=4,
         query_stride=1, mask_kind="empty", mask_size=12, chunk_elements=64)
@example(seed=1, batch=2, layers=2, channels=3, hq=5, wq=6, hs=7, ws=5, k_query=5, k_support=3, support_stride=2,
         query_stride=1, mask_kind="pixel", mask_size=7, chunk_elements=1)
@example(seed=2, batch=2, layers=3, channels=2, hq=6, wq=5, hs=9, ws=8, k_query=3, k_support=3, support_stride=3,
         query_stride=2, mask_kind="blob", mask_size=12, chunk_elements=7)
@example(seed=3, batch=1, layers=1, channels=1, hq=1, wq=1, hs=1, ws=1, k_query=1, k_support=1, support_stride=1,
         query_stride=1, mask_kind="full", mask_size=1, chunk_elements=1)
@example(seed=7, batch=2, layers=2, channels=3, hq=4, wq=5, hs=9, ws=8, k_query=3, k_support=1, support_stride=3,
         query_stride=1, mask_kind="random", mask_size=9, chunk_elements=16)  # active positions in no window
@example(seed=8, batch=1, layers=2, channels=2, hq=3, wq=3, hs=9, ws=9, k_query=1, k_support=3, support_stride=4,
         query_stride=1, mask_kind="blob", mask_size=9, chunk_elements=ffl.CHUNK_ELEMENTS)  # gaps between windows
def test_forward_matches_dense_reference(seed, batch, layers, channels, hq, wq, hs, ws, k_query, k_support,
                                         support_stride, query_stride, mask_kind, mask_size, chunk_elements):
    gen, query, support, weights = make_case(seed, batch, layers, channels, hq, wq, hs, ws, k_query, k_support)
    mask = make_mask(mask_kind, batch, mask_size, mask_size, gen)
    stride = (query_stride, query_stride, support_stride, support_stride)
    with chunk_budget(chunk_elements):
        out = ffl.fused_hypercorrelation_cp_conv4d(query, support, mask, *weights, stride, backend="torch")
    assert_close_dtype(out, dense(query, support, mask, weights, stride))


@pytest.mark.parametrize("mask_kind", MASK_KINDS)
@pytest.mark.parametrize("chunk_elements", [7, ffl.CHUNK_ELEMENTS])
def test_forward_placing_products_run_by_run_matches_dense_reference(mask_kind, chunk_elements):
    """The products reach the support windows' grid run by run (``hypertriton.ops._columns``, taken at
    400 px; too short to pay off at test sizes, so forced here): the same output as the reference."""
    gen, query, support, weights = make_case(11, 2, 3, 4, 6, 5, 11, 10, 3, 5)
    mask = make_mask(mask_kind, 2, 22, 20, gen)
    stride = (1, 1, 2, 2)
    run_by_run = []

    def runs_pay_off(*args):
        run_by_run.append(real_runs_pay_off(*args))
        return run_by_run[-1]

    real_runs_pay_off = _columns.runs_pay_off
    with chunk_budget(chunk_elements), mock.patch.object(_columns, "MIN_ELEMENTS_PER_RUN", 0), \
            mock.patch.object(_columns, "runs_pay_off", runs_pay_off):
        out = ffl.fused_hypercorrelation_cp_conv4d(query, support, mask, *weights, stride, backend="torch")
    assert_close_dtype(out, dense(query, support, mask, weights, stride))
    if mask_kind in ("blob", "random"):  # the support windows stop short of the map: placed, not copied whole
        assert any(run_by_run)


@settings(max_examples=examples(15), deadline=None)
@given(**shapes, upstream=st.sampled_from(["random", "sum"]), frozen=st.booleans(), soft_mask=st.booleans())
@example(seed=4, batch=2, layers=2, channels=3, hq=5, wq=4, hs=8, ws=7, k_query=3, k_support=5, support_stride=4,
         query_stride=1, mask_kind="blob", mask_size=10, chunk_elements=7, upstream="sum", frozen=False,
         soft_mask=True)
@example(seed=5, batch=1, layers=3, channels=2, hq=4, wq=4, hs=5, ws=5, k_query=5, k_support=3, support_stride=2,
         query_stride=2, mask_kind="empty", mask_size=5, chunk_elements=64, upstream="random", frozen=False,
         soft_mask=True)
@example(seed=6, batch=2, layers=2, channels=3, hq=5, wq=5, hs=9, ws=9, k_query=3, k_support=5, support_stride=4,
         query_stride=1, mask_kind="blob", mask_size=9, chunk_elements=16, upstream="random", frozen=True,
         soft_mask=False)
@example(seed=9, batch=2, layers=2, channels=2, hq=4, wq=3, hs=8, ws=9, k_query=3, k_support=1, support_stride=3,
         query_stride=1, mask_kind="random", mask_size=8, chunk_elements=16, upstream="random", frozen=False,
         soft_mask=False)
@example(seed=10, batch=2, layers=2, channels=3, hq=4, wq=4, hs=7, ws=7, k_query=3, k_support=3, support_stride=2,
         query_stride=1, mask_kind="pixel", mask_size=7, chunk_elements=16, upstream="random", frozen=True,
         soft_mask=True)  # frozen features, learnable mask: only the mask and the weights get gradients
def test_gradients_match_dense_reference(seed, batch, layers, channels, hq, wq, hs, ws, k_query, k_support,
                                         support_stride, query_stride, mask_kind, mask_size, chunk_elements,
                                         upstream, frozen, soft_mask):
    """``frozen``: the features need no gradient (HSNet's frozen backbone), only the conv weights do.
    ``soft_mask``: the mask (its zeros kept, elsewhere values in [0.2, 1.2)) needs a gradient too."""
    gen, query, support, weights = make_case(seed, batch, layers, channels, hq, wq, hs, ws, k_query, k_support,
                                             requires_grad=True)
    if frozen:
        query, support = [q.detach() for q in query], [s.detach() for s in support]
    mask = make_mask(mask_kind, batch, mask_size, mask_size, gen)
    if soft_mask:
        scale = 0.2 + torch.rand(mask.shape, generator=gen, dtype=mask.dtype)
        mask = (mask * scale).requires_grad_()
    stride = (query_stride, query_stride, support_stride, support_stride)
    inputs = ([*weights] if frozen else [*query, *support, *weights]) + ([mask] if soft_mask else [])
    expected = dense(query, support, mask, weights, stride)
    with chunk_budget(chunk_elements):  # the backward pass recomputes in chunks too
        out = ffl.fused_hypercorrelation_cp_conv4d(query, support, mask, *weights, stride, backend="torch")
        if upstream == "sum":  # a stride-0 upstream gradient
            got, want = torch.autograd.grad(out.sum(), inputs), torch.autograd.grad(expected.sum(), inputs)
        else:
            upstream_grad = torch.randn(out.shape, generator=gen, dtype=out.dtype)
            got = torch.autograd.grad(out, inputs, upstream_grad)
            want = torch.autograd.grad(expected, inputs, upstream_grad)
    for index, (g, w) in enumerate(zip(got, want)):
        assert_close_dtype(g, w, msg=lambda m, i=index: f"gradient of input {i}: {m}")


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_zero_feature_vectors_get_the_reference_gradient(backend):
    """A position whose features are all zero (query, or support inside the mask) has norm 0, where
    ``sqrt`` has no derivative: its gradient is the reference's (``norm``'s subgradient, 0), not NaN."""
    gen, query, support, weights = make_case(11, 1, 2, 3, 4, 4, 6, 6, 3, 3, requires_grad=True)
    with torch.no_grad():
        query[0][0, :, 1, 2] = 0
        support[1][0, :, 3, 3] = 0
    mask = torch.ones(1, 6, 6, dtype=torch.float64)
    stride = (1, 1, 2, 2)
    inputs = [*query, *support, *weights]
    out = ffl.fused_hypercorrelation_cp_conv4d(query, support, mask, *weights, stride, backend=backend)
    upstream = torch.randn(out.shape, generator=gen, dtype=out.dtype)
    got = torch.autograd.grad(out, inputs, upstream)
    want = torch.autograd.grad(dense(query, support, mask, weights, stride), inputs, upstream)
    for index, (g, w) in enumerate(zip(got, want)):
        assert torch.isfinite(g).all(), f"gradient of input {index} is not finite"
        assert_close_dtype(g, w, msg=lambda m, i=index: f"gradient of input {i}: {m}")


@settings(max_examples=examples(6), deadline=None)
@given(seed=st.integers(0, 2**31 - 1), batch=st.integers(1, 2), layers=st.integers(1, 3), channels=st.integers(1, 20),
       hq=st.integers(1, 6), wq=st.integers(1, 6), hs=st.integers(1, 8), ws=st.integers(1, 8),
       kernel=st.sampled_from([1, 3, 5]), support_stride=st.integers(1, 4), query_stride=st.sampled_from([1, 2]),
       mask_kind=st.sampled_from(MASK_KINDS), out_channels=st.sampled_from([3, 16, 17]))
@example(seed=0, batch=2, layers=3, channels=20, hq=5, wq=6, hs=8, ws=7, kernel=5, support_stride=4, query_stride=1,
         mask_kind="blob", out_channels=17)
@example(seed=1, batch=2, layers=2, channels=3, hq=4, wq=4, hs=6, ws=6, kernel=3, support_stride=2, query_stride=1,
         mask_kind="pixel", out_channels=16)
@example(seed=2, batch=1, layers=1, channels=2, hq=3, wq=3, hs=5, ws=5, kernel=3, support_stride=2, query_stride=1,
         mask_kind="empty", out_channels=3)
@needs_triton
def test_triton_backend_matches_dense_reference(seed, batch, layers, channels, hq, wq, hs, ws, kernel, support_stride,
                                                query_stride, mask_kind, out_channels):
    """The Triton support-branch kernel (interpreted on CPU) gives the dense result, in fp32."""
    gen, query, support, weights = make_case(seed, batch, layers, channels, hq, wq, hs, ws, kernel, kernel,
                                             out_channels=out_channels, dtype=torch.float32)
    mask = make_mask(mask_kind, batch, 2 * hs, 2 * ws, gen).float()
    stride = (query_stride, query_stride, support_stride, support_stride)
    out = ffl.fused_hypercorrelation_cp_conv4d(*on_device("triton", query, support, mask, weights[0], weights[1],
                                                          weights[2], weights[3]), stride, backend="triton")
    double = lambda ts: [t.double() for t in ts]  # noqa: E731
    expected = dense(double(query), double(support), mask.double(), double(weights), stride)
    assert_close_dtype(out.cpu(), expected, dtype=torch.float32, scale=10)


@settings(max_examples=examples(8), deadline=None)
@given(backend=st.sampled_from(["torch", "triton"] if TRITON_RUNS else ["torch"]), batch=st.integers(1, 2),
       layers=st.integers(1, 3), channels=st.integers(1, 4), hq=st.integers(1, 6), wq=st.integers(1, 6),
       hs=st.integers(1, 8), ws=st.integers(1, 8), kernel=st.sampled_from([1, 3, 5]), support_stride=st.integers(1, 5),
       mask_kind=st.sampled_from(helpers.MASK_KINDS), layout=st.sampled_from(helpers.LAYOUTS),
       grad=st.booleans(), seed=st.integers(0, 2**16))
@example(backend=EDGE_BACKEND, batch=1, layers=1, channels=1, hq=1, wq=1, hs=1, ws=1, kernel=3, support_stride=1,
         mask_kind="none", layout="contiguous", grad=True, seed=0)  # batch 1, 1x1 maps, no mask
@example(backend=EDGE_BACKEND, batch=2, layers=2, channels=3, hq=4, wq=5, hs=6, ws=7, kernel=3, support_stride=2,
         mask_kind="blob", layout="strided", grad=True, seed=1)  # non-contiguous, odd sizes
@example(backend=EDGE_BACKEND, batch=2, layers=2, channels=3, hq=3, wq=4, hs=3, ws=3, kernel=5, support_stride=4,
         mask_kind="zero", layout="channels_last", grad=True, seed=2)  # stride past the map, zero mask
@example(backend="torch", batch=1, layers=2, channels=3, hq=3, wq=3, hs=3, ws=3, kernel=3, support_stride=5,
         mask_kind="none", layout="strided", grad=True, seed=3)
def test_every_backend_forward_and_gradients_at_the_edge_cases(backend, batch, layers, channels, hq, wq, hs, ws,
                                                               kernel, support_stride, mask_kind, layout, grad,
                                                               seed):
    """Gradients through the triton backend (the default GPU training path) were checked by no test: a
    backward that raised on triton passed the whole suite."""
    device = DEVICES[backend]
    generator = torch.Generator().manual_seed(seed)
    query = [make_tensor((batch, channels, hq, wq), seed + i, layout, device=device) for i in range(layers)]
    support = [make_tensor((batch, channels, hs, ws), seed + 10 + i, layout, device=device) for i in range(layers)]
    weights = [torch.randn(3, layers, kernel, kernel, generator=generator), torch.randn(3, generator=generator),
               torch.randn(3, layers, kernel, kernel, generator=generator), torch.randn(3, generator=generator)]
    leaves = [*(t.detach().requires_grad_(grad) for t in (*query, *support)),  # detach() keeps the layout
              *(w.to(device).requires_grad_(grad) for w in weights)]
    ref_leaves = [t.detach().double().cpu().requires_grad_(grad) for t in leaves]
    mask = helpers.make_mask(mask_kind, batch, 2 * hs, 2 * ws, seed)
    stride = (1, 1, support_stride, support_stride)
    out = ffl.fused_hypercorrelation_cp_conv4d(leaves[:layers], leaves[layers:2 * layers],
                                               None if mask is None else mask.to(device), *leaves[2 * layers:],
                                               stride, backend=backend)
    ref = reference.fused_hypercorrelation_cp_conv4d(ref_leaves[:layers], ref_leaves[layers:2 * layers],
                                                     None if mask is None else mask.double(),
                                                     *ref_leaves[2 * layers:], stride, (kernel // 2,) * 4)
    assert_close_dtype(out.detach().cpu(), ref.detach(), torch.float32, scale=10)
    if grad:
        assert_gradients_match([out], [ref], leaves, ref_leaves, "random", scale=20)


@pytest.mark.parametrize("backend", backend_params("torch", "triton"))
@pytest.mark.parametrize("which", ["query", "support", "both"])
def test_missing_biases_count_as_zero(backend, which):
    gen, query, support, weights = make_case(13, 2, 2, 3, 5, 4, 6, 7, 3, 3, dtype=torch.float32)
    weight_query, bias_query, weight_support, bias_support = weights
    if which in ("query", "both"):
        bias_query = None
    if which in ("support", "both"):
        bias_support = None
    mask = make_mask("blob", 2, 12, 14, gen).float()
    out = ffl.fused_hypercorrelation_cp_conv4d(*on_device(backend, query, support, mask, weight_query, bias_query,
                                                          weight_support, bias_support), (1, 1, 2, 2), backend=backend)
    expected = dense(query, support, mask, (weight_query, bias_query, weight_support, bias_support), (1, 1, 2, 2))
    assert_close_dtype(out.cpu(), expected)


def test_gradcheck_float64():
    """torch.autograd.gradcheck (finite differences) on a small multi-chunk case with a blob mask."""
    gen, query, support, weights = make_case(7, 1, 2, 3, 4, 3, 5, 6, 3, 3, out_channels=2, requires_grad=True)
    mask = make_mask("blob", 1, 5, 6, gen)

    def fn(*inputs):
        return ffl.fused_hypercorrelation_cp_conv4d(inputs[:2], inputs[2:4], mask, *inputs[4:], (1, 1, 2, 2),
                                                    backend="torch")

    assert torch.autograd.gradcheck(fn, (*query, *support, *weights))


@pytest.mark.parametrize("backend", backend_params("torch", "triton", "reference"))
def test_second_derivatives_equal_the_references(backend):
    """A gradient penalty (``create_graph=True``) through the fused layer equals the einsum reference's,
    for the features, the mask and the weights. The explicit backward is not differentiable; under
    ``create_graph`` it recomputes through the reference (a once-differentiable backward returned
    constants there, so a penalty lost its terms silently)."""
    gen, query0, support0, weights0 = make_case(9, 1, 2, 3, 4, 3, 5, 6, 3, 3, out_channels=2)
    mask0 = make_mask("blob", 1, 5, 6, gen) * 0.75 + 0.25 * make_mask("blob", 1, 5, 6, gen)

    def penalty_gradients(backend, device, dtype):
        query = [q.to(device, dtype).requires_grad_() for q in query0]
        support = [s.to(device, dtype).requires_grad_() for s in support0]
        mask = mask0.to(device, dtype).requires_grad_()
        weights = [w.to(device, dtype).requires_grad_() for w in weights0]
        out = ffl.fused_hypercorrelation_cp_conv4d(query, support, mask, *weights, (1, 1, 2, 2), backend=backend)
        # The upstream gradient records a graph through a weight (or it does not: both ways).
        loss = (out.square() * weights[1].sum()).sum() + out.sum()
        grads = torch.autograd.grad(loss, query + [weights[0]], create_graph=True)
        penalty = sum(g.square().sum() for g in grads)
        return torch.autograd.grad(penalty, query + support + [mask, weights[0], weights[2]])

    check_second_derivatives(backend, DEVICES.get(backend, "cpu"), penalty_gradients)


def test_features_made_in_inference_mode_train_the_weights():
    """A frozen backbone run under ``torch.inference_mode()`` makes inference tensors; the conv weights
    still train on them (autograd cannot save inference tensors, so the layer keeps copies), with the
    gradients that ordinary tensors get, as HyperCorr followed by CenterPivotConv4d gives."""
    gen, query, support, weights = make_case(10, 1, 2, 3, 4, 3, 5, 6, 3, 3, out_channels=2, dtype=torch.float32)
    mask = make_mask("blob", 1, 5, 6, gen).float()
    with torch.inference_mode():
        frozen = [t.clone() for t in (*query, *support, mask)]
    grads = []
    for query_in, support_in, mask_in in ((query, support, mask), (frozen[:2], frozen[2:4], frozen[4])):
        leaves = [w.detach().requires_grad_() for w in weights]
        out = ffl.fused_hypercorrelation_cp_conv4d(query_in, support_in, mask_in, *leaves, (1, 1, 2, 2),
                                                   backend="torch")
        grads.append(torch.autograd.grad(out.square().sum(), leaves))
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_module_form_equals_conv_of_hypercorrelation():
    """``fused_hypercorrelation_cp_conv(..., conv)`` equals ``conv(hypercorrelation level)``."""
    from hypertriton import CenterPivotConv4d

    torch.manual_seed(0)
    conv = CenterPivotConv4d(3, 8, (3, 3, 5, 5), (1, 1, 4, 4)).double()
    query = [torch.randn(2, 6, 9, 8, dtype=torch.float64) for _ in range(3)]
    support = [torch.randn(2, 6, 11, 10, dtype=torch.float64) for _ in range(3)]
    mask = make_mask("blob", 2, 40, 40, torch.Generator().manual_seed(0))
    out = ffl.fused_hypercorrelation_cp_conv(query, support, mask, conv, backend="torch")
    want = conv(reference.hypercorrelation(query, support, mask)[0])
    assert out.shape == (2, 8, 9, 8, 3, 3)
    assert_close_dtype(out, want)
    assert_close_dtype(ffl.fused_hypercorrelation_cp_conv(query, support, mask, conv, backend="reference"), want)


@pytest.mark.parametrize("backend", backend_params("torch", "triton"))
@pytest.mark.parametrize("where", ["support_masked_out", "query"])
def test_non_finite_features_keep_dense_semantics(where, backend):
    """A NaN support feature under a zero mask, or a NaN query feature, spreads NaN as in the dense path
    (the Triton kernel's ReLU once turned NaN into 0)."""
    dtype = torch.float32 if backend == "triton" else torch.float64  # the kernels take fp32/fp16/bf16
    gen, query, support, weights = make_case(11, 2, 2, 3, 5, 5, 8, 8, 3, 3, dtype=dtype)
    mask = torch.zeros(2, 8, 8, dtype=dtype)
    mask[:, :3, :3] = 1.0
    if where == "support_masked_out":
        support[1][0, 1, 5, 6] = float("nan")  # not a pivot: only the support-dim branch reads it
    else:
        query[0][1, 2, 4, 0] = float("nan")
    out = ffl.fused_hypercorrelation_cp_conv4d(*on_device(backend, query, support, mask), *on_device(backend, weights),
                                               (1, 1, 2, 2), backend=backend)
    double = lambda ts: [t.double() for t in ts]  # noqa: E731
    expected = dense(double(query), double(support), mask.double(), double(weights), (1, 1, 2, 2))
    assert expected.isnan().any()  # the case exercises the property
    assert_close_dtype(out.cpu(), expected, dtype=dtype)  # NaNs at the same places, the rest close


@pytest.mark.parametrize("backend", backend_params("torch", "triton"))
@pytest.mark.parametrize("value, query_nan", [(1e20, True), (3e38, False), (3e38, True)])
def test_huge_finite_features_at_masked_out_positions_correlate_to_zero(backend, value, query_nan):
    """Finite support features too large for an fp32 norm (1e20) or product (3e38) at a masked-out
    position: the dense path multiplies them by the zero mask first, so their correlations are 0. The
    fused layer computes that position anyway (its channel sum overflows; every position does when the
    query holds a NaN) and once gave NaN in its whole column there."""
    gen, query, support, weights = make_case(11, 2, 2, 3, 5, 5, 8, 8, 3, 3, dtype=torch.float32)
    mask = torch.zeros(2, 8, 8)
    mask[:, :3, :3] = 1.0
    support[1][:, :, 5, 6] = value
    if query_nan:
        query[0][1, 2, 4, 0] = float("nan")
    out = ffl.fused_hypercorrelation_cp_conv4d(*on_device(backend, query, support, mask), *on_device(backend, weights),
                                               (1, 1, 2, 2), backend=backend)
    double = lambda ts: [t.double() for t in ts]  # noqa: E731
    expected = dense(double(query), double(support), mask.double(), double(weights), (1, 1, 2, 2))
    assert expected.isnan().any() == query_nan and not expected.isnan().all()
    assert_close_dtype(out.cpu(), expected, dtype=torch.float32)  # NaNs at the same places, the rest close


class _LargestTensor(TorchDispatchMode):
    """Records the largest tensor any op produces while active."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        for tensor in (result if isinstance(result, (tuple, list)) else (result,)):
            if isinstance(tensor, torch.Tensor):
                self.largest = max(self.largest, tensor.numel())
        return result


@pytest.mark.parametrize("mask_kind", ["blob", "full"])
def test_never_materializes_the_4d_tensor(mask_kind):
    """No intermediate (forward or backward) comes near the ``[B, L, Hq, Wq, Hs, Ws]`` hypercorrelation."""
    layers, side = 3, 12
    gen, query, support, weights = make_case(3, 1, layers, 2, side, side, side, side, 3, 5, out_channels=4,
                                             dtype=torch.float32, requires_grad=True)
    mask = make_mask(mask_kind, 1, 48, 48, gen).float()
    four_d = layers * side ** 4  # 62208 elements; output is 4 * 144 * 9 = 5184
    with chunk_budget(2000), _LargestTensor() as tracker:
        out = ffl.fused_hypercorrelation_cp_conv4d(query, support, mask, *weights, (1, 1, 4, 4), backend="torch")
        out.square().sum().backward()
    assert tracker.largest <= four_d / 8, (tracker.largest, four_d)


@pytest.mark.parametrize("mask_kind, query_stride, chunk_elements", [
    ("blob", 1, ffl.CHUNK_ELEMENTS), ("full", 1, ffl.CHUNK_ELEMENTS), ("pixel", 1, ffl.CHUNK_ELEMENTS),
    # The query branch's own products (their query normalized in reduced precision): for the pivots beyond
    # the support branch's capture (2 of 9 captured), and with a query stride (none captured).
    ("full", 1, 2 * 9 * 9 * 3), ("blob", 2, ffl.CHUNK_ELEMENTS)])
def test_reduced_precision_correlation_is_close(mask_kind, query_stride, chunk_elements):
    """bf16 correlation products (and its channels-last buffer, over windows or the whole map): within the
    bf16 tolerance of the float64 dense result (fp32 output)."""
    gen, query, support, weights = make_case(5, 1, 3, 16, 9, 9, 9, 9, 3, 5, out_channels=4, dtype=torch.float32)
    side = 9 if mask_kind == "pixel" else 36  # a pixel at the support map's own size survives the resize
    mask = make_mask(mask_kind, 1, side, side, gen).float()
    stride = (query_stride, query_stride, 4, 4)
    with chunk_budget(chunk_elements):
        out = ffl.fused_hypercorrelation_cp_conv4d(query, support, mask, *weights, stride, backend="torch",
                                                   correlation_dtype=torch.bfloat16)
    assert out.dtype == torch.float32
    double = lambda ts: [t.double() for t in ts]  # noqa: E731
    expected = dense(double(query), double(support), mask.double(), double(weights), stride)
    exact = ffl.fused_hypercorrelation_cp_conv4d(query, support, mask, *weights, stride, backend="torch")
    assert_close_dtype(exact, expected, dtype=torch.float32, scale=10)
    assert_close_dtype(out, expected, dtype=torch.bfloat16)
    assert not torch.equal(out, exact)  # the option does change the products


@pytest.mark.parametrize("grad", [False, True], ids=["no-grad", "grad"])
def test_under_autocast_the_correlation_and_convs_take_the_autocast_dtype(grad):
    """Under ``torch.autocast`` the op runs (no bf16/fp32 mix inside), returns the features' dtype, equals
    an explicit ``correlation_dtype`` of the autocast dtype, and stays within bf16 accuracy of the fp64
    reference."""
    gen, query, support, weights = make_case(6, 2, 2, 8, 6, 6, 7, 7, 3, 3, out_channels=4, dtype=torch.float32,
                                             requires_grad=grad)
    mask = make_mask("blob", 2, 14, 14, gen).float()
    explicit = ffl.fused_hypercorrelation_cp_conv4d(query, support, mask, *weights, (1, 1, 2, 2), backend="torch",
                                                    correlation_dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = ffl.fused_hypercorrelation_cp_conv4d(query, support, mask, *weights, (1, 1, 2, 2), backend="torch")
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, explicit, rtol=0, atol=0)
    want = dense([q.detach().double() for q in query], [s.detach().double() for s in support], mask.double(),
                 [w.detach().double() for w in weights], (1, 1, 2, 2))
    assert_close_dtype(out, want, dtype=torch.bfloat16, scale=4)
    if grad:
        out.sum().backward()
        assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in (*query, weights[0], weights[2]))


@pytest.mark.parametrize("bias", [True, False], ids=["biases", "no-biases"])
def test_the_reference_backend_ignores_autocast(bias):
    """The einsum oracle computes in the features' dtype under autocast too (without biases it returned
    autocast's bf16)."""
    gen, query, support, weights = make_case(7, 1, 2, 4, 5, 5, 6, 6, 3, 3, dtype=torch.float32)
    if not bias:
        weights = (weights[0], None, weights[2], None)
    mask = make_mask("blob", 1, 12, 12, gen)
    exact = ffl.fused_hypercorrelation_cp_conv4d(query, support, mask, *weights, (1, 1, 2, 2), backend="reference")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = ffl.fused_hypercorrelation_cp_conv4d(query, support, mask, *weights, (1, 1, 2, 2), backend="reference")
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, exact, rtol=0, atol=0)


def test_half_precision_features_return_their_dtype():
    gen, query, support, weights = make_case(9, 1, 2, 4, 5, 5, 6, 6, 3, 3, dtype=torch.float32)
    mask = make_mask("random", 1, 6, 6, gen)
    out = ffl.fused_hypercorrelation_cp_conv4d([q.bfloat16() for q in query], [s.bfloat16() for s in support],
                                               mask, *weights, (1, 1, 2, 2), backend="torch")
    assert out.dtype == torch.bfloat16
    expected = dense([q.bfloat16().double() for q in query], [s.bfloat16().double() for s in support], mask,
                     [w.double() for w in weights], (1, 1, 2, 2))
    assert_close_dtype(out, expected, dtype=torch.bfloat16)


@pytest.mark.parametrize("case, error, match", [
    ("level_sizes", ValueError, "ONE pyramid level"),
    ("weight_channels", ValueError, "one input channel per layer"),
    ("correlation_dtype", TypeError, "correlation_dtype"),
    # Once blamed on the fp32 query features, which the kernels saw cast to it.
    pytest.param("triton_correlation_dtype", TypeError, "correlation_dtype: the triton backend takes float32, "
                 "float16 or bfloat16, got torch.float64", marks=needs_triton),
    ("padding", ValueError, "padding"),
    ("conv", TypeError, "CenterPivotConv4d"),
])
def test_bad_input_is_named(case, error, match):
    gen, query, support, weights = make_case(0, 1, 2, 3, 5, 5, 6, 6, 3, 3)
    kwargs = {}
    if case == "level_sizes":
        query[1] = torch.randn(1, 3, 4, 5, dtype=torch.float64)
    if case == "weight_channels":
        weights = (torch.randn(3, 3, 3, 3, dtype=torch.float64),) + weights[1:]
    if case == "correlation_dtype":
        kwargs["correlation_dtype"] = torch.int8
    if case == "triton_correlation_dtype":
        query, support, weights = [[t.float() for t in ts] for ts in (query, support, weights)]
        kwargs.update(correlation_dtype=torch.float64, backend="triton")
    if case == "padding":
        kwargs["padding"] = (0, 0, 1, 1)
    with pytest.raises(error, match=match):
        if case == "conv":
            ffl.fused_hypercorrelation_cp_conv(query, support, None, object())
        else:
            ffl.fused_hypercorrelation_cp_conv4d(query, support, None, *weights, (1, 1, 2, 2), **kwargs)


def test_blob_mask_skips_most_support_positions():
    """The active set follows the object's area: a quarter-size blob leaves most positions inactive."""
    mask = make_mask("blob", 1, 40, 40, torch.Generator().manual_seed(1))
    resized = reference.resize_mask(mask, (20, 20)).flatten(1)
    support = [torch.randn(1, 4, 20, 20, dtype=torch.float64).flatten(2)[0]]
    active = ffl._active_positions(resized[0], support, query_finite=True)
    assert active is not None
    assert active.numel() == int((resized[0] != 0).sum())
    assert active.numel() < 0.75 * 400
    assert math.isclose(float(resized[0, active].abs().sum()), float(resized[0].abs().sum()))


def test_active_positions_hold_every_non_finite_support_position():
    """Masked-out support positions with a NaN or inf feature stay active (their correlations are NaN),
    found without reading anything back to the host (a GPU would wait); so do positions whose finite
    features overflow the fp32 channel sum (exact, at the cost of their correlations). fp16 features are
    summed in fp32: their sums past fp16's range do not count."""
    generator = torch.Generator().manual_seed(5)
    mask = torch.zeros(30)
    mask[:5] = 1.0
    support = [torch.randn(3, 30, generator=generator), torch.randn(4, 30, generator=generator)]
    assert ffl._active_positions(mask, support, query_finite=True).tolist() == [0, 1, 2, 3, 4]
    support[1][2, 17] = float("nan")
    support[0][0, 23] = float("-inf")
    assert ffl._active_positions(mask, support, query_finite=True).tolist() == [0, 1, 2, 3, 4, 17, 23]
    assert ffl._active_positions(mask, support, query_finite=False) is None  # a NaN query reaches all
    large = [torch.full((4, 30), 6e4, dtype=torch.float16)]  # channel sums past fp16's range, not fp32's
    assert ffl._active_positions(mask, large, query_finite=True).tolist() == [0, 1, 2, 3, 4]
    huge = [torch.full((4, 30), 1.0), torch.full((4, 30), 1.0)]
    huge[1][:, 9] = 3e38  # finite entries whose fp32 sum overflows: active, at the cost of its correlations
    assert ffl._active_positions(mask, huge, query_finite=True).tolist() == [0, 1, 2, 3, 4, 9]


@pytest.mark.parametrize("mask_kind, budget, own_products", [
    ("full", ffl.CHUNK_ELEMENTS, False), ("blob", ffl.CHUNK_ELEMENTS, False),
    ("full", 2 * 6 * 5 * 2, True), ("blob", 2 * 6 * 5 * 2, True),
    ("full", 300, True),  # 5 of 20 pivots captured, convolved 2 at a time: the last step is short
])
def test_query_branch_reuses_the_support_branchs_correlations(mask_kind, budget, own_products):
    """With query stride 1 the support branch's products hold the pivots' correlations, so the query branch
    computes none of its own while they fit in one chunk's budget (here the whole batch element's pivots,
    or only two of them, or five convolved two at a time, the last step short, the rest with their own
    products); the output equals the dense reference."""
    gen, query, support, weights = make_case(14, 2, 2, 3, 6, 5, 9, 8, 3, 5)
    mask = make_mask(mask_kind, 2, 9, 8, gen)
    stride = (1, 1, 2, 2)
    calls = []
    original = ffl._query_branch_chunk

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    with chunk_budget(budget), mock.patch.object(ffl, "_query_branch_chunk", counting):
        got = ffl.fused_hypercorrelation_cp_conv4d(query, support, mask, *weights, stride, backend="torch")
    assert bool(calls) == own_products
    assert_close_dtype(got, dense(query, support, mask, weights, stride))


@pytest.mark.parametrize("backend", backend_params("torch", "triton"))
@pytest.mark.parametrize("mask_kind", MASK_KINDS)
def test_bias_windows_are_exactly_those_without_an_active_position(backend, mask_kind):
    """``return_bias_windows``: a flagged window holds exactly the biases at every query position of the
    dense result, and a window is flagged if and only if no active support position lies in it."""
    dtype = torch.float32 if backend == "triton" else torch.float64
    gen, query, support, weights = make_case(15, 2, 2, 3, 5, 4, 13, 11, 3, 5, dtype=dtype)
    mask = make_mask(mask_kind, 2, 13, 11, gen).to(dtype)  # at the support map's size: no resize
    stride, kernel, pad = (1, 1, 4, 4), 5, 2
    out, flags = ffl.fused_hypercorrelation_cp_conv4d(*on_device(backend, query, support, mask),
                                                      *on_device(backend, weights), stride, backend=backend,
                                                      return_bias_windows=True)
    out, flags = out.cpu(), flags.cpu()
    assert flags.shape == (2, 4 * 3) and flags.dtype == torch.bool
    double = lambda ts: [t.double() for t in ts]  # noqa: E731
    expected = dense(double(query), double(support), mask.double(), double(weights), stride)
    assert_close_dtype(out, expected, dtype=dtype)
    bias = weights[1].double() + weights[3].double()
    active = (mask != 0).double()[:, None]
    seen = torch.nn.functional.max_pool2d(active, kernel, 4, pad).flatten(1) > 0  # [B, Hs'*Ws']
    assert torch.equal(flags.cpu(), ~seen)
    columns, ours = expected.flatten(4), out.flatten(4)  # [B, Cout, Hq, Wq, Hs'*Ws']
    for b in range(2):
        for window in flags[b].nonzero().flatten().tolist():
            assert torch.equal(columns[b, :, :, :, window], bias[:, None, None].expand(-1, 5, 4))
            # what the learner's second layer relies on: one value per channel at every query position
            assert torch.equal(ours[b, :, :, :, window], ours[b, :, :1, :1, window].expand(-1, 5, 4))


@pytest.mark.parametrize("backend", backend_params("torch", "triton"))
def test_a_window_all_in_the_padding_with_an_active_pivot_is_not_bias_only(backend):
    """Support padding >= kernel (legal, never HSNet's): a window can lie in the padding while its pivot,
    outside it, is active; the query branch then adds to it, so it is not flagged, and the torch backend's
    column split falls back to the dense output."""
    gen, query, support, weights = make_case(16, 2, 1, 4, 3, 3, 4, 4, 3, 1, out_channels=2, dtype=torch.float32)
    mask = torch.ones(2, 4, 4)
    mask[:, 3, 3] = 0  # not all active: the windows are looked at
    mask[1, 0, 0] = 0  # item 1: the pivot inactive too, so its window holds the biases only
    stride, padding = (1, 1, 8, 8), (1, 1, 1, 1)
    want = reference.center_pivot_conv4d(reference.hypercorrelation(query, support, mask)[0], *weights, stride,
                                         padding)
    with torch.no_grad():
        out, flags = ffl.fused_hypercorrelation_cp_conv4d(*on_device(backend, query, support, mask),
                                                          *on_device(backend, weights), stride, padding,
                                                          backend=backend, return_bias_windows=True)
        out, flags = out.cpu(), flags.cpu()
        split = ffl.fused_hypercorrelation_cp_conv4d(query, support, mask, *weights, stride, padding,
                                                     backend="torch", column_split_share=0.0)
    assert flags.tolist() == [[False], [True]]
    assert_close_dtype(out, want, dtype=torch.float32)
    assert (want[0] - (weights[1] + weights[3]).view(-1, 1, 1, 1, 1)).abs().max() > 0.1  # item 0 is not bias
    assert isinstance(split, torch.Tensor)
    assert_close_dtype(split, want, dtype=torch.float32)


@pytest.mark.parametrize("pixel, computed", [((1, 1), False), ((2, 4), True)])
def test_support_windows_cover_exactly_what_an_active_position_reaches(pixel, computed):
    """One active pixel: only the conv windows that contain it are computed (none when it falls between
    windows), and the output still equals the dense reference (the other windows hold the biases)."""
    gen, query, support, weights = make_case(10, 1, 2, 3, 4, 4, 5, 6, 3, 1)
    mask = torch.zeros(1, 5, 6, dtype=torch.float64)
    mask[0, pixel[0], pixel[1]] = 1.0
    stride = (1, 1, 2, 2)
    spec = ffl._Spec(layers=2, stride=stride, padding=(1, 1, 0, 0), out_size=(4, 4, 3, 3), in_size=(4, 4, 5, 6),
                     compute_dtype=torch.float64, correlation_dtype=torch.float64, chunk_elements=64)
    active = torch.tensor([pixel[0] * 6 + pixel[1]])
    windows = ffl._support_windows(active, 5, 6, (1, 1), spec)
    assert windows.empty != computed
    if computed:  # the 1x1 window at output (1, 2) reads exactly input (2, 4)
        assert (windows.rows, windows.cols, windows.grid) == (slice(1, 2), slice(2, 3), (1, 1))
    out = ffl.fused_hypercorrelation_cp_conv4d(query, support, mask, *weights, stride, backend="torch")
    assert_close_dtype(out, dense(query, support, mask, weights, stride))


def test_chunk_elements_argument_bounds_the_chunks_and_is_checked():
    """An explicit working-chunk size gives the same result (here one row per chunk), and a bad one is named."""
    gen, query, support, weights = make_case(11, 1, 2, 3, 5, 4, 6, 6, 3, 3)
    mask = make_mask("blob", 1, 12, 12, gen)
    want = dense(query, support, mask, weights, (1, 1, 2, 2))
    got = ffl.fused_hypercorrelation_cp_conv4d(query, support, mask, *weights, (1, 1, 2, 2), backend="torch",
                                               chunk_elements=1)
    assert_close_dtype(got, want)
    with pytest.raises(ValueError, match="chunk_elements"):
        ffl.fused_hypercorrelation_cp_conv4d(query, support, mask, *weights, (1, 1, 2, 2), backend="torch",
                                             chunk_elements=0)


@pytest.mark.parametrize("mask_kind, rows", [("blob", (0, 3)), ("full", (2, 5)), ("empty", (1, 2)), ("random", (4, 7))])
def test_output_rows_are_the_full_outputs_rows(mask_kind, rows):
    """``output_rows``: the kept rows of the full output, exactly what a slab with halo rows needs."""
    gen, query, support, weights = make_case(12, 2, 2, 3, 7, 5, 8, 6, 5, 3)
    mask = make_mask(mask_kind, 2, 16, 12, gen)
    stride = (1, 1, 2, 2)
    full = ffl.fused_hypercorrelation_cp_conv4d(query, support, mask, *weights, stride, backend="torch")
    with chunk_budget(16):
        got = ffl.fused_hypercorrelation_cp_conv4d(query, support, mask, *weights, stride, backend="torch",
                                                   output_rows=rows)
    assert got.shape == (2, 3, rows[1] - rows[0], *full.shape[3:])
    assert_close_dtype(got, full[:, :, rows[0]:rows[1]])


@pytest.mark.parametrize("backend, device", available_backends(), ids=[name for name, _ in available_backends()])
def test_an_empty_batch_gives_an_empty_output_and_gradients(backend, device):
    _, query, support, weights = make_case(17, 0, 2, 3, 5, 4, 6, 6, 3, 3, dtype=torch.float32, requires_grad=True)
    query, support = [q.to(device) for q in query], [s.to(device) for s in support]
    weights = [w.to(device) for w in weights]
    out = ffl.fused_hypercorrelation_cp_conv4d(query, support, torch.ones(0, 24, 24, device=device), *weights,
                                               (1, 1, 2, 2), backend=backend)
    assert out.shape == (0, 3, 5, 4, 3, 3)
    out.sum().backward()
    assert torch.equal(weights[0].grad, torch.zeros_like(weights[0])) and query[0].grad.shape == query[0].shape


def test_output_rows_refuses_what_it_cannot_do():
    gen, query, support, weights = make_case(13, 1, 2, 3, 5, 5, 6, 6, 3, 3)
    args = (query, support, None, *weights, (1, 1, 2, 2))
    for bad in [(3, 3), (-1, 2), (0, 6)]:
        with pytest.raises(ValueError, match="output_rows"):
            ffl.fused_hypercorrelation_cp_conv4d(*args, backend="torch", output_rows=bad)
    for bad in [(0, 1, 2), (0.0, 2.5), 2]:
        with pytest.raises(TypeError, match=r"output_rows: expected a pair of ints \(lo, hi\), got"):
            ffl.fused_hypercorrelation_cp_conv4d(*args, backend="torch", output_rows=bad)
    with pytest.raises(ValueError, match="torch backend without gradients"):
        ffl.fused_hypercorrelation_cp_conv4d(*args, backend="reference", output_rows=(0, 2))
    with pytest.raises(ValueError, match="torch backend without gradients"):
        ffl.fused_hypercorrelation_cp_conv4d([q.requires_grad_() for q in query], support, None, *weights,
                                             (1, 1, 2, 2), backend="torch", output_rows=(0, 2))


@settings(max_examples=examples(30), deadline=None)
@given(**shapes)
@example(seed=0, batch=2, layers=2, channels=3, hq=5, wq=4, hs=9, ws=9, k_query=3, k_support=5, support_stride=4,
         query_stride=1, mask_kind="empty", mask_size=9, chunk_elements=64)  # nothing active: every window constant
@example(seed=1, batch=1, layers=1, channels=1, hq=1, wq=1, hs=1, ws=1, k_query=1, k_support=1, support_stride=1,
         query_stride=1, mask_kind="full", mask_size=1, chunk_elements=1)  # 1x1 maps, nothing constant
@example(seed=8, batch=1, layers=2, channels=2, hq=3, wq=3, hs=9, ws=9, k_query=1, k_support=3, support_stride=4,
         query_stride=1, mask_kind="blob", mask_size=9, chunk_elements=7)  # gaps between windows
@example(seed=9, batch=2, layers=3, channels=2, hq=6, wq=7, hs=9, ws=8, k_query=5, k_support=3, support_stride=2,
         query_stride=1, mask_kind="pixel", mask_size=12, chunk_elements=ffl.CHUNK_ELEMENTS)
def test_column_split_output_equals_the_dense_one(seed, batch, layers, channels, hq, wq, hs, ws, k_query, k_support,
                                                  support_stride, query_stride, mask_kind, mask_size,
                                                  chunk_elements):
    """``column_split_share``: the output as a column split per batch element holds the dense reference's
    values; its constant columns are exactly the bias-only windows, stored once as the biases; with a
    share above what the windows reach, the dense tensor comes back instead."""
    from hypertriton.ops.layout import ColumnSplit

    gen, query, support, weights = make_case(seed, batch, layers, channels, hq, wq, hs, ws, k_query, k_support)
    mask = make_mask(mask_kind, batch, mask_size, mask_size, gen)
    stride = (1, 1, support_stride, support_stride)
    want = dense(query, support, mask, weights, stride)
    with torch.no_grad(), chunk_budget(chunk_elements):
        splits, flags = ffl.fused_hypercorrelation_cp_conv4d(query, support, mask, *weights, stride, backend="torch",
                                                             return_bias_windows=True, column_split_share=0.0)
        share = float(flags.double().mean())
        above = ffl.fused_hypercorrelation_cp_conv4d(query, support, mask, *weights, stride, backend="torch",
                                                     column_split_share=share + 1e-6)
    assert isinstance(splits, list) and len(splits) == batch and all(isinstance(s, ColumnSplit) for s in splits)
    assert isinstance(above, torch.Tensor)
    assert_close_dtype(above, want)
    bias = weights[1] + weights[3]
    for b, split in enumerate(splits):
        assert split.size == tuple(want.shape[2:])
        assert torch.equal(split.is_constant, flags[b])
        assert torch.equal(split.varying_index, (~flags[b]).nonzero().flatten())
        assert split.varying.shape == (want.shape[2] * want.shape[3], split.varying_index.numel(), 3)
        assert torch.equal(split.first_row[flags[b]], bias.expand(int(flags[b].sum()), 3))
        assert_close_dtype(split.dense(), want[b])


def test_column_split_refuses_what_it_cannot_do():
    gen, query, support, weights = make_case(14, 1, 2, 3, 5, 5, 6, 6, 3, 3)
    args = (query, support, None, *weights, (1, 1, 2, 2))
    with pytest.raises(ValueError, match="column_split_share.*grad mode True"):
        ffl.fused_hypercorrelation_cp_conv4d(*args, backend="torch", column_split_share=0.3)
    with torch.no_grad():
        for kwargs in (dict(backend="reference"), dict(backend="torch", output_rows=(0, 2))):
            with pytest.raises(ValueError, match="column_split_share"):
                ffl.fused_hypercorrelation_cp_conv4d(*args, column_split_share=0.3, **kwargs)


@pytest.mark.parametrize("mask_kind", ["blob", "pixel"])
def test_column_split_under_autocast_keeps_the_dense_outputs_values(mask_kind):
    """Under bf16 autocast only the products and convs run in bf16: the column split stores the same fp32
    values as the dense output (not values rounded to bf16)."""
    gen, query, support, weights = make_case(16, 2, 3, 4, 6, 5, 13, 11, 3, 5, dtype=torch.float32)
    mask = make_mask(mask_kind, 2, 13, 11, gen).float()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        want = ffl.fused_hypercorrelation_cp_conv4d(query, support, mask, *weights, (1, 1, 4, 4), backend="torch")
        splits = ffl.fused_hypercorrelation_cp_conv4d(query, support, mask, *weights, (1, 1, 4, 4), backend="torch",
                                                      column_split_share=0.0)
    for b, split in enumerate(splits):
        assert split.varying.dtype == split.first_row.dtype == torch.float32
        assert torch.equal(split.dense(), want[b])


def test_a_hooked_conv_is_called_on_the_dense_hypercorrelation():
    """fused_hypercorrelation_cp_conv promises conv(hypercorrelation(...)[0]); with hooks on conv or its
    branches (weight_norm and its kind, feature capture) it calls conv so that they run, and refuses the
    fused-only options. It read the weights past the hooks (a conv1 hook zeroing its output was ignored)."""
    from hypertriton import CenterPivotConv4d

    gen, query, support, _ = make_case(12, 1, 2, 4, 5, 5, 6, 6, 3, 3, dtype=torch.float32)
    mask = make_mask("blob", 1, 12, 12, gen)
    conv = CenterPivotConv4d(2, 3, 3, (1, 1, 2, 2))
    handle = conv.conv1.register_forward_hook(lambda module, args, output: torch.zeros_like(output))
    try:
        got = ffl.fused_hypercorrelation_cp_conv(query, support, mask, conv)
        with pytest.raises(ValueError, match=r"conv: has hooks.*\['return_bias_windows'\]"):
            ffl.fused_hypercorrelation_cp_conv(query, support, mask, conv, return_bias_windows=True)
        # Two levels are refused as without hooks (the dense stack convolved its deepest level alone).
        two_levels = [query[0], torch.randn(1, 4, 3, 3)]
        with pytest.raises(ValueError, match="expected the layers of ONE pyramid level"):
            ffl.fused_hypercorrelation_cp_conv(two_levels, [support[0], torch.randn(1, 4, 3, 3)], mask, conv)
    finally:
        handle.remove()
    corr = reference.hypercorrelation([q.double() for q in query], [s.double() for s in support], mask.double())[0]
    want = reference.center_pivot_conv4d(corr, torch.zeros_like(conv.conv1.weight).double(), None,
                                         conv.conv2.weight.double(), conv.conv2.bias.double(), (1, 1, 2, 2), (1,) * 4)
    assert_close_dtype(got, want, torch.float32)
