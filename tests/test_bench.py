"""bench/run.py's bookkeeping: the ratios and rates it reports, from hand-made rows (no timing here)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

RUN_PY = Path(__file__).resolve().parents[1] / "bench" / "run.py"


@pytest.fixture(scope="module")
def bench_run():
    spec = importlib.util.spec_from_file_location("bench_run_under_test", RUN_PY)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def _rows():
    # The original: 0.4 s, 100 MB, 40 GFLOP; ours: 0.1 s, 10 MB, 8 GFLOP; ours in bf16: 0.05 s, 8 GFLOP.
    return [
        {"size": 50, "case": "learner_forward", "mask": "object", "variant": "original",
         "times": [0.5, 0.4, 0.3], "peak_bytes": 100 * 2**20, "flops_run": 40e9},
        {"size": 50, "case": "learner_forward", "mask": "object", "variant": "torch",
         "times": [0.1, 0.2, 0.05], "peak_bytes": 10 * 2**20, "flops_run": 8e9},
        {"size": 50, "case": "learner_forward", "mask": "object", "variant": "torch+bf16",
         "times": [0.05], "peak_bytes": 20 * 2**20, "flops_run": 8e9},
        {"size": 50, "case": "learner_forward", "mask": "object", "variant": "reference", "error": "exit 1: boom"},
    ]


def _report(rows):
    machine = {"device": "cpu", "cpu": "c", "cpu_count": 2, "torch_threads": 1, "python": "3", "torch": "t",
               "triton": None, "hypertriton": "h", "load_average_start": (0, 0, 0), "load_average_end": (0, 0, 0)}
    return {"date": "d", "machine": machine, "backends": ["torch"], "rows": rows, "targets": [],
            "args": {"backbone": "resnet50", "batch": 1, "dtype": "float32", "sizes": sorted({r["size"] for r in rows}),
                     "repeats": 3, "warmup": 1, "machine": None, "note": None}}


def test_summarize_ratios_and_rates(bench_run):
    rows = bench_run.summarize(_rows(), peaks={"float32": 100.0, "bfloat16": 320.0}, dtype="float32")
    original, ours, ours_bf16, failed = rows
    assert original["median_s"] == pytest.approx(0.4)
    assert ours["median_s"] == pytest.approx(0.1)
    assert ours["speedup"] == pytest.approx(4.0)
    assert ours["memory_ratio"] == pytest.approx(10.0)
    # Effective rate: the original's 40 GFLOP in our 0.1 s; executed rate: our own 8 GFLOP in 0.1 s.
    assert ours["gflops_per_s"] == pytest.approx(400.0)
    assert ours["run_gflops_per_s"] == pytest.approx(80.0)
    assert ours["peak_fraction"] == pytest.approx(0.8)
    # The +bf16 variant is compared with the bf16 peak: 8 GFLOP in 0.05 s = 160 of 320.
    assert ours_bf16["peak_fraction"] == pytest.approx(0.5)
    assert original["peak_fraction"] == pytest.approx(1.0)
    assert "median_s" not in failed and "speedup" not in failed


def test_summarize_without_peaks_reports_no_fraction(bench_run):
    rows = bench_run.summarize(_rows(), peaks={}, dtype="float32")
    assert rows[1]["run_gflops_per_s"] == pytest.approx(80.0)
    assert all("peak_fraction" not in row for row in rows)


def test_markdown_shows_the_peak_and_each_row(bench_run):
    rows = bench_run.summarize(_rows(), peaks={"float32": 100.0, "bfloat16": 320.0}, dtype="float32")
    report = _report(rows)
    report["machine"]["gemm_peak_gflops"] = {"float32": 100.0, "bfloat16": 320.0}
    report["targets"] = bench_run.targets(report)
    text = bench_run.markdown(report)
    assert "float32 100 GFLOP/s, bfloat16 320 GFLOP/s" in text
    torch_row = next(line for line in text.splitlines() if "| torch |" in line)
    cells = [cell.strip() for cell in torch_row.strip("|").split("|")]
    # ... | speedup | paired (p20-p80) | peak MiB | mem ratio | eff. GFLOP/s | GFLOP run | % peak | rel. error
    assert cells[7:14] == ["4.00x", "5.00x (3.20-5.60)", "10.0", "10.0x", "400.0", "8.00", "80"]
    assert "failed: exit 1: boom" in text
    speed_target = next(t for t in report["targets"] if t["variant"] == "torch" and t["metric"] == "speedup")
    assert speed_target["measured"] == pytest.approx(4.0) and speed_target["met"] is True
    assert "| 50 | learner_forward | object | torch | speedup | >= 3.0x | 4.00x | 5.00x (3.20-5.60) | yes |" in text
    memory_line = next(line for line in text.splitlines() if "| torch | memory_ratio |" in line)
    assert "| 10.00x | - | yes |" in memory_line


def test_paired_speedup_takes_each_round_on_its_own(bench_run):
    """Per-round ratios: the original's 0.5/0.4/0.3 s against ours 0.1/0.2/0.05 s are 5, 2 and 6 (median 5,
    p20 3.2, p80 5.6), not the ratio of the medians (4). A row timed in other rounds gets none."""
    original, ours, ours_bf16, _ = bench_run.summarize(_rows(), peaks={}, dtype="float32")
    assert ours["paired_speedup"] == pytest.approx(5.0)
    assert (ours["paired_p20"], ours["paired_p80"]) == (pytest.approx(3.2), pytest.approx(5.6))
    assert "paired_speedup" not in ours_bf16 and "paired_speedup" not in original


def test_paired_speedup_cancels_a_load_that_comes_and_goes(bench_run):
    """A load that doubles each run's time while it lasts: in rounds 1 and 3, and for ours also in round 2
    (it came after the original had run). The ratio of the medians reads 0.75x (0.3 s / 0.4 s); each round
    but one still says 1.5x, and so does the paired median."""
    original_slowdown, ours_slowdown = [1, 2, 1, 2, 1], [1, 2, 2, 2, 1]
    rows = [{"size": 50, "case": "learner_forward", "mask": "full", "variant": "original",
             "times": [0.3 * factor for factor in original_slowdown]},
            {"size": 50, "case": "learner_forward", "mask": "full", "variant": "torch",
             "times": [0.2 * factor for factor in ours_slowdown]}]
    ours = bench_run.summarize(rows, peaks={}, dtype="float32")[1]
    assert ours["speedup"] == pytest.approx(0.75)
    assert ours["paired_speedup"] == pytest.approx(1.5)
    assert ours["paired_p20"] == pytest.approx(0.75 + 0.75 * 0.8) and ours["paired_p80"] == pytest.approx(1.5)


@pytest.mark.parametrize("threshold, start, limit", [(37, 13, 100), (13, 13, 100), (100, 13, 100), (150, 13, 100),
                                                      (5, 13, 100), (1, 1, 9), (0, 4, 9), (12, 12, 12)])
def test_largest_fitting_finds_the_boundary(bench_run, threshold, start, limit):
    """With runs that fit up to ``threshold``: that size (capped at the limit), None when nothing fits,
    and each size tried once."""
    calls = []

    def fits(size):
        calls.append(size)
        return size <= threshold

    largest, tried = bench_run.largest_fitting(fits, start, limit)
    expected = min(threshold, limit) if threshold >= 1 else None
    assert largest == expected
    assert len(calls) == len(set(calls)) == len(tried)
    assert all(ok == (size <= threshold) for size, ok in tried.items())
    assert max(tried) <= limit


def test_largest_fitting_checks_its_start(bench_run):
    with pytest.raises(ValueError, match="start"):
        bench_run.largest_fitting(lambda size: True, 20, 10)


def test_max_size_table_names_each_outcome(bench_run):
    machine = {"device": "cuda", "cpu": "c", "gpu": "Test GPU", "python": "3", "torch": "t", "triton": "3",
               "hypertriton": "h"}
    report = {"date": "d", "machine": machine,
              "args": {"backbone": "resnet50", "batch": 8, "dtype": "float32", "start": 50, "max_size": 256,
                       "memory_limit_gib": None, "machine": None, "note": None},
              "max_sizes": [
                  {"case": "learner_forward", "mask": "object", "variant": "original", "largest": 112,
                   "at_limit": False, "peak_bytes": 90 * 2**30, "first_failure": "exit 1: CUDA out of memory"},
                  {"case": "learner_forward", "mask": "object", "variant": "triton", "largest": 256,
                   "at_limit": True, "peak_bytes": 2**30, "first_failure": None},
                  {"case": "learner_forward", "mask": "object", "variant": "torch", "largest": None,
                   "at_limit": False, "peak_bytes": None, "first_failure": "exit 1: boom"}]}
    lines = bench_run.max_size_markdown(report).splitlines()
    rows = {line.split("|")[3].strip(): [c.strip() for c in line.strip("|").split("|")]
            for line in lines if line.startswith("| learner_forward")}
    assert rows["original"][3:7] == ["112", "896", "92160", "exit 1: CUDA out of memory"]
    assert rows["triton"][3:6] == ["256 (the limit)", "2048", "1024"]
    assert rows["torch"][3:5] == ["none", "-"]
    assert any("GPU Test GPU" in line for line in lines)


def test_a_max_size_search_cut_short_keeps_what_it_found(bench_run, tmp_path):
    # The GPU session gives the search a fixed time: every try is written at once, the row marked as
    # unfinished with the largest size seen to run (a lower bound).
    import argparse

    tries = []

    def launch(kind, job):
        tries.append(job["size"])
        if len(tries) == 3:
            raise KeyboardInterrupt  # the stage's time limit
        return {"peak_bytes": job["size"] * 2**20}

    args = argparse.Namespace(size=50, max_size=256, memory_limit=None, name="search", out=str(tmp_path),
                              backbone="resnet50", batch=8, machine=None, note=None)
    info = {"device": "cuda", "cpu": "c", "gpu": "Test GPU", "python": "3", "torch": "t", "triton": "3",
            "hypertriton": "h"}
    groups = [{"case": "learner_forward", "mask": "object", "size": 50, "variants": ["original", "triton"]}]
    with pytest.raises(KeyboardInterrupt):
        bench_run.search_max_sizes(args, groups, info, launch, "cuda", "float32")
    report = json.loads((tmp_path / "search.json").read_text())
    assert tries == [50, 75, 112]
    assert [(row["variant"], row["largest"], row["unfinished"]) for row in report["max_sizes"]] == [
        ("original", 75, True)]
    assert "| learner_forward | object | original | at least 75 (search cut short) | 600 |" in \
        (tmp_path / "search.md").read_text()


@pytest.mark.parametrize("argv, message", [
    (["--backbone", "foo"], "--backbone: unknown backbone 'foo'"),
    (["--batch", "0"], "--batch: expected an integer >= 1, got 0"),
    (["--repeats", "0"], "--repeats: expected an integer >= 1, got 0"),
    (["--warmup", "0"], "--warmup: expected an integer >= 1, got 0"),
    (["--threads", "-2"], "--threads: expected an integer >= 1, got -2"),
    (["--sweep", "5,abc"], "--sweep: expected comma-separated integers, got '5,abc'"),
    (["--device", "gpu"], "--device: expected cpu, cuda, cuda:N or auto, got 'gpu'"),
    (["--backend", "fast"], "--backend: unknown backend 'fast'"),
    (["--cases", "hypercorrelation", "--variants", "original,trition"], "--variants: 'trition' is not a variant"),
])
def test_bad_flags_are_named_before_any_worker_starts(bench_run, monkeypatch, argv, message):
    monkeypatch.setattr(bench_run.subprocess, "run", lambda *args, **kwargs: pytest.fail("a worker started"))
    monkeypatch.setattr(bench_run.subprocess, "Popen", lambda *args, **kwargs: pytest.fail("a worker started"))
    with pytest.raises(SystemExit) as exit_:
        bench_run.main(["--size", "5", "--out", "/nonexistent-out", *argv])
    assert message in str(exit_.value)


def test_partial_results_say_so(bench_run):
    rows = bench_run.summarize(_rows(), peaks={}, dtype="float32")
    report = _report(rows)
    assert "partial" not in bench_run.markdown(report)
    report["partial"] = "1 of 4 (size, case, mask) groups measured so far"
    assert "**partial results**: 1 of 4" in bench_run.markdown(report)


@pytest.mark.parametrize("sizes", [[50], [13, 25, 50]])
def test_plot_writes_a_png_for_one_size_and_for_a_sweep(bench_run, tmp_path, sizes):
    pytest.importorskip("matplotlib")
    rows = [dict(row, size=size) for size in sizes for row in _rows()]
    report = _report(bench_run.summarize(rows, peaks={}, dtype="float32"))
    path = tmp_path / "plot.png"
    bench_run.plot(report, path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _drawn(bench_run, report, tmp_path, monkeypatch):
    """The matplotlib figure that ``plot`` saves for ``report`` (caught at ``savefig``, the PNG still written)."""
    pytest.importorskip("matplotlib")
    from matplotlib.figure import Figure

    saved, real_savefig = [], Figure.savefig

    def savefig(self, *args, **kwargs):
        saved.append(self)
        return real_savefig(self, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", savefig)
    bench_run.plot(report, tmp_path / "plot.png")
    assert len(saved) == 1 and (tmp_path / "plot.png").stat().st_size > 0
    return saved[0]


def _texts(artist) -> list[str]:
    import matplotlib.text

    return [text.get_text() for text in artist.findobj(matplotlib.text.Text) if text.get_text()]


def _row_positions(ax) -> dict[str, float]:
    """A one-size plot's row labels and their y positions."""
    return {label.get_text(): y for label, y in zip(ax.get_yticklabels(), ax.get_yticks())}


