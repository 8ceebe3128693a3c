"""HSNet end to end: backbone features, forward vs the original pipeline, k-shot voting, multi-class
segmentation, frozen backbone, odd image sizes, autocast, pretrained weights (never downloaded)."""

from __future__ import annotations

import importlib.util
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from helpers import counting_nnpack

from hypertriton import HSNet
from hypertriton import backbones as bb
from hypertriton.model import foreground, vote_nshot
from hypertriton.ops import cpu_conv
from hypertriton.testing import assert_close_dtype

_SPEC = importlib.util.spec_from_file_location(
    "original_hsnet", Path(__file__).resolve().parents[1] / "bench" / "original_hsnet.py")
original = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(original)

_MODELS: dict[str, HSNet] = {}


def model_for(backbone: str) -> HSNet:
    """One randomly initialized model per backbone for the whole module (vgg16/resnet101 build slowly)."""
    if backbone not in _MODELS:
        torch.manual_seed(0)
        _MODELS[backbone] = HSNet(backbone, backend="torch").eval()
    return _MODELS[backbone]


def images(batch: int, height: int, width: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    query, support = torch.randn(2, batch, 3, height, width, generator=g)
    mask = torch.zeros(batch, height, width)
    mask[:, height // 4: 3 * height // 4, width // 3: 2 * width // 3] = 1  # an object-like blob
    return query, support, mask


# ----------------------------------------------------------------------------- backbone features
@pytest.mark.parametrize("nnpack", [False, True], ids=["direct", "nnpack"])
@pytest.mark.parametrize("backbone", ["resnet50", "vgg16"])
def test_features_equal_the_original_extraction(backbone, nnpack, monkeypatch):
    """Bit for bit with PyTorch's own convolutions; within the Winograd tolerance (relative to the largest
    feature) where the stride-1 convolutions run through NNPACK (hypertriton.ops.cpu_conv)."""
    model = model_for(backbone)
    # Large enough that the first stage's maps reach NNPACK (cpu_conv.MIN_POSITIONS_PER_THREAD) on 2 threads
    img = images(1, 161, 147, 1)[0]
    monkeypatch.setenv(cpu_conv.ENV_VARIABLE, "1" if nnpack else "0")
    with counting_nnpack() as nnpack_calls:
        ours = model.extract_features(img)
    assert bool(nnpack_calls) == (nnpack and cpu_conv._nnpack_present())
    with torch.no_grad():
        if backbone == "vgg16":
            expected = original.extract_feat_vgg(img, model.backbone)
        else:
            expected = original.extract_feat_res(img, model.backbone, original.NBOTTLENECKS[backbone])
    assert len(ours) == len(expected) == model.spec.num_features
    for a, b in zip(ours, expected):
        if nnpack:
            assert_close_dtype(a, b, "winograd", scale=float(b.abs().max()))
        else:
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert [f.shape[1] for f in ours] == list(model.spec.channels)
    assert any((f < 0).any() for f in ours)  # taken before the ReLU


@pytest.mark.parametrize("backbone", ["resnet18", "resnet50"])
def test_resnet_features_are_block_outputs_before_the_relu(backbone):
    """Hooks on torchvision's own blocks see relu(feature) for every block of layer2..layer4."""
    model = model_for(backbone)
    seen = []
    blocks = [b for layer in (model.backbone.layer2, model.backbone.layer3, model.backbone.layer4) for b in layer]
    handles = [b.register_forward_hook(lambda m, i, o: seen.append(o.clone())) for b in blocks]
    img = images(1, 64, 75, 2)[0]
    try:
        with torch.no_grad():
            model.backbone(img)
    finally:
        for handle in handles:
            handle.remove()
    ours = model.extract_features(img)
    assert len(ours) == len(seen) == sum(model.spec.layers_per_level)
    for feature, hooked in zip(ours, seen):
        torch.testing.assert_close(torch.relu(feature), hooked)


@pytest.mark.parametrize("backbone", sorted(bb.BACKBONES))
def test_backbone_nets_are_torchvisions(backbone):
    """hypertriton.backbone_nets restates torchvision's classifiers (importing torchvision took 1.3 s):
    the same modules (repr), state_dict keys and shapes, the same random weights from one seed (ResNets:
    torchvision's constructor; VGG-16: its convolutions' initialization on a meta-built model, as
    build_backbone does), the same outputs, and the weights URLs torchvision names."""
    from hypertriton.backbone_nets import IMAGENET_WEIGHTS_URLS, make_backbone_net

    constructor = getattr(torchvision.models, backbone)
    if backbone == "vgg16":
        with torch.device("meta"):
            theirs = constructor(weights=None)
        theirs = theirs.to_empty(device="cpu")
        torch.manual_seed(3)
        for module in theirs.features:
            if isinstance(module, torch.nn.Conv2d):
                torch.nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
                torch.nn.init.zeros_(module.bias)
        for tensor in theirs.classifier.parameters():
            torch.nn.init.zeros_(tensor)
        torch.manual_seed(3)
        ours = bb.build_backbone(backbone)
    else:
        torch.manual_seed(3)
        theirs = constructor(weights=None)
        torch.manual_seed(3)
        ours = make_backbone_net(backbone)
        assert repr(make_backbone_net(backbone)) == repr(theirs)
    assert repr(ours) == repr(theirs)
    theirs_state, ours_state = theirs.state_dict(), ours.state_dict()
    assert list(ours_state) == list(theirs_state)
    for key, value in theirs_state.items():
        torch.testing.assert_close(ours_state[key], value, rtol=0, atol=0, msg=key)
    image = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(image), theirs.eval()(image), rtol=0, atol=0)
    weights_enum = getattr(torchvision.models, {"vgg16": "VGG16_Weights"}.get(
        backbone, f"ResNet{backbone[len('resnet'):]}_Weights"))
    assert IMAGENET_WEIGHTS_URLS[backbone] == weights_enum.IMAGENET1K_V1.url


@pytest.mark.parametrize("backbone", sorted(bb.BACKBONES))
def test_spec_predicts_feature_sizes(backbone):
    spec = bb.get_spec(backbone)
    with torch.device("meta"):  # shapes only: no weights are drawn or used
        backbone_module = getattr(torchvision.models, backbone)(weights=None)
        for height, width in ((64, 64), (97, 65), (272, 129)):
            feats = bb.extract_features(backbone_module, spec, torch.empty(1, 3, height, width))
            sizes, end = [], len(feats)
            for layers in spec.layers_per_level:
                level = feats[end - layers: end]
                assert len({tuple(f.shape[-2:]) for f in level}) == 1
                sizes.append(tuple(level[0].shape[-2:]))
                end -= layers
            assert end == 0
            assert sizes == spec.feature_sizes(height, width)
            assert [f.shape[1] for f in feats] == list(spec.channels)


# ----------------------------------------------------------------------------- forward
@pytest.mark.parametrize("fused", [True, False])
def test_forward_equals_the_original_pipeline(fused, monkeypatch):
    """Same weights in, same logits out: original feature extraction, correlation, learner, final resize."""
    model = model_for("resnet50")
    monkeypatch.setattr(model, "fused", fused)
    query, support, mask = images(2, 64, 64, 3)
    with torch.no_grad():
        ours = model(query, support, mask)
        learner = original.original_learner_from_state_dict(model.state_dict())
        feats = [original.extract_feat_res(img, model.backbone, original.NBOTTLENECKS["resnet50"])
                 for img in (query, support)]
        logits = original.original_forward_features(learner, *feats, mask, original.STACK_IDS["resnet50"])
        expected = F.interpolate(logits, support.shape[-2:], mode="bilinear", align_corners=True)
    assert ours.shape == (2, 2, 64, 64)
    assert_close_dtype(ours, expected, scale=10)


def test_forward_and_forward_features_agree():
    model = model_for("resnet18")
    query, support, mask = images(2, 72, 88, 4)
    with torch.no_grad():
        logits = model.forward_features(model.extract_features(query), model.extract_features(support), mask)
        expected = F.interpolate(logits, (72, 88), mode="bilinear", align_corners=True)
        actual = model(query, support, mask)
    assert logits.shape == (2, 2, 2 * 9, 2 * 11)  # twice the layer2 map (72/8, 88/8)
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)


