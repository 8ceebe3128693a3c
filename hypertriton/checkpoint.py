"""Reading and writing HSNet checkpoints in the original training script's format.

The original saves ``model.state_dict()`` of a ``DataParallel``-wrapped HSNet, usually from a GPU:
every key starts with ``module.``, then ``backbone.*`` (the complete torchvision model, BN buffers and
the unused ``fc``/``classifier`` included) and ``hpn_learner.*``. These helpers load such files on
any device, work out the backbone from the keys, and explain precisely what does not fit.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from ._io import atomic_save, load_error_summary, load_on_cpu
from ._pickle_guard import UnsafeFileError

__all__ = ["read_state_dict", "strip_prefix", "infer_backbone", "load_into", "save_checkpoint",
           "atomic_save", "CheckpointError"]

PREFIX = "module."
_LIST_LIMIT = 10


# What 'hypertriton train' writes to last.pt (``hypertriton.training.STATE_FORMAT``): the state to resume,
# without the frozen backbone, so not a model checkpoint.
TRAIN_STATE_FORMAT = "hypertriton-train-state"


class CheckpointError(ValueError):
    """A file or state_dict that is not (or does not fit) an HSNet checkpoint."""


def _describe(source) -> str:
    return repr(str(source)) if isinstance(source, (str, os.PathLike)) else "the given state_dict"


def read_state_dict(source) -> dict[str, torch.Tensor]:
    """The state_dict in ``source``: a path to a ``torch.save`` file, or a mapping of name -> tensor.

    Files are read with ``map_location="cpu"`` and ``weights_only=True`` (checkpoints saved from a GPU
    load on a CPU-only machine; no code is unpickled). A mapping holding the state_dict under
    ``"state_dict"`` or ``"model"`` is unwrapped; a compact file (:mod:`hypertriton.compact`, the bundled
    weights' format) is expanded.

    Raises:
        FileNotFoundError: the path does not exist.
        CheckpointError: the file is not a PyTorch checkpoint, is a malformed compact one, holds no
            state_dict, or holds tensors without data (on the meta device).
    """
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if path.is_dir():
            raise CheckpointError(f"checkpoint: {str(path)!r} is a folder; expected a checkpoint file (e.g. the "
                                  "best_model.pt that 'hypertriton train' writes there)")
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint: no such file {str(path)!r}")
        try:
            loaded = load_on_cpu(path)
        except UnsafeFileError as error:
            raise CheckpointError(f"checkpoint: {error}") from None
        except Exception as error:  # unpickling, zip and EOF errors all mean "not a checkpoint"
            raise CheckpointError(f"checkpoint: {str(path)!r} is not a PyTorch checkpoint (torch.load failed: "
                                  f"{load_error_summary(error)})") from error
    elif isinstance(source, Mapping):
        loaded = source
    else:
        raise TypeError(f"checkpoint: expected a file path or a state_dict mapping, got {type(source).__name__}")

    from .compact import is_compact, load_compact

    if isinstance(loaded, Mapping) and loaded.get("format") == TRAIN_STATE_FORMAT:
        raise CheckpointError(f"checkpoint: {_describe(source)} is a training state ('hypertriton train' writes it "
                              "to last.pt for --resume; it holds no backbone); load the best_model.pt written "
                              "next to it")
    if is_compact(loaded):  # the bundled weights' codebook format
        loaded = load_compact(loaded, name=_describe(source))[0]
    for wrapper in ("state_dict", "model"):
        if isinstance(loaded, Mapping) and isinstance(loaded.get(wrapper), Mapping):
            loaded = loaded[wrapper]
    if not isinstance(loaded, Mapping) or not loaded:
        raise CheckpointError(f"checkpoint: {_describe(source)} holds no state_dict "
                              f"(got {type(loaded).__name__}{' (empty)' if isinstance(loaded, Mapping) else ''})")
    bad = [key for key, value in loaded.items() if not isinstance(key, str) or not isinstance(value, torch.Tensor)]
    if bad:
        raise CheckpointError(f"checkpoint: {_describe(source)} is not a state_dict: {len(bad)} entries are not "
                              f"name -> tensor pairs, e.g. {bad[:3]!r}")
    # A state_dict of a model built on torch.device("meta") has shapes but no values: nothing to load.
    meta = [key for key, value in loaded.items() if value.is_meta]
    if meta:
        raise CheckpointError(f"checkpoint: {_describe(source)} holds {len(meta)} tensors without data (on the meta "
                              f"device), e.g. {meta[0]!r}; save the state_dict of a model with real weights")
    return dict(loaded)


def strip_prefix(state_dict: Mapping[str, torch.Tensor], prefix: str = PREFIX) -> dict[str, torch.Tensor]:
    """``state_dict`` with a leading ``prefix`` (DataParallel's ``module.``) removed from every key; keys
    with and without it may be mixed.

    Raises:
        CheckpointError: both ``prefix + key`` and ``key`` are present (two values for one weight).
    """
    stripped: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        name = key.removeprefix(prefix)
        if name in stripped:
            raise CheckpointError(f"checkpoint: the state_dict holds both {prefix + name!r} and {name!r}, two "
                                  f"values for one weight once {prefix!r} is removed; keep only one of them")
        stripped[name] = value
    return stripped


def _block_count(state_dict: Mapping[str, torch.Tensor], stage: str) -> int:
    indices = {int(m.group(1)) for key in state_dict if (m := re.match(rf"backbone\.{stage}\.(\d+)\.", key))}
    return max(indices) + 1 if indices else 0


def infer_backbone(state_dict: Mapping[str, torch.Tensor]) -> str:
    """The backbone name of an HSNet state_dict (``module.`` prefix already stripped).

    Read from the ``backbone.*`` keys (VGG's ``features``, or ResNet's block type and layer3 depth);
    without them (a learner-only state_dict), from the learner's input channels (layers per level),
    which tell resnet18, vgg16 and resnet101 apart but not resnet34 from resnet50.

    Raises:
        CheckpointError: the keys match no known backbone, fit several (a learner-only resnet34 or
            resnet50 state_dict: pass ``backbone=``), or are not HSNet's at all.
    """
    from .backbones import BACKBONES

    # VGG16's features by their indices (a ConvNeXt's 'features.0.0.weight' is no VGG's).
    if all(f"backbone.features.{index}.weight" in state_dict for index in (0, 28)):
        return "vgg16"
    if "backbone.layer3.0.conv1.weight" in state_dict:
        bottleneck = "backbone.layer3.0.conv3.weight" in state_dict
        depth = _block_count(state_dict, "layer3")
        names = {(True, 6): "resnet50", (True, 23): "resnet101", (False, 2): "resnet18", (False, 6): "resnet34"}
        name = names.get((bottleneck, depth))
        if name is None:
            raise CheckpointError(f"checkpoint: backbone with {depth} {'Bottleneck' if bottleneck else 'BasicBlock'} "
                                  f"blocks in layer3 matches none of {sorted(BACKBONES)}; pass backbone=")
        return name
    if any(key.startswith("backbone.") for key in state_dict):
        sample = [key for key in state_dict if key.startswith("backbone.")][:3]
        raise CheckpointError(f"checkpoint: its 'backbone.*' keys are none of {sorted(BACKBONES)}'s (such as "
                              f"{sample}); a model with a backbone of its own loads with that module and its spec: "
                              "HSNet.from_checkpoint(path, backbone=module, spec=BackboneSpec(...))")
    key = "hpn_learner.encoder_layer{}.0.conv1.weight"
    if all(key.format(level) in state_dict for level in (4, 3, 2)):
        inch = tuple(int(state_dict[key.format(level)].shape[1]) for level in (4, 3, 2))
        fitting = sorted(name for name, spec in BACKBONES.items() if spec.layers_per_level == inch)
        if len(fitting) == 1:
            return fitting[0]
        if fitting:
            raise CheckpointError(f"checkpoint: learner input channels {list(inch)} fit the backbones {fitting} "
                                  "alike, and there are no 'backbone.*' keys to tell them apart; pass "
                                  f"backbone= (one of {fitting}: the one it was trained with)")
        raise CheckpointError(f"checkpoint: learner input channels {list(inch)} match none of {sorted(BACKBONES)}; "
                              f"pass backbone=")
    sample = list(state_dict)[:5]
    raise CheckpointError(f"checkpoint: not an HSNet checkpoint: no 'backbone.*' or 'hpn_learner.*' keys "
                          f"(after stripping '{PREFIX}'); first keys: {sample}")


def _listing(title: str, items: list[str]) -> str:
    more = f" ... and {len(items) - _LIST_LIMIT} more" if len(items) > _LIST_LIMIT else ""
    return f"\n  {title} ({len(items)}): " + ", ".join(items[:_LIST_LIMIT]) + more


def load_into(model: nn.Module, state_dict: Mapping[str, torch.Tensor], strict: bool = True,
              source: str = "the given state_dict") -> None:
    """Copy ``state_dict`` (no prefix) into ``model``, or explain exactly what does not fit.

    BatchNorm's ``num_batches_tracked`` counters may be missing (files from before PyTorch 0.4.1, or
    converted ones), as for ``model.load_state_dict``: they keep the model's values (0 for a new model).
    Nothing reads them in eval mode, nor in training with BatchNorm's default ``momentum``.

    Args:
        model: the module to load into.
        state_dict: names (without the ``module.`` prefix, see :func:`strip_prefix`) to tensors.
        strict: when False, keys missing from ``state_dict`` keep the model's values (e.g. a learner-only
            checkpoint on a pretrained backbone); unexpected and mis-shaped keys are always errors.
        source: how the messages name where the state_dict came from (a file name).

    Raises:
        CheckpointError: listing the missing, unexpected and mis-shaped keys (with both shapes).
    """
    own = model.state_dict()
    counters = {f"{name}.num_batches_tracked".lstrip(".") for name, module in model.named_modules()
                if isinstance(module, nn.modules.batchnorm._NormBase) and module.track_running_stats}
    absent_counters = {key: own[key] for key in counters if key in own and key not in state_dict}
    if absent_counters:  # filled in here: torch fills them only for a state_dict without version metadata
        state_dict = {**state_dict, **absent_counters}
    missing = [key for key in own if key not in state_dict] if strict else []
    unexpected = [key for key in state_dict if key not in own]
    misshaped = [f"{key} (checkpoint {list(value.shape)}, model {list(own[key].shape)})"
                 for key, value in state_dict.items() if key in own and value.shape != own[key].shape]
    if missing or unexpected or misshaped:
        message = f"checkpoint: {source} does not fit {type(model).__name__}"
        if hasattr(model, "backbone_name"):
            message += f"(backbone={model.backbone_name!r})"
        for title, items in (("missing keys", missing), ("unexpected keys", unexpected),
                             ("mis-shaped keys", misshaped)):
            if items:
                message += _listing(title, items)
        raise CheckpointError(message)
    model.load_state_dict(state_dict, strict=strict)


def save_checkpoint(model: nn.Module, path: str | os.PathLike, prefix: str = PREFIX) -> Path:
    """Write ``model``'s state_dict in the original's format (``module.`` before every key), atomically
    (see :func:`atomic_save`), with every tensor moved to the CPU.

    Returns:
        The path written.
    """
    return atomic_save({prefix + key: value.detach().cpu() for key, value in model.state_dict().items()}, path)
