"""Whether calling a module runs hooks: the fast paths that read a module's weights instead of calling it
must know when that would skip something."""

from __future__ import annotations

from torch import nn
from torch.nn.modules import module as torch_module


def has_forward_hooks(module: nn.Module) -> bool:
    """Whether calling ``module`` runs forward hooks or pre-hooks, its own or global ones: feature capture,
    or the pre-hooks of ``weight_norm``, ``spectral_norm`` and pruning, which recompute ``module.weight``."""
    return bool(module._forward_hooks or module._forward_pre_hooks or torch_module._global_forward_hooks
                or torch_module._global_forward_pre_hooks)


def has_hooks(module: nn.Module) -> bool:
    """:func:`has_forward_hooks`, or backward hooks (which run only through a module call too)."""
    return bool(has_forward_hooks(module) or module._backward_hooks or module._backward_pre_hooks
                or torch_module._global_backward_hooks or torch_module._global_backward_pre_hooks)