def _failed(row: dict, error: str) -> dict:
    return {key: row[key] for key in ("size", "case", "mask", "variant")} | {"error": error}


def test_plot_labels_the_speedup_with_the_statistic_it_draws_as_the_markdown_prints_it(bench_run, tmp_path,
                                                                                       monkeypatch):
    """The paired median (the dot) is what the label reads, in the markdown's own words: "5.00x (3.20-5.60)",
    not the ratio of medians (4.00x) at the whisker's end; a row without paired rounds shows its ratio of
    medians and says so; the axis label names the statistic."""
    report = _report(bench_run.summarize(_rows(), peaks={}, dtype="float32"))
    torch_line = next(line for line in bench_run.markdown(report).splitlines() if "| torch |" in line)
    ratio_cell, paired_cell = [cell.strip() for cell in torch_line.strip("|").split("|")][7:9]
    assert (ratio_cell, paired_cell) == ("4.00x", "5.00x (3.20-5.60)")
    speed = _drawn(bench_run, report, tmp_path, monkeypatch).axes[0]
    labels = {text.get_text().strip(): text for text in speed.texts}
    assert paired_cell in labels and ratio_cell not in labels
    y = _row_positions(speed)["learner_forward / object / torch"]
    assert labels[paired_cell].get_position() == (pytest.approx(5.6), pytest.approx(y))  # beside its whisker
    assert any(list(line.get_xdata()) == [pytest.approx(5.0)] and line.get_marker() == "o" for line in speed.lines)
    assert "8.00x (ratio of medians)" in labels  # torch+bf16: one round, nothing to pair
    assert "paired" in speed.get_xlabel() and "median over rounds" in speed.get_xlabel()


