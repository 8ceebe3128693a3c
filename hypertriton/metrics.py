"""mIoU and FB-IoU exactly as the original HSNet evaluation computes them.

Per episode, the predicted and the true query mask (0/1, at the evaluated resolution) give two
intersections and two unions, one for background (0) and one for foreground (1). PASCAL boundary
pixels (``query_ignore_idx == 1``, the 255 of the VOC masks) are left out of both masks. These counts
are summed per class over all episodes, and then

- ``mIoU = 100 * mean over the fold's classes c of inter_fg[c] / max(union_fg[c], 1)``
- ``FB-IoU = 100 * mean over {bg, fg} of (sum over the fold's classes of inter) / (sum of union)``

(a class never seen counts as IoU 0 in the mIoU, as in the original). Counts are kept in float64, so
they are exact integers and sum across processes without rounding (the original sums in float32).

Example::

    >>> meter = SegmentationMeter([0, 1])
    >>> pred = torch.tensor([[[1, 1], [0, 0]]])                      # [B=1, H=2, W=2]
    >>> batch = {"query_mask": torch.tensor([[[1., 0.], [0., 0.]]]), "class_id": torch.tensor([0])}
    >>> _ = meter.update(pred, batch)  # returns the batch's intersections and unions
    >>> round(meter.miou(), 2), round(meter.fb_iou(), 2)              # fg 1/2 -> (50 + 0) / 2; bg 2/3
    (25.0, 58.33)
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch

from .distributed import all_reduce_sum

__all__ = ["SegmentationMeter", "intersection_union"]


def _as_mask(name: str, value) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(value).__name__}")
    if value.dim() == 2:
        value = value[None]
    if value.dim() != 3:
        raise ValueError(f"{name} must be [B, H, W] (or [H, W]), got shape {tuple(value.shape)}")
    return value


def intersection_union(pred_mask: torch.Tensor, gt_mask: torch.Tensor,
                       ignore_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-episode background/foreground intersection and union of two 0/1 masks.

    Args:
        pred_mask: predicted mask ``[B, H, W]`` (or ``[H, W]``), values 0/1 (any dtype).
        gt_mask: true mask, same shape, values 0/1.
        ignore_mask: optional, same shape; pixels where it is nonzero (PASCAL boundary) are left out of
            both masks.

    Returns:
        ``(intersection, union)``, each ``[B, 2]`` int64 pixel counts, column 0 background,
        column 1 foreground.
    """
    pred = _as_mask("pred_mask", pred_mask)
    gt = _as_mask("gt_mask", gt_mask).to(pred.device)
    if pred.shape != gt.shape:
        raise ValueError(f"pred_mask has shape {tuple(pred.shape)} but the true mask has {tuple(gt.shape)}; "
                         f"predict at the evaluated resolution (the query mask's size)")
    for name, mask in (("pred_mask", pred), ("gt_mask", gt)):
        if ((mask != 0) & (mask != 1)).any():
            raise ValueError(f"{name} must hold only 0 and 1, got values {torch.unique(mask).tolist()[:8]}")
    valid = torch.ones_like(gt, dtype=torch.bool)
    if ignore_mask is not None:
        ignore = _as_mask("ignore_mask", ignore_mask).to(pred.device)
        if ignore.shape != gt.shape:
            raise ValueError(f"ignore_mask has shape {tuple(ignore.shape)}, expected {tuple(gt.shape)}")
        valid = ignore == 0
    pred_fg, gt_fg = (pred == 1) & valid, (gt == 1) & valid
    pred_bg, gt_bg = (pred == 0) & valid, (gt == 0) & valid

    def count(mask):
        return mask.flatten(1).sum(1)

    inter = torch.stack([count(pred_bg & gt_bg), count(pred_fg & gt_fg)], dim=1)
    area_pred = torch.stack([count(pred_bg), count(pred_fg)], dim=1)
    area_gt = torch.stack([count(gt_bg), count(gt_fg)], dim=1)
    return inter, area_pred + area_gt - inter


