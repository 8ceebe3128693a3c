"""hypertriton: few-shot segmentation with hypercorrelation squeeze networks (HSNet), made fast and
memory-lean with Triton kernels.

Public API (imported lazily so that ``TRITON_INTERPRET`` may be set after ``import hypertriton``
but before the first kernel runs):

- ops: :func:`hypercorrelation`, :func:`center_pivot_conv4d`, and the fused first squeeze layer
  :func:`fused_hypercorrelation_cp_conv` (no 4D tensor stored)
- modules: :class:`HyperCorr`, :class:`CenterPivotConv4d`, :class:`HPNLearner`, :class:`HSNet`
- workflows: :func:`evaluate`, :func:`train` with :class:`TrainConfig`, :func:`save_checkpoint`
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "hypercorrelation": "hypertriton.ops.hypercorrelation",
    "center_pivot_conv4d": "hypertriton.ops.center_pivot_conv4d",
    "fused_hypercorrelation_cp_conv": "hypertriton.ops.fused_first_layer",
    "fused_hypercorrelation_cp_conv4d": "hypertriton.ops.fused_first_layer",
    "HyperCorr": "hypertriton.modules",
    "CenterPivotConv4d": "hypertriton.modules",
    "HPNLearner": "hypertriton.learner",
    "HSNet": "hypertriton.model",
    "save_checkpoint": "hypertriton.checkpoint",
    "evaluate": "hypertriton.evaluation",
    "train": "hypertriton.training",
    "TrainConfig": "hypertriton.train_config",
    "resolve_backend": "hypertriton.backend",
    "BACKENDS": "hypertriton.backend",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module_name = _EXPORTS.get(name)
    if module_name is None:
        raise AttributeError(f"module 'hypertriton' has no attribute {name!r}")
    value = getattr(importlib.import_module(module_name), name)
    globals()[name] = value
    return value


def __dir__():
    # Each name once (a lazy export, once loaded, is in globals() too), and no implementation details.
    return sorted(set(_EXPORTS) | {"__version__"} | {name for name in globals() if not name.startswith("_")}
                  - {"annotations", "importlib"})