def test_plot_draws_ratio_bars_from_1x(bench_run, tmp_path, monkeypatch):
    rows = _rows()[:2] + [dict(_rows()[1], variant="reference", times=[1.0, 0.8, 0.6], peak_bytes=200 * 2**20)]
    report = _report(bench_run.summarize(rows, peaks={}, dtype="float32"))
    speed, memory = _drawn(bench_run, report, tmp_path, monkeypatch).axes
    for ax, expected in ((speed, {"torch": 5.0, "reference": 0.5}), (memory, {"torch": 10.0, "reference": 0.5})):
        positions = _row_positions(speed)  # the panels share their rows
        spans = {label.rsplit(" / ", 1)[1]: sorted([bar.get_x(), bar.get_x() + bar.get_width()])
                 for bar in ax.patches for label, y in positions.items()
                 if bar.get_y() <= y <= bar.get_y() + bar.get_height()}
        assert spans == {"torch": [pytest.approx(1.0), pytest.approx(expected["torch"])],
                         "reference": [pytest.approx(expected["reference"]), pytest.approx(1.0)]}


def test_plot_marks_failed_and_unmeasured_rows_where_they_would_be(bench_run, tmp_path, monkeypatch):
    original, ours, _, reference_failed = _rows()
    full = [_failed(dict(original, mask="full"), "OutOfMemoryError: CUDA out of memory. Tried to allocate 2 GiB"),
            dict(ours, mask="full")]
    ours_unmeasured = {key: value for key, value in ours.items() if key != "peak_bytes"}
    ours_unmeasured["measure_error"] = "exit -9: Killed"
    rows = bench_run.summarize([original, ours_unmeasured, reference_failed] + full, peaks={}, dtype="float32")
    speed, memory = _drawn(bench_run, _report(rows), tmp_path, monkeypatch).axes
    positions = _row_positions(speed)

    def note(ax, label):
        texts = [t for t in ax.texts if t.get_position()[1] == pytest.approx(positions[label])]
        assert texts, f"nothing written at {label}"
        return texts[0].get_text()

    assert note(speed, "learner_forward / object / reference").startswith("failed: exit 1: boom")
    assert note(speed, "learner_forward / full / original").startswith("failed: OutOfMemoryError: CUDA out of memory")
    assert note(speed, "learner_forward / full / torch").startswith("n/a")
    assert note(memory, "learner_forward / full / torch").startswith("n/a")
    assert note(memory, "learner_forward / object / torch").startswith("n/a: memory not measured (exit -9: Killed)")