@pytest.mark.parametrize("backbone,size", [
    ("resnet50", (64, 97)), ("resnet50", (65, 64)),
    ("resnet101", (71, 64)),
    ("vgg16", (97, 66)), ("vgg16", (64, 64)),
])
def test_odd_and_non_square_sizes_batch_one_and_empty_mask(backbone, size, monkeypatch):
    """With an all-zero support mask every correlation is 0, so the logits cannot depend on the query; the
    fused and the dense paths agree."""
    model = model_for(backbone)
    query, support, blob_mask = images(1, *size, 5)
    zero = torch.zeros(1, *size)
    with torch.no_grad():
        first = model(query, support, zero)
        second = model(torch.randn_like(query), support, zero)
        blob = model(query, support, blob_mask)
        monkeypatch.setattr(model, "fused", False)
        dense = model(query, support, blob_mask)
    assert first.shape == (1, 2, *size)
    assert torch.isfinite(first).all() and torch.isfinite(blob).all()
    torch.testing.assert_close(first, second, rtol=0, atol=1e-6)
    assert not torch.allclose(first, blob)  # the mask matters when it is not empty
    assert_close_dtype(blob, dense, scale=10)


def test_vgg_at_sizes_whose_support_grids_differ_after_squeezing():
    """VGG16 at 528 x 64 px: pool5 squeezes to a (2, 1) support grid, conv5 to (3, 1); the original
    crashed here."""
    model = model_for("vgg16")
    specs = model.spec.feature_sizes(528, 64)
    assert specs == [(16, 2), (33, 4), (66, 8)]
    g = torch.Generator().manual_seed(6)
    feats = [torch.randn(1, 512, *size, generator=g) for layers, size in
             zip(reversed(model.spec.layers_per_level), reversed(specs)) for _ in range(layers)]
    with torch.no_grad():
        logits = model.forward_features(feats, feats, torch.ones(1, 528, 64))
    assert logits.shape == (1, 2, 132, 16) and torch.isfinite(logits).all()


