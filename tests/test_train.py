"""Training loop: loss, overfitting one batch, exact resume after a stop, atomic checkpoints in the
original format, best-checkpoint selection, AMP, the episode sampler and the ``hypertriton train`` CLI.

Everything runs on the CPU with a randomly initialised resnet18 backbone, 64 px synthetic episodes and
a few optimizer steps.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import re
import signal
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
from helpers import TORCHRUN_VARS, posix_signals

from hypertriton.data.synthetic import SyntheticDataset
from hypertriton.model import HSNet
from hypertriton.training import (BEST_CHECKPOINT, LAST_CHECKPOINT, LOG_FILE, EpisodeSampler, SeededEpisodes,
                                  TrainConfig, atomic_save, compute_loss, episode_seed, load_training_state,
                                  scheduled_lr, train, training_step)

IMG = 64


@pytest.fixture(autouse=True)
def _single_process(monkeypatch):
    # A test run under torchrun must not make these single-process runs join its group.
    for name in TORCHRUN_VARS:
        monkeypatch.delenv(name, raising=False)


def tiny_config(logpath, **overrides) -> TrainConfig:
    values = dict(benchmark="synthetic", backbone="resnet18", pretrained=False, img_size=IMG, bsz=2, epochs=2,
                  max_steps_per_epoch=3, val_episodes=2, val_bsz=2, log_every=1, device="cpu", progress=False,
                  tensorboard=False, logpath=str(logpath))
    values.update(overrides)
    return TrainConfig(**values)


def tiny_data():
    return (SyntheticDataset(split="trn", fold=0, img_size=IMG, episodes=8),
            SyntheticDataset(split="val", fold=0, img_size=IMG, episodes=2))


def read_log(logpath) -> list[dict]:
    with open(os.path.join(logpath, LOG_FILE)) as handle:
        return [json.loads(line) for line in handle]


# --------------------------------------------------------------------------------------------------
# loss and one step


def test_compute_loss_is_pixel_mean_cross_entropy():
    # Two pixels: logits (0, ln 3) with truth fg -> -log(3/4); logits (ln 2, 0) with truth bg -> -log(2/3).
    logits = torch.tensor([[[[0.0, math.log(2.0)]], [[math.log(3.0), 0.0]]]])  # [1, 2, 1, 2]
    mask = torch.tensor([[[1.0, 0.0]]])
    expected = (-math.log(3 / 4) - math.log(2 / 3)) / 2
    assert compute_loss(logits, mask).item() == pytest.approx(expected, rel=1e-6)


def test_compute_loss_with_episode_weights_sums_weighted_episode_means():
    # Episode 0: the two pixels above (mean -(log(3/4) + log(2/3)) / 2); episode 1: both logits 0 -> log 2.
    logits = torch.tensor([[[[0.0, math.log(2.0)]], [[math.log(3.0), 0.0]]], [[[0.0, 0.0]], [[0.0, 0.0]]]])
    mask = torch.tensor([[[1.0, 0.0]], [[1.0, 0.0]]])
    first, second = (-math.log(3 / 4) - math.log(2 / 3)) / 2, math.log(2.0)
    assert compute_loss(logits, mask, torch.tensor([0.5, 0.5])).item() == pytest.approx(
        compute_loss(logits, mask).item(), rel=1e-6)
    assert compute_loss(logits, mask, torch.tensor([2.0, 0.0])).item() == pytest.approx(2 * first, rel=1e-6)
    assert compute_loss(logits, mask, torch.tensor([0.0, 1.0])).item() == pytest.approx(second, rel=1e-6)


@pytest.mark.parametrize("logits_shape, mask_shape, message", [
    ((1, 3, 2, 2), (1, 2, 2), r"logits: expected shape \[B, 2, H, W\]"),
    ((1, 2, 2, 2), (1, 2, 3), "query_mask: expected shape"),
], ids=["three-classes", "mask-size"])
def test_compute_loss_rejects_bad_shapes(logits_shape, mask_shape, message):
    with pytest.raises(ValueError, match=message):
        compute_loss(torch.zeros(logits_shape), torch.zeros(mask_shape))


@pytest.mark.parametrize("values, found", [
    ([0.0, 0.6], "[0.0, 0.6000000238418579]"),  # would train towards background: 0.6 -> class 0
    ([0, 255], "[0, 255]"),  # would fail inside cross_entropy
])
def test_compute_loss_rejects_masks_other_than_zero_and_one(values, found):
    message = rf"query_mask: expected values 0 \(background\) and 1 .* found {re.escape(found)}"
    with pytest.raises(ValueError, match=message):
        compute_loss(torch.zeros(1, 2, 1, 2), torch.tensor([[values]]))
    assert compute_loss(torch.zeros(1, 2, 1, 2), torch.tensor([[[True, False]]])).item() == pytest.approx(math.log(2))


def test_a_training_batch_without_a_key_is_named():
    batch = _fixed_batch()
    del batch["query_mask"]
    model = HSNet("resnet18")
    with pytest.raises(ValueError, match=r"batch: missing \['query_mask'\]; a training batch holds"):
        training_step(model, batch, torch.optim.Adam(model.hpn_learner.parameters()))
    # Items whose supports lack the K axis: named before slicing the first shot would misname them.
    batch = _fixed_batch()
    batch["support_imgs"] = batch["support_imgs"][:, 0]
    with pytest.raises(ValueError, match=r"batch\['support_imgs'\]: expected \[B, K, 3, H, W\] \(a dataset item "
                                         r"holds K shots, \[K, 3, H, W\], even for K = 1\), got \[2, 3, "):
        training_step(model, batch, torch.optim.Adam(model.hpn_learner.parameters()))
    batch = _fixed_batch()
    batch["support_masks"] = batch["support_masks"][:, 0]
    with pytest.raises(ValueError, match=r"batch\['support_masks'\]: expected \[B, K, H, W\] .* \[K, H, W\]"):
        training_step(model, batch, torch.optim.Adam(model.hpn_learner.parameters()))


def _fixed_batch(count: int = 2) -> dict:
    dataset = SyntheticDataset(split="trn", fold=0, img_size=IMG, episodes=count)
    return torch.utils.data.default_collate([dataset[i] for i in range(count)])


def test_overfitting_one_batch_drives_the_loss_down():
    torch.manual_seed(0)
    model = HSNet("resnet18").train()
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    batch = _fixed_batch()
    backbone_before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    losses = [training_step(model, batch, optimizer) for _ in range(12)]
    assert all(math.isfinite(loss) for loss in losses)
    assert losses[-1] < 0.5 * losses[0], losses
    # The backbone is frozen: neither its weights nor its BatchNorm statistics move.
    for key, value in model.backbone.state_dict().items():
        assert torch.equal(value, backbone_before[key]), key


def test_bf16_autocast_step_on_cpu():
    torch.manual_seed(0)
    model = HSNet("resnet18").train()
    learner_before = [p.detach().clone() for p in model.hpn_learner.parameters()]
    optimizer = torch.optim.Adam(model.hpn_learner.parameters(), lr=1e-3)
    loss = training_step(model, _fixed_batch(1), optimizer, amp_dtype=torch.bfloat16)
    assert math.isfinite(loss) and 0 < loss < 5
    assert any(not torch.equal(p, q) for p, q in zip(model.hpn_learner.parameters(), learner_before))
    assert all(p.dtype == torch.float32 for p in model.hpn_learner.parameters())  # master weights stay fp32


# --------------------------------------------------------------------------------------------------
# episode order and seeding


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_episode_sampler_shards_one_epoch_with_world_independent_seeds(world_size):
    dataset = list(range(10))
    shards = []
    for rank in range(world_size):
        sampler = EpisodeSampler(dataset, world_size, rank, seed=7)
        sampler.set_epoch(3)
        shards.append(list(sampler))
    covered = {index for shard in shards for index, _ in shard}
    assert covered == set(range(10))
    assert sum(len(shard) for shard in shards) == math.ceil(10 / world_size) * world_size
    for shard in shards:
        for index, seed in shard:
            assert seed == episode_seed(7, 3, index)
    # Skipping the steps already trained leaves exactly the rest of this rank's order.
    sampler = EpisodeSampler(dataset, world_size, 0, seed=7)
    sampler.set_epoch(3)
    sampler.set_start(2)
    assert list(sampler) == shards[0][2:] and len(sampler) == len(shards[0]) - 2


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
@pytest.mark.parametrize("dataset_size", [1, 2, 5, 7, 12])
@pytest.mark.parametrize("rank_bsz", [1, 2, 3])
def test_padding_episodes_weigh_nothing_and_each_step_averages_its_real_episodes(world_size, dataset_size,
                                                                                   rank_bsz):
    """Against the sampler itself: per step, the episodes that repeat an earlier one of the epoch (the
    sampler's padding) get weight 0 and every other one W / (real episodes of the step), so that DDP's
    mean over the ranks is the mean over the step's distinct episodes; None when nothing is padded."""
    from hypertriton.training import _padding_episode_weights

    dataset = list(range(dataset_size))
    shards = []
    for rank in range(world_size):
        sampler = EpisodeSampler(dataset, world_size, rank, seed=1)
        sampler.set_epoch(2)
        shards.append([index for index, _ in sampler])
    seen = set()
    for first in range(0, len(shards[0]), rank_bsz):
        step = [shard[first:first + rank_bsz] for shard in shards]
        weights = [_padding_episode_weights(rank, world_size, dataset_size, first, len(step[rank]))
                   for rank in range(world_size)]
        repeats = [[] for _ in range(world_size)]
        # In the sampler's order (rank r's i-th episode is padded position r + W*i), which repeat one before?
        for position in range(first, first + len(step[0])):
            for rank in range(world_size):
                index = step[rank][position - first]
                repeats[rank].append(index in seen)
                seen.add(index)
        real = sum(not flag for flags in repeats for flag in flags)
        if not any(flag for flags in repeats for flag in flags):
            assert all(w is None for w in weights)
            continue
        for rank in range(world_size):
            expected = [0.0 if flag else world_size / real for flag in repeats[rank]]
            assert weights[rank].tolist() == pytest.approx(expected)
    assert seen == set(dataset)


def test_episode_seed_depends_on_seed_epoch_and_index():
    seeds = {episode_seed(s, e, i) for s in range(2) for e in range(3) for i in range(4)}
    assert len(seeds) == 24 and all(0 <= value < 2**63 for value in seeds)
    assert episode_seed(1, 2, 3) == episode_seed(1, 2, 3)


class _GlobalRngDataset(torch.utils.data.Dataset):
    """Draws from the three global streams, as the original datasets do for their supports."""

    def __len__(self):
        return 4

    def __getitem__(self, index):
        return (index, random.random(), float(np.random.rand()), float(torch.rand(())))


def test_seeded_episodes_are_a_function_of_the_seed_and_leave_global_rng_alone():
    dataset = SeededEpisodes(_GlobalRngDataset())
    random.seed(1)
    np.random.seed(1)
    torch.manual_seed(1)
    expected_next = (random.random(), float(np.random.rand()), float(torch.rand(())))
    random.seed(1)
    np.random.seed(1)
    torch.manual_seed(1)
    first, again, other = dataset[(2, 123)], dataset[(2, 123)], dataset[(2, 124)]
    assert first == again and first[0] == 2 and first[1:] != other[1:]
    assert (random.random(), float(np.random.rand()), float(torch.rand(()))) == expected_next


def test_seeded_episodes_leave_the_gpu_generators_alone(monkeypatch):
    # torch.manual_seed also reseeds every CUDA generator (and nothing restored them): drawing an episode in
    # the main process (nworker=0) moved the GPUs' random streams. Checked here by recording the reseed.
    reseeded = []
    monkeypatch.setattr(torch.cuda, "manual_seed_all", lambda seed: reseeded.append(seed))
    monkeypatch.setattr(torch.cuda, "_is_in_bad_fork", lambda: False)
    torch.manual_seed(5)
    assert reseeded == [5]  # the stand-in sees what torch.manual_seed does
    reseeded.clear()
    dataset = SeededEpisodes(_GlobalRngDataset())
    assert dataset[(0, 11)] == dataset[(0, 11)]
    assert reseeded == []


# --------------------------------------------------------------------------------------------------
# the loop: files, best checkpoint, resume


class _ScriptedValidation:
    """validate_fn returning a fixed mIoU sequence and remembering the learner weights it saw."""

    def __init__(self, mious):
        self.mious, self.seen, self.saved_before = list(mious), [], []

    def __call__(self, model, dataset, config, device, show_progress):
        self.seen.append({k: v.clone() for k, v in model.state_dict().items()})
        # What a kill during this validation would leave: the epoch's training must be in last.pt already.
        state = load_training_state(Path(config.logpath) / LAST_CHECKPOINT)
        self.saved_before.append(((state["epoch"], state["step"], state["global_step"]),
                                  all(torch.equal(value, self.seen[-1][key]) for key, value in state["model"].items())))
        miou = self.mious[len(self.seen) - 1]
        return {"miou": miou, "fbiou": miou / 2}


def test_best_checkpoint_is_the_best_validated_model_in_original_format(tmp_path):
    trn, val = tiny_data()
    validation = _ScriptedValidation([10.0, 30.0, 20.0])
    # img_size applies to built datasets only: these come at IMG px, which config.json records for predict.
    summary = train(tiny_config(tmp_path, epochs=3, max_steps_per_epoch=1, img_size=400), train_dataset=trn,
                    val_dataset=val, validate_fn=validation)
    assert summary["best_epoch"] == 1 and summary["best_miou"] == 30.0 and summary["epochs_completed"] == 3
    assert validation.saved_before == [((0, 1, 1), True), ((1, 1, 2), True), ((2, 1, 3), True)]
    # Only the final files: every temporary file was renamed into place.
    assert sorted(os.listdir(tmp_path)) == sorted([BEST_CHECKPOINT, LAST_CHECKPOINT, LOG_FILE, "config.json"])
    recorded = json.loads((tmp_path / "config.json").read_text())
    assert recorded["img_size"] == IMG and "model" not in recorded
    from hypertriton.predict import load_model
    assert load_model(tmp_path / BEST_CHECKPOINT)[1] == IMG

    raw = torch.load(tmp_path / BEST_CHECKPOINT, map_location="cpu", weights_only=True)
    assert raw and all(key.startswith("module.") for key in raw)
    loaded = HSNet.from_checkpoint(tmp_path / BEST_CHECKPOINT)
    for key, value in loaded.state_dict().items():
        assert torch.equal(value, validation.seen[1][key]), key

    state = load_training_state(tmp_path / LAST_CHECKPOINT)
    assert (state["epoch"], state["step"], state["global_step"]) == (3, 0, 3)
    assert state["best_miou"] == 30.0 and state["best_epoch"] == 1
    for key, value in state["model"].items():
        assert torch.equal(value, validation.seen[2][key]), key

    rows = read_log(tmp_path)
    epochs = [row for row in rows if row["event"] == "epoch"]
    assert [row["val_miou"] for row in epochs] == [10.0, 30.0, 20.0]
    assert [row["best_miou"] for row in epochs] == [10.0, 30.0, 30.0]
    assert [row["epoch"] for row in rows if row["event"] == "best"] == [0, 1]
    assert rows[0]["event"] == "start" and rows[-1]["event"] == "end"


def test_a_second_ctrl_c_while_the_best_model_is_written_keeps_it_for_the_resumed_run(tmp_path, monkeypatch):
    import hypertriton.checkpoint as checkpoint

    trn, val = tiny_data()
    validation = _ScriptedValidation([10.0, 30.0, 30.0, 20.0])
    write = checkpoint.save_checkpoint
    calls = []

    def interrupted_on_the_second_write(model, path):
        calls.append(path)
        if len(calls) == 2:  # epoch 1's new best
            raise KeyboardInterrupt
        return write(model, path)

    monkeypatch.setattr(checkpoint, "save_checkpoint", interrupted_on_the_second_write)
    config = tiny_config(tmp_path, epochs=3, max_steps_per_epoch=1)
    with pytest.raises(KeyboardInterrupt):
        train(config, train_dataset=trn, val_dataset=val, validate_fn=validation)
    state = load_training_state(tmp_path / LAST_CHECKPOINT)
    assert (state["epoch"], state["best_miou"], state["best_epoch"]) == (1, 10.0, 0)

    monkeypatch.setattr(checkpoint, "save_checkpoint", write)
    summary = train(dataclasses.replace(config, resume="auto"), train_dataset=trn, val_dataset=val,
                    validate_fn=validation)
    assert (summary["best_epoch"], summary["best_miou"]) == (1, 30.0)
    for key, value in HSNet.from_checkpoint(tmp_path / BEST_CHECKPOINT).state_dict().items():
        assert torch.equal(value, validation.seen[2][key]), key  # epoch 1's weights, validated again


def test_numpy_numbers_and_paths_in_the_recipe_leave_a_resumable_last_pt(tmp_path):
    """last.pt is read back with weights_only=True, which refuses numpy scalars: a np.float64 rate (which
    passes as a float) or a validate_fn's np.float64 mIoU once made a run that could never resume."""
    import numpy as np

    trn, val = tiny_data()
    validation = _ScriptedValidation([np.float64(10.0), np.float64(30.0)])
    config = dataclasses.replace(tiny_config(tmp_path, lr=np.logspace(-4, -2, 3)[1], epochs=2, max_steps_per_epoch=1),
                                 logpath=tmp_path)
    train(config, train_dataset=trn, val_dataset=val, validate_fn=validation)
    state = load_training_state(tmp_path / LAST_CHECKPOINT)
    assert type(state["best_miou"]) is float and state["best_miou"] == 30.0
    assert type(state["config"]["lr"]) is float and state["config"]["logpath"] == str(tmp_path)
    assert type(state["optimizer"]["param_groups"][0]["lr"]) is float


def test_a_state_holding_more_than_plain_values_is_refused_naming_what_it_holds(tmp_path):
    import numpy as np

    torch.save({"best_miou": np.float64(1.0)}, tmp_path / "numpy.pt")
    with pytest.raises(ValueError, match=r"plain containers \(a numpy\.[\w.]*scalar\)"):
        load_training_state(tmp_path / "numpy.pt")


def test_an_error_in_training_closes_the_log(tmp_path):
    """Closed, not left to the garbage collector (which warns, and only runs when nothing keeps the error's
    frames: a caller's process group kept them)."""
    import gc
    import warnings

    trn, val = tiny_data()

    def fail(info):
        raise RuntimeError("a callback's bug")

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(RuntimeError, match="a callback's bug"):
            train(tiny_config(tmp_path, epochs=1, max_steps_per_epoch=1), train_dataset=trn, val_dataset=val,
                  on_step=fail)
        gc.collect()
    assert not [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)]
    assert [row["event"] for row in read_log(tmp_path)] == ["start", "step"]


