"""examples/one_shot_demo.py in a small setting: bundled checkpoint, own images, missing weights."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
from PIL import Image

from hypertriton import predict as lib
from hypertriton.data.synthetic import SyntheticDataset

DEMO = Path(__file__).resolve().parents[1] / "examples" / "one_shot_demo.py"


@pytest.fixture(scope="module")
def demo():
    spec = importlib.util.spec_from_file_location("one_shot_demo", DEMO)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _episode_lines(output: str) -> list[tuple[float, float]]:
    return [(float(a), float(b)) for a, b in re.findall(r"^\s+\d+\s+\S+ \S+ \S+\s+([\d.]+)\s+([\d.]+)$", output, re.M)]


@pytest.mark.skipif(not lib.BUNDLED_CHECKPOINT.is_file(), reason="the bundled checkpoint is not in this checkout")
def test_demo_runs_unseen_episodes_with_the_bundled_checkpoint(demo, tmp_path, capsys):
    out = tmp_path / "figure.png"
    assert demo.main(["--episodes", "2", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "backend 'torch'" in text and f"figure: {out}" in text
    rows = _episode_lines(text)
    assert len(rows) == 2 and all(0 <= v <= 100 for row in rows for v in row)
    means = re.search(r"1-shot ([\d.]+), 5-shot ([\d.]+)", text)
    assert means and abs(float(means.group(1)) - np.mean([r[0] for r in rows])) < 0.06
    figure = Image.open(out)
    # Two rows of six cells (support, supports 2-5, query, 1-shot, 5-shot, truth) 4 px apart, each under a
    # 22-px caption, under a 26-px title line.
    assert figure.format == "PNG" and figure.size == (6 * demo.PANEL + 5 * 4, 26 + 2 * (demo.PANEL + 22) + 4)


def test_demo_segments_own_images(demo, tmp_path, capsys):
    from hypertriton.model import HSNet

    torch.manual_seed(0)
    checkpoint = HSNet("resnet18").save_checkpoint(tmp_path / "random.pt")
    episode = SyntheticDataset(split="test", img_size=72, episodes=1).episode(0)
    Image.fromarray((episode.support_images[0] * 255).astype(np.uint8)).save(tmp_path / "s.png")
    Image.fromarray((episode.support_masks[0] * 255).astype(np.uint8)).save(tmp_path / "m.png")
    Image.fromarray((episode.query_image * 255).astype(np.uint8)).resize((90, 70)).save(tmp_path / "q.png")
    out = tmp_path / "own.png"
    argv = ["--support", str(tmp_path / "s.png"), "--support-mask", str(tmp_path / "m.png"), "--query",
            str(tmp_path / "q.png"), "--checkpoint", str(checkpoint), "--img-size", "64", "--out", str(out)]
    assert demo.main(argv) == 0
    text = capsys.readouterr().out
    assert "HSNet resnet18" in text and "% of the pixels segmented" in text and out.is_file()
    figure = np.asarray(Image.open(out))
    assert figure.shape[1::-1] == (3 * demo.PANEL + 2 * 4, 26 + demo.PANEL + 22)
    # The 90x70 query keeps its shape: 160x124 in its cell, grey above and below (it was stretched square).
    cell = figure[26 + 22:, demo.PANEL + 4:2 * demo.PANEL + 4]
    assert (cell[:18] == 235).all() and (cell[-18:] == 235).all() and not (cell[18:-18] == 235).all()


def test_demo_says_clearly_when_the_bundled_checkpoint_is_absent(demo, monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(lib, "BUNDLED_CHECKPOINT", tmp_path / "synthetic_resnet18.pt")
    out = tmp_path / "figure.png"
    assert demo.main(["--episodes", "1", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "bundled checkpoint" in err and "missing" in err and "--checkpoint" in err
    assert not out.exists()


def test_demo_refuses_partial_own_image_arguments(demo, capsys):
    with pytest.raises(SystemExit):
        demo.main(["--support", "a.png"])
    assert "go together" in capsys.readouterr().err


@pytest.mark.parametrize("extra, message", [
    (["--out", "{tmp}"], "--out: '{tmp}' is a folder; expected a file name"),
    (["--img-size", "0"], "--img-size must be >= 64"),
    (["--out", "{tmp}/figure.jpg"], "--out: the figure is a PNG file; give a name ending in .png, got"),
])
def test_demo_refuses_what_would_fail_before_running_episodes(demo, tmp_path, capsys, extra, message):
    with mock.patch.object(demo, "run_synthetic", side_effect=AssertionError("ran")), pytest.raises(SystemExit):
        demo.main([arg.format(tmp=tmp_path) for arg in extra])
    assert message.format(tmp=tmp_path) in capsys.readouterr().err


def test_main_leaves_the_process_as_it_was(demo, tmp_path):
    """main() is called in-process by these tests: it must not switch autograd off or change threads."""
    threads = torch.get_num_threads()
    assert demo.main(["--episodes", "1", "--out", str(tmp_path / "d.png")]) == 0
    assert torch.is_grad_enabled() and torch.get_num_threads() == threads
