"""torch.compile sees the ops as single nodes: a model using them compiles with no graph break."""

import pytest
import torch
from helpers import BACKEND_IDS, available_backends

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
    query = [torch.randn(1, 3, 4, 4, generator=generator).to(device) for _ in range(2)]
    support = [torch.randn(1, 3, 5, 5, generator=generator).to(device) for _ in range(2)]
    mask = (torch.rand(1, 9, 9, generator=generator) > 0.3).float().to(device)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)  # fullgraph: any break raises
    expected = model(query, support, mask)
    actual = compiled(query, support, mask)
    torch.testing.assert_close(actual, expected)
    actual.sum().backward()  # the registered autograd formulas trace too
    assert model.conv.conv1.weight.grad is not None
