"""GPU-only checks of the Triton launchers: bf16/fp16/TF32 tolerances and flat indices past 2^31.

Skipped without CUDA. The large-index tests allocate about 11 GiB (correlation) and 15 GiB (conv) of
GPU memory and are skipped on devices under 24 GiB.
"""

import pytest
import torch
from helpers import keep_first_autotune_config

pytest.importorskip("triton", reason="the triton package is not installed (torch's macOS and Windows wheels do not "
                    "bring it)")
from hypertriton import kernels, reference  # noqa: E402
from hypertriton.testing import assert_close_dtype, tolerance  # noqa: E402

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the Triton kernels compile for GPUs)"),
    pytest.mark.skipif(kernels.INTERPRETED,
                       reason="TRITON_INTERPRET=1 is set: the kernels would not compile for the GPU"),
]

if torch.cuda.is_available() and not kernels.INTERPRETED:
    from hypertriton.kernels.center_pivot_conv4d import center_pivot_conv4d_backward, center_pivot_conv4d_into
    from hypertriton.kernels.hypercorrelation import correlation_backward, correlation_into

DEVICE = "cuda"
NAN = float("nan")
TWO_31 = 2**31


@pytest.fixture(autouse=True)
def one_config_per_kernel(monkeypatch):
    """These tests check numerics: each kernel keeps its first GPU config (autotuning every config for
    each new shape and dtype would take minutes of a short GPU session); the benchmark autotunes."""
    keep_first_autotune_config(monkeypatch)


@pytest.fixture
def tf32(request):
    """Set ``torch.backends.cuda.matmul.allow_tf32`` for one test, restoring it afterwards."""
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = request.param
    yield request.param
    torch.backends.cuda.matmul.allow_tf32 = previous


def need_memory(gib: float):
    total = torch.cuda.get_device_properties(0).total_memory / 2**30
    if total < gib:
        pytest.skip(f"needs {gib} GiB of GPU memory, the device has {total:.0f} GiB")


def normalized(shape, dtype, seed):
    generator = torch.Generator(device=DEVICE).manual_seed(seed)
    features = torch.randn(shape, generator=generator, device=DEVICE, dtype=torch.float64)
    return reference.normalize(features).to(dtype)


def correlation_expected(query, support):
    """float64 oracle on exactly the (rounded) values the kernel was given."""
    return torch.relu(torch.einsum("bcij,bckl->bijkl", query.double(), support.double()))


def conv_params(cin, cout, kernel, dtype, seed, bias=True):
    """Weights scaled like PyTorch's init so that conv outputs are of unit scale."""
    generator = torch.Generator(device=DEVICE).manual_seed(seed)
    params = []
    for _ in range(2):
        w = torch.randn(cout, cin, kernel, kernel, generator=generator, device=DEVICE, dtype=torch.float64)
        b = torch.randn(cout, generator=generator, device=DEVICE, dtype=torch.float64) if bias else None
        params += [(w / (cin * kernel * kernel) ** 0.5).to(dtype), None if b is None else b.to(dtype)]
    return params


def assert_tf32_close(actual, expected, name=""):
    """TF32 truncates each product's operands (~1e-3 relative, random sign), so over long sums the
    error is small against the result's norm but not against every near-zero element: compare norms."""
    relative = ((actual.double() - expected).norm() / expected.norm()).item()
    assert relative < tolerance("tf32")[0], f"{name}: relative error {relative:.2e} in TF32"


def conv_expected(x, params, stride, padding):
    return reference.center_pivot_conv4d(x.double(), *[None if p is None else p.double() for p in params],
                                         stride, padding)