def test_a_second_ctrl_c_during_the_steps_all_reduce_saves_the_step_with_its_loss(tmp_path, monkeypatch, uninterrupted):
    """The step is taken (weights updated, step counted) before its loss is summed over the ranks: a second
    Ctrl-C in between saves this process's share, and the resumed run logs the uninterrupted run's losses."""
    from hypertriton import training

    trn, val = tiny_data()
    all_reduce, calls = training.hdist.all_reduce_sum, []

    def interrupted_on_the_second_step(payload):
        calls.append(payload)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return all_reduce(payload)

    monkeypatch.setattr(training.hdist, "all_reduce_sum", interrupted_on_the_second_step)
    with pytest.raises(KeyboardInterrupt):
        train(tiny_config(tmp_path), train_dataset=trn, val_dataset=val)
    state = load_training_state(tmp_path / LAST_CHECKPOINT)
    assert (state["step"], state["global_step"], state["loss_count"]) == (2, 2, 4)
    monkeypatch.setattr(training.hdist, "all_reduce_sum", all_reduce)
    train(tiny_config(tmp_path, resume="auto"), train_dataset=trn, val_dataset=val)
    epoch_losses = lambda log: [row["train_loss"] for row in log if row["event"] == "epoch"]  # noqa: E731
    assert epoch_losses(read_log(tmp_path)) == pytest.approx(epoch_losses(uninterrupted[2]), rel=1e-6)


