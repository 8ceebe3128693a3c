"""Every GPU autotune config of every kernel, one at a time, against the einsum references.

On a GPU the autotuner keeps whichever config is fastest for a shape and the others never run; under
the interpreter only one small config exists (``kernels._config.autotune_configs``). Tile sizes decide
the masking of partial tiles and the steps of each reduction, so a config-specific indexing bug would
reach users only on some GPUs and shapes. Here each GPU config is forced alone (the autotuner then runs
it without benchmarking) on a case with full and partial tiles in every tiled dimension for it.
Interpreted on CPU (fp32 products exact there), compiled on a GPU (with TF32 off).
"""

import pytest
import torch
from helpers import kernel_device

from hypertriton import reference
from hypertriton.testing import assert_close_dtype

DEVICE = kernel_device()  # skips this module where no kernel can run

from hypertriton.kernels import _config  # noqa: E402
from hypertriton.kernels import center_pivot_conv4d as conv  # noqa: E402
from hypertriton.kernels import fused_first_layer as fused  # noqa: E402
from hypertriton.kernels import hypercorrelation as corr  # noqa: E402
from hypertriton.ops.fused_first_layer import fused_hypercorrelation_cp_conv4d  # noqa: E402

NAN = float("nan")


def gpu_configs(make_configs):
    """The configs ``make_configs()`` gives on a GPU, whatever this process runs on."""
    interpreted = _config.INTERPRETED
    _config.INTERPRETED = False
    try:
        return make_configs()
    finally:
        _config.INTERPRETED = interpreted


def cases(autotuned, make_configs):
    return [pytest.param(autotuned, config, id=f"{autotuned.fn.__name__}-" +
                         "-".join(f"{k}{v}" for k, v in config.kwargs.items()))
            for config in gpu_configs(make_configs)]


@pytest.fixture
def only(monkeypatch):
    """``only(autotuned, config)``: the kernel runs with ``config`` alone until the test ends."""
    # Assigned and restored by hand: in torch 2.11 the flag is no attribute of its module that
    # monkeypatch could restore (it would try to delete it).
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False

    forced = []

    def force(autotuned, config):
        monkeypatch.setattr(autotuned, "configs", [config])
        monkeypatch.setattr(autotuned, "cache", {})
        monkeypatch.setattr(autotuned, "best_config", None, raising=False)
        forced.append((autotuned, config))
        return config.kwargs

    try:
        yield force
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    for autotuned, config in forced:  # the kernel did run, and with this config
        assert autotuned.best_config is config, f"{autotuned.fn.__name__} did not run with {config}"


def randn(*shape, seed: int, scale: float = 1.0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=generator, dtype=torch.float64) * scale).float().to(DEVICE)


