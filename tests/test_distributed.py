"""hypertriton.distributed: torchrun environment parsing, single-process fallbacks, and real 2-process
gloo collectives (two Python processes with torchrun's environment variables)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest
import torch
from helpers import TORCHRUN_VARS, launch_gloo_ranks, posix_signals

from hypertriton import distributed as hdist


def launch_ranks(script: Path, world_size: int, args: list[str], timeout: float = 120) -> list[str]:
    """Run ``script`` as ranks 0..world_size-1 of a gloo job, as torchrun would; returns their stdouts."""
    workdir = tempfile.mkdtemp(prefix="ranks-", dir=script.parent)  # one per launch: a test may launch twice
    return launch_gloo_ranks([script, *args], world_size, workdir, timeout=timeout)


@pytest.fixture
def no_torchrun_env(monkeypatch):
    for name in TORCHRUN_VARS:
        monkeypatch.delenv(name, raising=False)


def test_env_ranks_without_torchrun(no_torchrun_env):
    assert hdist.env_ranks() == (0, 1, 0)


def test_env_ranks_reads_torchrun_variables(no_torchrun_env, monkeypatch):
    monkeypatch.setenv("RANK", "5")
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert hdist.env_ranks() == (5, 8, 1)


@pytest.mark.parametrize("env, message", [
    ({"RANK": "2", "WORLD_SIZE": "2"}, "RANK < WORLD_SIZE"),
    ({"RANK": "0", "WORLD_SIZE": "0"}, "RANK < WORLD_SIZE"),
    ({"RANK": "one", "WORLD_SIZE": "2"}, "RANK='one' is not an integer"),
    ({"RANK": "1"}, "WORLD_SIZE is not"),
    ({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "-1"}, "LOCAL_RANK >= 0"),
], ids=["rank-too-large", "empty-world", "not-integer", "rank-without-world", "negative-local-rank"])
def test_env_ranks_rejects_bad_environment(no_torchrun_env, monkeypatch, env, message):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=message):
        hdist.env_ranks()


@pytest.mark.parametrize("rank, world_size, same, expected", [
    (None, None, True, "hypertriton train: error: boom\n"),
    (None, None, False, "hypertriton train: error: boom\n"),
    (0, 2, True, "hypertriton train: error: boom\n"),
    (1, 2, True, ""),  # rank 0 says it for both
    (1, 2, False, "hypertriton train: error (rank 1 of 2): boom\n"),  # perhaps this rank's alone
])
def test_errors_are_printed_once_or_by_their_rank(no_torchrun_env, monkeypatch, capsys, rank, world_size, same,
                                                  expected):
    from hypertriton.commands import print_error

    if rank is not None:
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", str(world_size))
    print_error("train", ValueError("boom"), same_on_every_rank=same)
    assert capsys.readouterr().err == expected


def test_single_process_context_and_identity_collectives(no_torchrun_env):
    ctx = hdist.init_distributed("cpu")
    assert (ctx.rank, ctx.world_size, ctx.backend, ctx.device) == (0, 1, None, torch.device("cpu"))
    assert ctx.is_main and not ctx.is_distributed and not hdist.is_distributed()
    values = torch.tensor([1.5, -2.0])
    assert hdist.all_reduce_sum(values) is values and values.tolist() == [1.5, -2.0]
    assert hdist.all_reduce_max(values).tolist() == [1.5, -2.0]
    assert hdist.any_rank(True) is True and hdist.any_rank(False) is False
    payload = {"a": [1, 2]}
    assert hdist.broadcast_object(payload) is payload
    assert (hdist.get_rank(), hdist.get_world_size(), hdist.is_main_process()) == (0, 1, True)
    hdist.barrier()  # no process group: returns at once
    hdist.cleanup_distributed()


def test_cuda_device_without_cuda_is_an_error(no_torchrun_env):
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    with pytest.raises(ValueError, match="CUDA is not available"):
        hdist.init_distributed("cuda")


@pytest.fixture
def two_fake_gpus(no_torchrun_env, monkeypatch):
    """CUDA as a machine with two GPUs shows it to init_distributed; returns the devices it was set to
    and the process-group backends it started (no GPU, no process group is touched)."""
    calls = {"set_device": [], "init_process_group": []}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: calls["set_device"].append(str(device)))
    monkeypatch.setattr(hdist.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(hdist.dist, "init_process_group",
                        lambda **kwargs: calls["init_process_group"].append(
                            (kwargs["backend"], str(kwargs.get("device_id")))))

    def torchrun(local_rank: int, world_size: int = 2):
        monkeypatch.setenv("RANK", str(local_rank))
        monkeypatch.setenv("WORLD_SIZE", str(world_size))
        monkeypatch.setenv("LOCAL_RANK", str(local_rank))

    return calls, torchrun


def test_each_torchrun_process_takes_its_own_gpu(two_fake_gpus):
    calls, torchrun = two_fake_gpus
    for local_rank, requested in [(0, "cuda"), (1, "cuda"), (1, "cuda:1")]:
        torchrun(local_rank)
        ctx = hdist.init_distributed(requested)
        assert ctx.device == torch.device("cuda", local_rank) and ctx.backend == "nccl"
    # The group is bound to the rank's GPU (device_id), as NCCL's barrier otherwise guesses it.
    assert calls == {"set_device": ["cuda:0", "cuda:1", "cuda:1"],
                     "init_process_group": [("nccl", "cuda:0"), ("nccl", "cuda:1"), ("nccl", "cuda:1")]}


@pytest.mark.parametrize("local_rank, world_size, device, message", [
    # every rank on cuda:0: NCCL's own error named neither the flag nor the fix
    (1, 2, "cuda:0", r"device: 'cuda:0' under torchrun \(LOCAL_RANK=1\): each of the 2 processes needs a GPU"),
    # more processes than GPUs: rank 2 used to wrap around onto cuda:0
    (2, 3, "cuda", r"LOCAL_RANK=2 but this machine has 2 GPUs: start at most 2 processes per node"),
    (0, 1, "cuda:2", r"device: 'cuda:2' requested but this machine has 2 GPU\(s\) \(cuda:0 to cuda:1\)"),
], ids=["same-gpu-for-all", "more-processes-than-gpus", "no-such-gpu"])
def test_a_gpu_assignment_that_cannot_work_is_named(two_fake_gpus, local_rank, world_size, device, message):
    calls, torchrun = two_fake_gpus
    torchrun(local_rank, world_size)
    with pytest.raises(ValueError, match=message):
        hdist.init_distributed(device)
    assert calls == {"set_device": [], "init_process_group": []}


def test_one_visible_gpu_per_process_is_cuda_0_for_each(two_fake_gpus, monkeypatch):
    calls, torchrun = two_fake_gpus
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)  # CUDA_VISIBLE_DEVICES set per rank
    torchrun(3, 4)
    assert hdist.init_distributed("cuda").device == torch.device("cuda", 0)


def test_evaluation_pins_memory_only_for_a_gpu(monkeypatch):
    from hypertriton.evaluation import _loader

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a CPU run on a GPU machine
    dataset = torch.utils.data.TensorDataset(torch.zeros(4, 1))
    assert not _loader(dataset, 1, 0, None, torch.device("cpu")).pin_memory
    assert _loader(dataset, 1, 0, None, torch.device("cuda", 0)).pin_memory


COLLECTIVES_SCRIPT = textwrap.dedent("""
    import json, sys
    import torch
    from hypertriton import distributed as hdist

    ctx = hdist.init_distributed("cpu")
    rank = ctx.rank
    summed = hdist.all_reduce_sum(torch.tensor([rank + 1.0, 10.0 * (rank + 1)], dtype=torch.float64))
    maxed = hdist.all_reduce_max(torch.tensor([float(rank), -float(rank)]))
    result = {
        "rank": rank, "world_size": ctx.world_size, "backend": ctx.backend, "is_main": ctx.is_main,
        "sum": summed.tolist(), "max": maxed.tolist(),
        "any_last": hdist.any_rank(rank == ctx.world_size - 1), "any_none": hdist.any_rank(False),
        "broadcast": hdist.broadcast_object({"from": rank}),
        "helpers": [hdist.get_rank(), hdist.get_world_size(), hdist.is_distributed()],
    }
    hdist.barrier()
    hdist.cleanup_distributed()
    result["after_cleanup"] = hdist.is_distributed()
    print(json.dumps(result))
