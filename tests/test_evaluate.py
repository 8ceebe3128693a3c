"""evaluate(): known outcomes with fake models, batching, original image size, PNG panels, sharding
over 2 gloo processes equal to one process, and the ``hypertriton evaluate`` command with a real model."""

from __future__ import annotations

import io
import json
import os
import re
import time
from contextlib import redirect_stdout
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
from datagen import make_fss, make_pascal
from helpers import launch_gloo_ranks
from hypothesis import example, given
from hypothesis import strategies as st
from PIL import Image
from torch.utils.data import DataLoader, Subset

from hypertriton.data import build_dataset
from hypertriton.evaluation import EvaluationStopped, ShardSampler, evaluate, render_panel

SIZE = 24
EPISODES = 15  # odd: a 2-way shard is uneven, so padding duplicates would show


class Truth:
    """Predicts the true mask: every IoU is 100."""

    def __init__(self):
        self.keys = []

    def predict_mask_nshot(self, batch, nshot):
        self.keys.append(sorted(batch))
        return batch["query_mask"].long()


class Complement(Truth):
    def predict_mask_nshot(self, batch, nshot):
        return 1 - batch["query_mask"].long()


class AllForeground(Truth):
    def predict_mask_nshot(self, batch, nshot):
        return torch.ones_like(batch["query_mask"], dtype=torch.long)


@pytest.fixture(scope="module")
def pascal_data(tmp_path_factory):
    return make_pascal(tmp_path_factory.mktemp("pascal_eval"), images_per_class=3)


@pytest.fixture(scope="module")
def dataset(pascal_data):
    return build_dataset("pascal", pascal_data.datapath, pascal_data.splits, 0, "test", nshot=1, img_size=SIZE)


def all_foreground_expected(dataset, count):
    """All-foreground scores by hand: per class fg IoU = true fg pixels / valid pixels; bg IoU = 0."""
    fg, valid = {c: 0.0 for c in dataset.class_ids}, {c: 0.0 for c in dataset.class_ids}
    for index in range(count):
        item = dataset[index]
        keep = item["query_ignore_idx"].numpy() == 0
        fg[int(item["class_id"])] += float((item["query_mask"].numpy()[keep] == 1).sum())
        valid[int(item["class_id"])] += float(keep.sum())
    per_class = {c: 100 * fg[c] / max(valid[c], 1) for c in dataset.class_ids}
    return float(np.mean(list(per_class.values()))), 50 * sum(fg.values()) / sum(valid.values()), per_class


def test_truth_and_complement(dataset):
    result = evaluate(Truth(), dataset, 1, "cpu", progress=False, max_episodes=EPISODES)
    assert (result["miou"], result["fb_iou"], result["episodes"]) == (100.0, 100.0, EPISODES)
    assert set(result["per_class_iou"]) == set(dataset.class_ids)
    result = evaluate(Complement(), dataset, 1, "cpu", progress=False, max_episodes=EPISODES)
    assert (result["miou"], result["fb_iou"]) == (0.0, 0.0)


def test_all_foreground_matches_hand_count_and_batching(dataset):
    miou, fb_iou, per_class = all_foreground_expected(dataset, EPISODES)
    for bsz in (1, 4):
        result = evaluate(AllForeground(), dataset, 1, "cpu", progress=False, max_episodes=EPISODES, bsz=bsz)
        assert result["miou"] == pytest.approx(miou, abs=1e-9)
        assert result["fb_iou"] == pytest.approx(fb_iou, abs=1e-9)
        assert result["per_class_iou"] == pytest.approx(per_class, abs=1e-9)
    assert 0 < miou < 100
    loader = DataLoader(Subset(dataset, range(EPISODES)), batch_size=3)
    assert evaluate(AllForeground(), loader, 1, "cpu", progress=False)["miou"] == pytest.approx(miou, abs=1e-9)
    # A loader sharded for another rank or world size (made outside torchrun, say) is re-sharded, not
    # trusted: this process alone must score every episode.
    subset = Subset(dataset, range(EPISODES))
    loader = DataLoader(subset, batch_size=3, sampler=ShardSampler(EPISODES, rank=1, world_size=2))
    result = evaluate(AllForeground(), loader, 1, "cpu", progress=False)
    assert result["episodes"] == EPISODES and result["miou"] == pytest.approx(miou, abs=1e-9)


