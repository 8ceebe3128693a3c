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

from ._config import autotune_configs, check_float_dtype, dot_precision, needs_int64

MAX_GRID_Z = 65535  # CUDA's limit on the third grid dimension


def _configs():
    gpu = [
        triton.Config({"BLOCK_P": bp, "BLOCK_O": bo, "BLOCK_C": bc}, num_warps=w, num_stages=st)
        for bp, bo, bc, w, st in [
            (64, 16, 16, 2, 3),  # the first layers: few input (L_p <= 23) and output (16) channels
            (128, 16, 16, 4, 3),
            (64, 64, 32, 4, 3),
            (128, 64, 32, 4, 3),
            (128, 128, 32, 8, 3),
            (64, 128, 64, 4, 2),
        ]
    ]
    # Under the interpreter the cost is per program and op, not per element: few, large tiles.
    return autotune_configs(gpu, triton.Config({"BLOCK_P": 256, "BLOCK_O": 16, "BLOCK_C": 8}, num_warps=1))


@triton.jit
def _accumulate_branch(
    b_acc,  # [BLOCK_P, BLOCK_O] fp32 accumulator
    p_xb,  # pointer to x[b] (this program's batch element)
    p_w,  # weights of this branch arranged [KH*KW, CIN, COUT], contiguous
    o_o,  # [BLOCK_O] output channels of this tile
    m_o,  # [BLOCK_O] valid output channels
    o_c,  # [BLOCK_C] arange over an input-channel chunk (int32 or int64)
    m_p,  # [BLOCK_P] valid output positions
    o_r0,  # [BLOCK_P] index of the window's first row along the sliding dims (before adding the tap)
    o_c0,  # [BLOCK_P] index of the window's first column, likewise
    o_fixed,  # [BLOCK_P] offset of the pivot along the two dims this branch does not slide over
    H, W,  # extent of the two sliding dims of x
    s_h, s_w, s_xc,  # strides of x over the sliding row, sliding column and input channel
    CIN, COUT,
    KH, KW,  # kernel size of this branch
    INPUT_PRECISION: tl.constexpr,
    BLOCK_C: tl.constexpr,  # input channels per step (the length of o_c)
):
    for tap in range(KH * KW):
        o_r = o_r0 + tap // KW
        o_col = o_c0 + tap % KW
        # Taps that fall outside the map read zero padding.
        m_x = m_p & (o_r >= 0) & (o_r < H) & (o_col >= 0) & (o_col < W)
        p_x = p_xb + (o_fixed + o_r * s_h + o_col * s_w)[:, None] + o_c[None, :] * s_xc  # [BLOCK_P, BLOCK_C]
        p_wt = p_w + tap * CIN * COUT + o_c[:, None] * COUT + o_o[None, :]  # [BLOCK_C, BLOCK_O]
        for c0 in range(0, CIN, BLOCK_C):
            m_c = o_c < CIN - c0
            b_x = tl.load(p_x, mask=m_x[:, None] & m_c[None, :], other=0.0)
            b_w = tl.load(p_wt, mask=m_c[:, None] & m_o[None, :], other=0.0)
            b_acc = tl.dot(b_x, b_w, b_acc, input_precision=INPUT_PRECISION)
            p_x += BLOCK_C * s_xc
            p_wt += BLOCK_C * COUT
    return b_acc