@pytest.mark.parametrize("fused", [True, False])
def test_autocast_bf16_on_cpu_stays_close_to_fp32(fused, monkeypatch):
    model = model_for("resnet18")
    monkeypatch.setattr(model, "fused", fused)
    query, support, mask = images(1, 64, 80, 7)
    with torch.no_grad():
        expected = model(query, support, mask)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            actual = model(query, support, mask)
    assert actual.dtype in (torch.bfloat16, torch.float32)
    error = (actual.float() - expected).norm() / expected.norm()
    assert error < 0.05, f"relative error {error:.3g} of bf16 autocast against fp32"


# ----------------------------------------------------------------------------- frozen backbone
def test_backbone_stays_frozen_under_train():
    model = HSNet("resnet18", backend="torch")
    model.train()
    assert not model.backbone.training and not any(m.training for m in model.backbone.modules())
    assert model.hpn_learner.training
    buffers = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    query, support, mask = images(2, 64, 64, 8)
    loss = F.cross_entropy(model(query, support, mask), mask.long())
    loss.backward()
    for key, value in model.backbone.state_dict().items():
        torch.testing.assert_close(value, buffers[key], rtol=0, atol=0, msg=key)  # BN statistics included
    assert all(p.grad is None and not p.requires_grad for p in model.backbone.parameters())
    assert all(p.grad is not None for p in model.hpn_learner.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == sum(p.numel() for p in model.hpn_learner.parameters())


# ----------------------------------------------------------------------------- k-shot voting
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "dense"])
def test_torch_func_grad_equals_autograd(fused):
    """``torch.func.grad`` with ``functional_call`` (the functorch style of meta-learning code) runs every
    backward under ``create_graph``: through the fused layer and the query-major GroupNorm it needs
    setup_context-style Functions and differentiable backwards, and gives autograd's gradients."""
    from torch.func import functional_call, grad

    torch.manual_seed(0)
    model = HSNet("resnet18", fused=fused).eval()
    generator = torch.Generator().manual_seed(1)
    query, support = torch.randn(2, 1, 3, 64, 64, generator=generator)
    mask = (torch.rand(1, 64, 64, generator=generator) > 0.5).float()
    params = {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}
    got = grad(lambda p: functional_call(model, p, (query, support, mask)).square().mean())(params)
    want = torch.autograd.grad(model(query, support, mask).square().mean(),
                               [p for p in model.parameters() if p.requires_grad])
    for (name, g), w in zip(got.items(), want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-8, msg=name)