""")


def test_two_process_gloo_collectives(tmp_path):
    script = tmp_path / "collectives.py"
    script.write_text(COLLECTIVES_SCRIPT)
    results = [json.loads(out.strip().splitlines()[-1]) for out in launch_ranks(script, 2, [])]
    for rank, result in enumerate(results):
        assert result["rank"] == rank and result["world_size"] == 2 and result["backend"] == "gloo"
        assert result["is_main"] == (rank == 0)
        assert result["sum"] == [1.0 + 2.0, 10.0 + 20.0]
        assert result["max"] == [1.0, 0.0]
        assert result["any_last"] is True and result["any_none"] is False
        assert result["broadcast"] == {"from": 0}
        assert result["helpers"] == [rank, 2, True]
        assert result["after_cleanup"] is False


# --------------------------------------------------------------------------------------------------
# Training on 2 CPU processes (torchrun + gloo + DDP) against a single process

TRAIN_SCRIPT = textwrap.dedent("""
    import json, os, sys
    import torch
    from hypertriton.data.synthetic import SyntheticDataset
    from hypertriton.model import HSNet
    from hypertriton.training import TrainConfig, train

    IMG = 64

    def tiny_run(logpath, interrupt_at=None, error=False):
        torch.manual_seed(0)
        model = HSNet("resnet18")
        val = SyntheticDataset(split="val", fold=0, img_size=IMG, episodes=6)
        # A random decoder calls everything background (mIoU 0 whatever the episodes); centre its
        # fg-bg logit gap so the predictions, and so the compared numbers, depend on every episode.
        batch = torch.utils.data.default_collate([val[i] for i in range(len(val))])
        with torch.no_grad():
            logits = model(batch["query_img"], batch["support_imgs"][:, 0], batch["support_masks"][:, 0])
            model.hpn_learner.decoder2[-1].bias[1] -= (logits[:, 1] - logits[:, 0]).median()
        config = TrainConfig(benchmark="synthetic", backbone="resnet18", pretrained=False, img_size=IMG,
                             bsz=4, lr=1e-5, epochs=1, max_steps_per_epoch=2, val_bsz=1, log_every=1,
                             device="cpu", progress=False, tensorboard=False, logpath=logpath)
        # 7 episodes, global batch 4: batches of 4 and 3 in one process. Two ranks take 4 each (the
        # sampler repeats one episode to even them), in local batches of 2: the repeat must not count.
        trn = SyntheticDataset(split="trn", fold=0, img_size=IMG, episodes=7)

        def on_step(progress):
            if progress["global_step"] == interrupt_at:
                if error:
                    raise RuntimeError("boom")
                raise KeyboardInterrupt  # a second Ctrl-C: no collective can run any more

        return train(config, model=model, train_dataset=trn, val_dataset=val, on_step=on_step)

    if __name__ == "__main__":
        try:
            summary = tiny_run(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else None,
                               error=sys.argv[3:] == ["error"])
        except KeyboardInterrupt:
            # As after a real second Ctrl-C: out at once, without the process group's teardown at exit.
            print("SUMMARY " + json.dumps("interrupted"), flush=True)
            os._exit(0)
        except RuntimeError as failure:
            # A plain exit: every destructor runs, after train() left the process group.
            from hypertriton import distributed as hdist
            summary = {"error": str(failure), "group_left": not hdist.is_distributed()}
        print("SUMMARY " + json.dumps(summary))
