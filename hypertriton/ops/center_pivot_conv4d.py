"""Center-pivot 4D convolution: a 2D convolution over the query dims at pivot support positions plus a
2D convolution over the support dims at pivot query positions (HSNet's 4D "conv").

:func:`hypertriton.reference.center_pivot_conv4d` is the definition. Backends:

- ``triton``: the custom op ``hypertriton::center_pivot_conv4d`` around
  :func:`hypertriton.kernels.center_pivot_conv4d.center_pivot_conv4d_into` (both branches in one pass),
  with Triton backward kernels;
- ``torch``: a ``conv3d`` for the support branch that writes the output layout directly, plus a
  batched ``conv2d`` on the pivot support positions (a strided view picks them; no index cache, so
  nothing goes stale when the input size changes). A query-major input (:mod:`hypertriton.ops.layout`)
  of more than one channel gives a query-major output (a one-channel input is in both layouts and gives
  the standard one). On that path the support branch is a channels-last ``conv2d`` over the input's own
  memory, or one matrix product for support maps no larger than the kernel; the query branch is a
  channels-last ``conv3d`` over all support positions when the support stride is 1 (HSNet's mixing
  blocks), else a ``conv2d`` on the gathered pivots, added in place.

:func:`center_pivot_conv4d_constant_columns` is the inference form for an input whose support columns
are partly constant over the query dims (a squeeze block's second layer outside the object): it
multiplies only the columns that vary.
"""

from __future__ import annotations

import functools
import math
from typing import Optional

import torch
import torch.nn.functional as F

from .. import reference
from ..backend import being_traced, resolve_backend
from . import cpu_conv
from ._alloc import new_output
from ._autocast import autocast_enabled, autocast_off
from ._second_order import recomputed_gradients
from ._validation import check_cp_conv_args, check_tensor, check_triton_dtypes, shape_of
from .layout import is_query_major, split_constant_columns, to_query_major

__all__ = ["center_pivot_conv4d", "output_size"]


# Elements of one step of the strided query branch's temporaries (fp32: 4 MB).
QUERY_BRANCH_ELEMENTS = 1 << 20


def output_size(x_shape, kernel_query, kernel_support, stride, padding) -> tuple[int, int, int, int]:
    """``(Hq', Wq', Hs', Ws')`` of the output, checking that both branches agree on it.

    The query branch gives conv-sized query dims and one output per pivot support position
    (``ceil(Hs / s)``); the support branch the converse. With odd kernels and padding ``k // 2`` they
    always agree; any other padding is accepted only where they do.
    """
    sizes = []
    for dim, (size, kernel, step, pad) in enumerate(zip(x_shape[2:], (*kernel_query, *kernel_support),
                                                         stride, padding)):
        conv = (size + 2 * pad - kernel) // step + 1
        pivots = math.ceil(size / step)
        if conv != pivots or conv <= 0:
            branch = "query" if dim < 2 else "support"
            axis = ("query h", "query w", "support h", "support w")[dim]
            if size == 0:
                raise ValueError(f"x: the map is empty along {axis} (input shape [{', '.join(map(str, x_shape))}]"
                                 "); expected at least one position on each of the four map dims")
            disagreement = (f"along {axis} (size {size}) the {branch}-dim convolution (kernel {kernel}, "
                            f"stride {step}, padding {pad}) gives {conv} outputs but the other branch gives one "
                            f"per pivot, {pivots}")
            if kernel % 2 == 0:  # even or empty: at stride 1 no padding aligns the two branches
                raise ValueError(f"weight_{branch}: kernel size {kernel} is even; {disagreement}; expected an odd "
                                 "kernel (with padding kernel // 2)")
            raise ValueError(f"padding: {disagreement}; expected padding {kernel // 2}")
        sizes.append(conv)
    return tuple(sizes)


