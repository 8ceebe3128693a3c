"""Input checks shared by the ops: every message names the argument, what came and what was expected."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from ..backend import being_traced


def shape_of(tensor: torch.Tensor) -> str:
    return "[" + ", ".join(str(size) for size in tensor.shape) + "]"


def check_tensor(value, name: str, ndim: int, layout: str) -> torch.Tensor:
    """``value`` must be a floating tensor with ``ndim`` dims (``layout`` names them, e.g. ``[B, C, H, W]``)."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name}: expected a tensor {layout}, got {type(value).__name__}")
    if value.dim() != ndim:
        raise ValueError(f"{name}: expected a {ndim}D tensor {layout}, got shape {shape_of(value)}")
    if not value.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point tensor, got dtype {value.dtype}")
    return value


# The dtypes torch.autocast casts to its own; it leaves float64 alone, so a float64 input next to its
# casts fails deep inside a layer.
AUTOCAST_INPUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_triton_dtypes(tensors: dict[str, torch.Tensor]) -> None:
    """The Triton kernels take fp32, fp16 and bf16 (``tl.dot``); name the first input they cannot."""
    for name, tensor in tensors.items():
        if tensor.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise TypeError(f"{name}: the triton backend takes float32, float16 or bfloat16, got {tensor.dtype}; "
                            "use backend='torch' or 'reference' for it")


def check_same_device(tensors: dict[str, torch.Tensor]) -> torch.device:
    items = [(name, t) for name, t in tensors.items() if t is not None]
    first_name, first = items[0]
    for name, tensor in items[1:]:
        if tensor.device != first.device:
            raise ValueError(f"{name} is on {tensor.device} but {first_name} is on {first.device}; "
                             "expected all inputs on one device")
    return first.device


