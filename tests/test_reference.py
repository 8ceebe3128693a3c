"""The einsum oracle itself, checked against hand-written loops on tiny cases and float64 gradcheck."""

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from hypertriton import reference


def loop_correlation(q, s):
    """relu(cosine similarity) by explicit loops, with the original's eps-on-norm."""
    b, c, hq, wq = q.shape
    hs, ws = s.shape[-2:]
    out = torch.zeros(b, hq, wq, hs, ws, dtype=torch.float64)
    for n, i, j, k, l in itertools.product(range(b), range(hq), range(wq), range(hs), range(ws)):
        u, v = q[n, :, i, j].double(), s[n, :, k, l].double()
        cos = float(u @ v) / ((math.sqrt(float(u @ u)) + 1e-5) * (math.sqrt(float(v @ v)) + 1e-5))
        out[n, i, j, k, l] = max(cos, 0.0)
    return out


def loop_center_pivot(x, wq, bq, ws, bs, stride, padding):
    """Both branches by explicit loops over output positions, channels and taps."""
    b, c, hq, wq_, hs, ws_ = x.shape
    sqh, sqw, ssh, ssw = stride
    pqh, pqw, psh, psw = padding
    cout = wq.shape[0]
    dims = [math.ceil(hq / sqh), math.ceil(wq_ / sqw), math.ceil(hs / ssh), math.ceil(ws_ / ssw)]
    out = torch.zeros(b, cout, *dims, dtype=torch.float64)

    def at(n, ch, i, j, k, l):
        inside = 0 <= i < hq and 0 <= j < wq_ and 0 <= k < hs and 0 <= l < ws_
        return float(x[n, ch, i, j, k, l]) if inside else 0.0

    for n, o, i, j, u, v in itertools.product(range(b), range(cout), *map(range, dims)):
        total = float(bq[o]) + float(bs[o])
        for ch in range(c):
            for a, e in itertools.product(range(wq.shape[2]), range(wq.shape[3])):
                total += float(wq[o, ch, a, e]) * at(n, ch, i * sqh - pqh + a, j * sqw - pqw + e, u * ssh, v * ssw)
            for a, e in itertools.product(range(ws.shape[2]), range(ws.shape[3])):
                total += float(ws[o, ch, a, e]) * at(n, ch, i * sqh, j * sqw, u * ssh - psh + a, v * ssw - psw + e)
        out[n, o, i, j, u, v] = total
    return out


def test_correlation_matches_loops():
    torch.manual_seed(0)
    q, s = torch.randn(2, 3, 2, 3), torch.randn(2, 3, 3, 2)
    s[0, :, 1, 1] = 0  # a masked-out support position: exactly zero correlations
    expected = loop_correlation(q, s)
    torch.testing.assert_close(reference.correlation(q.double(), s.double()), expected)
    assert (reference.correlation(q, s)[0, :, :, 1, 1] == 0).all()


def test_correlation_of_1x1_maps_and_of_a_zero_mask():
    torch.manual_seed(5)
    q, s = torch.randn(1, 4, 1, 1, dtype=torch.float64), torch.randn(1, 4, 1, 1, dtype=torch.float64)
    torch.testing.assert_close(reference.correlation(q, s), loop_correlation(q, s))
    levels = reference.hypercorrelation([q.expand(1, 4, 3, 2)], [s.expand(1, 4, 2, 3)], torch.zeros(1, 5, 5))
    assert torch.equal(levels[0], torch.zeros(1, 1, 3, 2, 2, 3, dtype=torch.float64))


def test_resize_mask_is_bilinear_with_aligned_corners():
    # By hand: 2 -> 4 points per side with the corners kept, so output point i sits at input i/3 and
    # a single 1 in the corner spreads as (1 - i/3)(1 - j/3). (Half-pixel centres would give 1, 3/4, 1/4,
    # 0 along a side; from 2 to 3 points both conventions agree.)
    mask = torch.tensor([[[1.0, 0.0], [0.0, 0.0]]])
    side = torch.tensor([1.0, 2 / 3, 1 / 3, 0.0])
    torch.testing.assert_close(reference.resize_mask(mask, (4, 4)), (side[:, None] * side[None, :])[None, None])


