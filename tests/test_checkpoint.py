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


def test_a_backbone_of_ones_own_is_not_taken_for_a_known_one_and_the_way_to_load_it_is_said(tmp_path):
    # A ConvNeXt's 'backbone.features.*' keys read as VGG16's; a custom backbone with resnet18's learner
    # was taken for resnet18 by its learner's input channels. Both then failed on mismatched keys.
    from hypertriton.backbones import BackboneSpec

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.features = torch.nn.Sequential(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, stride=8, padding=1)))
            self.register_buffer("offset", torch.full((1, 4, 1, 1), 0.5), persistent=False)  # not in the file

        def forward(self, img):
            x = self.features(img) + self.offset
            return [x] * 6

    spec = BackboneSpec("tiny", "custom", (4,) * 6, (2, 2, 2), (8, 8, 8))
    model = HSNet(Tiny(), spec=spec, backend="torch")
    path = tmp_path / "mine.pt"
    model.save_checkpoint(path)
    with pytest.raises(ckpt.CheckpointError, match=r"its 'backbone.\*' keys are none of .* "
                                                   r"HSNet.from_checkpoint\(path, backbone=module, spec="):
        HSNet.from_checkpoint(path)
    torch.manual_seed(1)
    again = HSNet.from_checkpoint(path, backbone=Tiny(), spec=spec, backend="torch")
    for key, value in model.state_dict().items():
        assert torch.equal(again.state_dict()[key], value), key
    assert torch.equal(again.backbone.offset, torch.full((1, 4, 1, 1), 0.5))  # kept, not emptied
    query, support, mask = torch.randn(2, 1, 3, 64, 64)[0], torch.randn(1, 3, 64, 64), torch.ones(1, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(again(query, support, mask), model.eval()(query, support, mask))


@pytest.mark.parametrize("backbone", ["resnet50", "resnet101", "vgg16", "resnet18", "resnet34"])
def test_backbone_is_inferred_from_the_keys_and_an_ambiguous_learner_is_refused(backbone):
    state = ckpt.strip_prefix(original_format_state_dict(backbone, device="meta"))
    assert ckpt.infer_backbone(state) == backbone
    learner_only = {k: v for k, v in state.items() if k.startswith("hpn_learner.")}
    if backbone in ("resnet34", "resnet50"):  # same learner input channels: the keys cannot tell which
        with pytest.raises(ckpt.CheckpointError, match=r"fit the backbones \['resnet34', 'resnet50'\].*pass backbone="):
            ckpt.infer_backbone(learner_only)
    else:  # without backbone keys the learner's input channels decide
        assert ckpt.infer_backbone(learner_only) == backbone


def test_a_learner_only_resnet34_file_is_not_built_around_resnet50(tmp_path):
    state = ckpt.strip_prefix(original_format_state_dict("resnet34"))
    path = tmp_path / "learner.pt"
    torch.save({k: v for k, v in state.items() if k.startswith("hpn_learner.")}, path)
    with pytest.raises(ckpt.CheckpointError, match="pass backbone="):
        HSNet.from_checkpoint(path, strict=False)
    model = HSNet.from_checkpoint(path, backbone="resnet34", strict=False)
    assert model.backbone_name == "resnet34"
    torch.testing.assert_close(model.hpn_learner.decoder2[2].bias, state["hpn_learner.decoder2.2.bias"])


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


def test_dataparallel_and_plain_keys_for_one_weight_are_refused_not_one_dropped(resnet18_file):
    state = torch.load(resnet18_file)
    state["hpn_learner.decoder2.2.bias"] = torch.full((2,), 7.0)  # also saved as module.hpn_learner.decoder2.2.bias
    with pytest.raises(ckpt.CheckpointError, match=r"both 'module.hpn_learner.decoder2.2.bias' and "
                                                   r"'hpn_learner.decoder2.2.bias'"):
        HSNet.from_checkpoint(state)
    assert ckpt.strip_prefix({"module.a": torch.zeros(1), "b": torch.ones(1)}).keys() == {"a", "b"}


def test_tensors_without_data_are_refused_by_name(tmp_path):
    meta = original_format_state_dict("resnet18", device="meta")
    path = tmp_path / "meta.pt"
    torch.save(meta, path)
    for source, named in ((meta, "the given state_dict"), (path, repr(str(path)))):
        with pytest.raises(ckpt.CheckpointError) as info:
            HSNet.from_checkpoint(source)
        assert f"{named} holds {len(meta)} tensors without data (on the meta device)" in str(info.value)
        assert "'module.backbone.conv1.weight'" in str(info.value)


def test_a_checkpoint_without_batchnorm_counters_loads_as_torch_loads_it(resnet18_file):
    """Files from before PyTorch 0.4.1 (or converted) have no num_batches_tracked; torch's strict
    load_state_dict accepts them, keeping the model's counter (0 for a new model)."""
    state = {k: v for k, v in torch.load(resnet18_file).items() if not k.endswith("num_batches_tracked")}
    assert len(state) < len(torch.load(resnet18_file))
    model = HSNet.from_checkpoint(state)
    reference = HSNet("resnet18")
    reference.load_state_dict(ckpt.strip_prefix(state), strict=True)
    for key, value in reference.state_dict().items():
        torch.testing.assert_close(model.state_dict()[key], value, rtol=0, atol=0, msg=key)
    assert model.backbone.bn1.num_batches_tracked.item() == 0
    del state["module.backbone.bn1.running_mean"]  # the statistics themselves are still required
    with pytest.raises(ckpt.CheckpointError, match=r"missing keys \(1\): backbone.bn1.running_mean$"):
        HSNet.from_checkpoint(state)


# --------------------------------------------------------------------------------------------------
# The compact format (the bundled weights')


def _compact_file(tmp_path) -> Path:
    from hypertriton.compact import save_compact

    g = torch.Generator().manual_seed(0)
    state = {"a4": torch.randn(64, 65, generator=g), "b8": torch.randn(4097, generator=g),
             "c16": torch.randn(5, generator=g), "n": torch.tensor(3)}
    return save_compact(state, tmp_path / "compact.pt", bits={"": 4, "b8": 8}, metadata={"img_size": 96})


def _set(key, field, value):
    def change(payload):
        payload["tensors"][key][field] = value(payload["tensors"][key][field]) if callable(value) else value
    return change


def _drop(key, field):
    return lambda payload: payload["tensors"][key].pop(field)


MALFORMED_COMPACT = {
    "version 2": (lambda payload: payload.update(version=2), r"is compact format version 2; this hypertriton reads "
                                                             r"version 1 \(written by a newer hypertriton"),
    "version banana": (lambda payload: payload.update(version="banana"), "is compact format version 'banana'"),
    "version True": (lambda payload: payload.update(version=True), "is compact format version True"),
    "unknown kind": (_set("a4", "kind", "codebook2"), r"tensor 'a4': unknown kind 'codebook2'; expected one of"),
    "integer dtype": (_set("a4", "dtype", "int8"), r"tensor 'a4': dtype 'int8' is not one the writer stores"),
    "torch function as dtype": (_set("b8", "dtype", "load"), r"tensor 'b8': dtype 'load' is not one"),
    "short index": (_set("a4", "index", lambda index: index[:10].clone()),
                    r"tensor 'a4': 'index' has shape \[10\]; shape \[64, 65\] needs 2080 bytes"),
    "long index": (_set("b8", "index", lambda index: torch.cat([index, index])), r"'index' has shape \[8194\]"),
    "short codebook": (_set("b8", "codebook", lambda book: book[:3].clone()),
                       r"tensor 'b8': codebook8 needs a codebook of 256 values, got shape \[3\]"),
    "no shape": (_drop("a4", "shape"), r"tensor 'a4': no 'shape' field"),
    "negative shape": (_set("a4", "shape", torch.tensor([-1])), r"'shape' is \[-1\], expected a list of sizes"),
    "float raw": (_set("n", "data", torch.zeros(2)), r"tensor 'n': a raw entry holds torch.float32"),
    "fp16 not a tensor": (_set("c16", "data", [1.0]), r"tensor 'c16': 'data' is a list, expected a tensor"),
    "tensors a list": (lambda payload: payload.update(tensors=[1, 2]), r"'tensors' is a list, expected a mapping"),
    "metadata a string": (lambda payload: payload.update(metadata="x"), r"'metadata' is a str, expected a mapping"),
    # A few bytes that would expand to gigabytes: torch.save keeps expand()'s stride-0 views.
    "stride-0 fp16": (_set("c16", "data", torch.zeros(1, dtype=torch.float16).expand(2**28)),
                      r"tensor 'c16': 'data' is a view of a storage of another size \(strides \[0\]"),
    "stride-0 index": (_set("b8", "index", lambda index: index[:1].expand(index.shape[0])),
                       r"tensor 'b8': 'index' is a view of a storage of another size"),
    "slice of a larger storage": (_set("c16", "data", lambda data: torch.cat([data, data])[: data.shape[0]]),
                                  r"'data' is a view of a storage of another size"),
    "shape past int64": (_set("a4", "shape", torch.tensor([2**32, 2**32])), r"holds more than 2147483648 elements"),
}


@pytest.mark.parametrize("case", MALFORMED_COMPACT)
def test_a_compact_file_the_writer_could_not_have_written_is_refused_naming_file_and_entry(tmp_path, case):
    from hypertriton.compact import load_compact

    change, message = MALFORMED_COMPACT[case]
    payload = torch.load(_compact_file(tmp_path), weights_only=True)
    change(payload)
    path = tmp_path / "bad.pt"
    torch.save(payload, path)
    for load in (load_compact, ckpt.read_state_dict, HSNet.from_checkpoint):
        with pytest.raises(ckpt.CheckpointError, match=message) as info:
            load(path)
        assert str(info.value).startswith(f"checkpoint: {str(path)!r}")


def test_what_the_compact_writer_stores_exactly_or_in_any_float_dtype_round_trips(tmp_path):
    from hypertriton.compact import load_compact, save_compact

    g = torch.Generator().manual_seed(1)
    levels = torch.linspace(-1, 1, 16)
    state = {f"w_{dtype}": levels[torch.randint(0, 16, (4096,), generator=g)].to(dtype)
             for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64)}
    state.update(count=torch.tensor(5), flags=torch.tensor([True, False]), pixels=torch.arange(7, dtype=torch.uint8),
                 phase=torch.tensor([1 + 2j]))
    loaded, _ = load_compact(save_compact(state, tmp_path / "all.pt", bits=4))
    for key, value in state.items():
        assert loaded[key].dtype == value.dtype, key
        torch.testing.assert_close(loaded[key], value, rtol=0, atol=1e-3 if value.is_floating_point() else 0)


