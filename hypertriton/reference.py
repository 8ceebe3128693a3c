"""Readable einsum definitions of every op: the oracle that tests and benchmarks compare against.

These follow the original HSNet code's semantics without its defects (the README's "Differences from
the original code, on purpose" lists them), and favour clarity over speed. They are differentiable
with plain autograd.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["hypercorrelation", "center_pivot_conv4d", "fused_hypercorrelation_cp_conv4d", "correlation", "normalize",
           "resize_mask", "pyramid_levels", "NORM_EPS"]

NORM_EPS = 1e-5  # the original adds eps to the L2 norm: f / (||f|| + 1e-5)


def resize_mask(support_mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Resize a support mask ``[B, H, W]`` to a feature map's size, as the original does.

    Returns ``[B, 1, h, w]`` (bilinear, ``align_corners=True``), in the mask's floating dtype (float32
    for integer or boolean masks).
    """
    mask = support_mask.unsqueeze(1)
    if not mask.is_floating_point():
        mask = mask.float()
    return F.interpolate(mask, size, mode="bilinear", align_corners=True)


def normalize(features: torch.Tensor) -> torch.Tensor:
    """``f / (||f||_2 + eps)`` over the channel dim of ``[B, C, H, W]``, in ``features``' dtype.

    The norm is taken in fp32 at least, as the backends take it: in fp16 one past 65504 would be inf and
    zero every correlation of that position (as the original does with fp16 norms: without a mask, or
    under CPU autocast; in plain fp16 with a mask, it fails on a dtype mismatch).
    """
    norm_dtype = torch.promote_types(features.dtype, torch.float32)
    norm = torch.linalg.vector_norm(features, dim=1, keepdim=True, dtype=norm_dtype)
    return (features / (norm + NORM_EPS)).to(features.dtype)


def correlation(query: torch.Tensor, support: torch.Tensor) -> torch.Tensor:
    """One layer: ``relu(<q(xq), s(xs)>)`` of normalized features, in ``query``'s dtype.

    Shape: query ``[B, C, Hq, Wq]``, support ``[B, C, Hs, Ws]`` -> ``[B, Hq, Wq, Hs, Ws]``. A support in a
    wider dtype (masked in fp32) is normalized there, then rounded to ``query``'s dtype.
    """
    corr = torch.einsum("bcij,bckl->bijkl", normalize(query), normalize(support).to(query.dtype))
    return torch.relu(corr)


def pyramid_levels(query_feats, support_feats) -> list[list[int]]:
    """Indices of the layers of each pyramid level, deepest level first.

    A level is a run of consecutive layers whose query and support maps keep the same spatial sizes;
    within a level, layers stay in their given (shallow to deep) order. For ResNet-50 features
    (4 x layer2, 6 x layer3, 3 x layer4) this gives ``[[10, 11, 12], [4..9], [0..3]]``, the original's
    ``[layer4, layer3, layer2]`` stacking.
    """
    runs: list[list[int]] = []
    previous = None
    for index, (q, s) in enumerate(zip(query_feats, support_feats)):
        key = (tuple(q.shape[-2:]), tuple(s.shape[-2:]))
        if key != previous:
            runs.append([])
            previous = key
        runs[-1].append(index)
    return runs[::-1]


def hypercorrelation(query_feats, support_feats, support_mask=None) -> list[torch.Tensor]:
    """Multi-layer hypercorrelation, stacked by pyramid level, deepest first.

    Args:
        query_feats: list of ``[B, C_l, Hq_l, Wq_l]``, shallow to deep.
        support_feats: list of ``[B, C_l, Hs_l, Ws_l]``, same length and channels.
        support_mask: optional ``[B, H, W]``; resized to each support map (bilinear,
            ``align_corners=True``) and multiplied into the support features, in fp32 at least (as the
            original's fp32 mask promotes them): in fp16 a 0/255 mask would overflow features past 257
            and a value below 6e-8 would round to 0.

    Returns:
        One ``[B, L_p, Hq, Wq, Hs, Ws]`` tensor per level, deepest level first.
    """
    if support_mask is not None:
        wide = [torch.promote_types(s.dtype, torch.float32) for s in support_feats]
        support_feats = [s.to(w) * resize_mask(support_mask, s.shape[-2:]).to(w) for s, w in zip(support_feats, wide)]
    corrs = [correlation(q, s) for q, s in zip(query_feats, support_feats)]
    return [torch.stack([corrs[i] for i in level], dim=1) for level in pyramid_levels(query_feats, support_feats)]


