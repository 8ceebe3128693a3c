"""Whether calling a module runs hooks of its own: the fast paths that read a module's weights instead of
calling it must know when that would skip something.

Only a module's own hooks count. Global hooks (``register_module_forward_hook``) are what profilers and
module trackers (``FlopCounterMode``) register to watch every module; they must not switch the model to
another path than the one they watch (they only keep outputs from being overwritten in place:
:func:`has_global_forward_hooks`).
"""

from __future__ import annotations

from torch import nn
from torch.nn.modules import module as _module_internals


def has_forward_hooks(module: nn.Module) -> bool:
    """Whether calling ``module`` runs forward hooks or pre-hooks of its own: feature capture, or the
    pre-hooks of ``weight_norm``, ``spectral_norm`` and pruning, which recompute ``module.weight``."""
    return bool(module._forward_hooks or module._forward_pre_hooks)


def has_hooks(module: nn.Module) -> bool:
    """:func:`has_forward_hooks`, or backward hooks of its own (which also run only through a module call)."""
    return bool(has_forward_hooks(module) or module._backward_hooks or module._backward_pre_hooks)


def hooks_below(module: nn.Module) -> bool:
    """Whether a module inside ``module`` (not ``module`` itself) has hooks of its own (:func:`has_hooks`).
    A plain walk over the children: ``module.modules()`` costs several times more, on every forward."""
    stack = list(module._modules.values())
    while stack:
        child = stack.pop()
        if child is None:
            continue
        if has_hooks(child):
            return True
        stack.extend(child._modules.values())
    return False


def has_global_forward_hooks() -> bool:
    """Whether global forward hooks or pre-hooks are registered (``register_module_forward_hook``,
    ``register_module_forward_pre_hook``): they may keep a module's output or input, so no later step may
    overwrite it in place. (PyTorch keeps them in private module-level dicts, the same in torch 2.11 to
    2.14.)"""
    return bool(getattr(_module_internals, "_global_forward_hooks", None)
                or getattr(_module_internals, "_global_forward_pre_hooks", None))
