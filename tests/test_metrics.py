"""mIoU / FB-IoU: hand-computed cases, and the per-episode counts against a transcription of the
original's histogram-based computation."""

from __future__ import annotations

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

from hypertriton.metrics import SegmentationMeter, intersection_union


def original_counts(pred_mask, gt_mask, ignore=None):
    """The original ``Evaluator.classify_prediction``: boundary set to 255 in both masks, then 2-bin
    histograms over [0, 1] (which skip 255). Returns ``[2, B]`` like the original."""
    pred_mask, gt_mask = pred_mask.clone().float(), gt_mask.clone().float()
    if ignore is not None:
        gt_mask = gt_mask + ignore.float() * 255
        pred_mask[gt_mask == 255] = 255
    inter, area_pred, area_gt = [], [], []
    for p, g in zip(pred_mask, gt_mask):
        hit = p[p == g]
        inter.append(torch.histc(hit, bins=2, min=0, max=1) if hit.numel() else torch.zeros(2))
        area_pred.append(torch.histc(p, bins=2, min=0, max=1))
        area_gt.append(torch.histc(g, bins=2, min=0, max=1))
    inter, area_pred, area_gt = (torch.stack(x).t() for x in (inter, area_pred, area_gt))
    return inter, area_pred + area_gt - inter


def test_counts_hand_computed():
    pred = torch.tensor([[1, 1, 0],
                         [1, 0, 0],
                         [0, 0, 0]])
    gt = torch.tensor([[1, 0, 0],
                       [1, 1, 0],
                       [0, 0, 0]])
    inter, union = intersection_union(pred, gt)
    # fg: pred {00,01,10}, gt {00,10,11}: inter 2, union 4; bg: 9 - 4 pixels in either fg = 5 both bg.
    assert inter.tolist() == [[5, 2]]
    assert union.tolist() == [[7, 4]]


def test_boundary_pixels_are_left_out_of_both_masks():
    pred = torch.tensor([[1, 1], [0, 1]])
    gt = torch.tensor([[1, 0], [0, 0]])
    ignore = torch.tensor([[0, 1], [0, 1]])  # the two wrong predictions sit on the boundary
    inter, union = intersection_union(pred, gt, ignore)
    assert inter.tolist() == [[1, 1]]
    assert union.tolist() == [[1, 1]]


@given(st.integers(1, 3), st.integers(1, 6), st.integers(1, 6), st.integers(0, 2**31 - 1), st.booleans())
@example(1, 1, 1, 0, True)
@example(2, 3, 5, 7, False)
def test_counts_match_the_original(batch, height, width, seed, with_ignore):
    generator = torch.Generator().manual_seed(seed)
    pred = torch.randint(0, 2, (batch, height, width), generator=generator)
    gt = torch.randint(0, 2, (batch, height, width), generator=generator)
    ignore = None
    if with_ignore:  # the datasets never mark a foreground pixel as boundary
        ignore = torch.randint(0, 2, (batch, height, width), generator=generator) * (1 - gt)
    inter, union = intersection_union(pred, gt, ignore)
    expected_inter, expected_union = original_counts(pred, gt, ignore)
    assert torch.equal(inter.t().double(), expected_inter.double())
    assert torch.equal(union.t().double(), expected_union.double())


def test_miou_accumulates_counts_per_class_not_per_episode():
    meter = SegmentationMeter([3, 7])
    # Two episodes of class 3: fg IoU 1/1 on a 1-pixel object and 0/3 on a 3-pixel one. The class IoU
    # is 1/4 of the summed counts (not the mean 1/2 of the episode IoUs).
    pred = torch.tensor([[[1, 0, 0, 0]], [[0, 0, 0, 0]]])
    gt = torch.tensor([[[1, 0, 0, 0]], [[0, 1, 1, 1]]]).float()
    meter.update(pred, {"query_mask": gt, "class_id": torch.tensor([3, 3])})
    # One episode of class 7: prediction covers 2 of 4 pixels, truth 1 of them: fg 1/2.
    meter.update(torch.tensor([[[1, 1, 0, 0]]]), {"query_mask": torch.tensor([[[0., 1., 0., 0.]]]),
                                                  "class_id": torch.tensor([7])})
    assert meter.per_class_iou() == pytest.approx({3: 25.0, 7: 50.0})
    assert meter.miou() == pytest.approx(37.5)
    # bg summed over classes: class 3 inter 3 + 1, union 3 + 4; class 7 inter 2, union 3 -> 6/10.
    # fg summed: inter 1 + 1 = 2, union 4 + 2 = 6 -> 1/3. FB-IoU = (0.6 + 1/3) / 2.
    assert meter.fb_iou() == pytest.approx((0.6 + 1 / 3) / 2 * 100)
    assert meter.episodes == 3


