"""Thin ``nn.Module`` wrappers over the ops: :class:`HyperCorr`, :class:`CenterPivotConv4d` and
:class:`GroupNorm4d`."""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ._hooks import has_global_forward_hooks, has_hooks
from .backend import check_backend_name
from .ops._autocast import autocast_enabled
from .ops._validation import as_quadruple, check_tensor, shape_of
from .ops.center_pivot_conv4d import center_pivot_conv4d, output_size
from .ops.hypercorrelation import hypercorrelation
from .ops.layout import autocast_output_dtype, group_norm

__all__ = ["HyperCorr", "CenterPivotConv4d", "GroupNorm4d", "ReLUAfterGroupNorm", "calling_each_module"]


# True while a model calls each of its modules as the original HSNet does, so that hooks on them run and
# see the original's tensors (see calling_each_module).
_calling_each_module = contextvars.ContextVar("hypertriton_calling_each_module", default=False)


@contextlib.contextmanager
def calling_each_module():
    """Within this block :class:`GroupNorm4d` is a plain ``nn.GroupNorm`` (no ReLU fused into it, never in
    place) and :class:`ReLUAfterGroupNorm` applies the ReLU: a model that calls each of its modules (as
    :class:`hypertriton.HPNLearner` does when they carry hooks) gives every module the original's input
    and output."""
    token = _calling_each_module.set(True)
    try:
        yield
    finally:
        _calling_each_module.reset(token)


class HyperCorr(nn.Module):
    """Multi-layer hypercorrelation as a module (no parameters); see :func:`hypertriton.hypercorrelation`.

    Args:
        backend: ``"triton"``, ``"torch"``, ``"reference"`` or None (automatic).

    Shape:
        - query_feats: list of ``[B, C_l, Hq_l, Wq_l]``, shallow to deep
        - support_feats: list of ``[B, C_l, Hs_l, Ws_l]``
        - support_mask: ``[B, H, W]`` (optional, any size)
        - output: list of ``[B, L_p, Hq, Wq, Hs, Ws]``, deepest level first

    Example:
        >>> corr = HyperCorr()
        >>> feats = [torch.randn(2, 16, 7, 7) for _ in range(3)]
        >>> [t.shape for t in corr(feats, feats, torch.ones(2, 28, 28))]
        [torch.Size([2, 3, 7, 7, 7, 7])]
    """

    def __init__(self, backend: str | None = None):
        super().__init__()
        self.backend = check_backend_name(backend)

    def forward(self, query_feats: Sequence[torch.Tensor], support_feats: Sequence[torch.Tensor],
                support_mask: torch.Tensor | None = None) -> list[torch.Tensor]:
        return hypercorrelation(query_feats, support_feats, support_mask, backend=self.backend)

    def extra_repr(self) -> str:
        return f"backend={self.backend!r}"