@pytest.mark.parametrize("sizes", [[50], [13, 25, 50]])
def test_plot_of_nothing_but_failures_says_so_on_every_panel(bench_run, tmp_path, monkeypatch, sizes):
    original, ours = _rows()[:2]
    rows = [_failed(dict(original, size=size), "OutOfMemoryError: CUDA out of memory") for size in sizes]
    rows += [_failed(dict(ours, size=size), "timed out after 900 s") if len(sizes) > 1 else dict(ours, size=size)
             for size in sizes]
    fig = _drawn(bench_run, _report(bench_run.summarize(rows, peaks={}, dtype="float32")), tmp_path, monkeypatch)
    for ax in fig.axes[:2]:
        assert ax.texts, "a panel with nothing drawn and nothing said"
    assert any("failed" in text or "n/a" in text for text in _texts(fig))


def test_a_sweep_marks_the_sizes_a_variant_failed_at(bench_run, tmp_path, monkeypatch):
    rows = [dict(row, size=size) for size in (13, 25, 50) for row in _rows()[:2]]
    rows[4] = _failed(rows[4], "OutOfMemoryError: CUDA out of memory")  # the original at size 50
    del rows[3]["peak_bytes"]  # ours at size 25: memory not measured
    fig = _drawn(bench_run, _report(bench_run.summarize(rows, peaks={}, dtype="float32")), tmp_path, monkeypatch)
    time_ax, memory_ax = fig.axes[:2]

    def crosses(ax):
        return sorted(x for line in ax.lines if line.get_marker() == "x" for x in line.get_xdata())

    assert crosses(time_ax) == [50] and crosses(memory_ax) == [25, 50]
    assert any("original (object) at size 50: failed: OutOfMemoryError" in text for text in _texts(fig))
    assert any("failed" in text for legend in fig.legends for text in _texts(legend))