FAILING_WORKER_SCRIPT = """
import sys, time
import torch
from torch.utils.data import Dataset
from hypertriton.evaluation import evaluate


class Broken(Dataset):
    class_ids = [0]

    def __len__(self):
        return 6

    def __getitem__(self, index):
        if index == 2:
            raise OSError("episode 2 is unreadable")
        return {"query_mask": torch.zeros(4, 4), "class_id": torch.tensor(0)}


class Model:
    def predict_mask_nshot(self, batch, nshot):
        return batch["query_mask"].long()


if __name__ == "__main__":
    try:
        evaluate(Model(), Broken(), 1, "cpu", progress=False, nworker=1)
    except OSError as error:
        print("raised:", error, flush=True)
"""


def test_an_error_in_a_worker_stops_the_workers_and_the_process_exits(tmp_path):
    """Workers ignore SIGTERM (a Ctrl-C or torchrun's stop reaches the whole process group), so they must be
    told to stop: an error from a worker once left them running and the interpreter waiting at exit."""
    import subprocess
    import sys

    script = tmp_path / "failing_worker.py"
    script.write_text(FAILING_WORKER_SCRIPT)
    try:
        done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        pytest.fail("the process did not exit within 120 s after evaluate() raised")
    assert "raised: Caught OSError in DataLoader worker process 0" in done.stdout, done.stderr
    assert done.returncode == 0, done.stderr


def test_the_loader_is_iterated_once_and_every_modules_mode_restored(dataset, monkeypatch):
    calls = []
    original_iter = DataLoader.__iter__
    monkeypatch.setattr(DataLoader, "__iter__", lambda self: calls.append(1) or original_iter(self))

    class FrozenNormModel(torch.nn.Module, Truth):
        def __init__(self):
            torch.nn.Module.__init__(self)
            Truth.__init__(self)
            self.norm = torch.nn.BatchNorm2d(2)

    model = FrozenNormModel()
    model.norm.eval()  # frozen by the caller while the rest trains
    result = evaluate(model, dataset, 1, "cpu", progress=True, max_episodes=4)
    assert result["episodes"] == 4 and result["miou_of_evaluated_classes"] == 100.0
    assert len(calls) == 1  # a progress bar wrapping the loader started a second set of workers
    assert model.training and not model.norm.training


@pytest.mark.parametrize("context", ["fork", "spawn"])
def test_a_callers_loader_keeps_its_worker_start_method_and_init_function(dataset, tmp_path, monkeypatch, context):
    import functools
    import multiprocessing

    import helpers

    if context not in multiprocessing.get_all_start_methods():
        pytest.skip(f"no {context} start method on this platform")
    monkeypatch.setattr(helpers, "PROCESS_MARK", "parent")  # seen by forked workers, not by spawned ones
    record = tmp_path / "workers.txt"
    loader = DataLoader(dataset, batch_size=2, num_workers=1, multiprocessing_context=context,
                        worker_init_fn=functools.partial(helpers.record_worker_start, str(record)))
    result = evaluate(Truth(), loader, 1, "cpu", progress=False, max_episodes=4)  # re-sharded: a new loader
    assert result["episodes"] == 4 and result["miou_of_evaluated_classes"] == 100.0
    assert record.read_text() == ("0 parent\n" if context == "fork" else "0 fresh\n")


def test_a_model_that_is_no_module_gets_its_training_mode_back(dataset):
    class Wrapper(Truth):
        training = True

        def train(self, mode=True):
            self.training = mode

        def eval(self):
            self.train(False)

    model = Wrapper()
    evaluate(model, dataset, 1, "cpu", progress=False, max_episodes=2)
    assert model.training


def test_original_size_is_passed_only_when_asked(pascal_data, dataset):
    model = Truth()
    evaluate(model, dataset, 1, "cpu", progress=False, max_episodes=2)
    assert "org_query_imsize" not in model.keys[0]
    original = build_dataset("pascal", pascal_data.datapath, pascal_data.splits, 0, "test", nshot=1, img_size=SIZE,
                             use_original_imgsize=True)
    model = Truth()
    result = evaluate(model, original, 1, "cpu", progress=False, max_episodes=3)
    assert "org_query_imsize" in model.keys[0]
    assert {original.episodes[i].class_id for i in range(3)} == {0} and result["per_class_iou"][0] == 100.0