def test_a_validate_fn_taking_stop_requested_gets_the_stop_request(tmp_path):
    """What lets a validation of one's own stop with the others under torchrun (see
    test_distributed.py for the default one): the run's stop request, as a callable."""
    seen = []

    def validate(model, dataset, config, device, show_progress, stop_requested):
        seen.append(stop_requested())
        return {"miou": 1.0, "fbiou": 1.0}

    trn, val = tiny_data()
    train(tiny_config(tmp_path, epochs=2, max_steps_per_epoch=1), train_dataset=trn, val_dataset=val,
          validate_fn=validate)
    assert seen == [False, False]


def _stop_at(global_step: int):
    def on_step(info):
        if info["global_step"] == global_step:
            os.kill(os.getpid(), signal.SIGINT)  # as Ctrl-C: handled after this step, then last.pt
    return on_step


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    logpath = tmp_path_factory.mktemp("uninterrupted")
    trn, val = tiny_data()
    summary = train(tiny_config(logpath), train_dataset=trn, val_dataset=val)
    return summary, load_training_state(logpath / LAST_CHECKPOINT), read_log(logpath)


def _stop_in_first_validation():
    """A validate_fn that gets Ctrl-C as its first validation starts and records whether it went on."""
    from hypertriton.training import _validate

    def validate(*args):
        if not validate.calls:
            validate.calls.append("signal")
            os.kill(os.getpid(), signal.SIGINT)  # the handler stops the validation here, at once
            validate.calls.append("went on")
        return _validate(*args)
    validate.calls = []
    return validate


# global step 3 is the last step of epoch 0 (stopped before its validation); 4 is mid-epoch 1; a stop
# during epoch 0's validation leaves the state after step 3, from which the validation runs again.
@posix_signals
@pytest.mark.parametrize("stop_step", [3, 4, "validation"], ids=["end-of-epoch", "mid-epoch", "during-validation"])
def test_stop_and_resume_equals_an_uninterrupted_run(tmp_path, uninterrupted, stop_step):
    reference_summary, reference_state, reference_log = uninterrupted
    trn, val = tiny_data()
    if stop_step == "validation":
        validate = _stop_in_first_validation()
        stopped = train(tiny_config(tmp_path), train_dataset=trn, val_dataset=val, validate_fn=validate)
        assert validate.calls == ["signal"] and stopped["global_step"] == 3
        stop_row, = [row for row in read_log(tmp_path) if row["event"] == "stop"]
        assert stop_row["during"] == "validation" and stop_row["global_step"] == 3
    else:
        stopped = train(tiny_config(tmp_path), train_dataset=trn, val_dataset=val, on_step=_stop_at(stop_step))
        # The request is honoured at the next step boundary all ranks agree on: after this step or the next.
        assert stopped["global_step"] in (stop_step, stop_step + 1)
    assert stopped["interrupted"]
    assert stopped["global_step"] < reference_summary["global_step"]
    saved = load_training_state(tmp_path / LAST_CHECKPOINT)
    assert saved["global_step"] == stopped["global_step"]
    assert saved["epoch"] * 3 + saved["step"] == saved["global_step"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers restored

    trn, val = tiny_data()
    resumed = train(tiny_config(tmp_path, resume="auto"), train_dataset=trn, val_dataset=val)
    assert not resumed["interrupted"] and resumed["global_step"] == reference_summary["global_step"]
    assert resumed["best_miou"] == reference_summary["best_miou"]
    assert resumed["train_loss"] == reference_summary["train_loss"]  # partial-epoch sums were kept
    final = load_training_state(tmp_path / LAST_CHECKPOINT)
    for key, value in reference_state["model"].items():
        assert torch.equal(final["model"][key], value), key
    for ref, got in zip(reference_state["optimizer"]["state"].values(), final["optimizer"]["state"].values()):
        assert all(torch.equal(ref[name], got[name]) for name in ref)

    rows = read_log(tmp_path)
    assert [row["event"] for row in rows].count("stop") == 1 and any(row["event"] == "resume" for row in rows)
    losses = [row["loss"] for row in rows if row["event"] == "step"]
    assert losses == [row["loss"] for row in reference_log if row["event"] == "step"]

    # Epoch statistics too, including the training mIoU/FB-IoU counted partly before the stop.
    def epoch_stats(log_rows):
        return [(row["train_loss"], row["train_miou"], row["train_fbiou"], row["val_miou"], row["val_fbiou"])
                for row in log_rows if row["event"] == "epoch"]

    assert epoch_stats(rows) == epoch_stats(reference_log)
    assert all(0 <= value <= 100 for stats in epoch_stats(rows) for value in stats[1:])


def test_a_new_run_refuses_a_logpath_holding_an_earlier_one(tmp_path, uninterrupted):
    """Starting over there would replace its checkpoints and append to its log: --resume or another path."""
    logpath = Path(uninterrupted[0]["logpath"])
    before = {path.name: path.read_bytes() for path in logpath.iterdir() if path.is_file()}
    with pytest.raises(ValueError, match=r"holds an earlier run \(last.pt, best_model.pt\); continue it with --resume"):
        train(tiny_config(logpath))
    assert {path.name: path.read_bytes() for path in logpath.iterdir() if path.is_file()} == before
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="logpath: .* exists and is not a folder"):
        train(tiny_config(tmp_path / "file"))


