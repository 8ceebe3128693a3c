"""Multi-layer hypercorrelation: cosine similarity of every query/support feature pair, ReLU, stacked
by pyramid level (the first stage of HSNet).

Layers: :func:`hypertriton.reference.hypercorrelation` is the definition; this module validates input,
masks and normalizes the features (cheap, ``O(features)``), then computes the ``O(Hq*Wq*Hs*Ws)`` part
with the chosen backend, writing each level's stacked output directly:

- ``triton``: the custom op ``hypertriton::correlation_stack`` around
  :func:`hypertriton.kernels.hypercorrelation.correlation_into` (``tl.dot`` tiles, ReLU fused, stored
  straight into the stacked tensor), with a Triton backward;
- ``torch``: matrix products written into the stacked tensor.

Sparse: where the resized support mask is 0 the masked support features are 0, and so is every
correlation with them. With a mask, both backends compute products
for the active support positions only (the kernel skips tiles with none; the ``torch`` backend
multiplies the active columns and scatters them into zeros), so the cost follows the object's area.
Exact: non-finite features keep the dense result (see :func:`active_positions`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import torch

from .. import reference
from ..backend import being_traced, resolve_backend
from ._alloc import new_output
from ._autocast import autocast_off
from ._columns import column_runs, copy_columns_
from ._norms import normalize
from ._second_order import recomputed_gradients
from ._validation import check_feature_lists, check_support_mask, check_triton_dtypes, refuse_vmap

__all__ = ["hypercorrelation", "active_positions"]


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # Half-precision norms and CPU matmuls lose accuracy; fp32 is the accumulation type everywhere.
    return torch.promote_types(dtype, torch.float32)


def _level_shape(query: torch.Tensor, support: torch.Tensor, layers: int) -> tuple[int, ...]:
    return (query.shape[0], layers, *query.shape[-2:], *support.shape[-2:])


# The torch backend multiplies only the active columns while at most this share of the support positions
# is active; above it the dense product (exact as well) costs less than the scatter of the products.
SPARSE_SHARE = 0.75


def active_positions(mask: torch.Tensor, query: list[torch.Tensor], support: list[torch.Tensor],
                     read_back: bool = True) -> torch.Tensor | None:
    """``[B, Hs*Ws]`` bool: the support positions of one level whose correlations may be nonzero, or
    None when all may be.

    Args:
        mask: the support mask resized to the level's support map, ``[B, 1, Hs, Ws]``.
        query, support: the level's normalized (support: masked) features, ``[B, C_l, H, W]`` per layer.

    Active: mask != 0 (NaN included), or a non-finite normalized support feature there in any layer
    (``NaN * 0`` stays NaN), and every position of a batch element whose normalized query is non-finite
    anywhere (its NaN reaches all of them). Elsewhere the normalized support is the zero vector and each
    correlation exactly 0. Normalized entries lie in [-1, 1], so one sum per tensor tells whether any is
    non-finite; the per-position check runs only then.

    ``read_back=False``: nothing is read back to the host (no GPU wait): every position's finiteness is
    checked and the flags are returned even when all are set.
    """
    active = mask.flatten(1) != 0
    # One host sync for all layers (a GPU waits at each).
    finite = torch.isfinite(torch.stack([s.sum() for s in support])).tolist() if read_back else [False] * len(support)
    for s, ok in zip(support, finite):
        if not ok:
            active |= ~torch.isfinite(s).all(dim=1).flatten(1)
    for q in query:
        active |= ~torch.isfinite(q.flatten(1).sum(dim=1))[:, None]
    if not read_back:
        return active
    return None if bool(active.all()) else active


def _active_columns(active: torch.Tensor | None, batch: int, positions: int) -> list[torch.Tensor | None]:
    """Per batch element, the active support positions to multiply, or None to multiply all of them."""
    if active is None:
        return [None] * batch
    columns = [row.nonzero().squeeze(1) for row in active]
    return [None if c.numel() > SPARSE_SHARE * positions else c for c in columns]


def _correlation_stack_torch(query: list[torch.Tensor], support: list[torch.Tensor],
                             active: torch.Tensor | None = None) -> torch.Tensor:
    """``relu(<q, s>)`` of normalized features, layer by layer into one ``[B, L, Hq, Wq, Hs, Ws]``;
    with ``active`` (see :func:`active_positions`) only the active columns are multiplied."""
    shape = _level_shape(query[0], support[0], len(query))
    batch, layers = shape[:2]
    n_q, n_s = shape[2] * shape[3], shape[4] * shape[5]
    flat = lambda t: t.flatten(-2)  # noqa: E731  [..., C, H*W], a view for contiguous maps
    columns = _active_columns(active, batch, n_s)
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in query + support)
    if all(c is None for c in columns):
        # torch.compile cannot trace out= into a strided view (out[:, layer] at batch > 1): stacked there.
        if grad or being_traced():
            corrs = [torch.bmm(flat(q).transpose(1, 2), flat(s)) for q, s in zip(query, support)]
            return torch.relu(torch.stack(corrs, dim=1)).view(shape)
        out = new_output((batch, layers, n_q, n_s), query[0].dtype, query[0].device)
        for layer, (q, s) in enumerate(zip(query, support)):
            torch.bmm(flat(q).transpose(1, 2), flat(s), out=out[:, layer])
        return torch.relu_(out).view(shape)

    def products(q, s, cols):  # [Hq*Wq, Hs*Ws] of one batch element and layer; zeros off the active columns
        if cols is None:
            return torch.relu(flat(q).t() @ flat(s))
        return torch.relu(flat(q).t() @ flat(s).index_select(1, cols))

    if grad:
        per_batch = []
        for b, cols in enumerate(columns):
            corr = [products(q[b], s[b], cols) for q, s in zip(query, support)]
            if cols is not None:
                corr = [c.new_zeros(n_q, n_s).index_copy(1, cols, c) for c in corr]
            per_batch.append(torch.stack(corr))
        return torch.stack(per_batch).view(shape)
    out = new_output((batch, layers, n_q, n_s), query[0].dtype, query[0].device)
    for b, cols in enumerate(columns):
        runs = None if cols is None or cols.device.type != "cpu" else column_runs(cols)  # once for all layers
        for layer, (q, s) in enumerate(zip(query, support)):
            target = out[b, layer]
            if cols is None:
                torch.relu_(torch.mm(flat(q[b]).t(), flat(s[b]), out=target))
            else:
                copy_columns_(target, products(q[b], s[b], cols), cols, runs, zero_rest=True)
    return out.view(shape)


# ``active`` has no default on purpose: PyTorch 2.11's dispatcher drops an argument equal to its default
# before autograd records the inputs, so the backward's gradient for it was one too many and every
# backward without a mask (active None) failed there on the triton backend.
@torch.library.custom_op("hypertriton::correlation_stack", mutates_args=())
def correlation_stack_triton(query: list[torch.Tensor], support: list[torch.Tensor],
                             active: Optional[torch.Tensor]) -> torch.Tensor:
    """Triton: ``relu(<q_l, s_l>)`` for normalized ``[B, C_l, Hq, Wq]``/``[B, C_l, Hs, Ws]`` pairs,
    written into one ``[B, L, Hq, Wq, Hs, Ws]`` tensor (one kernel launch per layer, no temporaries);
    ``active`` ``[B, Hs*Ws]`` or None: see :func:`active_positions`."""
    from ..kernels.hypercorrelation import correlation_into

    out = new_output(_level_shape(query[0], support[0], len(query)), query[0].dtype, query[0].device)
    for layer, (q, s) in enumerate(zip(query, support)):
        correlation_into(q, s, out[:, layer], active)
    return out


@correlation_stack_triton.register_fake
def _(query, support, active):
    return query[0].new_empty(_level_shape(query[0], support[0], len(query)))


def _correlation_stack_setup(ctx, inputs, output):
    query, support, active = inputs
    ctx.save_for_backward(output, active, *query, *support)
    ctx.layers = len(query)


@torch.library.custom_op("hypertriton::correlation_stack_backward", mutates_args=())
def correlation_stack_backward_triton(grad: torch.Tensor, output: torch.Tensor, query: list[torch.Tensor],
                                      support: list[torch.Tensor], active: Optional[torch.Tensor] = None
                                      ) -> list[torch.Tensor]:
    """Triton backward of :func:`correlation_stack_triton`: the query gradients, then the support ones
    (skipping inactive support positions, whose gradients are zero)."""
    from ..kernels.hypercorrelation import correlation_backward

    grads = [correlation_backward(grad[:, layer], output[:, layer], q, s, active=active) for layer, (q, s) in
             enumerate(zip(query, support))]
    return [g for g, _ in grads] + [g for _, g in grads]


@correlation_stack_backward_triton.register_fake
def _(grad, output, query, support, active=None):
    return [t.new_empty(t.shape) for t in query + support]


def _correlation_stack_backward(ctx, grad):
    output, active, *features = ctx.saved_tensors
    if torch.is_grad_enabled():  # create_graph=True or torch.func: see _second_order

        def statement(*features):  # relu(<q, s>) of the normalized features, layer by layer
            return torch.stack([torch.relu(torch.einsum("bcij,bckl->bijkl", q, s))
                                for q, s in zip(features[: ctx.layers], features[ctx.layers:])], dim=1)

        grads = recomputed_gradients(statement, features, grad, [True] * len(features))
        return grads[: ctx.layers], grads[ctx.layers:], None
    grads = correlation_stack_backward_triton(grad, output, features[: ctx.layers], features[ctx.layers:], active)
    return grads[: ctx.layers], grads[ctx.layers:], None


correlation_stack_triton.register_autograd(_correlation_stack_backward, setup_context=_correlation_stack_setup)


def hypercorrelation(query_feats: Sequence[torch.Tensor], support_feats: Sequence[torch.Tensor],
                     support_mask: torch.Tensor | None = None, backend: str | None = None) -> list[torch.Tensor]:
    """Multi-layer hypercorrelation stacked by pyramid level, deepest level first.

    Each layer's support features are multiplied by the support mask resized to their size (bilinear,
    ``align_corners=True``); both sides are normalized as ``f / (||f||_2 + 1e-5)`` over channels; the
    correlation is ``relu(<q(xq), s(xs)>)``. Consecutive layers of equal spatial size form one level,
    stacked as channels shallow to deep; levels come deepest first (the original's
    ``[layer4, layer3, layer2]``).

    Args:
        query_feats: list of ``[B, C_l, Hq_l, Wq_l]`` tensors, shallow to deep.
        support_feats: list of ``[B, C_l, Hs_l, Ws_l]`` tensors; same length, batch, channels and dtype
            (query and support maps may differ in size).
        support_mask: optional ``[B, H, W]`` mask of any size (float, int or bool).
        backend: ``"triton"``, ``"torch"``, ``"reference"`` or None (automatic; see
            :mod:`hypertriton.backend`).

    Returns:
        One tensor ``[B, L_p, Hq, Wq, Hs, Ws]`` per level, in the features' dtype (also under
        ``torch.autocast``: the products run in it, as the Triton kernel accumulates, on every backend).

    Raises:
        TypeError: a feature list that is not a list of floating tensors, or float64 on the triton backend.
        ValueError: mismatched lengths, batches, channels, devices or dtypes (each named with the shapes
            received and expected); an unknown backend.
        RuntimeError: ``backend="triton"`` where it cannot run; a call under ``torch.func.vmap``.

    Example:
        >>> q = [torch.randn(1, 8, 5, 5), torch.randn(1, 8, 3, 3)]
        >>> s = [torch.randn(1, 8, 5, 5), torch.randn(1, 8, 3, 3)]
        >>> [t.shape for t in hypercorrelation(q, s)]
        [torch.Size([1, 1, 3, 3, 3, 3]), torch.Size([1, 1, 5, 5, 5, 5])]
    """
    query_feats, support_feats = check_feature_lists(query_feats, support_feats)
    device = query_feats[0].device
    if support_mask is not None:
        check_support_mask(support_mask, query_feats[0].shape[0], device)
    refuse_vmap([*query_feats, *support_feats, support_mask])
    name = resolve_backend(backend, device)
    if name == "triton":
        check_triton_dtypes({f"query_feats[{i}]": q for i, q in enumerate(query_feats)})
    if name == "reference":
        with autocast_off(device.type):
            return reference.hypercorrelation(query_feats, support_feats, support_mask)

    dtype = query_feats[0].dtype
    compute = _compute_dtype(dtype)
    masks = {}  # resized once per support map size (plain ints: torch.jit.trace's shapes are tensors)
    map_size = lambda t: tuple(int(n) for n in t.shape[-2:])  # noqa: E731
    if support_mask is not None:
        for s in support_feats:
            if map_size(s) not in masks:
                masks[map_size(s)] = reference.resize_mask(support_mask, map_size(s)).to(compute)
        support_feats = [s.to(compute) * masks[map_size(s)] for s in support_feats]
    # Normalizing costs O(features), little next to the O(Hq*Wq*Hs*Ws) correlation.
    query_normed = [normalize(q.to(compute)) for q in query_feats]
    support_normed = [normalize(s.to(compute)) for s in support_feats]

    outputs = []
    for level in reference.pyramid_levels(query_feats, support_feats):
        q_level = [query_normed[i] for i in level]
        s_level = [support_normed[i] for i in level]
        active = None
        # The active set is data-dependent: under torch.compile the products stay dense (a graph break
        # otherwise), which is exact too; torch.jit.trace would freeze this mask's set into the trace.
        if support_mask is not None and not being_traced() and not torch.jit.is_tracing():
            with torch.no_grad():
                active = active_positions(masks[map_size(s_level[0])], q_level, s_level)
        if name == "triton":
            # The kernel reads the inputs' dtype and accumulates in fp32.
            outputs.append(correlation_stack_triton([q.to(dtype) for q in q_level], [s.to(dtype) for s in s_level],
                                                    active))
        else:
            # Products in the compute dtype under autocast too, as the Triton kernel accumulates.
            with autocast_off(device.type):
                outputs.append(_correlation_stack_torch(q_level, s_level, active).to(dtype))
    return outputs