# --------------------------------------------------------------------------------------------------
# python -m hypertriton.data.synthetic bundle


@pytest.fixture()
def trained_run(tmp_path) -> Path:
    """A run folder as 'hypertriton train' leaves it, with a tiny learner-only resnet18 best_model.pt
    (the learner's input channels [2, 2, 2] name resnet18; small tensors keep the bundling fast)."""
    run = tmp_path / "run"
    run.mkdir()
    torch.save({f"module.hpn_learner.encoder_layer{level}.0.conv1.weight": torch.ones(4, 2, 3, 3, 3, 3)
                for level in (4, 3, 2)}, run / "best_model.pt")
    (run / "config.json").write_text('{"benchmark": "synthetic", "fold": 2, "backbone": "resnet18", "img_size": 128}')
    return run


def _bundle(run, *flags) -> tuple[int, dict | None]:
    from hypertriton.compact import load_compact
    from hypertriton.data.synthetic import _main

    out = run.parent / "bundle.pt"
    out.unlink(missing_ok=True)
    code = _main(["bundle", str(run / "best_model.pt"), "--out", str(out), *flags])
    return code, (load_compact(out)[1] if out.exists() else None)


def test_bundle_records_the_training_runs_settings_from_its_config(trained_run, capsys):
    assert _bundle(trained_run) == (0, {"backbone": "resnet18", "img_size": 128, "benchmark": "synthetic", "fold": 2})
    assert "note" not in capsys.readouterr().err


