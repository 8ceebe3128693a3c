"""Triton kernel for one layer of the hypercorrelation: ``relu(<q(xq), s(xs)>)`` for all position pairs.

The launcher writes straight into a caller-provided output with any strides, so a pyramid level's
``[B, L, Hq, Wq, Hs, Ws]`` tensor is filled layer by layer through its slices ``stacked[:, l]``,
with no per-layer temporary and no stack copy. Given the active support positions (where the masked
support features may be nonzero), tiles of support positions with none active are written as zeros
without a product: the cost follows the object's area.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._config import (autotune_configs, check_float_dtype, dot_acc, dot_precision, needs_int64,
                      on_the_inputs_device)

__all__ = ["correlation_into", "correlation_backward"]

MAX_GRID_Y = 65535  # CUDA's limit on the second and third grid dimensions


def _configs():
    gpu = [
        triton.Config({"BLOCK_Q": bq, "BLOCK_S": bs, "BLOCK_C": bc}, num_warps=w, num_stages=st)
        # Tiles of 128 take 8 warps: with 4, or with 64 channels per step, they spill registers on sm_90
        # (bench/kernel_registers.py).
        for bq, bs, bc, w, st in [
            (64, 64, 32, 4, 3),
            (128, 64, 32, 8, 3),
            (64, 128, 32, 8, 3),
            (128, 128, 16, 8, 3),
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
    p_active,  # int8 [B, NS] (batch stride s_ab, positions contiguous): support positions to compute
    s_ab,
    HAS_ACTIVE: tl.constexpr,  # without it every tile is computed (p_active is not read)
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
    compute = True
    if HAS_ACTIVE:
        # Every correlation at an inactive position is exactly zero (the caller's guarantee): a tile
        # with none active keeps its zeros and skips the reduction.
        b_active = tl.load(p_active + i_b * s_ab + o_s, mask=m_s, other=0)
        compute = tl.max(b_active.to(tl.int32), axis=0) > 0
    if compute:
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


def _active_flags(active: torch.Tensor | None, batch: int, positions: int, device) -> torch.Tensor | None:
    """``active`` checked (``[B, Hs*Ws]`` on the features' device) and as the kernels read it: contiguous int8."""
    if active is None:
        return None
    if tuple(active.shape) != (batch, positions) or active.device != device:
        raise ValueError(f"active: expected a [B, Hs*Ws] = {[batch, positions]} tensor on {device}, got "
                         f"{list(active.shape)} on {active.device}")
    return (active != 0).to(torch.int8).contiguous()


@on_the_inputs_device
def correlation_into(query: torch.Tensor, support: torch.Tensor, out: torch.Tensor,
                     active: torch.Tensor | None = None) -> torch.Tensor:
    """Write ``relu(einsum("bcij,bckl->bijkl", query, support))`` into ``out`` and return it.

    The products accumulate in fp32 (TF32 for fp32 inputs on a GPU exactly when
    ``torch.backends.cuda.matmul.allow_tf32`` is set); the result is cast to ``out``'s dtype. NaN in
    an input gives NaN in every output it reaches (the ReLU keeps NaN). No autograd.

    Args:
        query: ``[B, C, Hq, Wq]``, already masked and normalized; any strides.
        support: ``[B, C, Hs, Ws]``, same dtype (fp32, fp16 or bf16) and device; any strides.
        out: ``[B, Hq, Wq, Hs, Ws]`` with any strides, typically ``stacked[:, l]`` of a level's
            ``[B, L, Hq, Wq, Hs, Ws]`` tensor; a floating dtype.
        active: optional ``[B, Hs*Ws]`` (bool or integer, nonzero = active) support positions whose
            correlations may be nonzero. Tiles of support positions with none active are written as
            zeros without reading the features, so the caller guarantees that every correlation at an
            inactive position is exactly zero (masked-out support: zero features, and a finite query).
            None: every position is computed.

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
    active = _active_flags(active, batch, n_s, query.device)
    int64 = needs_int64(query, support, out, extra=max(n_q, n_s))
    precision = dot_precision(query.dtype)
    for start in range(0, batch, MAX_GRID_Y):
        # Slicing along batch is a view: no copy, same strides.
        q, s, o = (t[start:start + MAX_GRID_Y] for t in (query, support, out))
        # Without active positions the kernel never reads its pointer: any tensor will do.
        a = o if active is None else active[start:start + MAX_GRID_Y]
        # One program computes a BLOCK_Q x BLOCK_S tile of (query position, support position) pairs
        # of one batch element; axis 0 enumerates the tiles, axis 1 the batch elements.
        def grid(meta, programs_b=q.shape[0]):
            return triton.cdiv(n_q, meta["BLOCK_Q"]) * triton.cdiv(n_s, meta["BLOCK_S"]), programs_b

        _correlation_kernel[grid](
            q, s, o, channels, wq, ws, n_q, n_s,
            *q.stride(), *s.stride(), *o.stride(), a, 0 if active is None else a.stride(0),
            HAS_ACTIVE=active is not None, INPUT_PRECISION=precision, INT64=int64,
        )
    return out


# ---------------------------------------------------------------------------------------------------
# Backward: grad_query = G @ support^T and grad_support = G^T @ query over positions, with
# G = grad_out where the forward output is > 0 (torch's ReLU rule: zero where out <= 0). One kernel
# serves both sides: the support side passes the position dims of grad_out/out swapped.


def _grad_configs():
    gpu = [
        triton.Config({"BLOCK_X": bx, "BLOCK_Y": by, "BLOCK_C": bc}, num_warps=w, num_stages=st)
        # Each step loads two [BLOCK_X, BLOCK_Y] tiles (gradient and forward output): BLOCK_Y stays at 32
        # or less, or they spill registers on sm_90 (bench/kernel_registers.py).
        for bx, by, bc, w, st in [
            (64, 32, 64, 4, 3),
            (128, 32, 64, 8, 3),
            (64, 32, 128, 8, 3),
            (64, 16, 64, 4, 3),  # small maps
        ]
    ]
    return autotune_configs(gpu, triton.Config({"BLOCK_X": 32, "BLOCK_Y": 32, "BLOCK_C": 16}, num_warps=1))


@triton.autotune(configs=_grad_configs(), key=["C", "NX", "NY", "INPUT_PRECISION"])
@triton.jit
def _correlation_grad_kernel(
    p_g,  # upstream gradient [B, HX, WX, HY, WY] seen from this side (query side: [B, Hq, Wq, Hs, Ws]), s_g*
    p_out,  # forward output, same view and shape as p_g, s_o*
    p_other,  # the other side's features [B, C, HY, WY], s_t*
    p_grad,  # result: this side's feature gradient [B, C, HX, WX], s_r*
    C,  # channels
    WX, WY,  # map widths of this side (X) and the other side (Y)
    NX, NY,  # flat positions of each side
    s_gb, s_gxh, s_gxw, s_gyh, s_gyw,  # grad_out strides (0 after .sum() is fine)
    s_ob, s_oxh, s_oxw, s_oyh, s_oyw,  # forward output strides
    s_tb, s_tc, s_th, s_tw,  # other side's feature strides
    s_rb, s_rc, s_rh, s_rw,  # result strides
    p_active,  # int8 [B, Hs*Ws] active support positions (batch stride s_ab); read only with ACTIVE_SIDE
    s_ab,
    ACTIVE_SIDE: tl.constexpr,  # 0: none given; 1: the other side (Y) is the support; 2: this side (X) is
    INPUT_PRECISION: tl.constexpr,
    INT64: tl.constexpr,
    BLOCK_X: tl.constexpr,  # positions of this side per tile
    BLOCK_Y: tl.constexpr,  # positions of the other side per step of the reduction
    BLOCK_C: tl.constexpr,  # channels per tile
):
    i_tile = tl.program_id(0)
    i_b = tl.program_id(1)
    n_c_tiles = tl.cdiv(C, BLOCK_C)
    i_x = i_tile // n_c_tiles
    i_c = i_tile % n_c_tiles
    o_x = i_x * BLOCK_X + tl.arange(0, BLOCK_X)
    o_c = i_c * BLOCK_C + tl.arange(0, BLOCK_C)
    o_yr = tl.arange(0, BLOCK_Y)
    if INT64:
        i_b = i_b.to(tl.int64)
        o_x = o_x.to(tl.int64)
        o_c = o_c.to(tl.int64)
        o_yr = o_yr.to(tl.int64)
    m_x = o_x < NX
    m_c = o_c < C
    o_xh = o_x // WX
    o_xw = o_x % WX

    p_gx = p_g + i_b * s_gb + (o_xh * s_gxh + o_xw * s_gxw)[:, None]  # [BLOCK_X, 1]
    p_ox = p_out + i_b * s_ob + (o_xh * s_oxh + o_xw * s_oxw)[:, None]
    p_tb = p_other + i_b * s_tb + o_c[None, :] * s_tc  # [1, BLOCK_C]
    b_acc = tl.zeros((BLOCK_X, BLOCK_C), dtype=tl.float32)
    # The forward output is exactly 0 at inactive support positions, so ReLU blocks every gradient
    # through them: a support tile with none active has zero gradient, and support blocks with none
    # active add nothing to the query's.
    compute = True
    if ACTIVE_SIDE == 2:
        b_ax = tl.load(p_active + i_b * s_ab + o_x, mask=m_x, other=0)
        compute = tl.max(b_ax.to(tl.int32), axis=0) > 0
    if compute:
        for y0 in range(0, NY, BLOCK_Y):
            o_y = y0 + o_yr
            m_y = o_y < NY
            block = True
            if ACTIVE_SIDE == 1:
                b_ay = tl.load(p_active + i_b * s_ab + o_y, mask=m_y, other=0)
                block = tl.max(b_ay.to(tl.int32), axis=0) > 0
            if block:
                o_yh = o_y // WY
                o_yw = o_y % WY
                m_g = m_x[:, None] & m_y[None, :]
                b_g = tl.load(p_gx + (o_yh * s_gyh + o_yw * s_gyw)[None, :], mask=m_g, other=0.0)  # [BLOCK_X, BLOCK_Y]
                b_out = tl.load(p_ox + (o_yh * s_oyh + o_yw * s_oyw)[None, :], mask=m_g, other=0.0)
                b_t = tl.load(p_tb + (o_yh * s_th + o_yw * s_tw)[:, None], mask=m_y[:, None] & m_c[None, :],
                              other=0.0)  # [BLOCK_Y, BLOCK_C]
                # ReLU's gradient as torch computes it: blocked where out <= 0 (NaN outputs pass it).
                b_g = tl.where(b_out <= 0.0, 0.0, b_g)
                b_acc = dot_acc(b_g.to(b_t.dtype), b_t, b_acc, INPUT_PRECISION)

    p_r = p_grad + i_b * s_rb + o_c[None, :] * s_rc + (o_xh * s_rh + o_xw * s_rw)[:, None]
    tl.store(p_r, b_acc.to(p_grad.dtype.element_ty), mask=m_x[:, None] & m_c[None, :])


@on_the_inputs_device
def correlation_backward(grad_out: torch.Tensor, out: torch.Tensor, query: torch.Tensor, support: torch.Tensor,
                         needs_input_grad=(True, True), active: torch.Tensor | None = None):
    """Gradients of :func:`correlation_into` for its (already normalized) inputs (no autograd).

    Args:
        grad_out: ``[B, Hq, Wq, Hs, Ws]``, any strides (e.g. ``grad[:, l]`` of a stacked gradient, or
            stride 0 after ``.sum()``).
        out: the forward output ``[B, Hq, Wq, Hs, Ws]``; the ReLU passes the gradient where it is not
            ``<= 0`` (torch's rule, so NaN outputs pass it).
        query, support: the forward's ``[B, C, Hq, Wq]`` and ``[B, C, Hs, Ws]``.
        needs_input_grad: flags for ``(query, support)``.
        active: the forward's ``[B, Hs*Ws]`` active support positions, or None. The support gradient of a
            tile with none active is written as zeros and support blocks with none active are skipped in
            the query gradient: exact, as the forward's output is 0 there and ReLU blocks the gradient.

    Returns:
        ``(grad_query, grad_support)`` in the inputs' dtype, None where not needed. Accumulation is fp32
        (TF32 on a GPU exactly when ``torch.backends.cuda.matmul.allow_tf32``, as in the forward).
    """
    batch, channels, hq, wq = query.shape
    _, _, hs, ws = support.shape
    expected = (batch, hq, wq, hs, ws)
    for name, t in (("grad_out", grad_out), ("out", out)):
        if tuple(t.shape) != expected:
            raise ValueError(f"{name}: expected shape {expected}, got {tuple(t.shape)}")
    check_float_dtype("grad_out", grad_out)
    n_q, n_s = hq * wq, hs * ws
    active = _active_flags(active, batch, n_s, query.device)
    precision = dot_precision(query.dtype)
    g_strides, o_strides = grad_out.stride(), out.stride()
    sides = (
        # (this side's features, other side, strides of grad_out/out with this side's positions first)
        (query, support, g_strides, o_strides, wq, ws, n_q, n_s),
        (support, query, [g_strides[i] for i in (0, 3, 4, 1, 2)], [o_strides[i] for i in (0, 3, 4, 1, 2)],
         ws, wq, n_s, n_q),
    )
    grads = []
    for side, (need, (mine, other, gs, os_, wx, wy, n_x, n_y)) in enumerate(zip(needs_input_grad, sides)):
        if not need:
            grads.append(None)
            continue
        result = torch.empty_like(mine, memory_format=torch.contiguous_format)
        grads.append(result)
        if result.numel() == 0:
            continue
        int64 = needs_int64(grad_out, out, mine, other, extra=max(n_x, n_y) + channels)
        for start in range(0, batch, MAX_GRID_Y):
            stop = start + MAX_GRID_Y
            g, o, t, r = grad_out[start:stop], out[start:stop], other[start:stop], result[start:stop]
            a = r if active is None else active[start:stop]  # never read without active positions

            # One program computes a BLOCK_X x BLOCK_C tile of (position, channel) of this side's
            # gradient for one batch element, reducing over all positions of the other side.
            def grid(meta, programs_b=g.shape[0]):
                return triton.cdiv(n_x, meta["BLOCK_X"]) * triton.cdiv(channels, meta["BLOCK_C"]), programs_b

            _correlation_grad_kernel[grid](
                g, o, t, r, channels, wx, wy, n_x, n_y, *gs, *os_, *t.stride(), *r.stride(),
                a, 0 if active is None else a.stride(0), ACTIVE_SIDE=0 if active is None else side + 1,
                INPUT_PRECISION=precision, INT64=int64,
            )
    return grads[0], grads[1]
