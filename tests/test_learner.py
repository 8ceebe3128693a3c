"""HPNLearner against our plain-PyTorch statement of the original (bench/original_hsnet.py)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import available_backends, watching_forward
from hypothesis import example, given
from hypothesis import strategies as st

from hypertriton.learner import HPNLearner, resize_4d
from hypertriton.testing import assert_close_dtype

_SPEC = importlib.util.spec_from_file_location(
    "original_hsnet", Path(__file__).resolve().parents[1] / "bench" / "original_hsnet.py")
original = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(original)

INCH = {"resnet50": [3, 6, 4], "resnet101": [3, 23, 4], "vgg16": [1, 3, 3]}
BACKENDS = [name for name, device in available_backends() if device == "cpu"]


def make_pair(inch, seed: int = 0, backend=None):
    """An original learner with random weights, and ours holding the same state_dict."""
    torch.manual_seed(seed)
    reference = original.OriginalHPNLearner(inch)
    ours = HPNLearner(inch, backend=backend)
    ours.load_state_dict(reference.state_dict())
    return reference, ours


def make_pyramid(inch, query_sizes, support_sizes, batch: int, seed: int) -> list[torch.Tensor]:
    """Random non-negative correlations (as after ReLU), one level per entry, deepest first."""
    generator = torch.Generator().manual_seed(seed)
    return [torch.rand(batch, c, *q, *s, generator=generator) for c, q, s in zip(inch, query_sizes, support_sizes)]


def resnet_like_sizes(layer2: tuple[int, int]) -> list[tuple[int, int]]:
    """Deepest-first map sizes of a ResNet whose layer2 map is ``layer2`` (each stage halves, rounding up)."""
    layer3 = tuple(-(-n // 2) for n in layer2)
    layer4 = tuple(-(-n // 2) for n in layer3)
    return [layer4, layer3, layer2]


def small_resnet50_levels(seed: int) -> list:
    """Random features of a 160x144 ResNet-50 pyramid (8 channels per layer): per level, deepest first,
    ``(query_feats, support_feats)``, as ``HPNLearner.forward_fused`` takes them."""
    generator = torch.Generator().manual_seed(seed)
    return [([torch.randn(1, 8, *size, generator=generator) for _ in range(layers)],
             [torch.randn(1, 8, *size, generator=generator) for _ in range(layers)])
            for layers, size in zip(INCH["resnet50"], resnet_like_sizes((20, 18)))]


def decoded_by_original_steps(reference, pyramid):
    """The original's forward, step by step, except the decoder upsamples each side to twice its own size
    (the original doubled the width on both sides; equal for square maps)."""
    sqz4, sqz3, sqz2 = (block(level) for block, level in zip(
        (reference.encoder_layer4, reference.encoder_layer3, reference.encoder_layer2), pyramid))
    mix = reference.encoder_layer4to3(reference.interpolate_support_dims(sqz4, sqz3.shape[-4:-2]) + sqz3)
    mix = reference.encoder_layer3to2(reference.interpolate_support_dims(mix, sqz2.shape[-4:-2]) + sqz2)
    decoded = reference.decoder1(mix.flatten(4).mean(-1))
    decoded = F.interpolate(decoded, (2 * decoded.shape[-2], 2 * decoded.shape[-1]), mode="bilinear",
                            align_corners=True)
    return reference.decoder2(decoded)


@pytest.mark.parametrize("backbone,count", [("resnet50", 2_573_794), ("resnet101", 2_587_394), ("vgg16", 2_570_018)])
def test_parameter_count_is_the_originals(backbone, count):
    ours = HPNLearner(INCH[backbone])
    assert sum(p.numel() for p in ours.parameters() if p.requires_grad) == count
    assert sum(p.numel() for p in original.OriginalHPNLearner(INCH[backbone]).parameters()) == count


def test_state_dict_has_the_original_keys_and_shapes():
    reference, ours = make_pair(INCH["resnet50"])
    expected = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == expected
    assert "encoder_layer2.6.conv2.weight" in expected and "encoder_layer3to2.7.bias" in expected
    assert "decoder2.2.weight" in expected


# triton: the whole learner only where it compiles (GPU); interpreted on CPU it takes about a minute
@pytest.mark.parametrize("backend,device", [(b, d) for b, d in available_backends() if b != "triton" or d == "cuda"])
@given(layer2=st.integers(1, 12), support2=st.integers(1, 12), batch=st.integers(1, 2), seed=st.integers(0, 2**16))
@example(layer2=8, support2=8, batch=1, seed=0)  # 64-px ResNet
@example(layer2=7, support2=13, batch=2, seed=1)  # odd sizes, query != support
def test_forward_equals_the_original(backend, device, layer2, support2, batch, seed):
    """Square query maps (the original's assumption); our decoder must then agree exactly with it."""
    inch = INCH["resnet50"]
    reference, ours = make_pair(inch, seed, backend)
    reference, ours = reference.to(device), ours.to(device)
    pyramid = make_pyramid(inch, resnet_like_sizes((layer2, layer2)), resnet_like_sizes((support2, support2)), batch, seed)
    pyramid = [t.to(device) for t in pyramid]
    with torch.no_grad():
        expected = reference([t.clone() for t in pyramid])
        actual = ours(pyramid)
    assert actual.shape == (batch, 2, 2 * layer2, 2 * layer2)
    # on a GPU both sides may run their fp32 convolutions in TF32
    assert_close_dtype(actual, expected, dtype="tf32" if device == "cuda" else None, scale=10)


@pytest.mark.skipif("triton" not in BACKENDS, reason="Triton kernels cannot run here (no GPU, no interpreter)")
def test_squeeze_block_equals_the_original_triton():
    """On CPU the kernels run interpreted (seconds per launch), so only the first squeezing block, on
    the smallest grid, is compared; the whole learner is compared on GPU runs of the tests above."""
    inch = INCH["vgg16"]
    reference, ours = make_pair(inch, 3, "triton")
    x = make_pyramid(inch, [(2, 1)], [(1, 2)], 1, 3)[0]
    with torch.no_grad():
        assert_close_dtype(ours.encoder_layer4(x), reference.encoder_layer4(x.clone()), scale=10)


@given(layer2=st.tuples(st.integers(1, 10), st.integers(1, 10)), support=st.tuples(st.integers(1, 10), st.integers(1, 10)),
       seed=st.integers(0, 2**16))
@example(layer2=(8, 10), support=(8, 10), seed=0)  # 64 x 80 px ResNet
@example(layer2=(1, 9), support=(9, 1), seed=1)
def test_non_square_maps_decode_to_twice_each_side(layer2, support, seed):
    inch = INCH["resnet50"]
    reference, ours = make_pair(inch, seed, "torch")
    pyramid = make_pyramid(inch, resnet_like_sizes(layer2), resnet_like_sizes(support), 1, seed)
    with torch.no_grad():
        actual = ours(pyramid)
        expected = decoded_by_original_steps(reference, pyramid)
    assert actual.shape == (1, 2, 2 * layer2[0], 2 * layer2[1])
    assert_close_dtype(actual, expected, scale=10)


def test_support_grids_one_versus_two_match_the_originals_broadcast():
    """VGG16 at 272 px: pool5's support grid squeezes to 1x1, conv5's to 2x2; the original broadcast the
    1x1 grid, which is what resizing it replicates."""
    inch = INCH["vgg16"]
    reference, ours = make_pair(inch, 5, "torch")
    pyramid = make_pyramid(inch, [(8, 8), (17, 17), (34, 34)], [(8, 8), (17, 17), (34, 34)], 1, 5)
    with torch.no_grad():
        assert_close_dtype(ours(pyramid), reference(pyramid), scale=10)


def test_support_grids_two_versus_three_run_where_the_original_crashes():
    """VGG16 at 528 x 64 px: support grids (2, 1) and (3, 1) after squeezing."""
    inch = INCH["vgg16"]
    reference, ours = make_pair(inch, 6, "torch")
    pyramid = make_pyramid(inch, [(16, 2), (33, 4), (66, 8)], [(16, 2), (33, 4), (66, 8)], 1, 6)
    with torch.no_grad(), pytest.raises(RuntimeError):
        reference(pyramid)
    oracle = HPNLearner(inch, backend="reference")  # the einsum path, on the same weights
    oracle.load_state_dict(ours.state_dict())
    with torch.no_grad():
        logits = ours(pyramid)
        expected = oracle(pyramid)
    assert logits.shape == (1, 2, 132, 16) and torch.isfinite(logits).all()
    assert_close_dtype(logits, expected, scale=10)


@given(sizes=st.tuples(*[st.integers(1, 5)] * 8), seed=st.integers(0, 2**16))
@example(sizes=(1, 1, 1, 1, 3, 2, 4, 5), seed=0)  # size-1 grids replicate
def test_resize_4d_reproduces_multilinear_functions(sizes, seed):
    """Bilinear resizing with align_corners=True maps a function linear in each coordinate exactly onto the
    same function at the resized grid's positions (corners pinned)."""
    hq, wq, hs, ws, oq_h, oq_w, os_h, os_w = sizes
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(4, generator=g, dtype=torch.float64)

    def coords(n_in, n_out):  # positions of the output samples in input index units
        return torch.linspace(0, n_in - 1, n_out, dtype=torch.float64) if n_out > 1 else torch.zeros(1, dtype=torch.float64)

    def field(c0, c1, c2, c3):
        i, j, u, v = torch.meshgrid(c0, c1, c2, c3, indexing="ij")
        return (a[0] * i + a[1] * j + a[2] * u + a[3] * v)[None, None]

    grid = [torch.arange(n, dtype=torch.float64) for n in (hq, wq, hs, ws)]
    x = field(*grid)
    resized = resize_4d(x, (oq_h, oq_w), (os_h, os_w))
    expected = field(coords(hq, oq_h), coords(wq, oq_w), coords(hs, os_h), coords(ws, os_w))
    torch.testing.assert_close(resized, expected)


def test_gradients_equal_the_originals():
    inch = INCH["vgg16"]
    reference, ours = make_pair(inch, 7, "torch")
    pyramid = make_pyramid(inch, [(2, 2), (3, 3), (5, 5)], [(2, 2), (4, 4), (7, 7)], 2, 7)
    target = torch.randint(0, 2, (2, 10, 10), generator=torch.Generator().manual_seed(7))
    F.cross_entropy(reference(pyramid), target).backward()
    F.cross_entropy(ours(pyramid), target).backward()
    for (name, p), q in zip(reference.named_parameters(), ours.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_a_gradient_penalty_equals_the_originals(backend):
    """Second derivatives through the dense learner (``create_graph=True``): a penalty on the gradient
    of the loss with respect to the correlations, differentiated for every weight, equals the
    original's. A once-differentiable GroupNorm once returned constants here, dropping its terms."""
    inch = INCH["vgg16"]
    reference, ours = make_pair(inch, 8, backend)
    reference, ours = reference.double(), ours.double()
    pyramid = [level.double() for level in make_pyramid(inch, [(2, 2), (3, 3), (4, 4)], [(2, 2), (3, 3), (4, 4)], 1, 8)]
    target = torch.randint(0, 2, (1, 8, 8), generator=torch.Generator().manual_seed(8))

    def penalty_gradients(learner):
        inputs = [level.clone().requires_grad_() for level in pyramid]
        loss = F.cross_entropy(learner(inputs), target)
        grads = torch.autograd.grad(loss, inputs, create_graph=True)
        return torch.autograd.grad(sum(g.square().sum() for g in grads), list(learner.parameters()))

    for name, got, want in zip(dict(reference.named_parameters()), penalty_gradients(ours),
                               penalty_gradients(reference)):
        torch.testing.assert_close(got, want, rtol=1e-7, atol=1e-12, msg=name)


def test_original_oracle_recomputes_pruning_indices_per_call():
    """The only defect fixed in the oracle: pruning after a size change uses the new size."""
    conv = original.OriginalCenterPivotConv4d(2, 3, (3,) * 4, (1, 1, 2, 2), (1,) * 4)
    for support in (5, 8):
        x = torch.randn(1, 2, 3, 3, support, support)
        assert conv.prune(x).shape[-2:] == (-(-support // 2),) * 2
        torch.testing.assert_close(conv.prune(x), x[..., ::2, ::2])


def test_bad_pyramids_are_rejected_with_the_argument_named():
    ours = HPNLearner(INCH["vgg16"])
    good = make_pyramid(INCH["vgg16"], [(1, 1), (2, 2), (3, 3)], [(1, 1), (2, 2), (3, 3)], 1, 0)
    with pytest.raises(ValueError, match="hypercorr_pyramid.*3 levels"):
        ours(good[:2])
    with pytest.raises(ValueError, match=r"hypercorr_pyramid: corr_l3 must be \[B, 3,"):
        ours([good[0], good[2][:, :2], good[2]])
    with pytest.raises(ValueError, match="batch sizes differ"):
        ours([good[0], good[1].expand(2, -1, -1, -1, -1, -1), good[2]])
    with pytest.raises(ValueError, match="inch"):
        HPNLearner([3, 6])
    # The squeeze blocks would take another dtype (their weights follow the input) and the decoder not.
    with pytest.raises(TypeError, match=r"learner's dtype torch.float32.*torch.float64, torch.float32"):
        ours([good[0], good[1].double(), good[2]])
    with pytest.raises(TypeError, match=r"torch.int64"):
        ours([level.long() for level in good])
    # Autocast casts float16 and bfloat16 but leaves float64 alone, which then met bf16 weights deep inside.
    with torch.autocast("cpu", torch.bfloat16), torch.no_grad():
        assert ours([level.half() for level in good]).dtype == torch.bfloat16
        with pytest.raises(TypeError, match=r"autocast: float32, float16 or bfloat16\), got \[torch.float64"):
            ours([level.double() for level in good])
    # An empty batch reached a reshape that cannot infer a size from 0 elements.
    with pytest.raises(ValueError, match=r"hypercorr_pyramid: an empty batch \(\[0, 1, 1, 1, 1, 1\], .*at least"):
        ours([level[:0] for level in good])
    levels = [([torch.randn(0, 8, 3, 3)], [torch.randn(0, 8, 3, 3)])] * 3
    for lean in (False, True):
        with pytest.raises(ValueError, match=r"levels: an empty batch \(first query features \[0, 8, 3, 3\]\)"):
            ours.forward_fused(levels, None, lean=lean)


def test_fused_inference_convolves_only_the_varying_columns_of_the_second_layer(monkeypatch):
    """With a small object the fused first layers leave most support windows at their biases; their
    GroupNorm and second conv then run on the column split (varying columns whole, constant ones once),
    in every squeeze block, and the logits equal the original's on the dense hypercorrelation."""
    import hypertriton
    from hypertriton import learner as learner_module
    from hypertriton.ops import center_pivot_conv4d as cp_ops

    reference, ours = make_pair(INCH["resnet50"], seed=3, backend="torch")
    levels = small_resnet50_levels(seed=3)
    mask = torch.zeros(1, 160, 144)
    mask[0, 20:50, 30:60] = 1.0  # a small object: most windows see none of it
    shares, first_layer_outputs = [], []
    original_conv, original_fused = cp_ops.center_pivot_conv4d_split, learner_module.fused_hypercorrelation_cp_conv

    def recording(splits, *args):
        shares.extend(float(split.is_constant.float().mean()) for split in splits)
        return original_conv(splits, *args)

    def recording_fused(*args, **kwargs):
        result = original_fused(*args, **kwargs)
        first_layer_outputs.append(type(result[0]))
        return result

    monkeypatch.setattr(learner_module, "center_pivot_conv4d_split", recording)
    monkeypatch.setattr(learner_module, "fused_hypercorrelation_cp_conv", recording_fused)
    with torch.no_grad():
        got = ours.eval().forward_fused(levels, mask)
        pyramid = [hypertriton.hypercorrelation(q, s, mask)[0] for q, s in levels]
        want = decoded_by_original_steps(reference.eval(), pyramid)
    assert len(shares) == 3 and min(shares) >= cp_ops.MIN_CONSTANT_SHARE  # the split form really ran
    assert first_layer_outputs == [list] * 3  # split from the start: never stored whole
    assert_close_dtype(got, want, scale=10)

    # The same through squeeze_rest's own split of a dense first-layer output.
    monkeypatch.setattr(learner_module, "fused_hypercorrelation_cp_conv",
                        lambda *args, **kwargs: original_fused(*args, **{**kwargs, "column_split_share": None}))
    shares.clear()
    with torch.no_grad():
        assert_close_dtype(ours.forward_fused(levels, mask), want, scale=10)
    assert len(shares) == 3

    # Under bf16 autocast the split's products and convs take bf16, as the plain path's would.
    shares.clear()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        low = ours.forward_fused(levels, mask)
    assert len(shares) == 3
    assert_close_dtype(low.float(), want, dtype=torch.bfloat16, scale=10)


def test_fused_first_layer_output_is_freed_before_the_second_layer(monkeypatch):
    """The learner's largest activation (a squeeze block's first-layer output, here made dense) is held by
    nothing once its column split exists: by the time the second conv runs it is gone (a call that kept the
    fused op's returned pair alive held it to the end of the block: 46 -> 51 MB peak at 400 px)."""
    import weakref

    from hypertriton import learner as learner_module

    _, ours = make_pair(INCH["resnet50"], seed=4, backend="torch")
    levels = small_resnet50_levels(seed=4)
    mask = torch.zeros(1, 160, 144)
    mask[0, 20:50, 30:60] = 1.0
    outputs, alive_at_second_conv = [], []
    fused, split_conv = learner_module.fused_hypercorrelation_cp_conv, learner_module.center_pivot_conv4d_split

    def recording_fused(*args, **kwargs):
        result = fused(*args, **{**kwargs, "column_split_share": None})  # dense, split by squeeze_rest
        outputs.append(weakref.ref(result[0]))
        return result

    def checking_conv(*args, **kwargs):
        alive_at_second_conv.append(outputs[-1]() is not None)
        return split_conv(*args, **kwargs)

    monkeypatch.setattr(learner_module, "fused_hypercorrelation_cp_conv", recording_fused)
    monkeypatch.setattr(learner_module, "center_pivot_conv4d_split", checking_conv)
    with torch.no_grad():
        ours.eval().forward_fused(levels, mask)
    assert alive_at_second_conv == [False, False, False]


def test_mixing_frees_each_level_and_block_input_once_read(monkeypatch):
    """At 400 px the layer2 level's squeezed output and each mixing layer's input are 5 MB: once read, nothing
    holds them. When the last mixing block's second layer runs, the layer2 level it added and that block's
    first input are gone (a Sequential call held its input to the end of the block; the caller's list of
    levels held them all)."""
    import weakref

    _, ours = make_pair(INCH["resnet50"], seed=5, backend="torch")
    levels = small_resnet50_levels(seed=5)
    squeezed, block_inputs, alive = [], [], []
    squeeze_rest = HPNLearner.squeeze_rest

    def recording_rest(self, *args, **kwargs):
        out = squeeze_rest(self, *args, **kwargs)
        squeezed.append(weakref.ref(out))
        return out

    monkeypatch.setattr(HPNLearner, "squeeze_rest", recording_rest)
    block = ours.encoder_layer3to2
    with torch.no_grad(), \
            watching_forward([block[0]], lambda module, args: block_inputs.append(weakref.ref(args[0])), before=True), \
            watching_forward([block[3]], lambda module, args: alive.append(
                (squeezed[2]() is not None, block_inputs[-1]() is not None)), before=True):
        ours.eval().forward_fused(levels, torch.ones(1, 160, 144))
    assert len(squeezed) == 3 and alive == [(False, False)]


def test_squeeze_rest_refuses_a_column_split_it_cannot_take():
    """A column split is an inference form of the torch backend: with gradients recorded, or for a learner on
    another backend, squeeze_rest names the problem instead of failing deep inside."""
    from hypertriton.ops.fused_first_layer import fused_hypercorrelation_cp_conv

    _, ours = make_pair(INCH["resnet50"], seed=6, backend="torch")
    query, support = small_resnet50_levels(seed=6)[2]
    mask = torch.zeros(1, 160, 144)
    mask[0, 20:50, 30:60] = 1.0
    block = ours.encoder_layer2
    with torch.no_grad():
        splits = fused_hypercorrelation_cp_conv(query, support, mask, block[0], backend="torch",
                                                column_split_share=0.0)
    with pytest.raises(ValueError, match="column split needs inference"):
        ours.squeeze_rest(block, splits)
    ours.backend = "reference"
    with torch.no_grad(), pytest.raises(ValueError, match="column split needs inference"):
        ours.squeeze_rest(block, splits)


def test_layers_and_the_dense_learner_run_on_the_meta_device():
    """Shape-only runs (meta tensors, as in meta-device initialization): the autocast queries raised
    "unknown device type for autocast" there."""
    from hypertriton import CenterPivotConv4d
    from hypertriton.modules import GroupNorm4d

    meta = torch.device("meta")
    conv = CenterPivotConv4d(3, 8, 3, (1, 1, 2, 2)).to(meta)
    assert conv(torch.empty(1, 3, 5, 5, 5, 5, device=meta)).shape == (1, 8, 5, 5, 3, 3)
    norm = GroupNorm4d(4, 8).to(meta)
    assert norm(torch.empty(1, 8, 3, 3, 3, 3, device=meta)).shape == (1, 8, 3, 3, 3, 3)
    learner = HPNLearner(INCH["resnet50"]).to(meta)
    pyramid = [torch.empty(2, channels, side, side, side, side, device=meta)
               for channels, side in zip(INCH["resnet50"], (2, 4, 8))]
    out = learner(pyramid)
    assert out.device == meta and out.shape == (2, 2, 16, 16)


def test_a_default_device_leaves_cpu_runs_alone():
    """A shape-only dry run under ``with torch.device("meta")`` (or any default device) must not leave
    cached index tensors on that device: the next real run raised "Cannot copy out of meta tensor"."""
    from hypertriton.ops.center_pivot_conv4d import _support_taps

    _support_taps.cache_clear()  # as if these sizes were new in this process
    inch = [1, 1, 1]
    torch.manual_seed(9)
    learner = HPNLearner(inch).eval()
    pyramid = [torch.rand(1, 1, side, side, side, side) for side in (2, 4, 8)]
    fresh = [torch.rand(1, 1, side, side, side, side) for side in (3, 5, 9)]
    with torch.no_grad():
        before = learner(pyramid)
        with torch.device("meta"):
            meta_learner = HPNLearner(inch)
            assert meta_learner([p.to("meta") for p in fresh]).device.type == "meta"
            torch.testing.assert_close(learner(pyramid), before, rtol=0, atol=0)  # CPU inputs, meta default
        assert learner(fresh).device.type == "cpu"


HOOKED = ["encoder_layer4", "encoder_layer2.0", "encoder_layer2.0.conv1", "encoder_layer3.1", "encoder_layer3.2",
          "encoder_layer3.3.conv2", "encoder_layer4to3", "encoder_layer3to2.4", "decoder1", "decoder2.2"]


@pytest.mark.parametrize("module_name", HOOKED)
@pytest.mark.parametrize("grad", [False, True], ids=["no-grad", "grad"])
def test_hooks_inside_run_once_and_see_the_originals_tensors(module_name, grad):
    """A forward hook on any module inside the learner (a block, a layer, a branch of a center-pivot conv,
    a GroupNorm, a decoder convolution) runs once per forward and sees what the same hook on the original
    sees, with or without gradients, through forward and forward_fused: the fast paths skipped the
    blocks, fused the first layers and the ReLUs, split columns and normalized in place, so such hooks
    never ran, ran on other tensors, or saw their output overwritten."""
    reference, ours = make_pair(INCH["resnet50"])
    levels = small_resnet50_levels(3)
    levels = [([q[:, :, :s, :s] for q in query], [t[:, :, :s, :s] for t in support])  # square maps
              for (query, support), s in zip(levels, (3, 5, 10))]
    mask = torch.zeros(1, 40, 40)
    mask[:, 5:25, 10:30] = 1.0
    pyramid = [ours._dense_pyramid([level], mask)[0] for level in levels]
    captured = {}

    def capture(name):
        return lambda module, args, output: captured.setdefault(name, []).append(output.detach().clone())

    handles = [reference.get_submodule(module_name).register_forward_hook(capture("original")),
               ours.get_submodule(module_name).register_forward_hook(capture("ours"))]
    try:
        with torch.set_grad_enabled(grad):
            want = reference([level.clone() for level in pyramid])
            dense = ours(pyramid)
            fused = ours.forward_fused(levels, mask)
    finally:
        for handle in handles:
            handle.remove()
    calls = len(captured["original"])
    assert calls >= 1 and len(captured["ours"]) == 2 * calls  # forward, then forward_fused
    for got, expected in zip(captured["ours"], captured["original"] * 2):
        assert_close_dtype(got, expected, torch.float32, scale=10)
    for logits in (dense, fused):
        assert_close_dtype(logits, want, torch.float32, scale=10)
    if grad:
        fused.sum().backward()
        assert all(p.grad is not None for p in ours.parameters())


def test_tensors_global_hooks_keep_are_not_overwritten():
    """Global hooks (activation recorders, module trackers) leave the fast path as it is, but the GroupNorm
    after each center-pivot conv then runs out of place: it normalized the conv's output (its own input) in
    place, which a recorder had kept (it found GroupNorm + ReLU of it after the forward)."""
    from hypertriton import CenterPivotConv4d
    from hypertriton.modules import GroupNorm4d

    _, ours = make_pair(INCH["resnet50"])
    levels = small_resnet50_levels(5)
    mask = torch.zeros(1, 160, 144)
    mask[0, 20:120, 30:110] = 1.0
    with torch.no_grad():
        plain = ours.forward_fused(levels, mask)
    kept = []

    def keep_conv_outputs(module, args, output):
        if isinstance(module, CenterPivotConv4d):
            kept.append((output, output.clone()))

    def keep_norm_inputs(module, args):
        if isinstance(module, GroupNorm4d):
            kept.append((args[0], args[0].clone()))

    for register, hook in ((torch.nn.modules.module.register_module_forward_hook, keep_conv_outputs),
                           (torch.nn.modules.module.register_module_forward_pre_hook, keep_norm_inputs)):
        kept.clear()
        handle = register(hook)
        try:
            with torch.no_grad():
                hooked = ours.forward_fused(levels, mask)
        finally:
            handle.remove()
        assert len(kept) >= 6, hook.__name__  # the blocks' later layers run as modules on the fast path
        for tensor, at_the_time in kept:
            assert torch.equal(tensor, at_the_time), hook.__name__
        torch.testing.assert_close(hooked, plain, rtol=0, atol=0)


def test_a_hook_on_the_learner_itself_runs_on_the_fused_path():
    """HSNet calls forward_fused as a method: a hook on the learner (where logits are captured) never ran
    there. With one, forward_fused calls the learner on the dense pyramid, as the original does."""
    _, ours = make_pair(INCH["resnet50"])
    levels = small_resnet50_levels(4)
    mask = torch.ones(1, 160, 144)
    with torch.no_grad():
        plain = ours.forward_fused(levels, mask)
    seen = []
    handle = ours.register_forward_hook(lambda module, args, output: seen.append((len(args[0]), output.clone())))
    try:
        with torch.no_grad():
            hooked = ours.forward_fused(levels, mask)
    finally:
        handle.remove()
    assert len(seen) == 1 and seen[0][0] == 3  # called once, on the three levels' hypercorrelations
    torch.testing.assert_close(seen[0][1], hooked, rtol=0, atol=0)
    assert_close_dtype(hooked, plain, torch.float32, scale=10)


def test_levels_given_shallowest_first_are_refused():
    # With equal layer counts per level nothing else tells the order apart: the logits came out at the
    # deepest level's size (8x8 instead of 32x32), silently.
    torch.manual_seed(0)
    learner = HPNLearner([2, 2, 2], backend="torch").eval()
    sizes = [(4, 4), (8, 8), (16, 16)]  # deepest first
    levels = [([torch.randn(1, 3, *size) for _ in range(2)], [torch.randn(1, 3, *size) for _ in range(2)])
              for size in sizes]
    mask = torch.ones(1, 64, 64)
    with torch.no_grad():
        assert learner.forward_fused(levels, mask).shape == (1, 2, 32, 32)
        with pytest.raises(ValueError, match=r"levels: expected the levels deepest first .* got query sizes "
                                             r"\[\(16, 16\), \(8, 8\), \(4, 4\)\]; reversed\?"):
            learner.forward_fused(levels[::-1], mask)
        pyramid = learner._dense_pyramid(levels, mask)
        with pytest.raises(ValueError, match=r"hypercorr_pyramid: expected the levels deepest first"):
            learner(pyramid[::-1])


@pytest.mark.parametrize("design", [
    {"squeeze_channels": (8, 16, 32), "kernel_sizes": ((3, 3, 3),) * 3, "support_strides": ((2, 2, 1), (2, 2, 2),
                                                                                              (4, 2, 2))},
    {"squeeze_channels": (8, 24), "kernel_sizes": ((3, 1), (5, 3), (1, 3)), "support_strides": ((1, 2), (4, 1),
                                                                                                (2, 2))},
], ids=["narrower", "two-layer-blocks"])
def test_a_squeeze_design_of_ones_own_runs_alike_on_every_path(design):
    # The squeezing blocks' channels, kernels and strides were fixed; another design meant reassigning
    # all seven submodules of a subclass.
    from helpers import make_mask

    torch.manual_seed(3)
    learner = HPNLearner([2, 3, 1], backend="torch", **design).double().eval()
    assert [module.conv1.kernel_size[0] for module in learner.encoder_layer3[::3]] == list(design["kernel_sizes"][1])
    assert learner.decoder2[-1].in_channels == design["squeeze_channels"][-2]
    gen = torch.Generator().manual_seed(4)
    levels = [([torch.randn(1, 4, side, side, generator=gen, dtype=torch.float64) for _ in range(layers)],
               [torch.randn(1, 4, side, side, generator=gen, dtype=torch.float64) for _ in range(layers)])
              for layers, side in zip((2, 3, 1), (3, 5, 9))]
    mask = make_mask("blob", 1, 36, 36, 4)
    with torch.no_grad():
        dense = learner(learner._dense_pyramid(levels, mask))
        fused = learner.forward_fused(levels, mask)
        lean = learner.forward_fused(levels, mask, lean=True, rows_per_step=2)
    assert dense.shape == (1, 2, 18, 18)
    for got in (fused, lean):
        torch.testing.assert_close(got, dense, rtol=1e-9, atol=1e-9 * float(dense.abs().max()))
    with pytest.raises(ValueError, match=r"squeeze_channels: expected at least 2 positive ints .* each divisible "
                                         r"by 4 .* got \(6, 16\)"):
        HPNLearner([2, 3, 1], squeeze_channels=(6, 16))
    with pytest.raises(ValueError, match=r"squeeze_channels: expected at least 2 .* got \(128,\)"):
        HPNLearner([2, 3, 1], squeeze_channels=(128,), kernel_sizes=((3,),) * 3, support_strides=((2,),) * 3)
    with pytest.raises(ValueError, match=r"support_strides: expected 3 blocks .* of 2 positive ints"):
        HPNLearner([2, 3, 1], squeeze_channels=(8, 16), kernel_sizes=((3, 3),) * 3, support_strides=((2,),) * 3)