def test_foreground_is_the_argmax_ties_and_nan_included():
    nan, inf = float("nan"), float("inf")
    pairs = [(0.0, 1.0), (1.0, 0.0), (0.5, 0.5), (-0.0, 0.0), (nan, 1.0), (1.0, nan), (nan, nan), (-inf, inf),
             (inf, inf), (inf, nan)]
    logits = torch.tensor(pairs).t().reshape(1, 2, 2, 5)
    got = foreground(logits)
    assert got.dtype == torch.int64 and got.shape == (1, 2, 5)
    torch.testing.assert_close(got, logits.argmax(dim=1), rtol=0, atol=0)
    random = torch.randn(3, 2, 7, 9, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(foreground(random), random.argmax(dim=1), rtol=0, atol=0)


def test_vote_nshot_on_hand_computed_votes():
    votes = torch.tensor([[[0, 1, 2, 3]], [[0, 0, 0, 0]], [[1, 1, 0, 0]], [[0, 2, 1, 1]]])
    expected = torch.tensor([[[0.0, 0, 1, 1]],   # max 3: 1/3 < 0.5 <= 2/3
                             [[0.0, 0, 0, 0]],   # empty: divided by max(0, 1)
                             [[1.0, 1, 0, 0]],   # max 1 of 3 shots: a single vote suffices
                             [[0.0, 1, 1, 1]]])  # max 2: a tie 1/2 counts as foreground
    torch.testing.assert_close(vote_nshot(votes, 3), expected)
    single = torch.tensor([[[0, 1], [1, 0]]])
    assert vote_nshot(single, 1) is single


def fake_learner(model, monkeypatch, margin=2.0):
    """Make the learner's logits +-margin from the support mask (resized to the query), so per-shot
    argmax masks are exactly the support masks."""
    def forward_features(query_feats, support_feats, support_mask):
        fg = margin * (2 * support_mask.float() - 1)
        return torch.stack([-fg, fg], dim=1)
    monkeypatch.setattr(model, "forward_features", forward_features)


def crafted_shots(height=64, width=64):
    masks = torch.zeros(2, 3, height, width)
    masks[0, 0, :, :32] = 1      # left half
    masks[0, 1, :, :16] = 1      # left quarter
    masks[0, 2, :32] = 1         # top half
    masks[1, 1, 10:20, 10:20] = 1  # batch item 1: one shot with a square, two empty
    return masks


@pytest.mark.parametrize("nshot", [1, 2, 3])
def test_predict_mask_nshot_equals_the_original_voting(nshot, monkeypatch):
    model = HSNet("resnet18", backend="torch").eval()
    fake_learner(model, monkeypatch)
    query, _, _ = images(2, 64, 64, 9)
    batch = {"query_img": query, "support_imgs": torch.randn(2, 3, 3, 64, 64), "support_masks": crafted_shots()}

    def original_forward(q, s, m):
        return F.interpolate(model.forward_features(None, None, m), q.shape[-2:], mode="bilinear", align_corners=True)

    ours = model.predict_mask_nshot(batch, nshot)
    expected = original.original_predict_mask_nshot(original_forward, batch, nshot)
    assert ours.dtype == expected.dtype
    torch.testing.assert_close(ours, expected, rtol=0, atol=0)
    if nshot == 1:
        torch.testing.assert_close(ours, crafted_shots()[:, 0].long())
    if nshot == 3:  # hand-computed: left half has 2 of max 3 votes, the top-right quarter 1
        assert ours[0, 40, 10] == 1 and ours[0, 10, 50] == 0
        torch.testing.assert_close(ours[1], crafted_shots()[1, 1])  # max vote 1: the square alone


def test_predict_computes_the_query_features_once(monkeypatch):
    model = HSNet("resnet18", backend="torch").eval()
    calls = []
    extract = model.extract_features
    monkeypatch.setattr(model, "extract_features", lambda img: calls.append(img) or extract(img))
    query, _, _ = images(1, 64, 64, 10)
    supports = torch.randn(1, 3, 3, 64, 64)
    masks = crafted_shots()[:1]
    mask = model.predict(query, supports, masks)
    assert len(calls) == 1 + 3 and calls[0] is query
    assert mask.shape == (1, 64, 64) and mask.dtype == torch.int64
    batch = {"query_img": query, "support_imgs": supports, "support_masks": masks}
    torch.testing.assert_close(mask, model.predict_mask_nshot(batch, 3).long())


def test_predict_mask_nshot_resizes_to_the_original_image_size(monkeypatch):
    model = HSNet("resnet18", backend="torch").eval()
    fake_learner(model, monkeypatch)
    batch = {"query_img": torch.randn(1, 3, 64, 64), "support_imgs": torch.randn(1, 1, 3, 64, 64),
             "support_masks": torch.ones(1, 1, 64, 64),
             "org_query_imsize": [torch.tensor([90]), torch.tensor([70])]}  # PIL (width, height)
    assert model.predict_mask_nshot(batch, 1).shape == (1, 70, 90)
    batch["org_query_imsize"] = torch.tensor([90, 70])
    assert model.predict_mask_nshot(batch, 1).shape == (1, 70, 90)
    batch["org_query_imsize"] = [torch.tensor([90, 91]), torch.tensor([70, 71])]
    with pytest.raises(ValueError, match="org_query_imsize"):
        model.predict_mask_nshot(batch, 1)


def test_original_size_predictions_resize_the_learners_logits_straight_to_that_size(monkeypatch):
    # The original interpolates the learner's logits once, to the original image size (bilinear,
    # align_corners=True); going through the resized image's size first moves pixels along every edge.
    model = HSNet("resnet18", backend="torch").eval()
    logits = torch.randn(1, 2, 32, 32, generator=torch.Generator().manual_seed(4))
    monkeypatch.setattr(model, "forward_features", lambda *args: logits)
    batch = {"query_img": torch.randn(1, 3, 64, 64), "support_imgs": torch.randn(1, 1, 3, 64, 64),
             "support_masks": torch.ones(1, 1, 64, 64), "org_query_imsize": torch.tensor([90, 70])}
    want = F.interpolate(logits, (70, 90), mode="bilinear", align_corners=True).argmax(dim=1)
    two_steps = F.interpolate(F.interpolate(logits, (64, 64), mode="bilinear", align_corners=True), (70, 90),
                              mode="bilinear", align_corners=True).argmax(dim=1)
    assert not torch.equal(two_steps, want)  # the data tells the two apart
    assert torch.equal(model.predict_mask_nshot(batch, 1), want)
    batch["query_mask"] = torch.zeros(1, 70, 90)  # the truth at the original size sets the size as well
    del batch["org_query_imsize"]
    assert torch.equal(model.predict_mask_nshot(batch, 1), want)


def test_nshot_and_shapes_are_checked():
    model = model_for("resnet18")
    batch = {"query_img": torch.randn(1, 3, 64, 64), "support_imgs": torch.randn(1, 2, 3, 64, 64),
             "support_masks": torch.ones(1, 2, 64, 64)}
    with pytest.raises(ValueError, match=r"nshot: expected an int in \[1, 2\]"):
        model.predict_mask_nshot(batch, 3)
    with pytest.raises(ValueError, match=r"query_img: expected an image batch \[B, 3, H, W\], got \[1, 64, 64\]"):
        model(torch.randn(1, 64, 64), torch.randn(1, 3, 64, 64), torch.ones(1, 64, 64))
    with pytest.raises(ValueError, match="at least 32 px"):
        model(torch.randn(1, 3, 16, 64), torch.randn(1, 3, 16, 64), torch.ones(1, 16, 64))
    with pytest.raises(ValueError, match="support_masks"):
        model.predict(torch.randn(1, 3, 64, 64), torch.randn(1, 2, 3, 64, 64), torch.ones(1, 3, 64, 64))
    with pytest.raises(ValueError, match=r"support_img: expected an image batch \[B, 3, H, W\], got list"):
        model(torch.randn(1, 3, 64, 64), [torch.randn(3, 64, 64)], torch.ones(1, 64, 64))
    with pytest.raises(ValueError, match=r"support_mask has batch 2 .* support_img has batch 1"):
        model(torch.randn(1, 3, 64, 64), torch.randn(1, 3, 64, 64), torch.ones(2, 64, 64))
    with pytest.raises(ValueError, match=r"support_mask: expected \[B, H, W\], got \[1, 1, 64, 64\]; for a "
                                         r"\[B, 1, H, W\] mask pass support_mask\[:, 0\]"):
        model(torch.randn(1, 3, 64, 64), torch.randn(1, 3, 64, 64), torch.ones(1, 1, 64, 64))
    # A mask of another size than its image is refused, not stretched over it (the file readers refuse it too).
    with pytest.raises(ValueError, match=r"support_mask: expected \[B, H, W\] = \[1, 64, 64\] .* got \[1, 32, 64\]"):
        model(torch.randn(1, 3, 64, 64), torch.randn(1, 3, 64, 64), torch.ones(1, 32, 64))
    with pytest.raises(ValueError, match=r"support_mask: expected \[B, H, W\] = \[1, 64, 96\]"):
        model.predict(torch.randn(1, 3, 64, 64), torch.randn(1, 2, 3, 64, 96), torch.ones(1, 2, 64, 64))
    # predict reads a 4-D support tensor as one shot per query; K shots of one query must say so.
    with pytest.raises(ValueError, match=r"one shot per query image .* B = 1 .* got \[3, 3, 64, 64\]; for K shots"):
        model.predict(torch.randn(1, 3, 64, 64), torch.randn(3, 3, 64, 64), torch.ones(3, 64, 64))
    pixels = torch.randint(0, 255, (1, 3, 64, 64), dtype=torch.uint8)
    with pytest.raises(TypeError, match=r"query_img: expected torch.float32 images .* got dtype torch.uint8"):
        model(pixels, torch.randn(1, 3, 64, 64), torch.ones(1, 64, 64))
    with pytest.raises(TypeError, match=r"support_img: expected torch.float32 images .* got dtype torch.float64"):
        model(torch.randn(1, 3, 64, 64), torch.randn(1, 3, 64, 64, dtype=torch.float64), torch.ones(1, 64, 64))
    with torch.autocast("cpu", torch.bfloat16), pytest.raises(TypeError, match=r"query_img: .* got dtype torch.float64"
                                                              r".*not float64"):  # autocast does not cast it
        model(torch.randn(1, 3, 64, 64, dtype=torch.float64), torch.randn(1, 3, 64, 64), torch.ones(1, 64, 64))


# ----------------------------------------------------------------------------- multi-class
def test_segment_labels_by_highest_foreground_probability(monkeypatch):
    model = HSNet("resnet18", backend="torch").eval()
    fake_learner(model, monkeypatch)  # fg probability: sigmoid(4) = 0.982 inside a mask, 0.018 outside
    left, right, empty = torch.zeros(1, 64, 64), torch.zeros(1, 64, 64), torch.zeros(1, 64, 64)
    left[:, :, :32] = 1
    right[:, :, 40:] = 1
    support = torch.randn(1, 3, 64, 64)
    query = torch.randn(3, 64, 64)
    # A class without a marked pixel still competes (its scores are the learner's biases): said, not silent.
    with pytest.warns(UserWarning, match=r"supports\[5\]: the support masks mark no pixel \(for query \[0\]\)"):
        labels = model.segment(query, {7: (support, left), 3: (support, right), 5: (support, empty)})
    expected = torch.zeros(64, 64, dtype=torch.long)
    expected[:, :32], expected[:, 40:] = 7, 3
    assert labels.shape == (64, 64)
    torch.testing.assert_close(labels, expected)
    # a threshold above every probability leaves only background; identical classes: the first listed wins
    assert (model.segment(query, {7: (support, left)}, threshold=0.99, background=-1) == -1).all()
    tie = model.segment(query[None], {4: (support[None], left[None]), 9: (support[None], left[None])})
    assert tie.shape == (1, 64, 64) and set(tie.unique().tolist()) == {0, 4}
    with pytest.raises(ValueError, match="class id 0 is the background label"):
        model.segment(query, {0: (support, left)})
    with pytest.raises(ValueError, match=r"supports\[3\]: support_imgs .* and support_masks .* must share \[B, K\]"):
        model.segment(query, {7: (support, left), 3: (support.expand(2, -1, -1, -1), right)})
    with pytest.raises(ValueError, match=r"supports\[3\]: support_mask: expected \[B, H, W\] = \[1, 64, 64\]"):
        model.segment(query, {7: (support, left), 3: (support, right[:, :32])})
    with pytest.raises(ValueError, match=r"class ids must be integers, got 7.0 \(float\)"):
        model.segment(query, {7.0: (support, left)})
    # ids read from arrays are numpy integers
    torch.testing.assert_close(model.segment(query, {np.int64(7): (support, left)}),
                               model.segment(query, {7: (support, left)}))


def test_inputs_on_another_device_or_dtype_or_empty_are_named_before_any_work(monkeypatch):
    model = HSNet("resnet18", backend="torch").eval()
    query, support, mask = torch.randn(1, 3, 64, 64), torch.randn(1, 3, 64, 64), torch.ones(1, 64, 64)
    # "meta" stands in for a GPU: a tensor on another device than the model's parameters.
    with pytest.raises(ValueError, match=r"query_img is on meta but the model is on cpu; move one of them"):
        model(query.to("meta"), support, mask)
    with pytest.raises(ValueError, match=r"query_img: an empty batch \[0, 3, 64, 64\]; expected at least one"):
        model(query[:0], support[:0], mask[:0])
    feats = model.extract_features(query)
    work = []
    monkeypatch.setattr(model.hpn_learner, "decode", lambda *args: work.append(1))
    with pytest.raises(TypeError, match=r"levels: expected features in the learner's dtype torch.float32 .* "
                                        r"got \[torch.float64\]"):
        model.forward_features([f.double() for f in feats], [f.double() for f in feats], mask)
    assert not work


def test_segment_with_one_class_matches_one_shot_prediction():
    model = model_for("resnet18")
    query, support, mask = images(2, 64, 72, 11)
    labels = model.segment(query, {1: (support[:, None], mask[:, None])})
    torch.testing.assert_close(labels, model.predict(query, support, mask))


def test_supports_of_no_shot_are_refused_by_name():
    # segment divided by zero (after warning that the masks mark no pixel); predict asked for nshot in [1, 0].
    model = model_for("resnet18")
    query, support, mask = images(1, 64, 64, 3)
    none = (support[:, None][:, :0], mask[:, None][:, :0])
    with pytest.raises(ValueError, match=r"supports\[1\]: support_imgs: expected at least one shot \(K >= 1\), "
                                         r"got \[1, 0, 3, 64, 64\]"):
        model.segment(query, {1: none})
    with pytest.raises(ValueError, match=r"support_imgs: expected at least one shot"):
        model.predict(query, *none)


def test_a_subclasss_own_correlation_encode_mix_and_decode_run_on_every_path():
    # The fused path computed HSNet's correlation whatever a subclass defined, the fused learner path
    # skipped an own encode/mix, and the path taken with hooks inside the learner skipped all three:
    # silently (an extension audit: a learned temperature got no gradient).
    import copy

    from hypertriton.learner import HPNLearner

    model = model_for("resnet18")
    query, support, mask = images(1, 64, 64, 5)
    with torch.no_grad():
        query_feats, support_feats = model.extract_features(query), model.extract_features(support)
        levels = model._levels(query_feats, support_feats)
        base = model.hpn_learner(model.hypercorrelation(query_feats, support_feats, mask))

        class HalvedCorrelation(HSNet):
            def hypercorrelation(self, query_feats, support_feats, support_mask):
                return [level / 2 for level in super().hypercorrelation(query_feats, support_feats, support_mask)]

        variant = copy.deepcopy(model)
        variant.__class__ = HalvedCorrelation
        halved = model.hpn_learner([level / 2 for level in model.hypercorrelation(query_feats, support_feats, mask)])
        assert variant.fused and not torch.allclose(halved, base, atol=1e-4)
        torch.testing.assert_close(variant.forward_features(query_feats, support_feats, mask), halved)

        calls = []

        def recording(name, shift=0.0):
            def method(self, *args):
                calls.append(name)
                return getattr(HPNLearner, name)(self, *args) + shift
            return method

        for name, shift in (("encode", 0.0), ("mix", 0.0), ("decode", 1.0)):
            learner = copy.deepcopy(model.hpn_learner)
            learner.__class__ = type(f"Own{name.title()}", (HPNLearner,), {name: recording(name, shift)})
            pyramid = model.hypercorrelation(query_feats, support_feats, mask)
            outputs = {"dense": learner(pyramid), "fused": learner.forward_fused(levels, mask)}
            handle = learner.encoder_layer4[0].register_forward_hook(lambda module, args, output: None)
            outputs["hooked"] = learner(pyramid)
            outputs["hooked fused"] = learner.forward_fused(levels, mask)
            handle.remove()
            assert calls == [name] * 4, (name, calls)
            calls.clear()
            for path, logits in outputs.items():
                torch.testing.assert_close(logits, base + shift, atol=1e-4, rtol=1e-4, msg=f"{name}, {path}")
            # A hook on a whole block runs once per call, an own encode calling the original's too.
            fired = []
            handle = learner.encoder_layer4.register_forward_hook(lambda module, args, output: fired.append(1))
            learner(pyramid)
            learner.forward_fused(levels, mask)
            handle.remove()
            assert fired == [1, 1], name
            calls.clear()


class _TinyPyramid(torch.nn.Module):
    """A backbone of one's own: 6 feature maps, 1 at stride 4, 2 at stride 8, 3 at stride 16 (shallow
    to deep), no relation to any torchvision model."""

    def __init__(self):
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 8, 3, stride=4, padding=1)
        self.taps = torch.nn.ModuleList([torch.nn.Conv2d(8, 8, 3, padding=1) for _ in range(5)])
        self.down = torch.nn.AvgPool2d(2)

    def forward(self, img):
        feats, x = [], self.stem(img)
        feats.append(x)
        x = self.down(x)
        for tap in self.taps[:2]:
            x = tap(x)
            feats.append(x)
        x = self.down(x)
        for tap in self.taps[2:]:
            x = tap(x)
            feats.append(x)
        return feats


