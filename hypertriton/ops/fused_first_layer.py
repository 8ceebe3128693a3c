"""Hypercorrelation fused with the first center-pivot 4D convolution of a squeeze block.

HSNet's first step per pyramid level builds the hypercorrelation ``[B, L, Hq, Wq, Hs, Ws]`` (100 MB per
episode at 400 px for ResNet's layer2 level) and immediately feeds it to a
:class:`~hypertriton.CenterPivotConv4d`. That convolution reads it only in two thin ways:

- the query branch reads it at the pivot support positions ``(u*ssh, v*ssw)`` only;
- the support branch reads it at the pivot query positions, inside the support windows.

So the same output is computed here without storing the 4D tensor: correlation tiles are computed on
the fly (support branch: chunks of query rows; query branch: chunks of pivot support positions, or,
with query stride 1, the pivots' columns of the support branch's products, which hold them already),
and only for *active* support positions. Where the resized support mask is 0 the masked support feature
is 0, its normalized form is exactly 0, and so is every correlation with it: skipping those positions
is exact, not an approximation. A pivot that is inactive contributes
only the query conv's bias; a support window with no active position only the support conv's bias, so
the support branch is convolved only over the windows around the active positions' bounding box.
The forward can also report those bias-only windows (``return_bias_windows``) and, in inference, store
them once instead of at every query position (``column_split_share``): the learner's next layers then
skip them (:func:`hypertriton.ops.center_pivot_conv4d.center_pivot_conv4d_split`).

Non-finite values keep the dense semantics: a support position whose feature is NaN/inf is active
even where the mask is 0 (``NaN * 0`` is NaN in the dense path), and a batch element whose query
features are non-finite anywhere is computed densely (its NaN rows reach every support position).

Backward (``torch.autograd.Function``): nothing of the correlation is saved; each chunk is recomputed
with a small local autograd graph and freed before the next one, so training also stays at
``O(features + output + one chunk)`` memory. Gradients reach the conv weights and biases and the
features (so a backbone can be fine-tuned), and to a soft support mask: a position the mask leaves at 0
gets none there, as in the dense path, where ReLU's derivative at its zero correlations is 0.

Layers: :func:`fused_hypercorrelation_cp_conv4d` (functional, explicit weights) and
:func:`fused_hypercorrelation_cp_conv` (takes the ``CenterPivotConv4d`` module). Definition:
``center_pivot_conv4d(hypercorrelation(q, s, mask)[0], ...)`` of :mod:`hypertriton.reference`.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .. import reference
from .._hooks import has_hooks
from ..backend import resolve_backend, warn_if_reduced_precision_slow
from ._alloc import new_output
from ._autocast import autocast_enabled, autocast_off
from ._columns import column_runs, copy_columns_
from ._norms import channel_norm, normalize_with_norms, squared_norm
from ._second_order import recomputed_gradients
from ._validation import (check_cp_conv_args, check_feature_lists, check_support_mask, check_triton_dtypes,
                          refuse_vmap, shape_of)
from .center_pivot_conv4d import bias_sum, output_size
from .hypercorrelation import active_positions, hypercorrelation
from .layout import ColumnSplit

__all__ = ["fused_hypercorrelation_cp_conv4d", "fused_hypercorrelation_cp_conv", "CHUNK_ELEMENTS"]

# Elements of one chunk's dense correlation buffer (fp32: 8 MB). Large enough that the matrix
# products stay efficient, small enough to stay far below the 4D tensor at every size.
CHUNK_ELEMENTS = 1 << 21


@dataclass(frozen=True)
class _Spec:
    """Static description of one fused call (hashable, passed through autograd)."""

    layers: int
    stride: tuple[int, int, int, int]
    padding: tuple[int, int, int, int]
    out_size: tuple[int, int, int, int]  # (Hq', Wq', Hs', Ws')
    in_size: tuple[int, int, int, int]  # (Hq, Wq, Hs, Ws)
    compute_dtype: torch.dtype  # dtype of normalization and accumulation
    correlation_dtype: torch.dtype  # dtype of the correlation matrix products and the convs over them
    chunk_elements: int
    triton: bool = False  # support-dim branch by the Triton kernel (query-dim branch stays in PyTorch)
    # First output query row computed (query stride 1): out_size[0] rows from there; the rows around
    # them are only read by the query-dim branch (a streamed slab's halo).
    row_start: int = 0


# --------------------------------------------------------------------------------------------------
# Preparation: O(features) work shared by forward and backward
# --------------------------------------------------------------------------------------------------

def _resized_mask(support_mask, support: torch.Tensor, dtype: torch.dtype) -> torch.Tensor | None:
    """The mask at the support map's size ``[B, Hs*Ws]`` (as the reference resizes it), or None."""
    if support_mask is None:
        return None
    return reference.resize_mask(support_mask, support.shape[-2:]).to(dtype).flatten(1)


def _query_norms(query: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[bool]]:
    """``||q||`` ``[B, 1, Hq, Wq]`` per layer (differentiable), and per batch element whether the query is
    finite.

    A norm is finite only if every entry of its vector is, so the check reads the norms instead of the
    features (an overflowing norm of finite entries only costs a dense fallback).
    """
    norms = [channel_norm(q) for q in query]
    with torch.no_grad():
        finite = torch.stack([torch.isfinite(n).flatten(1).all(dim=1) for n in norms]).all(dim=0)
    return norms, finite.tolist()


def _normalized_query(query: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[bool]]:
    """Normalized query features per layer (as :func:`hypertriton.ops._norms.normalize_with_norms`), and
    per batch element whether they are all finite."""
    norms, finite = _query_norms(query)
    return [q / (n + reference.NORM_EPS) for q, n in zip(query, norms)], finite


def _inverse_query_norms(query: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[bool]]:
    """``1 / (||q|| + eps)`` ``[B, Hq, Wq]`` per layer, and per batch element whether the query is finite.

    The no-grad forward scales the correlation products by these instead of storing normalized copies
    of the query features (4 x 5 MB at ResNet-50's 400-px layer2 level); equal up to rounding.
    """
    norms, finite = _query_norms(query)
    return [1.0 / (n[:, 0] + reference.NORM_EPS) for n in norms], finite


def _active_positions(mask_b, support_b: list[torch.Tensor], query_finite: bool) -> torch.Tensor | None:
    """Indices of the support positions whose correlations may be nonzero, or None for all of them.

    Active: mask != 0 (NaN included), or a non-finite support feature (``NaN * 0`` stays NaN), found as a
    non-finite sum over the channels (finite features whose fp32 sum overflows are active too: exact, at
    the cost of their correlations). When the query is non-finite somewhere, every support position is
    active (its NaN reaches all of them).
    """
    if mask_b is None or not query_finite:
        return None
    active = mask_b != 0
    # A column (support position) whose channel sum is non-finite holds a NaN or inf feature, or (rarely)
    # finite ones that overflow the fp32 sum, which only costs its correlations. One reduction per layer
    # and no read back to the host (a GPU would wait for it).
    sums = torch.stack([s.sum(dim=0, dtype=torch.float32) for s in support_b])  # s: [C, Hs*Ws]
    active |= ~torch.isfinite(sums).all(dim=0)
    positions = active.nonzero().squeeze(1)
    return None if positions.numel() == active.numel() else positions


def _normalized_active_support(support_b, mask_b, active):
    """``normalize(s * mask)`` at the active positions: list of ``[C, N_act]`` per layer."""
    out = []
    for s in support_b:  # [C, Hs*Ws]
        if active is not None:
            s = s.index_select(1, active)
            if mask_b is not None:
                s = s * mask_b.index_select(0, active)
        elif mask_b is not None:
            s = s * mask_b
        out.append(normalize_with_norms(s.unsqueeze(0))[0].squeeze(0))
    return out


def _active_support_and_scales(support_b, mask_b, active, query_finite: bool = True):
    """The raw support features at the active positions, per layer ``[C, N_act]`` (the features themselves
    when all are active), and per layer the column factors ``[N_act]`` that normalize their masked form:
    ``normalize(s * m) = s * (m / (|m| * ||s|| + eps))``. The no-grad forward scales the products by these
    instead of storing normalized copies (4 x 5 MB at ResNet-50's 400-px layer2 level with a full mask);
    equal up to rounding, non-finite features included (their factor or product is NaN, as in the dense
    path).

    Masked-out positions computed anyway (a channel sum that overflows, or a non-finite query, which makes
    every position active) have their features multiplied by 0 first, as the dense path does: 0 for finite
    features however large, NaN for non-finite ones. The factor alone cannot give that: ``0 / (0 * inf +
    eps)`` is NaN, and so is a product that overflowed, times 0. (With a finite query and every position
    active, a masked-out position is one with a non-finite feature, NaN either way: no copy is made.)"""
    m = None if mask_b is None else (mask_b if active is None else mask_b.index_select(0, active))
    keep = (m != 0).to(support_b[0].dtype) if m is not None and (active is not None or not query_finite) else None
    raws, scales = [], []
    for s in support_b:  # [C, Hs*Ws]
        raw = s if active is None else s.index_select(1, active)
        if keep is not None:
            raw = raw * keep if active is None else raw.mul_(keep)  # index_select made a copy: in place
        norm = squared_norm(raw.unsqueeze(0))[0, 0].sqrt()
        scales.append(1.0 / (norm + reference.NORM_EPS) if m is None else m / (m.abs() * norm + reference.NORM_EPS))
        raws.append(raw)
    return raws, scales