class CenterPivotConv4d(nn.Module):
    """Center-pivot 4D convolution; see :func:`hypertriton.center_pivot_conv4d`.

    Same arguments and parameter names as the original HSNet module (children ``conv1`` over the query
    dims and ``conv2`` over the support dims), so original state_dicts load unchanged. Unlike the
    original, nothing is cached between calls (input sizes may change) and batch 1 keeps its batch dim.

    Args:
        in_channels, out_channels: channel counts.
        kernel_size: int or ``(query h, query w, support h, support w)``.
        stride: int or 4-tuple; HSNet uses ``(1, 1, s, s)``.
        padding: int, 4-tuple or None (``kernel // 2``).
        bias: whether both convolutions have biases.
        backend: ``"triton"``, ``"torch"``, ``"reference"`` or None (automatic).

    Shape:
        - input: ``[B, Cin, Hq, Wq, Hs, Ws]``
        - output: ``[B, Cout, ceil(Hq/sqh), ceil(Wq/sqw), ceil(Hs/ssh), ceil(Ws/ssw)]``

    Example:
        >>> conv = CenterPivotConv4d(3, 16, 3, (1, 1, 2, 2), 1)
        >>> conv(torch.randn(2, 3, 7, 7, 7, 7)).shape
        torch.Size([2, 16, 7, 7, 4, 4])
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | tuple[int, ...] = 3,
                 stride: int | tuple[int, ...] = 1, padding: int | tuple[int, ...] | None = None,
                 bias: bool = True, backend: str | None = None):
        super().__init__()
        kernel_size = as_quadruple(kernel_size, "kernel_size")
        stride = as_quadruple(stride, "stride")
        padding = tuple(k // 2 for k in kernel_size) if padding is None else as_quadruple(padding, "padding")
        for name, values, least in (("kernel_size", kernel_size, 1), ("stride", stride, 1), ("padding", padding, 0)):
            if min(values) < least:
                raise ValueError(f"{name}: expected values >= {least} (query h, query w, support h, support w), "
                                 f"got {values}")
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size[:2], stride=stride[:2], padding=padding[:2],
                               bias=bias)
        self.conv2 = nn.Conv2d(in_channels, out_channels, kernel_size[2:], stride=stride[2:], padding=padding[2:],
                               bias=bias)
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride, self.padding = kernel_size, stride, padding
        self.backend = check_backend_name(backend)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(x, torch.Tensor) and x.dim() == 6 and x.shape[1] != self.in_channels:
            raise ValueError(f"x: {type(self).__name__} expects {self.in_channels} input channels "
                             f"[B, {self.in_channels}, Hq, Wq, Hs, Ws], got shape {shape_of(x)}")
        if has_hooks(self.conv1) or has_hooks(self.conv2):
            return self._forward_through_the_branch_modules(x)
        return center_pivot_conv4d(x, self.conv1.weight, self.conv1.bias, self.conv2.weight, self.conv2.bias,
                                   self.stride, self.padding, backend=self.backend)

    def _forward_through_the_branch_modules(self, x: torch.Tensor) -> torch.Tensor:
        """The original's formulation, calling ``conv1`` and ``conv2`` as modules, so that their hooks run
        (feature capture; ``weight_norm``, ``spectral_norm`` and pruning, which recompute the weights in a
        pre-hook) and see what the original's saw: ``conv1`` the query maps ``[B*Hs'*Ws', Cin, Hq, Wq]`` at
        the pivot support positions, ``conv2`` the support maps ``[B*Hq'*Wq', Cin, Hs, Ws]`` at the pivot
        query positions (the original's at every query position: the same with query stride 1). Equal to
        the fused op up to rounding. As ``nn.Conv2d`` modules, the branches take ``x`` in their weights'
        dtype only (or any dtype under autocast); the op would cast the weights."""
        check_tensor(x, "x", 6, "[B, Cin, Hq, Wq, Hs, Ws]")
        weights = {self.conv1.weight.dtype, self.conv2.weight.dtype}
        if weights != {x.dtype} and not autocast_enabled(x.device.type):
            raise TypeError(f"x: {x.dtype} against conv1/conv2 weights in {sorted(weights, key=str)}; with hooks on "
                            "conv1 or conv2 they run as nn.Conv2d modules, which take their own dtype: convert x, "
                            "move the module with .to(dtype), or run under torch.autocast")
        output_size(x.shape, self.kernel_size[:2], self.kernel_size[2:], self.stride, self.padding)  # the op's check
        sqh, sqw, ssh, ssw = self.stride
        pivots_s = x[:, :, :, :, ::ssh, ::ssw]
        b, c, hq, wq, hs2, ws2 = pivots_s.shape
        query_maps = self.conv1(pivots_s.permute(0, 4, 5, 1, 2, 3).reshape(b * hs2 * ws2, c, hq, wq))
        out_q = query_maps.view(b, hs2, ws2, *query_maps.shape[1:]).permute(0, 3, 4, 5, 1, 2)
        pivots_q = x[:, :, ::sqh, ::sqw]
        _, _, hq2, wq2, hs, ws = pivots_q.shape
        support_maps = self.conv2(pivots_q.permute(0, 2, 3, 1, 4, 5).reshape(b * hq2 * wq2, c, hs, ws))
        out_s = support_maps.view(b, hq2, wq2, *support_maps.shape[1:]).permute(0, 3, 1, 2, 4, 5)
        return out_q + out_s

    def extra_repr(self) -> str:
        bias = "" if self.conv1.bias is not None else ", bias=False"
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}{bias}, backend={self.backend!r}")


class GroupNorm4d(nn.GroupNorm):
    """``nn.GroupNorm`` that keeps a query-major ``[B, C, Hq, Wq, Hs, Ws]`` input query-major (see
    :mod:`hypertriton.ops.layout`); same parameters and state_dict keys as ``nn.GroupNorm``, so original
    checkpoints load unchanged. Other layouts and ranks behave exactly as ``nn.GroupNorm``.
    ``inplace=True``: in inference (no gradient recorded) a query-major input is overwritten with the
    result (HSNet's blocks use it on the fresh output of the convolution before it), unless global forward
    hooks are registered (they may keep that output). ``relu=True``: a ReLU
    follows, fused into the same pass over memory in inference (HSNet's blocks: the ``nn.ReLU`` after it
    becomes a :class:`ReLUAfterGroupNorm`; neither has state, so checkpoints are unaffected). Under
    ``torch.autocast`` a query-major result comes in the autocast dtype (statistics stay fp32): the
    next convolution would round it so anyway, and the ReLU between commutes with that rounding.

    Example:
        >>> from hypertriton.ops.layout import to_query_major, is_query_major
        >>> norm = GroupNorm4d(2, 4)
        >>> is_query_major(norm(to_query_major(torch.randn(1, 4, 3, 3, 2, 2))))
        True
    """

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-5, affine: bool = True,
                 inplace: bool = False, relu: bool = False, **factory_kwargs):
        super().__init__(num_groups, num_channels, eps, affine, **factory_kwargs)
        self.inplace, self.relu = inplace, relu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _calling_each_module.get():
            return F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)
        out_dtype = autocast_output_dtype(x) if isinstance(x, torch.Tensor) else None
        # A global hook may have kept x (the convolution's output): not overwritten then.
        inplace = self.inplace and not has_global_forward_hooks()
        return group_norm(x, self.num_groups, self.weight, self.bias, self.eps, inplace=inplace,
                          out_dtype=out_dtype, relu=self.relu)

    def extra_repr(self) -> str:
        return super().extra_repr() + (", relu=True" if self.relu else "")


class ReLUAfterGroupNorm(nn.Identity):
    """The ReLU after a :class:`GroupNorm4d` ``relu=True``, which applies it itself: an identity, except
    within :func:`calling_each_module`, where that GroupNorm leaves the ReLU to this module. No state
    (an ``nn.ReLU``'s slot in the original's checkpoints)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x) if _calling_each_module.get() else x