def above(block: int) -> int:
    """A size with one full tile of ``block`` and a partial one."""
    return block + max(1, block // 3)


@pytest.mark.parametrize("autotuned, config", cases(corr._correlation_kernel, corr._configs))
def test_correlation_config(only, autotuned, config):
    blocks = only(autotuned, config)
    channels = above(blocks["BLOCK_C"])
    # Position counts past one tile of each side: query 12 x 12 or more, support likewise.
    side_q = int(above(blocks["BLOCK_Q"]) ** 0.5) + 1
    side_s = int(above(blocks["BLOCK_S"]) ** 0.5) + 1
    query = randn(1, channels, side_q, side_q, seed=1)
    support = randn(1, channels, side_s, side_s - 1, seed=2)
    out = torch.full((1, side_q, side_q, side_s, side_s - 1), NAN, device=DEVICE)
    corr.correlation_into(query, support, out)
    expected = torch.relu(torch.einsum("bcij,bckl->bijkl", query.double().cpu(), support.double().cpu()))
    assert_close_dtype(out.cpu(), expected)


@pytest.mark.parametrize("autotuned, config", cases(corr._correlation_grad_kernel, corr._grad_configs))
def test_correlation_backward_config(only, autotuned, config):
    blocks = only(autotuned, config)
    channels = above(blocks["BLOCK_C"])
    side_x = int(above(blocks["BLOCK_X"]) ** 0.5) + 1
    side_y = int(above(max(blocks["BLOCK_X"], blocks["BLOCK_Y"])) ** 0.5) + 1
    query = randn(1, channels, side_x, side_x, seed=3)
    support = randn(1, channels, side_y, side_y, seed=4)
    out = torch.relu(torch.einsum("bcij,bckl->bijkl", query, support))
    grad = randn(*out.shape, seed=5)
    leaves = [t.cpu().double().requires_grad_() for t in (query, support)]
    dense = torch.einsum("bcij,bckl->bijkl", *leaves)
    grad_dense = torch.ops.aten.threshold_backward(grad.cpu().double(), out.cpu().double(), 0)
    expected = torch.autograd.grad(dense, leaves, grad_dense)
    for name, got, wanted in zip(("grad_query", "grad_support"), corr.correlation_backward(grad, out, query, support),
                                 expected):
        assert_close_dtype(got.cpu(), wanted, msg=lambda m, name=name: f"{name}: {m}")


def conv_case(cin: int, cout: int, positions_at_least: int, seed: int):
    """x ``[1, cin, Hq, Wq, Hs, Ws]`` whose stride-(1, 1, 2, 2) output has at least ``positions_at_least``
    positions, kernels 3 and 5, and weights scaled so that outputs are of unit size."""
    side = 4
    while side * side * ((side + 1) // 2) ** 2 < positions_at_least:
        side += 1
    x = randn(1, cin, side, side + 1, side, side - 1, seed=seed)
    weight_query = randn(cout, cin, 3, 3, seed=seed + 1, scale=(cin * 9) ** -0.5)
    weight_support = randn(cout, cin, 5, 5, seed=seed + 2, scale=(cin * 25) ** -0.5)
    bias_query, bias_support = randn(cout, seed=seed + 3), randn(cout, seed=seed + 4)
    return x, (weight_query, bias_query, weight_support, bias_support), (1, 1, 2, 2), (1, 1, 2, 2)


@pytest.mark.parametrize("autotuned, config", cases(conv._center_pivot_conv4d_kernel, conv._configs))
def test_conv_config(only, autotuned, config):
    blocks = only(autotuned, config)
    # The reduction runs over (tap, input channel) pairs: 9 * cin and 25 * cin past a BLOCK_K step.
    cin = max(2, -(-above(blocks["BLOCK_K"]) // 9))
    x, params, stride, padding = conv_case(cin, above(blocks["BLOCK_O"]), above(blocks["BLOCK_P"]), seed=10)
    expected = reference.center_pivot_conv4d(x.cpu().double(), *[p.cpu().double() for p in params], stride, padding)
    out = torch.full(expected.shape, NAN, device=DEVICE)
    conv.center_pivot_conv4d_into(x, *params, stride, padding, out)
    assert_close_dtype(out.cpu(), expected)


@pytest.mark.parametrize("autotuned, config", cases(conv._center_pivot_conv4d_grad_input_kernel,
                                                    conv._grad_input_configs)
                         + cases(conv._center_pivot_conv4d_grad_weight_kernel, conv._grad_weight_configs))
def test_conv_backward_config(only, autotuned, config):
    blocks = only(autotuned, config)
    channel_block = blocks.get("BLOCK_C", 16)
    cout = above(max(blocks.get("BLOCK_O", 16), -(-blocks.get("BLOCK_K", 16) // 9)))
    x, params, stride, padding = conv_case(above(channel_block), cout, above(blocks["BLOCK_P"]), seed=20)
    leaves = [t.cpu().double().requires_grad_() for t in (x, *params)]
    dense = reference.center_pivot_conv4d(*leaves, stride, padding)
    grad = randn(*dense.shape, seed=21)
    expected = torch.autograd.grad(dense, leaves, grad.cpu().double())
    # Only the gradients of the kernel under test: the other kernel would run its interpreter config, at
    # a quarter to a third of the test's time.
    of_input = autotuned is conv._center_pivot_conv4d_grad_input_kernel
    needs = (of_input,) + (not of_input,) * 4
    got = conv.center_pivot_conv4d_backward(grad, x, params[0], params[2], stride, padding, needs)
    names = ("grad_x", "grad_weight_query", "grad_bias_query", "grad_weight_support", "grad_bias_support")
    compared = [(name, actual, wanted) for name, actual, wanted, need in zip(names, got, expected, needs) if need]
    assert len(compared) == (1 if of_input else 4)
    for name, actual, wanted in compared:
        assert actual is not None, name
        assert_close_dtype(actual.cpu(), wanted, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("autotuned, config", cases(fused._support_branch_kernel, fused._configs))
def test_fused_support_branch_config(only, autotuned, config):
    """Through the op's ``triton`` backend (the kernel computes its support-dim branch), blob mask."""
    blocks = only(autotuned, config)
    channels = above(blocks["BLOCK_C"])
    side_q = int(above(blocks["BLOCK_Q"]) ** 0.5) + 1
    query = [randn(1, channels, side_q, side_q, seed=30 + layer) for layer in range(2)]
    support = [randn(1, channels, 9, 8, seed=40 + layer) for layer in range(2)]
    yy, xx = torch.meshgrid(torch.arange(18.0), torch.arange(16.0), indexing="ij")
    mask = (((yy - 10) ** 2 + (xx - 6) ** 2) <= 30).float()[None].to(DEVICE)
    weights = (randn(3, 2, 3, 3, seed=50, scale=0.3), randn(3, seed=51), randn(3, 2, 5, 5, seed=52, scale=0.2),
               randn(3, seed=53))
    stride = (1, 1, 2, 2)
    got = fused_hypercorrelation_cp_conv4d(query, support, mask, *weights, stride, backend="triton")
    dense = reference.hypercorrelation([q.double().cpu() for q in query], [s.double().cpu() for s in support],
                                       mask.double().cpu())[0]
    expected = reference.center_pivot_conv4d(dense, *[w.double().cpu() for w in weights], stride, (1, 1, 2, 2))
    assert_close_dtype(got.cpu(), expected)


def test_autotuning_over_several_configs_leaves_the_first_call_right(monkeypatch):
    # On a GPU every config is timed many times on the real arguments before the chosen one runs; a
    # kernel that adds into its output must get that output back after each timed run. The interpreter
    # tunes one config, so two configs and a stand-in timer (three runs each) play the GPU's part here.
    import triton

    import hypertriton
    from hypertriton import kernels
    from hypertriton.ops.fused_first_layer import fused_hypercorrelation_cp_conv

    kernel = kernels.autotuned_kernels()["fused_support_branch"]
    first = kernel.configs[0]
    monkeypatch.setattr(kernel, "configs", [first, triton.Config(dict(first.kwargs), num_warps=first.num_warps)])
    monkeypatch.setattr(kernel, "cache", {})
    # In the instance's dict: do_bench is a cached property, which reading (as setattr would) resolves to a
    # GPU driver's timer.
    monkeypatch.setitem(vars(kernel), "do_bench", lambda run, quantiles=None, **kw: [run(), run(), run()] and [1.0] * 3)
    generator = torch.Generator().manual_seed(0)
    query = [torch.randn(1, 8, 9, 9, generator=generator).to(DEVICE) for _ in range(2)]
    support = [torch.randn(1, 8, 9, 9, generator=generator).to(DEVICE) for _ in range(2)]
    mask = torch.zeros(1, 72, 72, device=DEVICE)
    mask[:, 20:50, 10:40] = 1
    layer = hypertriton.CenterPivotConv4d(2, 4, 5, (1, 1, 4, 4), backend="triton").to(DEVICE)
    with torch.no_grad():
        expected = fused_hypercorrelation_cp_conv(query, support, mask, layer, backend="reference")
        actual = fused_hypercorrelation_cp_conv(query, support, mask, layer, backend="triton")
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)