def _pivot_query(query_normed: torch.Tensor, spec: _Spec) -> torch.Tensor:
    """Normalized query ``[C, Hq, Wq]`` at the pivot query positions, ``[C, Hq'*Wq']``."""
    sqh, sqw = spec.stride[:2]
    return query_normed[:, ::sqh, ::sqw].reshape(query_normed.shape[0], -1)


def _pivot_columns(active, hs: int, ws: int, spec: _Spec, device):
    """Active pivot support positions: (their column in the active list, their output index ``u*Ws'+v``)."""
    ssh, ssw = spec.stride[2:]
    ws2 = spec.out_size[3]
    positions = torch.arange(hs * ws, device=device) if active is None else active
    rows, cols = positions // ws, positions % ws
    is_pivot = (rows % ssh == 0) & (cols % ssw == 0)
    columns = is_pivot.nonzero().squeeze(1)
    out_index = (rows[columns] // ssh) * ws2 + cols[columns] // ssw
    return columns, out_index


# --------------------------------------------------------------------------------------------------
# The two branches, one chunk at a time (plain tensor code; differentiable when inputs require grad)
# --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _SupportWindows:
    """Where one batch element's support-dim branch is computed.

    Only the conv windows that can see an active position need computing (the others give only the bias):
    for a compact object, the windows over its bounding box. The correlations are scattered into a
    zero grid ``[n, L, *grid]`` at ``positions`` and convolved with ``padding``; the result covers the
    output windows ``rows x cols`` of ``Hs' x Ws'``. ``columns`` selects the active positions that lie
    in the grid (None: all of them).
    """

    grid: tuple[int, int]
    padding: tuple[int, int]
    rows: slice
    cols: slice
    positions: torch.Tensor | None  # flat grid index per selected active position; None: identity
    columns: torch.Tensor | None

    @property
    def full(self) -> bool:
        return self.positions is None

    @property
    def empty(self) -> bool:
        return self.rows.start >= self.rows.stop or self.cols.start >= self.cols.stop

    @functools.cached_property
    def runs(self) -> list[tuple[int, int, int]] | None:
        """:func:`hypertriton.ops._columns.column_runs` of ``positions`` on CPU (None: full, or elsewhere),
        found once for every chunk and layer."""
        if self.positions is None or self.positions.device.type != "cpu":
            return None
        return column_runs(self.positions)


def _window_range(low: int, high: int, kernel: int, stride: int, pad: int, count: int) -> slice:
    """Output windows (``u*stride - pad`` .. ``+ kernel - 1``) of a 1D conv that overlap input ``[low, high]``."""
    first = max(0, -(-(low + pad - kernel + 1) // stride))
    return slice(first, min(count - 1, (high + pad) // stride) + 1)


def _support_windows(active, hs: int, ws: int, kernel: tuple[int, int], spec: _Spec) -> _SupportWindows:
    """The :class:`_SupportWindows` of the active support positions ``active`` (None: all of them)."""
    hs2, ws2 = spec.out_size[2:]
    (sh, sw), (ph, pw) = spec.stride[2:], spec.padding[2:]
    if active is None:
        return _SupportWindows((hs, ws), (ph, pw), slice(0, hs2), slice(0, ws2), None, None)
    if active.numel() == 0:
        return _SupportWindows((1, 1), (0, 0), slice(0, 0), slice(0, 0), active, None)
    rows, cols = active // ws, active % ws
    # One read back to the host for the bounding box (a GPU waits at each; this runs per episode and level).
    row_min, row_max, col_min, col_max = torch.stack([rows.min(), rows.max(), cols.min(), cols.max()]).tolist()
    window_rows = _window_range(row_min, row_max, kernel[0], sh, ph, hs2)
    window_cols = _window_range(col_min, col_max, kernel[1], sw, pw, ws2)
    # The grid is the input region those windows read, padding included (it stays zero).
    top, left = window_rows.start * sh - ph, window_cols.start * sw - pw
    height = (window_rows.stop - window_rows.start - 1) * sh + kernel[0]
    width = (window_cols.stop - window_cols.start - 1) * sw + kernel[1]
    local_rows, local_cols = rows - top, cols - left
    inside = (local_rows >= 0) & (local_rows < height) & (local_cols >= 0) & (local_cols < width)
    columns = inside.nonzero().squeeze(1)  # its size is the one read back
    columns = None if columns.numel() == inside.numel() else columns
    positions = local_rows * width + local_cols
    if columns is not None:
        positions = positions[columns]
    return _SupportWindows((max(height, 1), max(width, 1)), (0, 0), window_rows, window_cols, positions, columns)


def _channels_last_buffer(spec: _Spec) -> bool:
    """Whether the support branch's correlation buffer is channels-last ``[n, cells, L]``: in reduced
    precision, where the conv over few input channels runs much faster so (1.8x in bf16 on this CPU) and
    its output adds into the query-major result along rows of Cout; fp32 keeps ``[n, L, cells]``, where
    scattering the products' columns costs less."""
    return spec.correlation_dtype != spec.compute_dtype


def _support_branch_chunk(query_chunk, support_active, windows: _SupportWindows, weight, spec: _Spec,
                          buffer=None, scales=None, capture=None):
    """Support-dim branch for a chunk of pivot query positions, over ``windows``.

    Args:
        query_chunk: list over layers of ``[C, n]`` normalized query features (pivot query positions).
        support_active: list over layers of ``[C, N]`` normalized support features at the active positions
            that ``windows`` selects (``windows.columns`` already applied).
        windows: see :class:`_SupportWindows`.
        weight: ``[Cout, L, KSh, KSw]``.
        buffer: optional reusable ``[>=n, L, grid h * grid w]`` or channels-last ``[>=n, grid h * grid w, L]``
            buffer whose other cells are zero
            (no-grad forward only; in the correlation dtype, as ``weight``, so the conv runs in it); None
            allocates in the compute dtype.
        scales: with a buffer, per layer ``([n] or None, [N] or None)`` factors for the products' rows and
            columns (the inverse norms of an unnormalized ``query_chunk`` and the normalizing factors of an
            unnormalized ``support_active``, each None when that side is normalized); None: both are.
        capture: with a buffer, optional ``(columns [P], into [P, n, L])``: the chunk's correlations at those
            columns of ``support_active`` are also written to ``into`` (the query branch's input at the
            pivots, which then needs no products of its own).

    Returns:
        ``[n, Cout, rows, cols]`` of ``windows``, without bias.
    """
    n = query_chunk[0].shape[1]
    layers = len(query_chunk)
    cd = spec.correlation_dtype
    cells = windows.grid[0] * windows.grid[1]
    if buffer is None or torch.is_grad_enabled():
        corr = torch.stack([torch.relu(torch.mm(q.t().to(cd), s.to(cd)).to(spec.compute_dtype))
                            for q, s in zip(query_chunk, support_active)], dim=1)  # [n, L, N]
        if not windows.full:
            corr = corr.new_zeros(n, layers, cells).index_copy(2, windows.positions, corr)
        maps = corr.view(n, layers, *windows.grid)
    else:
        corr = buffer[:n]  # the other cells stay exactly zero
        channels_last = _channels_last_buffer(spec)
        for layer, (q, s) in enumerate(zip(query_chunk, support_active)):
            if scales is not None and scales[layer][0] is not None:
                # The rows scaled on the chunk's features ([C, n] is smaller than [n, N]), in the
                # features' precision and rounded once into the products' operand: a reduced-precision
                # copy of the whole normalized query (4 x 2.5 MB at ResNet-50's 400-px layer2 level) would
                # be read cold from memory, and its heap growth faulted in again on every call.
                q = torch.mul(q, scales[layer][0], out=torch.empty(q.shape, dtype=cd, device=q.device))
            product = torch.mm(q.t().to(cd), s.to(cd)).to(corr.dtype)
            target = corr[:, :, layer] if channels_last else corr[:, layer]
            if windows.full and not channels_last:
                # Scaled straight into the buffer (its rows are contiguous here): two passes over the
                # products, not three. A channels-last buffer's rows are strided: the elementwise ops stay
                # on the contiguous product there (on the strided rows, the 400-px bf16 fused layer with a
                # full mask took 367 ms instead of 225).
                if scales is None or scales[layer][1] is None:
                    target.copy_(product)
                else:
                    torch.mul(product, scales[layer][1], out=target)
                product = torch.relu_(target)
            else:
                if scales is not None and scales[layer][1] is not None:
                    product.mul_(scales[layer][1])
                product = torch.relu_(product)
                if windows.full:
                    target.copy_(product)
                else:
                    copy_columns_(target, product, windows.positions, windows.runs)
        if capture is not None:
            # All layers' pivots at once from the buffer, where the products now are (a strided row of
            # it, gathered per layer, would first be copied whole: 44 x [209, 2500] at ResNet-50's 400-px
            # layer2 level with a full mask).
            cells_of = capture[0] if windows.full else windows.positions.index_select(0, capture[0])
            picked = corr.index_select(1, cells_of).transpose(0, 1) if channels_last else \
                corr.index_select(2, cells_of).permute(2, 0, 1)
            capture[1].copy_(picked)  # [P, n, L]
        maps = corr.view(n, *windows.grid, layers).permute(0, 3, 1, 2) if channels_last else \
            corr.view(n, layers, *windows.grid)
    return F.conv2d(maps, weight, None, spec.stride[2:], windows.padding)


def _query_branch_chunk(query_full, support_pivots, weight, spec: _Spec, hq: int, wq: int, column_scale=None,
                        conv_dtype: torch.dtype | None = None):
    """Query-dim branch for a chunk of active pivot support positions, of one batch element or of a batch.

    Args:
        query_full: list over layers of ``[C, Hq*Wq]`` normalized query features (a batch: ``[B, C, Hq*Wq]``).
        support_pivots: list over layers of ``[C, p]`` normalized support features at the pivots (a batch:
            ``[B, C, p]``).
        weight: ``[Cout, L, KQh, KQw]``.
        column_scale: list over layers of ``[Hq*Wq]`` factors for the products' columns when
            ``query_full`` is unnormalized (its inverse norms); None: it is normalized.
        conv_dtype: dtype of the ReLU and the conv (``weight``'s); None: the compute dtype.

    Returns:
        ``[p, Cout, Hq', Wq']`` (a batch: ``[B*p, Cout, Hq', Wq']``, batch-major) without bias.
    """
    cd = spec.correlation_dtype
    conv_dtype = spec.compute_dtype if conv_dtype is None else conv_dtype
    products = [torch.matmul(s.transpose(-2, -1).to(cd), q.to(cd)).to(conv_dtype)
                for q, s in zip(query_full, support_pivots)]
    if column_scale is not None:
        products = [product * scale.to(conv_dtype) for product, scale in zip(products, column_scale)]
    # Channels-last [(B,) p, Hq*Wq, L]: the conv's output is then channels-last too, [p, Hq', Wq', Cout] in
    # memory, which the torch forward adds into its query-major output along contiguous rows of Cout.
    return _query_conv(torch.stack([torch.relu(product) for product in products], dim=-1), weight, spec, hq, wq)


def _query_conv(correlations, weight, spec: _Spec, hq: int, wq: int):
    """The query-dim conv of ``correlations`` ``[p, Hq*Wq, L]`` (channels-last) with ``weight``
    ``[Cout, L, KQh, KQw]``: ``[p, Cout, Hq', Wq']`` without bias."""
    maps = correlations.view(-1, hq, wq, correlations.shape[-1]).permute(0, 3, 1, 2)
    return F.conv2d(maps, weight, None, spec.stride[:2], spec.padding[:2])


def _support_size(spec: _Spec) -> tuple[int, int]:
    return spec.in_size[2], spec.in_size[3]


def _chunk_size(per_item: int, spec: _Spec) -> int:
    return max(1, spec.chunk_elements // max(per_item, 1))


# --------------------------------------------------------------------------------------------------
# Forward and backward
# --------------------------------------------------------------------------------------------------

def _forward(query, support, mask, weight_query, bias_query, weight_support, bias_support, spec: _Spec,
             split_share: float | None = None):
    """No-grad fused forward. query/support: lists of ``[B, C, H, W]`` in the compute dtype.

    Returns ``(storage, bias_only)``: the output's query-major memory ``[B, Hq'*Wq', Hs'*Ws', Cout]`` and
    the ``[B, Hs'*Ws']`` flags of the bias-only support windows. With ``split_share``, when at least that
    share of the windows are bias-only, the output is instead a :class:`hypertriton.ops.layout.ColumnSplit`
    per batch element, the bias-only windows stored once (they are never written whole)."""
    batch, _, hq, wq = query[0].shape
    hs, ws = support[0].shape[-2:]
    hq2, wq2, hs2, ws2 = spec.out_size
    out_channels = weight_query.shape[0]
    device = query[0].device
    bias = bias_sum(bias_query, bias_support, weight_query.shape[0], like=weight_query).to(weight_query).view(-1, 1, 1)

    inverse_norms, query_finite = _inverse_query_norms(query)  # [B, Hq, Wq] per layer
    actives = []
    bias_only = torch.zeros(batch, hs2 * ws2, dtype=torch.bool, device=device)
    for b in range(batch):
        mask_b = None if mask is None else mask[b]
        actives.append(_active_positions(mask_b, [s[b].flatten(1) for s in support], query_finite[b]))
        bias_only[b] = _bias_only_windows(actives[b], hs, ws, weight_support.shape[-2:], spec, device)
    # A split stores only windows inside the support branch's box; a padding >= the kernel can leave a
    # window with an active pivot outside it (never in HSNet: padding k // 2), so that case stays dense.
    pivots_inside = all(pad < k for pad, k in zip(spec.padding[2:], weight_support.shape[-2:]))
    split = split_share is not None and pivots_inside and float(bias_only.float().mean()) >= split_share
    # Query-major memory [B, Hq'*Wq', Hs'*Ws', Cout] (see hypertriton.ops.layout), where the learner's
    # next layers run; the writes below cost the same in either layout.
    storage = None if split else new_output((batch, hq2 * wq2, hs2 * ws2, out_channels), spec.compute_dtype, device)
    splits = []

    # Products, ReLU and both convs in the correlation dtype (reduced precision: as autocast runs a
    # conv); the weights and the support are cast once, the query chunk by chunk as it is normalized.
    cd = spec.correlation_dtype
    weight_query, weight_support = weight_query.to(cd), weight_support.to(cd)
    for b in range(batch):
        support_b = [s[b].flatten(1) for s in support]
        mask_b = None if mask is None else mask[b]
        active = actives[b]
        support_active, support_scales = _active_support_and_scales(support_b, mask_b, active, query_finite[b])
        windows = _support_windows(active, hs, ws, weight_support.shape[-2:], spec)
        if split:
            target = _SplitTarget(~bias_only[b], hq2 * wq2, out_channels, windows, ws2, spec.compute_dtype)
        else:
            target = _DenseTarget(storage[b], windows, hs2, ws2, bias)
        if windows.empty:
            captured = None  # no active position in any window (so no active pivot either)
        else:
            # Support branch, chunks of pivot query rows, into a zero buffer reused across chunks, over the
            # windows that see an active position; the others hold the biases only.
            kept = slice(spec.row_start * wq2, (spec.row_start + hq2) * wq2)
            query_pivots = [_pivot_query(q[b], spec)[:, kept] for q in query]
            pivot_scales = [None] * spec.layers if inverse_norms is None else \
                [_pivot_query(n[b][None], spec)[0, kept] for n in inverse_norms]
            support_cd = [s if windows.columns is None else s.index_select(1, windows.columns) for s in support_active]
            column_scales = [c if windows.columns is None else c.index_select(0, windows.columns)
                             for c in support_scales]
            if cd != spec.compute_dtype:
                # Reduced precision copies the support anyway: normalized on the way (in fp32, rounded
                # once), which spares every chunk a pass over its products in reduced precision.
                support_cd = [torch.mul(s, c, out=torch.empty(s.shape, dtype=cd, device=s.device))
                              for s, c in zip(support_cd, column_scales)]
                column_scales = [None] * spec.layers
            cells = windows.grid[0] * windows.grid[1]
            rows = _chunk_size(spec.layers * cells, spec)
            per_row = (cells, spec.layers) if _channels_last_buffer(spec) else (spec.layers, cells)
            shape = (min(rows, hq2 * wq2), *per_row)
            # Over the whole map every cell is written in each chunk: no zeros needed (8 MB at ResNet-50's
            # 400-px layer2 level with a full mask).
            buffer = new_output(shape, cd, device) if windows.full else query[0].new_zeros(shape, dtype=cd)
            captured = _captured_pivots(active, windows, hq, wq, spec, device)
            for start in range(0, hq2 * wq2, rows):
                chunk = [q[:, start:start + rows] for q in query_pivots]
                capture = None if captured is None else \
                    (captured[0], captured[1][:, start:start + chunk[0].shape[1]])
                part = _support_branch_chunk(chunk, support_cd, windows, weight_support, spec, buffer,
                                             [(None if scale is None else scale[start:start + rows], columns)
                                              for scale, columns in zip(pivot_scales, column_scales)], capture)
                target.write_support_branch(part, bias, start)
                del part  # before the next chunk's: peak memory is the output plus one chunk
            del buffer  # before the query branch's own chunks
        if support_active[0].shape[1]:
            _add_query_branch(target, [q[b] for q in query], support_active, active, weight_query, spec,
                              None if inverse_norms is None else [n[b] for n in inverse_norms], support_scales,
                              None if captured is None else captured[1])
        if split:
            splits.append(target.column_split(bias, bias_only[b], (hq2, wq2, hs2, ws2)))
    # The storage itself: a custom Function must not return a view (in-place ops on it would be
    # refused); _logical_output views it as [B, Cout, Hq', Wq', Hs', Ws'].
    return (splits if split else storage), bias_only


class _DenseTarget:
    """Where :func:`_forward` writes one batch element's output: all of it, ``rows`` ``[Hq'*Wq', Hs'*Ws', Cout]``
    (a batch element of the query-major storage); windows outside ``windows`` get the biases."""

    def __init__(self, rows: torch.Tensor, windows: _SupportWindows, hs2: int, ws2: int, bias: torch.Tensor):
        self.rows = rows
        out_b = rows.permute(2, 0, 1)  # [Cout, Hq'*Wq', Hs'*Ws']
        self.box = out_b.view(out_b.shape[0], out_b.shape[1], hs2, ws2)[:, :, windows.rows, windows.cols]
        if not windows.full:
            out_b.copy_(bias.expand_as(out_b))

    def write_support_branch(self, part: torch.Tensor, bias: torch.Tensor, start: int) -> None:
        """Rows ``start..`` of the windows' support branch ``part`` ``[n, Cout, rows, cols]`` (no bias) + ``bias``."""
        torch.add(part.transpose(0, 1), bias.unsqueeze(-1), out=self.box[:, start:start + part.shape[0]])

    def columns(self, windows: torch.Tensor) -> torch.Tensor:
        """The columns of ``rows`` that hold output support windows ``windows``."""
        return windows


class _SplitTarget:
    """Where :func:`_forward` writes one batch element's output as a column split: only the windows flagged
    in ``varying`` ``[Hs'*Ws']``, all inside ``windows``, into ``rows`` ``[Hq'*Wq', V, Cout]``."""

    def __init__(self, varying: torch.Tensor, positions: int, out_channels: int, windows: _SupportWindows,
                 ws2: int, dtype: torch.dtype):
        device = varying.device
        self.index = varying.nonzero().flatten()  # the stored windows, ascending
        self.rows = new_output((positions, self.index.numel(), out_channels), dtype, device)
        self.column_of = torch.full(varying.shape, -1, dtype=torch.int64, device=device)
        self.column_of[self.index] = torch.arange(self.index.numel(), device=device)
        # Where each stored window lies in the support branch's box of windows (row-major).
        box_width = windows.cols.stop - windows.cols.start
        self.in_box = (self.index // ws2 - windows.rows.start) * box_width + self.index % ws2 - windows.cols.start

    def write_support_branch(self, part: torch.Tensor, bias: torch.Tensor, start: int) -> None:
        """As :meth:`_DenseTarget.write_support_branch`, the stored windows only."""
        # Gathered whole rows of Cout from the transposed view (gathering along the last dim of the conv's
        # [n, Cout, cells] runs 3x slower), then the biases added in place.
        rows = self.rows[start:start + part.shape[0]]
        windows = part.flatten(2).transpose(1, 2)  # [n, cells, Cout]
        if windows.dtype == rows.dtype:
            torch.index_select(windows, 1, self.in_box, out=rows)
        else:  # reduced-precision products: the output keeps the compute dtype
            rows.copy_(windows.index_select(1, self.in_box))
        rows.add_(bias.view(1, 1, -1))

    def columns(self, windows: torch.Tensor) -> torch.Tensor:
        """As :meth:`_DenseTarget.columns` (``windows`` must be stored ones)."""
        return self.column_of[windows]

    def column_split(self, bias: torch.Tensor, is_constant: torch.Tensor, size) -> ColumnSplit:
        """The finished :class:`ColumnSplit` (``size``: ``(Hq', Wq', Hs', Ws')``); the other windows hold ``bias``."""
        first_row = bias.view(1, -1).expand(is_constant.numel(), -1).to(self.rows.dtype).clone()
        if self.index.numel():
            first_row[self.index] = self.rows[0]
        return ColumnSplit(self.rows, self.index, first_row, is_constant.clone(), size)


def _bias_only_windows(active, hs: int, ws: int, kernel: tuple[int, int], spec: _Spec, device) -> torch.Tensor:
    """``[Hs'*Ws']`` bool: the support-conv windows that contain none of the ``active`` positions (indices
    into ``Hs*Ws``; None: all are active) and whose pivot is inactive. Their output is the biases at every
    query position: the support branch convolves only zeros there, the query branch correlates the zero
    vector. (With HSNet's padding k // 2 the pivot is the window's centre; a padding >= k can leave it
    outside the window.)"""
    hs2, ws2 = spec.out_size[2:]
    if active is None:
        return torch.zeros(hs2 * ws2, dtype=torch.bool, device=device)
    counts = torch.zeros(hs + 1, ws + 1, dtype=torch.int64, device=device)  # 2D prefix sums of the active flags
    flags = torch.zeros(hs * ws, dtype=torch.int64, device=device).index_fill_(0, active.to(device), 1)
    counts[1:, 1:] = flags.view(hs, ws).cumsum(0).cumsum(1)
    (sh, sw), (ph, pw) = spec.stride[2:], spec.padding[2:]
    top = (torch.arange(hs2, device=device) * sh - ph).clamp(0, hs)
    bottom = (torch.arange(hs2, device=device) * sh - ph + kernel[0]).clamp(0, hs)
    left = (torch.arange(ws2, device=device) * sw - pw).clamp(0, ws)
    right = (torch.arange(ws2, device=device) * sw - pw + kernel[1]).clamp(0, ws)
    inside = (counts[bottom][:, right] - counts[top][:, right] - counts[bottom][:, left] + counts[top][:, left])
    pivot_active = flags.view(hs, ws)[::sh, ::sw][:hs2, :ws2]
    return ((inside == 0) & (pivot_active == 0)).flatten()


def _captured_pivots(active, windows: _SupportWindows, hq: int, wq: int, spec: _Spec, device):
    """Where the support branch can hand its correlations to the query branch: ``(columns [P], buffer
    [P, Hq*Wq, L])`` for the first ``P`` active pivots (the buffer uninitialized: the support branch's
    chunks fill every query position of it), or None.

    With query stride 1 and every query row computed, the support branch's products cover every query
    position, and the pivots are among their columns: the query branch's own products would repeat
    them (27 ms at ResNet-50's 400-px layer2 level with a full mask, AMD EPYC VM). The buffer holds at
    most one chunk's worth of elements; the pivots beyond it keep their own products.
    """
    if spec.stride[:2] != (1, 1) or spec.row_start != 0 or spec.out_size[:2] != (hq, wq) or \
            windows.columns is not None:
        return None
    columns, _ = _pivot_columns(active, *_support_size(spec), spec, device)
    count = min(columns.numel(), spec.chunk_elements // (hq * wq * spec.layers))
    if count == 0:
        return None
    return columns[:count], torch.empty(count, hq * wq, spec.layers, dtype=spec.correlation_dtype, device=device)


def _add_query_branch(target, query_normed_b, support_active, active, weight, spec: _Spec,
                      inverse_norms_b=None, support_scales=None, captured=None) -> None:
    """Add the query-dim branch at the active pivot support positions into ``target`` (a
    :class:`_DenseTarget` or :class:`_SplitTarget`; no grad), in chunks of pivots.

    ``query_normed_b``: per layer ``[C, Hq, Wq]`` (unnormalized when ``inverse_norms_b``, per layer
    ``[Hq, Wq]``, is given); ``support_active``: per layer ``[C, N_act]`` (unnormalized when
    ``support_scales``, per layer ``[N_act]``, is given). ``captured``: the correlations ``[P, Hq*Wq, L]``
    of the first ``P`` active pivots, already computed (see :func:`_captured_pivots`).
    """
    hq, wq = query_normed_b[0].shape[-2:]
    hs, ws = _support_size(spec)
    columns, out_index = _pivot_columns(active, hs, ws, spec, target.rows.device)
    out_index = target.columns(out_index)  # an active pivot's window is never bias-only, so it is stored
    query_full = [qn.flatten(1) for qn in query_normed_b]
    # A chunk holds its correlations [p, L, Hq*Wq] and its conv output [p, Cout, Hq'*Wq'].
    pivots = _chunk_size(spec.layers * hq * wq + weight.shape[0] * spec.out_size[0] * spec.out_size[1], spec)
    done = 0 if captured is None else captured.shape[0]
    if done < columns.numel() and inverse_norms_b is not None and spec.correlation_dtype != spec.compute_dtype:
        # Reduced precision: these products take a normalized reduced-precision copy of the query (rounded
        # once), so no product is scaled in reduced precision (slow elementwise there, and rounded twice).
        query_full = [torch.mul(q, n.flatten(), out=torch.empty_like(q, dtype=spec.correlation_dtype))
                      for q, n in zip(query_full, inverse_norms_b)]
        inverse_norms_b = None
    for start in range(0, done, pivots):
        part = _query_conv(captured[start:start + pivots], weight, spec, hq, wq)
        _add_pivot_outputs(target.rows, part, out_index[start:start + part.shape[0]], spec)
    for start in range(done, columns.numel(), pivots):
        cols = columns[start:start + pivots]
        pivots_normed = [s.index_select(1, cols) if support_scales is None
                         else s.index_select(1, cols) * support_scales[layer].index_select(0, cols)
                         for layer, s in enumerate(support_active)]
        part = _query_branch_chunk(query_full, pivots_normed, weight, spec,
                                   hq, wq, None if inverse_norms_b is None else [n.flatten() for n in inverse_norms_b],
                                   conv_dtype=weight.dtype)
        _add_pivot_outputs(target.rows, part, out_index[start:start + pivots], spec)


def _add_pivot_outputs(rows_b, part, columns, spec: _Spec) -> None:
    """``rows_b[:, columns] += part`` for the query branch ``part`` ``[p, Cout, Hq'', Wq']`` of ``p`` pivots,
    over the kept query rows, into one batch element's output memory ``rows_b`` ``[Hq'*Wq', K, Cout]``."""
    part = part[:, :, spec.row_start:spec.row_start + spec.out_size[0]]
    rows = part.permute(2, 3, 0, 1).reshape(-1, part.shape[0], part.shape[1])  # [Hq'*Wq', p, Cout]
    rows_b.index_add_(1, columns, rows.to(rows_b.dtype))


def _forward_triton(query, support, mask, weight_query, bias_query, weight_support, bias_support, spec: _Spec):
    """Fused forward with the support-dim branch in :mod:`hypertriton.kernels.fused_first_layer`.

    Same inputs and output as :func:`_forward`; needs equal channel counts across the level's layers
    and a square support kernel, stride and padding (HSNet's case). Nothing is read back to the host
    (a GPU would wait at each read, once per batch element): the active windows are found and ordered
    on the device, and the query branch runs batched over every pivot (on a GPU its products cost less
    than the launches and waits that skipping the inactive pivots would take; their correlations are
    exactly zero, so the result is the same).
    """
    from ..kernels.fused_first_layer import support_branch_into

    batch, _, hq, wq = query[0].shape
    hs, ws = support[0].shape[-2:]
    hq2, wq2, hs2, ws2 = spec.out_size
    out_channels = weight_query.shape[0]
    stride, padding, kernel = spec.stride[2], spec.padding[2], weight_support.shape[-1]
    # Returned itself (not a view of it): in-place ops on a custom Function's output must stay allowed.
    result = new_output((batch, out_channels, hq2, wq2, hs2, ws2), query[0].dtype, query[0].device)
    out = result.view(batch, out_channels, hq2 * wq2, hs2 * ws2)
    biases = bias_sum(bias_query, bias_support, weight_query.shape[0], like=weight_query).to(weight_query)
    out.copy_(biases.view(1, -1, 1, 1).expand_as(out))

    query_normed = [normalize_with_norms(q)[0] for q in query]
    flat_mask = None if mask is None else mask.view(batch, 1, hs * ws)
    support_normed = [normalize_with_norms(s.flatten(2) if flat_mask is None else s.flatten(2) * flat_mask)[0]
                      for s in support]  # [B, C, Hs*Ws], exactly zero at inactive positions

    # Active windows (any tap on an active position) first in each row, in order; the kernel reads
    # only the first `counts[b]` of row b.
    if mask is None:
        hit = torch.ones(batch, hs2 * ws2, dtype=torch.bool, device=out.device)
    else:
        active = active_positions(flat_mask, query_normed, support_normed, read_back=False).view(batch, hs, ws)
        # Zero-padded first: max_pool2d's own padding is limited to half the kernel.
        padded = F.pad(active[:, None].to(out.dtype), (padding,) * 4)
        hit = (F.max_pool2d(padded, kernel, stride) > 0).view(batch, hs2 * ws2)
        pivot_active = active[:, ::stride, ::stride][:, :hs2, :ws2].reshape(batch, hs2 * ws2)
    counts = hit.sum(dim=1, dtype=torch.int32)
    windows = torch.sort((~hit).to(torch.int32), dim=1, stable=True).indices.to(torch.int32)
    query_pivots = torch.stack([_pivot_query_batch(qn, spec) for qn in query_normed], dim=1)  # [B, L, C, NQ]
    cd = spec.correlation_dtype
    support_branch_into(query_pivots.to(cd), torch.stack(support_normed, dim=1).to(cd), weight_support, windows,
                        counts, (hs, ws), stride, padding, out)
    _add_query_branch_batched(out, query_normed, support_normed, weight_query, spec)
    return result, ~hit if mask is None else ~(hit | pivot_active)


def _add_query_branch_batched(out, query_normed, support_normed, weight, spec: _Spec) -> None:
    """Add the query-dim branch at every pivot support position into ``out`` ``[B, Cout, Hq'*Wq', Hs'*Ws']``
    (no grad), batched over the batch, in chunks of pivots whose temporaries stay within a quarter of
    ``out``.

    ``query_normed``: per layer ``[B, C, Hq, Wq]``; ``support_normed``: per layer ``[B, C, Hs*Ws]`` (masked).
    """
    batch, out_channels = out.shape[:2]
    hq, wq = query_normed[0].shape[-2:]
    hs, ws = _support_size(spec)
    ssh, ssw = spec.stride[2:]
    hq2, wq2 = spec.out_size[:2]
    cd = spec.correlation_dtype
    # Pivot (u*s, v*s) of output position (u, v): the pivots are the output grid, in its order.
    pivots = [s.view(batch, -1, hs, ws)[:, :, ::ssh, ::ssw].flatten(2).to(cd) for s in support_normed]
    query_full = [q.flatten(2).to(cd) for q in query_normed]
    count = pivots[0].shape[-1]
    per_pivot = batch * (spec.layers * hq * wq + out_channels * hq * wq)
    step = max(1, max(spec.chunk_elements, out.numel() // 4) // max(per_pivot, 1))
    for start in range(0, count, step):
        part = _query_branch_chunk(query_full, [p[:, :, start:start + step] for p in pivots], weight, spec, hq, wq,
                                   conv_dtype=weight.dtype)  # [B*p, Cout, Hq', Wq']
        p = part.shape[0] // batch
        part = part[:, :, spec.row_start:spec.row_start + hq2]  # the kept rows
        part = part.reshape(batch, p, out_channels, hq2 * wq2).permute(0, 2, 3, 1)
        out[:, :, :, start:start + p] += part.to(out.dtype)


def _pivot_query_batch(query_normed: torch.Tensor, spec: _Spec) -> torch.Tensor:
    """``[B, C, Hq, Wq]`` -> ``[B, C, Hq'*Wq']`` at the pivot query positions."""
    sqh, sqw = spec.stride[:2]
    return query_normed[:, :, ::sqh, ::sqw].flatten(2)


def _logical_output(raw: torch.Tensor, spec: _Spec) -> torch.Tensor:
    """What the forward returns (the Triton path: ``[B, Cout, Hq', Wq', Hs', Ws']``; the torch path: its
    query-major storage ``[B, Hq'*Wq', Hs'*Ws', Cout]``), or a gradient shaped like it, as
    ``[B, Cout, Hq', Wq', Hs', Ws']``."""
    if spec.triton:
        return raw
    batch, _, _, out_channels = raw.shape
    return raw.permute(0, 3, 1, 2).reshape(batch, out_channels, *spec.out_size)


class _FusedFirstLayer(torch.autograd.Function):
    """Autograd around :func:`_forward`; backward recomputes correlation chunks (nothing 4D saved)."""

    # forward/setup_context apart (not forward(ctx, ...)): torch.func transforms (grad, vjp) need it.
    @staticmethod
    def forward(spec, mask, weight_query, bias_query, weight_support, bias_support, *features):
        query, support = list(features[: spec.layers]), list(features[spec.layers:])
        forward = _forward_triton if spec.triton else _forward
        # Also the [B, Hs'*Ws'] flags of the support windows whose output is only the biases.
        return forward(query, support, mask, weight_query, bias_query, weight_support, bias_support, spec)

    @staticmethod
    def setup_context(ctx, inputs, output):
        spec, mask, weight_query, bias_query, weight_support, bias_support, *features = inputs
        ctx.spec = spec
        ctx.has_bias = (bias_query is not None, bias_support is not None)
        ctx.save_for_backward(mask, weight_query, weight_support, *features)
        ctx.mark_non_differentiable(output[1])

    @staticmethod
    def backward(ctx, grad, _bias_only):
        if torch.is_grad_enabled():  # create_graph=True or torch.func: see _second_order
            return _FusedFirstLayer._differentiable_backward(ctx, grad)
        spec = ctx.spec
        grad = _logical_output(grad, spec)
        mask, weight_query, weight_support, *features = ctx.saved_tensors
        needs = ctx.needs_input_grad
        grad_bias = grad.sum(dim=(0, 2, 3, 4, 5))
        grad_bq = grad_bias if needs[3] and ctx.has_bias[0] else None
        grad_bs = grad_bias if needs[5] and ctx.has_bias[1] else None
        needs_mask = needs[1] and mask is not None
        grad_features, grad_mask, grad_wq, grad_ws = _backward_features_and_weights(
            grad, features, mask, weight_query, weight_support, spec, needs_features=any(needs[6:]),
            needs_mask=needs_mask, needs_weights=(needs[2], needs[4]))
        grad_features = [g if need else None for g, need in zip(grad_features, needs[6:])]
        return (None, grad_mask, grad_wq if needs[2] else None, grad_bq, grad_ws if needs[4] else None, grad_bs,
                *grad_features)

    @staticmethod
    def _differentiable_backward(ctx, grad):
        """Under ``create_graph=True``: through the einsum reference on the saved inputs (this level's 4D
        correlation is held during the backward; see :mod:`hypertriton.ops._second_order`)."""
        spec = ctx.spec
        mask, weight_query, weight_support, *features = ctx.saved_tensors
        grad = _logical_output(grad, spec)
        hs, ws = features[spec.layers].shape[-2:]

        def statement(mask, weight_query, weight_support, *features):
            support_mask = None if mask is None else mask.reshape(mask.shape[0], hs, ws)  # at the map's size
            corr = reference.hypercorrelation(features[: spec.layers], features[spec.layers:], support_mask)[0]
            return reference.center_pivot_conv4d(corr, weight_query, None, weight_support, None, spec.stride,
                                                 spec.padding)

        needs = ctx.needs_input_grad
        grad_mask, grad_wq, grad_ws, *grad_features = recomputed_gradients(
            statement, (mask, weight_query, weight_support, *features), grad,
            (needs[1], needs[2], needs[4], *needs[6:]))
        grad_bias = grad.sum(dim=(0, 2, 3, 4, 5))
        return (None, grad_mask, grad_wq, grad_bias if needs[3] and ctx.has_bias[0] else None, grad_ws,
                grad_bias if needs[5] and ctx.has_bias[1] else None, *grad_features)


def _backward_features_and_weights(grad, features, mask, weight_query, weight_support, spec: _Spec,
                                   needs_features: bool, needs_mask: bool, needs_weights: tuple[bool, bool]):
    """Recompute the forward chunk by chunk with local autograd graphs and pull gradients through.

    Leaves of each chunk's graph are the normalized features it reads and the conv weights; their
    gradients are accumulated, then pushed through the O(features) normalization graph (which holds the
    mask) at the end. Returns (gradients of the features, of the resized mask ``[B, Hs*Ws]`` or None,
    of the query conv's weight, of the support conv's weight).
    """
    layers = spec.layers
    batch, _, hq, wq = features[0].shape
    hs, ws = features[layers].shape[-2:]
    hq2, wq2, hs2, ws2 = spec.out_size
    out_channels = weight_query.shape[0]
    grad = grad.to(spec.compute_dtype).reshape(batch, out_channels, hq2 * wq2, hs2 * ws2)
    wq_leaf = weight_query.detach().requires_grad_(needs_weights[0])
    ws_leaf = weight_support.detach().requires_grad_(needs_weights[1])
    grad_wq = torch.zeros_like(weight_query) if needs_weights[0] else None
    grad_ws = torch.zeros_like(weight_support) if needs_weights[1] else None

    # The mask reaches the output only through the normalized support features, so its gradient comes
    # out of the same graph as theirs: the chunks' inputs are differentiated for either.
    needs_inputs = needs_features or needs_mask
    mask_leaf = None if mask is None else mask.detach().requires_grad_(needs_mask)
    with torch.enable_grad():
        leaves = [f.detach().requires_grad_(needs_inputs) for f in features]
        query, support = leaves[:layers], leaves[layers:]
        query_normed, query_finite = _normalized_query(query)
        # Differentiable graph outputs (normalization) and the gradients accumulated for them.
        graph_outputs, graph_grads = [], []
        for b in range(batch):
            mask_b = None if mask_leaf is None else mask_leaf[b]
            with torch.no_grad():
                active = _active_positions(None if mask_b is None else mask_b.detach(),
                                           [s[b].detach().flatten(1) for s in support], query_finite[b])
            support_active = _normalized_active_support([s[b].flatten(1) for s in support], mask_b, active)
            if support_active[0].shape[1] == 0:
                continue
            query_pivots = [_pivot_query(qn[b], spec) for qn in query_normed]
            query_full = [qn[b].flatten(1) for qn in query_normed]
            # With frozen features (HSNet's backbone) only the weights need gradients: the chunks' matrix
            # products are then recomputed but never differentiated.
            s_leaf = [s.detach().requires_grad_(needs_inputs) for s in support_active]
            qp_grad = [torch.zeros_like(q) for q in query_pivots]
            qf_grad = [torch.zeros_like(q) for q in query_full]
            s_grad = [torch.zeros_like(s) for s in support_active]

            windows = _support_windows(active, hs, ws, weight_support.shape[-2:], spec)
            # Their own leaves: a chunk's backward must not run through a graph node shared by all chunks.
            s_windows = s_leaf if windows.columns is None else \
                [s.detach().index_select(1, windows.columns).requires_grad_(needs_inputs) for s in s_leaf]
            sw_grad = s_grad if windows.columns is None else [torch.zeros_like(s) for s in s_windows]
            grad_windows = grad[b].view(out_channels, hq2 * wq2, hs2, ws2)[:, :, windows.rows, windows.cols]
            rows = _chunk_size(layers * windows.grid[0] * windows.grid[1], spec)
            for start in range(0 if not windows.empty else hq2 * wq2, hq2 * wq2, rows):
                chunk = [q.detach()[:, start:start + rows].requires_grad_(needs_inputs) for q in query_pivots]
                part = _support_branch_chunk(chunk, s_windows, windows, ws_leaf, spec)
                if not part.requires_grad:
                    continue
                g = grad_windows[:, start:start + part.shape[0]].transpose(0, 1)
                inputs = (chunk + s_windows if needs_inputs else []) + ([ws_leaf] if needs_weights[1] else [])
                result = torch.autograd.grad(part, inputs, g, allow_unused=True)
                for layer in range(layers if needs_inputs else 0):
                    qp_grad[layer][:, start:start + rows] += result[layer]
                    sw_grad[layer] += result[layers + layer]
                if needs_weights[1]:
                    grad_ws += result[-1]
            if sw_grad is not s_grad and needs_inputs:
                for layer in range(layers):
                    s_grad[layer].index_add_(1, windows.columns, sw_grad[layer])

            columns, out_index = _pivot_columns(active, hs, ws, spec, grad.device)
            q_leaf = [q.detach().requires_grad_(needs_inputs) for q in query_full]
            pivots = _chunk_size(layers * hq * wq + out_channels * hq2 * wq2, spec)
            for start in range(0, columns.numel(), pivots):
                cols = columns[start:start + pivots]
                s_piv = [s.index_select(1, cols) for s in s_leaf]
                part = _query_branch_chunk(q_leaf, s_piv, wq_leaf, spec, hq, wq)
                if not part.requires_grad:
                    continue
                g = grad[b][:, :, out_index[start:start + pivots]].permute(2, 0, 1).reshape(part.shape)
                inputs = (q_leaf + s_leaf if needs_inputs else []) + ([wq_leaf] if needs_weights[0] else [])
                result = torch.autograd.grad(part, inputs, g, allow_unused=True)
                for layer in range(layers if needs_inputs else 0):
                    qf_grad[layer] += result[layer]
                    s_grad[layer] += result[layers + layer]
                if needs_weights[0]:
                    grad_wq += result[-1]
            graph_outputs += query_pivots + query_full + support_active
            graph_grads += qp_grad + qf_grad + s_grad

        inputs = (leaves if needs_features else []) + ([mask_leaf] if needs_mask else [])
        if not inputs:
            grads = []
        elif graph_outputs:
            grads = torch.autograd.grad(graph_outputs, inputs, graph_grads, allow_unused=True)
            grads = [torch.zeros_like(x) if g is None else g for g, x in zip(grads, inputs)]
        else:
            grads = [torch.zeros_like(x) for x in inputs]
    grad_features = list(grads[:len(features)]) if needs_features else [None] * len(features)
    grad_mask = grads[-1] if needs_mask else None
    return grad_features, grad_mask, grad_wq, grad_ws


# --------------------------------------------------------------------------------------------------
# Public functions
# --------------------------------------------------------------------------------------------------

def fused_hypercorrelation_cp_conv4d(
        query_feats: Sequence[torch.Tensor], support_feats: Sequence[torch.Tensor], support_mask: torch.Tensor | None,
        weight_query: torch.Tensor, bias_query: torch.Tensor | None, weight_support: torch.Tensor,
        bias_support: torch.Tensor | None, stride: int | tuple[int, int, int, int] = 1,
        padding: int | tuple[int, int, int, int] | None = None, backend: str | None = None,
        correlation_dtype: torch.dtype | None = None, chunk_elements: int | None = None,
        output_rows: tuple[int, int] | None = None, return_bias_windows: bool = False,
        column_split_share: float | None = None,
) -> torch.Tensor | list[ColumnSplit] | tuple[torch.Tensor | list[ColumnSplit], torch.Tensor | None]:
    """``center_pivot_conv4d(hypercorrelation(query_feats, support_feats, support_mask)[0], ...)``
    without the 4D tensor.

    Args:
        query_feats: the layers of ONE pyramid level, list of ``[B, C_l, Hq, Wq]`` (shallow to deep).
        support_feats: list of ``[B, C_l, Hs, Ws]`` (same length, batch, channels and dtype).
        support_mask: ``[B, H, W]`` (any size; float, int or bool) or None.
        weight_query: ``[Cout, L, KQh, KQw]``; bias_query: ``[Cout]`` or None (``conv1``).
        weight_support: ``[Cout, L, KSh, KSw]``; bias_support: ``[Cout]`` or None (``conv2``).
        stride: int or ``(query h, query w, support h, support w)``.
        padding: int, 4-tuple or None (``kernel // 2``).
        backend: ``"torch"`` (this fused path, any device), ``"reference"`` (dense einsum oracle: builds
            the 4D tensor), ``"triton"`` or None (automatic). ``"triton"`` runs the support-dim
            branch in :mod:`hypertriton.kernels.fused_first_layer` (square support conv, one channel
            count per level; otherwise the fused PyTorch code) and the query-dim branch and the
            backward pass in PyTorch.
        correlation_dtype: opt-in reduced precision (e.g. ``torch.bfloat16``) for the correlation
            matrix products and the ReLU and convolutions over them (which accumulate in fp32);
            normalization and the output stay in the compute dtype. None: the autocast dtype under
            ``torch.autocast``, else the compute dtype (exact path).
        chunk_elements: elements of one working chunk of correlations (None: ``CHUNK_ELEMENTS``, 2^21);
            smaller lowers the peak memory above the output, at some speed.
        output_rows: ``(lo, hi)``: compute only output query rows ``[lo, hi)`` (query stride 1, ``torch``
            backend, no gradient); the other rows are read by the query-dim branch only, so a slab of
            query rows with the kernel's reach on both sides gives its middle rows exactly (what
            :meth:`hypertriton.HPNLearner.squeeze_streamed` does). None: all rows.
        return_bias_windows: also return which support windows hold only the biases (see Returns).
        column_split_share: inference on the ``torch`` backend only (no gradient recorded, all rows): when
            at least this share of the ``B*Hs'*Ws'`` support windows hold only the biases, return the
            output as a list of :class:`hypertriton.ops.layout.ColumnSplit` (one per batch element; those
            windows stored once, as they will be after GroupNorm) instead of the dense tensor. At 400 px
            with a PASCAL-sized object, 27 MB -> 8 MB for ResNet's layer2 level. None: always dense.

    Returns:
        ``[B, Cout, Hq', Wq', Hs', Ws']`` in the features' dtype (also under ``torch.autocast``), equal
        (up to rounding) to the dense computation; stored query-major (:mod:`hypertriton.ops.layout`) on
        the ``torch`` backend. With ``output_rows=(lo, hi)``: ``[B, Cout, hi - lo, Wq', Hs', Ws']``, those
        rows. With ``column_split_share`` reached: a ``list[ColumnSplit]``, one per batch element, instead.
        With ``return_bias_windows``, a pair: that and ``[B, Hs'*Ws']`` bool, True where the support
        window contains no active support position, so that the output there is the biases at every query
        position (None from the reference backend).

    Raises:
        TypeError: as :func:`hypertriton.hypercorrelation` and :func:`hypertriton.center_pivot_conv4d`;
            a ``correlation_dtype`` the backend cannot take.
        ValueError: as those two; layers of more than one pyramid level; an option its backend, grad mode
            or query stride does not allow (named).
        RuntimeError: ``backend="triton"`` where it cannot run; a call under ``torch.func.vmap``.

    Example:
        >>> q = [torch.randn(1, 8, 6, 6) for _ in range(2)]
        >>> s = [torch.randn(1, 8, 6, 6) for _ in range(2)]
        >>> w = torch.randn(4, 2, 3, 3)
        >>> fused_hypercorrelation_cp_conv4d(q, s, torch.ones(1, 24, 24), w, None, w, None, (1, 1, 2, 2)).shape
        torch.Size([1, 4, 6, 6, 3, 3])
    """
    query_feats, support_feats = _one_level(query_feats, support_feats)
    q0, s0 = query_feats[0], support_feats[0]
    layers = len(query_feats)
    device, dtype = q0.device, q0.dtype
    if support_mask is not None:
        check_support_mask(support_mask, q0.shape[0], device)
    refuse_vmap([*query_feats, *support_feats, support_mask])
    stride, padding = check_cp_conv_args(weight_query, bias_query, weight_support, bias_support, stride, padding,
                                         in_channels=layers, anchor=("query_feats[0]", q0),
                                         channels_of=lambda: f"the level has {layers} layers (one input channel "
                                                             "per layer)")
    x_shape = (q0.shape[0], layers, *q0.shape[-2:], *s0.shape[-2:])
    out_size = output_size(x_shape, weight_query.shape[-2:], weight_support.shape[-2:], stride, padding)
    if chunk_elements is not None and (not isinstance(chunk_elements, int) or chunk_elements < 1):
        raise ValueError(f"chunk_elements: expected a positive int or None, got {chunk_elements!r}")
    if correlation_dtype is not None and (not isinstance(correlation_dtype, torch.dtype)
                                          or not correlation_dtype.is_floating_point):
        raise TypeError(f"correlation_dtype: expected a floating torch.dtype or None, got {correlation_dtype!r}")

    name = resolve_backend(backend, device)
    if name == "triton":
        check_triton_dtypes({f"query_feats[{i}]": q for i, q in enumerate(query_feats)})
    row_start = 0
    if output_rows is not None:
        if (not isinstance(output_rows, (tuple, list)) or len(output_rows) != 2
                or not all(isinstance(v, int) and not isinstance(v, bool) for v in output_rows)):
            raise TypeError(f"output_rows: expected a pair of ints (lo, hi), got {output_rows!r}")
        lo, hi = output_rows
        if not (0 <= lo < hi <= out_size[0]) or stride[0] != 1:
            raise ValueError(f"output_rows: expected (lo, hi) with 0 <= lo < hi <= {out_size[0]} (the query "
                             f"height) and query stride 1, got {output_rows!r} with stride {stride[:2]}")
        if name != "torch" or (torch.is_grad_enabled() and any(
                t is not None and t.requires_grad
                for t in (*query_feats, *support_feats, weight_query, bias_query, weight_support, bias_support))):
            raise ValueError(f"output_rows: the torch backend without gradients only (backend {name!r})")
        row_start, out_size = lo, (hi - lo, *out_size[1:])
    if column_split_share is not None and (name != "torch" or torch.is_grad_enabled() or output_rows is not None):
        raise ValueError(f"column_split_share: the torch backend without gradients (under torch.no_grad()) and "
                         f"without output_rows only; got backend {name!r}, grad mode "
                         f"{torch.is_grad_enabled()}, output_rows {output_rows!r}")
    if name == "triton" and correlation_dtype not in (None, torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"correlation_dtype: the triton backend takes float32, float16 or bfloat16, got "
                        f"{correlation_dtype}; use backend='torch' for it")
    if name == "reference":
        if correlation_dtype is not None:
            raise ValueError("correlation_dtype: the reference backend computes in the features' dtype only; "
                             f"got {correlation_dtype}")
        # The oracle computes in the features' dtype, autocast or not (under autocast its einsums would
        # return the autocast dtype without biases to promote them back).
        with autocast_off(device.type):
            cast = [None if t is None else t.to(dtype)
                    for t in (weight_query, bias_query, weight_support, bias_support)]
            out = reference.fused_hypercorrelation_cp_conv4d(query_feats, support_feats, support_mask, *cast, stride,
                                                             padding)
        return (out, None) if return_bias_windows else out

    # Under autocast the correlation products and the convs over them take the autocast dtype (as
    # autocast runs the dense path's matrix products and convs); normalization, accumulation and the
    # output keep the precisions chosen below, so autocast is off inside.
    if correlation_dtype is None and autocast_enabled(device.type):
        correlation_dtype = torch.get_autocast_dtype(device.type)
    if correlation_dtype is not None:
        warn_if_reduced_precision_slow(correlation_dtype, device, "the fused layer's correlation")
    # Half-precision norms and CPU products lose accuracy: normalize, convolve and accumulate in fp32+.
    compute = torch.promote_types(dtype, torch.float32)
    # The kernel covers HSNet's squeeze layers: one channel count per level, square support conv (and
    # something to launch: an empty batch takes the PyTorch path, which gives its empty output).
    use_kernel = (name == "triton" and x_shape[0] > 0 and len({f.shape[1] for f in query_feats}) == 1
                  and stride[2] == stride[3] and padding[2] == padding[3]
                  and weight_support.shape[-1] == weight_support.shape[-2])
    spec = _Spec(layers=layers, stride=stride, padding=padding, out_size=out_size, in_size=x_shape[2:],
                 compute_dtype=compute,
                 correlation_dtype=compute if correlation_dtype is None else correlation_dtype,
                 chunk_elements=chunk_elements or CHUNK_ELEMENTS, triton=use_kernel, row_start=row_start)
    mask = _resized_mask(support_mask, s0, compute)
    cast = [None if t is None else t.to(compute) for t in (weight_query, bias_query, weight_support, bias_support)]
    features = [f.to(compute) for f in (*query_feats, *support_feats)]
    if torch.is_grad_enabled():  # what backward reads is saved, and autograd cannot save inference tensors
        mask, *cast = [t.clone() if t is not None and t.is_inference() else t for t in (mask, *cast)]
        features = [f.clone() if f.is_inference() else f for f in features]
    with autocast_off(device.type):
        if column_split_share is not None:  # inference only, so no autograd Function around it
            raw, bias_only = _forward(features[:layers], features[layers:], mask, *cast, spec, column_split_share)
        else:
            raw, bias_only = _FusedFirstLayer.apply(spec, mask, *cast, *features)
    if isinstance(raw, list):
        for split in raw:
            split.varying, split.first_row = split.varying.to(dtype), split.first_row.to(dtype)
        out = raw
    else:
        out = _logical_output(raw, spec).to(dtype)
    return (out, bias_only) if return_bias_windows else out


def _one_level(query_feats, support_feats) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The feature lists, checked, and refused unless all their layers share one spatial size (one level)."""
    query_feats, support_feats = check_feature_lists(query_feats, support_feats)
    q0, s0 = query_feats[0], support_feats[0]
    for layer, (q, s) in enumerate(zip(query_feats, support_feats)):
        if q.shape[-2:] != q0.shape[-2:] or s.shape[-2:] != s0.shape[-2:]:
            raise ValueError(f"layer {layer}: query {shape_of(q)} / support {shape_of(s)} differ in spatial size "
                             f"from layer 0 ({shape_of(q0)} / {shape_of(s0)}); expected the layers of ONE "
                             "pyramid level")
    return query_feats, support_feats


def fused_hypercorrelation_cp_conv(
        query_feats: Sequence[torch.Tensor], support_feats: Sequence[torch.Tensor], support_mask: torch.Tensor | None,
        conv: torch.nn.Module, backend: str | None = None, correlation_dtype: torch.dtype | None = None,
        chunk_elements: int | None = None, output_rows: tuple[int, int] | None = None,
        return_bias_windows: bool = False, column_split_share: float | None = None,
) -> torch.Tensor | list[ColumnSplit] | tuple[torch.Tensor | list[ColumnSplit], torch.Tensor | None]:
    """``conv(hypercorrelation level)`` for a :class:`hypertriton.CenterPivotConv4d` ``conv``, fused.

    Args:
        query_feats, support_feats: one pyramid level's layers, lists of ``[B, C_l, Hq, Wq]`` and
            ``[B, C_l, Hs, Ws]``.
        support_mask: ``[B, H, W]`` or None.
        conv: a ``CenterPivotConv4d`` (children ``conv1`` over the query dims and ``conv2`` over the
            support dims, attributes ``stride`` and ``padding``) whose ``in_channels`` is the number of
            layers.
        backend: None follows ``conv.backend`` and then the automatic choice.
        correlation_dtype, chunk_elements, output_rows, return_bias_windows, column_split_share: see
            :func:`fused_hypercorrelation_cp_conv4d`.

    Returns:
        ``[B, Cout, Hq', Wq', Hs', Ws']``, what ``conv(hypercorrelation(...)[0])`` returns (the options'
        other forms as :func:`fused_hypercorrelation_cp_conv4d`). A ``conv`` with hooks (on itself,
        ``conv1`` or ``conv2``) is called on the dense hypercorrelation, so that they run; the options are
        then refused.

    Raises:
        TypeError: ``conv`` without ``conv1``, ``conv2``, ``stride`` or ``padding``; else as
            :func:`fused_hypercorrelation_cp_conv4d`.
        ValueError: options given with a hooked ``conv``; else as :func:`fused_hypercorrelation_cp_conv4d`.

    Example:
        >>> from hypertriton import CenterPivotConv4d
        >>> conv = CenterPivotConv4d(3, 16, 3, (1, 1, 2, 2))
        >>> feats = [torch.randn(1, 32, 7, 7) for _ in range(3)]
        >>> fused_hypercorrelation_cp_conv(feats, feats, torch.ones(1, 28, 28), conv).shape
        torch.Size([1, 16, 7, 7, 4, 4])
    """
    for attribute in ("conv1", "conv2", "stride", "padding"):
        if not hasattr(conv, attribute):
            raise TypeError(f"conv: expected a CenterPivotConv4d (with conv1, conv2, stride, padding), got "
                            f"{type(conv).__name__} without {attribute!r}")
    if backend is None:
        backend = getattr(conv, "backend", None)
    if any(isinstance(m, torch.nn.Module) and has_hooks(m) for m in (conv, conv.conv1, conv.conv2)):
        # Hooks run only when the modules are called (weight_norm and its kind recompute a weight there):
        # the dense path, where the conv sees the hypercorrelation as in the original.
        options = dict(correlation_dtype=correlation_dtype, chunk_elements=chunk_elements, output_rows=output_rows,
                       return_bias_windows=return_bias_windows, column_split_share=column_split_share)
        set_options = [name for name, value in options.items() if value not in (None, False)]
        if set_options:
            raise ValueError(f"conv: has hooks, which run only through conv(hypercorrelation(...)[0]), the dense "
                             f"path; it takes none of {set_options}")
        # One level, as the fused path requires: of several, the dense stack's first is the deepest alone.
        query_feats, support_feats = _one_level(query_feats, support_feats)
        return conv(hypercorrelation(query_feats, support_feats, support_mask, backend=backend)[0])
    return fused_hypercorrelation_cp_conv4d(query_feats, support_feats, support_mask, conv.conv1.weight,
                                            conv.conv1.bias, conv.conv2.weight, conv.conv2.bias, conv.stride,
                                            conv.padding, backend=backend, correlation_dtype=correlation_dtype,
                                            chunk_elements=chunk_elements, output_rows=output_rows,
                                            return_bias_windows=return_bias_windows,
                                            column_split_share=column_split_share)
