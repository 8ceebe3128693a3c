"""The ORIGINAL HSNet code after the backbone, restated in plain PyTorch by us.

Written by the hypertriton authors from their description of the original HSNet reference
implementation (ICCV 2021; the development tree's ``../shared/docs/hsnet-reference.md``, not shipped);
it is NOT a copy of that code. It keeps the original's structure, module names, tensor layouts and
quirks (permuted copies around every center-pivot layer, pruning with ``index_select``, the
square-map assumption in the decoder, the ``squeeze()`` in the padding-0 special case), so it serves
as:

- the oracle that ``tests/`` compare hypertriton's learner and correlation against;
- the baseline that the benchmarks time.

The only change on purpose: the original caches the support-pruning indices on the first call and
reuses them even when the input size changes later; here they are recomputed on every call.

Import it by path (``bench/`` is not an installed package)::

    spec = importlib.util.spec_from_file_location("original_hsnet", "bench/original_hsnet.py")
    original = importlib.util.module_from_spec(spec); spec.loader.exec_module(original)

Public API:

- ``NBOTTLENECKS``, ``stack_ids_for(nbottlenecks)``, ``STACK_IDS``, ``LEARNER_INCH``: per-backbone
  constants as the original computes them.
- ``extract_feat_res(img, backbone, nbottlenecks)``, ``extract_feat_vgg(img, backbone)``: the
  original feature extraction from a torchvision model.
- ``mask_feature(features, support_mask)``, ``multilayer_correlation(query_feats, support_feats,
  stack_ids)``, ``original_correlation(query_feats, support_feats, support_mask, stack_ids)``.
- ``OriginalCenterPivotConv4d``, ``OriginalHPNLearner(inch)``.
- ``original_forward_features(learner, query_feats, support_feats, support_mask, stack_ids)``.
- ``original_learner_from_state_dict(state_dict)``, ``run_original_learner(state_dict,
  hypercorr_pyramid)``.
- ``original_predict_mask_nshot(forward, batch, nshot)``: the original k-shot voting.
"""

from __future__ import annotations

from functools import reduce
from operator import add

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "NBOTTLENECKS", "STACK_IDS", "LEARNER_INCH", "stack_ids_for", "extract_feat_res", "extract_feat_vgg",
    "mask_feature", "multilayer_correlation", "original_correlation", "OriginalCenterPivotConv4d",
    "OriginalHPNLearner", "original_forward_features", "original_learner_from_state_dict",
    "run_original_learner", "original_predict_mask_nshot",
]

# Per-stage block counts as the original lists them (VGG: groups of conv layers up to pool5).
NBOTTLENECKS = {
    "vgg16": [2, 2, 3, 3, 3, 1],
    "resnet50": [3, 4, 6, 3],
    "resnet101": [3, 4, 23, 3],
}
VGG_FEAT_IDS = [17, 19, 21, 24, 26, 28, 30]


def stack_ids_for(nbottlenecks: list[int]) -> list[int]:
    """The original's ``stack_ids``: cumulative layer counts of the three deepest levels, deepest first.

    ``resnet50 -> [3, 9, 13]``: the last 3 correlations form level 4, the 6 before them level 3, ...
    """
    lids = reduce(add, [[i + 1] * x for i, x in enumerate(nbottlenecks)])
    return torch.tensor(lids).bincount().flip(0).cumsum(dim=0)[:3].tolist()


STACK_IDS = {name: stack_ids_for(n) for name, n in NBOTTLENECKS.items()}
# Learner input channels (layers per level), deepest first.
LEARNER_INCH = {name: list(reversed(n[-3:])) for name, n in NBOTTLENECKS.items()}


# ----------------------------------------------------------------------------- feature extraction
def extract_feat_res(img: torch.Tensor, backbone: nn.Module, nbottlenecks: list[int]) -> list[torch.Tensor]:
    """Bottleneck outputs of layer2..layer4 after the residual add, before the final ReLU.

    ``backbone`` is a torchvision ResNet with Bottleneck blocks. Returns ``[B, C, h, w]`` per block,
    shallow to deep (layer1's blocks are skipped, as the original's ``feat_ids`` start at 4).
    """
    bottleneck_ids = reduce(add, [list(range(x)) for x in nbottlenecks])
    lids = reduce(add, [[i + 1] * x for i, x in enumerate(nbottlenecks)])
    feat_ids = list(range(nbottlenecks[0] + 1, sum(nbottlenecks) + 1))
    feats = []
    feat = backbone.maxpool(backbone.relu(backbone.bn1(backbone.conv1(img))))
    for hid, (bid, lid) in enumerate(zip(bottleneck_ids, lids)):
        block = getattr(backbone, f"layer{lid}")[bid]
        res = feat
        feat = block.relu(block.bn1(block.conv1(feat)))
        feat = block.relu(block.bn2(block.conv2(feat)))
        feat = block.bn3(block.conv3(feat))
        if bid == 0:
            res = block.downsample(res)
        feat = feat + res
        if hid + 1 in feat_ids:
            feats.append(feat.clone())
        feat = block.relu(feat)
    return feats