def test_bundle_flags_win_over_the_config_with_a_note(trained_run, capsys):
    code, metadata = _bundle(trained_run, "--img-size", "80")
    assert code == 0 and metadata["img_size"] == 80 and metadata["fold"] == 2
    assert f"note: --img-size 80 overrides img_size=128 recorded in '{trained_run / 'config.json'}'" \
        in capsys.readouterr().err


def test_bundle_without_a_config_uses_the_defaults_and_says_so(trained_run, capsys):
    (trained_run / "config.json").unlink()
    code, metadata = _bundle(trained_run, "--fold", "1")
    assert code == 0 and (metadata["img_size"], metadata["backbone"], metadata["fold"]) == (96, "resnet18", 1)
    assert "no config.json of 'hypertriton train' next to" in capsys.readouterr().err


@pytest.mark.parametrize("config, flags, message", [
    ('{"img_size": 128}', [], r"is not the config.json that 'hypertriton train' writes \(no 'benchmark' field\)"),
    ('{"benchmark": "synthetic", "img_size": null}', [], r"img_size None \(in '.*config.json'\) is not an integer "
                                                        r"from 32 to 4096"),
    ('{"benchmark": "synthetic", "img_size": 31}', [], "img_size 31"),
    ('{"benchmark": "synthetic"}', ["--img-size", "96", "--backbone", "resnet50"],
     r"backbone 'resnet50' \(given\) does not fit .* whose keys are those of 'resnet18'"),
])
def test_bundle_refuses_settings_it_cannot_record_truthfully(trained_run, capsys, config, flags, message):
    import re

    (trained_run / "config.json").write_text(config)
    assert _bundle(trained_run, *flags) == (2, None)
    err = capsys.readouterr().err
    assert re.search(message, err) and err.rstrip().endswith("nothing was written") and "Traceback" not in err


