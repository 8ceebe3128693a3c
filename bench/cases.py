"""What ``bench/run.py`` measures: inputs, cases and the variants that compete in each.

A *case* is one piece of HSNet after (or with) the backbone; a *variant* is one implementation of it:

- ``original``: the plain-PyTorch statement of the original HSNet code in ``bench/original_hsnet.py``
  (the baseline; never ours);
- ``torch``, ``triton``, ``reference``: hypertriton with that backend. Where a case contains the first
  center-pivot layer of a squeeze block, the hypertriton variants use the fused op
  (:func:`hypertriton.ops.fused_first_layer.fused_hypercorrelation_cp_conv`) and never build the
  hypercorrelation; ``<backend>-unfused`` builds it as the original does (then hypertriton's layers);
  ``<backend>-lean`` (inference cases) streams each squeeze block's first two layers over query rows
  (:meth:`HPNLearner.squeeze_streamed`: least memory, the fused layer computed about three times);
- ``torch+bf16``: the fused ``torch`` path under ``torch.autocast(bfloat16)`` (opt-in reduced
  precision): the correlation products, convolutions and matrix products in bf16 with fp32
  accumulation; normalization and GroupNorm statistics stay fp32. The rel. error column reports its
  effect on the logits.

Every case is built by :func:`build` as a zero-argument callable (what is timed) from an
:class:`Inputs` (made by :func:`make_inputs`; not timed).
"""

from __future__ import annotations

import importlib.util
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

import hypertriton
from hypertriton.backend import reduced_precision_slow_reason
from hypertriton.backbones import build_backbone, extract_features, get_spec
from hypertriton.learner import HPNLearner
from hypertriton.ops.fused_first_layer import fused_hypercorrelation_cp_conv

CASES = ("hypercorrelation", "cp_layer", "fused_first_layer", "learner_forward", "forward_backward", "episode")
MASKS = ("object", "full")
OBJECT_AREA = 0.22  # fraction of the image a typical PASCAL object covers
# Cases whose first center-pivot layer can be fused with the correlation.
FUSABLE = ("fused_first_layer", "learner_forward", "forward_backward", "episode")
# Inference cases that run the whole learner, where its squeeze blocks can be streamed.
STREAMABLE = ("learner_forward", "episode")


def load_original():
    """``bench/original_hsnet.py`` as a module (``bench/`` is not a package)."""
    name = "original_hsnet"
    if name not in sys.modules:
        path = Path(__file__).resolve().parent / "original_hsnet.py"
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def bf16_skip_reason(device: torch.device) -> str | None:
    """Why ``torch+bf16`` is not timed by default on ``device``: a CPU without native bf16 (there autocast
    in bf16 runs PyTorch's fallback kernels, about 25x slower than fp32 without AVX-512), or None."""
    if device.type != "cpu":
        return None
    return reduced_precision_slow_reason(torch.bfloat16, device)


def variants_for(case: str, device: torch.device, backends: list[str], bf16: bool | None = None) -> list[str]:
    """Variants that run ``case`` on ``device``: the original plus each backend (fused and unfused), and on
    CPU ``torch+bf16`` (``bf16``: None, only where the CPU computes bf16 natively; True/False: always/never)."""
    if bf16 is None:
        bf16 = bf16_skip_reason(device) is None
    variants = ["original"]
    for backend in backends:
        if case in FUSABLE:
            variants.append(backend)
            if backend != "reference":
                variants.append(f"{backend}-unfused")
                if case in STREAMABLE:
                    variants.append(f"{backend}-lean")
            if backend == "torch" and device.type == "cpu" and bf16:
                variants.append("torch+bf16")
        else:
            variants.append(backend)
    return variants


def object_mask(batch: int, height: int, width: int, device=None) -> torch.Tensor:
    """``[B, H, W]`` float mask: an ellipse covering ``OBJECT_AREA`` of the image, a little off-centre."""
    yy, xx = torch.meshgrid(torch.arange(height, dtype=torch.float32), torch.arange(width, dtype=torch.float32),
                            indexing="ij")
    # Semi-axes with ratio 1.25 whose ellipse area pi*a*b is OBJECT_AREA of the image.
    a = math.sqrt(OBJECT_AREA * height * width / (math.pi * 1.25))
    b = 1.25 * a
    inside = ((yy - 0.55 * height) / a) ** 2 + ((xx - 0.45 * width) / b) ** 2 <= 1.0
    return inside.float().expand(batch, height, width).contiguous().to(device)


@dataclass
class Inputs:
    """Everything a case needs, built before timing."""

    backbone: str
    size: int  # side of the finest feature map
    image: int  # image side in pixels
    batch: int
    dtype: torch.dtype
    device: torch.device
    mask_kind: str
    query_feats: list[torch.Tensor]
    support_feats: list[torch.Tensor]
    mask: torch.Tensor
    layers_per_level: tuple[int, ...]  # deepest first
    extra: dict = field(default_factory=dict)