class SegmentationMeter:
    """Per-class accumulation of bg/fg intersections and unions over episodes.

    Args:
        class_ids: the 0-based classes the scores average over (the fold's test classes,
            ``dataset.class_ids``). Updates for any other class are refused.

    Attributes:
        intersection, union: float64 ``[2, len(class_ids)]`` (row 0 background, row 1 foreground).
        class_episodes: float64 ``[len(class_ids)]``, episodes counted per class.
        episodes: number of episodes counted.
    """

    def __init__(self, class_ids: Sequence[int]):
        class_ids = [int(c) for c in class_ids]
        if not class_ids:
            raise ValueError("class_ids must name at least one class, got an empty list")
        if len(set(class_ids)) != len(class_ids):
            raise ValueError(f"class_ids must be distinct, got {class_ids}")
        self.class_ids = class_ids
        self._column = {c: i for i, c in enumerate(class_ids)}
        self.intersection = torch.zeros(2, len(class_ids), dtype=torch.float64)
        self.union = torch.zeros(2, len(class_ids), dtype=torch.float64)
        self.class_episodes = torch.zeros(len(class_ids), dtype=torch.float64)
        self.episodes = 0

    def update(self, pred_mask: torch.Tensor, batch: Mapping) -> tuple[torch.Tensor, torch.Tensor]:
        """Count one batch of episodes.

        Args:
            pred_mask: ``[B, H, W]`` 0/1 prediction at the size of ``batch["query_mask"]``.
            batch: a (collated) batch dict with ``query_mask`` ``[B, H, W]``, ``class_id`` ``[B]`` and
                optionally ``query_ignore_idx`` ``[B, H, W]``.

        Returns:
            the batch's ``(intersection, union)``, each ``[B, 2]`` (for per-episode IoU).
        """
        inter, union = intersection_union(pred_mask, batch["query_mask"], batch.get("query_ignore_idx"))
        self.update_counts(inter, union, batch["class_id"])
        return inter, union

    def update_counts(self, inter: torch.Tensor, union: torch.Tensor, class_id) -> None:
        """Add precomputed ``[B, 2]`` intersections and unions for episodes of classes ``class_id`` ``[B]``."""
        class_id = torch.as_tensor(class_id).reshape(-1).tolist()
        if inter.shape != (len(class_id), 2) or union.shape != inter.shape:
            raise ValueError(f"expected inter and union of shape [{len(class_id)}, 2], got "
                             f"{tuple(inter.shape)} and {tuple(union.shape)}")
        unknown = sorted({c for c in class_id if c not in self._column})
        if unknown:
            raise ValueError(f"class_id {unknown} not among the meter's classes {self.class_ids}")
        columns = torch.tensor([self._column[c] for c in class_id], dtype=torch.long)
        self.intersection.index_add_(1, columns, inter.detach().to("cpu", torch.float64).t())
        self.union.index_add_(1, columns, union.detach().to("cpu", torch.float64).t())
        self.class_episodes.index_add_(0, columns, torch.ones(len(class_id), dtype=torch.float64))
        self.episodes += len(class_id)

    def counts_vector(self) -> torch.Tensor:
        """Every count in one float64 vector ``[2 * 2 * n_classes + n_classes + 1]`` (intersections, unions,
        episodes per class, episodes), to be summed over processes in one collective."""
        return torch.cat([self.intersection.flatten(), self.union.flatten(), self.class_episodes,
                          torch.tensor([float(self.episodes)], dtype=torch.float64)])

    def add_counts_vector(self, counts: torch.Tensor) -> "SegmentationMeter":
        """Add counts in :meth:`counts_vector`'s layout (another meter's, or a sum of several)."""
        n, k = self.intersection.numel(), self.class_episodes.numel()
        if counts.shape != (2 * n + k + 1,):
            raise ValueError(f"counts: expected [{2 * n + k + 1}] (a meter over {k} classes), "
                             f"got {list(counts.shape)}")
        counts = counts.to(torch.float64)
        self.intersection = self.intersection + counts[:n].view_as(self.intersection)
        self.union = self.union + counts[n:2 * n].view_as(self.union)
        self.class_episodes = self.class_episodes + counts[2 * n:2 * n + k]
        self.episodes += int(counts[-1].item())
        return self

    def all_reduce(self) -> "SegmentationMeter":
        """Sum the counts over all processes (no-op without an initialized process group)."""
        counts = all_reduce_sum(self.counts_vector())
        # New tensors, not zeroed in place: a saved state may still hold the old ones.
        self.intersection, self.union = torch.zeros_like(self.intersection), torch.zeros_like(self.union)
        self.class_episodes, self.episodes = torch.zeros_like(self.class_episodes), 0
        return self.add_counts_vector(counts)

    def iou(self) -> torch.Tensor:
        """``[2, n_classes]`` bg/fg IoU per class in [0, 1] (union clamped to 1 as the original)."""
        return self.intersection / self.union.clamp(min=1)

    def per_class_iou(self) -> dict[int, float]:
        """Foreground IoU x100 per class id."""
        return {c: float(v) * 100 for c, v in zip(self.class_ids, self.iou()[1].tolist())}

    def miou(self) -> float:
        """Mean foreground IoU over the meter's classes, x100 (as the protocol: a class no episode has
        counted adds 0, which a full run over a benchmark's episodes never leaves)."""
        return float(self.iou()[1].mean()) * 100

    def evaluated_classes(self) -> list[int]:
        """The class ids at least one episode has counted."""
        return [c for c, n in zip(self.class_ids, self.class_episodes.tolist()) if n > 0]

    def miou_of_evaluated_classes(self) -> float | None:
        """Mean foreground IoU x100 over :meth:`evaluated_classes` only (a truncated run's fair summary),
        or None before any episode."""
        seen = self.class_episodes > 0
        return float(self.iou()[1][seen].mean()) * 100 if bool(seen.any()) else None

    def fb_iou(self) -> float:
        """Mean of the background and foreground IoU of the class-summed counts, x100.

        A side with a zero summed union (no such pixel in any prediction or truth) counts as 0 where
        the original would give NaN.
        """
        inter, union = self.intersection.sum(1), self.union.sum(1)
        return float((inter / union.clamp(min=1)).mean()) * 100
