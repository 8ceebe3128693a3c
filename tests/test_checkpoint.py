"""Checkpoints in the original training script's format: round trips, backbone inference, clear errors."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
import torchvision

from hypertriton import HSNet
from hypertriton import checkpoint as ckpt

_SPEC = importlib.util.spec_from_file_location(
    "original_hsnet", Path(__file__).resolve().parents[1] / "bench" / "original_hsnet.py")
original = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(original)

LEARNER_INCH = {"resnet50": [3, 6, 4], "resnet101": [3, 23, 4], "vgg16": [1, 3, 3], "resnet18": [2, 2, 2],
                "resnet34": [3, 6, 4]}


def original_format_state_dict(backbone: str, device: str = "cpu") -> dict[str, torch.Tensor]:
    """What the original training script saves: DataParallel's ``module.`` before the full torchvision
    backbone's keys and the learner's. Built on the meta device when only keys and shapes matter."""
    torch.manual_seed(1)
    with torch.device(device):
        net = getattr(torchvision.models, backbone)(weights=None)
        learner = original.OriginalHPNLearner(LEARNER_INCH[backbone])
    state = {f"module.backbone.{k}": v for k, v in net.state_dict().items()}
    state.update({f"module.hpn_learner.{k}": v for k, v in learner.state_dict().items()})
    return state


@pytest.fixture(scope="module")
def resnet18_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "best_model.pt"
    torch.save(original_format_state_dict("resnet18"), path)
    return path


def test_original_format_file_loads_and_runs_like_the_original(resnet18_file):
    state = torch.load(resnet18_file)
    model = HSNet.from_checkpoint(resnet18_file)
    assert model.backbone_name == "resnet18" and not model.training
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, state["module." + key], rtol=0, atol=0, msg=key)
    g = torch.Generator().manual_seed(2)
    pyramid = [torch.rand(1, c, n, n, n, n, generator=g) for c, n in zip(LEARNER_INCH["resnet18"], (2, 3, 5))]
    with torch.no_grad():
        torch.testing.assert_close(model.hpn_learner(pyramid), original.run_original_learner(state, pyramid))


def test_save_checkpoint_round_trips_in_the_original_key_format(tmp_path):
    torch.manual_seed(3)
    model = HSNet("resnet18", backend="torch").eval()
    path = model.save_checkpoint(tmp_path / "sub" / "model.pt")
    saved = torch.load(path)
    assert set(saved) == {"module." + key for key in model.state_dict()}
    assert [p.name for p in path.parent.iterdir()] == ["model.pt"]  # no temporary file left behind
    loaded = HSNet.from_checkpoint(path, backend="torch")
    query, support = torch.randn(2, 1, 3, 64, 72)
    mask = torch.ones(1, 64, 72)
    with torch.no_grad():
        torch.testing.assert_close(loaded(query, support, mask), model(query, support, mask), rtol=0, atol=0)


@pytest.mark.parametrize("backbone", ["resnet50", "resnet101", "vgg16", "resnet18", "resnet34"])
def test_backbone_is_inferred_from_the_keys(backbone):
    state = ckpt.strip_prefix(original_format_state_dict(backbone, device="meta"))
    assert ckpt.infer_backbone(state) == backbone
    learner_only = {k: v for k, v in state.items() if k.startswith("hpn_learner.")}
    # without backbone keys the learner's input channels decide (resnet34 shares resnet50's)
    assert ckpt.infer_backbone(learner_only) == ("resnet50" if backbone == "resnet34" else backbone)


def test_a_learner_only_checkpoint_needs_strict_false(resnet18_file):
    state = {k: v for k, v in torch.load(resnet18_file).items() if ".hpn_learner." in k}
    with pytest.raises(ckpt.CheckpointError, match=r"missing keys \(\d+\): backbone\.conv1\.weight"):
        HSNet.from_checkpoint(state)
    model = HSNet.from_checkpoint(state, backbone="resnet18", strict=False)
    torch.testing.assert_close(model.hpn_learner.decoder2[2].bias, state["module.hpn_learner.decoder2.2.bias"])


def test_mismatches_are_listed_by_kind(resnet18_file):
    state = torch.load(resnet18_file)
    del state["module.hpn_learner.decoder1.0.bias"]
    state["module.hpn_learner.extra.weight"] = torch.zeros(1)
    state["module.hpn_learner.decoder2.2.weight"] = torch.zeros(3, 64, 3, 3)
    with pytest.raises(ckpt.CheckpointError) as info:
        HSNet.from_checkpoint(state)
    message = str(info.value)
    assert "missing keys (1): hpn_learner.decoder1.0.bias" in message
    assert "unexpected keys (1): hpn_learner.extra.weight" in message
    assert "mis-shaped keys (1): hpn_learner.decoder2.2.weight (checkpoint [3, 64, 3, 3], model [2, 64, 3, 3])" in message


def test_a_wrong_backbone_is_named(resnet18_file):
    with pytest.raises(ckpt.CheckpointError, match=r"(?s)does not fit HSNet\(backbone='resnet34'\).*look like "
                                                   r"backbone='resnet18'"):
        HSNet.from_checkpoint(resnet18_file, backbone="resnet34")


def test_corrupt_and_foreign_files_are_named(tmp_path, resnet18_file):
    text = tmp_path / "notes.pt"
    text.write_text("not a checkpoint")
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(resnet18_file.read_bytes()[:5000])
    for path in (text, truncated):
        with pytest.raises(ckpt.CheckpointError, match=f"'{path}' is not a PyTorch checkpoint"):
            HSNet.from_checkpoint(path)
    with pytest.raises(FileNotFoundError, match="no such file"):
        HSNet.from_checkpoint(tmp_path / "missing.pt")
    listing = tmp_path / "list.pt"
    torch.save([torch.zeros(1)], listing)
    with pytest.raises(ckpt.CheckpointError, match="holds no state_dict"):
        HSNet.from_checkpoint(listing)
    foreign = tmp_path / "resnet18-imagenet.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), foreign)
    with pytest.raises(ckpt.CheckpointError, match=r"not an HSNet checkpoint.*first keys: \['conv1.weight'"):
        HSNet.from_checkpoint(foreign)
    with pytest.raises(ckpt.CheckpointError, match="not a state_dict"):
        ckpt.read_state_dict({"epoch": 3, "hpn_learner.x": torch.zeros(1)})
    with pytest.raises(ckpt.CheckpointError, match=f"'{tmp_path}' is a folder; expected a checkpoint file"):
        HSNet.from_checkpoint(tmp_path)


def test_a_file_that_would_run_code_is_refused_without_advice_to_run_it(tmp_path):
    """torch's message suggests weights_only=False, which would run the file's code: not passed on."""
    pickled = tmp_path / "pickled.pt"
    torch.save({"model": _NotATensor()}, pickled)
    with pytest.raises(ckpt.CheckpointError, match="holds more than tensors and plain containers") as info:
        HSNet.from_checkpoint(pickled)
    assert "weights_only" not in str(info.value)


def test_a_training_state_is_named_with_the_file_to_load_instead(tmp_path):
    from hypertriton.training import STATE_FORMAT

    state = tmp_path / "last.pt"
    torch.save({"format": STATE_FORMAT, "version": 1, "model": {"hpn_learner.x": torch.zeros(1)}}, state)
    with pytest.raises(ckpt.CheckpointError, match=r"'.*last.pt' is a training state .* load the best_model.pt"):
        HSNet.from_checkpoint(state)


class _NotATensor:
    pass


def test_wrapped_state_dicts_are_unwrapped(resnet18_file):
    state = torch.load(resnet18_file)
    assert ckpt.read_state_dict({"state_dict": state, "epoch": 4}).keys() == state.keys()


def test_an_interrupted_save_keeps_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "model.pt"
    ckpt.atomic_save({"a": torch.ones(2)}, path)

    def failing_save(obj, file):
        file.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        ckpt.atomic_save({"a": torch.zeros(2)}, path)
    monkeypatch.undo()
    torch.testing.assert_close(torch.load(path)["a"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]