def image_side(backbone: str, size: int) -> int:
    """Image side (px) whose finest pyramid level is ``size`` (400 px <-> 50 for ResNet and VGG)."""
    return size * 8


def make_inputs(backbone: str, size: int, batch: int, dtype: torch.dtype, device: torch.device, mask_kind: str,
                seed: int = 0) -> Inputs:
    """Random backbone features of the right shapes (ResNet-50 at size 50: 13/25/50 maps with 3/6/4 layers
    of 2048/1024/512 channels) and the support mask at image resolution."""
    spec = get_spec(backbone)
    image = image_side(backbone, size)
    sizes = spec.feature_sizes(image, image)  # deepest first
    gen = torch.Generator().manual_seed(seed)
    per_layer_sizes = []
    for layers, hw in zip(reversed(spec.layers_per_level), reversed(sizes)):
        per_layer_sizes += [hw] * layers
    feats = [[torch.randn(batch, c, *hw, generator=gen).to(device=device, dtype=dtype)
              for c, hw in zip(spec.channels, per_layer_sizes)] for _ in range(2)]
    if mask_kind == "object":
        mask = object_mask(batch, image, image, device)
    elif mask_kind == "full":
        mask = torch.ones(batch, image, image, device=device)
    else:
        raise ValueError(f"mask_kind: expected one of {MASKS}, got {mask_kind!r}")
    return Inputs(backbone, size, image, batch, dtype, device, mask_kind, feats[0], feats[1], mask,
                  tuple(spec.layers_per_level))


def level_slices(layers_per_level) -> list[slice]:
    """Feature-list slices of each pyramid level, deepest first."""
    slices, end = [], sum(layers_per_level)
    for layers in layers_per_level:
        slices.append(slice(end - layers, end))
        end -= layers
    return slices


def fused_forward_features(learner: HPNLearner, query_feats, support_feats, support_mask,
                           layers_per_level, lean: bool = False) -> torch.Tensor:
    """The learner's logits ``[B, 2, 2*Hq2, 2*Wq2]`` from backbone features, never building a hypercorrelation
    (:meth:`HPNLearner.forward_fused` on the feature lists split into levels; ``lean``: streamed)."""
    levels = [(query_feats[level], support_feats[level]) for level in level_slices(layers_per_level)]
    return learner.forward_fused(levels, support_mask, lean=lean)


def original_level_correlation(query_feats, support_feats, support_mask) -> torch.Tensor:
    """One level's ``[B, L, Hq, Wq, Hs, Ws]`` through the original's own correlation code.

    Its stacking needs three levels, so two 1x1 one-channel dummy layers (negligible work) stand in
    for the two deeper ones.
    """
    original = load_original()
    batch = query_feats[0].shape[0]
    dummy = [query_feats[0].new_ones(batch, 1, 1, 1)] * 2
    layers = len(query_feats)
    return original.original_correlation(list(query_feats) + dummy, list(support_feats) + dummy, support_mask,
                                         [1, 2, layers + 2])[2]


def _learners(inputs: Inputs):
    """Our learner and the original one with identical weights, on the inputs' device and dtype."""
    original = load_original()
    torch.manual_seed(0)
    ours = HPNLearner(list(inputs.layers_per_level)).to(inputs.device, inputs.dtype)
    theirs = original.OriginalHPNLearner(list(inputs.layers_per_level)).to(inputs.device, inputs.dtype)
    theirs.load_state_dict(ours.state_dict())
    return ours, theirs


def _set_backend(module, backend):
    for child in module.modules():
        if hasattr(child, "backend"):
            child.backend = backend


def _split(variant: str):
    """``"torch+bf16"`` -> ("torch", bfloat16, fused); ``"torch-unfused"`` -> ("torch", None, unfused);
    ``"torch-lean"`` -> ("torch", None, "lean")."""
    fused = "lean" if variant.endswith("-lean") else not variant.endswith("-unfused")
    name = variant.removesuffix("-unfused").removesuffix("-lean")
    autocast_dtype = None
    if name.endswith("+bf16"):
        name, autocast_dtype = name.removesuffix("+bf16"), torch.bfloat16
    return name, autocast_dtype, fused


def build(case: str, variant: str, inputs: Inputs):
    """A zero-argument callable that does the timed work once and returns its output (a tensor or a
    list of tensors, comparable with the ``original`` variant's)."""
    run = _build(case, variant, inputs)
    autocast_dtype = None if variant == "original" else _split(variant)[1]
    if autocast_dtype is None:
        return run

    def run_autocast():
        with torch.autocast(inputs.device.type, dtype=autocast_dtype):
            return run()
    run_autocast.model = getattr(run, "model", None)
    return run_autocast