def _bar_colours(fig) -> dict[str, str]:
    """Variant -> colour of its bars in a one-size plot."""
    from matplotlib.colors import to_hex

    speed = fig.axes[0]
    return {label.rsplit(" / ", 1)[1]: to_hex(bar.get_facecolor()) for bar in speed.patches
            for label, y in _row_positions(speed).items() if bar.get_y() <= y <= bar.get_y() + bar.get_height()}


def test_each_variant_keeps_its_colour_from_plot_to_plot(bench_run, tmp_path, monkeypatch):
    original, ours = _rows()[:2]
    first = [original, ours, dict(ours, variant="reference")]
    second = [original, dict(ours, variant="reference"), dict(ours, variant="torch-lean"), ours]
    figures = [_drawn(bench_run, _report(bench_run.summarize([dict(r) for r in rows])), tmp_path, monkeypatch)
               for rows in (first, second)]
    colours = [_bar_colours(fig) for fig in figures]
    assert set(colours[0]) == {"torch", "reference"} and set(colours[1]) == {"torch", "reference", "torch-lean"}
    assert colours[0]["torch"] == colours[1]["torch"] and colours[0]["reference"] == colours[1]["reference"]
    assert len(set(colours[1].values())) == 3
    for fig, variants in zip(figures, colours):  # a colour key names each variant drawn
        legend_texts = [text for legend in fig.legends for text in _texts(legend)]
        assert set(variants) <= set(legend_texts)


def test_the_plot_title_names_the_machine_threads_and_torch(bench_run, tmp_path, monkeypatch):
    report = _report(bench_run.summarize(_rows()[:2]))
    report["machine"].update(cpu="AMD EPYC", cpu_capability="AVX2", torch_threads=2, torch="2.14.1+cu130")
    title = _drawn(bench_run, report, tmp_path, monkeypatch)._suptitle.get_text()
    assert "AMD EPYC (AVX2)" in title and "2 torch threads" in title and "torch 2.14.1+cu130" in title
    report["machine"].update(device="cuda", gpu="NVIDIA H200", triton="3.8.0")
    title = _drawn(bench_run, report, tmp_path, monkeypatch)._suptitle.get_text()
    assert "NVIDIA H200" in title and "triton 3.8.0" in title


def test_memory_is_labelled_in_mib(bench_run, tmp_path, monkeypatch):
    rows = bench_run.summarize([dict(row, size=size) for size in (13, 50) for row in _rows()[:2]])
    report = _report(rows)
    assert "| peak MiB |" in bench_run.markdown(report) and "MB" not in bench_run.markdown(report)
    fig = _drawn(bench_run, report, tmp_path, monkeypatch)
    assert fig.axes[1].get_ylabel() == "peak extra memory (MiB)"


def test_a_sweep_shares_one_legend_outside_its_panels_and_says_the_image_side(bench_run, tmp_path, monkeypatch):
    rows = bench_run.summarize([dict(row, size=size, mask=mask) for size in (13, 25, 50)
                                for mask in ("object", "full") for row in _rows()[:3]])
    fig = _drawn(bench_run, _report(rows), tmp_path, monkeypatch)
    assert all(ax.get_legend() is None for ax in fig.axes) and len(fig.legends) == 1
    legend = fig.legends[0]
    assert {"original", "torch", "torch+bf16", "object mask", "full mask"} <= set(_texts(legend))
    handles = getattr(legend, "legend_handles", None) or legend.legendHandles  # matplotlib < 3.7
    styles = {line.get_label(): line.get_linestyle() for line in handles}
    assert (styles["object mask"], styles["full mask"]) == ("-", "--")
    renderer = fig.canvas.get_renderer()
    box = legend.get_window_extent(renderer)
    assert not any(box.overlaps(ax.get_window_extent(renderer)) for ax in fig.axes)
    assert any("px" in text for text in _texts(fig)) and "400" in _texts(fig)  # 50 x 8 px on a second axis


def _replot_source(bench_run, tmp_path) -> Path:
    source = tmp_path / "run.json"
    source.write_text(json.dumps(_report(bench_run.summarize(_rows()))))
    return source


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX file modes")
@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o027, 0o640)])
def test_replot_writes_the_png_with_the_umask_s_mode(bench_run, tmp_path, umask, mode):
    pytest.importorskip("matplotlib")
    import os
    import stat

    source = _replot_source(bench_run, tmp_path)
    saved = os.umask(umask)
    try:
        assert bench_run.main(["--replot", str(source)]) == 0
    finally:
        os.umask(saved)
    assert stat.S_IMODE((tmp_path / "run.png").stat().st_mode) == mode


