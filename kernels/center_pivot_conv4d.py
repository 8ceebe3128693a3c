"""Triton kernel for the center-pivot 4D convolution, both branches in one pass.

Output position ``(i, j, u, v)`` pivots on input position ``(i*sqh, j*sqw, u*ssh, v*ssw)``; the
query branch slides ``weight_query`` over the query dims at the pivot's support position, the
support branch slides ``weight_support`` over the support dims at the pivot's query position (see
``hypertriton.reference.center_pivot_conv4d``). Each program gathers its input windows straight
from ``x`` through its strides and accumulates both sums in one fp32 tile: no permuted copy of the
input and no per-branch intermediate.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._config import (autotune_configs, check_float_dtype, dot_acc, dot_precision, needs_int64,
                      on_the_inputs_device)

__all__ = ["center_pivot_conv4d_into", "center_pivot_conv4d_backward"]

MAX_GRID_Z = 65535  # CUDA's limit on the third grid dimension


def _configs():
    gpu = [
        triton.Config({"BLOCK_P": bp, "BLOCK_O": bo, "BLOCK_K": bk}, num_warps=w, num_stages=st)
        # At most 16 gathered input elements per thread (BLOCK_P * BLOCK_K / threads): beyond that, the
        # gather spills registers on sm_90 (bench/kernel_registers.py).
        for bp, bo, bk, w, st in [
            (32, 16, 32, 2, 3),  # the first layers: few input (L_p <= 23) and output (16) channels
            (64, 16, 32, 4, 3),
            (128, 16, 32, 8, 3),
            (64, 64, 16, 4, 3),
            (128, 64, 32, 8, 3),
            (64, 128, 32, 8, 3),
        ]
    ]
    # Under the interpreter the cost is per program and op, not per element: few, large tiles.
    return autotune_configs(gpu, triton.Config({"BLOCK_P": 256, "BLOCK_O": 16, "BLOCK_K": 128}, num_warps=1))


@triton.jit
def _split_position(o_flat, W1, H2, W2):
    """Flat row-major index over ``[H1, W1, H2, W2]`` -> ``(h1, w1, h2, w2)``."""
    o_w2 = o_flat % W2
    o_t = o_flat // W2
    o_h2 = o_t % H2
    o_t = o_t // H2
    return o_t // W1, o_t % W1, o_h2, o_w2


@triton.jit
def _accumulate_branch(
    b_acc,  # [BLOCK_P, BLOCK_O] fp32 accumulator
    p_xb,  # pointer to x[b] (this program's batch element)
    p_w,  # weights of this branch arranged [KH*KW*CIN, COUT] (tap-major, then input channel), contiguous
    o_o,  # [BLOCK_O] output channels of this tile
    m_o,  # [BLOCK_O] valid output channels
    m_p,  # [BLOCK_P] valid output positions
    o_r0,  # [BLOCK_P] index of the window's first row along the sliding dims (before adding the tap)
    o_c0,  # [BLOCK_P] index of the window's first column, likewise
    o_fixed,  # [BLOCK_P] offset of the pivot along the two dims this branch does not slide over
    H, W,  # extent of the two sliding dims of x
    s_h, s_w, s_xc,  # strides of x over the sliding row, sliding column and input channel
    CIN, COUT,
    KH, KW,  # kernel size of this branch
    INPUT_PRECISION: tl.constexpr,
    BLOCK_K: tl.constexpr,  # (tap, input channel) pairs per step of the reduction
):
    # Implicit GEMM: the reduction runs over k = tap * CIN + c, so few input channels (the first
    # layers have 3 to 23) still fill whole tl.dot tiles instead of padding each tap's channels.
    n_k = KH * KW * CIN
    o_base = o_fixed + o_r0 * s_h + o_c0 * s_w  # [BLOCK_P] offset of the window's first tap
    o_kr = tl.arange(0, BLOCK_K).to(o_r0.dtype)
    for k0 in range(0, n_k, BLOCK_K):
        o_k = k0 + o_kr
        m_k = o_k < n_k
        # Per-k quantities are 1D; the 2D tile only adds and compares.
        o_tap = o_k // CIN
        o_a = o_tap // KW
        o_e = o_tap % KW
        o_delta = o_a * s_h + o_e * s_w + (o_k % CIN) * s_xc  # [BLOCK_K]
        o_row = o_r0[:, None] + o_a[None, :]
        o_col = o_c0[:, None] + o_e[None, :]
        # Taps that fall outside the map read zero padding.
        m_x = (m_p[:, None] & m_k[None, :] & (o_row >= 0) & (o_row < H) & (o_col >= 0) & (o_col < W))
        b_x = tl.load(p_xb + o_base[:, None] + o_delta[None, :], mask=m_x, other=0.0)  # [BLOCK_P, BLOCK_K]
        b_w = tl.load(p_w + o_k[:, None] * COUT + o_o[None, :], mask=m_k[:, None] & m_o[None, :],
                      other=0.0)  # [BLOCK_K, BLOCK_O]
        b_acc = dot_acc(b_x, b_w, b_acc, INPUT_PRECISION)
    return b_acc


@triton.autotune(configs=_configs(), key=["CIN", "COUT", "NP", "KQH", "KQW", "KSH", "KSW", "INPUT_PRECISION"])
@triton.jit
def _center_pivot_conv4d_kernel(
    p_x,  # input [B, CIN, HQ, WQ, HS, WS], strides s_x*
    p_wq,  # query-branch weights arranged [KQH*KQW*CIN, COUT] (tap-major), contiguous, x's dtype
    p_ws,  # support-branch weights arranged [KSH*KSW*CIN, COUT], contiguous, x's dtype
    p_bq,  # query-branch bias [COUT] (not read unless HAS_BQ)
    p_bs,  # support-branch bias [COUT] (not read unless HAS_BS)
    p_out,  # output [B, COUT, HQO, WQO, HSO, WSO], strides s_o*
    CIN, COUT,
    HQ, WQ, HS, WS,  # input spatial sizes
    HQO, WQO, HSO, WSO,  # output spatial sizes (ceil(input / stride))
    NP,  # HQO * WQO * HSO * WSO, flat output positions per batch element and channel
    s_xb, s_xc, s_xqh, s_xqw, s_xsh, s_xsw,  # x strides (elements)
    s_ob, s_oc, s_oqh, s_oqw, s_osh, s_osw,  # out strides (elements)
    SQH, SQW, SSH, SSW,  # strides (query h, query w, support h, support w)
    PQH, PQW, PSH, PSW,  # paddings, likewise
    KQH, KQW,  # query-branch kernel size
    KSH, KSW,  # support-branch kernel size
    HAS_BQ: tl.constexpr,
    HAS_BS: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,  # "ieee" or "tf32", for fp32 inputs only
    INT64: tl.constexpr,  # whether offsets can pass 2^31 (then all index math is int64)
    BLOCK_P: tl.constexpr,  # output positions per tile
    BLOCK_O: tl.constexpr,  # output channels per tile
    BLOCK_K: tl.constexpr,  # (tap, input channel) pairs per step of the reduction
):
    i_p = tl.program_id(0)
    i_o = tl.program_id(1)
    i_b = tl.program_id(2)
    o_p = i_p * BLOCK_P + tl.arange(0, BLOCK_P)
    o_o = i_o * BLOCK_O + tl.arange(0, BLOCK_O)
    if INT64:
        i_b = i_b.to(tl.int64)
        o_p = o_p.to(tl.int64)
        o_o = o_o.to(tl.int64)  # channel * channel stride passes 2^31 in a large output
    m_p = o_p < NP
    m_o = o_o < COUT

    o_i, o_j, o_u, o_v = _split_position(o_p, WQO, HSO, WSO)
    # The pivot: input position this output position is centred on.
    o_pqh = o_i * SQH
    o_pqw = o_j * SQW
    o_psh = o_u * SSH
    o_psw = o_v * SSW

    p_xb = p_x + i_b * s_xb
    b_acc = tl.zeros((BLOCK_P, BLOCK_O), dtype=tl.float32)
    # Query branch: slide over (query h, query w) at the pivot's support position.
    b_acc = _accumulate_branch(
        b_acc, p_xb, p_wq, o_o, m_o, m_p,
        o_pqh - PQH, o_pqw - PQW, o_psh * s_xsh + o_psw * s_xsw,
        HQ, WQ, s_xqh, s_xqw, s_xc, CIN, COUT, KQH, KQW, INPUT_PRECISION, BLOCK_K,
    )
    # Support branch: slide over (support h, support w) at the pivot's query position.
    b_acc = _accumulate_branch(
        b_acc, p_xb, p_ws, o_o, m_o, m_p,
        o_psh - PSH, o_psw - PSW, o_pqh * s_xqh + o_pqw * s_xqw,
        HS, WS, s_xsh, s_xsw, s_xc, CIN, COUT, KSH, KSW, INPUT_PRECISION, BLOCK_K,
    )
    if HAS_BQ:
        b_acc += tl.load(p_bq + o_o, mask=m_o, other=0.0).to(tl.float32)[None, :]
    if HAS_BS:
        b_acc += tl.load(p_bs + o_o, mask=m_o, other=0.0).to(tl.float32)[None, :]

    p_o = (p_out + i_b * s_ob + o_o[None, :] * s_oc
           + (o_i * s_oqh + o_j * s_oqw + o_u * s_osh + o_v * s_osw)[:, None])  # [BLOCK_P, BLOCK_O]
    tl.store(p_o, b_acc.to(p_out.dtype.element_ty), mask=m_p[:, None] & m_o[None, :])


def _taps_cin_cout(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``[Cout, Cin, KH, KW]`` -> contiguous ``[KH*KW, Cin, Cout]`` (read flat as ``[KH*KW*Cin, Cout]``) in
    ``dtype`` (a tiny copy)."""
    cout, cin, kh, kw = weight.shape
    return weight.detach().to(dtype).permute(2, 3, 1, 0).reshape(kh * kw, cin, cout).contiguous()


