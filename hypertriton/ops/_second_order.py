"""Backward passes under ``create_graph=True``: gradient penalties, Hessian-vector products, second-order
MAML, and ``torch.func`` transforms (``grad``, ``vjp``), which run every backward that way.

The ops' explicit backwards (Triton kernels, the fused layer's chunked recomputation, the query-major
GroupNorm's formula) are not differentiable themselves. There each backward calls
:func:`recomputed_gradients` instead: autograd over a differentiable statement of the op (its einsum
reference, ``F.group_norm``), recomputed from the saved inputs, with ``create_graph=True``. That costs what
the reference costs (the fused layer's level then holds its 4D correlation during the backward), only on
this path.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch


def recomputed_gradients(forward: Callable[..., torch.Tensor], inputs: Sequence, grad_output: torch.Tensor,
                         needs_input_grad: Sequence[bool]) -> list[torch.Tensor | None]:
    """The gradients of ``forward(*inputs)`` for ``grad_output``, differentiable in turn.

    Args:
        forward: a differentiable statement of the op (plain autograd).
        inputs: its arguments; tensors among them are those the backward saved (graph-connected under
            ``create_graph=True``), anything else is passed through.
        needs_input_grad: per input, whether its gradient is wanted.

    Returns:
        Per input, its gradient (zeros where it does not reach the output), or None where not wanted, not
        a tensor, or not recording a gradient.
    """
    wanted = [index for index, (value, need) in enumerate(zip(inputs, needs_input_grad))
              if need and isinstance(value, torch.Tensor) and value.requires_grad]
    result: list[torch.Tensor | None] = [None] * len(inputs)
    if not wanted:
        return result
    with torch.enable_grad():
        out = forward(*inputs)
        grads = torch.autograd.grad(out, [inputs[i] for i in wanted], grad_output, create_graph=True,
                                    allow_unused=True)
    for index, value in zip(wanted, grads):
        result[index] = torch.zeros_like(inputs[index]) if value is None else value
    return result
