"""Streamed squeeze blocks (``HPNLearner.forward_fused(lean=True)``, ``HSNet(lean=True)``) against the
unstreamed fused forward: the first layer's GroupNorm statistics merged over slabs of query rows, and
each slab of the second layer computed from a recomputed slab of the first with its halo rows."""

from __future__ import annotations

import pytest
import torch
from helpers import examples, make_mask
from hypothesis import example, given, settings
from hypothesis import strategies as st

import hypertriton
from hypertriton.learner import HPNLearner

INCH = [3, 6, 4]  # layers per level, deepest first (ResNet-50's)


def make_levels(layer2: tuple[int, int], support2: tuple[int, int], batch: int, channels: int, seed: int,
                dtype=torch.float64):
    """Random features for the three levels, deepest first: ``(query_feats, support_feats)`` per level, each
    level's maps half the next one's side (rounded up), as a ResNet's."""
    gen = torch.Generator().manual_seed(seed)

    def sizes(size):
        deeper = tuple(-(-n // 2) for n in size)
        return [tuple(-(-n // 2) for n in deeper), deeper, tuple(size)]

    return [([torch.randn(batch, channels, *q, generator=gen, dtype=dtype) for _ in range(layers)],
             [torch.randn(batch, channels, *s, generator=gen, dtype=dtype) for _ in range(layers)])
            for layers, q, s in zip(INCH, sizes(layer2), sizes(support2))]


def learner(seed: int, backend: str, dtype=torch.float64) -> HPNLearner:
    torch.manual_seed(seed)
    return HPNLearner(INCH, backend=backend).to(dtype).eval()


@settings(max_examples=examples(12), deadline=None)
@given(layer2=st.tuples(st.integers(1, 11), st.integers(1, 9)), support2=st.tuples(st.integers(2, 10), st.integers(2, 10)),
       batch=st.integers(1, 2), mask_kind=st.sampled_from(["blob", "full", "zero", "random", "pixel"]),
       rows_per_step=st.sampled_from([None, 1, 2, 3, 50]), backend=st.sampled_from(["torch", "reference"]),
       seed=st.integers(0, 2**16))
@example(layer2=(9, 7), support2=(9, 9), batch=2, mask_kind="blob", rows_per_step=1, backend="torch", seed=0)
@example(layer2=(1, 1), support2=(2, 2), batch=1, mask_kind="full", rows_per_step=None, backend="torch", seed=1)
@example(layer2=(10, 3), support2=(7, 5), batch=1, mask_kind="zero", rows_per_step=3, backend="torch", seed=2)
@example(layer2=(11, 8), support2=(10, 6), batch=2, mask_kind="random", rows_per_step=2, backend="reference", seed=3)
def test_streamed_forward_equals_the_unstreamed(layer2, support2, batch, mask_kind, rows_per_step, backend, seed):
    levels = make_levels(layer2, support2, batch, 5, seed)
    mask = make_mask(mask_kind, batch, 4 * support2[0], 4 * support2[1], seed)
    model = learner(seed, backend)
    with torch.no_grad():
        want = model.forward_fused(levels, mask)
        got = model.forward_fused(levels, mask, lean=True, rows_per_step=rows_per_step)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9 * float(want.abs().max()))


def test_streamed_under_autocast_stays_within_bf16_of_the_unstreamed():
    levels = make_levels((12, 10), (12, 12), 1, 16, 4, dtype=torch.float32)
    mask = make_mask("blob", 1, 48, 48, 4)
    model = learner(4, "torch", torch.float32)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        want = model.forward_fused(levels, mask)
        got = model.forward_fused(levels, mask, lean=True, rows_per_step=2)
    assert got.dtype == want.dtype
    torch.testing.assert_close(got.float(), want.float(), rtol=2 ** -6, atol=2 ** -6 * float(want.abs().max()))


def test_with_gradients_lean_is_ignored_and_training_works():
    levels = make_levels((6, 6), (6, 6), 1, 4, 5)
    mask = make_mask("blob", 1, 24, 24, 5)
    model = learner(5, "torch")
    out = model.forward_fused(levels, mask, lean=True)
    names, params = zip(*model.named_parameters())
    lean_grads = torch.autograd.grad(out.sum(), params)
    plain_grads = torch.autograd.grad(model.forward_fused(levels, mask).sum(), params)
    first_layer = [g for name, g in zip(names, lean_grads) if name.startswith("encoder_layer2.0.")]
    assert first_layer and sum(g.abs().sum() for g in first_layer) > 0  # the fused first layer learns
    for lean, plain in zip(lean_grads, plain_grads):  # lean changes nothing when training
        torch.testing.assert_close(lean, plain, rtol=0, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(out.detach(), model.forward_fused(levels, mask))
    with pytest.raises(RuntimeError, match="inference only"):
        model.squeeze_streamed(model.encoder_layer2, *levels[2], mask)


def test_bad_rows_per_step_is_named():
    levels = make_levels((4, 4), (4, 4), 1, 4, 6)
    with torch.no_grad(), pytest.raises(ValueError, match="rows_per_step"):
        learner(6, "torch").forward_fused(levels, None, lean=True, rows_per_step=0)


def test_hsnet_lean_gives_the_same_logits():
    torch.manual_seed(7)
    model = hypertriton.HSNet("resnet18").double().eval()
    gen = torch.Generator().manual_seed(7)
    query, support = (torch.randn(1, 3, 96, 80, generator=gen, dtype=torch.float64) for _ in range(2))
    mask = make_mask("blob", 1, 96, 80, 7)
    with torch.no_grad():
        want = model(query, support, mask)
        model.lean = True
        got = model(query, support, mask)
    assert "lean=True" in repr(model)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9 * float(want.abs().max()))


def test_blocks_of_ones_own_that_cannot_stream_run_whole_and_any_decoder_module_runs():
    # lean=True with a query-strided first layer raised "streaming needs query stride 1" (lean is a memory
    # preference); a decoder that is not an nn.Sequential failed with "'X' object is not iterable".
    from hypertriton.learner import make_building_block

    levels = make_levels((8, 6), (8, 8), 1, 5, 7)
    mask = make_mask("blob", 1, 32, 32, 7)
    model = learner(7, "torch")
    torch.manual_seed(8)
    model.encoder_layer2 = make_building_block(INCH[2], [16, 64, 128], [5, 3, 3], [4, 2, 2]).double().eval()
    model.encoder_layer2[0].stride = (2, 2, 4, 4)  # query-strided: not streamable
    model.encoder_layer2[0].conv1.stride = (2, 2)

    class Decoder(torch.nn.Module):  # not a Sequential
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner(x) * 2

    model.decoder2 = Decoder(model.decoder2)
    with torch.no_grad():
        want = model.forward_fused(levels, mask)
        got = model.forward_fused(levels, mask, lean=True)
        dense = model(model._dense_pyramid(levels, mask))
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(dense, want, rtol=1e-9, atol=1e-9 * float(want.abs().max()))