def test_bundle_refuses_a_backbone_of_no_known_kind(trained_run, capsys):
    # Its keys decide nothing known, but they are a backbone's: bundled as the config's resnet18, the file
    # then failed to load on 102 missing keys.
    state = torch.load(trained_run / "best_model.pt", weights_only=True)
    state["module.backbone.stem.weight"] = torch.ones(8, 3, 3, 3)
    torch.save(state, trained_run / "best_model.pt")
    assert _bundle(trained_run) == (2, None)
    assert "its 'backbone.*' keys are none of" in capsys.readouterr().err


def test_loading_a_checkpoint_leaves_the_global_generator_alone(resnet18_file, monkeypatch):
    """Nothing is drawn, and the state is not saved and restored either: a restore would rewind the draws
    other threads made meanwhile (a data thread repeating its random crops)."""
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    monkeypatch.setattr(torch, "set_rng_state", lambda state: pytest.fail("the generator state was restored"))
    model = HSNet.from_checkpoint(resnet18_file)
    torch.testing.assert_close(torch.rand(3), expected, rtol=0, atol=0)
    assert all(int(b) == 0 for name, b in model.named_buffers() if name.endswith("num_batches_tracked"))


@pytest.mark.parametrize("backbone", ["vgg16", "resnet50"])
def test_backbones_built_on_the_meta_device_read_and_draw_nothing(backbone):
    """What from_checkpoint relies on for every backbone: VGG's random initialization made real CPU
    tensors (and drew 15M numbers) even inside ``with torch.device("meta")``; a weights file is not read."""
    from hypertriton import backbones as bb

    torch.manual_seed(6)
    expected = torch.rand(2)
    torch.manual_seed(6)
    with torch.device("meta"):
        model = bb.build_backbone(backbone, pretrained=True, weights="no/such/file.pth")
    assert {p.device.type for p in model.parameters()} == {"meta"} and not model.training
    torch.testing.assert_close(torch.rand(2), expected, rtol=0, atol=0)


# Pickles by hand: a dict keyed by a tuple that nests its child twice, ``depth`` levels (2^depth hashing
# steps from a few bytes each level; at 64 levels a 1-KB file hangs torch.load).
def _nested_tuple_key_pickle(depth: int) -> bytes:
    level = b"h\x01h\x01\x86q\x01"  # BINGET 1, BINGET 1, TUPLE2, BINPUT 1
    return b"\x80\x02}q\x00K\x00\x85q\x01" + level * depth + b"Ns."  # ... NONE, SETITEM, STOP


def _colliding_int_keys_pickle(count: int) -> bytes:
    # Keys 5 + i * (2^61 - 1) all hash to 5: each insertion compares with every key before it.
    import pickle
    return pickle.dumps({5 + i * (2**61 - 1): 0 for i in range(count)}, protocol=2)


