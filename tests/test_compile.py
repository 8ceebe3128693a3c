"""torch.compile sees the ops as single nodes: a model using them compiles with no graph break."""

import pytest
import torch
from helpers import BACKEND_IDS, available_backends, counting_nnpack

import hypertriton

DEVICES = dict(available_backends())


class TinyMatcher(torch.nn.Module):
    def __init__(self, backend):
        super().__init__()
        self.corr = hypertriton.HyperCorr(backend=backend)
        self.conv = hypertriton.CenterPivotConv4d(2, 4, 3, (1, 1, 2, 2), 1, backend=backend)

    def forward(self, query_feats, support_feats, mask):
        levels = self.corr(query_feats, support_feats, mask)
        return self.conv(levels[0]).relu().mean(dim=(-2, -1))


@pytest.mark.parametrize("backend", [b for b in BACKEND_IDS if b != "reference"])
def test_compiles_without_graph_breaks(backend):
    device = DEVICES[backend]
    torch._dynamo.reset()
    model = TinyMatcher(backend).to(device)
    generator = torch.Generator().manual_seed(0)
    # Batch 2: each layer's slice of a stacked output is strided there, which dynamo cannot write into.
    query = [torch.randn(2, 3, 4, 4, generator=generator).to(device) for _ in range(2)]
    support = [torch.randn(2, 3, 5, 5, generator=generator).to(device) for _ in range(2)]
    mask = (torch.rand(2, 9, 9, generator=generator) > 0.3).float().to(device)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)  # fullgraph: any break raises
    expected = model(query, support, mask)
    eager_grads = torch.autograd.grad(expected.sum(), list(model.parameters()))
    actual = compiled(query, support, mask)
    torch.testing.assert_close(actual, expected)
    # The registered autograd formulas trace too, and give eager's gradients.
    compiled_grads = torch.autograd.grad(actual.sum(), list(model.parameters()))
    assert any(g.abs().max() > 0 for g in eager_grads)
    for eager, traced in zip(eager_grads, compiled_grads):
        torch.testing.assert_close(traced, eager)


@pytest.mark.parametrize("backend", [b for b in BACKEND_IDS if b != "reference"])
def test_a_new_batch_size_recompiles_without_graph_breaks(backend):
    # The last, smaller batch of an epoch: an error message formatted eagerly from the shape made dynamo
    # give up on the new size.
    device = DEVICES[backend]
    torch._dynamo.reset()
    conv = hypertriton.CenterPivotConv4d(2, 3, 3, (1, 1, 2, 2), 1, backend=backend).to(device)
    compiled = torch.compile(conv, backend="aot_eager", fullgraph=True)
    generator = torch.Generator().manual_seed(1)
    for batch in (3, 2, 1):
        x = torch.randn(batch, 2, 4, 3, 5, 5, generator=generator).to(device)
        torch.testing.assert_close(compiled(x), conv(x))


@pytest.mark.parametrize("shape", [(2, 3, 4, 4, 2, 2), (2, 3, 1, 1, 1, 1)], ids=["2x2 support map", "1x1 maps"])
def test_query_major_input_compiles_without_graph_breaks(shape):
    # The learner's activations are query-major; their small support maps take one gathered matrix whose
    # zero taps were found by a branch on tensor data.
    from hypertriton.ops.layout import to_query_major

    torch._dynamo.reset()
    conv = hypertriton.CenterPivotConv4d(3, 4, 3, (1, 1, 2, 2), 1, backend="torch")
    x = to_query_major(torch.randn(*shape, generator=torch.Generator().manual_seed(2)))
    compiled = torch.compile(conv, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), conv(x))


class _CorrelateTwoLayers(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.corr = hypertriton.HyperCorr(backend="torch")

    def forward(self, q0, q1, s0, s1, mask):
        return self.corr([q0, q1], [s0, s1], mask)[0]


@pytest.mark.parametrize("tracer", ["torch.jit.trace", "torch.export"])
def test_a_traced_hypercorrelation_keeps_the_mask_an_input(tracer):
    """Traced with one mask, run with another: the result is the other mask's. The sparse path's active
    set is data-dependent, so traces take the dense products (jit.trace once failed on its shape keys)."""
    import warnings

    generator = torch.Generator().manual_seed(3)
    feats = [torch.randn(1, 3, *size, generator=generator) for size in ((4, 4), (4, 4), (5, 5), (5, 5))]
    traced_mask, other_mask = (torch.rand(2, 1, 10, 10, generator=generator) > 0.6).float()
    model = _CorrelateTwoLayers().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer's warnings about Python values
        if tracer == "torch.jit.trace":
            traced = torch.jit.trace(model, (*feats, traced_mask), check_trace=False)
        else:
            traced = torch.export.export(model, (*feats, traced_mask)).module()
    assert traced(*feats, other_mask).abs().max() > 0
    torch.testing.assert_close(traced(*feats, other_mask), model(*feats, other_mask))


def test_another_threads_compile_leaves_eager_paths_alone(monkeypatch):
    """torch.compiler.is_compiling() is one flag for the whole process in torch 2.14: True in every thread
    while any thread compiles. Eager inference must not read it: it switched NNPACK off and the sparse
    correlations to dense ones, so a threaded server answered the same request about 1e-5 apart."""
    from hypertriton import HSNet
    from hypertriton.ops import cpu_conv

    torch.manual_seed(0)
    model = HSNet("resnet18").eval()
    generator = torch.Generator().manual_seed(1)
    query, support = torch.randn(2, 1, 3, 161, 147, generator=generator)
    mask = torch.zeros(1, 161, 147)
    mask[:, 40:100, 50:90] = 1.0
    with torch.no_grad(), counting_nnpack() as alone_calls:
        alone = model(query, support, mask)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    with torch.no_grad(), counting_nnpack() as calls:
        during_compile = model(query, support, mask)
    torch.testing.assert_close(during_compile, alone, rtol=0, atol=0)
    assert len(calls) == len(alone_calls) and bool(calls) == cpu_conv._nnpack_present()