def _cp_conv_torch(x, weight_query, bias_query, weight_support, bias_support, stride, padding):
    if is_query_major(x) and x.shape[1] > 1:
        return _cp_conv_torch_query_major(x, weight_query, bias_query, weight_support, bias_support, stride,
                                          padding)
    batch, channels, hq, wq, hs, ws = x.shape
    sqh, sqw, ssh, ssw = stride
    pqh, pqw, psh, psw = padding

    # Support branch at pivot query positions: a 3D convolution with a (1, k, k) kernel over
    # [B, C, Hq'*Wq', Hs, Ws] slides over the support dims only and writes the output layout directly
    # (no permuted copy of x in, none of the result out).
    pivots = x[:, :, ::sqh, ::sqw]
    hq2, wq2 = pivots.shape[2:4]
    out = F.conv3d(pivots.reshape(batch, channels, hq2 * wq2, hs, ws), weight_support.unsqueeze(2), bias_support,
                   (1, ssh, ssw), (0, psh, psw))
    out_channels, hs2, ws2 = out.shape[1], *out.shape[-2:]
    out = out.view(batch, out_channels, hq2, wq2, hs2, ws2)

    # Query branch at pivot support positions: batched 2D convolutions over [B*Hs'*Ws', C, Hq, Wq]. The
    # pivots are few (1/s^2 of x), so gathering them costs little; a (k, k, 1) 3D kernel here runs
    # slower on CPU than this.
    pivots = x[..., ::ssh, ::ssw]
    query_branch = F.conv2d(pivots.permute(0, 4, 5, 1, 2, 3).reshape(batch * hs2 * ws2, channels, hq, wq),
                            weight_query, bias_query, (sqh, sqw), (pqh, pqw))
    return out.add_(query_branch.view(batch, hs2, ws2, out_channels, hq2, wq2).permute(0, 3, 4, 5, 1, 2))


@functools.lru_cache(maxsize=64)
def _support_taps(hs: int, ws: int, kh: int, kw: int, stride: tuple[int, int], padding: tuple[int, int]) -> torch.Tensor:
    """``[Hs*Ws, Hs'*Ws']`` int64: which kernel tap (``dy*kw + dx``) joins input position ``p`` to output
    position ``t`` of a strided, padded 2D convolution, or ``kh*kw`` (a zero tap) where none does."""
    (sh, sw), (ph, pw) = stride, padding
    hs2, ws2 = (hs + 2 * ph - kh) // sh + 1, (ws + 2 * pw - kw) // sw + 1
    # On the CPU whatever the default device: the cached tensor outlives a `with torch.device(...)` block.
    cpu = torch.device("cpu")
    dy = torch.arange(hs, device=cpu)[:, None] - torch.arange(hs2, device=cpu)[None, :] * sh + ph  # [Hs, Hs']
    dx = torch.arange(ws, device=cpu)[:, None] - torch.arange(ws2, device=cpu)[None, :] * sw + pw  # [Ws, Ws']
    valid = ((dy >= 0) & (dy < kh))[:, None, :, None] & ((dx >= 0) & (dx < kw))[None, :, None, :]
    taps = dy[:, None, :, None] * kw + dx[None, :, None, :]
    return torch.where(valid, taps, torch.full_like(taps, kh * kw)).reshape(hs * ws, hs2 * ws2)


def _geometry(cached_function, *sizes):
    """``cached_function(*sizes)`` (an ``lru_cache`` of index geometry); under ``torch.compile`` the function
    itself, which dynamo traces without its cache-wrapper warning (the sizes are constants there)."""
    if being_traced():
        return cached_function.__wrapped__(*sizes)
    return cached_function(*sizes)


@functools.lru_cache(maxsize=64)
def _every_pair_has_a_tap(hs: int, ws: int, kh: int, kw: int, stride: tuple[int, int],
                          padding: tuple[int, int]) -> bool:
    """Whether :func:`_support_taps` has no zero tap, from the sizes alone (a Python answer keeps
    ``torch.compile`` from branching on tensor data)."""
    (sh, sw), (ph, pw) = stride, padding
    hs2, ws2 = (hs + 2 * ph - kh) // sh + 1, (ws + 2 * pw - kw) // sw + 1
    return (all(0 <= y - t * sh + ph < kh for y in range(hs) for t in range(hs2))
            and all(0 <= x - t * sw + pw < kw for x in range(ws) for t in range(ws2)))


def support_conv_matrix(weight: torch.Tensor, support_size: tuple[int, int], stride, padding) -> torch.Tensor:
    """The support-dim 2D convolution on an ``[Hs, Ws, C]`` map as one matrix ``[Hs*Ws*Cin, Hs'*Ws'*Cout]``
    (rows: input position-major, channel-minor; columns likewise), gathered from ``weight``
    ``[Cout, Cin, kh, kw]`` (differentiable). Worth it when the map is no larger than the kernel (the
    mixing blocks' 2x2 maps under a 3x3 kernel), where the convolution would mostly multiply padding."""
    cout, cin, kh, kw = weight.shape
    taps = _geometry(_support_taps, *support_size, kh, kw, tuple(stride), tuple(padding)).to(weight.device)
    inputs, outputs = taps.shape
    # Tap-major and contiguous (a strided view would make the gather below several times slower).
    table = weight.permute(2, 3, 1, 0).reshape(kh * kw, cin, cout).contiguous()
    blocks = table.index_select(0, taps.clamp(max=kh * kw - 1).flatten())  # [Hs*Ws * Hs'*Ws', Cin, Cout]
    if not _geometry(_every_pair_has_a_tap, *support_size, kh, kw, tuple(stride), tuple(padding)):
        # Pairs no tap joins (beyond the kernel): zero blocks.
        blocks = blocks * (taps < kh * kw).flatten().to(blocks.dtype)[:, None, None]
    return blocks.view(inputs, outputs, cin, cout).permute(0, 2, 1, 3).reshape(inputs * cin, outputs * cout)


