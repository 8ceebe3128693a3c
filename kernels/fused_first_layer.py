"""Triton kernel for the support-dim branch of the fused hypercorrelation + first center-pivot layer.

For every pivot query position ``q`` and every *active* support window ``w = (u, v)`` (one that covers
at least one active support position), the program recomputes the window's correlations
``relu(<qn_l(q), sn_l(x)>)`` for its ``KS x KS`` taps and immediately contracts them with the
support conv's weights, accumulating over the level's layers:

    out[b, o, q, w] += sum_l sum_t relu(<qn_l[b, :, q], sn_l[b, :, x(w, t)]>) * W[o, l, t]

Nothing 4D is stored: a correlation tile lives in registers between two ``tl.dot`` calls. Taps that
fall outside the support map (zero padding) or on inactive positions (whose normalized features are
exactly zero) contribute zero. Windows without an active position are not launched: their output is
the bias the caller prefilled. The query-dim branch (pivot support positions only, ``1/s^2`` of the
correlations) stays with the PyTorch code of :mod:`hypertriton.ops.fused_first_layer`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._config import (autotune_configs, check_float_dtype, dot_acc, dot_precision, needs_int64,
                      on_the_inputs_device)

__all__ = ["support_branch_into"]

MAX_GRID_Y = 65535  # CUDA's limit on the second and third grid dimensions


def _configs():
    gpu = [
        triton.Config({"BLOCK_Q": bq, "BLOCK_C": bc}, num_warps=w, num_stages=st)
        # 128 query positions take 8 warps: with 4 they spill registers in fp32 with Triton 3.6
        # (bench/kernel_registers.py).
        for bq, bc, w, st in [(64, 32, 4, 3), (128, 32, 8, 3), (128, 64, 8, 2), (32, 32, 2, 2)]
    ]
    return autotune_configs(gpu, triton.Config({"BLOCK_Q": 16, "BLOCK_C": 16}, num_warps=1))


# The kernel adds into its prefilled output: autotuning runs it many times per config on the real
# arguments, so the output is restored after each of those runs (else the first call per shape is wrong).
@triton.autotune(configs=_configs(), key=["C", "NQ", "L", "COUT", "KS", "INPUT_PRECISION", "WEIGHT_PRECISION"],
                 restore_value=["p_out"])
@triton.jit
def _support_branch_kernel(
    p_query,  # normalized query at the pivot query positions [B, L, C, NQ], contiguous
    p_support,  # normalized, masked support [B, L, C, Hs*Ws], contiguous (zero at inactive positions)
    p_weight,  # support conv weight [COUT, L, KS, KS], contiguous
    p_windows,  # active windows per batch element [B, MAX_WIN] int32 (u * WS2 + v), padded
    p_counts,  # number of active windows per batch element [B] int32
    p_out,  # output [B, COUT, NQ, HS2 * WS2], contiguous, prefilled (biases, query branch)
    L,  # layers of the level (conv input channels)
    C,  # feature channels, the correlation's reduction length
    NQ,  # pivot query positions Hq' * Wq'
    HS, WS,  # support map size
    WS2, NS2,  # output support width and Hs' * Ws'
    MAX_WIN,  # row length of p_windows
    STRIDE, PAD,  # support conv stride and padding (square)
    COUT: tl.constexpr,  # output channels
    KS: tl.constexpr,  # support conv kernel size (square)
    INPUT_PRECISION: tl.constexpr,  # "ieee" or "tf32", for fp32 inputs only
    WEIGHT_PRECISION: tl.constexpr,  # the same for the fp32 product of correlations and weights
    INT64: tl.constexpr,  # whether offsets can pass 2^31 (then all index math is int64)
    BLOCK_Q: tl.constexpr,  # pivot query positions per program
    BLOCK_C: tl.constexpr,  # channels per step of the correlation's reduction
    BLOCK_T: tl.constexpr,  # taps per window, KS*KS padded to a power of two >= 16
    BLOCK_O: tl.constexpr,  # output channels, COUT padded to a power of two >= 16
):
    i_q = tl.program_id(0)
    i_w = tl.program_id(1)
    i_b = tl.program_id(2)
    if INT64:
        i_q = i_q.to(tl.int64)
        i_w = i_w.to(tl.int64)
        i_b = i_b.to(tl.int64)
    n_windows = tl.load(p_counts + i_b)
    if i_w < n_windows:
        window = tl.load(p_windows + i_b * MAX_WIN + i_w)
        if INT64:
            window = window.to(tl.int64)
        u = window // WS2
        v = window % WS2

        o_q = i_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
        o_t = tl.arange(0, BLOCK_T)
        o_o = tl.arange(0, BLOCK_O)
        o_c = tl.arange(0, BLOCK_C)
        if INT64:
            o_c = o_c.to(tl.int64)  # channel * positions passes 2^31 in a large feature map
        m_q = o_q < NQ
        m_o = o_o < COUT
        # Support position of each tap; taps in the zero padding are masked off.
        row = u * STRIDE - PAD + o_t // KS
        col = v * STRIDE - PAD + o_t % KS
        m_t = (o_t < KS * KS) & (row >= 0) & (row < HS) & (col >= 0) & (col < WS)
        o_x = row * WS + col

        acc = tl.zeros((BLOCK_Q, BLOCK_O), dtype=tl.float32)
        for layer in range(0, L):
            corr = tl.zeros((BLOCK_Q, BLOCK_T), dtype=tl.float32)
            base_q = (i_b * L + layer) * C * NQ
            base_s = (i_b * L + layer) * C * (HS * WS)
            for c0 in range(0, C, BLOCK_C):
                m_c = (c0 + o_c) < C
                # [BLOCK_Q, BLOCK_C] query tile and [BLOCK_C, BLOCK_T] support taps
                p_q = p_query + base_q + (c0 + o_c)[None, :] * NQ + o_q[:, None]
                b_q = tl.load(p_q, mask=m_q[:, None] & m_c[None, :], other=0.0)
                p_s = p_support + base_s + (c0 + o_c)[:, None] * (HS * WS) + o_x[None, :]
                b_s = tl.load(p_s, mask=m_c[:, None] & m_t[None, :], other=0.0)
                corr = dot_acc(b_q, b_s, corr, INPUT_PRECISION)
            # ReLU that keeps NaN (tl.maximum would turn NaN into 0, unlike torch.relu).
            corr = tl.where(corr < 0.0, 0.0, corr)
            # [BLOCK_T, BLOCK_O] weights of this layer: W[o, layer, t]
            p_wt = p_weight + (o_o[None, :] * L + layer) * (KS * KS) + o_t[:, None]
            b_w = tl.load(p_wt, mask=(o_t[:, None] < KS * KS) & m_o[None, :], other=0.0).to(tl.float32)
            acc = tl.dot(corr, b_w, acc, input_precision=WEIGHT_PRECISION)

        # Each (query, window, channel) belongs to exactly one program: plain read-add-write.
        p_o = p_out + ((i_b * COUT + o_o[None, :]) * NQ + o_q[:, None]) * NS2 + window
        m_out = m_q[:, None] & m_o[None, :]
        prev = tl.load(p_o, mask=m_out, other=0.0)
        tl.store(p_o, (prev.to(tl.float32) + acc).to(p_out.dtype.element_ty), mask=m_out)


def _next_pow2_at_least_16(n: int) -> int:
    return max(16, triton.next_power_of_2(n))


@on_the_inputs_device
def support_branch_into(query: torch.Tensor, support: torch.Tensor, weight: torch.Tensor, windows: torch.Tensor,
                        counts: torch.Tensor, support_size: tuple[int, int], stride: int, padding: int,
                        out: torch.Tensor) -> torch.Tensor:
    """Add the support-dim branch of the fused first layer into ``out`` (no autograd).

    Args:
        query: normalized query at the pivot query positions ``[B, L, C, NQ]``.
        support: normalized, masked support ``[B, L, C, Hs*Ws]`` (zero at inactive positions).
        weight: support conv weight ``[Cout, L, KS, KS]``.
        windows: ``[B, MAX_WIN]`` int32 active windows ``u * Ws' + v`` per batch element (padding ignored).
        counts: ``[B]`` int32 number of valid entries of each ``windows`` row.
        support_size: ``(Hs, Ws)``.
        stride, padding: the support conv's (square) stride and padding.
        out: ``[B, Cout, NQ, Hs'*Ws']`` contiguous, prefilled; updated in place and returned.
    """
    for name, t in (("query", query), ("support", support), ("weight", weight)):
        check_float_dtype(name, t)
    query, support, weight = query.contiguous(), support.contiguous(), weight.contiguous()
    windows, counts = windows.to(torch.int32).contiguous(), counts.to(torch.int32).contiguous()
    if not out.is_contiguous():
        raise ValueError("out: expected a contiguous [B, Cout, NQ, Hs'*Ws'] tensor")
    batch, layers, channels, nq = query.shape
    hs, ws = support_size
    out_channels, ks = weight.shape[0], weight.shape[-1]
    ns2 = out.shape[-1]
    ws2 = (ws + 2 * padding - ks) // stride + 1
    max_windows = windows.shape[1]
    if batch == 0 or max_windows == 0 or nq == 0:
        return out
    if max_windows > MAX_GRID_Y or batch > MAX_GRID_Y:
        raise ValueError(f"windows: {max_windows} windows x batch {batch} exceed the launch grid ({MAX_GRID_Y})")
    # One program: BLOCK_Q pivot query positions x one active support window x one batch element.
    grid = lambda meta: (triton.cdiv(nq, meta["BLOCK_Q"]), max_windows, batch)  # noqa: E731
    _support_branch_kernel[grid](
        query, support, weight, windows, counts, out,
        layers, channels, nq, hs, ws, ws2, ns2, max_windows, stride, padding,
        # The correlations are fp32 whatever the features' dtype: their product with the weights is an
        # fp32 product (TF32 only where PyTorch's fp32 matmuls may use it), even for bf16/fp16 features.
        COUT=out_channels, KS=ks, INPUT_PRECISION=dot_precision(query.dtype),
        WEIGHT_PRECISION=dot_precision(torch.float32),
        INT64=needs_int64(query, support, out), BLOCK_T=_next_pow2_at_least_16(ks * ks),
        BLOCK_O=_next_pow2_at_least_16(out_channels),
    )
    return out