def test_unseen_class_counts_as_zero_and_empty_union_as_zero():
    meter = SegmentationMeter([0, 1])
    # Class 0 seen once with an empty truth and an empty prediction: union 0 -> IoU 0 (max(union, 1)).
    meter.update(torch.zeros(1, 2, 2), {"query_mask": torch.zeros(1, 2, 2), "class_id": torch.tensor([0])})
    assert meter.miou() == 0.0
    assert meter.per_class_iou() == {0: 0.0, 1: 0.0}
    # bg is perfect (4/4), fg has no pixel anywhere: 0 where the original gives NaN.
    assert meter.fb_iou() == pytest.approx(50.0)


def test_meter_refuses_bad_input():
    meter = SegmentationMeter([0, 1])
    with pytest.raises(ValueError, match=r"class_id \[5\] not among"):
        meter.update(torch.zeros(1, 2, 2), {"query_mask": torch.zeros(1, 2, 2), "class_id": torch.tensor([5])})
    with pytest.raises(ValueError, match="shape"):
        meter.update(torch.zeros(1, 2, 3), {"query_mask": torch.zeros(1, 2, 2), "class_id": torch.tensor([0])})
    with pytest.raises(ValueError, match="only 0 and 1"):
        meter.update(torch.full((1, 2, 2), 2), {"query_mask": torch.zeros(1, 2, 2), "class_id": torch.tensor([0])})
    with pytest.raises(ValueError, match="distinct"):
        SegmentationMeter([1, 1])
    assert meter.episodes == 0 and meter.union.sum() == 0


def test_all_reduce_without_process_group_keeps_counts():
    meter = SegmentationMeter([0])
    meter.update(torch.tensor([[1, 0]]), {"query_mask": torch.tensor([[1., 1.]]), "class_id": torch.tensor([0])})
    before = meter.miou(), meter.fb_iou(), meter.episodes
    assert (meter.all_reduce().miou(), meter.fb_iou(), meter.episodes) == before
    assert before[0] == pytest.approx(50.0)



def test_counts_added_from_two_meters_equal_one_meter_counting_both():
    # How training under torchrun sums each rank's batch into the epoch's meter.
    batches = [(torch.tensor([[[1, 0, 0, 0]], [[0, 0, 0, 0]]]), torch.tensor([[[1., 0, 0, 0]], [[0, 1, 1, 1]]]),
                torch.tensor([3, 3])),
               (torch.tensor([[[1, 1, 0, 0]]]), torch.tensor([[[0., 1, 0, 0]]]), torch.tensor([7]))]
    whole, summed = SegmentationMeter([3, 7]), SegmentationMeter([3, 7])
    for pred, gt, class_id in batches:
        whole.update(pred, {"query_mask": gt, "class_id": class_id})
        part = SegmentationMeter([3, 7])
        part.update(pred, {"query_mask": gt, "class_id": class_id})
        summed.add_counts_vector(part.counts_vector())
    assert summed.counts_vector().tolist() == whole.counts_vector().tolist()
    assert (summed.miou(), summed.episodes, summed.evaluated_classes()) == (pytest.approx(37.5), 3, [3, 7])
    with pytest.raises(ValueError, match=r"counts: expected \[11\] \(a meter over 2 classes\), got \[12\]"):
        summed.add_counts_vector(torch.zeros(12))
