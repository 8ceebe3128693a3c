"""Multi-layer hypercorrelation: cosine similarity of every query/support feature pair, ReLU, stacked
by pyramid level (the first stage of HSNet).

Layers: :func:`hypertriton.reference.hypercorrelation` is the definition; this module validates input,
masks and normalizes the features (cheap, ``O(features)``), then computes the ``O(Hq*Wq*Hs*Ws)`` part
with the chosen backend, writing each level's stacked output directly:

- ``triton``: the custom op ``hypertriton::correlation_stack`` around
  :func:`hypertriton.kernels.hypercorrelation.correlation_into` (``tl.dot`` tiles, ReLU fused, stored
  straight into the stacked tensor), with a Triton backward;
- ``torch``: batched matrix products written into the stacked tensor.
"""

from __future__ import annotations

import torch

from .. import reference
from ..backend import resolve_backend
from ._alloc import new_output
from ._validation import check_feature_lists, check_support_mask


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # Half-precision norms and CPU matmuls lose accuracy; fp32 is the accumulation type everywhere.
    return torch.promote_types(dtype, torch.float32)


def _level_shape(query: torch.Tensor, support: torch.Tensor, layers: int) -> tuple[int, ...]:
    return (query.shape[0], layers, *query.shape[-2:], *support.shape[-2:])


def _correlation_stack_torch(query: list[torch.Tensor], support: list[torch.Tensor]) -> torch.Tensor:
    """``relu(<q, s>)`` of normalized features, layer by layer into one ``[B, L, Hq, Wq, Hs, Ws]``."""
    shape = _level_shape(query[0], support[0], len(query))
    batch, layers = shape[:2]
    flat = lambda t: t.flatten(2)  # noqa: E731  [B, C, H*W], a view for contiguous maps
    if torch.is_grad_enabled() and any(t.requires_grad for t in query + support):
        corrs = [torch.bmm(flat(q).transpose(1, 2), flat(s)) for q, s in zip(query, support)]
        return torch.relu(torch.stack(corrs, dim=1)).view(shape)
    out = new_output((batch, layers, shape[2] * shape[3], shape[4] * shape[5]), query[0].dtype, query[0].device)
    for layer, (q, s) in enumerate(zip(query, support)):
        torch.bmm(flat(q).transpose(1, 2), flat(s), out=out[:, layer])
    return torch.relu_(out).view(shape)


@torch.library.custom_op("hypertriton::correlation_stack", mutates_args=())
def correlation_stack_triton(query: list[torch.Tensor], support: list[torch.Tensor]) -> torch.Tensor:
    """Triton: ``relu(<q_l, s_l>)`` for normalized ``[B, C_l, Hq, Wq]``/``[B, C_l, Hs, Ws]`` pairs,
    written into one ``[B, L, Hq, Wq, Hs, Ws]`` tensor (one kernel launch per layer, no temporaries)."""
    from ..kernels.hypercorrelation import correlation_into

    out = new_output(_level_shape(query[0], support[0], len(query)), query[0].dtype, query[0].device)
    for layer, (q, s) in enumerate(zip(query, support)):
        correlation_into(q, s, out[:, layer])
    return out


@correlation_stack_triton.register_fake
def _(query, support):
    return query[0].new_empty(_level_shape(query[0], support[0], len(query)))


def _correlation_stack_setup(ctx, inputs, output):
    query, support = inputs
    ctx.save_for_backward(output, *query, *support)
    ctx.layers = len(query)


@torch.library.custom_op("hypertriton::correlation_stack_backward", mutates_args=())
def correlation_stack_backward_triton(grad: torch.Tensor, output: torch.Tensor, query: list[torch.Tensor],
                                      support: list[torch.Tensor]) -> list[torch.Tensor]:
    """Triton backward of :func:`correlation_stack_triton`: the query gradients, then the support ones."""
    from ..kernels.hypercorrelation import correlation_backward

    grads = [correlation_backward(grad[:, layer], output[:, layer], q, s) for layer, (q, s) in
             enumerate(zip(query, support))]
    return [g for g, _ in grads] + [g for _, g in grads]


@correlation_stack_backward_triton.register_fake
def _(grad, output, query, support):
    return [t.new_empty(t.shape) for t in query + support]


def _correlation_stack_backward(ctx, grad):
    output, *features = ctx.saved_tensors
    grads = correlation_stack_backward_triton(grad, output, features[: ctx.layers], features[ctx.layers:])
    return grads[: ctx.layers], grads[ctx.layers:]


correlation_stack_triton.register_autograd(_correlation_stack_backward, setup_context=_correlation_stack_setup)


def hypercorrelation(query_feats, support_feats, support_mask=None, backend: str | None = None):
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
        One tensor ``[B, L_p, Hq, Wq, Hs, Ws]`` per level, in the features' dtype.

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
    name = resolve_backend(backend, device)
    if name == "reference":
        return reference.hypercorrelation(query_feats, support_feats, support_mask)

    dtype = query_feats[0].dtype
    compute = _compute_dtype(dtype)
    if support_mask is not None:
        support_feats = [s.to(compute) * reference.resize_mask(support_mask, s.shape[-2:]).to(compute)
                         for s in support_feats]
    # Normalizing costs O(features), negligible next to the O(Hq*Wq*Hs*Ws) correlation.
    query_normed = [reference.normalize(q.to(compute)) for q in query_feats]
    support_normed = [reference.normalize(s.to(compute)) for s in support_feats]

    outputs = []
    for level in reference.pyramid_levels(query_feats, support_feats):
        q_level = [query_normed[i] for i in level]
        s_level = [support_normed[i] for i in level]
        if name == "triton":
            # The kernel reads the inputs' dtype and accumulates in fp32.
            outputs.append(correlation_stack_triton([q.to(dtype) for q in q_level], [s.to(dtype) for s in s_level]))
        else:
            outputs.append(_correlation_stack_torch(q_level, s_level).to(dtype))
    return outputs