def _build(case: str, variant: str, inputs: Inputs):
    original = load_original()
    stack_ids = original.stack_ids_for(original.NBOTTLENECKS[inputs.backbone])
    qf, sf, mask = inputs.query_feats, inputs.support_feats, inputs.mask
    # Under autocast (torch+bf16) the fused op takes bf16 correlation products by itself.
    backend, _, fused = (None, None, False) if variant == "original" else _split(variant)
    layer2 = level_slices(inputs.layers_per_level)[2]

    if case == "hypercorrelation":
        if variant == "original":
            return lambda: original.original_correlation(qf, sf, mask, stack_ids)
        return lambda: hypertriton.hypercorrelation(qf, sf, mask, backend=backend)

    if case in ("cp_layer", "fused_first_layer"):
        torch.manual_seed(0)
        layers = inputs.layers_per_level[2]
        ours_conv = hypertriton.CenterPivotConv4d(layers, 16, 5, (1, 1, 4, 4), backend=backend)
        ours_conv = ours_conv.to(inputs.device, inputs.dtype)
        theirs_conv = original.OriginalCenterPivotConv4d(layers, 16, (5,) * 4, (1, 1, 4, 4), (2,) * 4)
        theirs_conv = theirs_conv.to(inputs.device, inputs.dtype)
        theirs_conv.load_state_dict(ours_conv.state_dict())
        if case == "cp_layer":
            corr = original_level_correlation(qf[layer2], sf[layer2], mask)
            inputs.extra["corr"] = corr  # built before timing
            if variant == "original":
                return lambda: theirs_conv(corr)
            return lambda: ours_conv(corr)
        if variant == "original":
            return lambda: theirs_conv(original_level_correlation(qf[layer2], sf[layer2], mask))
        if not fused:
            return lambda: ours_conv(hypertriton.hypercorrelation(qf[layer2], sf[layer2], mask, backend=backend)[0])
        return lambda: fused_hypercorrelation_cp_conv(qf[layer2], sf[layer2], mask, ours_conv, backend=backend)

    if case in ("learner_forward", "forward_backward", "episode"):
        ours, theirs = _learners(inputs)
        _set_backend(ours, backend)
        training = case == "forward_backward"
        ours.train(training)
        theirs.train(training)
        lpl = inputs.layers_per_level

        def ours_logits(q, s):
            if fused:
                return fused_forward_features(ours, q, s, mask, lpl, lean=fused == "lean")
            with torch.no_grad():
                pyramid = [hypertriton.hypercorrelation(q[level], s[level], mask, backend=backend)[0]
                           for level in level_slices(lpl)]
            return ours(pyramid)

        def theirs_logits(q, s):
            return original.original_forward_features(theirs, q, s, mask, stack_ids)

        if case == "learner_forward":
            def run():
                with torch.no_grad():
                    return (theirs_logits if variant == "original" else ours_logits)(qf, sf)
            return run

        if case == "forward_backward":
            target = (F.interpolate(mask.unsqueeze(1), (2 * qf[0].shape[-2], 2 * qf[0].shape[-1]),
                                    mode="nearest").squeeze(1) > 0.5).long()
            model = theirs if variant == "original" else ours

            def run():
                model.zero_grad(set_to_none=True)
                logits = (theirs_logits if variant == "original" else ours_logits)(qf, sf)
                loss = F.cross_entropy(logits.float(), target)
                loss.backward()
                return logits.detach()
            run.model = model  # the memory measurement drops the warm-up's gradients before its baseline
            return run

        # episode: backbone on both images, then everything after it, logits at image size
        spec = get_spec(inputs.backbone)
        net = build_backbone(inputs.backbone).to(inputs.device, inputs.dtype)
        gen = torch.Generator().manual_seed(1)
        images = [torch.randn(inputs.batch, 3, inputs.image, inputs.image, generator=gen).to(inputs.device,
                                                                                            inputs.dtype)
                  for _ in range(2)]
        inputs.extra["images"] = images

        def run():
            with torch.no_grad():
                if variant == "original":
                    if spec.family == "vgg":
                        q, s = (original.extract_feat_vgg(img, net) for img in images)
                    else:
                        nb = original.NBOTTLENECKS[inputs.backbone]
                        q, s = (original.extract_feat_res(img, net, nb) for img in images)
                    logits = theirs_logits(q, s)
                else:
                    q, s = (extract_features(net, spec, img) for img in images)
                    logits = ours_logits(q, s)
                return F.interpolate(logits, (inputs.image, inputs.image), mode="bilinear", align_corners=True)
        return run

    raise ValueError(f"case: expected one of {CASES}, got {case!r}")