def test_the_optimizer_is_the_originals_adam_over_the_learner_only(uninterrupted):
    from hypertriton.learner import HPNLearner

    _, state, _ = uninterrupted
    group, = state["optimizer"]["param_groups"]
    # Adam's defaults (AdamW would show weight_decay 0.01, SGD neither betas nor these moments).
    assert (group["lr"], group["betas"], group["eps"], group["weight_decay"]) == (1e-3, (0.9, 0.999), 1e-8, 0)
    assert not group["amsgrad"] and not group.get("decoupled_weight_decay", False)
    learner_params = sum(1 for _ in HPNLearner([2, 2, 2]).parameters())  # the layer counts leave the tensors' count
    assert len(group["params"]) == learner_params  # the frozen backbone is not optimized
    moments = next(iter(state["optimizer"]["state"].values()))
    assert set(moments) == {"step", "exp_avg", "exp_avg_sq"}


def test_scheduled_lr_hand_computed_values():
    assert [scheduled_lr(0.1, "constant", step, 10) for step in (0, 5, 10)] == [0.1, 0.1, 0.1]
    # cos(0) = 1, cos(pi/2) = 0, cos(pi) = -1, cos(pi/4) = sqrt(2)/2
    assert scheduled_lr(0.1, "cosine", 0, 8) == pytest.approx(0.1)
    assert scheduled_lr(0.1, "cosine", 4, 8) == pytest.approx(0.05)
    assert scheduled_lr(0.1, "cosine", 2, 8) == pytest.approx(0.05 * (1 + math.sqrt(2) / 2))
    assert scheduled_lr(0.1, "cosine", 8, 8) == pytest.approx(0.0, abs=1e-12)
    assert scheduled_lr(0.1, "cosine", 9, 8) == pytest.approx(0.0, abs=1e-12)  # past the end: stays at 0
    with pytest.raises(ValueError, match="schedule: expected one of"):
        scheduled_lr(0.1, "linear", 0, 8)


class _FineTuningHSNet(HSNet):
    """A researcher's variant: the backbone's last two stages train, and its batch norms stay in training
    mode."""

    def __init__(self):
        super().__init__("resnet18")
        for stage in (self.backbone.layer3, self.backbone.layer4):
            for parameter in stage.parameters():
                parameter.requires_grad_(True)

    def train(self, mode: bool = True):
        torch.nn.Module.train(self, mode)  # HSNet's own train() keeps the backbone in eval mode
        return self

    def extract_features(self, img):  # with gradients (HSNet's runs the backbone under no_grad)
        from hypertriton.backbones import extract_features

        return extract_features(self.backbone, self.spec, img)


@posix_signals
def test_stop_and_resume_keeps_what_a_fine_tuned_backbone_learned(tmp_path):
    # last.pt held no backbone entry: a resumed run went on from the backbone as built (the uninterrupted
    # and the resumed run's backbones 7.5e-3 apart, their learners 2.6e-3), and from its built BN statistics.
    trn, val = tiny_data()
    torch.manual_seed(0)
    built = _FineTuningHSNet().state_dict()
    torch.manual_seed(0)
    whole = train(tiny_config(tmp_path / "whole"), model=_FineTuningHSNet(), train_dataset=trn, val_dataset=val)
    reference = load_training_state(tmp_path / "whole" / LAST_CHECKPOINT)["model"]
    conv = "backbone.layer3.1.conv2.weight"
    assert conv in reference and not torch.equal(reference[conv], built[conv])  # it trained
    assert any(key.startswith("backbone.layer1.") and key.endswith("running_mean") for key in reference)
    assert not any(key.startswith("backbone.layer1.") and key.endswith("weight") for key in reference)

    # Stopped twice: a resumed run's own last.pt must resume too (its fingerprint is of the built backbone).
    for stop_step, resume in ((2, None), (4, "auto"), (None, "auto")):
        trn, val = tiny_data()
        torch.manual_seed(0)
        result = train(tiny_config(tmp_path / "split", resume=resume), model=_FineTuningHSNet(), train_dataset=trn,
                       val_dataset=val, on_step=_stop_at(stop_step) if stop_step else None)
        assert result["interrupted"] == (stop_step is not None)
    assert result["global_step"] == whole["global_step"]
    final = load_training_state(tmp_path / "split" / LAST_CHECKPOINT)["model"]
    assert final.keys() == reference.keys()
    for key, value in reference.items():
        torch.testing.assert_close(final[key], value, rtol=0, atol=1e-6, msg=key)


@posix_signals
def test_cosine_schedule_is_followed_and_survives_a_stop(tmp_path):
    trn, val = tiny_data()
    reference_path = tmp_path / "reference"
    reference = train(tiny_config(reference_path, lr_schedule="cosine"), train_dataset=trn, val_dataset=val)
    epochs = [row for row in read_log(reference_path) if row["event"] == "epoch"]
    # Each epoch row holds the rate of its last step: global steps 2 and 5 of 6.
    assert [row["lr"] for row in epochs] == pytest.approx([scheduled_lr(1e-3, "cosine", step, 6) for step in (2, 5)])

    trn, val = tiny_data()
    stopped_path = tmp_path / "stopped"
    stopped = train(tiny_config(stopped_path, lr_schedule="cosine"), train_dataset=trn, val_dataset=val,
                    on_step=_stop_at(4))
    assert stopped["interrupted"]
    trn, val = tiny_data()
    resumed = train(tiny_config(stopped_path, lr_schedule="cosine", resume="auto"), train_dataset=trn,
                    val_dataset=val)
    assert resumed["global_step"] == reference["global_step"]
    expected = load_training_state(reference_path / LAST_CHECKPOINT)["model"]
    final = load_training_state(stopped_path / LAST_CHECKPOINT)["model"]
    for key, value in expected.items():
        assert torch.equal(final[key], value), key


def test_a_resumed_run_has_tensorboard_drop_the_steps_it_repeats(tmp_path, monkeypatch):
    # After a crash the steps since the last save run again; TensorBoard's purge_step drops the earlier
    # copies of every scalar at or after it. A stand-in writer records what the run asks of it.
    import sys
    import types

    writers = []

    class RecordingWriter:
        def __init__(self, log_dir, purge_step=None):
            self.purge_step, self.steps = purge_step, []
            writers.append(self)

        def add_scalar(self, name, value, step):
            if name == "train/step_loss":
                self.steps.append(step)

        def flush(self):
            pass

        def close(self):
            pass

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=RecordingWriter))
    trn, _ = tiny_data()
    config = tiny_config(tmp_path, epochs=2, max_steps_per_epoch=2, val_episodes=0, tensorboard=True)
    train(dataclasses.replace(config, epochs=1), train_dataset=trn)
    train(dataclasses.replace(config, resume="auto"), train_dataset=trn)  # two epochs now: steps 3 and 4
    assert [(w.purge_step, w.steps) for w in writers] == [(None, [1, 2]), (2, [3, 4])]