""")


def test_two_process_training_matches_a_single_process(tmp_path, monkeypatch):
    import importlib.util

    from hypertriton.data.synthetic import SyntheticDataset
    from hypertriton.evaluation import evaluate
    from hypertriton.model import HSNet
    from hypertriton.training import BEST_CHECKPOINT, LOG_FILE

    script = tmp_path / "tiny_run.py"
    script.write_text(TRAIN_SCRIPT)
    env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_VARS}
    env["OMP_NUM_THREADS"] = "1"
    ddp_dir = tmp_path / "ddp"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1",
                           "--nproc_per_node", "2", str(script), str(ddp_dir)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = [json.loads(line) for line in (ddp_dir / LOG_FILE).read_text().splitlines()]
    assert rows[0]["world_size"] == 2 and [row["global_step"] for row in rows if row["event"] == "step"] == [1, 2]
    ddp_epoch = next(row for row in rows if row["event"] == "epoch")

    # The sharded validation equals a single-process evaluation of the same weights on the same episodes.
    model = HSNet.from_checkpoint(ddp_dir / BEST_CHECKPOINT)
    val = SyntheticDataset(split="val", fold=0, img_size=64, episodes=6)
    single_eval = evaluate(model, val, nshot=1, device="cpu", progress=False, bsz=1)
    assert 0 < single_eval["miou"] < 100 and single_eval["episodes"] == 6
    assert ddp_epoch["val_miou"] == single_eval["miou"]
    assert ddp_epoch["val_fbiou"] == single_eval["fb_iou"]

    # Training: the same episodes in the same global batches, gradients averaged over the two shards.
    spec = importlib.util.spec_from_file_location("tiny_run", script)
    tiny_run = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tiny_run)
    for name in TORCHRUN_VARS:
        monkeypatch.delenv(name, raising=False)
    single = tiny_run.tiny_run(str(tmp_path / "single"))
    assert single["train_loss"] == pytest.approx(ddp_epoch["train_loss"], rel=1e-5)
    single_epoch = next(json.loads(line) for line in (tmp_path / "single" / LOG_FILE).read_text().splitlines()
                        if json.loads(line)["event"] == "epoch")
    # Each rank counts its own episodes, summed over the ranks: the training mIoU of all 7 episodes.
    assert 0 < single_epoch["train_miou"] < 100
    assert (ddp_epoch["train_miou"], ddp_epoch["train_fbiou"]) == (single_epoch["train_miou"],
                                                                   single_epoch["train_fbiou"])
    single_weights = torch.load(tmp_path / "single" / BEST_CHECKPOINT, weights_only=True)
    ddp_weights = torch.load(ddp_dir / BEST_CHECKPOINT, weights_only=True)
    torch.manual_seed(0)
    initial = HSNet("resnet18").state_dict()
    learner_change = 0.0
    for key, value in single_weights.items():
        # Sharded and whole-batch gradients are summed in different orders: a few ulps apart. Adam's
        # step lr * m / (sqrt(v) + eps) turns that into up to a few percent of lr where a gradient is
        # itself near eps (a sum that nearly cancels), hence atol = 5e-7 = lr / 20.
        torch.testing.assert_close(ddp_weights[key], value, rtol=1e-6, atol=5e-7,
                                   msg=lambda message, key=key: f"{key}: {message}")
        if key.startswith("module.hpn_learner."):
            learner_change = max(learner_change, float((value - initial[key[len("module."):]]).abs().max()))
    # Two Adam steps move weights by about 2 lr = 2e-5: far more than the tolerances above.
    assert learner_change > 5e-6


def test_a_second_ctrl_c_under_torchrun_saves_every_ranks_training_counts(tmp_path, monkeypatch):
    import importlib.util

    from hypertriton.training import LAST_CHECKPOINT, load_training_state

    script = tmp_path / "tiny_run.py"
    script.write_text(TRAIN_SCRIPT)
    outputs = launch_ranks(script, 2, [str(tmp_path / "ddp"), "1"], timeout=240)
    assert all("SUMMARY \"interrupted\"" in out for out in outputs)
    ddp_counts = load_training_state(tmp_path / "ddp" / LAST_CHECKPOINT)["train_counts"]

    spec = importlib.util.spec_from_file_location("tiny_run", script)
    tiny_run = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tiny_run)
    for name in TORCHRUN_VARS:
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(KeyboardInterrupt):
        tiny_run.tiny_run(str(tmp_path / "single"), interrupt_at=1)
    single_counts = load_training_state(tmp_path / "single" / LAST_CHECKPOINT)["train_counts"]
    # The first global batch: 4 episodes, 2 per rank; rank 0 used to save its own 2 as the totals.
    assert ddp_counts["episodes"] == single_counts["episodes"] == 4
    for key in ("intersection", "union", "class_episodes"):
        assert torch.equal(ddp_counts[key], single_counts[key]), key
    assert single_counts["union"].sum() > 0


def test_an_error_on_every_rank_leaves_train_with_it_and_the_process_group_torn_down(tmp_path):
    # The teardown used to run while the error's traceback still held the DDP model: its reducer then
    # dropped the group's last reference with the GIL held while gloo's worker thread waited for the GIL.
    # A race, which this test cannot force: beside a CPU hog (torch 2.11) it hung in 4 runs of 12 with the
    # old teardown and in none of 12 with the fix.
    script = tmp_path / "tiny_run.py"
    script.write_text(TRAIN_SCRIPT)
    outputs = launch_ranks(script, 2, [str(tmp_path / "ddp"), "1", "error"], timeout=240)
    summaries = [json.loads(out.split("SUMMARY ", 1)[1]) for out in outputs]
    assert summaries == [{"error": "boom", "group_left": True}] * 2


STOP_IN_VALIDATION_SCRIPT = textwrap.dedent("""
    import json, os, signal, sys
    import torch
    from hypertriton.data.synthetic import SyntheticDataset
    from hypertriton.model import HSNet
    from hypertriton.training import TrainConfig, train

    calls = []
    predict = HSNet.predict_mask_nshot

    def counting_predict(self, batch, nshot):
        calls.append(int(os.environ["RANK"]))
        if os.environ["RANK"] == "1" and len(calls) == 2 and sys.argv[2] == "stop":
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C reaching one rank, during its second batch
        return predict(self, batch, nshot)

    HSNet.predict_mask_nshot = counting_predict
    torch.manual_seed(0)
    config = TrainConfig(benchmark="synthetic", backbone="resnet18", pretrained=False, img_size=64, bsz=4,
                         lr=1e-5, epochs=2, max_steps_per_epoch=2, val_bsz=1, device="cpu", progress=False,
                         tensorboard=False, logpath=sys.argv[1], resume="auto" if sys.argv[2] == "resume" else None)
    summary = train(config, model=HSNet("resnet18"),
                    train_dataset=SyntheticDataset(split="trn", fold=0, img_size=64, episodes=16),
                    val_dataset=SyntheticDataset(split="val", fold=0, img_size=64, episodes=7))
    print("RESULT " + json.dumps({"summary": summary, "predict_calls": len(calls)}))