def test_prediction_of_another_size_is_refused(dataset):
    class Wrong(Truth):
        def predict_mask_nshot(self, batch, nshot):
            return torch.zeros(1, SIZE + 1, SIZE, dtype=torch.long)

    with pytest.raises(ValueError, match=r"predicted masks of shape \(1, 25, 24\) but the query masks are"):
        evaluate(Wrong(), dataset, 1, "cpu", progress=False, max_episodes=1)


def test_original_size_queries_cannot_be_batched_and_say_so(pascal_data):
    original = build_dataset("pascal", pascal_data.datapath, pascal_data.splits, 0, "test", nshot=1, img_size=SIZE,
                             use_original_imgsize=True)
    with pytest.raises(ValueError, match=r"bsz: a use_original_imgsize dataset .* expected bsz=1, got 2"):
        evaluate(Complement(), original, 1, "cpu", progress=False, max_episodes=4, bsz=2)


def test_the_progress_bar_scores_the_classes_seen_so_far(dataset, capsys):
    # The protocol's mIoU counts an unseen class as 0: the bar read 20.00 for a perfect model two
    # episodes into a 5-class fold (a broken model, to the eye).
    assert {dataset.episodes[i].class_id for i in range(2)} == {0}
    evaluate(Truth(), dataset, 1, "cpu", progress=True, max_episodes=2)
    bar = capsys.readouterr().err.replace("\r", "\n").strip().splitlines()[-1]
    assert f"mIoU 100.00 over the 1 of {len(dataset.class_ids)} classes seen" in bar, bar


def test_visualize_writes_one_panel_per_episode(dataset, tmp_path):
    evaluate(Complement(), dataset, 1, "cpu", progress=False, max_episodes=4, visualize_dir=tmp_path / "vis", bsz=3)
    files = sorted(p.name for p in (tmp_path / "vis").iterdir())
    expected = [f"episode{i:05d}_class{dataset.episodes[i].class_id}_iou0.0.png" for i in range(4)]
    assert files == expected
    panel = Image.open(tmp_path / "vis" / files[0])
    # support, query, prediction, truth, errors: 160 px high each (the 24-px images enlarged), 6 px apart,
    # under captions and a title line
    assert panel.width == 5 * 160 + 4 * 6 and panel.height > 160
    # A second run into the same folder would add panels beside these (their names carry the IoU): refused.
    with pytest.raises(ValueError, match=r"visualize_dir: .* holds 4 panels of an earlier evaluation \(such as "
                                         r"episode00000_class\d+_iou0\.0\.png\)"):
        evaluate(Complement(), dataset, 1, "cpu", progress=False, max_episodes=4, visualize_dir=tmp_path / "vis")
    assert sorted(p.name for p in (tmp_path / "vis").iterdir()) == expected


def test_panel_titles_name_the_class(dataset, tmp_path, monkeypatch):
    from hypertriton import evaluation

    titles, render = [], evaluation.render_panel
    monkeypatch.setattr(evaluation, "render_panel", lambda *args, title: titles.append(title) or render(*args,
                                                                                                         title=title))
    evaluate(Complement(), dataset, 1, "cpu", progress=False, max_episodes=1, visualize_dir=tmp_path / "vis")
    assert titles == ["episode 0 | class 0 (aeroplane) | 1-shot | foreground IoU 0.0"]