# ---------------------------------------------------------------------------------------------------
# Tolerances per dtype


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("sizes", [(2, 64, 13, 13, 13, 13), (3, 96, 25, 19, 23, 25)], ids=["13", "odd"])
def test_correlation_half_precision(dtype, sizes):
    batch, channels, hq, wq, hs, ws = sizes
    query = normalized((batch, channels, hq, wq), dtype, 0)
    support = normalized((batch, channels, hs, ws), dtype, 1).to(memory_format=torch.channels_last)
    stacked = torch.full((batch, 3, hq, wq, hs, ws), NAN, dtype=dtype, device=DEVICE)
    correlation_into(query, support, stacked[:, 2])
    assert_close_dtype(stacked[:, 2], correlation_expected(query, support), dtype)
    assert stacked[:, :2].isnan().all()


@pytest.mark.parametrize("tf32", [False, True], ids=["ieee", "tf32"], indirect=True)
def test_correlation_fp32_follows_allow_tf32(tf32):
    # 512 channels: with TF32 the error (~1e-4) exceeds the fp32 tolerance, so the ieee case also
    # checks that TF32 stays off when PyTorch's flag is off.
    query = normalized((2, 512, 25, 25), torch.float32, 2)
    support = normalized((2, 512, 25, 25), torch.float32, 3)
    out = torch.full((2, 25, 25, 25, 25), NAN, device=DEVICE)
    correlation_into(query, support, out)
    assert_close_dtype(out, correlation_expected(query, support), "tf32" if tf32 else torch.float32)


