"""The query-major memory layout of 4D activations, and layout-preserving GroupNorm and resizing.

A 4D activation is logically ``[B, C, Hq, Wq, Hs, Ws]``. *Query-major* stores it as
``[B, Hq, Wq, Hs, Ws, C]`` (channels innermost: a "channels-last" 6D tensor, i.e.
``x.permute(0, 2, 3, 4, 5, 1)`` is contiguous); the logical shape and every value are unchanged.

Why the ``torch`` backend keeps HSNet's learner in this layout after each squeeze block's first layer:

- the support branch of a center-pivot convolution is a batch of ``Hq*Wq`` small 2D convolutions over
  ``[Hs, Ws, C]`` maps, which is exactly a channels-last ``conv2d`` over that memory, or, for the 2x2
  support maps of the mixing blocks, one matrix product (no copy in or out);
- the query branch reads the pivot support positions: one small gather, then a channels-last
  ``conv2d``;
- GroupNorm and bilinear resizing run on views of the same memory.

The original permutes the whole tensor twice inside every 4D convolution.

*Column split* (:class:`ColumnSplit`): a query-major activation whose support columns are partly
constant over the query dims (a squeeze block's first layer outside the object, see
:func:`hypertriton.ops.center_pivot_conv4d.center_pivot_conv4d_constant_columns`), stored without the
repeats: the varying columns whole, the constant ones as one query position's values.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ._alloc import new_output
from ._autocast import autocast_enabled
from ._second_order import recomputed_gradients

__all__ = ["is_query_major", "to_query_major", "empty_query_major", "group_norm", "resize_query_dims",
           "channel_moments", "merge_moments", "group_affine", "query_major_moments", "normalize_query_major",
           "autocast_output_dtype", "ColumnSplit", "split_constant_columns", "group_norm_split"]


def is_query_major(x: torch.Tensor) -> bool:
    """Whether ``[B, C, Hq, Wq, Hs, Ws]`` ``x`` is stored as a contiguous ``[B, Hq, Wq, Hs, Ws, C]``."""
    return x.dim() == 6 and x.permute(0, 2, 3, 4, 5, 1).is_contiguous()


def to_query_major(x: torch.Tensor) -> torch.Tensor:
    """``x`` ``[B, C, Hq, Wq, Hs, Ws]`` in the query-major layout (``x`` itself when it already is)."""
    if is_query_major(x):
        return x
    return x.permute(0, 2, 3, 4, 5, 1).contiguous().permute(0, 5, 1, 2, 3, 4)


def empty_query_major(shape, dtype: torch.dtype, device) -> torch.Tensor:
    """An uninitialized ``[B, C, Hq, Wq, Hs, Ws]`` tensor in the query-major layout."""
    b, c, hq, wq, hs, ws = shape
    return new_output((b, hq, wq, hs, ws, c), dtype, device).permute(0, 5, 1, 2, 3, 4)


def _channels_last_rows(x: torch.Tensor) -> torch.Tensor:
    """``[B, C, ...]`` whose channels are innermost in memory as a ``[B, N, C]`` view."""
    return x.movedim(1, -1).reshape(x.shape[0], -1, x.shape[1])


def _wide(rows: torch.Tensor) -> tuple[torch.Tensor, int]:
    """``[B, N, C]`` as ``[B, N/k, k*C]`` (and ``k``) with ``k*C >= 128`` where ``N`` allows: per-channel
    broadcasts over a 16-wide inner dim vectorize poorly; over whole cache lines they run at full speed."""
    batch, count, channels = rows.shape
    k = 1
    while k * channels < 128 and count % (2 * k) == 0:
        k *= 2
    return rows.view(batch, count // k, k * channels), k


def _tile(per_channel: torch.Tensor, k: int) -> torch.Tensor:
    """``[B, C]`` -> ``[B, 1, k*C]`` matching :func:`_wide`."""
    return per_channel.repeat(1, k).unsqueeze(1)


# Elements per chunk of the variance pass: the temporary (x - mean) stays in cache.
_VARIANCE_CHUNK = 1 << 16


def channel_moments(rows: torch.Tensor) -> tuple[int, torch.Tensor, torch.Tensor]:
    """``(count, mean, m2)`` per channel of ``[B, N, C]`` rows: ``N``, the means ``[B, C]`` and the sums of
    squared deviations from them ``[B, C]`` (accumulation dtype).

    Two-pass (means first, then squared deviations), because the one-pass ``E[x^2] - E[x]^2`` loses
    most of its digits in fp32 when a channel holds millions of values with a mean far from zero."""
    batch, count, channels = rows.shape
    acc = torch.promote_types(rows.dtype, torch.float32)
    wide, k = _wide(rows)
    step = max(1, _VARIANCE_CHUNK // wide.shape[2])
    if rows.dtype == acc:
        sums = wide.sum(dim=1)
    else:  # in cache-sized chunks: a whole-tensor sum with dtype= would first copy all of it to acc
        sums = torch.zeros(batch, wide.shape[2], dtype=acc, device=rows.device)
        for start in range(0, wide.shape[1], step):
            sums += wide[:, start:start + step].sum(dim=1, dtype=acc)
    mean_c = sums.view(batch, k, channels).sum(dim=1) / count  # [B, C]
    mean_wide = _tile(mean_c, k)
    centered_sq = torch.zeros_like(mean_wide)
    for start in range(0, wide.shape[1], step):
        part = wide[:, start:start + step] - mean_wide  # promoted to acc on the fly
        centered_sq += (part * part).sum(dim=1, keepdim=True)
    return count, mean_c, centered_sq.view(batch, k, channels).sum(dim=1)


def merge_moments(first, second) -> tuple[int, torch.Tensor, torch.Tensor]:
    """The :func:`channel_moments` of two sets of rows together (Chan et al.'s pairwise update; exact up to
    rounding, no cancellation). Either may be None."""
    if first is None or second is None:
        return second if first is None else first
    (n_a, mean_a, m2_a), (n_b, mean_b, m2_b) = first, second
    total = n_a + n_b
    delta = mean_b - mean_a
    return total, mean_a + delta * (n_b / total), m2_a + m2_b + delta * delta * (n_a * n_b / total)


def group_affine(moments, groups: int, weight, bias, eps: float):
    """GroupNorm from per-channel :func:`channel_moments`: per-group mean and 1/std ``[B, G, 1]``, the affine
    weight ``gamma`` ``[C]`` (ones when None) and the per-channel ``shift``/``scale`` ``[B, C]`` with
    ``normalized = rows * scale + shift``."""
    count, mean_c, m2_c = moments
    batch, channels = mean_c.shape
    per_group = channels // groups
    acc, device = mean_c.dtype, mean_c.device
    mean_cg = mean_c.view(batch, groups, per_group)
    mean_g = mean_cg.mean(dim=2, keepdim=True)  # [B, G, 1]
    # Law of total variance over the channels of a group (exact, no cancellation).
    var_g = (m2_c.view(batch, groups, per_group) / count + (mean_cg - mean_g) ** 2).mean(dim=2, keepdim=True)
    rstd_g = torch.rsqrt(var_g + eps)
    gamma = torch.ones(channels, dtype=acc, device=device) if weight is None else weight.to(acc)
    beta = torch.zeros(channels, dtype=acc, device=device) if bias is None else bias.to(acc)
    scale = (rstd_g * gamma.view(1, groups, per_group)).view(batch, channels)
    shift = beta.view(1, channels) - (mean_g * rstd_g * gamma.view(1, groups, per_group)).view(batch, channels)
    return mean_g, rstd_g, gamma, shift, scale


def _group_statistics(rows: torch.Tensor, groups: int, weight, bias, eps: float):
    """:func:`group_affine` of ``[B, N, C]`` rows."""
    return group_affine(channel_moments(rows), groups, weight, bias, eps)


def _affine(const: torch.Tensor, *terms, out: torch.Tensor | None = None, relu: bool = False) -> torch.Tensor:
    """``const + sum(x * coef for x, coef in terms)`` (then ReLU if ``relu``) with per-channel ``const`` and
    ``coef`` ``[B, C]`` (accumulation dtype) and ``x`` ``[B, N, C]`` rows, into ``out`` (any dtype; may be
    the first term's ``x``; None: a new tensor of the rows' dtype).

    Computed in the accumulation dtype and rounded once: in bf16 itself, ``x * scale + shift`` would
    cancel most of its digits when the mean is far from 0. Other dtypes and the ReLU take cache-sized
    chunks, so each element goes through memory once."""
    first = terms[0][0]
    out = torch.empty_like(first) if out is None else out
    wide, k = _wide(out)
    const_w, terms_w = _tile(const, k), [(x.reshape(wide.shape), _tile(coef, k)) for x, coef in terms]
    small = wide.numel() <= 4 * _VARIANCE_CHUNK  # a few chunks: whole-tensor ops cost fewer calls
    if out.dtype == const.dtype and all(x.dtype == const.dtype for x, _ in terms) and (small or not relu):
        (x, coef), *rest = terms_w
        torch.addcmul(const_w, x, coef, out=wide)
        for x, coef in rest:
            wide.addcmul_(x, coef)
        if relu:
            wide.clamp_min_(0)
        return out
    step = max(1, _VARIANCE_CHUNK // wide.shape[2])
    direct = out.dtype == const.dtype  # accumulate in out itself: no temporary
    for start in range(0, wide.shape[1], step):
        (x, coef), *rest = terms_w
        target = wide[:, start:start + step]
        part = torch.addcmul(const_w, x[:, start:start + step], coef, out=target if direct else None)
        for x, coef in rest:
            part.addcmul_(x[:, start:start + step], coef)
        if relu:
            part.clamp_min_(0)
        if not direct:
            target.copy_(part)
    return out


def _normalize_into(rows: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, out: torch.Tensor,
                    relu: bool = False) -> None:
    """``out = rows * scale + shift`` per channel, then ReLU if ``relu`` (``out`` may be ``rows`` itself)."""
    _affine(shift, (rows, scale), out=out, relu=relu)


class _GroupNormChannelsLast(torch.autograd.Function):
    """GroupNorm over ``[B, N, C]`` rows (channels innermost), with an explicit backward that saves only
    the input and the per-group statistics (autograd through the elementwise ops would keep temporaries
    of the input's size)."""

    # forward/setup_context apart (not forward(ctx, ...)): torch.func transforms (grad, vjp) need it.
    @staticmethod
    def forward(rows, groups: int, weight, bias, eps: float, out_dtype: torch.dtype):
        """The normalized rows, and the per-group statistics ``[B, G, 1]`` that backward reuses."""
        mean_g, rstd_g, _, shift, scale = _group_statistics(rows, groups, weight, bias, eps)
        # Written through a view into a fresh tensor that is returned itself: a custom Function must not
        # return a view (the ReLU after it runs in place).
        out = torch.empty_like(rows, dtype=out_dtype)
        _normalize_into(rows, shift, scale, out)
        return out, mean_g, rstd_g

    @staticmethod
    def setup_context(ctx, inputs, output):
        rows, groups, weight, bias, eps, _ = inputs
        _, mean_g, rstd_g = output
        ctx.mark_non_differentiable(mean_g, rstd_g)
        ctx.save_for_backward(rows, mean_g, rstd_g, weight, bias)
        ctx.groups, ctx.eps, ctx.has_affine = groups, eps, (weight is not None, bias is not None)
        ctx.param_dtypes = tuple(None if p is None else p.dtype for p in (weight, bias))

    @staticmethod
    def backward(ctx, grad, _grad_mean, _grad_rstd):
        if torch.is_grad_enabled():  # create_graph=True: the gradients must be differentiable themselves
            return _GroupNormChannelsLast._differentiable_backward(ctx, grad)
        rows, mean_g, rstd_g, weight, _ = ctx.saved_tensors
        groups = ctx.groups
        batch, count, channels = rows.shape
        per_group = channels // groups
        acc = mean_g.dtype
        gamma = torch.ones(channels, dtype=acc, device=rows.device) if weight is None else weight.to(acc)
        wide, k = _wide(rows)
        grad_wide = grad.reshape(wide.shape)
        sum_dy = grad_wide.sum(dim=1, dtype=acc).view(batch, k, channels).sum(dim=1)  # [B, C]
        sum_dy_x = torch.zeros(batch, 1, wide.shape[2], dtype=acc, device=rows.device)
        step = max(1, _VARIANCE_CHUNK // wide.shape[2])
        for start in range(0, wide.shape[1], step):  # cache-sized chunks, as the variance pass
            sum_dy_x += (grad_wide[:, start:start + step].to(acc) * wide[:, start:start + step]).sum(dim=1, keepdim=True)
        sum_dy_x = sum_dy_x.view(batch, k, channels).sum(dim=1)
        mean_gc = mean_g.expand(batch, groups, per_group).reshape(batch, channels)
        rstd_gc = rstd_g.expand(batch, groups, per_group).reshape(batch, channels)
        dy_xhat_c = (sum_dy_x - mean_gc * sum_dy) * rstd_gc  # [B, C]: sum over positions of dy * xhat
        n = count * per_group
        a_g = (gamma * sum_dy).view(batch, groups, per_group).sum(dim=2, keepdim=True) / n  # mean(dy*gamma)
        b_g = (gamma * dy_xhat_c).view(batch, groups, per_group).sum(dim=2, keepdim=True) / n  # mean(dy*gamma*xhat)
        # dx = rstd * (dy*gamma - a - xhat * b), with xhat = (x - mean) * rstd
        coef_dy = (rstd_g * gamma.view(1, groups, per_group)).view(batch, channels)
        coef_x = (-(rstd_g * rstd_g) * b_g).expand(batch, groups, per_group).reshape(batch, channels)
        const = (rstd_g * (-a_g + mean_g * rstd_g * b_g)).expand(batch, groups, per_group).reshape(batch, channels)
        grad_rows = _affine(const, (rows, coef_x), (grad.reshape(rows.shape), coef_dy))
        grad_weight = dy_xhat_c.sum(dim=0).to(ctx.param_dtypes[0]) if ctx.has_affine[0] else None
        grad_bias = sum_dy.sum(dim=0).to(ctx.param_dtypes[1]) if ctx.has_affine[1] else None
        return grad_rows, None, grad_weight, grad_bias, None, None

    @staticmethod
    def _differentiable_backward(ctx, grad):
        """Under ``create_graph=True``: through ``F.group_norm`` (see :mod:`hypertriton.ops._second_order`)."""
        rows, mean_g, _, weight, bias = ctx.saved_tensors
        acc = mean_g.dtype

        def statement(rows, weight, bias):
            cast = [None if p is None else p.to(acc) for p in (weight, bias)]
            out = F.group_norm(rows.to(acc).transpose(1, 2), ctx.groups, *cast, ctx.eps)
            return out.transpose(1, 2).to(grad.dtype)

        grad_rows, grad_weight, grad_bias = recomputed_gradients(
            statement, (rows, weight, bias), grad, (ctx.needs_input_grad[0], *ctx.needs_input_grad[2:4]))
        return grad_rows, None, grad_weight, grad_bias, None, None


def group_norm(x: torch.Tensor, groups: int, weight: torch.Tensor | None = None, bias: torch.Tensor | None = None,
               eps: float = 1e-5, inplace: bool = False, out_dtype: torch.dtype | None = None,
               relu: bool = False) -> torch.Tensor:
    """``F.group_norm`` that keeps ``x``'s layout: a query-major ``[B, C, Hq, Wq, Hs, Ws]`` comes back
    query-major (``F.group_norm`` would return a contiguous copy); any other input goes to
    ``F.group_norm``.

    ``inplace=True`` lets a query-major ``x`` be overwritten with the result when no gradient is being
    recorded (inference), saving one activation-sized buffer; otherwise it is ignored.
    ``out_dtype``: a query-major result is rounded to it once at the end (statistics and arithmetic stay
    in fp32 or wider); None: ``x``'s dtype. ``relu=True``: followed by a ReLU, in the same pass over
    memory in inference."""
    values_per_group = x[0].numel() // groups if x.shape[0] and groups else 0
    # Everything this path does not cover goes to F.group_norm, with its errors (e.g. one value per group).
    if not is_query_major(x) or x.shape[1] % groups or values_per_group <= 1 or x.shape[1] == 1:
        out = F.group_norm(x, groups, weight, bias, eps)
        return torch.relu_(out) if relu else out
    b, c, hq, wq, hs, ws = x.shape
    out_dtype = x.dtype if out_dtype is None else out_dtype
    if not torch.is_grad_enabled():
        affine = _group_statistics(_channels_last_rows(x), groups, weight, bias, eps)[3:]
        return normalize_query_major(x, affine, inplace=inplace, out_dtype=out_dtype, relu=relu)
    rows = _GroupNormChannelsLast.apply(_channels_last_rows(x), groups, weight, bias, eps, out_dtype)[0]
    if relu:  # the Function saves its input, not its output: the output may be overwritten
        rows = torch.relu_(rows)
    return rows.view(b, hq, wq, hs, ws, c).permute(0, 5, 1, 2, 3, 4)


def autocast_output_dtype(x: torch.Tensor) -> torch.dtype | None:
    """The dtype a GroupNorm over fp32 ``x`` returns under ``torch.autocast`` (the next conv's: it would
    round to it anyway), or None (``x``'s own) outside autocast or for other dtypes."""
    if x.dtype == torch.float32 and autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return None


def query_major_moments(x: torch.Tensor):
    """:func:`channel_moments` of ``[B, C, Hq, Wq, Hs, Ws]`` (any layout; a query-major one is read in place)."""
    return channel_moments(_channels_last_rows(to_query_major(x)))


def normalize_query_major(x: torch.Tensor, affine, inplace: bool = False, out_dtype: torch.dtype | None = None,
                          relu: bool = False) -> torch.Tensor:
    """``x * scale + shift`` per channel (``affine = (shift, scale)``, each ``[B, C]``, from
    :func:`group_affine`), then ReLU if ``relu``, for a query-major ``x`` (no gradient), returned
    query-major; ``inplace``/``out_dtype`` as in :func:`group_norm`."""
    b, c, hq, wq, hs, ws = x.shape
    out_dtype = x.dtype if out_dtype is None else out_dtype
    rows = _channels_last_rows(x)
    out = rows if inplace and out_dtype == x.dtype else torch.empty_like(rows, dtype=out_dtype)
    _normalize_into(rows, *affine, out, relu=relu)
    return out.view(b, hq, wq, hs, ws, c).permute(0, 5, 1, 2, 3, 4)


@dataclass
class ColumnSplit:
    """One batch element of a query-major ``[C, Hq, Wq, Hs, Ws]`` whose support columns flagged in
    ``is_constant`` hold one value per channel at every query position, without the repeats."""

    varying: torch.Tensor  # [Hq*Wq, V, C]: the other columns, whole
    varying_index: torch.Tensor  # [V]: their support positions (ascending)
    first_row: torch.Tensor  # [Hs*Ws, C]: every column at query position 0 (a constant column's value)
    is_constant: torch.Tensor  # [Hs*Ws] bool
    size: tuple[int, int, int, int]  # (Hq, Wq, Hs, Ws)

    def dense(self) -> torch.Tensor:
        """The whole ``[C, Hq, Wq, Hs, Ws]`` (a new tensor, query-major), repeats included."""
        hq, wq, hs, ws = self.size
        memory = self.first_row.expand(hq * wq, *self.first_row.shape).clone()  # [Hq*Wq, Hs*Ws, C]
        memory[:, self.varying_index] = self.varying
        return memory.view(hq, wq, hs, ws, -1).permute(4, 0, 1, 2, 3)


def split_constant_columns(x: torch.Tensor, constant: torch.Tensor) -> list[ColumnSplit]:
    """Per batch element, the :class:`ColumnSplit` of a query-major ``x`` ``[B, C, Hq, Wq, Hs, Ws]`` whose
    columns flagged in ``constant`` ``[B, Hs*Ws]`` are constant over the query dims (not checked)."""
    b, c, hq, wq, hs, ws = x.shape
    memory = x.permute(0, 2, 3, 4, 5, 1).reshape(b, hq * wq, hs * ws, c)
    splits = []
    for item in range(b):
        varying_index = (~constant[item]).nonzero().flatten()
        splits.append(ColumnSplit(memory[item].index_select(1, varying_index), varying_index,
                                  memory[item, 0].clone(), constant[item].clone(), (hq, wq, hs, ws)))
    return splits


def group_norm_split(splits: list[ColumnSplit], groups: int, weight, bias, eps: float, relu: bool = False
                     ) -> list[ColumnSplit]:
    """GroupNorm (then ReLU if ``relu``) of column-split activations, in place (no gradient): each
    element's statistics from its varying columns plus its constant ones in closed form (``Hq*Wq`` equal
    values each, merged exactly as :func:`merge_moments`), then ``x * scale + shift`` on what is stored.
    Equal up to rounding to :func:`group_norm` of the whole activation. Returns ``splits``."""
    for split in splits:
        positions, channels = split.varying.shape[0], split.first_row.shape[1]
        acc = torch.promote_types(split.first_row.dtype, torch.float32)
        moments = None
        if split.varying.shape[1]:
            moments = channel_moments(split.varying.view(1, -1, channels))
        fixed = split.first_row[split.is_constant].to(acc)  # [Sc, C]
        if fixed.shape[0]:
            mean = fixed.mean(dim=0, keepdim=True)
            spread = ((fixed - mean) ** 2).sum(dim=0, keepdim=True) * positions
            moments = merge_moments(moments, (positions * fixed.shape[0], mean, spread))
        shift, scale = group_affine(moments, groups, weight, bias, eps)[3:]
        if split.varying.shape[1]:
            _normalize_into(split.varying.view(1, -1, channels), shift, scale, split.varying.view(1, -1, channels),
                            relu=relu)
        _normalize_into(split.first_row.view(1, -1, channels), shift, scale, split.first_row.view(1, -1, channels),
                        relu=relu)
    return splits


def resize_query_dims(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear (``align_corners=True``) resize of the query dims of a query-major ``[B, C, Hq, Wq, Hs, Ws]``,
    returned query-major: one channels-last ``interpolate`` with ``Hs*Ws*C`` channels, no copy around it."""
    b, c, hq, wq, hs, ws = x.shape
    planes = x.permute(0, 2, 3, 4, 5, 1).reshape(b, hq, wq, hs * ws * c).permute(0, 3, 1, 2)
    resized = F.interpolate(planes, tuple(size), mode="bilinear", align_corners=True)
    return resized.permute(0, 2, 3, 1).reshape(b, *size, hs, ws, c).permute(0, 5, 1, 2, 3, 4)