def test_panel_of_one_item_equals_its_row_in_a_batch(dataset):
    from hypertriton import visualize
    from hypertriton.evaluation import panel_tiles

    items = [dataset[i] for i in range(3)]
    batch = torch.utils.data.default_collate(items)
    pred = 1 - batch["query_mask"].long()
    from_batch = np.asarray(render_panel(batch, pred, row=2))
    from_item = np.asarray(render_panel(items[2], pred[2]))
    np.testing.assert_array_equal(from_item, from_batch)
    tiles = dict(panel_tiles(items[2], pred[2]))
    assert list(tiles) == ["support 1", "query", "prediction", "truth", "errors"]
    query = tiles["query"]
    truth = items[2]["query_mask"].numpy() == 1
    ignore = items[2]["query_ignore_idx"].numpy() == 1
    assert truth.any() and not truth.all()
    support_mask = items[2]["support_masks"][0].numpy() == 1
    np.testing.assert_array_equal(tiles["support 1"], visualize.spotlight(first_support_rgb(items[2]), support_mask))
    np.testing.assert_array_equal(tiles["prediction"], visualize.spotlight(query, ~truth))
    expected_truth = visualize.spotlight(query, truth)
    expected_truth[ignore] = visualize.IGNORED
    np.testing.assert_array_equal(tiles["truth"], expected_truth)
    np.testing.assert_array_equal(tiles["errors"], visualize.error_map(query, ~truth, truth, ignore))
    with pytest.raises(ValueError, match=r"pred: expected \[B, H, W\] with B = 3 .* got \[2, 24, 24\]"):
        render_panel(batch, pred[:2])
    with pytest.raises(IndexError, match="row: 3 is out of range for a batch of 3"):
        render_panel(batch, pred, row=3)
    with pytest.raises(KeyError, match="missing query_mask"):
        render_panel({k: v for k, v in items[0].items() if k != "query_mask"}, pred[0])


def test_an_original_size_panel_shows_the_query_at_the_size_and_shape_it_is_scored_in(pascal_data):
    # With use_original_imgsize the masks are scored at the image's own size; the panel showed them shrunk to
    # the model's square input (another aspect ratio; thin parts lost) beside the resized query.
    from hypertriton import visualize
    from hypertriton.evaluation import panel_tiles

    original = build_dataset("pascal", pascal_data.datapath, pascal_data.splits, 0, "test", nshot=1, img_size=SIZE,
                             use_original_imgsize=True)
    item = next(original[i] for i in range(len(original)) if original[i]["query_mask"].shape[0] != SIZE)
    height, width = item["query_mask"].shape
    pred = torch.zeros(height, width, dtype=torch.long)
    pred[:, -1] = 1  # one column at the right edge
    tiles = dict(panel_tiles(item, pred))
    query = tiles["query"]
    shown = np.array(Image.fromarray(first_query_rgb(item)).resize((width, height), Image.BILINEAR))
    np.testing.assert_array_equal(query, shown)
    truth, ignore = item["query_mask"].numpy() == 1, item["query_ignore_idx"].numpy() == 1
    np.testing.assert_array_equal(tiles["prediction"], visualize.spotlight(query, pred.numpy() == 1))
    np.testing.assert_array_equal(tiles["errors"], visualize.error_map(query, pred.numpy() == 1, truth, ignore))
    assert render_panel(item, pred).height > 0


def first_query_rgb(item) -> np.ndarray:
    return first_support_rgb({"support_imgs": item["query_img"][None]})