@pytest.mark.parametrize("world_size, val_bsz, per_process", [(1, None, 4), (2, None, 2), (4, None, 1), (2, 3, 3)])
def test_validation_batch_is_per_process_and_defaults_to_the_training_share(tmp_path, monkeypatch, world_size,
                                                                             val_bsz, per_process):
    # bsz is the global batch; evaluate() takes its batch per process, so the default must be the share.
    import hypertriton.training as training

    seen = {}
    monkeypatch.setattr(training.hdist, "get_world_size", lambda: world_size)
    monkeypatch.setattr(training, "evaluate",
                        lambda *args, **kwargs: seen.update(kwargs) or {"miou": 1.0, "fb_iou": 2.0})
    config = tiny_config(tmp_path, bsz=4, val_bsz=val_bsz)
    assert training._validate(None, None, config, torch.device("cpu"), False) == {"miou": 1.0, "fbiou": 2.0}
    assert seen["bsz"] == per_process


def test_resume_refuses_a_different_recipe(tmp_path):
    trn, val = tiny_data()
    train(tiny_config(tmp_path, epochs=1, max_steps_per_epoch=1, val_episodes=0), train_dataset=trn)
    with pytest.raises(ValueError, match=r"bsz: 2 -> 4"):
        train(tiny_config(tmp_path, bsz=4, resume="auto", val_episodes=0), train_dataset=trn)
    # Changes that alter the continued run but may be meant are named, not refused.
    with pytest.warns(UserWarning) as caught:
        train(tiny_config(tmp_path, epochs=2, max_steps_per_epoch=1, resume="auto", lr_schedule="cosine"),
              train_dataset=trn, val_dataset=val)
    messages = sorted(str(w.message).split(";")[0] for w in caught)
    assert messages == ["resume: epochs changed from 1 to 2", "resume: lr_schedule changed from 'constant' to 'cosine'",
                        "resume: val_episodes changed from 0 to 2"]
    assert "the cosine schedule now spans the new length" in " ".join(str(w.message) for w in caught)
    assert {w.filename for w in caught} == {__file__}  # shown at the caller's line, not inside the library
    atomic_save({"module.x": torch.zeros(1)}, tmp_path / "weights.pt")
    with pytest.raises(ValueError, match="weights.pt is not a hypertriton training state"):
        train(tiny_config(tmp_path, resume=str(tmp_path / "weights.pt")), train_dataset=trn)
    (tmp_path / "garbage.pt").write_bytes(b"not a zip file")
    with pytest.raises(ValueError, match="garbage.pt is not a readable training state"):
        train(tiny_config(tmp_path, resume=str(tmp_path / "garbage.pt")), train_dataset=trn)
    with pytest.raises(FileNotFoundError, match="no training state at"):
        train(tiny_config(tmp_path / "elsewhere", resume="auto"), train_dataset=trn)
    (tmp_path / "crashed").mkdir()
    (tmp_path / "crashed" / LOG_FILE).write_text('{"event": "start"}\n')  # killed before its first save
    with pytest.raises(FileNotFoundError, match=r"no training state at .*: the run logged in .* ended before its "
                                                r"first save; start it again without resume"):
        train(tiny_config(tmp_path / "crashed", resume="auto"), train_dataset=trn)


def test_backbone_weights_file_is_the_frozen_backbone_and_resume_checks_it(tmp_path):
    import torchvision

    files = []
    for seed in (5, 6):
        torch.manual_seed(seed)
        files.append((tmp_path / f"resnet18-{seed}.pth", torchvision.models.resnet18(weights=None).state_dict()))
        torch.save(files[-1][1], files[-1][0])
    trn, val = tiny_data()
    config = tiny_config(tmp_path, pretrained=False, backbone_weights=str(files[0][0]), epochs=1,
                         max_steps_per_epoch=1)
    train(config, train_dataset=trn, val_dataset=val, validate_fn=_ScriptedValidation([1.0]))
    best = torch.load(tmp_path / BEST_CHECKPOINT, weights_only=True)
    for key, value in files[0][1].items():
        assert torch.equal(best[f"module.backbone.{key}"], value), key
    # last.pt keeps what training changes, not the 45 MB frozen backbone ...
    state = load_training_state(tmp_path / LAST_CHECKPOINT)
    assert state["model"] and not any(key.startswith("backbone.") for key in state["model"])
    # ... and a resumed run must rebuild exactly that backbone.
    config = dataclasses.replace(config, epochs=2, resume="auto", backbone_weights=str(files[1][0]))
    with pytest.raises(ValueError, match="the backbone differs"):
        train(config, train_dataset=trn, val_dataset=val, validate_fn=_ScriptedValidation([1.0]))
    config = dataclasses.replace(config, backbone_weights=str(files[0][0]))
    assert train(config, train_dataset=trn, val_dataset=val, validate_fn=_ScriptedValidation([1.0]))["global_step"] == 2


class _Unpicklable:
    def __reduce__(self):
        raise RuntimeError("cannot pickle this")


def test_atomic_save_never_leaves_a_partial_file(tmp_path):
    path = tmp_path / "state.pt"
    atomic_save({"value": torch.arange(3)}, path)
    with pytest.raises(RuntimeError, match="cannot pickle"):
        atomic_save({"value": _Unpicklable()}, path)
    assert os.listdir(tmp_path) == ["state.pt"]
    assert torch.equal(torch.load(path, weights_only=True)["value"], torch.arange(3))


SPAWNED_WORKERS_SCRIPT = """
import json, os, signal, sys, threading, time
sys.path.insert(0, sys.argv[1])
from torch.utils.data import DataLoader
from helpers import SignalDispositionProbe
from hypertriton._signals import ignore_stop_signals_in_worker, start_loader

received = []
signal.signal(signal.SIGTERM, lambda signum, frame: received.append(signum))
before = [str(signal.getsignal(signal.SIGINT)), str(signal.getsignal(signal.SIGTERM))]
threading.Thread(target=time.sleep, args=(30,), daemon=True).start()  # a process has other threads (torch's)


class SignalledWhileStarting(DataLoader):
    def __iter__(self):
        # To the process, in the window (in a fresh process, where the first spawn also starts
        # multiprocessing's resource tracker, which unblocks both signals when it starts).
        os.kill(os.getpid(), signal.SIGTERM)
        return super().__iter__()


def run(init):
    loader = SignalledWhileStarting(SignalDispositionProbe(), batch_size=None, num_workers=1,
                                    multiprocessing_context="spawn", worker_init_fn=init)
    return list(start_loader(loader))


shielded, plain = run(ignore_stop_signals_in_worker), run(None)
time.sleep(0.2)
after = [str(signal.getsignal(signal.SIGINT)), str(signal.getsignal(signal.SIGTERM))]
blocked = sorted(int(s) for s in signal.pthread_sigmask(signal.SIG_BLOCK, []))
print(json.dumps({"shielded": shielded, "plain": plain, "received": received, "same_handlers": before == after,
                  "blocked": blocked}))
"""


@pytest.mark.skipif(not hasattr(signal, "pthread_sigmask"), reason="POSIX signal masks (not on Windows)")
def test_spawned_loader_workers_block_stop_signals_from_birth_and_the_main_process_loses_none():
    import json
    import subprocess
    import sys

    ran = subprocess.run([sys.executable, "-c", SPAWNED_WORKERS_SCRIPT, str(Path(__file__).parent)],
                         capture_output=True, text=True, timeout=300)
    assert ran.returncode == 0, ran.stderr[-3000:]
    report = json.loads(ran.stdout.strip().splitlines()[-1])
    stops = sorted([int(signal.SIGINT), int(signal.SIGTERM)])
    # A Ctrl-C in the seconds a spawned worker imports torch waits, blocked, until it ignores it (it killed
    # the worker before); after its set-up nothing stays blocked (it would outlive it in what it starts).
    assert [item["at_start"] for item in report["shielded"]] == [stops] * 2, report
    assert all(item["blocked_later"] == [] for item in report["shielded"]), report
    # A worker set-up that would not unblock them: not born blocking them.
    assert all(item["at_start"] == [] == item["blocked_later"] for item in report["plain"]), report
    # The main process: both signals sent in the windows reached its handler; handlers and mask as before.
    assert report["received"] == [int(signal.SIGTERM)] * 2 and report["same_handlers"] and report["blocked"] == []