def correlation_backward_case(sizes, dtype, upstream):
    """Kernel gradients and float64 autograd gradients (ReLU rule applied to the kernel's own output)."""
    batch, channels, hq, wq, hs, ws = sizes
    query = normalized((batch, channels, hq, wq), dtype, 14)
    support = normalized((batch, channels, hs, ws), dtype, 15).to(memory_format=torch.channels_last)
    stacked = torch.full((batch, 2, hq, wq, hs, ws), NAN, dtype=dtype, device=DEVICE)
    out = correlation_into(query, support, stacked[:, 0])
    if upstream == "sum":
        grad = torch.ones((), dtype=dtype, device=DEVICE).expand(out.shape)
    else:
        generator = torch.Generator(device=DEVICE).manual_seed(16)
        grad = torch.randn(out.shape, generator=generator, device=DEVICE).to(dtype)
    leaves = [t.double().requires_grad_() for t in (query, support)]
    grad_corr = torch.ops.aten.threshold_backward(grad.double(), out.double(), 0)
    expected = torch.autograd.grad(torch.einsum("bcij,bckl->bijkl", *leaves), leaves, grad_corr)
    return correlation_backward(grad, out, query, support), expected, hq * wq + hs * ws


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("sizes", [(2, 64, 13, 13, 13, 13), (3, 96, 25, 19, 23, 25)], ids=["13", "odd"])
def test_correlation_backward_half_precision(dtype, sizes):
    got, expected, _ = correlation_backward_case(sizes, dtype, "random")
    for name, actual, wanted in zip(("grad_query", "grad_support"), got, expected):
        assert actual.dtype == dtype, name
        assert_close_dtype(actual, wanted, dtype, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("tf32", [False, True], ids=["ieee", "tf32"], indirect=True)
@pytest.mark.parametrize("upstream", ["random", "sum"])
def test_correlation_backward_fp32_follows_allow_tf32(tf32, upstream):
    got, expected, positions = correlation_backward_case((2, 256, 25, 25, 25, 25), torch.float32, upstream)
    for name, actual, wanted in zip(("grad_query", "grad_support"), got, expected):
        if tf32:
            assert_tf32_close(actual, wanted, name)
        else:  # sums over ~600 positions of unit-scale terms
            assert_close_dtype(actual, wanted, torch.float32, scale=max(1.0, positions ** 0.5 / 8),
                               msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("case", [
    # (batch, cin, cout, maps, kernel, stride): HSNet's squeeze layers at 400 px, and an odd case.
    (2, 3, 16, (13, 13, 13, 13), 3, (1, 1, 2, 2)),
    (1, 6, 16, (25, 25, 25, 25), 5, (1, 1, 4, 4)),
    (2, 16, 64, (13, 13, 7, 7), 3, (1, 1, 2, 2)),
    (1, 5, 7, (9, 6, 11, 8), 3, (2, 1, 3, 1)),
], ids=["layer4-1", "layer3-1", "layer4-2", "odd"])
def test_conv_half_precision(dtype, case):
    batch, cin, cout, maps, kernel, stride = case
    padding = (kernel // 2,) * 4
    generator = torch.Generator(device=DEVICE).manual_seed(4)
    x = torch.randn(batch, cin, *maps, generator=generator, device=DEVICE).to(dtype)
    params = conv_params(cin, cout, kernel, dtype, 5)
    expected = conv_expected(x, params, stride, padding)
    out = torch.full(expected.shape, NAN, dtype=dtype, device=DEVICE)
    center_pivot_conv4d_into(x, *params, stride, padding, out)
    assert_close_dtype(out, expected, dtype)


@pytest.mark.parametrize("tf32", [False, True], ids=["ieee", "tf32"], indirect=True)
def test_conv_fp32_follows_allow_tf32(tf32):
    generator = torch.Generator(device=DEVICE).manual_seed(6)
    # Channels-last-like input: the channel dim is innermost in memory.
    x = torch.randn(2, 9, 9, 9, 9, 16, generator=generator, device=DEVICE).permute(0, 5, 1, 2, 3, 4)
    params = conv_params(16, 32, 3, torch.float32, 7)
    stride, padding = (1, 1, 2, 2), (1, 1, 1, 1)
    expected = conv_expected(x, params, stride, padding)
    out = torch.full(expected.shape, NAN, device=DEVICE)
    center_pivot_conv4d_into(x, *params, stride, padding, out)
    if tf32:
        assert_tf32_close(out, expected)
    else:
        assert_close_dtype(out, expected, torch.float32)


# ---------------------------------------------------------------------------------------------------
# Flat indices past 2^31


def sample_indices(shape, count, generator):
    """``count`` random multi-indices into ``shape`` plus its first and last element."""
    picks = [torch.randint(0, size, (count,), generator=generator).tolist() for size in shape]
    return [tuple(0 for _ in shape), tuple(size - 1 for size in shape), *zip(*picks)]


def test_correlation_past_int32_offsets():
    need_memory(24)
    # Two layers of [2, 182, 182, 182, 182] fp16: 2 * 2 * 182^4 = 4.4e9 elements, so batch, layer and
    # support offsets pass 2^31; one layer alone has 2.2e9 > 2^31 elements.
    batch, channels, side = 2, 16, 182
    assert batch * side**4 > TWO_31
    query = normalized((batch, channels, side, side), torch.float16, 8)
    support = normalized((batch, channels, side, side), torch.float16, 9)
    stacked = torch.full((batch, 2, side, side, side, side), NAN, dtype=torch.float16, device=DEVICE)
    correlation_into(query, support, stacked[:, 1])

    out = stacked[:, 1]
    generator = torch.Generator().manual_seed(0)
    indices = sample_indices(out.shape, 64, generator)
    got = torch.stack([out[i] for i in indices]).double()
    q, s = query.double(), support.double()
    expected = torch.stack([torch.relu(q[b, :, i, j] @ s[b, :, u, v]) for b, i, j, u, v in indices])
    assert_close_dtype(got, expected, torch.float16)
    assert not out.isnan().any(), "some elements past 2^31 were never written"
    assert stacked[:, 0].isnan().all(), "the kernel wrote into the other layer"


def conv_entry(x, params, stride, padding, index):
    """One output element of the center-pivot conv, straight from its definition, in float64."""
    wq, bq, ws, bs = (p.double() for p in params)
    b, o, i, j, u, v = index
    sqh, sqw, ssh, ssw = stride
    pqh, pqw, psh, psw = padding
    _, _, hq, wq_size, hs, ws_size = x.shape
    total = bq[o] + bs[o]
    for a in range(wq.shape[2]):
        for e in range(wq.shape[3]):
            r, c = i * sqh - pqh + a, j * sqw - pqw + e
            if 0 <= r < hq and 0 <= c < wq_size:
                total = total + wq[o, :, a, e] @ x[b, :, r, c, u * ssh, v * ssw].double()
    for a in range(ws.shape[2]):
        for e in range(ws.shape[3]):
            r, c = u * ssh - psh + a, v * ssw - psw + e
            if 0 <= r < hs and 0 <= c < ws_size:
                total = total + ws[o, :, a, e] @ x[b, :, i * sqh, j * sqw, r, c].double()
    return total


def test_conv_past_int32_offsets():
    need_memory(24)
    # x [2, 3, 150, 150, 150, 150] and out [2, 3, ...] fp16 hold 3.0e9 elements each: input and output
    # offsets pass 2^31.
    batch, cin, cout, side = 2, 3, 3, 150
    assert batch * cin * side**4 > TWO_31 and batch * cout * side**4 > TWO_31
    generator = torch.Generator(device=DEVICE).manual_seed(10)
    x = torch.randn(batch, cin, side, side, side, side, generator=generator, device=DEVICE, dtype=torch.float16)
    params = conv_params(cin, cout, 3, torch.float16, 11)
    stride, padding = (1, 1, 1, 1), (1, 1, 1, 1)
    out = torch.full((batch, cout, side, side, side, side), NAN, dtype=torch.float16, device=DEVICE)
    center_pivot_conv4d_into(x, *params, stride, padding, out)

    indices = sample_indices(out.shape, 64, torch.Generator().manual_seed(1))
    got = torch.stack([out[i] for i in indices]).double()
    expected = torch.stack([conv_entry(x, params, stride, padding, i) for i in indices])
    assert_close_dtype(got, expected, torch.float16)
    assert not out.isnan().any(), "some elements past 2^31 were never written"


def _products64(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """``(sum(a * b), sqrt(sum((a * b)^2)))`` in float64, one slab of the third dim at a time (a whole
    float64 copy would not fit)."""
    total = torch.zeros(2, dtype=torch.float64, device=a.device)
    for i in range(a.shape[2]):
        products = a[:, :, i].double() * b[:, :, i].double()
        total += torch.stack([products.sum(), products.square().sum()])
    return total[0].item(), total[1].sqrt().item()


def test_conv_backward_past_int32_offsets():
    """The backward kernels' int64 paths, checked through the adjoint identities of a bias-free conv,
    ``<g, conv(x)> = <grad x, x> = <grad w_q, w_q> + <grad w_s, w_s>``: a gradient written to a wrapped
    offset, or not written, moves these sums by about the square root of their term count, hundreds of
    times what rounding does."""
    need_memory(48)
    batch, cin, cout, side = 1, 2, 1, 216
    assert (cin - 1) * side**4 > TWO_31  # grad x's channel offsets
    assert batch * side**4 > TWO_31  # the weight gradient's reduction over (batch, output position)
    generator = torch.Generator(device=DEVICE).manual_seed(20)
    x = torch.randn(batch, cin, side, side, side, side, generator=generator, device=DEVICE, dtype=torch.float16)
    # fp32 weights (the kernels cast them to x's dtype) so that their gradients, sums of billions of
    # terms, do not overflow fp16; their values are fp16's, so the forward used exactly them.
    wq, _, ws, _ = [None if p is None else p.float() for p in conv_params(cin, cout, 3, torch.float16, 21,
                                                                          bias=False)]
    stride, padding = (1, 1, 1, 1), (1, 1, 1, 1)
    out = torch.empty((batch, cout, side, side, side, side), dtype=torch.float16, device=DEVICE)
    center_pivot_conv4d_into(x, wq, None, ws, None, stride, padding, out)
    grad = torch.randn(out.shape, generator=generator, device=DEVICE, dtype=torch.float16)
    through_output, spread_output = _products64(grad, out)
    del out
    grad_x, grad_wq, grad_bq, grad_ws, _ = center_pivot_conv4d_backward(grad, x, wq, ws, stride, padding)
    assert not grad_x.isnan().any()
    through_input, spread_input = _products64(grad_x, x)
    through_weights = sum((g.double() * w.double()).sum().item() for g, w in ((grad_wq, wq), (grad_ws, ws)))
    # Rounding the fp16 output and input gradient moves each term by at most 2^-11 of itself, with random
    # signs: a sum by a few 2^-11 * sqrt(sum of squared terms). The weight gradients are fp32.
    tolerance = 8 * 2**-11 * (spread_output + spread_input)
    assert abs(through_input - through_output) < tolerance, (through_input, through_output, tolerance)
    assert abs(through_weights - through_output) < tolerance, (through_weights, through_output, tolerance)
    bias_grad = sum(grad[:, :, i].double().sum().item() for i in range(side))
    assert abs(grad_bq.item() - bias_grad) < 1e-3 * abs(bias_grad) + 1.0, (grad_bq.item(), bias_grad)


# ---------------------------------------------------------------------------------------------------
# Backward of the center-pivot conv


BACKWARD_CASES = [
    (2, 3, 16, (13, 13, 13, 13), 3, (1, 1, 2, 2)),
    (1, 6, 16, (25, 25, 25, 25), 5, (1, 1, 4, 4)),
    (1, 5, 7, (9, 6, 11, 8), 3, (2, 1, 3, 1)),
]
BACKWARD_IDS = ["layer4-1", "layer3-1", "odd"]
GRAD_NAMES = ("grad_x", "grad_weight_query", "grad_bias_query", "grad_weight_support", "grad_bias_support")


def backward_case(case, dtype, upstream="random"):
    """Inputs, upstream gradient and float64 autograd gradients of the reference for one case."""
    batch, cin, cout, maps, kernel, stride = case
    padding = (kernel // 2,) * 4
    generator = torch.Generator(device=DEVICE).manual_seed(12)
    x = torch.randn(batch, cin, *maps, generator=generator, device=DEVICE).to(dtype)
    params = conv_params(cin, cout, kernel, dtype, 13)
    leaves = [t.double().requires_grad_() for t in (x, *params)]
    out = reference.center_pivot_conv4d(*leaves, stride, padding)
    if upstream == "sum":
        grad = torch.ones((), device=DEVICE, dtype=dtype).expand(out.shape)
    else:
        grad = torch.randn(out.shape, generator=generator, device=DEVICE).to(dtype)
    expected = torch.autograd.grad(out, leaves, grad.double())
    got = center_pivot_conv4d_backward(grad, x, params[0], params[2], stride, padding)
    # Weight and bias gradients reduce over every (batch, output position) pair.
    return got, expected, out[:, 0].numel()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("case", BACKWARD_CASES, ids=BACKWARD_IDS)
def test_conv_backward_half_precision(dtype, case):
    # Half-precision inputs multiply exactly into fp32 accumulators: only the final rounding differs.
    got, expected, _ = backward_case(case, dtype, upstream="random")
    for name, actual, wanted in zip(GRAD_NAMES, got, expected):
        assert actual.dtype == dtype, name
        assert_close_dtype(actual, wanted, dtype, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("tf32", [False, True], ids=["ieee", "tf32"], indirect=True)
@pytest.mark.parametrize("upstream", ["random", "sum"])
@pytest.mark.parametrize("case", BACKWARD_CASES[:2], ids=BACKWARD_IDS[:2])
def test_conv_backward_fp32_follows_allow_tf32(tf32, upstream, case):
    got, expected, reduction = backward_case(case, torch.float32, upstream)
    # Sums of `reduction` unit-scale terms: rounding errors grow with the partial sums (~sqrt(reduction)),
    # not with the result, so the absolute tolerance of the weight and bias gradients grows likewise.
    long_sum = max(1.0, reduction ** 0.5 / 4)
    for name, actual, wanted in zip(GRAD_NAMES, got, expected):
        if tf32 and "bias" not in name:  # bias gradients are plain fp32 sums, no tl.dot
            assert_tf32_close(actual, wanted, name)
            continue
        assert_close_dtype(actual, wanted, torch.float32, scale=1.0 if name == "grad_x" else long_sum,
                           msg=lambda m, name=name: f"{name}: {m}")


# ---------------------------------------------------------------------------------------------------
# The fused first layer's Triton forward never waits for the GPU
# ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bias", [True, False], ids=["biases", "no-biases"])
def test_fused_forward_reads_nothing_back(bias):
    """No ``.item()``, ``.tolist()``, ``nonzero()`` or other read-back in the Triton fused forward (each would
    make the host wait for the GPU; it used to happen several times per batch element): CUDA's sync debug
    mode raises on any synchronizing call. A warm-up call first, as autotuning synchronizes. Without
    biases, the zeros standing for them were made on the CPU and copied over (a synchronizing copy)."""
    from hypertriton.ops.fused_first_layer import fused_hypercorrelation_cp_conv4d

    generator = torch.Generator(device=DEVICE).manual_seed(0)
    query = [torch.randn(3, 32, 17, 19, generator=generator, device=DEVICE) for _ in range(2)]
    support = [torch.randn(3, 32, 17, 19, generator=generator, device=DEVICE) for _ in range(2)]
    mask = (torch.rand(3, 68, 76, generator=generator, device=DEVICE) > 0.7).float()
    wq, bq, ws, bs = conv_params(2, 16, 5, torch.float32, 1, bias=bias)
    args = (query, support, mask, wq, bq, ws, bs, (1, 1, 4, 4))
    with torch.no_grad():
        warm = fused_hypercorrelation_cp_conv4d(*args, backend="triton")
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            out = fused_hypercorrelation_cp_conv4d(*args, backend="triton")
        finally:
            torch.cuda.set_sync_debug_mode("default")
        corr = reference.hypercorrelation(query, support, mask)[0]
        params = [None if p is None else p.double() for p in (wq, bq, ws, bs)]
        expected = reference.center_pivot_conv4d(corr.double(), *params, (1, 1, 4, 4), (2, 2, 2, 2))
    torch.testing.assert_close(out, warm, rtol=0, atol=0)
    assert_tf32_close(out, expected, "fused forward")


# ---------------------------------------------------------------------------------------------------
# Tensors on another GPU than the current one
# ---------------------------------------------------------------------------------------------------

@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_kernels_run_on_the_inputs_gpu_not_the_current_one():
    # Triton launches on the current device; a model moved to cuda:1 used to fail to launch.
    assert torch.cuda.current_device() == 0
    other = torch.device("cuda", 1)
    generator = torch.Generator(device=other).manual_seed(3)
    x = torch.randn(2, 3, 5, 4, 6, 5, generator=generator, device=other)
    params = [p.to(other) for p in conv_params(3, 4, 3, torch.float32, 4)]
    out = torch.full((2, 4, 5, 4, 3, 3), NAN, device=other)
    center_pivot_conv4d_into(x, *params, (1, 1, 2, 2), (1, 1, 1, 1), out)
    expected = reference.center_pivot_conv4d(x.double(), *[p.double() for p in params], (1, 1, 2, 2), (1, 1, 1, 1))
    assert_close_dtype(out, expected, torch.float32)
    grad_x = center_pivot_conv4d_backward(torch.ones_like(out), x, params[0], params[2], (1, 1, 2, 2),
                                          (1, 1, 1, 1))[0]
    assert grad_x.device == other and not grad_x.isnan().any()
