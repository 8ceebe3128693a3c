"""The synthetic few-shot benchmark: class split, episode content, determinism, format, speed."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from helpers import examples
from hypothesis import example, given, settings
from hypothesis import strategies as st

from hypertriton.data import build_dataset
from hypertriton.data.synthetic import (
    ATTRIBUTES, COLOURS, NCLASS, SHAPES, TEXTURES, SyntheticDataset, attribute_labels, class_attributes, class_id_of,
    class_name, cue_baselines, denormalize_image, seen_classes, unseen_classes,
)

SIZE = 64  # small images keep the tests fast; the benchmark's default is 96


def test_class_ids_round_trip_and_names():
    assert NCLASS == len(SHAPES) * len(TEXTURES) * len(COLOURS) == 192
    for class_id in range(NCLASS):
        assert class_id_of(*class_attributes(class_id)) == class_id
    assert class_attributes(0) == (0, 0, 0)
    assert class_name(class_id_of(SHAPES.index("star"), TEXTURES.index("striped"), list(COLOURS).index("red"))) \
        == "red striped star"
    with pytest.raises(ValueError, match="class_id"):
        class_attributes(NCLASS)


@pytest.mark.parametrize("fold", range(4))
def test_folds_split_classes_into_new_combinations_of_known_attributes(fold):
    unseen, seen = unseen_classes(fold), seen_classes(fold)
    assert len(unseen) == 48 and len(seen) == 144
    assert sorted(unseen + seen) == list(range(NCLASS))
    assert all(sum(class_attributes(k)) % 4 == fold for k in unseen)
    # every shape, texture and colour value appears among the seen classes
    for attribute, count in enumerate((len(SHAPES), len(TEXTURES), len(COLOURS))):
        assert {class_attributes(k)[attribute] for k in seen} == set(range(count))
    # the four folds' unseen classes partition all classes
    if fold == 0:
        assert sorted(k for f in range(4) for k in unseen_classes(f)) == list(range(NCLASS))


def _assert_items_equal(a: dict, b: dict):
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], torch.Tensor):
            assert torch.equal(a[key], b[key]), key
        else:
            assert a[key] == b[key], key


@settings(max_examples=examples(8), deadline=None)
@given(seed=st.integers(0, 2**31 - 1), index=st.integers(0, 49), split=st.sampled_from(["trn", "val", "test"]))
@example(seed=0, index=0, split="test")
def test_episodes_are_a_function_of_seed_fold_split_and_index(seed, index, split):
    make = lambda: SyntheticDataset(fold=1, split=split, nshot=2, img_size=SIZE, episodes=50, seed=seed)
    first, second = make(), make()
    # out-of-order access must not change an episode (no shared RNG state)
    second[(index + 7) % 50]
    _assert_items_equal(first[index], second[index])
    other = SyntheticDataset(fold=1, split=split, nshot=2, img_size=SIZE, episodes=50, seed=seed + 1)[index]
    assert not torch.equal(first[index]["query_img"], other["query_img"])


def test_more_shots_extend_the_same_episode():
    one = SyntheticDataset(split="test", nshot=1, img_size=SIZE, episodes=5)[3]
    five = SyntheticDataset(split="test", nshot=5, img_size=SIZE, episodes=5)[3]
    assert torch.equal(one["query_img"], five["query_img"])
    assert torch.equal(one["support_imgs"][0], five["support_imgs"][0])
    assert torch.equal(one["support_masks"][0], five["support_masks"][0])
    assert not torch.equal(five["support_imgs"][0], five["support_imgs"][1])


@settings(max_examples=examples(6), deadline=None)
@given(fold=st.integers(0, 3), split=st.sampled_from(["trn", "test"]), seed=st.integers(0, 1000))
def test_every_query_has_a_distractor_sharing_each_attribute(fold, split, seed):
    dataset = SyntheticDataset(fold=fold, split=split, nshot=1, img_size=SIZE, episodes=40, seed=seed)
    allowed = set(seen_classes(fold)) if split == "trn" else set(unseen_classes(fold))
    for index in range(len(dataset)):
        episode = dataset.episode(index)
        target = class_attributes(episode.class_id)
        assert episode.query_classes[0] == episode.class_id and episode.class_id in allowed
        distractors = [class_attributes(k) for k in episode.query_classes[1:]]
        assert len(distractors) == 3
        for a in range(len(ATTRIBUTES)):
            assert any(d[a] == target[a] for d in distractors), (index, ATTRIBUTES[a])
        # each distractor shares one or two attributes, never all three
        assert all(1 <= sum(d[a] == target[a] for a in range(3)) <= 2 for d in distractors)
        if split == "trn":  # unseen classes never appear in training, not even as distractors
            assert set(episode.query_classes) <= set(seen_classes(fold))
        # every object is drawn and visible; the truth is exactly the target's pixels
        labels = episode.query_labels
        assert set(np.unique(labels).tolist()) == set(range(len(episode.query_classes) + 1))
        np.testing.assert_array_equal(episode.query_mask(), (labels == 1).astype(np.float32))
        np.testing.assert_array_equal(episode.cue_mask("all"), (labels > 0).astype(np.float32))


def test_item_has_the_original_format():
    dataset = SyntheticDataset(split="test", fold=2, nshot=3, img_size=SIZE, episodes=4)
    item = dataset[1]
    assert item["query_img"].shape == (3, SIZE, SIZE) and item["query_img"].dtype == torch.float32
    assert item["support_imgs"].shape == (3, 3, SIZE, SIZE)
    assert item["query_mask"].shape == (SIZE, SIZE) and item["support_masks"].shape == (3, SIZE, SIZE)
    for mask in (item["query_mask"], item["support_masks"]):
        assert set(mask.unique().tolist()) == {0.0, 1.0}
    assert all(m.sum() > 0 for m in item["support_masks"])
    assert torch.count_nonzero(item["query_ignore_idx"]) == 0 and item["support_ignore_idxs"].shape == (3, SIZE, SIZE)
    assert item["org_query_imsize"] == (SIZE, SIZE)
    assert item["class_id"].dtype == torch.int64 and int(item["class_id"]) in dataset.class_ids
    assert len(item["support_names"]) == 3 and item["query_name"] != item["support_names"][0]
    # images are ImageNet-normalised: undoing it gives [0, 1] pixels again
    rgb = denormalize_image(item["query_img"])
    assert rgb.shape == (SIZE, SIZE, 3) and 0.0 <= rgb.min() and rgb.max() <= 1.0 and rgb.std() > 0.05
    # test episodes cycle through the unseen classes in order
    assert [int(dataset[i]["class_id"]) for i in range(2)] == unseen_classes(2)[:2]


def test_episode_names_match_the_items():
    for split in ("test", "trn"):
        dataset = SyntheticDataset(split=split, fold=1, nshot=2, img_size=SIZE, episodes=5)
        names = dataset.episode_names(count=3)
        assert len(names) == 3
        for index, episode in enumerate(names):
            item = dataset[index]
            assert episode.query == item["query_name"] and list(episode.supports) == item["support_names"]
            assert episode.class_id == int(item["class_id"])
    assert len(SyntheticDataset(split="val", episodes=7, img_size=SIZE).episode_names()) == 7


def test_build_dataset_makes_the_synthetic_benchmark():
    dataset = build_dataset("synthetic", None, None, fold=3, split="val", nshot=1, img_size=SIZE)
    assert isinstance(dataset, SyntheticDataset) and dataset.class_ids == unseen_classes(3)
    assert len(dataset) == 1000
    # val and test draw different episodes of the same classes
    test = SyntheticDataset(fold=3, split="test", img_size=SIZE, episodes=2)
    assert not torch.equal(dataset[0]["query_img"], test[0]["query_img"])


@pytest.mark.parametrize("kwargs, match", [
    ({"fold": 4}, "fold"), ({"split": "train"}, "split"), ({"nshot": 0}, "nshot"), ({"img_size": 16}, "img_size"),
    ({"episodes": 0}, "episodes"),
])
def test_bad_arguments_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SyntheticDataset(**kwargs)


def test_index_out_of_range():
    dataset = SyntheticDataset(episodes=3, img_size=SIZE)
    with pytest.raises(IndexError):
        dataset[3]
    assert len(list(dataset)) == 3  # iteration stops at the end


def test_attribute_labels_hand_computed():
    labels = np.array([[0, 1], [2, 0]])
    classes = [class_id_of(3, 1, 5), class_id_of(0, 2, 0)]
    expected = np.array([[[0, 0, 0], [4, 2, 6]], [[1, 3, 1], [0, 0, 0]]])
    np.testing.assert_array_equal(attribute_labels(labels, classes), expected)


def test_no_single_cue_solves_the_benchmark():
    dataset = SyntheticDataset(split="test", img_size=SIZE, episodes=96)
    result = cue_baselines(dataset)
    assert result["all"]["miou"] <= 40  # "segment every object"
    # a one-attribute oracle also takes the distractors sharing that attribute
    for cue in ATTRIBUTES:
        assert result[cue]["miou"] < 60, cue


def test_drawing_an_episode_takes_milliseconds():
    dataset = SyntheticDataset(split="trn", nshot=1, img_size=96, episodes=40)
    dataset[0]
    start = time.perf_counter()
    for index in range(40):
        dataset[index]
    assert (time.perf_counter() - start) / 40 < 0.05  # about 3 ms here; generous for a loaded CI machine


def test_pretrain_backbone_writes_torchvision_weights_that_hsnet_loads(tmp_path):
    from hypertriton.data.synthetic import pretrain_backbone
    from hypertriton.model import HSNet

    out = tmp_path / "backbone.pth"
    summary = pretrain_backbone(out, "resnet18", fold=0, img_size=32, steps=2, bsz=2, lr=1e-3, progress=False,
                                lr_schedule="cosine")
    assert summary["steps"] == 2 and np.isfinite(summary["loss"])
    weights = torch.load(out, map_location="cpu", weights_only=True)
    model = HSNet("resnet18", backbone_weights=str(out))
    for name, value in model.backbone.state_dict().items():
        assert torch.equal(value, weights[name]), name
    # Training changed the random initialisation it started from.
    torch.manual_seed(0)
    untrained = HSNet("resnet18").backbone.state_dict()
    assert not torch.equal(untrained["conv1.weight"], weights["conv1.weight"])