def extract_feat_vgg(img: torch.Tensor, backbone: nn.Module) -> list[torch.Tensor]:
    """Outputs of ``backbone.features[17, 19, 21, 24, 26, 28, 30]`` (conv outputs before their ReLU)."""
    feats = []
    feat = img
    for lid, module in enumerate(backbone.features):
        feat = module(feat)
        if lid in VGG_FEAT_IDS:
            feats.append(feat.clone())  # the next ReLU is in-place
    return feats


# ----------------------------------------------------------------------------- correlation
def mask_feature(features: list[torch.Tensor], support_mask: torch.Tensor) -> list[torch.Tensor]:
    """Multiply each support feature ``[B, C, h, w]`` by the mask ``[B, H, W]`` resized to ``h x w``
    (bilinear, ``align_corners=True``). Returns a new list."""
    out = []
    for feature in features:
        mask = F.interpolate(support_mask.unsqueeze(1).float(), feature.size()[2:], mode="bilinear",
                             align_corners=True)
        out.append(feature * mask)
    return out


def multilayer_correlation(query_feats, support_feats, stack_ids) -> list[torch.Tensor]:
    """Per-layer ``relu(cos)`` correlations stacked per level: ``[corr_l4, corr_l3, corr_l2]``.

    Each is ``[B, L_p, Hq, Wq, Hs, Ws]``; ``stack_ids`` as from :func:`stack_ids_for`.
    """
    eps = 1e-5
    corrs = []
    for query_feat, support_feat in zip(query_feats, support_feats):
        bsz, ch, hb, wb = support_feat.size()
        support_feat = support_feat.reshape(bsz, ch, -1)
        support_feat = support_feat / (support_feat.norm(dim=1, p=2, keepdim=True) + eps)

        bsz, ch, ha, wa = query_feat.size()
        query_feat = query_feat.reshape(bsz, ch, -1)
        query_feat = query_feat / (query_feat.norm(dim=1, p=2, keepdim=True) + eps)

        corr = torch.bmm(query_feat.transpose(1, 2), support_feat).view(bsz, ha, wa, hb, wb)
        corrs.append(corr.clamp(min=0))

    s0, s1, s2 = (int(s) for s in stack_ids)
    corr_l4 = torch.stack(corrs[-s0:]).transpose(0, 1).contiguous()
    corr_l3 = torch.stack(corrs[-s1:-s0]).transpose(0, 1).contiguous()
    corr_l2 = torch.stack(corrs[-s2:-s1]).transpose(0, 1).contiguous()
    return [corr_l4, corr_l3, corr_l2]


def original_correlation(query_feats, support_feats, support_mask, stack_ids) -> list[torch.Tensor]:
    """:func:`mask_feature` then :func:`multilayer_correlation` (the original's no-grad part)."""
    return multilayer_correlation(query_feats, mask_feature(support_feats, support_mask), stack_ids)


