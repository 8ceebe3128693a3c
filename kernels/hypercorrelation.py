"""Triton kernel for one layer of the hypercorrelation: ``relu(<q(xq), s(xs)>)`` for all position pairs.

The launcher writes straight into a caller-provided output with any strides, so a pyramid level's
``[B, L, Hq, Wq, Hs, Ws]`` tensor is filled layer by layer through its slices ``stacked[:, l]``,
with no per-layer temporary and no stack copy.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._config import autotune_configs, check_float_dtype, dot_acc, dot_precision, needs_int64

MAX_GRID_Y = 65535  # CUDA's limit on the second and third grid dimensions


def _configs():
    gpu = [
        triton.Config({"BLOCK_Q": bq, "BLOCK_S": bs, "BLOCK_C": bc}, num_warps=w, num_stages=st)
        for bq, bs, bc, w, st in [
            (64, 64, 32, 4, 3),
            (128, 64, 32, 4, 3),
            (64, 128, 32, 4, 3),
            (128, 128, 32, 8, 3),
            (128, 128, 64, 8, 2),
            (32, 32, 16, 2, 2),  # small maps (the deepest level is 13x13)
        ]
    ]
    return autotune_configs(gpu, triton.Config({"BLOCK_Q": 32, "BLOCK_S": 32, "BLOCK_C": 16}, num_warps=1))


@triton.autotune(configs=_configs(), key=["C", "NQ", "NS", "INPUT_PRECISION"])
@triton.jit
def _correlation_kernel(
    p_query,  # query features [B, C, Hq, Wq], already masked/normalized, strides s_q*
    p_support,  # support features [B, C, Hs, Ws], same dtype, strides s_s*
    p_out,  # output [B, Hq, Wq, Hs, Ws] (e.g. one layer's slice of [B, L, ...]), strides s_o*
    C,  # channels, the reduction length
    WQ,  # query map width, to split a flat query position into (row, column)
    WS,  # support map width, likewise
    NQ,  # Hq * Wq, flat query positions
    NS,  # Hs * Ws, flat support positions
    s_qb, s_qc, s_qh, s_qw,  # query strides (elements) over batch, channel, row, column
    s_sb, s_sc, s_sh, s_sw,  # support strides, likewise
    s_ob, s_oqh, s_oqw, s_osh, s_osw,  # output strides over batch, query row/col, support row/col
    INPUT_PRECISION: tl.constexpr,  # "ieee" or "tf32", for fp32 inputs only
    INT64: tl.constexpr,  # whether offsets can pass 2^31 (then all index math is int64)
    BLOCK_Q: tl.constexpr,  # query positions per tile
    BLOCK_S: tl.constexpr,  # support positions per tile
    BLOCK_C: tl.constexpr,  # channels per step of the reduction
):
    i_tile = tl.program_id(0)
    i_b = tl.program_id(1)
    n_s_tiles = tl.cdiv(NS, BLOCK_S)
    # Support tiles vary fastest so that neighbouring programs reuse the same query tile from cache.
    i_q = i_tile // n_s_tiles
    i_s = i_tile % n_s_tiles

    o_q = i_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    o_s = i_s * BLOCK_S + tl.arange(0, BLOCK_S)
    o_c = tl.arange(0, BLOCK_C)
    if INT64:
        i_b = i_b.to(tl.int64)
        o_q = o_q.to(tl.int64)
        o_s = o_s.to(tl.int64)
        o_c = o_c.to(tl.int64)
    m_q = o_q < NQ
    m_s = o_s < NS
    # Flat positions -> (row, column), so that any strides (channels-last, slices) are honoured.
    o_qh = o_q // WQ
    o_qw = o_q % WQ
    o_sh = o_s // WS
    o_sw = o_s % WS

    p_q = p_query + i_b * s_qb + (o_qh * s_qh + o_qw * s_qw)[:, None] + o_c[None, :] * s_qc  # [BLOCK_Q, BLOCK_C]
    p_s = p_support + i_b * s_sb + o_c[:, None] * s_sc + (o_sh * s_sh + o_sw * s_sw)[None, :]  # [BLOCK_C, BLOCK_S]
    b_acc = tl.zeros((BLOCK_Q, BLOCK_S), dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        m_c = o_c < C - c0
        b_q = tl.load(p_q, mask=m_q[:, None] & m_c[None, :], other=0.0)
        b_s = tl.load(p_s, mask=m_c[:, None] & m_s[None, :], other=0.0)
        b_acc = dot_acc(b_q, b_s, b_acc, INPUT_PRECISION)
        p_q += BLOCK_C * s_qc
        p_s += BLOCK_C * s_sc

    # ReLU that keeps NaN (tl.maximum would turn NaN into 0, unlike torch.relu).
    b_acc = tl.where(b_acc < 0.0, 0.0, b_acc)
    p_o = p_out + i_b * s_ob + (o_qh * s_oqh + o_qw * s_oqw)[:, None] + (o_sh * s_osh + o_sw * s_osw)[None, :]
    tl.store(p_o, b_acc.to(p_out.dtype.element_ty), mask=m_q[:, None] & m_s[None, :])


def correlation_into(query: torch.Tensor, support: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Write ``relu(einsum("bcij,bckl->bijkl", query, support))`` into ``out`` and return it.

    The products accumulate in fp32 (TF32 for fp32 inputs on a GPU exactly when
    ``torch.backends.cuda.matmul.allow_tf32`` is set); the result is cast to ``out``'s dtype. NaN in
    an input gives NaN in every output it reaches (the ReLU keeps NaN). No autograd.

    Args:
        query: ``[B, C, Hq, Wq]``, already masked and normalized; any strides.
        support: ``[B, C, Hs, Ws]``, same dtype (fp32, fp16 or bf16) and device; any strides.
        out: ``[B, Hq, Wq, Hs, Ws]`` with any strides, typically ``stacked[:, l]`` of a level's
            ``[B, L, Hq, Wq, Hs, Ws]`` tensor; a floating dtype.

    Returns:
        ``out``, filled. Empty shapes return it untouched without launching.
    """
    if query.dim() != 4 or support.dim() != 4:
        raise ValueError(f"query, support: expected [B, C, H, W] tensors, got shapes "
                         f"{tuple(query.shape)} and {tuple(support.shape)}")
    check_float_dtype("query", query)
    check_float_dtype("out", out)
    if support.dtype != query.dtype:
        raise TypeError(f"support: expected dtype {query.dtype} (the query's), got {support.dtype}")
    if not (query.device == support.device == out.device):
        raise ValueError(f"query, support, out: expected one device, got {query.device}, {support.device}, "
                         f"{out.device}")
    batch, channels, hq, wq = query.shape
    _, _, hs, ws = support.shape
    if support.shape[:2] != query.shape[:2]:
        raise ValueError(f"support: expected batch and channels {tuple(query.shape[:2])} (the query's), got "
                         f"{tuple(support.shape[:2])}")
    expected = (batch, hq, wq, hs, ws)
    if tuple(out.shape) != expected:
        raise ValueError(f"out: expected shape {expected}, got {tuple(out.shape)}")
    if out.numel() == 0:
        return out
    if channels == 0:
        # An empty reduction is 0 everywhere, as in the reference's einsum.
        return out.zero_()

    n_q, n_s = hq * wq, hs * ws
    int64 = needs_int64(query, support, out, extra=max(n_q, n_s))
    precision = dot_precision(query.dtype)
    for start in range(0, batch, MAX_GRID_Y):
        # Slicing along batch is a view: no copy, same strides.
        q, s, o = (t[start:start + MAX_GRID_Y] for t in (query, support, out))
        # One program computes a BLOCK_Q x BLOCK_S tile of (query position, support position) pairs
        # of one batch element; axis 0 enumerates the tiles, axis 1 the batch elements.
        def grid(meta, programs_b=q.shape[0]):
            return triton.cdiv(n_q, meta["BLOCK_Q"]) * triton.cdiv(n_s, meta["BLOCK_S"]), programs_b

        _correlation_kernel[grid](
            q, s, o, channels, wq, ws, n_q, n_s,
            *q.stride(), *s.stride(), *o.stride(),
            INPUT_PRECISION=precision, INT64=int64,
        )
    return out