def _check_4tuple(name: str, value) -> tuple[int, int, int, int]:
    value = tuple(int(v) for v in value)
    if len(value) != 4:
        raise ValueError(f"{name}: expected 4 ints (query h, query w, support h, support w), got {value}")
    return value


def _check_geometry(stride, padding) -> None:
    if min(stride) < 1:
        raise ValueError(f"stride: expected positive ints, got {stride}")
    if min(padding) < 0:
        raise ValueError(f"padding: expected non-negative ints, got {padding}")


@on_the_inputs_device
def center_pivot_conv4d_into(
    x: torch.Tensor,
    weight_query: torch.Tensor,
    bias_query: torch.Tensor | None,
    weight_support: torch.Tensor,
    bias_support: torch.Tensor | None,
    stride,
    padding,
    out: torch.Tensor,
) -> torch.Tensor:
    """Write the center-pivot 4D convolution of ``x`` into ``out`` and return it (no autograd).

    ``out[b,o,i,j,u,v] = sum_{c,a,e} Wq[o,c,a,e] x[b,c, i*sqh-pqh+a, j*sqw-pqw+e, u*ssh, v*ssw]
    + sum_{c,a,e} Ws[o,c,a,e] x[b,c, i*sqh, j*sqw, u*ssh-psh+a, v*ssw-psw+e] + bq[o] + bs[o]``,
    reads outside ``x`` being zero padding. Products accumulate in fp32 (TF32 for fp32 inputs on a GPU
    when ``torch.backends.cuda.matmul.allow_tf32`` is set); weights are cast to ``x``'s dtype.

    Args:
        x: ``[B, Cin, Hq, Wq, Hs, Ws]``, fp32/fp16/bf16, any strides.
        weight_query: ``[Cout, Cin, KQh, KQw]``; bias_query: ``[Cout]`` or None.
        weight_support: ``[Cout, Cin, KSh, KSw]``; bias_support: ``[Cout]`` or None.
        stride, padding: 4-tuples ``(query h, query w, support h, support w)``.
        out: ``[B, Cout, ceil(Hq/sqh), ceil(Wq/sqw), ceil(Hs/ssh), ceil(Ws/ssw)]``, any strides. The
            caller has checked that both branches produce this size for the given padding.

    Returns:
        ``out``, filled. Empty shapes return it untouched without launching.
    """
    if x.dim() != 6:
        raise ValueError(f"x: expected [B, Cin, Hq, Wq, Hs, Ws], got shape {tuple(x.shape)}")
    check_float_dtype("x", x)
    check_float_dtype("out", out)
    sqh, sqw, ssh, ssw = _check_4tuple("stride", stride)
    pqh, pqw, psh, psw = _check_4tuple("padding", padding)
    _check_geometry((sqh, sqw, ssh, ssw), (pqh, pqw, psh, psw))
    batch, cin, hq, wq, hs, ws = x.shape
    for name, w in (("weight_query", weight_query), ("weight_support", weight_support)):
        if w.dim() != 4 or w.shape[1] != cin or w.shape[0] != weight_query.shape[0]:
            raise ValueError(f"{name}: expected [Cout, {cin}, KH, KW] (Cout equal for both branches), got "
                             f"shape {tuple(w.shape)}")
    cout = weight_query.shape[0]
    for name, b in (("bias_query", bias_query), ("bias_support", bias_support)):
        if b is not None and tuple(b.shape) != (cout,):
            raise ValueError(f"{name}: expected shape ({cout},) or None, got {tuple(b.shape)}")
    expected = (batch, cout, -(-hq // sqh), -(-wq // sqw), -(-hs // ssh), -(-ws // ssw))
    if tuple(out.shape) != expected:
        raise ValueError(f"out: expected shape {expected}, got {tuple(out.shape)}")
    tensors = [t for t in (x, weight_query, weight_support, bias_query, bias_support, out) if t is not None]
    if any(t.device != x.device for t in tensors):
        raise ValueError(f"x, weights, biases, out: expected one device, got {[str(t.device) for t in tensors]}")
    if out.numel() == 0:
        return out

    _, _, hqo, wqo, hso, wso = expected
    n_p = hqo * wqo * hso * wso
    wq_arranged = _taps_cin_cout(weight_query, x.dtype)
    ws_arranged = _taps_cin_cout(weight_support, x.dtype)
    # The kernel reads a bias at unit stride (a bias sliced out of a packed tensor may have another).
    # Unused bias pointers still need a valid tensor argument; the kernel never reads them.
    bq = bias_query.detach().contiguous() if bias_query is not None else wq_arranged
    bs = bias_support.detach().contiguous() if bias_support is not None else ws_arranged
    int64 = needs_int64(x, out, extra=n_p)
    precision = dot_precision(x.dtype)
    for start in range(0, batch, MAX_GRID_Z):
        xb, ob = x[start:start + MAX_GRID_Z], out[start:start + MAX_GRID_Z]  # views, no copy
        # One program computes a BLOCK_P x BLOCK_O tile of (flat output position, output channel)
        # of one batch element, both branches and biases; axes: position tiles, channel tiles, batch.
        def grid(meta, programs_b=xb.shape[0]):
            return triton.cdiv(n_p, meta["BLOCK_P"]), triton.cdiv(cout, meta["BLOCK_O"]), programs_b

        _center_pivot_conv4d_kernel[grid](
            xb, wq_arranged, ws_arranged, bq, bs, ob,
            cin, cout, hq, wq, hs, ws, hqo, wqo, hso, wso, n_p,
            *xb.stride(), *ob.stride(),
            sqh, sqw, ssh, ssw, pqh, pqw, psh, psw,
            weight_query.shape[2], weight_query.shape[3], weight_support.shape[2], weight_support.shape[3],
            HAS_BQ=bias_query is not None, HAS_BS=bias_support is not None,
            INPUT_PRECISION=precision, INT64=int64,
        )
    return out


# ---------------------------------------------------------------------------------------------------
# Backward: gradients for the input (one kernel, both branches) and for weights and biases (one kernel,
# all taps of both branches, split over the reduction and summed deterministically by the launcher).


def _grad_input_configs():
    gpu = [
        triton.Config({"BLOCK_P": bp, "BLOCK_C": bc, "BLOCK_K": bk}, num_warps=w, num_stages=st)
        # Sized like the forward's (at most 16 gathered elements per thread, fewer with IEEE fp32
        # products), so that none spills with Triton 3.6 or 3.8 (bench/kernel_registers.py).
        for bp, bc, bk, w, st in [
            (32, 16, 16, 2, 3),  # the first layers: few input channels
            (64, 16, 32, 8, 3),
            (128, 16, 32, 8, 3),
            (64, 64, 16, 4, 3),
            (128, 32, 16, 8, 3),
            (64, 128, 32, 8, 3),
        ]
    ]
    return autotune_configs(gpu, triton.Config({"BLOCK_P": 256, "BLOCK_C": 16, "BLOCK_K": 128}, num_warps=1))


def _grad_weight_configs():
    gpu = [
        triton.Config({"BLOCK_P": bp, "BLOCK_O": bo, "BLOCK_C": bc}, num_warps=w, num_stages=st)
        # With IEEE fp32 products, tiles of 32 x 32 or more outputs per 4 warps spill registers on sm_90
        # (bench/kernel_registers.py): the larger tiles take 8 warps.
        for bp, bo, bc, w, st in [
            (64, 16, 16, 2, 3),
            (128, 16, 16, 4, 3),
            (64, 32, 32, 4, 3),
            (32, 64, 32, 4, 3),
            (64, 64, 32, 8, 3),
            (32, 64, 64, 8, 3),
        ]
    ]
    return autotune_configs(gpu, triton.Config({"BLOCK_P": 256, "BLOCK_O": 32, "BLOCK_C": 16}, num_warps=1))


@triton.jit
def _grad_input_branch(
    b_acc,  # [BLOCK_P, BLOCK_C] fp32 accumulator of grad x
    p_gb,  # pointer to grad_out[b]
    p_w,  # weights of this branch arranged [KH*KW*COUT, CIN] (tap-major), contiguous, in the compute dtype
    o_c,  # [BLOCK_C] input channels of this tile
    m_c,  # [BLOCK_C] valid input channels
    m_fixed,  # [BLOCK_P] input position valid and a pivot along the two dims this branch does not slide
    o_gfixed,  # [BLOCK_P] offset in grad_out of that pivot's output position along those two dims
    o_r, o_col,  # [BLOCK_P] input row and column along the sliding dims
    SH, SW, PH, PW,  # stride and padding of this branch along the sliding dims (padding >= 0)
    HO, WO,  # output extent along the sliding dims
    s_gh, s_gw, s_gc,  # grad_out strides over the sliding row, sliding column and output channel
    CIN, COUT, KH, KW,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_K: tl.constexpr,  # (tap, output channel) pairs per step of the reduction
):
    # Output row i reads input row i*SH - PH + a, so input row r is read by tap a of output row
    # i = (r + PH - a) / SH when that divides exactly. Writing r + PH = SH*rq + rm and a = SH*aq + am
    # (all >= 0), it divides iff rm == am and then i = rq - aq: only 1D divisions, 2D compares.
    o_rq = (o_r + PH) // SH
    o_rm = (o_r + PH) % SH
    o_cq = (o_col + PW) // SW
    o_cm = (o_col + PW) % SW
    o_gbase = o_gfixed + o_rq * s_gh + o_cq * s_gw  # [BLOCK_P]
    n_k = KH * KW * COUT
    o_kr = tl.arange(0, BLOCK_K).to(o_r.dtype)
    for k0 in range(0, n_k, BLOCK_K):
        # Implicit GEMM over k = tap * COUT + o.
        o_k = k0 + o_kr
        m_k = o_k < n_k
        o_tap = o_k // COUT
        o_a = o_tap // KW
        o_e = o_tap % KW
        o_aq = o_a // SH
        o_eq = o_e // SW
        o_i = o_rq[:, None] - o_aq[None, :]
        o_j = o_cq[:, None] - o_eq[None, :]
        m_g = (m_fixed[:, None] & m_k[None, :] & (o_rm[:, None] == (o_a % SH)[None, :])
               & (o_cm[:, None] == (o_e % SW)[None, :]) & (o_i >= 0) & (o_i < HO) & (o_j >= 0) & (o_j < WO))
        o_delta = (o_k % COUT) * s_gc - o_aq * s_gh - o_eq * s_gw  # [BLOCK_K]
        b_g = tl.load(p_gb + o_gbase[:, None] + o_delta[None, :], mask=m_g, other=0.0)  # [BLOCK_P, BLOCK_K]
        b_w = tl.load(p_w + o_k[:, None] * CIN + o_c[None, :], mask=m_k[:, None] & m_c[None, :],
                      other=0.0)  # [BLOCK_K, BLOCK_C]
        b_acc = dot_acc(b_g.to(b_w.dtype), b_w, b_acc, INPUT_PRECISION)
    return b_acc


@triton.autotune(configs=_grad_input_configs(),
                 key=["CIN", "COUT", "NX", "KQH", "KQW", "KSH", "KSW", "INPUT_PRECISION"])
@triton.jit
def _center_pivot_conv4d_grad_input_kernel(
    p_g,  # upstream gradient [B, COUT, HQO, WQO, HSO, WSO], any strides (0 after .sum()), s_g*
    p_wq,  # query-branch weights arranged [KQH*KQW*COUT, CIN] (tap-major), contiguous
    p_ws,  # support-branch weights arranged [KSH*KSW*COUT, CIN], contiguous
    p_gx,  # grad input [B, CIN, HQ, WQ, HS, WS], strides s_gx*; every element is written
    CIN, COUT,
    HQ, WQ, HS, WS,  # input spatial sizes
    HQO, WQO, HSO, WSO,  # output spatial sizes
    NX,  # HQ * WQ * HS * WS, flat input positions
    s_gb, s_gc, s_gqh, s_gqw, s_gsh, s_gsw,  # grad_out strides
    s_xb, s_xc, s_xqh, s_xqw, s_xsh, s_xsw,  # grad input strides
    SQH, SQW, SSH, SSW,
    PQH, PQW, PSH, PSW,
    KQH, KQW, KSH, KSW,
    INPUT_PRECISION: tl.constexpr,
    INT64: tl.constexpr,
    BLOCK_P: tl.constexpr,  # input positions per tile
    BLOCK_C: tl.constexpr,  # input channels per tile
    BLOCK_K: tl.constexpr,  # (tap, output channel) pairs per step of the reduction
):
    i_p = tl.program_id(0)
    i_c = tl.program_id(1)
    i_b = tl.program_id(2)
    o_p = i_p * BLOCK_P + tl.arange(0, BLOCK_P)
    o_c = i_c * BLOCK_C + tl.arange(0, BLOCK_C)
    if INT64:
        i_b = i_b.to(tl.int64)
        o_p = o_p.to(tl.int64)
        o_c = o_c.to(tl.int64)  # channel * input-channel stride passes 2^31 in a large input
    m_p = o_p < NX
    m_c = o_c < CIN

    # (r, s, p, q): input position over (query h, query w, support h, support w).
    o_r, o_s, o_sp, o_q = _split_position(o_p, WQ, HS, WS)

    p_gb = p_g + i_b * s_gb
    b_acc = tl.zeros((BLOCK_P, BLOCK_C), dtype=tl.float32)
    # Query branch: only inputs at pivot support positions (multiples of the support strides) are read.
    m_fixed = m_p & (o_sp % SSH == 0) & (o_q % SSW == 0)
    b_acc = _grad_input_branch(
        b_acc, p_gb, p_wq, o_c, m_c, m_fixed, (o_sp // SSH) * s_gsh + (o_q // SSW) * s_gsw,
        o_r, o_s, SQH, SQW, PQH, PQW, HQO, WQO, s_gqh, s_gqw, s_gc, CIN, COUT, KQH, KQW,
        INPUT_PRECISION, BLOCK_K,
    )
    # Support branch: only inputs at pivot query positions are read.
    m_fixed = m_p & (o_r % SQH == 0) & (o_s % SQW == 0)
    b_acc = _grad_input_branch(
        b_acc, p_gb, p_ws, o_c, m_c, m_fixed, (o_r // SQH) * s_gqh + (o_s // SQW) * s_gqw,
        o_sp, o_q, SSH, SSW, PSH, PSW, HSO, WSO, s_gsh, s_gsw, s_gc, CIN, COUT, KSH, KSW,
        INPUT_PRECISION, BLOCK_K,
    )
    p_x = (p_gx + i_b * s_xb + o_c[None, :] * s_xc
           + (o_r * s_xqh + o_s * s_xqw + o_sp * s_xsh + o_q * s_xsw)[:, None])  # [BLOCK_P, BLOCK_C]
    tl.store(p_x, b_acc.to(p_gx.dtype.element_ty), mask=m_p[:, None] & m_c[None, :])


@triton.autotune(configs=_grad_weight_configs(),
                 key=["CIN", "COUT", "NP", "CHUNK", "KQH", "KQW", "KSH", "KSW", "INPUT_PRECISION"])
@triton.jit
def _center_pivot_conv4d_grad_weight_kernel(
    p_x,  # input [B, CIN, HQ, WQ, HS, WS], strides s_x*
    p_g,  # upstream gradient [B, COUT, HQO, WQO, HSO, WSO], any strides (0 after .sum()), s_g*
    p_pw,  # fp32 partial weight grads [SPLITS, KQH*KQW + KSH*KSW, COUT, CIN], contiguous
    p_pb,  # fp32 partial bias grads [SPLITS, COUT], contiguous
    CIN, COUT,
    HQ, WQ, HS, WS,
    HQO, WQO, HSO, WSO,
    NP,  # HQO * WQO * HSO * WSO, output positions per batch element
    R,  # B * NP, the length of the reduction over (batch, output position)
    CHUNK,  # reduction elements per split (a multiple of every BLOCK_P)
    s_xb, s_xc, s_xqh, s_xqw, s_xsh, s_xsw,
    s_gb, s_gc, s_gqh, s_gqw, s_gsh, s_gsw,
    SQH, SQW, SSH, SSW,
    PQH, PQW, PSH, PSW,
    KQH, KQW, KSH, KSW,
    INPUT_PRECISION: tl.constexpr,
    INT64: tl.constexpr,
    BLOCK_P: tl.constexpr,  # (batch, output position) pairs per step of the reduction
    BLOCK_O: tl.constexpr,  # output channels per tile
    BLOCK_C: tl.constexpr,  # input channels per tile
):
    # Channel tiles on the first grid axis: Cout * Cin tiles can pass the 65535 that a second axis holds.
    i_oc = tl.program_id(0)
    i_t = tl.program_id(1)  # tap: query-branch taps first, then support-branch taps
    i_split = tl.program_id(2)
    n_c_tiles = tl.cdiv(CIN, BLOCK_C)
    i_o = i_oc // n_c_tiles
    i_c = i_oc % n_c_tiles
    o_o = i_o * BLOCK_O + tl.arange(0, BLOCK_O)
    o_c = i_c * BLOCK_C + tl.arange(0, BLOCK_C)
    m_o = o_o < COUT
    m_c = o_c < CIN

    # This tap reads x at the pivot shifted by (dqh, dqw, dsh, dsw): only the query (support) dims
    # move for a query (support) tap.
    n_q_taps = KQH * KQW
    is_q = i_t < n_q_taps
    t_s = tl.maximum(i_t - n_q_taps, 0)
    dqh = tl.where(is_q, i_t // KQW - PQH, 0)
    dqw = tl.where(is_q, i_t % KQW - PQW, 0)
    dsh = tl.where(is_q, 0, t_s // KSW - PSH)
    dsw = tl.where(is_q, 0, t_s % KSW - PSW)

    o_step = tl.arange(0, BLOCK_P)
    if INT64:
        # The reduction B * NP (so a split's start) or the partials' offsets can pass 2^31.
        i_split = i_split.to(tl.int64)
        o_o = o_o.to(tl.int64)
        o_c = o_c.to(tl.int64)
    o_start = i_split * CHUNK
    b_acc = tl.zeros((BLOCK_O, BLOCK_C), dtype=tl.float32)
    b_bias = tl.zeros((BLOCK_O,), dtype=tl.float32)
    for r0 in range(0, CHUNK, BLOCK_P):
        o_red = o_start + r0 + o_step
        m_red = o_red < R
        # Reduction index -> (b, i, j, u, v).
        o_b = o_red // NP
        o_i, o_j, o_u, o_v = _split_position(o_red % NP, WQO, HSO, WSO)
        o_xqh = o_i * SQH + dqh
        o_xqw = o_j * SQW + dqw
        o_xsh = o_u * SSH + dsh
        o_xsw = o_v * SSW + dsw
        m_x = (m_red & (o_xqh >= 0) & (o_xqh < HQ) & (o_xqw >= 0) & (o_xqw < WQ)
               & (o_xsh >= 0) & (o_xsh < HS) & (o_xsw >= 0) & (o_xsw < WS))
        p_xt = (p_x + (o_b * s_xb + o_xqh * s_xqh + o_xqw * s_xqw + o_xsh * s_xsh + o_xsw * s_xsw)[:, None]
                + o_c[None, :] * s_xc)  # [BLOCK_P, BLOCK_C]
        p_gt = (p_g + o_o[:, None] * s_gc
                + (o_b * s_gb + o_i * s_gqh + o_j * s_gqw + o_u * s_gsh + o_v * s_gsw)[None, :])  # [BLOCK_O, BLOCK_P]
        b_x = tl.load(p_xt, mask=m_x[:, None] & m_c[None, :], other=0.0)
        b_g = tl.load(p_gt, mask=m_o[:, None] & m_red[None, :], other=0.0)
        b_acc = dot_acc(b_g.to(b_x.dtype), b_x, b_acc, INPUT_PRECISION)
        b_bias += tl.sum(b_g.to(tl.float32), axis=1)

    n_taps = n_q_taps + KSH * KSW
    p_w = p_pw + ((i_split * n_taps + i_t) * COUT + o_o[:, None]) * CIN + o_c[None, :]
    tl.store(p_w, b_acc, mask=m_o[:, None] & m_c[None, :])
    # Every tap and input-channel tile sums the same bias gradient; the first one stores it.
    tl.store(p_pb + i_split * COUT + o_o, b_bias, mask=m_o & (i_t == 0) & (i_c == 0))


def _from_taps(grad: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """fp32 ``[KH*KW, Cout, Cin]`` -> ``[Cout, Cin, KH, KW]`` in ``weight``'s dtype."""
    cout, cin, kh, kw = weight.shape
    # Into a tensor of its own, in one copy: for 1x1 kernels the permuted view is already contiguous, and
    # both weight gradients were then views of one buffer, which a custom op may not return (it raised).
    out = torch.empty((cout, cin, kh, kw), dtype=weight.dtype, device=grad.device)
    return out.copy_(grad.view(kh, kw, cout, cin).permute(2, 3, 0, 1))


MIN_SPLIT = 4096  # reduction elements per split of the weight gradient at least
MAX_GRID_PROGRAMS = 4096  # splits stop growing once the weight-gradient grid has about this many programs
MAX_PARTIALS = 1 << 22  # fp32 partial weight-gradient elements at most (16 MiB), unless one split needs more


@on_the_inputs_device
def center_pivot_conv4d_backward(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    weight_query: torch.Tensor,
    weight_support: torch.Tensor,
    stride,
    padding,
    needs_input_grad=(True, True, True, True, True),
):
    """Gradients of :func:`center_pivot_conv4d_into` (no autograd; the op layer calls this).

    Args:
        grad_out: ``[B, Cout, Hq', Wq', Hs', Ws']``, any strides (stride 0 after ``.sum()`` is fine).
        x: ``[B, Cin, Hq, Wq, Hs, Ws]`` the forward input, any strides.
        weight_query, weight_support: ``[Cout, Cin, KH, KW]`` as in the forward.
        stride, padding: the forward's 4-tuples.
        needs_input_grad: 5 flags for ``(x, weight_query, bias_query, weight_support, bias_support)``.

    Returns:
        ``(grad_x, grad_weight_query, grad_bias_query, grad_weight_support, grad_bias_support)``, None
        where not needed. ``grad_x`` has ``x``'s dtype; weight and bias gradients are reduced in fp32 and
        returned in the weights' dtype (both bias gradients equal the sum of ``grad_out``).
    """
    sqh, sqw, ssh, ssw = _check_4tuple("stride", stride)
    pqh, pqw, psh, psw = _check_4tuple("padding", padding)
    _check_geometry((sqh, sqw, ssh, ssw), (pqh, pqw, psh, psw))
    batch, cin, hq, wq, hs, ws = x.shape
    cout, _, kqh, kqw = weight_query.shape
    _, _, ksh, ksw = weight_support.shape
    expected = (batch, cout, -(-hq // sqh), -(-wq // sqw), -(-hs // ssh), -(-ws // ssw))
    if tuple(grad_out.shape) != expected:
        raise ValueError(f"grad_out: expected shape {expected}, got {tuple(grad_out.shape)}")
    check_float_dtype("grad_out", grad_out)
    need_x, need_wq, need_bq, need_ws, need_bs = (bool(n) for n in needs_input_grad)
    _, _, hqo, wqo, hso, wso = expected
    n_p = hqo * wqo * hso * wso
    precision = dot_precision(x.dtype)
    sizes = (hq, wq, hs, ws, hqo, wqo, hso, wso)
    geometry = (sqh, sqw, ssh, ssw, pqh, pqw, psh, psw, kqh, kqw, ksh, ksw)

    grad_x = None
    if need_x:
        grad_x = torch.empty_like(x, memory_format=torch.contiguous_format)
        if grad_x.numel():
            n_x = hq * wq * hs * ws
            int64 = needs_int64(grad_out, grad_x, extra=n_x)
            # Weights [Cout, Cin, KH, KW] -> [KH*KW, Cout, Cin] in x's dtype (a tiny copy).
            wq_t = weight_query.detach().to(x.dtype).permute(2, 3, 0, 1).reshape(kqh * kqw, cout, cin).contiguous()
            ws_t = weight_support.detach().to(x.dtype).permute(2, 3, 0, 1).reshape(ksh * ksw, cout, cin).contiguous()
            for start in range(0, batch, MAX_GRID_Z):
                gb, xb = grad_out[start:start + MAX_GRID_Z], grad_x[start:start + MAX_GRID_Z]
                # One program computes a BLOCK_P x BLOCK_C tile of (flat input position, input channel)
                # of grad x for one batch element, gathering grad_out over both branches' taps.
                def grid(meta, programs_b=gb.shape[0]):
                    return triton.cdiv(n_x, meta["BLOCK_P"]), triton.cdiv(cin, meta["BLOCK_C"]), programs_b

                _center_pivot_conv4d_grad_input_kernel[grid](
                    gb, wq_t, ws_t, xb, cin, cout, *sizes, n_x, *gb.stride(), *xb.stride(), *geometry,
                    INPUT_PRECISION=precision, INT64=int64,
                )

    grads_w = [None, None]
    grads_b = [None, None]
    if need_wq or need_ws or need_bq or need_bs:
        n_taps = kqh * kqw + ksh * ksw
        reduction = batch * n_p
        splits = 1
        if reduction > 0 and cin > 0 and cout > 0:
            # Enough splits to fill the GPU, each long enough to amortize its partial store, and the
            # fp32 partials kept small.
            tiles = triton.cdiv(cout, 64) * triton.cdiv(cin, 64)
            max_splits = min(MAX_GRID_PROGRAMS // (n_taps * tiles), MAX_PARTIALS // (n_taps * cout * cin))
            splits = max(1, min(max_splits, reduction // MIN_SPLIT))
        chunk = triton.cdiv(max(reduction, 1), splits)
        chunk = triton.cdiv(chunk, 256) * 256  # a multiple of every BLOCK_P
        splits = triton.cdiv(max(reduction, 1), chunk)
        partial_w = torch.empty(splits, n_taps, cout, cin, device=x.device, dtype=torch.float32)
        partial_b = torch.empty(splits, cout, device=x.device, dtype=torch.float32)
        if reduction == 0 or cin == 0 or cout == 0:
            # Nothing to launch (an empty grid would leave the bias partials unwritten).
            partial_w.zero_()
            partial_b.zero_()
            partial_b[0] = grad_out.float().sum(dim=(0, 2, 3, 4, 5))
        else:
            int64 = needs_int64(x, grad_out, partial_w, extra=reduction + chunk)
            # One program reduces one split of the (batch, output position) pairs for one tap and one
            # BLOCK_O x BLOCK_C tile of (output channel, input channel); axes: channel tiles, taps, splits.
            def grid(meta):
                return triton.cdiv(cout, meta["BLOCK_O"]) * triton.cdiv(cin, meta["BLOCK_C"]), n_taps, splits

            _center_pivot_conv4d_grad_weight_kernel[grid](
                x, grad_out, partial_w, partial_b, cin, cout, *sizes, n_p, reduction, chunk,
                *x.stride(), *grad_out.stride(), *geometry,
                INPUT_PRECISION=precision, INT64=int64,
            )
        grad_w = partial_w.sum(0)  # [taps, Cout, Cin], a fixed-order (deterministic) reduction
        grad_b = partial_b.sum(0).to(weight_query.dtype)
        split_at = kqh * kqw
        if need_wq:
            grads_w[0] = _from_taps(grad_w[:split_at], weight_query)
        if need_ws:
            grads_w[1] = _from_taps(grad_w[split_at:], weight_support)
        grads_b = [grad_b if need_bq else None, grad_b.clone() if need_bs else None]
    return grad_x, grads_w[0], grads_b[0], grads_w[1], grads_b[1]