def test_replot_writes_where_out_says(bench_run, tmp_path):
    pytest.importorskip("matplotlib")
    source = _replot_source(bench_run, tmp_path)
    assert bench_run.main(["--replot", str(source), "--out", str(tmp_path / "elsewhere" / "chosen.png")]) == 0
    assert (tmp_path / "elsewhere" / "chosen.png").read_bytes()[:4] == b"\x89PNG"
    assert bench_run.main(["--replot", str(source), "--out", str(tmp_path / "folder")]) == 0
    assert (tmp_path / "folder" / "run.png").read_bytes()[:4] == b"\x89PNG"
    assert not (tmp_path / "run.png").exists()


def test_replot_names_what_it_cannot_plot(bench_run, tmp_path):
    search = tmp_path / "search.json"
    search.write_text('{"max_sizes": []}')
    with pytest.raises(SystemExit, match="no timed rows"):
        bench_run.main(["--replot", str(search)])
    with pytest.raises(SystemExit, match="cannot read"):
        bench_run.main(["--replot", str(tmp_path / "missing.json")])


@pytest.mark.parametrize("mode, matmul, cudnn", [("off", False, False), ("on", True, True), ("torch", None, None)])
def test_tf32_mode_sets_both_flags_alike_or_leaves_them(bench_run, mode, matmul, cudnn):
    import torch

    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    # Opposite starting values, so that "torch" (leave them) is told apart from setting them alike.
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = False, True
    try:
        bench_run._apply_tf32(mode)
        got = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
    assert got == ((False, True) if matmul is None else (matmul, cudnn))


def test_markdown_says_the_gpu_fp32_math(bench_run):
    report = _report(_rows())
    report["machine"].update(device="cuda", gpu="NVIDIA H200", allow_tf32=False, cudnn_allow_tf32=False)
    assert "- fp32 math on the GPU: IEEE fp32 in every variant's matrix products and convolutions" in \
        bench_run.markdown(report)
    report["machine"].update(cudnn_allow_tf32=True)
    assert "TF32 in cuDNN convolutions on, in matrix products and the Triton kernels off" in bench_run.markdown(report)


@pytest.fixture()
def bench_cases():
    sys.path.insert(0, str(RUN_PY.parent))
    try:
        import cases
        yield cases
    finally:
        sys.path.remove(str(RUN_PY.parent))


@pytest.mark.parametrize("slow_reason, bf16, timed", [
    (None, None, True), ("no AVX512-BF16", None, False), ("no AVX512-BF16", True, True), (None, False, False)])
def test_bf16_variant_is_timed_by_default_only_where_the_cpu_computes_bf16(bench_cases, monkeypatch, slow_reason,
                                                                           bf16, timed):
    monkeypatch.setattr(bench_cases, "reduced_precision_slow_reason", lambda dtype, device: slow_reason)
    variants = bench_cases.variants_for("learner_forward", torch.device("cpu"), ["torch"], bf16)
    assert ("torch+bf16" in variants) == timed
    assert {"original", "torch", "torch-unfused", "torch-lean"} <= set(variants)
    assert bench_cases.bf16_skip_reason(torch.device("cpu")) == slow_reason


def test_markdown_says_why_bf16_was_not_timed(bench_run):
    report = _report(_rows()[:2])
    assert "not timed" not in bench_run.markdown(report)
    report["machine"]["bf16_not_timed"] = "this CPU (AVX2) has no AVX512-BF16"
    assert "- torch+bf16 not timed: this CPU (AVX2) has no AVX512-BF16 (`--bf16 on` times it anyway)" in \
        bench_run.markdown(report)


def test_targets_are_scored_only_where_they_were_set(bench_run):
    report = _report(_rows())
    assert {t["size"] for t in bench_run.targets(report)} == {50}
    for change in ({"sizes": [13]}, {"batch": 8}, {"dtype": "bfloat16"}):
        assert bench_run.targets(dict(report, args=dict(report["args"], **change))) == [], change
    gpu = dict(report, machine=dict(report["machine"], device="cuda"))
    assert bench_run.targets(gpu) == []  # batch 1: the GPU targets are for batch 8
    gpu["args"] = dict(report["args"], batch=8)
    gpu["rows"] = [dict(row, variant="triton") if row["variant"] == "torch" else row for row in report["rows"]]
    assert {(t["variant"], t["metric"]) for t in bench_run.targets(gpu)} == {("triton", "speedup"),
                                                                             ("triton", "memory_ratio")}