def check_feature_lists(query_feats, support_feats) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Query and support feature lists: same length, 4D floating, matching batch/channels/dtype/device."""
    for name, feats in (("query_feats", query_feats), ("support_feats", support_feats)):
        if isinstance(feats, torch.Tensor) or not isinstance(feats, Sequence):
            raise TypeError(f"{name}: expected a list of [B, C, H, W] tensors, got {type(feats).__name__}")
    if len(query_feats) != len(support_feats):
        raise ValueError(f"query_feats has {len(query_feats)} layers but support_feats has "
                         f"{len(support_feats)}; expected the same number of layers")
    if len(query_feats) == 0:
        raise ValueError("query_feats: expected at least one feature map, got an empty list")
    layout = "[B, C, H, W]"
    for layer, (q, s) in enumerate(zip(query_feats, support_feats)):
        check_tensor(q, f"query_feats[{layer}]", 4, layout)
        check_tensor(s, f"support_feats[{layer}]", 4, layout)
        for name, feat in ((f"query_feats[{layer}]", q), (f"support_feats[{layer}]", s)):
            if min(feat.shape[1:]) == 0:
                raise ValueError(f"{name}: expected at least one channel and one position {layout}, got shape "
                                 f"{shape_of(feat)}")
        if q.shape[0] != s.shape[0]:
            raise ValueError(f"layer {layer}: query_feats[{layer}] has batch {q.shape[0]} but "
                             f"support_feats[{layer}] has batch {s.shape[0]} (shapes {shape_of(q)} and "
                             f"{shape_of(s)}); expected equal batch sizes")
        if q.shape[1] != s.shape[1]:
            raise ValueError(f"layer {layer}: query_feats[{layer}] has {q.shape[1]} channels but "
                             f"support_feats[{layer}] has {s.shape[1]} (shapes {shape_of(q)} and "
                             f"{shape_of(s)}); expected equal channel counts")
        if q.dtype != s.dtype:
            raise TypeError(f"layer {layer}: query_feats[{layer}] is {q.dtype} but support_feats[{layer}] "
                            f"is {s.dtype}; expected one dtype")
    batch = query_feats[0].shape[0]
    for layer, q in enumerate(query_feats):
        if q.shape[0] != batch:
            raise ValueError(f"query_feats[{layer}] has batch {q.shape[0]} but query_feats[0] has batch "
                             f"{batch}; expected one batch size for all layers")
        if q.dtype != query_feats[0].dtype:  # stacked into one tensor: the backends would differ in the result's
            raise TypeError(f"query_feats[{layer}] is {q.dtype} but query_feats[0] is {query_feats[0].dtype}; "
                            f"expected one dtype for all layers")
    check_same_device({f"query_feats[{i}]": q for i, q in enumerate(query_feats)}
                      | {f"support_feats[{i}]": s for i, s in enumerate(support_feats)})
    return list(query_feats), list(support_feats)


def refuse_vmap(tensors) -> None:
    """Raise when ``tensors`` (None allowed) carry a ``torch.func.vmap`` dimension, at any depth of the
    transforms (``vmap(grad(f))`` wraps them in a gradient level first), of the features or of the mask
    alone: the hypercorrelation's and the fused layer's sparse paths choose support columns from the
    data, and PyTorch's own error there ("Cannot access data pointer of Tensor that doesn't have
    storage") does not say why. Private PyTorch queries: skipped where they are missing, and while
    torch.compile traces (dynamo cannot trace them)."""
    if being_traced():
        return
    functorch = getattr(torch._C, "_functorch", None)
    try:
        vmapping = any(level.key() == functorch.TransformType.Vmap for level in functorch.get_interpreter_stack() or ())
        wrapped = any(isinstance(t, torch.Tensor) and functorch.is_functorch_wrapped_tensor(t) for t in tensors)
    except AttributeError:
        return
    if vmapping and wrapped:
        raise RuntimeError("hypertriton: the hypercorrelation and the fused first layer do not run under "
                           "torch.func.vmap (their sparse paths choose support columns from the data); pass the "
                           "episodes as one batch [B, C, H, W] instead")


def channel_hint(mask: torch.Tensor, name: str = "support_mask") -> str:
    """For a ``[B, 1, H, W]`` mask (a segmentation model's usual shape), the one-line fix."""
    return f"; for a [B, 1, H, W] mask pass {name}[:, 0]" if mask.dim() == 4 and mask.shape[1] == 1 else ""


def check_support_mask(support_mask, batch: int, device: torch.device) -> torch.Tensor:
    if not isinstance(support_mask, torch.Tensor):
        raise TypeError(f"support_mask: expected a tensor [B, H, W], got {type(support_mask).__name__}")
    if support_mask.dim() != 3:
        raise ValueError(f"support_mask: expected a 3D tensor [B, H, W], got shape {shape_of(support_mask)}"
                         f"{channel_hint(support_mask)}")
    if min(support_mask.shape[1:]) == 0:
        raise ValueError(f"support_mask: expected at least one pixel [B, H, W], got shape {shape_of(support_mask)}")
    if support_mask.shape[0] != batch:
        raise ValueError(f"support_mask has batch {support_mask.shape[0]} (shape {shape_of(support_mask)}) "
                         f"but the features have batch {batch}; expected equal batch sizes")
    if support_mask.device != device:
        raise ValueError(f"support_mask is on {support_mask.device} but the features are on {device}")
    if support_mask.is_complex():
        raise TypeError(f"support_mask: expected a real, integer or boolean tensor, got {support_mask.dtype}")
    return support_mask


def as_quadruple(value, name: str) -> tuple[int, int, int, int]:
    """An int or a 4-tuple ``(query h, query w, support h, support w)`` as a 4-tuple of ints."""
    if isinstance(value, int) and not isinstance(value, bool):
        return (value,) * 4
    if isinstance(value, Sequence) and len(value) == 4 and all(isinstance(v, int) and not isinstance(v, bool)
                                                               for v in value):
        return tuple(value)
    raise TypeError(f"{name}: expected an int or a 4-tuple of ints (query h, query w, support h, support w), "
                    f"got {value!r}")


def check_cp_conv_args(weight_query, bias_query, weight_support, bias_support, stride, padding, *,
                       in_channels: int, channels_of: str | Callable[[], str], anchor: tuple[str, object]):
    """Checks of a center-pivot conv's parameters; returns ``(stride, padding)`` as 4-tuples.

    Args:
        in_channels: the input channels the weights must expect; ``channels_of`` says where that count
            comes from, for the message (e.g. ``"x has 4 (shape [1, 4, ...])"``), or makes that text when
            called: then only on error (under ``torch.compile`` formatting sizes would specialize them).
        anchor: ``(name, tensor)`` of the input the parameters must share a device with.
        padding: None for ``kernel // 2`` on every dim.
    """
    if in_channels < 1:
        raise ValueError(f"{anchor[0]} has no input channels (shape {shape_of(anchor[1])}); expected at least one")
    check_tensor(weight_query, "weight_query", 4, "[Cout, Cin, KQh, KQw]")
    check_tensor(weight_support, "weight_support", 4, "[Cout, Cin, KSh, KSw]")
    for name, weight in (("weight_query", weight_query), ("weight_support", weight_support)):
        if weight.shape[1] != in_channels:
            source = channels_of() if callable(channels_of) else channels_of
            raise ValueError(f"{name} expects {weight.shape[1]} input channels (shape {shape_of(weight)}) but "
                             f"{source}; expected equal channel counts")
    if weight_support.shape[0] != weight_query.shape[0]:
        raise ValueError(f"weight_query has {weight_query.shape[0]} output channels but weight_support has "
                         f"{weight_support.shape[0]}; expected equal")
    for name, bias in (("bias_query", bias_query), ("bias_support", bias_support)):
        if bias is not None:
            check_tensor(bias, name, 1, "[Cout]")
            if bias.shape[0] != weight_query.shape[0]:
                raise ValueError(f"{name}: expected shape [{weight_query.shape[0]}], got {shape_of(bias)}")
    check_same_device({anchor[0]: anchor[1], "weight_query": weight_query, "bias_query": bias_query,
                       "weight_support": weight_support, "bias_support": bias_support})
    stride = as_quadruple(stride, "stride")
    if min(stride) < 1:
        raise ValueError(f"stride: expected positive values, got {stride}")
    kernels = (*weight_query.shape[-2:], *weight_support.shape[-2:])
    padding = tuple(k // 2 for k in kernels) if padding is None else as_quadruple(padding, "padding")
    if min(padding) < 0:
        raise ValueError(f"padding: expected non-negative values, got {padding}")
    return stride, padding