def test_train_in_a_script_without_a_main_guard_under_spawn_fails_in_the_worker_with_the_fix_and_writes_once(
        tmp_path):
    import subprocess
    import sys

    script = tmp_path / "unguarded.py"
    script.write_text(f"""
import multiprocessing
multiprocessing.set_start_method("spawn", force=True)  # macOS's and Windows' default
from hypertriton import TrainConfig, train
train(TrainConfig(benchmark="synthetic", backbone="resnet18", pretrained=False, img_size=64, bsz=2, epochs=1,
                  max_steps_per_epoch=1, val_episodes=0, device="cpu", progress=False, tensorboard=False,
                  logpath={str(tmp_path / "run")!r}, nworker=1))
""")
    ran = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert ran.returncode != 0
    assert "train() was called while a process started by spawn" in ran.stderr
    assert "if __name__ == \"__main__\":" in ran.stderr
    starts = [line for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines() if '"start"' in line]
    assert len(starts) == 1, starts  # the worker wrote nothing (it ran train() again, writing a second)


def test_a_replace_refused_for_a_moment_is_retried_where_windows_refuses_it(tmp_path, monkeypatch):
    from hypertriton import _io

    refusals = []
    real_replace = os.replace

    def held_open_twice(source, target):
        if len(refusals) < 2:
            refusals.append(target)
            raise PermissionError(13, "The process cannot access the file because it is being used")
        real_replace(source, target)

    monkeypatch.setattr(_io.os, "replace", held_open_twice)
    monkeypatch.setattr(_io, "_REPLACE_RETRIES", (0.0, 0.0, 0.0))  # as on Windows
    atomic_save({"value": torch.arange(3)}, tmp_path / "last.pt")
    assert len(refusals) == 2 and torch.equal(torch.load(tmp_path / "last.pt", weights_only=True)["value"],
                                              torch.arange(3))
    refusals.clear()
    monkeypatch.setattr(_io, "_REPLACE_RETRIES", ())  # elsewhere a refusal is an error at once
    with pytest.raises(PermissionError):
        atomic_save({"value": torch.arange(4)}, tmp_path / "last.pt")
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temporary left


def test_atomic_save_removes_what_killed_writers_left_and_names_a_failed_write(tmp_path, monkeypatch):
    import subprocess
    import sys

    from hypertriton import _io

    path = tmp_path / "last.pt"
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = int(finished.stdout)  # a process that ran and is gone
    stale = tmp_path / f".last.pt.{_io._HOST}.{dead}.0123abcd.tmp"
    live = tmp_path / f".last.pt.{_io._HOST}.{os.getpid()}.4567abcd.tmp"  # a writer still running
    elsewhere = tmp_path / f".last.pt.otherhost.{dead}.89abcdef.tmp"  # another machine's, on a shared disk
    for leftover in (stale, live, elsewhere):
        leftover.write_bytes(b"half a checkpoint")
    atomic_save({"value": torch.arange(3)}, path)
    assert sorted(os.listdir(tmp_path)) == sorted(["last.pt", live.name, elsewhere.name])

    def disk_full(obj, handle):
        handle.write(b"partial")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(OSError, match=r"cannot write '.*last\.pt': RuntimeError: .*unexpected pos .*disk full"):
        atomic_save({"value": torch.arange(4)}, path)
    monkeypatch.undo()
    assert torch.equal(torch.load(path, weights_only=True)["value"], torch.arange(3))
    # A name that fits the file system but not with a temporary's 32 bytes beside it: its temporaries are
    # shortened (a digest keeps them apart) and found again when stale.
    long_path = tmp_path / ("n" * 240 + ".pt")
    stale_long = _io.temporary_path(long_path).with_name(
        _io.temporary_path(long_path).name.replace(f".{os.getpid()}.", f".{dead}."))
    assert len(stale_long.name) <= 255 and stale_long.name.startswith("." + "n" * 150)
    stale_long.write_bytes(b"half a checkpoint")
    atomic_save({"value": torch.arange(2)}, long_path)
    assert torch.equal(torch.load(long_path, weights_only=True)["value"], torch.arange(2))
    assert not stale_long.exists()