def test_targets_name_the_bf16_target_left_out_on_this_cpu(bench_run):
    report = _report(_rows()[:2])  # the original and torch rows only
    report["args"].update(cases=["learner_forward"], masks=["object"])
    assert all(t["variant"] != "torch+bf16" for t in bench_run.targets(report))
    report["machine"]["bf16_not_timed"] = "this CPU (AVX2) has no AVX512-BF16"
    bf16 = [t for t in bench_run.targets(report) if t["variant"] == "torch+bf16"]
    assert len(bf16) == 1 and bf16[0]["skipped"] and bf16[0]["measured"] is None
    report["targets"] = bench_run.targets(report)
    assert "| 50 | learner_forward | object | torch+bf16 | speedup | >= 5.0x | - | - | not timed here |" in \
        bench_run.markdown(report)
    report["args"].update(cases=["hypercorrelation"])  # a case that did not run names no target
    assert all(t["variant"] != "torch+bf16" for t in bench_run.targets(report))


def test_a_variant_that_raises_is_dropped_and_the_others_are_timed(bench_run, bench_cases, monkeypatch):
    # The original out of GPU memory at a large size used to take every variant's timing of its group along.
    real_build = bench_cases.build
    calls = {"late": 0}

    def build(case, variant, inputs):
        if variant == "fails-to-build":
            raise ValueError("no such layer")
        if variant == "fails-when-run":
            def run():
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore detail")
            return run
        if variant == "fails-third-call":
            run_original = real_build(case, "original", inputs)

            def run():
                calls["late"] += 1
                if calls["late"] == 3:
                    raise RuntimeError("late failure")
                return run_original()
            return run
        return real_build(case, variant, inputs)

    monkeypatch.setattr(bench_cases, "build", build)
    job = {"device": "cpu", "backbone": "resnet50", "size": 3, "batch": 1, "dtype": "float32", "mask": "object",
           "case": "hypercorrelation", "warmup": 1, "repeats": 4, "threads": None, "tf32": "off",
           "variants": ["original", "fails-to-build", "fails-when-run", "fails-third-call", "torch"]}
    result = bench_run.time_variants(job)
    assert result["errors"] == {"fails-to-build": "ValueError: no such layer",
                                "fails-when-run": "OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB",
                                "fails-third-call": "RuntimeError: late failure"}
    assert set(result["times"]) == {"original", "torch"}
    assert all(len(times) == 4 and min(times) > 0 for times in result["times"].values())


class _Progress:
    def __init__(self):
        self.written = []

    def set_postfix_str(self, text):
        pass

    def update(self, count):
        pass

    def write(self, text):
        self.written.append(text)


def test_a_group_whose_process_dies_is_timed_again_one_variant_at_a_time(bench_run):
    launched = []

    def launch(mode, job):
        launched.append((mode, job.get("variants", job.get("variant"))))
        if mode == "time" and len(job["variants"]) > 1:
            return {"error": "exit -9: Killed"}  # the kernel's out-of-memory killer took the whole process
        if mode == "time":
            variant = job["variants"][0]
            return {"error": "timed out after 60 s"} if variant == "original" else {"times": {variant: [0.1, 0.2]},
                                                                                   "errors": {}}
        return {"peak_bytes": 5 * 2**20}

    group = {"size": 100, "case": "learner_forward", "mask": "full", "variants": ["original", "torch"]}
    progress = _Progress()
    rows = bench_run.measure_group(group, launch, progress)
    assert launched == [("time", ["original", "torch"]), ("time", ["original"]), ("time", ["torch"]),
                        ("measure", "torch")]
    original, ours = rows
    assert original["error"] == "timed out after 60 s" and "times" not in original
    assert ours["times"] == [0.1, 0.2] and ours["peak_bytes"] == 5 * 2**20
    assert ours["timed_alone"] == "the variants timed together failed: exit -9: Killed"
    assert any("timing each alone" in line for line in progress.written)
    markdown = bench_run.markdown(_report(bench_run.summarize(rows)))
    assert "| 100 | learner_forward | full | torch (timed alone) | 150.0 |" in markdown
    assert ("- size 100 learner_forward full: each variant timed in a process of its own, not interleaved "
            "(no paired speedup) because the variants timed together failed: exit -9: Killed") in markdown


def test_variants_timed_alone_get_no_paired_speedup(bench_run):
    rows = [dict(row, timed_alone="why") for row in _rows()[:2]]
    summarized = bench_run.summarize(rows)
    assert summarized[1]["speedup"] == pytest.approx(4.0)  # medians 0.4 / 0.1
    assert "paired_speedup" not in summarized[1]
    assert "paired_speedup" in bench_run.summarize(_rows()[:2])[1]


def test_a_group_with_a_variant_error_measures_only_the_others(bench_run):
    launched = []

    def launch(mode, job):
        launched.append(mode)
        if mode == "time":
            return {"times": {"torch": [0.1]}, "errors": {"original": "OutOfMemoryError: CUDA out of memory."}}
        return {"peak_bytes": 1}

    group = {"size": 200, "case": "learner_forward", "mask": "full", "variants": ["original", "torch"]}
    original, ours = bench_run.measure_group(group, launch, _Progress())
    assert launched == ["time", "measure"]
    assert original["error"] == "OutOfMemoryError: CUDA out of memory." and "timed_alone" not in ours