@triton.autotune(configs=_configs(), key=["CIN", "COUT", "NP", "KQH", "KQW", "KSH", "KSW", "INPUT_PRECISION"])
@triton.jit
def _center_pivot_conv4d_kernel(
    p_x,  # input [B, CIN, HQ, WQ, HS, WS], strides s_x*
    p_wq,  # query-branch weights arranged [KQH*KQW, CIN, COUT], contiguous, x's dtype
    p_ws,  # support-branch weights arranged [KSH*KSW, CIN, COUT], contiguous, x's dtype
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
    BLOCK_C: tl.constexpr,  # input channels per step of the reduction
):
    i_p = tl.program_id(0)
    i_o = tl.program_id(1)
    i_b = tl.program_id(2)
    o_p = i_p * BLOCK_P + tl.arange(0, BLOCK_P)
    o_c = tl.arange(0, BLOCK_C)
    if INT64:
        i_b = i_b.to(tl.int64)
        o_p = o_p.to(tl.int64)
        o_c = o_c.to(tl.int64)
    o_o = i_o * BLOCK_O + tl.arange(0, BLOCK_O)
    m_p = o_p < NP
    m_o = o_o < COUT

    # Flat output position -> (i, j, u, v), output row-major order.
    o_v = o_p % WSO
    o_t = o_p // WSO
    o_u = o_t % HSO
    o_t = o_t // HSO
    o_j = o_t % WQO
    o_i = o_t // WQO
    # The pivot: input position this output position is centred on.
    o_pqh = o_i * SQH
    o_pqw = o_j * SQW
    o_psh = o_u * SSH
    o_psw = o_v * SSW

    p_xb = p_x + i_b * s_xb
    b_acc = tl.zeros((BLOCK_P, BLOCK_O), dtype=tl.float32)
    # Query branch: slide over (query h, query w) at the pivot's support position.
    b_acc = _accumulate_branch(
        b_acc, p_xb, p_wq, o_o, m_o, o_c, m_p,
        o_pqh - PQH, o_pqw - PQW, o_psh * s_xsh + o_psw * s_xsw,
        HQ, WQ, s_xqh, s_xqw, s_xc, CIN, COUT, KQH, KQW, INPUT_PRECISION, BLOCK_C,
    )
    # Support branch: slide over (support h, support w) at the pivot's query position.
    b_acc = _accumulate_branch(
        b_acc, p_xb, p_ws, o_o, m_o, o_c, m_p,
        o_psh - PSH, o_psw - PSW, o_pqh * s_xqh + o_pqw * s_xqw,
        HS, WS, s_xsh, s_xsw, s_xc, CIN, COUT, KSH, KSW, INPUT_PRECISION, BLOCK_C,
    )
    if HAS_BQ:
        b_acc += tl.load(p_bq + o_o, mask=m_o, other=0.0).to(tl.float32)[None, :]
    if HAS_BS:
        b_acc += tl.load(p_bs + o_o, mask=m_o, other=0.0).to(tl.float32)[None, :]

    p_o = (p_out + i_b * s_ob + o_o[None, :] * s_oc
           + (o_i * s_oqh + o_j * s_oqw + o_u * s_osh + o_v * s_osw)[:, None])  # [BLOCK_P, BLOCK_O]
    tl.store(p_o, b_acc.to(p_out.dtype.element_ty), mask=m_p[:, None] & m_o[None, :])


def _taps_cin_cout(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``[Cout, Cin, KH, KW]`` -> contiguous ``[KH*KW, Cin, Cout]`` in ``dtype`` (a tiny copy)."""
    cout, cin, kh, kw = weight.shape
    return weight.detach().to(dtype).permute(2, 3, 1, 0).reshape(kh * kw, cin, cout).contiguous()


def _check_4tuple(name: str, value) -> tuple[int, int, int, int]:
    value = tuple(int(v) for v in value)
    if len(value) != 4:
        raise ValueError(f"{name}: expected 4 ints (query h, query w, support h, support w), got {value}")
    return value


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
    if min(sqh, sqw, ssh, ssw) < 1:
        raise ValueError(f"stride: expected positive ints, got {(sqh, sqw, ssh, ssw)}")
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
    # Unused bias pointers still need a valid tensor argument; the kernel never reads them.
    bq = bias_query.detach() if bias_query is not None else wq_arranged
    bs = bias_support.detach() if bias_support is not None else ws_arranged
    int64 = needs_int64(x, out, extra=n_p)
    precision = dot_precision(x.dtype)
    for start in range(0, batch, MAX_GRID_Z):
        xb, ob = x[start:start + MAX_GRID_Z], out[start:start + MAX_GRID_Z]  # views, no copy
        # One program computes a BLOCK_P x BLOCK_O tile of (flat output position, output channel)
        # of one batch element, both branches and biases; axes: position tiles, channel tiles, batch.
        grid = lambda meta: (triton.cdiv(n_p, meta["BLOCK_P"]), triton.cdiv(cout, meta["BLOCK_O"]), xb.shape[0])  # noqa: E731
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