@pytest.mark.parametrize("sizes, stride, kernels", [
    ((2, 2, 4, 3, 5, 4), (1, 1, 1, 1), (3, 3, 3, 3)),
    ((2, 2, 4, 3, 5, 4), (1, 1, 2, 2), (3, 3, 5, 3)),
    ((2, 2, 4, 3, 5, 4), (2, 3, 3, 2), (1, 3, 3, 1)),
    ((2, 2, 4, 3, 5, 4), (1, 1, 4, 4), (5, 5, 3, 3)),
    ((1, 1, 1, 1, 1, 1), (1, 1, 1, 1), (3, 3, 3, 3)),  # batch 1, 1x1 maps: only the centre taps see input
    ((1, 2, 3, 1, 3, 4), (2, 2, 5, 5), (3, 3, 3, 3)),  # strides past the map: one output along those dims
    ((1, 2, 3, 3, 2, 2), (1, 1, 1, 1), (5, 5, 3, 3)),  # kernels larger than the map
])
def test_center_pivot_matches_loops(sizes, stride, kernels):
    torch.manual_seed(1)
    x = torch.randn(*sizes, dtype=torch.float64)
    wq = torch.randn(3, sizes[1], *kernels[:2], dtype=torch.float64)
    ws = torch.randn(3, sizes[1], *kernels[2:], dtype=torch.float64)
    bq, bs = torch.randn(3, dtype=torch.float64), torch.randn(3, dtype=torch.float64)
    padding = tuple(k // 2 for k in kernels)
    expected = loop_center_pivot(x, wq, bq, ws, bs, stride, padding)
    torch.testing.assert_close(reference.center_pivot_conv4d(x, wq, bq, ws, bs, stride, padding), expected)


def test_center_pivot_is_the_original_two_branch_formulation():
    """With query stride 1: conv1 over query dims of the pruned support grid + conv2 over support dims."""
    torch.manual_seed(2)
    x = torch.randn(2, 3, 5, 5, 7, 7, dtype=torch.float64)
    conv1, conv2 = torch.nn.Conv2d(3, 4, 3, 1, 1).double(), torch.nn.Conv2d(3, 4, 3, 2, 1).double()
    pruned = x[..., ::2, ::2]
    b, c, hq, wq, hs, ws = pruned.shape
    out1 = conv1(pruned.permute(0, 4, 5, 1, 2, 3).reshape(-1, c, hq, wq)).view(b, hs, ws, 4, hq, wq)
    out2 = conv2(x.permute(0, 2, 3, 1, 4, 5).reshape(-1, c, 7, 7)).view(b, hq, wq, 4, hs, ws)
    expected = out1.permute(0, 3, 4, 5, 1, 2) + out2.permute(0, 3, 1, 2, 4, 5)
    actual = reference.center_pivot_conv4d(x, conv1.weight, conv1.bias, conv2.weight, conv2.bias, (1, 1, 2, 2),
                                           (1, 1, 1, 1))
    torch.testing.assert_close(actual, expected)


def test_hypercorrelation_stacks_levels_deepest_first_with_original_masking():
    torch.manual_seed(3)
    sizes = [5, 5, 3, 3, 3, 2]
    q = [torch.randn(1, 4, n, n, dtype=torch.float64) for n in sizes]
    s = [torch.randn(1, 4, n, n, dtype=torch.float64) for n in sizes]
    mask = (torch.rand(1, 11, 11) > 0.5).double()
    levels = reference.hypercorrelation(q, s, mask)
    assert [tuple(t.shape[:2]) for t in levels] == [(1, 1), (1, 3), (1, 2)]
    layer = 2  # second level's first layer
    m = F.interpolate(mask[:, None], (3, 3), mode="bilinear", align_corners=True)
    torch.testing.assert_close(levels[1][:, 0], loop_correlation(q[layer], s[layer] * m))


def test_reference_gradcheck():
    torch.manual_seed(4)
    x = torch.randn(1, 2, 3, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    wq = torch.randn(2, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    ws = torch.randn(2, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    bq = torch.randn(2, dtype=torch.float64, requires_grad=True)
    bs = torch.randn(2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda *a: reference.center_pivot_conv4d(*a, (1, 1, 2, 2), (1, 1, 1, 1)), (x, wq, bq, ws, bs))
    q = torch.randn(1, 3, 2, 3, dtype=torch.float64, requires_grad=True)
    s = torch.randn(1, 3, 3, 2, dtype=torch.float64, requires_grad=True)
    mask = torch.rand(1, 5, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b, m: reference.hypercorrelation([a], [b], m)[0], (q, s, mask))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_reduced_precision_norms_do_not_overflow(dtype):
    """fp16 features whose channel norm passes 65504 (finite entries up to ~4e4): the norm taken in fp16
    would be inf and every correlation 0; the reference takes it in fp32, as the backends do."""
    gen = torch.Generator().manual_seed(0)
    query = torch.randn(1, 64, 3, 3, generator=gen) * 1e4
    support = torch.randn(1, 64, 4, 4, generator=gen) * 1e4
    assert query.norm(dim=1).min() > 65504 and query.abs().max() < 65504
    want = reference.correlation(query, support)
    got = reference.correlation(query.to(dtype), support.to(dtype))
    assert got.dtype == dtype and want.max() > 0.2
    torch.testing.assert_close(got.float(), want, atol=2e-2 if dtype == torch.bfloat16 else 2e-3, rtol=0)
    assert reference.normalize(query.to(dtype)).dtype == dtype