def test_the_report_names_the_commit_it_ran_at(bench_run):
    report = _report(_rows()[:2])
    assert "at commit not recorded" in bench_run.markdown(report)
    report["machine"]["git_commit"] = "abc123+dirty"
    assert "hypertriton h at commit abc123+dirty" in bench_run.markdown(report)


def test_git_commit_marks_changed_tracked_files(bench_run, tmp_path, monkeypatch):
    import shutil
    import subprocess

    if shutil.which("git") is None:
        pytest.skip("git is not installed here")
    monkeypatch.setattr(bench_run, "HERE", tmp_path)
    assert bench_run._git_commit() is None  # not a checkout
    git = ["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(git + ["init", "-q"], check=True)
    (tmp_path / "tracked.txt").write_text("a")
    subprocess.run(git + ["add", "tracked.txt"], check=True)
    subprocess.run(git + ["commit", "-q", "-m", "m"], check=True)
    head = subprocess.run(git + ["rev-parse", "HEAD"], check=True, capture_output=True, text=True).stdout.strip()
    (tmp_path / "results.json").write_text("{}")  # an untracked output does not make the tree dirty
    assert bench_run._git_commit() == head
    (tmp_path / "tracked.txt").write_text("b")
    assert bench_run._git_commit() == head + "+dirty"


def test_a_group_reports_its_timings_before_measuring_memory(bench_run, tmp_path):
    # A GPU session's stage limit can cut a run during a group's memory measurements: the timings are
    # written as soon as they exist.
    updates = []

    def launch(mode, job):
        if mode == "time":
            return {"times": {"original": [0.4], "torch": [0.1]}, "errors": {}}
        raise KeyboardInterrupt  # the stage's time limit, during the first memory measurement

    group = {"size": 50, "case": "learner_forward", "mask": "object", "variants": ["original", "torch"]}
    with pytest.raises(KeyboardInterrupt):
        bench_run.measure_group(group, launch, _Progress(),
                                on_update=lambda rows: updates.append([dict(row) for row in rows]))
    assert [[(row["variant"], row["times"]) for row in rows] for rows in updates] == [
        [("original", [0.4]), ("torch", [0.1])]]
    report = _report(bench_run.summarize(updates[-1]))
    assert "| 50 | learner_forward | object | torch | 100.0 |" in bench_run.markdown(report)


def test_a_run_without_a_name_never_replaces_an_earlier_run_s_results(bench_run, tmp_path, monkeypatch, capsys):
    # The default name depends only on device, backbone, size, batch and dtype: `bench/run.py --size 50`
    # on any CPU replaced the committed results its README quotes.
    import subprocess

    run = subprocess.run

    def no_worker(command, *args, **kwargs):  # the benchmark's workers fail; other commands run
        if command[0] != sys.executable:
            return run(command, *args, **kwargs)
        return subprocess.CompletedProcess(command, 1, "", "no worker in this test")

    monkeypatch.setattr(bench_run.subprocess, "run", no_worker)
    argv = ["--size", "5", "--cases", "hypercorrelation", "--masks", "object", "--variants", "original",
            "--device", "cpu", "--repeats", "1", "--out", str(tmp_path)]
    earlier = {suffix: tmp_path / f"cpu-resnet50-size5-b1-float32{suffix}" for suffix in (".json", ".md")}
    for path in earlier.values():
        path.write_text("an earlier run")
    (tmp_path / "cpu-resnet50-size5-b1-float32-2.png").write_text("a later one's plot")
    bench_run.main(argv)
    assert all(path.read_text() == "an earlier run" for path in earlier.values())
    written = json.loads((tmp_path / "cpu-resnet50-size5-b1-float32-3.json").read_text())
    assert written["rows"][0]["variant"] == "original" and "error" in written["rows"][0]
    err = capsys.readouterr().err
    assert "--repeats 1: a median of so few runs is noise" in err
    bench_run.main(argv + ["--name", "cpu-resnet50-size5-b1-float32"])  # named: replaced, as asked
    assert json.loads(earlier[".json"].read_text())["rows"][0]["variant"] == "original"


def test_help_states_each_default(bench_run, capsys):
    with pytest.raises(SystemExit):
        bench_run.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split()).split("options:", 1)[1]
    for option, default in (("--size SIZE", "50"), ("--batch BATCH", "1"), ("--repeats REPEATS", "5"),
                            ("--timeout TIMEOUT", "900"), ("--warmup WARMUP", "1")):
        assert f"{option} " in text and f"(default: {default})" in text.split(option, 1)[1].split(" --", 1)[0], option