def test_hsnet_takes_a_backbone_module_of_ones_own_with_its_spec():
    from hypertriton.backbones import BackboneSpec

    spec = BackboneSpec("tiny", "custom", (8,) * 6, (3, 2, 1), (16, 8, 4))
    torch.manual_seed(0)
    model = HSNet(_TinyPyramid(), spec=spec, backend="torch").eval()
    assert not any(p.requires_grad for p in model.backbone.parameters())
    assert [k.split(".")[0] for k in model.state_dict()] == ["backbone"] * 12 + ["hpn_learner"] * (
        len(model.state_dict()) - 12)
    query, support, mask = images(2, 64, 80, 3)
    with torch.no_grad():
        fused = model(query, support, mask)
        model.fused = False
        dense = model(query, support, mask)
    assert fused.shape == (2, 2, 64, 80)
    torch.testing.assert_close(fused, dense, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match=r"spec: a backbone module needs a BackboneSpec"):
        HSNet(_TinyPyramid())
    with pytest.raises(ValueError, match=r"pretrained/backbone_weights: for the torchvision backbones"):
        HSNet(_TinyPyramid(), spec=spec, pretrained=True)
    with pytest.raises(ValueError, match=r"spec: only with a backbone module"):
        HSNet("resnet18", spec=spec)
    wrong = HSNet(_TinyPyramid(), spec=BackboneSpec("tiny", "custom", (8,) * 7, (3, 2, 2), (16, 8, 4)))
    with pytest.raises(ValueError, match=r"backbone 'tiny': its forward must return a list of 7 feature maps .* "
                                         r"got 6 tensors"):
        wrong(query, support, mask)