def _with_data_pickle(path: Path, data_pickle: bytes, legacy: bool) -> Path:
    """A torch.save file (zip or legacy format) whose object pickle is ``data_pickle``."""
    import pickle
    import zipfile

    from torch import serialization
    if legacy:
        sys_info = {"protocol_version": serialization.PROTOCOL_VERSION, "little_endian": True,
                    "type_sizes": {"short": 2, "int": 4, "long": 4}}
        path.write_bytes(pickle.dumps(serialization.MAGIC_NUMBER, protocol=2)
                         + pickle.dumps(serialization.PROTOCOL_VERSION, protocol=2)
                         + pickle.dumps(sys_info, protocol=2) + data_pickle + pickle.dumps([], protocol=2))
        return path
    template = path.with_suffix(".template")
    torch.save({}, template)
    with zipfile.ZipFile(template) as source, zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as target:
        for record in source.infolist():
            body = source.read(record)
            target.writestr(record, data_pickle if record.filename.endswith("/data.pkl") else body)
    return path


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
@pytest.mark.parametrize("data_pickle, problem", [
    (_nested_tuple_key_pickle(20), "builds a tuple 17 deep, of 131071 tuples unfolded"),
    (_colliding_int_keys_pickle(50), "keys a dict by an integer of 62 bits"),
], ids=["nested-tuple-key", "colliding-int-keys"])
def test_a_file_whose_keys_could_hash_forever_is_refused_unbuilt(tmp_path, data_pickle, problem, legacy):
    # Small enough here to load (and be refused later, differently) without the guard.
    path = _with_data_pickle(tmp_path / "hostile.pt", data_pickle, legacy)
    with pytest.raises(ckpt.CheckpointError, match=f"hostile.pt.*{problem}"):
        ckpt.read_state_dict(path)
    from hypertriton.training import load_training_state
    with pytest.raises(ValueError, match=f"resume: .*{problem}"):
        load_training_state(path)


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_a_dict_built_from_unchecked_pairs_is_refused(tmp_path, legacy):
    import pickle
    from collections import OrderedDict

    class BuiltFromPairs:
        def __reduce__(self):
            return OrderedDict, ([("weight", 1)],)
    path = _with_data_pickle(tmp_path / "pairs.pt", pickle.dumps(BuiltFromPairs(), protocol=2), legacy)
    with pytest.raises(ckpt.CheckpointError, match="builds a collections.OrderedDict from items that would be hashed"):
        ckpt.read_state_dict(path)
    # A set as protocol 2 writes it: the global is Python 2's __builtin__.set, which torch reads as builtins.set.
    assert b"__builtin__" in pickle.dumps({"a"}, protocol=2)
    path = _with_data_pickle(tmp_path / "set.pt", pickle.dumps({"pairs": {(1, 2)}}, protocol=2), legacy)
    with pytest.raises(ckpt.CheckpointError, match="builds a builtins.set from items"):
        ckpt.read_state_dict(path)
    # A set of names (a run's class list, say) is what a key could be: it loads.
    path = _with_data_pickle(tmp_path / "names.pt", pickle.dumps({"names": {"a", "b"}}, protocol=2), legacy)
    with pytest.raises(ckpt.CheckpointError, match="is not a state_dict"):  # read, then found to hold no tensors
        ckpt.read_state_dict(path)


def test_the_guard_reads_what_torch_reads_a_file_without_crcs_and_python2_strings(tmp_path):
    from torch import serialization

    from hypertriton._pickle_guard import check_torch_file

    # torch can save without CRCs (Python's zipfile then refuses the archive, torch reads it): the guard
    # reads the file with torch's reader, so a hostile key there is refused, and a real state_dict loads.
    previous = serialization.get_crc32_options() if hasattr(serialization, "get_crc32_options") else True
    serialization.set_crc32_options(False)
    try:
        torch.save({(1, 2): torch.zeros(1)}, tmp_path / "tuple-key.pt")
        torch.save({"weight": torch.ones(2)}, tmp_path / "plain.pt")
    finally:
        serialization.set_crc32_options(previous)
    import zipfile
    with pytest.raises(zipfile.BadZipFile):
        zipfile.ZipFile(tmp_path / "plain.pt").read("plain/data.pkl")
    with pytest.raises(ckpt.CheckpointError, match="keys a dict by a tuple"):
        ckpt.read_state_dict(tmp_path / "tuple-key.pt")
    assert torch.equal(ckpt.read_state_dict(tmp_path / "plain.pt")["weight"], torch.ones(2))
    # A legacy file from Python 2 keys by byte strings (SHORT_BINSTRING), which torch reads as str.
    python2_keys = b"\x80\x02}q\x00U\x06weightq\x01K\x01s."  # {'weight': 1}
    path = _with_data_pickle(tmp_path / "py2.pt", python2_keys, legacy=True)
    with open(path, "rb") as handle:
        check_torch_file(handle, str(path))  # passes
    assert torch.load(path, weights_only=True) == {"weight": 1}