def first_support_rgb(item) -> np.ndarray:
    """The first support image as uint8 RGB, stated apart from the panel's code."""
    from hypertriton.data.common import IMAGENET_MEAN, IMAGENET_STD

    std, mean = torch.tensor(IMAGENET_STD).view(3, 1, 1), torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    rgb = item["support_imgs"][0] * std + mean
    return (rgb.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


def test_a_panel_lays_out_supports_and_query_of_other_sizes_and_names_an_episode_without_object(dataset, tmp_path):
    item = dataset[0]
    wide_query = {**item, "query_img": torch.randn(3, 20, 50), "query_mask": torch.zeros(20, 50),
                  "query_ignore_idx": torch.zeros(20, 50)}
    panel = render_panel(wide_query, torch.zeros(20, 50, dtype=torch.long))  # the query 2.5x as wide
    assert panel.width == 160 + 4 * 400 + 4 * 6  # the support, then four tiles of the query, 160 px high
    # No object in the truth nor in the prediction: right, with no IoU to give (it read 0.0).
    class NoObject(Truth):
        def predict_mask_nshot(self, batch, nshot):
            return torch.zeros_like(batch["query_mask"], dtype=torch.long)

    class Empty(torch.utils.data.Dataset):
        class_ids = dataset.class_ids

        def __len__(self):
            return 1

        def __getitem__(self, index):
            return {**dataset[0], "query_mask": torch.zeros(SIZE, SIZE)}

    evaluate(NoObject(), Empty(), 1, "cpu", progress=False, visualize_dir=tmp_path / "vis")
    assert [p.name for p in (tmp_path / "vis").iterdir()] == [f"episode00000_class{dataset[0]['class_id']}_iouNA.png"]


@given(st.integers(0, 40), st.integers(1, 5))
@example(15, 2)
@example(0, 3)
def test_shards_partition_the_episodes(length, world_size):
    shards = [list(ShardSampler(length, rank, world_size)) for rank in range(world_size)]
    assert sorted(sum(shards, [])) == list(range(length))
    assert [len(ShardSampler(length, rank, world_size)) for rank in range(world_size)] == [len(s) for s in shards]


# One rank of a 2-process gloo job (the same all-foreground model as AllForeground above).
WORKER = """
import json
import torch
from hypertriton import distributed as hdist
from hypertriton.data import build_dataset
from hypertriton.evaluation import EvaluationStopped, evaluate


calls = dict(predict=0, asked=0)


class AllForeground:
    def predict_mask_nshot(self, batch, nshot):
        calls["predict"] += 1
        return torch.ones_like(batch["query_mask"], dtype=torch.long)


def ask():  # "stop": rank 1 alone asks before its third batch
    calls["asked"] += 1
    return {mode!r} == "stop" and ctx.rank == 1 and calls["asked"] >= 3


ctx = hdist.init_distributed("cpu")
ds = build_dataset("pascal", {datapath!r}, {splits!r}, 0, "test", nshot=1, img_size={size})
try:
    result = evaluate(AllForeground(), ds, 1, "cpu", progress=False, max_episodes={episodes}, bsz={bsz},
                      visualize_dir={vis!r}, stop_requested=None if {mode!r} == "none" else ask)
except EvaluationStopped as stop:
    result = dict(stopped=True, partial_episodes=stop.partial["episodes"])
result.update(calls)
with open({out!r} + str(ctx.rank), "w") as handle:
    json.dump(result, handle)
hdist.cleanup_distributed()
"""


def run_two_gloo_ranks(pascal_data, tmp_path, mode: str = "none", bsz: int = 2) -> list[dict]:
    """WORKER's result on each of 2 gloo ranks; mode: "none" (no stop_requested), "never" (one that never
    asks), "stop" (rank 1 asks before its third batch)."""
    tmp_path.mkdir(exist_ok=True)
    script = tmp_path / "worker.py"
    script.write_text(WORKER.format(datapath=str(pascal_data.datapath),
                                    splits=str(pascal_data.splits), size=SIZE, episodes=EPISODES,
                                    vis=str(tmp_path / "vis"), out=str(tmp_path / "rank"), mode=mode, bsz=bsz))
    launch_gloo_ranks([script], 2, tmp_path / "ranks", timeout=240)
    return [json.loads((tmp_path / f"rank{rank}").read_text()) for rank in range(2)]


def test_two_gloo_processes_equal_one(pascal_data, dataset, tmp_path):
    results = run_two_gloo_ranks(pascal_data, tmp_path)
    single = evaluate(AllForeground(), dataset, 1, "cpu", progress=False, max_episodes=EPISODES)
    for result in results:
        assert result["episodes"] == EPISODES
        assert result["miou"] == pytest.approx(single["miou"], abs=1e-9)
        assert result["fb_iou"] == pytest.approx(single["fb_iou"], abs=1e-9)
        assert {int(c): v for c, v in result["per_class_iou"].items()} == pytest.approx(single["per_class_iou"])
    panels = sorted(p.name[:12] for p in (tmp_path / "vis").iterdir())
    assert panels == [f"episode{i:05d}" for i in range(EPISODES)]  # each episode once, across both ranks


def test_cli_with_a_real_tiny_model(tmp_path):
    model_module = pytest.importorskip("hypertriton.model")
    from hypertriton.cli import main

    data = make_fss(tmp_path / "fss", {"test": ["bus", "cat"]})
    torch.manual_seed(0)
    checkpoint = tmp_path / "r18.pt"
    model_module.HSNet("resnet18").save_checkpoint(checkpoint)
    out = io.StringIO()
    with redirect_stdout(out):
        code = main(["evaluate", "--benchmark", "fss", "--nshot", "1", "--load", str(checkpoint),
                     "--datapath", str(data.datapath), "--splits", str(data.splits), "--img-size", "64",
                     "--max-episodes", "2", "--device", "cpu", "--no-progress", "--json", str(tmp_path / "r.json")])
    assert code == 0
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["backbone"] == "resnet18" and result["episodes"] == 2
    assert list(result["per_class_iou"]) == ["760", "761"]
    assert result["class_names"] == {"760": "bus", "761": "cat"}  # the FSS-1000 folders
    # the two first episodes are both of class 760 ("bus/1.jpg", "bus/10.jpg"); 761 never seen counts 0
    assert result["per_class_iou"]["761"] == 0.0
    assert result["miou"] == pytest.approx(result["per_class_iou"]["760"] / 2)
    # ... which the output says, with the mean over the one class evaluated
    assert result["classes_evaluated"] == [760]
    assert result["miou_of_evaluated_classes"] == pytest.approx(result["per_class_iou"]["760"])
    lines = out.getvalue().strip().splitlines()
    assert lines[-2] == f"mIoU: {result['miou']:.2f}  FB-IoU: {result['fb_iou']:.2f}"
    assert lines[-1] == (f"note: only 1 of 2 classes had an episode; mIoU counts the other 1 as 0 (the protocol's "
                         f"mean over all classes); over the 1 evaluated: {result['per_class_iou']['760']:.2f}")
    assert not list(tmp_path.glob(".r.json*"))  # no temporary file left behind
    # --lean streams the squeeze blocks: the same scores
    with redirect_stdout(io.StringIO()):
        code = main(["evaluate", "--benchmark", "fss", "--nshot", "1", "--load", str(checkpoint),
                     "--datapath", str(data.datapath), "--splits", str(data.splits), "--img-size", "64",
                     "--max-episodes", "2", "--device", "cpu", "--no-progress", "--lean",
                     "--json", str(tmp_path / "lean.json")])
    assert code == 0
    lean = json.loads((tmp_path / "lean.json").read_text())
    assert lean["per_class_iou"] == pytest.approx(result["per_class_iou"], abs=1e-6)
    # at the original size the real model resizes its logits to each query's own size
    model = model_module.HSNet.from_checkpoint(checkpoint)
    original = build_dataset("fss", data.datapath, data.splits, 0, "test", nshot=1, img_size=64,
                             use_original_imgsize=True)
    assert original[0]["query_mask"].shape != (64, 64)
    assert evaluate(model, original, 1, "cpu", progress=False, max_episodes=1)["episodes"] == 1


@pytest.mark.parametrize("extra, message", [
    (["--json", "{tmp}"], "--json: '{tmp}' is a folder; expected a file name"),
    (["--json", "{tmp}/bad.pt/r.json"], "--json: cannot create '{tmp}/bad.pt/r.json': '{tmp}/bad.pt' is a file"),
    (["--visualize", "{tmp}/bad.pt"], "--visualize: '{tmp}/bad.pt' exists and is not a folder"),
    (["--visualize", "{tmp}/panels"], "--visualize: '{tmp}/panels' holds 1 panels of an earlier evaluation"),
    (["--img-size", "40"], "--img-size must be >= 64"),
    (["--backend", "fast"], "--backend: expected one of"),
    (["--device", "gpu0"], "device: 'gpu0' is not a device; expected cpu, cuda or cuda:N"),
    (["--load", "{tmp}"], "is a folder; expected a checkpoint file"),
])
def test_cli_refuses_what_would_fail_before_evaluating(tmp_path, capsys, extra, message):
    """Each in one line, before the evaluation: an output that cannot be written must not lose its result."""
    from hypertriton.cli import main

    (tmp_path / "bad.pt").write_bytes(b"junk")
    (tmp_path / "panels").mkdir()
    (tmp_path / "panels" / "episode00003_class2_iou51.0.png").write_bytes(b"an earlier run's panel")
    args = ["evaluate", "--benchmark", "synthetic", "--load", str(tmp_path / "bad.pt"), "--no-progress"]
    extra = [arg.format(tmp=tmp_path) for arg in extra]
    if "--load" not in extra:
        from hypertriton.predict import BUNDLED_CHECKPOINT
        args[args.index("--load") + 1] = str(BUNDLED_CHECKPOINT)
    with mock.patch("hypertriton.evaluation.evaluate", side_effect=AssertionError("evaluated")):
        code = main(args + extra)
    err = capsys.readouterr().err
    assert code == 2 and message.format(tmp=tmp_path) in err, err
    assert "Traceback" not in err


def test_cli_refuses_a_backend_that_cannot_run_here_before_loading_anything(tmp_path, capsys, monkeypatch):
    from hypertriton.cli import main
    from hypertriton.predict import BUNDLED_CHECKPOINT

    monkeypatch.delenv("TRITON_INTERPRET")  # the triton backend cannot run on this CPU now
    with mock.patch("hypertriton.data.build_dataset", side_effect=AssertionError("data read")):
        code = main(["evaluate", "--benchmark", "synthetic", "--load", str(BUNDLED_CHECKPOINT), "--backend", "triton",
                     "--device", "cpu", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "--backend: backend 'triton' cannot run on cpu" in err and "Traceback" not in err, err


def test_cli_evaluates_at_the_size_the_checkpoint_was_trained_at(tmp_path, capsys):
    """The bundled checkpoint records 96 px; at the protocol's 400 it would score near 0."""
    from hypertriton.cli import main
    from hypertriton.predict import BUNDLED_CHECKPOINT

    result = tmp_path / "r.json"
    assert main(["evaluate", "--benchmark", "synthetic", "--load", str(BUNDLED_CHECKPOINT), "--max-episodes", "1",
                 "--no-progress", "--json", str(result)]) == 0
    assert json.loads(result.read_text())["img_size"] == 96
    assert "1 episodes at 96 px" in capsys.readouterr().err


def _child_processes() -> list[int]:
    pids = []
    for task in Path(f"/proc/{os.getpid()}/task").iterdir():
        try:
            pids += [int(pid) for pid in (task / "children").read_text().split()]
        except FileNotFoundError:  # a thread that ended since the listing (loader threads shutting down)
            continue
    return pids


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="finds the loader's workers in Linux's /proc")
def test_a_failed_call_with_a_callers_persistent_loader_leaves_no_worker_running(dataset):
    # evaluate() re-shards a caller's loader into one of its own; that copy kept persistent_workers, so a
    # failed call whose exception was kept (a search loop's log of failures, a REPL) kept 2 workers alive.
    class Failing(Truth):
        def predict_mask_nshot(self, batch, nshot):
            raise RuntimeError("out of memory, say")

    earlier = set(_child_processes())
    loader = DataLoader(dataset, batch_size=1, num_workers=2, persistent_workers=True)
    kept = []
    for _ in range(2):
        with pytest.raises(RuntimeError, match="out of memory") as caught:
            evaluate(Failing(), loader, 1, "cpu", progress=False, max_episodes=4)
        kept.append(caught.value)
    deadline = time.monotonic() + 10
    while set(_child_processes()) - earlier and time.monotonic() < deadline:
        time.sleep(0.1)
    assert set(_child_processes()) - earlier == set()
    assert evaluate(Truth(), loader, 1, "cpu", progress=False, max_episodes=2)["episodes"] == 2


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="finds the loader's workers in Linux's /proc")
@pytest.mark.parametrize("nworker", [0, 1])
def test_cli_ctrl_c_prints_the_result_so_far_marked_as_such(tmp_path, capfd, monkeypatch, nworker):
    """Ctrl-C after the second episode: the third is not run, the two are scored, no JSON is written."""
    import signal

    from hypertriton.cli import main
    from hypertriton.model import HSNet
    from hypertriton.predict import BUNDLED_CHECKPOINT

    predicted, signalled = [], []
    predict = HSNet.predict_mask_nshot
    # Not children that other tests of this process left (multiprocessing's resource tracker, started by
    # the first use of spawn, lives as long as the process).
    earlier = set(_child_processes())

    def predict_then_ctrl_c(self, batch, nshot):
        predicted.append(1)
        if len(predicted) == 2:  # as Ctrl-C, which reaches the loader's worker process too
            signalled.extend([pid for pid in _child_processes() if pid not in earlier] + [os.getpid()])
            for pid in signalled:
                os.kill(pid, signal.SIGINT)
        return predict(self, batch, nshot)

    monkeypatch.setattr(HSNet, "predict_mask_nshot", predict_then_ctrl_c)
    # The third episode loads slowly, so that Ctrl-C finds the loader's worker busy with it (a worker
    # that died of it would fail the next fetch instead of the clean stop).
    from hypertriton.data.synthetic import SyntheticDataset
    getitem = SyntheticDataset.__getitem__

    def slow_third(self, index):
        if index == 2:
            time.sleep(1.0)
        return getitem(self, index)

    monkeypatch.setattr(SyntheticDataset, "__getitem__", slow_third)
    result = tmp_path / "r.json"
    code = main(["evaluate", "--benchmark", "synthetic", "--load", str(BUNDLED_CHECKPOINT), "--max-episodes", "5",
                 "--no-progress", "--json", str(result), "--nworker", str(nworker)])
    out, err = capfd.readouterr()  # the file descriptors: a loader worker's output too
    assert code == 130 and len(predicted) == 2 and not result.exists()
    assert (len(signalled) > 1) == (nworker > 0)  # the loader's worker got it too
    assert err.count("SIGINT received: stopping after the current batch") == 1  # not from the worker too
    assert "interrupted after 2 of 5 episodes; the numbers below are over those only (not the protocol's); " \
           "--json not written" in err
    assert re.match(r"partial, interrupted after 2 of 5 episodes: mIoU: \d+\.\d\d  FB-IoU: \d+\.\d\d\n"
                    r"note: only \d of \d+ classes had an episode", out), out
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers restored


def test_cli_reports_bad_checkpoint(tmp_path, capsys):
    pytest.importorskip("hypertriton.model")
    from hypertriton.cli import main

    data = make_fss(tmp_path / "fss", {"test": ["bus"]}, images_per_class=2)
    (tmp_path / "bad.pt").write_bytes(b"junk")
    code = main(["evaluate", "--benchmark", "fss", "--load", str(tmp_path / "bad.pt"), "--datapath",
                 str(data.datapath), "--splits", str(data.splits), "--device", "cpu"])
    assert code == 2 and "bad.pt" in capsys.readouterr().err


def test_stop_request_ends_an_evaluation_before_the_next_batch(dataset):
    model = Truth()
    asked = []

    def stop_before_third():
        asked.append(len(model.keys))  # batches predicted so far
        return len(asked) >= 3

    with pytest.raises(EvaluationStopped, match="after 4 episodes") as stop:
        evaluate(model, dataset, 1, "cpu", progress=False, max_episodes=EPISODES, bsz=2,
                 stop_requested=stop_before_third)
    assert asked == [0, 1, 2] and len(model.keys) == 2
    partial = stop.value.partial  # the 4 episodes evaluated before the stop, scored as evaluate would
    assert partial["episodes"] == 4 and partial["miou_of_evaluated_classes"] == 100.0
    assert partial["classes_evaluated"] == sorted({dataset.episodes[i].class_id for i in range(4)})
    # A request after the last batch lets the finished evaluation through; one never made changes nothing.
    for stop_requested in (lambda: len(model.keys) == 8, lambda: False):
        model = Truth()
        result = evaluate(model, dataset, 1, "cpu", progress=False, max_episodes=EPISODES, bsz=2,
                          stop_requested=stop_requested)
        assert (result["miou"], result["episodes"], len(model.keys)) == (100.0, EPISODES, 8)


def test_two_gloo_ranks_stop_together_and_uneven_shards_still_pair_up(pascal_data, dataset, tmp_path):
    # bsz 1: rank 0 has 8 batches, rank 1 has 7 and joins rank 0's last agreement without a batch.
    never = run_two_gloo_ranks(pascal_data, tmp_path / "never", mode="never", bsz=1)
    single = evaluate(AllForeground(), dataset, 1, "cpu", progress=False, max_episodes=EPISODES)
    assert [(r["episodes"], r["predict"], r["asked"]) for r in never] == [(EPISODES, 8, 9), (EPISODES, 7, 9)]
    assert [r["miou"] for r in never] == pytest.approx([single["miou"]] * 2, abs=1e-9)
    # Rank 1 alone asks before its third batch: both ranks stop after their second.
    stopped = run_two_gloo_ranks(pascal_data, tmp_path / "stop", mode="stop", bsz=1)
    assert [(r.get("stopped"), r["predict"], r["asked"]) for r in stopped] == [(True, 2, 3), (True, 2, 3)]
    assert [r["partial_episodes"] for r in stopped] == [4, 4]  # both ranks' counts, all-reduced