def test_a_backbone_of_ones_own_is_refused_in_a_line_that_says_how_and_a_spec_must_add_up():
    from hypertriton.backbones import BackboneSpec

    from hypertriton.backbones import get_spec

    with pytest.raises(ValueError) as caught:
        HSNet(torch.nn.Sequential(*[torch.nn.Conv2d(3, 3, 1) for _ in range(40)]))
    message = str(caught.value)
    assert message.startswith("spec: a backbone module needs a BackboneSpec") and len(message) < 300  # no repr
    with pytest.raises(ValueError, match=r"unknown backbone of type int; .* HSNet\(module, spec=BackboneSpec"):
        get_spec(50)
    with pytest.raises(ValueError, match=r"layers_per_level \(2, 2, 2\) must be positive and add up to the "
                                         r"number of features, len\(channels\) = 5"):
        BackboneSpec("mine", "resnet", (8,) * 5, (2, 2, 2), (32, 16, 8))
    with pytest.raises(ValueError, match="expected 3 values each"):
        BackboneSpec("mine", "resnet", (8,) * 4, (2, 2), (32, 16))
    assert BackboneSpec("mine", "resnet", (8,) * 6, (1, 2, 3), (32, 16, 8)).num_features == 6


# ----------------------------------------------------------------------------- pretrained weights
def test_pretrained_offline_explains_how_to_provide_weights(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))

    def no_network(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_network)
    with pytest.raises(RuntimeError) as info:
        HSNet("resnet18", pretrained=True)
    message = str(info.value)
    assert "resnet18-f37072fd.pth" in message and str(tmp_path / "hub" / "checkpoints") in message
    assert "weights=PATH" in message and "download failed" in message
    with pytest.raises(RuntimeError, match="downloading is off"):
        bb.build_backbone("resnet18", pretrained=True, allow_download=False)