""")


@posix_signals
def test_ctrl_c_on_one_rank_stops_every_rank_in_validation_and_resume_reruns_it(tmp_path):
    from hypertriton.training import LAST_CHECKPOINT, LOG_FILE, load_training_state

    script = tmp_path / "stop_in_validation.py"
    script.write_text(STOP_IN_VALIDATION_SCRIPT)
    logpath = tmp_path / "run"

    def run(mode):
        outputs = launch_ranks(script, 2, [str(logpath), mode], timeout=240)
        return [json.loads(out.split("RESULT ", 1)[1]) for out in outputs]

    # Validation has 7 episodes at batch 1: rank 0 gets 4 batches, rank 1 gets 3. Rank 1 is signalled
    # during its second batch; both ranks stop before their third, not at the end of their shards.
    stopped = run("stop")
    assert [r["predict_calls"] for r in stopped] == [2, 2]
    assert all(r["summary"]["interrupted"] and r["summary"]["global_step"] == 2 for r in stopped)
    rows = [json.loads(line) for line in (logpath / LOG_FILE).read_text().splitlines()]
    stop_row, = [row for row in rows if row["event"] == "stop"]
    assert (stop_row["during"], stop_row["global_step"]) == ("validation", 2)
    assert not any(row["event"] == "epoch" for row in rows)
    state = load_training_state(logpath / LAST_CHECKPOINT)
    assert (state["epoch"], state["step"], state["global_step"]) == (0, 2, 2)
    # The resumed run validates epoch 0 in full (4 + 3 episodes), trains epoch 1 and validates it.
    resumed = run("resume")
    assert [r["predict_calls"] for r in resumed] == [8, 6]
    assert all(not r["summary"]["interrupted"] and r["summary"]["global_step"] == 4 for r in resumed)
    rows = [json.loads(line) for line in (logpath / LOG_FILE).read_text().splitlines()]
    assert [row["epoch"] for row in rows if row["event"] == "epoch"] == [0, 1]