def _cp_conv_torch_query_major(x, weight_query, bias_query, weight_support, bias_support, stride, padding):
    """``_cp_conv_torch`` for a query-major ``x`` (see :mod:`hypertriton.ops.layout`); query-major output."""
    batch, channels, hq, wq, hs, ws = x.shape
    sqh, sqw, ssh, ssw = stride
    pqh, pqw, psh, psw = padding
    out_channels, _, ksh, ksw = weight_support.shape
    rows = x.permute(0, 2, 3, 4, 5, 1)[:, ::sqh, ::sqw]  # [B, Hq', Wq', Hs, Ws, C]: pivot query positions
    hq2, wq2 = rows.shape[1:3]
    hs2, ws2 = (hs + 2 * psh - ksh) // ssh + 1, (ws + 2 * psw - ksw) // ssw + 1
    n = batch * hq2 * wq2

    if ssh == ssw == 1 and sqh == sqw == 1 and cpu_conv.nnpack_usable(
            x[:1, :, :, :, 0, 0], weight_query, bias_query, (sqh, sqw), (pqh, pqw), cpu_conv.CP_CONV_MAX_THREADS):
        # Every support position is a pivot, and NNPACK is faster than the 3D convolution below (the
        # mixing blocks' 3x3 query convolutions, see cpu_conv): per batch item, one 2D transpose turns
        # the query-major [Hq*Wq, Hs*Ws*C] memory into Hs*Ws maps [C, Hq, Wq] and one turns their
        # results back (contiguous 2D transposes: several times faster than a 6D permuted copy).
        out = new_output((batch, hq, wq, hs, ws, out_channels), x.dtype, x.device)
        flat_in = x.permute(0, 2, 3, 4, 5, 1).reshape(batch, hq * wq, hs * ws * channels)
        flat_out = out.view(batch, hq * wq, hs * ws, out_channels)
        bias = bias_sum(bias_query, bias_support)
        for item in range(batch):
            maps = flat_in[item].t().contiguous().view(hs * ws, channels, hq, wq)
            for position in range(hs * ws):  # one map's result at a time: the fewest temporaries
                result = cpu_conv.conv2d(maps[position:position + 1], weight_query, bias, 1, (pqh, pqw),
                                         max_threads=cpu_conv.CP_CONV_MAX_THREADS)
                flat_out[item, :, position].copy_(result.view(out_channels, hq * wq).t())
            del maps
        _support_branch(rows, n, weight_support, None, (ssh, ssw), (psh, psw), (hs2, ws2), into=out.view(n, -1))
        return out.permute(0, 5, 1, 2, 3, 4)

    if ssh == ssw == 1:
        # Every support position is a pivot: the query branch is one 3D convolution with a (k, k, 1)
        # kernel over [C, Hq, Wq, Hs*Ws], whose channels-last memory is x's own; its channels-last
        # output is already query-major. It carries both biases; the support branch is added in place.
        volume = x.permute(0, 2, 3, 4, 5, 1).reshape(batch, hq, wq, hs * ws, channels).permute(0, 4, 1, 2, 3)
        out = F.conv3d(volume, weight_query.unsqueeze(-1), bias_sum(bias_query, bias_support),
                       (sqh, sqw, 1), (pqh, pqw, 0))
        out = out.permute(0, 2, 3, 4, 1)  # [B, Hq', Wq', Hs*Ws, Cout]
        if not out.is_contiguous():  # conv3d kept another layout (it does not on CPU)
            out = out.contiguous()
        flat_out = out.view(n, hs2 * ws2 * out_channels)
        _support_branch(rows, n, weight_support, None, (ssh, ssw), (psh, psw), (hs2, ws2), into=flat_out)
        return flat_out.view(batch, hq2, wq2, hs2, ws2, out_channels).permute(0, 5, 1, 2, 3, 4)

    out = _support_branch(rows, n, weight_support, bias_support, (ssh, ssw), (psh, psw), (hs2, ws2))
    out = out.view(batch, hq2, wq2, hs2, ws2, out_channels)

    # Query branch at the pivot support positions (1/s^2 of them): gather them support-major,
    # channels-last conv2d, added in place; a few pivot rows at a time, so that its temporaries stay
    # small beside the output. An explicit gather: a strided view would reach conv2d as an odd layout
    # that it copies far slower.
    pivot_rows = x.permute(0, 4, 5, 2, 3, 1)[:, ::ssh, ::ssw]  # [B, Hs', Ws', Hq, Wq, C]
    step = max(1, QUERY_BRANCH_ELEMENTS // max(1, batch * ws2 * hq * wq * max(channels, out_channels)))
    for start in range(0, hs2, step):
        pivots = pivot_rows[:, start:start + step].contiguous()
        rows_here = pivots.shape[1]
        maps = pivots.view(batch * rows_here * ws2, hq, wq, channels).permute(0, 3, 1, 2)
        query_branch = cpu_conv.conv2d(maps, weight_query, bias_query, (sqh, sqw), (pqh, pqw),
                                       max_threads=cpu_conv.CP_CONV_MAX_THREADS)
        query_branch = query_branch.permute(0, 2, 3, 1).reshape(batch, rows_here, ws2, hq2, wq2, out_channels)
        out[:, :, :, start:start + rows_here].add_(query_branch.permute(0, 3, 4, 1, 2, 5))
    return out.permute(0, 5, 1, 2, 3, 4)


# Below this share of constant support columns the plain path runs (the sparse one's gathers and
# per-window products then cost more than they save).
MIN_CONSTANT_SHARE = 0.3


def center_pivot_conv4d_constant_columns(x, constant, weight_query, bias_query, weight_support, bias_support,
                                         stride, padding):
    """``center_pivot_conv4d`` of a query-major ``x`` whose flagged support columns are constant over the
    query dims: no gradient, query stride 1, query-major output.

    Where a squeeze block's first layer sees no active support position (outside the object) its output
    is the bias at every query position, and after GroupNorm and ReLU one value per channel. The second
    layer then needs products only with the columns that vary:

    - support branch: each output window convolves its varying positions only (one matrix product per
      window over the positions it holds); the constant ones give a per-window constant, computed once
      from one query position's values;
    - query branch at a constant pivot: a convolution of a constant map, which depends on the query
      position only through the kernel's clipping at the borders, so it is computed on a ``k x k`` map
      and spread; at a varying pivot, the usual convolution.

    Args:
        x: query-major ``[B, C, Hq, Wq, Hs, Ws]`` (:mod:`hypertriton.ops.layout`).
        constant: ``[B, Hs*Ws]`` bool: True where ``x[b, :, :, :, hs, ws]`` is the same at every query
            position (the caller vouches for it: flags are not checked against the data).
        weight_query, bias_query, weight_support, bias_support, stride, padding: as
            :func:`center_pivot_conv4d` (stride and padding as 4-tuples).

    Returns:
        ``[B, Cout, Hq, Wq, Hs', Ws']`` query-major, equal to :func:`center_pivot_conv4d` up to rounding.
        Below ``MIN_CONSTANT_SHARE`` constant columns, the plain torch path computes it.
    """
    batch, channels, hq, wq, hs, ws = x.shape
    if tuple(stride[:2]) != (1, 1) or torch.is_grad_enabled() or not is_query_major(x) or \
            tuple(constant.shape) != (batch, hs * ws):
        raise ValueError(f"center_pivot_conv4d_constant_columns: needs a query-major x, query stride 1, no "
                         f"gradient and constant [B, Hs*Ws] = [{batch}, {hs * ws}]; got x {shape_of(x)}, stride "
                         f"{tuple(stride)}, constant {shape_of(constant)}")
    if constant.numel() == 0 or float(constant.float().mean()) < MIN_CONSTANT_SHARE:
        # Through the public op, which casts the weights and follows autocast as the split path does. A
        # one-channel x is in both layouts, and the plain path then writes the standard one.
        return to_query_major(center_pivot_conv4d(x, weight_query, bias_query, weight_support, bias_support,
                                                  stride, padding, backend="torch"))
    return center_pivot_conv4d_split(split_constant_columns(x, constant), weight_query, bias_query, weight_support,
                                     bias_support, stride, padding)


def center_pivot_conv4d_split(splits, weight_query, bias_query, weight_support, bias_support, stride, padding):
    """:func:`center_pivot_conv4d_constant_columns` of an activation already split by columns
    (:class:`hypertriton.ops.layout.ColumnSplit` per batch element, all of one size): what the learner
    passes after normalizing the split form itself."""
    batch, channels, (hq, wq, hs, ws) = len(splits), splits[0].first_row.shape[1], splits[0].size
    shape = (batch, channels, hq, wq, hs, ws)
    _, _, ssh, ssw = stride
    pqh, pqw, psh, psw = padding
    out_channels, _, ksh, ksw = weight_support.shape
    kqh, kqw = weight_query.shape[-2:]
    hs2, ws2 = output_size(shape, (kqh, kqw), (ksh, ksw), stride, padding)[2:]
    device = splits[0].first_row.device
    # Autocast would run the convolutions in its dtype; the products here follow it.
    dtype = torch.get_autocast_dtype(device.type) if autocast_enabled(device.type) else \
        splits[0].first_row.dtype
    weight_query, weight_support = weight_query.to(dtype), weight_support.to(dtype)
    # Each bias in the products' dtype before the sum, as center_pivot_conv4d has it (fp32 biases summed in
    # fp32 were off by fp32's rounding for fp64 features).
    bias = bias_sum(*[None if b is None else b.to(dtype) for b in (bias_query, bias_support)], out_channels,
                    like=weight_query).to(device=device)
    taps = _geometry(_support_taps, hs, ws, ksh, ksw, (ssh, ssw), (psh, psw)).to(device)  # [Hs*Ws, Hs'*Ws']
    tap_table = weight_support.permute(2, 3, 1, 0).reshape(ksh * ksw, channels, out_channels)
    pivot_index = (torch.arange(hs2, device=device)[:, None] * ssh * ws
                   + torch.arange(ws2, device=device)[None, :] * ssw).flatten()  # [Hs'*Ws']: input position
    rows = _clipping_classes(hq, kqh, pqh, device)
    cols = _clipping_classes(wq, kqw, pqw, device)

    out = new_output((batch, hq * wq, hs2 * ws2, out_channels), dtype, device)
    with autocast_off(device.type):
        for item, split in enumerate(splits):
            values, first_row, fixed = split.varying.to(dtype), split.first_row.to(dtype), split.is_constant
            # The constant columns' share of the support branch, biases included: one query position's.
            constant_map = torch.where(fixed[:, None], first_row, torch.zeros((), dtype=dtype, device=device))
            per_window = F.conv2d(constant_map.t().reshape(1, channels, hs, ws), weight_support, bias,
                                  (ssh, ssw), (psh, psw))
            out_item = out[item]
            _fill_rows(out_item.view(hq * wq, -1), per_window.view(out_channels, hs2 * ws2).t().flatten())
            varying_taps = taps[split.varying_index]  # [V, Hs'*Ws']
            for window in range(hs2 * ws2):
                inside = (varying_taps[:, window] < ksh * ksw).nonzero().flatten()  # indices into the varying
                if inside.numel():
                    stacked = tap_table.index_select(0, varying_taps[inside, window]).reshape(-1, out_channels)
                    out_item[:, window].addmm_(values.index_select(1, inside).reshape(hq * wq, -1), stacked)

            pivot_fixed = fixed[pivot_index]
            moving = (~pivot_fixed).nonzero().flatten()
            if moving.numel():
                local = torch.searchsorted(split.varying_index, pivot_index[moving])  # their varying column
                maps = values.index_select(1, local).permute(1, 2, 0).reshape(-1, channels, hq, wq)
                query_branch = cpu_conv.conv2d(maps, weight_query, None, 1, (pqh, pqw),
                                               max_threads=cpu_conv.CP_CONV_MAX_THREADS)  # [P, Cout, Hq, Wq]
                # One pivot at a time (index_add_ over all of them runs several times slower).
                for result, window in zip(query_branch, moving.tolist()):
                    out_item[:, window].add_(result.view(out_channels, hq * wq).t())
            still = pivot_fixed.nonzero().flatten()
            if still.numel():
                # A constant map's convolution differs between query positions only by which taps the
                # borders clip: computed on a map of at most k x k (every clipping class), then spread.
                small = first_row[pivot_index[still]][:, :, None, None].expand(-1, -1, rows[1], cols[1])
                small = F.conv2d(small, weight_query, None, 1, (pqh, pqw)).permute(2, 3, 0, 1).contiguous()
                grid = out_item.view(hq, wq, hs2 * ws2, out_channels)
                for index, window in enumerate(still.tolist()):
                    grid[:, :, window].add_(small[:, :, index].index_select(0, rows[0]).index_select(1, cols[0]))
    return out.view(batch, hq, wq, hs2, ws2, out_channels).permute(0, 5, 1, 2, 3, 4)


def _fill_rows(rows: torch.Tensor, row: torch.Tensor) -> None:
    """Every row of the contiguous 2D ``rows`` set to ``row``: by doubling contiguous copies (a copy
    from a broadcast source runs several times slower)."""
    rows[0].copy_(row)
    done = 1
    while done < rows.shape[0]:
        step = min(done, rows.shape[0] - done)
        rows[done:done + step].copy_(rows[:step])
        done += step


def _clipping_classes(size: int, kernel: int, pad: int, device) -> tuple[torch.Tensor, int]:
    """For a stride-1 convolution (padding ``(k - 1) / 2``) of a constant map of length ``size``: the
    length ``m = min(size, k)`` of a map with every clipping class, and for each of the ``size`` output
    positions its class ``[size]`` in that map (the first ``pad``, the interior, the last ``pad``)."""
    small = min(size, kernel)
    index = torch.arange(size, device=device)
    interior = (index >= pad) & (index <= size - 1 - pad)
    mapped = torch.where(index < pad, index, index - (size - small))
    return torch.where(interior, torch.full_like(index, pad), mapped), small


def bias_sum(bias_query, bias_support, out_channels: int | None = None, like: torch.Tensor | None = None):
    """``bias_query + bias_support`` ``[Cout]``: both reach every output of a center-pivot conv. A missing
    one counts as zero; when both are missing, None, or zeros of ``out_channels`` when given (on ``like``'s
    device and in its dtype: a CPU tensor would be copied to the GPU, a synchronizing copy)."""
    present = [b for b in (bias_query, bias_support) if b is not None]
    if not present:
        if out_channels is None:
            return None
        return torch.zeros(out_channels, device="cpu") if like is None else like.new_zeros(out_channels)
    return present[0] if len(present) == 1 else present[0] + present[1]


def _support_branch(rows, n, weight_support, bias_support, stride, padding, out_size, into=None):
    """The support branch over ``rows`` ``[B, Hq', Wq', Hs, Ws, C]`` (``n = B*Hq'*Wq'`` maps ``[Hs, Ws, C]``,
    already channels-last in memory) as ``[n, Hs'*Ws'*Cout]`` (position-major, channel-minor;
    ``out_size = (Hs', Ws')``): one matrix product when the map is no larger than the kernel; one per
    output and kernel row when it has at most ``MAX_TAP_PRODUCT_OUTPUTS`` outputs and nothing needs a
    gradient; else a channels-last ``conv2d``. With ``into`` (a tensor of that shape) it is added there in
    place and ``into`` is returned."""
    batch, hq2, wq2, hs, ws, channels = rows.shape
    out_channels, _, ksh, ksw = weight_support.shape
    hs2, ws2 = out_size
    recording = torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                                for t in (rows, weight_support, bias_support, into))
    if hs * ws > ksh * ksw and hs2 * ws2 <= MAX_TAP_PRODUCT_OUTPUTS and not recording and rows.is_contiguous():
        return _support_branch_by_taps(rows.view(n, hs, ws * channels), weight_support, bias_support, stride,
                                       padding, (hs2, ws2), into)
    if hs * ws <= ksh * ksw:
        matrix = support_conv_matrix(weight_support, (hs, ws), stride, padding)
        flat = rows.reshape(n, hs * ws * channels)
        if into is not None:
            return into.addmm_(flat, matrix)
        if bias_support is None:
            return flat @ matrix
        return torch.addmm(bias_support.repeat(matrix.shape[1] // out_channels), flat, matrix)
    maps = rows.reshape(n, hs, ws, channels).permute(0, 3, 1, 2)
    support = F.conv2d(maps, weight_support, bias_support, stride, padding)  # channels-last [n, Hs', Ws', Cout]
    support = support.permute(0, 2, 3, 1).reshape(n, support.shape[1] * support.shape[2] * support.shape[3])
    return support if into is None else into.add_(support)


# Support maps with at most this many outputs per query position (the squeeze blocks' last layers, 4x4 ->
# 2x2) take one matrix product per output and kernel row (_support_branch_by_taps).
MAX_TAP_PRODUCT_OUTPUTS = 4


def _support_branch_by_taps(flat, weight, bias, stride, padding, out_size, into=None):
    """:func:`_support_branch` of ``flat`` ``[n, Hs, Ws*C]`` (channels-last maps, contiguous) as one matrix
    product per output position and kernel row, over the input columns that row reaches: no product with
    padding. The squeeze blocks' last layers (4x4 maps, 3x3 kernel, stride 2, 2x2 outputs) multiply
    padding in 11 of the 36 taps a convolution computes (1.5x its work); here 25, at the GEMM's
    rate (15.1 -> 12.9 ms at ResNet-50's 400-px layer2 level, AMD EPYC VM). Not differentiable (``out=``
    products): for inputs that need no gradient. Returns ``[n, Hs'*Ws'*Cout]`` (``into`` plus it, in
    place, when given)."""
    n, hs, _ = flat.shape
    out_channels, channels, kh, kw = weight.shape
    ws = flat.shape[2] // channels
    (sh, sw), (ph, pw), (hs2, ws2) = stride, padding, out_size
    out = new_output((n, hs2 * ws2 * out_channels), flat.dtype, flat.device) if into is None else into
    grid = out.view(n, hs2, ws2, out_channels)
    table = weight.permute(2, 3, 1, 0)  # [kh, kw, C, Cout]: a kernel row's taps over adjacent columns
    for oy in range(hs2):
        for ox in range(ws2):
            target = grid[:, oy, ox]  # [n, Cout], rows strided: the products write it directly
            left = ox * sw - pw
            first_tap, last_tap = max(0, -left), min(kw, ws - left)
            fresh = into is None
            for ky in range(kh):
                row = oy * sh - ph + ky
                if not 0 <= row < hs or first_tap >= last_tap:
                    continue
                columns = flat[:, row, (left + first_tap) * channels:(left + last_tap) * channels]
                taps = table[ky, first_tap:last_tap].reshape(-1, out_channels)
                if fresh:
                    if bias is None:
                        torch.mm(columns, taps, out=target)
                    else:
                        torch.addmm(bias, columns, taps, out=target)
                    fresh = False
                else:
                    target.addmm_(columns, taps)
            if fresh and bias is not None:  # the window reaches no input position
                target.copy_(bias.expand_as(target))
            elif fresh:
                target.zero_()
    return out


@torch.library.custom_op("hypertriton::center_pivot_conv4d", mutates_args=())
def center_pivot_conv4d_triton(x: torch.Tensor, weight_query: torch.Tensor, bias_query: Optional[torch.Tensor],
                               weight_support: torch.Tensor, bias_support: Optional[torch.Tensor],
                               stride: list[int], padding: list[int]) -> torch.Tensor:
    """Triton: both branches in one kernel, ``[B, Cin, Hq, Wq, Hs, Ws] -> [B, Cout, Hq', Wq', Hs', Ws']``."""
    from ..kernels.center_pivot_conv4d import center_pivot_conv4d_into

    sizes = output_size(x.shape, weight_query.shape[-2:], weight_support.shape[-2:], stride, padding)
    out = new_output((x.shape[0], weight_query.shape[0], *sizes), x.dtype, x.device)
    return center_pivot_conv4d_into(x, weight_query, bias_query, weight_support, bias_support, tuple(stride),
                                    tuple(padding), out)


@center_pivot_conv4d_triton.register_fake
def _(x, weight_query, bias_query, weight_support, bias_support, stride, padding):
    sizes = output_size(x.shape, weight_query.shape[-2:], weight_support.shape[-2:], stride, padding)
    return x.new_empty((x.shape[0], weight_query.shape[0], *sizes))


def _cp_conv_setup(ctx, inputs, output):
    x, weight_query, bias_query, weight_support, bias_support, stride, padding = inputs
    ctx.save_for_backward(x, weight_query, weight_support)
    ctx.stride, ctx.padding = tuple(stride), tuple(padding)
    ctx.has_bias = (bias_query is not None, bias_support is not None)


@torch.library.custom_op("hypertriton::center_pivot_conv4d_backward", mutates_args=())
def center_pivot_conv4d_backward_triton(grad: torch.Tensor, x: torch.Tensor, weight_query: torch.Tensor,
                                        weight_support: torch.Tensor, stride: list[int], padding: list[int],
                                        needs: list[bool]) -> list[torch.Tensor]:
    """Triton backward: ``[grad_x, grad_wq, grad_bq, grad_ws, grad_bs]``, empty tensors where not needed
    (a custom op cannot return None)."""
    from ..kernels.center_pivot_conv4d import center_pivot_conv4d_backward

    grads = center_pivot_conv4d_backward(grad, x, weight_query, weight_support, tuple(stride), tuple(padding),
                                         tuple(needs))
    return [x.new_empty(0) if g is None else g for g in grads]


@center_pivot_conv4d_backward_triton.register_fake
def _(grad, x, weight_query, weight_support, stride, padding, needs):
    like = (x, weight_query, weight_query[:, 0, 0, 0], weight_support, weight_support[:, 0, 0, 0])
    return [t.new_empty(t.shape) if need else x.new_empty(0) for t, need in zip(like, needs)]


def _cp_conv_backward(ctx, grad):
    x, weight_query, weight_support = ctx.saved_tensors
    if torch.is_grad_enabled():  # create_graph=True or torch.func: see _second_order
        def statement(x, weight_query, weight_support):
            return reference.center_pivot_conv4d(x, weight_query, None, weight_support, None, ctx.stride, ctx.padding)

        needs = ctx.needs_input_grad
        grad_x, grad_wq, grad_ws = recomputed_gradients(statement, (x, weight_query, weight_support), grad,
                                                        (needs[0], needs[1], needs[3]))
        grad_bias = grad.sum(dim=(0, 2, 3, 4, 5))
        return (grad_x, grad_wq, grad_bias if needs[2] and ctx.has_bias[0] else None, grad_ws,
                grad_bias if needs[4] and ctx.has_bias[1] else None, None, None)
    needs = list(ctx.needs_input_grad[:5])
    needs[2] = needs[2] and ctx.has_bias[0]
    needs[4] = needs[4] and ctx.has_bias[1]
    grads = center_pivot_conv4d_backward_triton(grad, x, weight_query, weight_support, list(ctx.stride),
                                                list(ctx.padding), needs)
    return (*[g if need else None for g, need in zip(grads, needs)], None, None)


center_pivot_conv4d_triton.register_autograd(_cp_conv_backward, setup_context=_cp_conv_setup)


def center_pivot_conv4d(x: torch.Tensor, weight_query: torch.Tensor, bias_query: torch.Tensor | None,
                        weight_support: torch.Tensor, bias_support: torch.Tensor | None,
                        stride: int | tuple[int, int, int, int] = 1,
                        padding: int | tuple[int, int, int, int] | None = None,
                        backend: str | None = None) -> torch.Tensor:
    """Center-pivot 4D convolution.

    Output position ``(i, j, u, v)`` pivots on input position ``(i*sqh, j*sqw, u*ssh, v*ssw)``. The query
    branch convolves ``weight_query`` over the query dims at the pivot's support position (the original's
    pruned support positions ``0, s, 2s, ...``); the support branch convolves ``weight_support`` over
    the support dims at the pivot's query position. Both biases are added. With query stride 1 (as in
    HSNet) this is exactly the original ``CenterPivotConv4d``.

    Args:
        x: ``[B, Cin, Hq, Wq, Hs, Ws]`` floating tensor (any strides).
        weight_query: ``[Cout, Cin, KQh, KQw]``; bias_query: ``[Cout]`` or None.
        weight_support: ``[Cout, Cin, KSh, KSw]``; bias_support: ``[Cout]`` or None.
        stride: int or ``(query h, query w, support h, support w)``.
        padding: int, 4-tuple, or None for ``kernel // 2`` on every dim. Other paddings are accepted only
            where both branches produce the same output size.
        backend: ``"triton"``, ``"torch"``, ``"reference"`` or None (automatic).

    Returns:
        ``[B, Cout, ceil(Hq/sqh), ceil(Wq/sqw), ceil(Hs/ssh), ceil(Ws/ssw)]`` in ``x``'s dtype (weights
        are cast to it); under ``torch.autocast``, as a convolution layer, in the autocast dtype (``x``
        and the weights cast to it) on every backend.

    Raises:
        TypeError: ``x`` or a weight that is not a floating tensor, or float64 on the triton backend.
        ValueError: a shape, channel count, even kernel, stride or padding that does not fit (named, with
            the shapes received and expected); an unknown backend.
        RuntimeError: ``backend="triton"`` where it cannot run.

    Example:
        >>> x = torch.randn(1, 4, 5, 5, 6, 6)
        >>> wq, ws = torch.randn(8, 4, 3, 3), torch.randn(8, 4, 3, 3)
        >>> center_pivot_conv4d(x, wq, None, ws, None, stride=(1, 1, 2, 2)).shape
        torch.Size([1, 8, 5, 5, 3, 3])
    """
    check_tensor(x, "x", 6, "[B, Cin, Hq, Wq, Hs, Ws]")
    stride, padding = check_cp_conv_args(weight_query, bias_query, weight_support, bias_support, stride, padding,
                                         in_channels=x.shape[1], anchor=("x", x),
                                         channels_of=lambda: f"x has {x.shape[1]} (shape {shape_of(x)})")
    output_size(x.shape, weight_query.shape[-2:], weight_support.shape[-2:], stride, padding)

    # Like an nn.Module called on another dtype: the input's dtype decides; under autocast, as a conv
    # would, the autocast dtype (the Triton kernels do not follow autocast by themselves).
    if autocast_enabled(x.device.type) and x.dtype != torch.float64:  # autocast leaves fp64 alone
        x = x.to(torch.get_autocast_dtype(x.device.type))
    weight_query, weight_support = weight_query.to(x.dtype), weight_support.to(x.dtype)
    bias_query = None if bias_query is None else bias_query.to(x.dtype)
    bias_support = None if bias_support is None else bias_support.to(x.dtype)

    name = resolve_backend(backend, x.device)
    if name == "triton":
        check_triton_dtypes({"x": x})
    if name == "reference":
        return reference.center_pivot_conv4d(x, weight_query, bias_query, weight_support, bias_support, stride,
                                             padding)
    if name == "triton":
        return center_pivot_conv4d_triton(x, weight_query, bias_query, weight_support, bias_support, list(stride),
                                          list(padding))
    return _cp_conv_torch(x, weight_query, bias_query, weight_support, bias_support, stride, padding)
