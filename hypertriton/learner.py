"""HSNet's learner (``HPNLearner``): squeezes the hypercorrelation pyramid and decodes it to mask logits.

Built from :class:`hypertriton.CenterPivotConv4d` with the original module names and layout, so the
``hpn_learner.*`` part of an original checkpoint loads unchanged.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .backend import check_backend_name, resolve_backend
from ._hooks import has_hooks, hooks_below
from .modules import CenterPivotConv4d, GroupNorm4d, ReLUAfterGroupNorm, calling_each_module
from .ops import cpu_conv
from .ops._autocast import autocast_enabled
from .ops._validation import AUTOCAST_INPUT_DTYPES, shape_of
from .ops.center_pivot_conv4d import MIN_CONSTANT_SHARE, center_pivot_conv4d_split
from .ops.fused_first_layer import fused_hypercorrelation_cp_conv
from .ops.hypercorrelation import hypercorrelation
from .ops.layout import (autocast_output_dtype, empty_query_major, group_affine, group_norm_split, is_query_major,
                         merge_moments, normalize_query_major, query_major_moments, resize_query_dims,
                         split_constant_columns, to_query_major)

__all__ = ["HPNLearner", "make_building_block", "resize_4d"]

SQUEEZE_CHANNELS = (16, 64, 128)
# The original's squeezing blocks, deepest level first: each layer's kernel side and support-dim stride.
SQUEEZE_KERNELS = ((3, 3, 3), (5, 3, 3), (5, 5, 3))
SQUEEZE_STRIDES = ((2, 2, 2), (4, 2, 2), (4, 4, 2))
# Working chunk of the fused layer in a streamed squeeze block (fp32: 2 MB), and its slabs' height as a
# fraction of the query map: both small beside the second layer's output, the one tensor held whole.
STREAM_CHUNK_ELEMENTS = 1 << 19
STREAM_SLABS = 8
GROUPS = 4


def make_building_block(in_channels: int, out_channels, kernel_sizes, support_strides, group: int = GROUPS,
                        backend: str | None = None) -> nn.Sequential:
    """``len(out_channels)`` x [CenterPivotConv4d (kernel k^4, stride (1, 1, s, s), padding k//2) ->
    GroupNorm(group) -> ReLU], as one ``nn.Sequential`` (conv at indices 0, 3, 6; GroupNorm at 1, 4, 7, the
    original's indices and state_dict keys). Each ReLU runs inside the GroupNorm before it
    (:class:`GroupNorm4d` ``relu=True``, one pass over memory); its own slot holds a
    :class:`hypertriton.modules.ReLUAfterGroupNorm`."""
    layers = []
    for index, (channels, kernel, stride) in enumerate(zip(out_channels, kernel_sizes, support_strides)):
        cin = in_channels if index == 0 else out_channels[index - 1]
        layers.append(CenterPivotConv4d(cin, channels, kernel, (1, 1, stride, stride), kernel // 2, backend=backend))
        # The conv's output is fresh and read by nothing else: inference may normalize it in place.
        layers.append(GroupNorm4d(group, channels, inplace=True, relu=True))
        layers.append(ReLUAfterGroupNorm())
    return nn.Sequential(*layers)


def _resize_pair(x: torch.Tensor, size: tuple[int, int], dims: str) -> torch.Tensor:
    """Bilinear (``align_corners=True``) resize of the query (``dims="query"``) or support dims of
    ``[B, C, Hq, Wq, Hs, Ws]``."""
    b, c, hq, wq, hs, ws = x.shape
    if dims == "query" and is_query_major(x):
        return resize_query_dims(x, size)
    if dims == "query":
        flat = x.permute(0, 4, 5, 1, 2, 3).reshape(b * hs * ws, c, hq, wq)
        flat = F.interpolate(flat, size, mode="bilinear", align_corners=True)
        return flat.view(b, hs, ws, c, *size).permute(0, 3, 4, 5, 1, 2)
    flat = x.permute(0, 2, 3, 1, 4, 5).reshape(b * hq * wq, c, hs, ws)
    flat = F.interpolate(flat, size, mode="bilinear", align_corners=True)
    return flat.view(b, hq, wq, c, *size).permute(0, 3, 1, 2, 4, 5)


def _check_squeeze_design(channels, kernel_sizes, support_strides) -> None:
    """The squeezing blocks' shape, named before any module is built."""
    def positive_ints(values) -> bool:
        return all(isinstance(v, numbers.Integral) and not isinstance(v, bool) and v > 0 for v in values)

    channels = list(channels)
    if len(channels) < 2 or not positive_ints(channels) or any(c % GROUPS for c in channels):
        raise ValueError(f"squeeze_channels: expected at least 2 positive ints (layers per squeezing block), each "
                         f"divisible by {GROUPS} (the GroupNorm's groups), got {tuple(channels)}")
    for name, per_block in (("kernel_sizes", kernel_sizes), ("support_strides", support_strides)):
        blocks = [list(values) for values in per_block]
        if len(blocks) != 3 or any(len(values) != len(channels) or not positive_ints(values) for values in blocks):
            raise ValueError(f"{name}: expected 3 blocks (deepest level first) of {len(channels)} positive ints "
                             f"(one per entry of squeeze_channels), got {[tuple(b) for b in blocks]}")
    if any(k % 2 == 0 for values in kernel_sizes for k in values):
        raise ValueError(f"kernel_sizes: expected odd sides (the query dims keep their size), got "
                         f"{[tuple(values) for values in kernel_sizes]}")


def _check_deepest_first(query_sizes: list[tuple[int, int]], name: str) -> None:
    """Levels come deepest first, so their query maps never shrink: given shallowest first (with equal layer
    counts, which nothing else tells apart) the logits came out at the deepest level's size, silently."""
    if any(deeper[0] > shallower[0] or deeper[1] > shallower[1]
           for deeper, shallower in zip(query_sizes, query_sizes[1:])):
        raise ValueError(f"{name}: expected the levels deepest first (layer4, layer3, layer2), each query map at "
                         f"least as large as the one before, got query sizes {query_sizes}; reversed?")


def _streamable(block: nn.Module) -> bool:
    """Whether :meth:`HPNLearner.squeeze_streamed` takes ``block``: HSNet's squeezing-block form
    (center-pivot conv, GroupNorm, ReLU, center-pivot conv, ...) with query stride 1 in both convs."""
    if not isinstance(block, nn.Sequential) or len(block) < 4:
        return False
    conv1, conv2 = block[0], block[3]
    return (isinstance(conv1, CenterPivotConv4d) and isinstance(block[1], GroupNorm4d)
            and isinstance(conv2, CenterPivotConv4d)
            and tuple(conv1.stride[:2]) == (1, 1) and tuple(conv2.stride[:2]) == (1, 1))


def _run_decoder(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``block(x)``; a Sequential's stride-1 convolutions through NNPACK where faster (CPU inference, see
    :mod:`hypertriton.ops.cpu_conv`): the same modules and parameters. Any other module is called."""
    if not isinstance(block, nn.Sequential):
        return block(x)
    for module in block:
        x = cpu_conv.run_conv_module(module, x)
    return x


def _cat_query_rows(pieces: list[torch.Tensor]) -> torch.Tensor:
    """Query-major ``[B, C, Hq_i, Wq, Hs, Ws]`` pieces stacked along the query rows, query-major."""
    first = pieces[0]
    rows = sum(p.shape[2] for p in pieces)
    out = empty_query_major((first.shape[0], first.shape[1], rows, *first.shape[3:]), first.dtype, first.device)
    start = 0
    for piece in pieces:
        out[:, :, start:start + piece.shape[2]].copy_(piece)
        start += piece.shape[2]
    return out


def resize_4d(x: torch.Tensor, query_size: tuple[int, int], support_size: tuple[int, int]) -> torch.Tensor:
    """Resize ``[B, C, Hq, Wq, Hs, Ws]`` to ``[B, C, *query_size, *support_size]``.

    Bilinear with ``align_corners=True`` over the query dims (the original's misleadingly named
    ``interpolate_support_dims``), then, only when they differ, the same over the support dims. A
    resize to the same size is the identity, so dims that already match are left untouched. Resizing
    support dims of size 1 replicates, which is what the original's broadcasting add did in the one
    mismatched case it survived (1 vs n); other mismatches crashed the original.
    """
    if tuple(x.shape[2:4]) != tuple(query_size):
        x = _resize_pair(x, tuple(query_size), "query")
    if tuple(x.shape[4:6]) != tuple(support_size):
        x = _resize_pair(x, tuple(support_size), "support")
    return x


class HPNLearner(nn.Module):
    """The HSNet learner: squeeze each hypercorrelation level, mix deep into shallow, decode.

    Args:
        inch: layers per pyramid level, deepest first (``[3, 6, 4]`` for ResNet-50, ``[3, 23, 4]`` for
            ResNet-101, ``[1, 3, 3]`` for VGG16): the ``L_p`` channels of each input level.
        backend: backend of the center-pivot convolutions (``"triton"``, ``"torch"``, ``"reference"``
            or None for automatic).
        squeeze_channels: output channels of each layer of a squeezing block (the original's
            ``(16, 64, 128)``; at least two, each divisible by 4, the GroupNorm's groups). The last is the mixing
            blocks' and decoder's width, the one before it the decoder's second.
        kernel_sizes, support_strides: per squeezing block, deepest level first, each layer's odd kernel
            side and support-dim stride (the original's ``SQUEEZE_KERNELS``, ``SQUEEZE_STRIDES``); one
            value per entry of ``squeeze_channels``.

    Differences from the original, on purpose (identical results wherever the original runs):

    - the decoder upsamples to exactly twice each side of the query map (the original used twice the
      width for both sides, assuming a square map);
    - when two levels' support grids differ after squeezing (e.g. VGG16 at 272 px: 1x1 vs 2x2), the
      deeper level's support dims are bilinearly resized (``align_corners=True``) to the shallower
      level's before adding (see :func:`resize_4d`), instead of crashing.

    Shape:
        - input: ``[corr_l4, corr_l3, corr_l2]``, each ``[B, inch[i], Hq_i, Wq_i, Hs_i, Ws_i]``
        - output: logits ``[B, 2, 2 * Hq_2, 2 * Wq_2]`` (layer2 level's query map, doubled)

    Example:
        >>> learner = HPNLearner([3, 6, 4])
        >>> pyramid = [torch.rand(1, 3, 2, 2, 2, 2), torch.rand(1, 6, 4, 4, 4, 4), torch.rand(1, 4, 8, 8, 8, 8)]
        >>> learner(pyramid).shape
        torch.Size([1, 2, 16, 16])
    """

    def __init__(self, inch: Sequence[int], backend: str | None = None,
                 squeeze_channels: Sequence[int] = SQUEEZE_CHANNELS,
                 kernel_sizes: Sequence[Sequence[int]] = SQUEEZE_KERNELS,
                 support_strides: Sequence[Sequence[int]] = SQUEEZE_STRIDES):
        super().__init__()
        inch = [int(c) if isinstance(c, numbers.Integral) and not isinstance(c, bool) else c for c in inch]
        if len(inch) != 3 or not all(isinstance(c, int) and c > 0 for c in inch):
            raise ValueError(f"inch: expected 3 positive ints (layers per level, deepest first), got {inch!r}")
        _check_squeeze_design(squeeze_channels, kernel_sizes, support_strides)
        self.inch = tuple(inch)
        self.backend = check_backend_name(backend)
        channels = [int(c) for c in squeeze_channels]
        ch2, ch3 = channels[-2:]

        def block(cin, couts, kernels, strides):
            return make_building_block(cin, couts, kernels, strides, backend=backend)

        # squeezing blocks: support dims shrink, query dims keep their size
        self.encoder_layer4 = block(inch[0], channels, list(kernel_sizes[0]), list(support_strides[0]))
        self.encoder_layer3 = block(inch[1], channels, list(kernel_sizes[1]), list(support_strides[1]))
        self.encoder_layer2 = block(inch[2], channels, list(kernel_sizes[2]), list(support_strides[2]))
        # mixing blocks
        self.encoder_layer4to3 = block(ch3, [ch3] * 3, [3, 3, 3], [1, 1, 1])
        self.encoder_layer3to2 = block(ch3, [ch3] * 3, [3, 3, 3], [1, 1, 1])
        self.decoder1 = nn.Sequential(nn.Conv2d(ch3, ch3, 3, padding=1), nn.ReLU(),
                                      nn.Conv2d(ch3, ch2, 3, padding=1), nn.ReLU())
        self.decoder2 = nn.Sequential(nn.Conv2d(ch2, ch2, 3, padding=1), nn.ReLU(),
                                      nn.Conv2d(ch2, 2, 3, padding=1))

    def _check_pyramid(self, pyramid) -> None:
        if not isinstance(pyramid, (list, tuple)) or len(pyramid) != 3:
            got = f"{len(pyramid)} items" if isinstance(pyramid, (list, tuple)) else type(pyramid).__name__
            raise ValueError(f"hypercorr_pyramid: expected a list of 3 levels [corr_l4, corr_l3, corr_l2], got {got}")
        batch = None
        for name, level, channels in zip(("corr_l4", "corr_l3", "corr_l2"), pyramid, self.inch):
            if not isinstance(level, torch.Tensor) or level.dim() != 6 or level.shape[1] != channels:
                raise ValueError(f"hypercorr_pyramid: {name} must be [B, {channels}, Hq, Wq, Hs, Ws], "
                                 f"got {shape_of(level) if isinstance(level, torch.Tensor) else type(level).__name__}")
            if batch is not None and level.shape[0] != batch:
                raise ValueError(f"hypercorr_pyramid: batch sizes differ between levels "
                                 f"({[shape_of(t) for t in pyramid]})")
            batch = level.shape[0]
        if batch == 0:
            shapes = ", ".join(shape_of(t) for t in pyramid)
            raise ValueError(f"hypercorr_pyramid: an empty batch ({shapes}); expected at least one episode")
        _check_deepest_first([tuple(level.shape[2:4]) for level in pyramid], "hypercorr_pyramid")
        dtypes = [level.dtype for level in pyramid]
        dtype = self._dtype
        # Every layer casts its weights to its input's dtype, except the decoder's plain convolutions.
        if not self._dtypes_accepted(dtypes, pyramid[0].device):
            raise TypeError(f"hypercorr_pyramid: expected levels in the learner's dtype {dtype} (under "
                            f"torch.autocast: float32, float16 or bfloat16), got {dtypes} for [corr_l4, corr_l3, "
                            "corr_l2]; convert them or move the learner with .to(dtype)")

    @property
    def _dtype(self) -> torch.dtype:
        # Read from a weight, not from parameters(): a DataParallel replica has none (its weights are
        # plain attributes). The first convolution's: a decoder of one's own need not be indexable.
        return self.encoder_layer4[0].conv1.weight.dtype

    def _dtypes_accepted(self, dtypes, device: torch.device) -> bool:
        """Inputs in the learner's dtype, or under autocast in dtypes it casts (float64 it leaves alone)."""
        if set(dtypes) == {self._dtype}:
            return True
        return autocast_enabled(device.type) and all(d in AUTOCAST_INPUT_DTYPES for d in dtypes)

    def _check_features(self, levels) -> None:
        """Before any work: a non-empty batch of features in the learner's dtype (under autocast, dtypes it
        casts), as :meth:`forward` asks of its hypercorrelation; else the decoder's convolutions fail at
        the end."""
        feats = [t for pair in levels for side in pair for t in side if isinstance(t, torch.Tensor)]
        if not feats:
            return
        _check_deepest_first([tuple(pair[0][0].shape[-2:]) for pair in levels
                              if pair[0] and isinstance(pair[0][0], torch.Tensor)], "levels")
        if feats[0].shape[0] == 0:
            raise ValueError(f"levels: an empty batch (first query features {shape_of(feats[0])}); expected at "
                             "least one episode")
        dtype = self._dtype
        dtypes = sorted({t.dtype for t in feats}, key=str)
        if not self._dtypes_accepted(dtypes, feats[0].device):
            raise TypeError(f"levels: expected features in the learner's dtype {dtype} (under torch.autocast: "
                            f"float32, float16 or bfloat16), got {dtypes}; convert them or move the learner with "
                            ".to(dtype)")

    @property
    def squeeze_blocks(self) -> tuple[nn.Sequential, nn.Sequential, nn.Sequential]:
        """The squeezing blocks, deepest level first (``encoder_layer4``, ``encoder_layer3``, ``encoder_layer2``)."""
        return self.encoder_layer4, self.encoder_layer3, self.encoder_layer2

    def query_major(self, device: torch.device) -> bool:
        """Whether the learner runs in the query-major layout on ``device`` (the ``torch`` backend; see
        :mod:`hypertriton.ops.layout`)."""
        return resolve_backend(self.backend, device) == "torch"

    def column_split_allowed(self, block: nn.Sequential, device: torch.device) -> bool:
        """Whether :meth:`squeeze_rest` may take ``block``'s first-layer output as a column split: inference
        (no gradient recorded) on the ``torch`` backend, a fused GroupNorm + ReLU and query stride 1."""
        return (self.query_major(device) and not torch.is_grad_enabled() and isinstance(block[1], GroupNorm4d)
                and isinstance(block[2], nn.Identity) and tuple(block[3].stride[:2]) == (1, 1))

    def squeeze_rest(self, block: nn.Sequential, first, bias_windows: torch.Tensor | None = None) -> torch.Tensor:
        """Finish a squeezing block from its first center-pivot layer's output ``first``: ``block[1:]``,
        query-major on the ``torch`` backend.

        ``first``: ``[B, 16, Hq, Wq, Hs', Ws']``, or (where :meth:`column_split_allowed`) its column split, a
        list of :class:`hypertriton.ops.layout.ColumnSplit` (from the fused layer, see
        :func:`hypertriton.ops.fused_first_layer.fused_hypercorrelation_cp_conv4d`). In inference (no
        gradient recorded) it may be overwritten (its GroupNorm runs in place).

        ``bias_windows``: optional ``[B, Hs'*Ws']`` bool, True where a dense ``first`` is its biases at every
        query position (from the fused layer, outside the object). After GroupNorm and ReLU those columns
        are one value per channel. Where :meth:`column_split_allowed` and at least ``MIN_CONSTANT_SHARE`` of
        the columns are such, ``first`` is split by columns
        (:func:`hypertriton.ops.layout.split_constant_columns`).

        On a column split the GroupNorm touches only the varying columns (the constant ones in closed form)
        and the second conv multiplies only those
        (:func:`hypertriton.ops.center_pivot_conv4d.center_pivot_conv4d_split`).
        """
        norm, conv = block[1], block[3]
        if isinstance(first, list):
            if not first or not self.column_split_allowed(block, first[0].first_row.device):
                raise ValueError("first: a column split needs inference (no gradient) on the torch backend and a "
                                 "block with a fused GroupNorm + ReLU and query stride 1")
            splits = first
        else:
            query_major = self.query_major(first.device)
            splits = None
            x = to_query_major(first) if query_major else first
            if (bias_windows is not None and self.column_split_allowed(block, first.device)
                    and float(bias_windows.float().mean()) >= MIN_CONSTANT_SHARE):
                splits = split_constant_columns(x, bias_windows)
                del x
        # The largest activation of the learner: no reference may outlive the conv that reads it (the
        # caller passes it as a temporary; a Sequential call would hold it to the end of the block).
        del first
        if splits is not None:
            splits = group_norm_split(splits, norm.num_groups, norm.weight, norm.bias, norm.eps, relu=norm.relu)
            x = center_pivot_conv4d_split(splits, conv.conv1.weight, conv.conv1.bias, conv.conv2.weight,
                                          conv.conv2.bias, conv.stride, conv.padding)
            del splits
            rest = block[4:]
        else:
            rest = block[1:]
        for module in rest:
            x = module(x)
        return x

    def mix(self, sqz4: torch.Tensor, sqz3: torch.Tensor, sqz2: torch.Tensor) -> torch.Tensor:
        """Mix the squeezed levels deep into shallow, then average over the support dims.

        Args:
            sqz4, sqz3, sqz2: ``[B, 128, Hq_i, Wq_i, Hs_i, Ws_i]`` from the squeezing blocks.

        Returns:
            ``[B, 128, Hq_2, Wq_2]``.
        """
        return self._mix_levels([sqz4, sqz3, sqz2])

    def _mix_levels(self, squeezed: list) -> torch.Tensor:
        """:meth:`mix` of ``squeezed`` ``[sqz4, sqz3, sqz2]``, emptied as they are read: a level that nothing
        else holds is freed once added (at 400 px the layer2 level's 5 MB would otherwise stay to the end;
        so would each block's input, held by a ``Sequential`` call)."""
        x = squeezed.pop(0)
        for block in (self.encoder_layer4to3, self.encoder_layer3to2):
            shallower = squeezed.pop(0)
            x = resize_4d(x, shallower.shape[2:4], shallower.shape[4:6]) + shallower
            del shallower
            for module in block:
                x = module(x)
        if is_query_major(x):
            # Averaged over a middle dim of the memory with channels innermost (a reduction over the
            # logical last dims would walk memory with stride C); the result is channels-last 2D.
            b, c, hq, wq = x.shape[:4]
            rows = x.permute(0, 2, 3, 4, 5, 1).reshape(b, hq, wq, -1, c)
            return rows.mean(dim=3).permute(0, 3, 1, 2)
        return x.flatten(4).mean(dim=-1)

    def encode(self, hypercorr_pyramid) -> torch.Tensor:
        """Squeeze and mix the pyramid, then average over the support dims: ``[B, 128, Hq_2, Wq_2]``."""
        self._check_pyramid(hypercorr_pyramid)
        if self.hooks_inside():  # (a subclass's encode calling this one: every hook still runs once)
            return self._encode_calling_each_module(hypercorr_pyramid)
        return self._mix([self.squeeze_rest(block, block[0](level))
                          for block, level in zip(self.squeeze_blocks, hypercorr_pyramid)])

    def _overrides(self, name: str) -> bool:
        """Whether a subclass replaced method ``name``: every path then calls it (the fast paths inline
        the original's steps, and used to skip a subclass's own silently)."""
        return getattr(type(self), name) is not getattr(HPNLearner, name)

    def _mix(self, squeezed: list) -> torch.Tensor:
        return self.mix(*squeezed) if self._overrides("mix") else self._mix_levels(squeezed)

    def decode(self, encoded: torch.Tensor) -> torch.Tensor:
        """``[B, 128, h, w]`` -> logits ``[B, 2, 2h, 2w]``."""
        decoded = _run_decoder(self.decoder1, encoded)
        decoded = F.interpolate(decoded, (2 * decoded.shape[-2], 2 * decoded.shape[-1]), mode="bilinear",
                                align_corners=True)
        # Contiguous whatever layout the encoder ran in, so callers may .view() the logits.
        return _run_decoder(self.decoder2, decoded).contiguous()

    def forward(self, hypercorr_pyramid: Sequence[torch.Tensor]) -> torch.Tensor:
        if self.hooks_inside():
            self._check_pyramid(hypercorr_pyramid)
            return self._forward_calling_each_module(hypercorr_pyramid)
        return self.decode(self.encode(hypercorr_pyramid))

    def hooks_inside(self) -> bool:
        """Whether a module inside the learner has hooks of its own (forward, pre-forward or backward).
        Its fast paths skip modules (a squeeze block's first layer runs fused with the correlation; the
        blocks' ``nn.Sequential`` are not called), feed others a column split or a query-major layout,
        and fuse each ReLU into the GroupNorm before it, normalizing in place in inference. With hooks
        inside, :meth:`forward` and :meth:`forward_fused` instead run the original's formulation, each
        block and layer called as a module (:func:`hypertriton.modules.calling_each_module`), so that
        every hook runs once and sees the original's tensors: the dense hypercorrelation and the
        original's speed and memory. Global hooks (profilers) do not count."""
        return hooks_below(self)

    def _forward_calling_each_module(self, hypercorr_pyramid) -> torch.Tensor:
        """The original HSNet learner's forward; see :meth:`hooks_inside`. A subclass's own ``encode``,
        ``mix`` or ``decode`` is called in place of the original's step."""
        with calling_each_module():
            encoded = (self.encode(hypercorr_pyramid) if self._overrides("encode")
                       else self._encode_calling_each_module(hypercorr_pyramid))
            if self._overrides("decode"):
                return self.decode(encoded)
            decoded = self.decoder1(encoded)
            decoded = F.interpolate(decoded, (2 * decoded.shape[-2], 2 * decoded.shape[-1]), mode="bilinear",
                                    align_corners=True)
            return self.decoder2(decoded).contiguous()

    def _encode_calling_each_module(self, hypercorr_pyramid) -> torch.Tensor:
        """The original's squeezing and mixing, each block called as a module (a subclass's own ``mix`` in
        place of the mixing); see :meth:`hooks_inside`."""
        with calling_each_module():
            sqz4, sqz3, sqz2 = (block(level) for block, level in zip(self.squeeze_blocks, hypercorr_pyramid))
            if self._overrides("mix"):
                return self.mix(sqz4, sqz3, sqz2)
            mix43 = self.encoder_layer4to3(resize_4d(sqz4, sqz3.shape[2:4], sqz3.shape[4:6]) + sqz3)
            mix432 = self.encoder_layer3to2(resize_4d(mix43, sqz2.shape[2:4], sqz2.shape[4:6]) + sqz2)
            return mix432.flatten(4).mean(dim=-1)

    def forward_fused(self, levels, support_mask, lean: bool = False, rows_per_step: int | None = None
                      ) -> torch.Tensor:
        """Logits ``[B, 2, 2*Hq_2, 2*Wq_2]`` from backbone features without building the hypercorrelation:
        each squeeze block's first layer runs fused with its level's correlation
        (:func:`hypertriton.ops.fused_first_layer.fused_hypercorrelation_cp_conv`; under autocast its
        correlation products take the autocast dtype). Same result as ``self(hypercorrelation(...))``.

        Args:
            levels: per pyramid level, deepest first, ``(query_feats, support_feats)``: lists of
                ``[B, C_l, Hq, Wq]`` and ``[B, C_l, Hs, Ws]``.
            support_mask: ``[B, H, W]`` or None.
            lean: in inference (no gradient recorded), stream the squeeze blocks with the largest
                first-layer outputs over query rows (:meth:`squeeze_streamed`): none is ever held whole,
                for about half the peak memory with a full mask, at the cost of computing those fused
                layers about twice. With gradients it is ignored.
            rows_per_step: query rows per streamed step (None: automatic).

        With hooks on the learner or inside it, this is ``self(dense hypercorrelation pyramid)``, as in the
        original (see :meth:`hooks_inside`).
        """
        self._check_features(levels)
        if has_hooks(self) or self.hooks_inside() or self._overrides("encode"):
            # The original's call hpn_learner(hypercorrelation pyramid), so that the learner's own hooks run
            # too (HSNet calls this method, not the module); a subclass's own encode takes the pyramid.
            return self(self._dense_pyramid(levels, support_mask))
        lean = lean and not torch.is_grad_enabled()
        # Lean mode is for memory: no NNPACK, whose layout copies would raise its peak (hypertriton.ops.cpu_conv).
        with cpu_conv.nnpack_allowed(not lean):
            squeezed = []
            streamed = self._streamed_levels(levels) if lean else [False] * 3
            for (query, support), block, stream in zip(levels, self.squeeze_blocks, streamed):
                if stream:
                    squeezed.append(self.squeeze_streamed(block, query, support, support_mask, rows_per_step))
                    continue
                # Handed over with no other reference (not even the returned pair: a call with *pair would
                # hold it to the end), so squeeze_rest frees it as soon as its next layer is done.
                # Split by columns from the start where the next layers take that form: the bias-only windows
                # (most of them around a small object) are then never stored whole.
                share = MIN_CONSTANT_SHARE if self.column_split_allowed(block, query[0].device) else None
                outputs = list(fused_hypercorrelation_cp_conv(query, support, support_mask, block[0],
                                                              backend=self.backend, return_bias_windows=True,
                                                              column_split_share=share))
                squeezed.append(self.squeeze_rest(block, outputs.pop(0), outputs.pop()))
            return self.decode(self._mix(squeezed))

    def _dense_pyramid(self, levels, support_mask) -> list[torch.Tensor]:
        """Each level's hypercorrelation ``[B, L, Hq, Wq, Hs, Ws]``, deepest first."""
        return [hypercorrelation(query, support, support_mask, backend=self.backend)[0] for query, support in levels]

    def _streamed_levels(self, levels) -> list[bool]:
        """Which levels a lean forward streams: those whose first-layer output would be at least a quarter
        of the largest one's (at 400 px only layer2's, 14x layer3's); streaming a small one saves
        nothing worth its recomputation."""
        sizes = []
        for (query, support), block in zip(levels, self.squeeze_blocks):
            conv = block[0]
            hs, ws = support[0].shape[-2:]
            sizes.append(query[0][0, 0].numel() * -(-hs // conv.stride[2]) * -(-ws // conv.stride[3]))
        # A block of one's own that :meth:`squeeze_streamed` cannot stream (its query dims strided, or not
        # conv-norm-relu-conv) runs whole: lean is a memory preference, not a reason to fail.
        return [size * 4 >= max(sizes) and _streamable(block) for size, block in zip(sizes, self.squeeze_blocks)]

    def squeeze_streamed(self, block: nn.Sequential, query, support, support_mask,
                         rows_per_step: int | None = None) -> torch.Tensor:
        """What ``squeeze_rest(block, fused first layer)`` returns, inference only, without ever holding the
        first layer's whole output ``[B, 16, Hq, Wq, Hs', Ws']`` (the learner's largest activation).

        Its GroupNorm statistics span all of it, so two passes over slabs of query rows: the first
        accumulates them (:func:`hypertriton.ops.layout.merge_moments`, exact up to rounding); the
        second computes each slab again, normalizes it and runs the second layer on it. A slab reads the
        rows that the query-dim kernels reach beyond it (the first layer's for its own output, the
        second layer's for its input; the latter are carried over from the previous slab), so every
        kept row is exact; only the second layer's output is ever whole. Equal to the unstreamed block
        up to rounding.

        Args:
            block: a squeezing block (conv, GroupNorm, ReLU slot, conv, ...; query stride 1).
            query, support: the level's feature lists ``[B, C_l, Hq, Wq]`` and ``[B, C_l, Hs, Ws]``.
            support_mask: ``[B, H, W]`` or None.
            rows_per_step: output rows per slab (None: an eighth of the map, at least the two layers' reach).
        """
        conv1, norm1, conv2 = block[0], block[1], block[3]
        if torch.is_grad_enabled():
            raise RuntimeError("squeeze_streamed: inference only (run under torch.no_grad())")
        if tuple(conv1.stride[:2]) != (1, 1) or tuple(conv2.stride[:2]) != (1, 1):
            raise ValueError(f"block: streaming needs query stride 1, got {conv1.stride[:2]} and {conv2.stride[:2]}")
        hq = query[0].shape[-2]
        reach1, reach2 = conv1.padding[0], conv2.padding[0]  # rows a query-dim kernel reaches (k = 2p + 1)
        if rows_per_step is not None and (not isinstance(rows_per_step, int) or rows_per_step < 1):
            raise ValueError(f"rows_per_step: expected a positive int or None, got {rows_per_step!r}")
        step = rows_per_step or max(reach1 + reach2, -(-hq // STREAM_SLABS))

        rows_only = self.query_major(query[0].device)  # the torch backend computes the kept rows only

        def first_rows(lo: int, hi: int) -> torch.Tensor:
            """The first layer's exact output rows ``[lo, hi)``, query-major: the fused layer on the query
            rows its query-dim kernel reaches, keeping the middle ones."""
            a, b = max(0, lo - reach1), min(hq, hi + reach1)
            slab = [q[:, :, a:b] for q in query]
            if rows_only:
                return fused_hypercorrelation_cp_conv(slab, support, support_mask, conv1, backend=self.backend,
                                                      chunk_elements=STREAM_CHUNK_ELEMENTS,
                                                      output_rows=(lo - a, hi - a))
            out = fused_hypercorrelation_cp_conv(slab, support, support_mask, conv1, backend=self.backend,
                                                 chunk_elements=STREAM_CHUNK_ELEMENTS)
            return to_query_major(out[:, :, lo - a:hi - a])

        moments = None
        # Nothing else is held yet in the first pass: slabs twice as tall there (less halo to recompute).
        for lo in range(0, hq, 2 * step):
            moments = merge_moments(moments, query_major_moments(first_rows(lo, min(hq, lo + 2 * step))))
        affine = group_affine(moments, norm1.num_groups, norm1.weight, norm1.bias, norm1.eps)[3:]

        second, carry = None, None  # carry: the normalized rows [a, ...) this slab shares with the last one
        for lo in range(0, hq, step):
            hi = min(hq, lo + step)
            a, b = max(0, lo - reach2), min(hq, hi + reach2)
            fresh_from = a if carry is None else a + carry.shape[2]
            pieces = [] if carry is None else [carry]
            if fresh_from < b:
                fresh = first_rows(fresh_from, b)
                pieces.append(normalize_query_major(fresh, affine, inplace=True, out_dtype=autocast_output_dtype(fresh),
                                                    relu=getattr(norm1, "relu", False)))  # as GroupNorm4d
                del fresh
            x = pieces[0] if len(pieces) == 1 else _cat_query_rows(pieces)
            del pieces
            # The next slab starts reach2 rows above this one's end: keep those rows (a small copy, so that
            # this slab's storage goes) instead of recomputing them.
            carry = to_query_major(x[:, :, max(0, hi - reach2) - a:].clone())
            y = conv2(block[2](x))
            del x
            if second is None:
                second = empty_query_major((y.shape[0], y.shape[1], hq, *y.shape[3:]), y.dtype, y.device)
            second[:, :, lo:hi].copy_(y[:, :, lo - a:hi - a])
            del y
        x, second = second, None
        for module in block[4:]:
            x = module(x)
        return x

    def extra_repr(self) -> str:
        return f"inch={list(self.inch)}, backend={self.backend!r}"