def test_a_run_removes_what_killed_writers_of_its_files_left_and_closes_its_log_when_it_fails_early(
        tmp_path, monkeypatch):
    # best_model.pt's temporary (the whole model) was removed only by the next best, which may not come;
    # config.json's never. And a failure between opening log.jsonl and the loop left it to the collector.
    import subprocess
    import sys
    import warnings

    from hypertriton import _io, training

    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = int(finished.stdout)
    logdir = tmp_path / "run"
    logdir.mkdir()
    left = [logdir / f".{name}.{_io._HOST}.{dead}.0123abcd.tmp" for name in (BEST_CHECKPOINT, "config.json")]
    for path in left:
        path.write_bytes(b"half a file")
    trn, _ = tiny_data()
    train(tiny_config(logdir, epochs=1, max_steps_per_epoch=1, val_episodes=0), train_dataset=trn)
    assert not any(path.exists() for path in left)

    def disk_full(path, *args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(training, "atomic_file", disk_full)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(OSError, match="No space left"):
            train(tiny_config(tmp_path / "full", epochs=1, max_steps_per_epoch=1, val_episodes=0),
                  train_dataset=trn)
        import gc

        gc.collect()
    assert not [w for w in caught if issubclass(w.category, ResourceWarning)], [str(w.message) for w in caught]


def test_a_wrong_datapath_is_said_before_the_backbone_weights_are_fetched(tmp_path, monkeypatch):
    # A typo in --datapath used to wait for a 100-MB ImageNet download (or fail offline on it) first.
    from hypertriton.data import DatasetError

    fetched = []
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", lambda *args, **kwargs: fetched.append(args))
    with pytest.raises(DatasetError, match=r"datapath: .* holds no VOC2012/ folder"):
        train(tiny_config(tmp_path / "run", benchmark="pascal", pretrained=True, datapath=str(tmp_path / "typo"),
                          splits=str(tmp_path)))
    assert fetched == []


def test_a_model_without_the_validation_method_is_refused_before_training(tmp_path):
    # A forward-only model trained a whole epoch, wrote last.pt, then died at validation with a bare
    # AttributeError.
    class ForwardOnly(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.head = torch.nn.Conv2d(3, 2, 1)

        def forward(self, query_img, support_img, support_mask):
            return self.head(query_img)

    trn, val = tiny_data()
    with pytest.raises(TypeError, match=r"model: the default validation calls model.predict_mask_nshot\(batch, "
                                        r"nshot\), which ForwardOnly lacks"):
        train(tiny_config(tmp_path / "run"), model=ForwardOnly(), train_dataset=trn, val_dataset=val)
    assert not (tmp_path / "run" / LAST_CHECKPOINT).exists()
    trained = train(tiny_config(tmp_path / "novalidation", val_episodes=0, epochs=1), model=ForwardOnly(),
                    train_dataset=trn)
    assert trained["global_step"] == 3
    # config.json says what ran (the config's backbone field described a model that was not built)
    recorded = json.loads((tmp_path / "novalidation" / "config.json").read_text())
    assert recorded["model"].endswith("ForwardOnly") and recorded["backbone"] is None


def test_a_loss_of_ones_own_replaces_the_original_cross_entropy(tmp_path):
    # The loss was fixed (an extension audit changed it by monkeypatching compute_loss).
    import torch.nn.functional as F

    def per_episode_cross_entropy(logits, query_mask):
        return F.cross_entropy(logits.float(), query_mask.long(), reduction="none").flatten(1).mean(dim=1)

    def object_weighted(logits, query_mask):
        weights = torch.tensor([1.0, 3.0], device=logits.device)
        pixels = F.cross_entropy(logits.float(), query_mask.long(), weight=weights, reduction="none")
        return pixels.flatten(1).mean(dim=1)

    states = {}
    for name, loss_fn in (("default", None), ("same", per_episode_cross_entropy), ("weighted", object_weighted)):
        trn, val = tiny_data()
        torch.manual_seed(0)
        train(tiny_config(tmp_path / name, epochs=1, val_episodes=0), train_dataset=trn, loss_fn=loss_fn)
        states[name] = load_training_state(tmp_path / name / LAST_CHECKPOINT)["model"]
    learner_keys = [key for key in states["default"] if key.startswith("hpn_learner.")]
    for key in learner_keys:
        torch.testing.assert_close(states["same"][key], states["default"][key], rtol=1e-5, atol=1e-6, msg=key)
    assert any(not torch.allclose(states["weighted"][key], states["default"][key]) for key in learner_keys)
    # Given what the original loss is given: float32 logits under autocast too, a mask checked to be 0/1.
    from hypertriton.training import _own_loss

    seen = []
    logits, mask = torch.randn(2, 2, 4, 4, dtype=torch.bfloat16), torch.randint(0, 2, (2, 4, 4)).float()
    _own_loss(lambda lg, m: seen.append(lg.dtype) or per_episode_cross_entropy(lg, m), logits, mask, None)
    assert seen == [torch.float32]
    with pytest.raises(ValueError, match=r"query_mask: expected values 0 \(background\) and 1"):
        _own_loss(per_episode_cross_entropy, logits, mask * 255, None)
    trn, _ = tiny_data()
    with pytest.raises(TypeError, match=r"loss_fn: expected a callable or None, got str"):
        train(tiny_config(tmp_path / "named", epochs=1, val_episodes=0), train_dataset=trn, loss_fn="focal")
    with pytest.raises(ValueError, match=r"loss_fn: expected each episode's loss, a tensor \[B\] = \[2\], got \[\]"):
        train(tiny_config(tmp_path / "scalar", epochs=1, val_episodes=0), train_dataset=trn,
              loss_fn=lambda logits, mask: per_episode_cross_entropy(logits, mask).mean())


def test_building_the_data_first_leaves_the_initial_model_as_seeded(tmp_path):
    # The datasets are built before the model now; they draw nothing from the global generators, so the
    # seed gives the model it gave when the model came first.
    from hypertriton import training

    config = tiny_config(tmp_path / "run", epochs=1, max_steps_per_epoch=1, val_episodes=0)
    training._seed_everything(config.seed)
    expected = training._build_model(config).state_dict()
    built, build = [], training._build_model

    def recording(config):
        model = build(config)
        built.append({key: value.clone() for key, value in model.state_dict().items()})
        return model

    with mock.patch.object(training, "_build_model", recording):
        train(config)
    assert len(built) == 1 and built[0].keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(built[0][key], value), key


class _FakeKernel32:
    """Windows' OpenProcess/GetExitCodeProcess/CloseHandle as ctypes calls them, over a table of processes
    (pid -> exit code; STILL_ACTIVE while running) and of pids another user owns."""

    def __init__(self, processes, others=()):
        self.processes, self.others, self.error, self.open_handles = processes, set(others), 0, set()

    def OpenProcess(self, access, inherit, pid):  # noqa: N802 (the Win32 name)
        if pid in self.others:
            self.error = 5  # ERROR_ACCESS_DENIED
            return 0
        if pid not in self.processes:
            self.error = 87  # ERROR_INVALID_PARAMETER
            return 0
        self.open_handles.add(1000 + pid)
        return 1000 + pid

    def GetExitCodeProcess(self, handle, exit_code_ref):  # noqa: N802
        exit_code_ref._obj.value = self.processes[handle - 1000]
        return 1

    def CloseHandle(self, handle):  # noqa: N802
        self.open_handles.remove(handle)
        return 1


def test_on_windows_stale_temporaries_are_found_by_asking_kernel32_whether_their_writer_runs(tmp_path,
                                                                                               monkeypatch):
    # os.kill(pid, 0) terminates a process on Windows, so the POSIX probe cannot be used there; these
    # temporaries were never removed on Windows (170 MB per checkpoint a killed run left).
    from hypertriton import _io

    kernel32 = _FakeKernel32({10: 259, 11: 0}, others={12})  # 10 runs, 11 ended (handle still held)
    assert [_io._windows_process_runs(pid, kernel32, lambda: kernel32.error) for pid in (10, 11, 12, 13)] == \
        [True, False, True, False]
    assert kernel32.open_handles == set()
    monkeypatch.setattr(_io, "_WINDOWS", True)
    ask = _io._windows_process_runs
    monkeypatch.setattr(_io, "_windows_process_runs", lambda pid: ask(pid, kernel32, lambda: kernel32.error))
    monkeypatch.setattr(_io.os, "kill", lambda *args: pytest.fail("os.kill on Windows"))
    path = tmp_path / "last.pt"
    names = {pid: tmp_path / f".last.pt.{_io._HOST}.{pid}.0123abcd.tmp" for pid in (10, 11, 12, 13)}
    for leftover in names.values():
        leftover.write_bytes(b"half a checkpoint")
    assert sorted(_io.remove_stale_temporaries(path)) == sorted([names[11], names[13]])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([names[10].name, names[12].name])


@pytest.mark.parametrize("field, value, message", [
    ("bsz", 0, "bsz: expected a positive integer"),
    ("lr", float("nan"), "lr: expected a positive finite number"),
    ("amp", "fp8", "amp: expected one of"),
    ("lr_schedule", "linear", "lr_schedule: expected one of"),
    ("val_episodes", -1, "val_episodes"),
    ("seed", -1, r"seed: expected an integer in \[0, 2\*\*64\)"),
    ("backend", "fast", "backend: expected one of"),
])
def test_config_rejects_impossible_values(tmp_path, field, value, message):
    with pytest.raises(ValueError, match=message):  # when built
        tiny_config(tmp_path, **{field: value})
    config = tiny_config(tmp_path)
    setattr(config, field, value)
    with pytest.raises(ValueError, match=message):  # and when changed afterwards
        train(config)


def test_fp16_on_cpu_is_refused(tmp_path):
    trn, _ = tiny_data()
    with pytest.raises(ValueError, match="amp='fp16' needs a CUDA device"):
        train(tiny_config(tmp_path, amp="fp16", val_episodes=0), train_dataset=trn)


# --------------------------------------------------------------------------------------------------
# CLI


@posix_signals
def test_cli_ctrl_c_saves_state_and_resume_finishes_the_run(tmp_path, capsys):
    import subprocess
    import sys
    import time

    from hypertriton.cli import main

    logpath = tmp_path / "run"
    args = ["train", "--benchmark", "synthetic", "--backbone", "resnet18", "--no-pretrained", "--img-size",
            str(IMG), "--bsz", "2", "--epochs", "3", "--max-steps-per-epoch", "2", "--val-episodes", "2",
            "--nworker", "1", "--logpath", str(logpath), "--no-progress", "--device", "cpu", "--amp", "bf16",
            "--log-every", "1"]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    # Its own session, so that the SIGINT below reaches the whole process group (the main process and
    # its data-loader worker) as a terminal's Ctrl-C does.
    proc = subprocess.Popen([sys.executable, "-m", "hypertriton", *args], env={**env, "OMP_NUM_THREADS": "1"},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not ((logpath / LOG_FILE).exists() and '"event": "step"' in (logpath / LOG_FILE).read_text()):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-3000:]
            time.sleep(0.02)
        os.killpg(proc.pid, signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err[-3000:]
    assert "SIGINT received" in err and "--resume" in err, err[-3000:]
    stopped = load_training_state(logpath / LAST_CHECKPOINT)
    assert 1 <= stopped["global_step"] < 6
    rows = read_log(logpath)
    assert rows[0]["amp"] == "bfloat16" and rows[0]["val_episodes"] == 2 and rows[-2]["event"] == "stop"

    assert main([*args, "--resume"]) == 0
    assert "3 epochs, 6 steps, best mIoU" in capsys.readouterr().out
    rows = read_log(logpath)
    assert [row["global_step"] for row in rows if row["event"] == "step"] == list(range(1, 7))
    assert [row["epoch"] for row in rows if row["event"] == "epoch"] == list(range(3))
    config = json.loads((logpath / "config.json").read_text())
    assert (config["lr"], config["nshot"], config["bsz"], config["resume"]) == (1e-3, 1, 2, "auto")
    HSNet.from_checkpoint(logpath / BEST_CHECKPOINT)


SIGTERM_WHILE_WAITING = """
import os, signal, sys, threading, time
from hypertriton.data.synthetic import SyntheticDataset
from hypertriton.training import TrainConfig, train

class SlowEpisodes(SyntheticDataset):
    def __getitem__(self, index):
        time.sleep(0.6)  # the main process waits on its worker for every batch
        return super().__getitem__(index)

def signal_the_group(times):
    for _ in range(times):
        os.killpg(os.getpgid(0), signal.SIGTERM)
        time.sleep(0.05)

def on_step(info):
    if info["global_step"] == 1:  # SIGTERM to the process group, as torchrun or a scheduler sends it
        threading.Timer(0.3, signal_the_group, (int(sys.argv[2]),)).start()

config = TrainConfig(benchmark="synthetic", backbone="resnet18", pretrained=False, img_size=64, bsz=2, epochs=2,
                     max_steps_per_epoch=6, val_episodes=0, device="cpu", progress=False, tensorboard=False,
                     logpath=sys.argv[1], nworker=1, log_every=1)
summary = train(config, train_dataset=SlowEpisodes(split="trn", fold=0, img_size=64, episodes=64), on_step=on_step)
print("stopped", summary["interrupted"], summary["global_step"])
"""


@posix_signals
@pytest.mark.parametrize("signals", [1, 2], ids=["one SIGTERM", "two SIGTERMs"])
def test_sigterm_to_the_process_group_stops_cleanly_while_waiting_for_a_batch(tmp_path, signals):
    # The data-loader worker gets the signal too; were it to die, the main process, waiting for its next
    # batch, would crash with "DataLoader worker exited unexpectedly" and save nothing. Two SIGTERMs: a
    # scheduler signals every process of a job, torchrun among them, which forwards its own to its
    # workers; that second one once interrupted the step at once, and nothing was saved.
    import subprocess
    import sys

    script = tmp_path / "run.py"
    script.write_text(SIGTERM_WHILE_WAITING)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    proc = subprocess.run([sys.executable, str(script), str(tmp_path / "run"), str(signals)],
                          env={**env, "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=180, start_new_session=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "stopped True 2" in proc.stdout, proc.stdout + proc.stderr[-3000:]
    assert "SIGTERM received" in proc.stderr
    assert load_training_state(tmp_path / "run" / LAST_CHECKPOINT)["global_step"] == 2


def test_the_command_line_parser_loads_without_torch():
    """``hypertriton --help`` (and every argument error) answers without importing torch: it took 4 s.
    The names the parser offers are the ones the library defines."""
    import subprocess
    import sys

    from hypertriton.backbones import BACKBONES
    from hypertriton.data import BENCHMARKS
    from hypertriton.train_config import BACKBONE_NAMES, BENCHMARK_NAMES

    assert BACKBONE_NAMES == tuple(sorted(BACKBONES)) and BENCHMARK_NAMES == tuple(sorted(BENCHMARKS))
    code = ("import sys; from hypertriton.cli import build_parser; build_parser().format_help(); "
            "print(sorted(name for name in ('torch', 'torchvision', 'numpy', 'PIL') if name in sys.modules))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert loaded.stdout.strip() == "[]", loaded.stdout + loaded.stderr


def test_cli_defaults_are_the_original_recipe():
    from hypertriton.cli import build_parser
    from hypertriton.commands.train import config_from_args

    config = config_from_args(build_parser().parse_args(["train", "--datapath", "d", "--splits", "s"]))
    assert (config.lr, config.bsz, config.nshot, config.amp, config.pretrained) == (1e-3, 20, 1, "off", True)
    assert config.img_size == 400 and config.resume is None
    resume = config_from_args(build_parser().parse_args(["train", "--resume", "--amp"]))
    assert resume.resume == "auto" and resume.amp == "auto"
    # evaluate's --amp reads the same (a bare --amp was an error there)
    evaluate_args = ["evaluate", "--benchmark", "synthetic", "--load", "x.pt"]
    assert build_parser().parse_args(evaluate_args + ["--amp"]).amp == "auto"
    assert build_parser().parse_args(evaluate_args).amp == "off"
    assert config.lr_schedule == "constant"
    cosine = config_from_args(build_parser().parse_args(["train", "--lr-schedule", "cosine"]))
    assert cosine.lr_schedule == "cosine"
    coco = config_from_args(build_parser().parse_args(["train", "--benchmark", "coco"]))
    assert coco.bsz == 40 and coco.logpath == os.path.join("logs", "coco-fold0-resnet101")
    assert config_from_args(build_parser().parse_args(["train", "--benchmark", "coco", "--bsz", "8"])).bsz == 8
    # The Python API follows the same recipe (it trained COCO at 20 when only the command line knew 40).
    assert [TrainConfig(benchmark=b).bsz for b in ("pascal", "coco", "fss")] == [20, 40, 20]
    assert TrainConfig(benchmark="coco", bsz=8).bsz == 8


def test_cli_refuses_a_backend_that_cannot_run_here_before_writing_anything(tmp_path, capsys, monkeypatch):
    from hypertriton.cli import main

    monkeypatch.delenv("TRITON_INTERPRET")  # the triton backend cannot run on this CPU now
    code = main(["train", "--benchmark", "synthetic", "--backbone", "resnet18", "--no-pretrained", "--img-size", "64",
                 "--bsz", "2", "--backend", "triton", "--device", "cpu", "--logpath", str(tmp_path / "run"),
                 "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "backend: backend 'triton' cannot run on cpu" in err and "Traceback" not in err, err
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())


def test_cli_requires_data_for_real_benchmarks(capsys):
    from hypertriton.cli import main

    assert main(["train", "--benchmark", "pascal"]) == 2
    assert "--datapath and --splits are required" in capsys.readouterr().err


def test_cli_names_bad_settings_and_files_in_one_line(tmp_path, capsys, monkeypatch):
    from hypertriton.cli import main

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty-hub"))
    (tmp_path / "text.pt").write_text("not weights")
    base = ["train", "--benchmark", "synthetic", "--backbone", "resnet18", "--img-size", str(IMG), "--bsz", "2",
            "--nworker", "0", "--no-progress", "--logpath", str(tmp_path / "run")]
    cases = [
        (["--no-pretrained", "--backend", "fast"], "backend: expected one of"),
        (["--no-pretrained", "--device", "gpu0"], "device: 'gpu0' is not a device"),
        (["--backbone-weights", str(tmp_path / "text.pt")], f"weights: '{tmp_path / 'text.pt'}' is not a PyTorch "
                                                             "weights file for resnet18"),
    ]
    with mock.patch("torch.hub.load_state_dict_from_url", side_effect=OSError("offline")):
        cases.append(([], "--backbone-weights PATH on the command line"))  # no cached weights, no download
        for extra, message in cases:
            assert main(base + extra) == 2, extra
            err = capsys.readouterr().err
            assert message in err and "Traceback" not in err, (extra, err)
    assert not (tmp_path / "run" / "last.pt").exists()


def test_training_state_restores_every_rng_stream():
    from hypertriton.training import _rng_state, _set_rng_state

    random.seed(3)
    np.random.seed(3)
    np.random.standard_normal()  # leaves a cached Gaussian in numpy's state
    torch.manual_seed(3)
    state = _rng_state()
    expected = (random.random(), np.random.standard_normal(3).tolist(), torch.rand(3).tolist())
    _set_rng_state(state)
    assert (random.random(), np.random.standard_normal(3).tolist(), torch.rand(3).tolist()) == expected