def test_pretrained_loads_from_the_hub_cache_or_a_file(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", lambda *a, **k: pytest.fail("tried to download"))
    torch.manual_seed(12)
    weights = torchvision.models.resnet18(weights=None).state_dict()
    path = tmp_path / "mine.pth"
    torch.save(weights, path)
    from_file = HSNet("resnet18", backbone_weights=path)
    cached = tmp_path / "hub" / "checkpoints" / Path(bb.imagenet_weights_url("resnet18")).name
    cached.parent.mkdir(parents=True)
    torch.save(weights, cached)
    from_cache = bb.build_backbone("resnet18", pretrained=True)
    for model in (from_file.backbone, from_cache):
        for key, value in model.state_dict().items():
            torch.testing.assert_close(value, weights[key], rtol=0, atol=0, msg=key)
    with pytest.raises(FileNotFoundError, match="weights: no such file"):
        bb.build_backbone("resnet18", weights=tmp_path / "missing.pth")
    with pytest.raises(ValueError, match="is not a resnet34 state_dict"):
        bb.build_backbone("resnet34", weights=path)


def test_data_parallel_replicas_run(monkeypatch):
    """nn.DataParallel (how the original trained) runs replicas whose parameters() is empty (their weights
    are plain attributes); the dtype and device checks read next(parameters()) and raised a bare
    StopIteration. Replicas made on CPU: the GPU broadcast is stood in for by copies."""
    replicate_module = importlib.import_module("torch.nn.parallel.replicate")  # the package re-exports a function

    monkeypatch.setattr(replicate_module, "_broadcast_coalesced_reshape",
                        lambda tensors, devices, detach=False: [[t.detach().clone() if detach else t.clone()
                                                                 for t in tensors] for _ in devices])
    model = model_for("resnet18")
    query, support, mask = images(1, 64, 64, 3)
    with torch.no_grad():
        want = model(query, support, mask)
        for replica in replicate_module.replicate(model, [0, 1], detach=True):
            assert list(replica.parameters()) == []
            torch.testing.assert_close(replica(query, support, mask), want, rtol=0, atol=0)
        # The learner's dense path (its own dtype check) on a replica of the learner alone.
        pyramid = [torch.rand(1, channels, side, side, side, side)
                   for channels, side in zip(model.hpn_learner.inch, (2, 4, 8))]
        want = model.hpn_learner(pyramid)
        for replica in replicate_module.replicate(model.hpn_learner, [0, 1], detach=True):
            torch.testing.assert_close(replica(pyramid), want, rtol=0, atol=0)