def center_pivot_conv4d(x, weight_query, bias_query, weight_support, bias_support, stride, padding):
    """Center-pivot 4D convolution: a query-dim and a support-dim 2D convolution, summed.

    Output position ``(i, j, u, v)`` pivots on input position ``(i*sqh, j*sqw, u*ssh, v*ssw)``:

    - query branch: ``weight_query`` slides over the query dims (stride ``sq``, padding ``pq``) at the
      pivot's support position only (the original's pruned support positions ``0, s, 2s, ...``);
    - support branch: ``weight_support`` slides over the support dims (stride ``ss``, padding ``ps``) at
      the pivot's query position only (all query positions when the query stride is 1, as in HSNet).

    Args:
        x: ``[B, Cin, Hq, Wq, Hs, Ws]``.
        weight_query: ``[Cout, Cin, KQh, KQw]``; bias_query: ``[Cout]`` or None.
        weight_support: ``[Cout, Cin, KSh, KSw]``; bias_support: ``[Cout]`` or None.
        stride, padding: 4-tuples ``(query h, query w, support h, support w)``.

    Returns:
        ``[B, Cout, Hq', Wq', Hs', Ws']`` with ``Hq' = ceil(Hq / sqh)`` and ``Hs' = ceil(Hs / ssh)``
        (the sizes both branches agree on; the caller checks that they do).
    """
    sqh, sqw, ssh, ssw = stride
    pqh, pqw, psh, psw = padding
    kqh, kqw = weight_query.shape[-2:]
    ksh, ksw = weight_support.shape[-2:]

    pivots_support = x[..., ::ssh, ::ssw]  # [B, C, Hq, Wq, Hs', Ws']
    padded = F.pad(pivots_support, (0, 0, 0, 0, pqw, pqw, pqh, pqh))
    windows = padded.unfold(2, kqh, sqh).unfold(3, kqw, sqw)  # [B, C, Hq', Wq', Hs', Ws', KQh, KQw]
    out = torch.einsum("bcijuvkl,ockl->boijuv", windows, weight_query)

    pivots_query = x[:, :, ::sqh, ::sqw]  # [B, C, Hq', Wq', Hs, Ws]
    padded = F.pad(pivots_query, (psw, psw, psh, psh))
    windows = padded.unfold(4, ksh, ssh).unfold(5, ksw, ssw)  # [B, C, Hq', Wq', Hs', Ws', KSh, KSw]
    out = out + torch.einsum("bcijuvkl,ockl->boijuv", windows, weight_support)

    for bias in (bias_query, bias_support):
        if bias is not None:
            out = out + bias.view(1, -1, 1, 1, 1, 1)
    return out


def fused_hypercorrelation_cp_conv4d(query_feats, support_feats, support_mask, weight_query, bias_query, weight_support,
                                     bias_support, stride, padding):
    """The fused first squeeze layer's definition: :func:`center_pivot_conv4d` of one pyramid level's
    :func:`hypercorrelation` (what :func:`hypertriton.fused_hypercorrelation_cp_conv4d` computes without
    the 4D tensor).

    Args:
        query_feats, support_feats: the layers of ONE pyramid level, lists of ``[B, C_l, Hq, Wq]`` and
            ``[B, C_l, Hs, Ws]``.
        support_mask: ``[B, H, W]`` or None.
        weight_query, bias_query, weight_support, bias_support, stride, padding: as for
            :func:`center_pivot_conv4d`, with ``Cin`` = the level's number of layers.

    Returns:
        ``[B, Cout, Hq', Wq', Hs', Ws']``.
    """
    corr = hypercorrelation(query_feats, support_feats, support_mask)[0]
    return center_pivot_conv4d(corr, weight_query, bias_query, weight_support, bias_support, stride, padding)