# ----------------------------------------------------------------------------- learner
class OriginalCenterPivotConv4d(nn.Module):
    """The original center-pivot 4D conv on ``[B, Cin, Hq, Wq, Hs, Ws]``.

    ``kernel_size``, ``stride``, ``padding``: 4-tuples (query h, query w, support h, support w).
    """

    def __init__(self, in_channels, out_channels, kernel_size, stride, padding, bias=True):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size[:2], stride=stride[:2], bias=bias,
                               padding=padding[:2])
        self.conv2 = nn.Conv2d(in_channels, out_channels, kernel_size[2:], stride=stride[2:], bias=bias,
                               padding=padding[2:])
        self.stride34 = stride[2:]
        self.kernel_size = kernel_size
        self.stride = stride
        self.padding = padding

    def prune(self, ct):
        bsz, ch, ha, wa, hb, wb = ct.size()
        # The original computed these once and cached them (stale for a new input size).
        idxh = torch.arange(start=0, end=hb, step=self.stride[2:][0], device=ct.device)
        idxw = torch.arange(start=0, end=wb, step=self.stride[2:][1], device=ct.device)
        len_h, len_w = len(idxh), len(idxw)
        idx = (idxw.repeat(len_h, 1) + idxh.repeat(len_w, 1).t() * wb).view(-1)
        return ct.view(bsz, ch, ha, wa, -1).index_select(4, idx).view(bsz, ch, ha, wa, len_h, len_w)

    def forward(self, x):
        out1 = self.prune(x) if self.stride[2:][-1] > 1 else x
        bsz, inch, ha, wa, hb, wb = out1.size()
        out1 = out1.permute(0, 4, 5, 1, 2, 3).contiguous().view(-1, inch, ha, wa)
        out1 = self.conv1(out1)
        outch, o_ha, o_wa = out1.size(-3), out1.size(-2), out1.size(-1)
        out1 = out1.view(bsz, hb, wb, outch, o_ha, o_wa).permute(0, 3, 4, 5, 1, 2).contiguous()

        bsz, inch, ha, wa, hb, wb = x.size()
        out2 = x.permute(0, 2, 3, 1, 4, 5).contiguous().view(-1, inch, hb, wb)
        out2 = self.conv2(out2)
        outch, o_hb, o_wb = out2.size(-3), out2.size(-2), out2.size(-1)
        out2 = out2.view(bsz, ha, wa, outch, o_hb, o_wb).permute(0, 3, 1, 2, 4, 5).contiguous()

        if out1.size()[-2:] != out2.size()[-2:] and self.padding[-2:] == (0, 0):
            out1 = out1.view(bsz, outch, o_ha, o_wa, -1).sum(dim=-1)
            out2 = out2.squeeze()  # original defect: drops the batch dim at batch 1 (never hit by HSNet)
        return out1 + out2