class _Reduces:
    """Pickles as ``function(*arguments)`` (with ``state``, through BUILD), to write hostile files with."""

    def __init__(self, function, arguments, state=None):
        self.reduced = (function, arguments) if state is None else (function, arguments, state)

    def __reduce__(self):
        return self.reduced


def _persistent_id_pickle(key: bytes) -> bytes:
    # ("storage", FloatStorage, key, "cpu", 0) as a persistent id, which torch looks up by its key
    return (b"\x80\x02(X\x07\x00\x00\x00storagectorch\nFloatStorage\n" + key
            + b"X\x03\x00\x00\x00cpuK\x00tQ.")


@pytest.mark.parametrize("data_pickle, problem", [
    # torch's _rebuild_from_type_v2 calls what it is given: set(...) on items no key check sees
    (lambda: __import__("pickle").dumps(_Reduces(torch._tensor._rebuild_from_type_v2,
                                                 (set, set, ([(1, 2)],), None)), protocol=2),
     "passes builtins.set on to be called elsewhere"),
    (lambda: _persistent_id_pickle(b"K\x01K\x02\x86\x85"), "names a storage by something other than a flat tuple"),
    # an OrderedDict filled through BUILD from a list of pairs, whose keys torch hashes
    (lambda: __import__("pickle").dumps(_Reduces(__import__("collections").OrderedDict, (), [((1, 2), 3)]),
                                        protocol=2), "fills a collections.OrderedDict from a list"),
], ids=["rebuild-from-type-set", "persistent-id-key", "ordered-dict-build"])
@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_every_place_torch_hashes_what_a_file_gives_is_checked(tmp_path, data_pickle, problem, legacy):
    path = _with_data_pickle(tmp_path / "hostile.pt", data_pickle(), legacy)
    with pytest.raises(ckpt.CheckpointError, match=problem):
        ckpt.read_state_dict(path)


def test_a_legacy_files_storage_keys_must_be_names(tmp_path):
    import pickle

    from torch import serialization
    sys_info = {"protocol_version": serialization.PROTOCOL_VERSION, "little_endian": True,
                "type_sizes": {"short": 2, "int": 4, "long": 4}}
    path = tmp_path / "keys.pt"
    path.write_bytes(pickle.dumps(serialization.MAGIC_NUMBER, protocol=2)
                     + pickle.dumps(serialization.PROTOCOL_VERSION, protocol=2) + pickle.dumps(sys_info, protocol=2)
                     + pickle.dumps({"weight": 1}, protocol=2) + pickle.dumps([(1, (2,))], protocol=2))
    with pytest.raises(ckpt.CheckpointError, match="lists as a storage key a tuple"):
        ckpt.read_state_dict(path)


def test_the_guard_passes_both_formats_of_a_real_checkpoint_and_a_training_state(tmp_path, resnet18_file):
    from hypertriton._pickle_guard import check_torch_file
    state = torch.load(resnet18_file, weights_only=True)
    legacy = tmp_path / "legacy.pt"
    torch.save(state, legacy, _use_new_zipfile_serialization=False)
    loaded = ckpt.read_state_dict(legacy)
    assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], state[k]) for k in state)
    # What a training state holds beyond names: an optimizer's integer-keyed state, nested containers.
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.ones(1, 2)).sum().backward()
    optimizer.step()
    for legacy_format in (False, True):
        path = tmp_path / f"state-{legacy_format}.pt"
        torch.save({"optimizer": optimizer.state_dict(), "rng": torch.get_rng_state(), "steps": [1, 2.5, None],
                    "pair": (1, "a")}, path, _use_new_zipfile_serialization=not legacy_format)
        with open(path, "rb") as handle:
            check_torch_file(handle, str(path))  # raises if refused
            assert handle.tell() == 0