class OriginalHPNLearner(nn.Module):
    """The original squeeze/mix encoder and decoder. ``inch``: layers per level, deepest first.

    ``forward(hypercorr_pyramid)`` takes ``[corr_l4, corr_l3, corr_l2]`` and returns logits
    ``[B, 2, 2 * Wq2, 2 * Wq2]`` (the original assumes a square map: it upsamples both sides to twice
    the WIDTH of the layer2 query map).
    """

    def __init__(self, inch):
        super().__init__()

        def make_building_block(in_channel, out_channels, kernel_sizes, spt_strides, group=4):
            layers = []
            for idx, (outch, ksz, stride) in enumerate(zip(out_channels, kernel_sizes, spt_strides)):
                inch_ = in_channel if idx == 0 else out_channels[idx - 1]
                ksz4d = (ksz,) * 4
                str4d = (1, 1) + (stride,) * 2
                pad4d = (ksz // 2,) * 4
                layers.append(OriginalCenterPivotConv4d(inch_, outch, ksz4d, str4d, pad4d))
                layers.append(nn.GroupNorm(group, outch))
                layers.append(nn.ReLU(inplace=True))
            return nn.Sequential(*layers)

        outch1, outch2, outch3 = 16, 64, 128
        self.encoder_layer4 = make_building_block(inch[0], [outch1, outch2, outch3], [3, 3, 3], [2, 2, 2])
        self.encoder_layer3 = make_building_block(inch[1], [outch1, outch2, outch3], [5, 3, 3], [4, 2, 2])
        self.encoder_layer2 = make_building_block(inch[2], [outch1, outch2, outch3], [5, 5, 3], [4, 4, 2])
        self.encoder_layer4to3 = make_building_block(outch3, [outch3] * 3, [3, 3, 3], [1, 1, 1])
        self.encoder_layer3to2 = make_building_block(outch3, [outch3] * 3, [3, 3, 3], [1, 1, 1])
        self.decoder1 = nn.Sequential(nn.Conv2d(outch3, outch3, (3, 3), padding=(1, 1), bias=True),
                                      nn.ReLU(),
                                      nn.Conv2d(outch3, outch2, (3, 3), padding=(1, 1), bias=True),
                                      nn.ReLU())
        self.decoder2 = nn.Sequential(nn.Conv2d(outch2, outch2, (3, 3), padding=(1, 1), bias=True),
                                      nn.ReLU(),
                                      nn.Conv2d(outch2, 2, (3, 3), padding=(1, 1), bias=True))

    def interpolate_support_dims(self, hypercorr, spatial_size=None):
        # Despite its name, this resizes the QUERY dims.
        bsz, ch, ha, wa, hb, wb = hypercorr.size()
        hypercorr = hypercorr.permute(0, 4, 5, 1, 2, 3).contiguous().view(bsz * hb * wb, ch, ha, wa)
        hypercorr = F.interpolate(hypercorr, spatial_size, mode="bilinear", align_corners=True)
        o_hb, o_wb = spatial_size
        return hypercorr.view(bsz, hb, wb, ch, o_hb, o_wb).permute(0, 3, 4, 5, 1, 2).contiguous()

    def forward(self, hypercorr_pyramid):
        hypercorr_sqz4 = self.encoder_layer4(hypercorr_pyramid[0])
        hypercorr_sqz3 = self.encoder_layer3(hypercorr_pyramid[1])
        hypercorr_sqz2 = self.encoder_layer2(hypercorr_pyramid[2])

        hypercorr_sqz4 = self.interpolate_support_dims(hypercorr_sqz4, hypercorr_sqz3.size()[-4:-2])
        hypercorr_mix43 = self.encoder_layer4to3(hypercorr_sqz4 + hypercorr_sqz3)

        hypercorr_mix43 = self.interpolate_support_dims(hypercorr_mix43, hypercorr_sqz2.size()[-4:-2])
        hypercorr_mix432 = self.encoder_layer3to2(hypercorr_mix43 + hypercorr_sqz2)

        bsz, ch, ha, wa, hb, wb = hypercorr_mix432.size()
        hypercorr_encoded = hypercorr_mix432.view(bsz, ch, ha, wa, -1).mean(dim=-1)

        hypercorr_decoded = self.decoder1(hypercorr_encoded)
        upsample_size = (hypercorr_decoded.size(-1) * 2,) * 2
        hypercorr_decoded = F.interpolate(hypercorr_decoded, upsample_size, mode="bilinear", align_corners=True)
        return self.decoder2(hypercorr_decoded)


def original_forward_features(learner, query_feats, support_feats, support_mask, stack_ids) -> torch.Tensor:
    """Everything after the backbone: correlation without gradients, then the learner.

    Args:
        learner: an :class:`OriginalHPNLearner`.
        query_feats, support_feats: lists of ``[B, C_l, h_l, w_l]``, shallow to deep.
        support_mask: ``[B, H, W]``.
        stack_ids: from :func:`stack_ids_for` / :data:`STACK_IDS`.

    Returns:
        The learner's logits ``[B, 2, h, w]`` before the original's final resize to the image size.
    """
    with torch.no_grad():
        corr = original_correlation(query_feats, support_feats, support_mask.clone(), stack_ids)
    return learner(corr)


def original_learner_from_state_dict(state_dict) -> OriginalHPNLearner:
    """An :class:`OriginalHPNLearner` holding the learner weights of ``state_dict``.

    Accepts a learner state_dict or a whole HSNet one (keys with ``hpn_learner.`` and/or ``module.``
    prefixes are reduced to the learner's own). ``inch`` is read from the first layers' weights.
    """
    learner_sd = {}
    for key, value in state_dict.items():
        key = key.removeprefix("module.")
        if key.startswith("backbone."):
            continue
        learner_sd[key.removeprefix("hpn_learner.")] = value
    inch = [learner_sd[f"encoder_layer{i}.0.conv1.weight"].shape[1] for i in (4, 3, 2)]
    learner = OriginalHPNLearner(inch)
    learner.load_state_dict(learner_sd)
    return learner


def run_original_learner(state_dict, hypercorr_pyramid) -> torch.Tensor:
    """The original learner's forward on ``[corr_l4, corr_l3, corr_l2]`` with weights from ``state_dict``."""
    learner = original_learner_from_state_dict(state_dict).to(hypercorr_pyramid[0].device)
    return learner(hypercorr_pyramid)


def original_predict_mask_nshot(forward, batch, nshot):
    """The original k-shot voting.

    Args:
        forward: ``forward(query_img, support_img, support_mask) -> logits [B, 2, H, W]`` (already
            resized to the image size, as the original model's forward returns them).
        batch: dict with ``query_img`` ``[B, 3, H, W]``, ``support_imgs`` ``[B, K, 3, H, W]``,
            ``support_masks`` ``[B, K, H, W]``.
        nshot: number of shots used.

    Returns:
        ``nshot == 1``: the argmax mask ``[B, H, W]`` (int64); otherwise the voted mask (float, 0/1).
    """
    logit_mask_agg = 0
    for s_idx in range(nshot):
        logit_mask = forward(batch["query_img"], batch["support_imgs"][:, s_idx], batch["support_masks"][:, s_idx])
        logit_mask_agg += logit_mask.argmax(dim=1).clone()
        if nshot == 1:
            return logit_mask_agg

    bsz = logit_mask_agg.size(0)
    max_vote = logit_mask_agg.view(bsz, -1).max(dim=1)[0]
    max_vote = torch.stack([max_vote, torch.ones_like(max_vote).long()])
    max_vote = max_vote.max(dim=0)[0].view(bsz, 1, 1)
    pred_mask = logit_mask_agg.float() / max_vote
    pred_mask[pred_mask < 0.5] = 0
    pred_mask[pred_mask >= 0.5] = 1
    return pred_mask
