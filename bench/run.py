"""Benchmark hypertriton against the original HSNet formulation, case by case.

    python bench/run.py --size 50                      # ResNet-50, 400-px episode, every case
    python bench/run.py --sweep 13,25,50,75,100 --cases learner_forward --masks object
    python bench/run.py --device cuda --batch 8 --dtype float16

Cases (``bench/cases.py``): ``hypercorrelation`` (all levels), ``cp_layer`` (the layer2 level's first
center-pivot layer on a prebuilt hypercorrelation), ``fused_first_layer`` (that level's correlation +
first layer), ``learner_forward`` (correlation + learner, no grad), ``forward_backward`` (the same in
training with a loss and backward) and ``episode`` (backbone on query and support images too). Each
runs with an object-like support mask (an ellipse over 22% of the image) and a full mask (no
sparsity), for the original formulation (``bench/original_hsnet.py``) and every hypertriton backend
available on the device (Triton's CPU interpreter only when ``--backend triton`` asks for it).

Timing: all variants of one (size, case, mask) run in one subprocess, interleaved round-robin, so
that load drifting on a shared machine hits them alike. Memory: each variant then runs once more in a
fresh subprocess of its own, which also records the original's FLOPs and every other variant's error
against the original. Peak memory is on CUDA ``torch.cuda.max_memory_allocated`` above what was
allocated before the measured run; on CPU the process's peak RSS (``VmHWM``, reset through
``/proc/self/clear_refs``) above its RSS before the measured run, with glibc told to return large
blocks to the system so freed memory is not silently reused.
Effective GFLOP/s count the original's (dense) FLOPs for every variant: the sparse and fused paths do
less work, and this says how fast the same job got done. Executed GFLOP/s count each variant's own
matrix-product and convolution FLOPs (``torch.utils.flop_counter``), also as a share of one large
matrix product's rate on the same device and threads (measured first): how close a row runs to the
compute-bound ceiling, i.e. whether it can get faster by running faster or only by doing less.

Writes ``<name>.json``, ``<name>.md`` and ``<name>.png`` (time and memory against size) to
``bench/results/`` (or ``--out``).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time
import zlib
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULT_MARK = "BENCH-RESULT "
DTYPES = {"float32": "float32", "fp32": "float32", "float16": "float16", "fp16": "float16",
          "bfloat16": "bfloat16", "bf16": "bfloat16"}
# Targets from the issue, reported (never asserted): CPU, batch 1, fp32, correlation + learner forward.
CPU_TARGETS = [("learner_forward", "object", "torch", "speedup", 3.0),
               ("learner_forward", "full", "torch", "speedup", 1.5),
               ("learner_forward", "object", "torch", "memory_ratio", 10.0),
               ("learner_forward", "full", "torch", "memory_ratio", 10.0),
               ("learner_forward", "object", "torch+bf16", "speedup", 5.0)]
GPU_TARGETS = [("learner_forward", "object", "triton", "speedup", 5.0),
               ("learner_forward", "object", "triton", "memory_ratio", 20.0)]
TARGET_SIZE, GPU_TARGET_BATCH = 50, 8  # both sets of targets are for size 50; the GPU's at batch 8


# ---------------------------------------------------------------------------------------------- worker
def _proc_status(field: str) -> int:
    """A ``/proc/self/status`` field in bytes (``VmRSS``, ``VmHWM``)."""
    with open("/proc/self/status") as handle:
        match = re.search(rf"^{field}:\s+(\d+) kB", handle.read(), re.MULTILINE)
    return int(match.group(1)) * 1024


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


def _max_relative_error(output, expected) -> float:
    """max |output - expected| / max |expected| over all tensors (NaN-free outputs expected)."""
    import torch

    outs = output if isinstance(output, (list, tuple)) else [output]
    refs = expected if isinstance(expected, (list, tuple)) else [expected]
    diff = max(float((o.double() - r.double()).abs().max()) for o, r in zip(outs, refs))
    scale = max(float(r.double().abs().max()) for r in refs)
    return diff / scale if scale > 0 else diff


def _apply_tf32(mode: str | None) -> None:
    """``--tf32``: ``off``/``on`` set PyTorch's matmul and cuDNN TF32 flags alike, so that the original's
    cuDNN convolutions and our kernels (which follow the matmul flag) compute the same fp32 math;
    ``torch`` leaves PyTorch's defaults (TF32 in cuDNN convolutions only). No effect on CPU."""
    import torch

    if mode in ("off", "on"):
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = mode == "on"


def _one_config_per_kernel() -> None:
    """Every Triton kernel keeps its first autotune config: for ``--max-size`` tries, which only ask whether
    a size runs (no kernel allocates memory by its tile size), so that each fresh process does not
    compile and time every config of every kernel at every size tried."""
    from hypertriton import kernels

    try:
        autotuned = kernels.autotuned_kernels()
    except ImportError:  # no Triton: nothing is autotuned
        return
    for kernel in autotuned.values():
        del kernel.configs[1:]


def _setup(job: dict):
    """(torch, cases, inputs, sync) for a job, with its thread count, TF32 mode and seed applied (and one
    config per kernel for a ``--max-size`` try)."""
    import torch

    sys.path.insert(0, str(HERE))
    import cases

    if job.get("threads"):
        torch.set_num_threads(job["threads"])
    _apply_tf32(job.get("tf32"))
    if job.get("fit_only"):
        _one_config_per_kernel()
    device = torch.device(job["device"])
    torch.manual_seed(0)
    inputs = cases.make_inputs(job["backbone"], job["size"], job["batch"], getattr(torch, job["dtype"]), device,
                               job["mask"])
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    return torch, cases, inputs, sync


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0] if text else ''}".rstrip(": ")


def time_variants(job: dict) -> dict:
    """Time every variant of one (size, case, mask) in one process, interleaved round-robin.

    On a shared machine the load drifts during a run; interleaving makes every variant see the same
    drift, so their ratios hold even when absolute times wander. A variant that raises (the original out
    of GPU memory at a large size, say) is dropped with its error and the others go on being timed.
    """
    torch, cases, inputs, sync = _setup(job)
    runs, errors = {}, {}

    def drop(variant: str, error: Exception) -> None:
        errors[variant] = _first_line(error)
        runs.pop(variant, None)
        gc.collect()
        if inputs.device.type == "cuda":
            torch.cuda.empty_cache()  # what the failed variant held is free for the others

    for variant in job["variants"]:
        try:
            runs[variant] = cases.build(job["case"], variant, inputs)
        except Exception as error:
            drop(variant, error)
    for _ in range(job["warmup"]):
        for variant, run in list(runs.items()):
            try:
                run()
                sync()
            except Exception as error:
                drop(variant, error)
    times = {variant: [] for variant in runs}
    for round_index in range(job["repeats"]):
        # Rotate the order each round so that no variant always runs right after the same neighbour.
        order = list(runs)
        shift = round_index % max(len(order), 1)
        for variant in order[shift:] + order[:shift]:
            gc.collect()
            try:
                start = time.perf_counter()
                output = runs[variant]()
                sync()
                times[variant].append(time.perf_counter() - start)
                del output
            except Exception as error:
                drop(variant, error)
    return {"times": {variant: times[variant] for variant in runs}, "errors": errors}


def _nnpack_flop_formula(torch) -> dict:
    """FlopCounterMode knows no formula for NNPACK's convolution (hypertriton.ops.cpu_conv): count it as the
    direct convolution it replaces (Winograd multiplies less, so rows using it can pass 100% of peak)."""
    from torch.utils.flop_counter import conv_flop_count

    op = getattr(torch.ops.aten, "_nnpack_spatial_convolution", None)
    if op is None:
        return {}

    def direct_conv_flops(x_shape, w_shape, *args, out_shape=None, **kwargs):
        return conv_flop_count(list(x_shape), list(w_shape), list(out_shape), transposed=False)

    return {op: direct_conv_flops}


def measure_variant(job: dict) -> dict:
    """Peak extra memory of one variant (fresh process), and its FLOPs (original) or its error against
    the original's output (others)."""
    from torch.utils.flop_counter import FlopCounterMode

    torch, cases, inputs, sync = _setup(job)
    run = cases.build(job["case"], job["variant"], inputs)
    cuda = inputs.device.type == "cuda"
    for _ in range(max(job["warmup"], 1)):
        run()
    if getattr(run, "model", None) is not None:
        # A training step's gradients are part of its peak: gone from the baseline, the measured run
        # allocates them again (it starts by setting them to None).
        run.model.zero_grad(set_to_none=True)
    sync()
    gc.collect()
    if cuda:
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        base = _proc_status("VmRSS")
        if not _reset_peak_rss():
            base = None
    output = run()
    sync()
    if cuda:
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = None if base is None else _proc_status("VmHWM") - base
    result = {"peak_bytes": peak}
    if job.get("fit_only"):  # the largest-size search: does it run, and in how much memory
        return result
    if job["variant"] != "original":
        # The original's output on the same inputs and weights (a training step here has no optimizer: the
        # weights stay, the logits compare).
        expected = cases.build(job["case"], "original", inputs)()
        result["max_rel_error"] = _max_relative_error(output, expected)
    # The matrix-product and convolution FLOPs this variant executes (sparse and fused paths run fewer).
    with FlopCounterMode(display=False, custom_mapping=_nnpack_flop_formula(torch)) as counter:
        run()
    result["flops_run"] = counter.get_total_flops()
    return result


def gemm_peak(job: dict) -> dict:
    """GFLOP/s of one large square matrix product per dtype on the job's device and threads: the rate the
    convolutions and matrix products of every variant are compared with (a compute-bound ceiling)."""
    import torch

    if job.get("threads"):
        torch.set_num_threads(job["threads"])
    _apply_tf32(job.get("tf32"))
    device = torch.device(job["device"])
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sides = (4096, 8192) if device.type == "cuda" else (512, 1024)
    out = {}
    for name in job["dtypes"]:
        rates = []
        for side in sides:  # the best of two sizes: the library's choice of kernel varies with the shape
            a, b, c = (torch.randn(side, side, device=device).to(getattr(torch, name)) for _ in range(3))
            times = []
            for _ in range(10):
                sync()
                start = time.perf_counter()
                torch.mm(a, b, out=c)  # into one buffer: no fresh pages to fault in
                sync()
                times.append(time.perf_counter() - start)
            rates.append(2 * side**3 / statistics.median(times[3:]) / 1e9)
        out[name] = max(rates)
    return out


def largest_fitting(fits, start: int, limit: int) -> tuple[int | None, dict[int, bool]]:
    """The largest size in ``[1, limit]`` for which ``fits(size)`` holds, and every size tried.

    ``fits`` is assumed monotone (true up to some size, false above). From ``start`` the size grows by
    half each step until one fails (or ``limit`` fits), then a bisection between the last size that
    fitted and the first that did not; when ``start`` itself fails, the bisection runs below it. None
    when even size 1 fails. Each size is tried at most once.
    """
    if not 1 <= start <= limit:
        raise ValueError(f"start: expected 1 <= start <= limit ({limit}), got {start}")
    tried: dict[int, bool] = {}

    def check(size: int) -> bool:
        if size not in tried:
            tried[size] = bool(fits(size))
        return tried[size]

    if check(start):
        low, high = start, None
        while high is None:
            if low == limit:
                return low, tried
            step = min(limit, max(low + 1, low * 3 // 2))
            if check(step):
                low = step
            else:
                high = step
    else:
        low, high = 0, start
    while high - low > 1:
        middle = (low + high) // 2
        if check(middle):
            low = middle
        else:
            high = middle
    return (low or None), tried


# ---------------------------------------------------------------------------------------------- driver
def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            match = re.search(r"^model name\s*:\s*(.+)$", handle.read(), re.MULTILINE)
        if match:
            return match.group(1).strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _git_commit() -> str | None:
    """The commit the benchmark ran at, ``+dirty`` when tracked files differ from it; None outside a checkout."""
    try:
        head = subprocess.run(["git", "-C", str(HERE), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=30)
        if head.returncode != 0:
            return None
        changed = subprocess.run(["git", "-C", str(HERE), "status", "--porcelain", "--untracked-files=no"],
                                 capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):  # no git on this machine, or a wedged file system
        return None
    return head.stdout.strip() + ("+dirty" if changed.stdout.strip() else "")


def machine_info(device: str) -> dict:
    import torch

    info = {
        "device": device,
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "load_average_start": os.getloadavg(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    import hypertriton

    info["hypertriton"] = hypertriton.__version__
    info["git_commit"] = _git_commit()
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(device)
        info["allow_tf32"] = torch.backends.cuda.matmul.allow_tf32
        info["cudnn_allow_tf32"] = torch.backends.cudnn.allow_tf32
    return info


def available_backends(device: str) -> list[str]:
    """Backends that time meaningfully on ``device`` (never the CPU interpreter unless asked)."""
    if device.startswith("cuda"):
        from hypertriton.backend import triton_unavailable_reason
        import torch

        reason = triton_unavailable_reason(torch.device(device))
        return (["triton"] if reason is None else []) + ["torch", "reference"]
    return ["torch", "reference"]


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    position = (len(ordered) - 1) * q
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def summarize(rows: list[dict], peaks: dict | None = None, dtype: str = "float32") -> list[dict]:
    """Median/p20/p80, speedup and memory ratio over the original of the same (size, case, mask); effective
    GFLOP/s (the original's FLOPs in the row's time) and executed GFLOP/s (the row's own FLOPs), also as a
    fraction of ``peaks`` (GEMM GFLOP/s per dtype, from :func:`gemm_peak`)."""
    originals = {(r["size"], r["case"], r["mask"]): r for r in rows if r["variant"] == "original" and "times" in r}
    for row in rows:
        if "times" not in row:
            continue
        times = row["times"]
        row["median_s"] = statistics.median(times)
        row["p20_s"], row["p80_s"] = _percentile(times, 0.2), _percentile(times, 0.8)
    for row in rows:
        base = originals.get((row["size"], row["case"], row["mask"]))
        if base is None or "median_s" not in row:
            continue
        row["speedup"] = base["median_s"] / row["median_s"]
        together = not (row.get("timed_alone") or base.get("timed_alone"))
        if row is not base and together and len(base["times"]) == len(row["times"]):
            # Paired by round: the original and this row ran in the same round, so a load that drifts
            # between rounds cancels in each ratio (a ratio of medians takes the two medians from whichever
            # rounds happened to be quiet for each).
            ratios = [theirs / ours for theirs, ours in zip(base["times"], row["times"])]
            row["paired_speedup"] = statistics.median(ratios)
            row["paired_p20"], row["paired_p80"] = _percentile(ratios, 0.2), _percentile(ratios, 0.8)
        if base.get("peak_bytes") and row.get("peak_bytes"):
            row["memory_ratio"] = base["peak_bytes"] / max(row["peak_bytes"], 1)
        if base.get("flops_run"):
            row["flops"] = base["flops_run"]
            row["gflops_per_s"] = base["flops_run"] / row["median_s"] / 1e9
    for row in rows:
        if row.get("flops_run") and "median_s" in row:
            row["run_gflops_per_s"] = row["flops_run"] / row["median_s"] / 1e9
            rate = (peaks or {}).get(_compute_dtype(row["variant"], dtype))
            if rate:
                row["peak_fraction"] = row["run_gflops_per_s"] / rate
    return rows


def _compute_dtype(variant: str, dtype: str) -> str:
    """The dtype a variant's matrix products run in (``+bf16`` variants: bfloat16 under autocast)."""
    return "bfloat16" if variant.endswith("+bf16") else dtype


def _scaled(value, factor: float):
    return None if value is None else value * factor


def _fmt(value, spec: str, missing: str = "-") -> str:
    return missing if value is None else format(value, spec)


def _tf32_words(info: dict) -> str:
    matmul, cudnn = info.get("allow_tf32"), info.get("cudnn_allow_tf32")
    if matmul is None or cudnn is None:
        return "TF32 flags not recorded"
    if matmul == cudnn:
        return ("TF32" if matmul else "IEEE fp32") + " in every variant's matrix products and convolutions"
    return (f"TF32 in cuDNN convolutions {'on' if cudnn else 'off'}, in matrix products and the Triton kernels "
            f"{'on' if matmul else 'off'}")


def _bf16_note(info: dict) -> list[str]:
    """The markdown line saying why ``torch+bf16`` was left out, if it was."""
    reason = info.get("bf16_not_timed")
    return [f"- torch+bf16 not timed: {reason} (`--bf16 on` times it anyway)"] if reason else []


def _paired(row: dict) -> str:
    """``"1.52x (1.41-1.63)"``: a row's paired speedup and its p20-p80, or "-" where there is none."""
    if row.get("paired_speedup") is None:
        return "-"
    return f"{row['paired_speedup']:.2f}x ({row['paired_p20']:.2f}-{row['paired_p80']:.2f})"


def markdown(report: dict) -> str:
    info, args = report["machine"], report["args"]
    lines = [f"# hypertriton benchmark: {args['backbone']}, batch {args['batch']}, {args['dtype']}, "
             f"{info['device']}", ""]
    lines.append(f"- machine: {args['machine'] or info['cpu']}" + (f", GPU {info['gpu']}" if info.get("gpu") else ""))
    if info.get("gpu"):
        lines.append(f"- fp32 math on the GPU: {_tf32_words(info)}")
    lines.append(f"- CPU: {info['cpu']} ({info.get('cpu_capability', 'capability not recorded')}), "
                 f"{info['cpu_count']} cores visible, torch threads {info['torch_threads']}; "
                 f"load average at start {tuple(round(x, 2) for x in info['load_average_start'])}, "
                 f"at end {tuple(round(x, 2) for x in info['load_average_end'])}")
    lines.append(f"- versions: python {info['python']}, torch {info['torch']}, triton {info['triton']}, "
                 f"hypertriton {info['hypertriton']} at commit {info.get('git_commit') or 'not recorded'}")
    lines.append(f"- backends timed: {', '.join(report['backends'])}; {args['repeats']} timed repeats after "
                 f"{args['warmup']} warm-up per row, variants of a case interleaved in one process; peak memory from "
                 f"one run per row in a fresh process; date {report['date']}")
    lines += _bf16_note(info)
    if args.get("note"):
        lines.append(f"- note: {args['note']}")
    alone = sorted({(row["size"], row["case"], row["mask"], row["timed_alone"]) for row in report["rows"]
                    if row.get("timed_alone")})
    for size, case, mask, why in alone:
        lines.append(f"- size {size} {case} {mask}: each variant timed in a process of its own, not interleaved "
                     f"(no paired speedup) because {why}")
    if report.get("partial"):
        lines.append(f"- **partial results**: {report['partial']} (the run was interrupted or is still going)")
    peaks = info.get("gemm_peak_gflops") or {}
    if peaks:
        lines.append("- GEMM peak on this device and thread count (one large square matrix product): " +
                     ", ".join(f"{name} {rate:.0f} GFLOP/s" for name, rate in peaks.items()))
    lines += ["", "Size = side of the finest feature map (50 = 400-px images). Speedup and memory ratio are "
              "the original's median time / peak extra memory divided by the row's. Paired: the median over the timed "
              "rounds of the original's time / the row's in the same round (p20-p80 of those ratios; load "
              "drifting between rounds cancels in each). Eff. GFLOP/s: the "
              "original's (dense) FLOPs in the row's time. GFLOP run: the matrix-product and convolution FLOPs "
              "the row itself executes (torch's FlopCounterMode; NNPACK's Winograd convolutions count as the direct "
              "ones they replace); % peak: their rate against the GEMM peak above, in the dtype they run in (a "
              "row near 100% can only get faster by doing fewer FLOPs; Winograd rows can pass it). "
              "Rel. error: max |row - original| / max |original|.", ""]
    lines.append("| size | case | mask | variant | median ms | p20 ms | p80 ms | speedup | paired (p20-p80) | peak MiB "
                 "| mem ratio | eff. GFLOP/s | GFLOP run | % peak | rel. error |")
    lines.append("|---:|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for row in report["rows"]:
        if "median_s" not in row:
            lines.append(f"| {row['size']} | {row['case']} | {row['mask']} | {row['variant']} | failed: "
                         f"{row.get('error', '?')[:80]} | | | | | | | | | | |")
            continue
        peak = row.get("peak_bytes")
        variant = row["variant"] + (" (timed alone)" if row.get("timed_alone") else "")
        lines.append(
            f"| {row['size']} | {row['case']} | {row['mask']} | {variant} | {row['median_s'] * 1e3:.1f} | "
            f"{row['p20_s'] * 1e3:.1f} | {row['p80_s'] * 1e3:.1f} | {_fmt(row.get('speedup'), '.2f')}x | "
            f"{_paired(row)} | "
            f"{_fmt(None if peak is None else peak / 2**20, '.1f')} | {_fmt(row.get('memory_ratio'), '.1f')}x | "
            f"{_fmt(row.get('gflops_per_s'), '.1f')} | {_fmt(_scaled(row.get('flops_run'), 1e-9), '.2f')} | "
            f"{_fmt(_scaled(row.get('peak_fraction'), 100), '.0f')} | {_fmt(row.get('max_rel_error'), '.1e')} |")
    if report["targets"]:
        lines += ["", "## Targets (reported, not asserted)", "", "| size | case | mask | variant | metric | target "
                  "| measured | paired (p20-p80) | met |", "|---:|---|---|---|---|---:|---:|---:|---|"]
        for t in report["targets"]:
            measured = "-" if t["measured"] is None else f"{t['measured']:.2f}x"
            met = "not timed here" if t.get("skipped") else "-" if t["met"] is None else "yes" if t["met"] else "no"
            paired = _paired(t) if t["metric"] == "speedup" else "-"
            lines.append(f"| {t['size']} | {t['case']} | {t['mask']} | {t['variant']} | {t['metric']} | "
                         f">= {t['target']}x | {measured} | {paired} | {met} |")
    return "\n".join(lines) + "\n"


def targets(report: dict) -> list[dict]:
    """The issue's targets where this run measured what they are set for: size 50, and on a CPU batch 1
    in fp32, on a GPU batch 8 (elsewhere a "no" would compare with a goal set for other conditions)."""
    args = report["args"]
    cuda = report["machine"]["device"].startswith("cuda")
    if args["batch"] != (GPU_TARGET_BATCH if cuda else 1) or (not cuda and args["dtype"] != "float32"):
        return []
    table = GPU_TARGETS if cuda else CPU_TARGETS
    out = []
    for size in [size for size in args["sizes"] if size == TARGET_SIZE]:
        for case, mask, variant, metric, goal in table:
            match = [r for r in report["rows"] if (r["size"], r["case"], r["mask"], r["variant"]) ==
                     (size, case, mask, variant)]
            measured = match[0].get(metric) if match else None
            # A bf16 target of a case and mask that ran, on a CPU where bf16 was left out: said, not dropped.
            skipped = (not match and variant.endswith("+bf16") and report["machine"].get("bf16_not_timed")
                       and case in args.get("cases", [case]) and mask in args.get("masks", [mask]))
            if match or measured is not None or skipped:
                out.append({"size": size, "case": case, "mask": mask, "variant": variant, "metric": metric,
                            "target": goal, "measured": measured, "skipped": bool(skipped),
                            "met": None if measured is None else measured >= goal,
                            **{key: match[0][key] for key in ("paired_speedup", "paired_p20", "paired_p80")
                               if match and key in match[0]}})
    return out


# ---------------------------------------------------------------------------------------------- plot
# One colour per variant, the same in every plot: a backend's variants in related hues, the original in dark
# grey. A variant missing here (a new backend) gets one of FALLBACK_COLOURS picked by its name, so that its
# colour too stays the same from plot to plot.
VARIANT_COLOURS = {
    "original": "#404040",
    "reference": "#9467bd",
    "torch": "#ff7f0e",
    "torch-unfused": "#d62728",
    "torch-lean": "#8c564b",
    "torch+bf16": "#e377c2",
    "triton": "#1f77b4",
    "triton-unfused": "#17becf",
    "triton-lean": "#2ca02c",
    "triton+bf16": "#bcbd22",
}
FALLBACK_COLOURS = ("#7f7f7f", "#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5", "#c49c94", "#dbdb8d")
FAILED_COLOUR = "#c00000"  # the text of a failed or unmeasured entry
IMAGE_PX_PER_SIZE = 8  # image side (px) = 8 x size for every backbone (bench/cases.py image_side: 50 <-> 400 px)
MASK_STYLES = {"object": "-", "full": "--"}


def variant_colour(variant: str) -> str:
    """The plots' fixed colour of ``variant`` (:data:`VARIANT_COLOURS`)."""
    if variant in VARIANT_COLOURS:
        return VARIANT_COLOURS[variant]
    return FALLBACK_COLOURS[zlib.crc32(variant.encode()) % len(FALLBACK_COLOURS)]


def _short(text, limit: int = 90) -> str:
    """One line of at most ``limit`` characters (an error message in a plot)."""
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit - 3].rstrip() + "..."


def _speedup_shown(row: dict) -> tuple[float, float | None, float | None, str, bool] | None:
    """What the plot shows as a row's speedup: (value, p20, p80, label, paired). Where the rounds were paired,
    the median of the per-round ratios with their p20-p80, labelled as the markdown's "paired (p20-p80)" cell
    (the figure the READMEs quote); elsewhere the ratio of the medians, as its "speedup" cell. None without either."""
    if row.get("paired_speedup") is not None:
        return row["paired_speedup"], row["paired_p20"], row["paired_p80"], _paired(row), True
    if row.get("speedup") is not None:
        return row["speedup"], None, None, f"{row['speedup']:.2f}x", False
    return None


def _plot_title(report: dict, head: str) -> str:
    """The figure's title: what ran, then where (CPU or GPU model, threads), torch version and date, then the
    free-text machine name when the run had one, so that plots of different machines never look alike."""
    info, args = report["machine"], report["args"]
    lines = [f"{head}: {args['backbone']}, batch {args['batch']}, {args['dtype']}"
             + (" (partial results)" if report.get("partial") else "")]
    cpu = info.get("cpu") or "CPU not recorded"
    if info.get("cpu_capability"):
        cpu += f" ({info['cpu_capability']})"
    threads = info.get("torch_threads")
    cpu += "" if threads is None else f", {threads} torch thread{'' if threads == 1 else 's'}"
    cpu += f" of {info['cpu_count']} cores" if info.get("cpu_count") else ""
    versions = f"torch {info.get('torch') or 'not recorded'}"
    if info.get("gpu"):
        where = f"{info.get('device', 'cuda')}: {info['gpu']} (host {cpu})"
        versions += f", triton {info.get('triton') or 'not installed'}"
    else:
        where = f"{info.get('device', 'cpu')}: {cpu}"
    date = str(report.get("date") or "")[:10]
    lines.append(f"{where}; {versions}" + (f"; {date}" if date else ""))
    if args.get("machine"):
        lines.append(_short(args["machine"], 130))
    return "\n".join(lines)


def _one_size_entries(rows: list[dict]) -> list[dict]:
    """The rows of a one-size plot, in the report's order: every row but an original that ran (the 1x the
    others are measured against). Each with its speedup (:func:`_speedup_shown`) and memory ratio, or the
    reason there is none: the row failed, its original failed or is missing, a peak was not measured."""
    originals = {(r["case"], r["mask"]): r for r in rows if r["variant"] == "original"}
    entries = []
    for row in rows:
        failed = "median_s" not in row
        if row["variant"] == "original" and not failed:
            continue
        base = originals.get((row["case"], row["mask"]))
        entry = {"row": row, "speed": None, "memory": row.get("memory_ratio"),
                 "label": f"{row['case']} / {row['mask']} / {row['variant']}"
                          + (" (timed alone)" if row.get("timed_alone") else "")}
        if failed:
            entry["speed_note"] = f"failed: {_short(row.get('error') or 'no time recorded')}"
            entry["memory_note"] = "failed: not measured"
        elif base is None or "median_s" not in base:
            entry["speed_note"] = entry["memory_note"] = (
                "n/a: no original in this run" if base is None else
                "n/a: the original failed (its row says why)")
        else:
            entry["speed"] = _speedup_shown(row)
            if entry["speed"] is None:
                entry["speed_note"] = "n/a: no speedup recorded"
            if entry["memory"] is None:
                if row.get("peak_bytes") is None:
                    why = row.get("measure_error")
                    entry["memory_note"] = "n/a: memory not measured" + (f" ({_short(why, 60)})" if why else "")
                elif not base.get("peak_bytes"):
                    entry["memory_note"] = "n/a: the original's memory not measured"
                else:
                    entry["memory_note"] = "n/a: no memory ratio"
        entries.append(entry)
    return entries


def _ratio_axis(ax, matplotlib, reach: list[float]) -> None:
    """A log-scale ratio axis around 1x with room for the labels at both ends."""
    low, high = min(reach + [1.0]), max(reach + [1.0])
    ax.set_xscale("log")
    ax.set_xlim(low / 3.2, high * 3.2)
    ax.axvline(1.0, color="black", linewidth=0.8)
    low_exp, high_exp = math.floor(math.log2(low / 3.2)), math.ceil(math.log2(high * 3.2))
    step = 1 if high_exp - low_exp <= 8 else 2  # every power of 2, or every other one: always 1x
    ax.xaxis.set_major_locator(matplotlib.ticker.FixedLocator(
        [2.0**e for e in range(low_exp, high_exp + 1) if e % step == 0]))
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}x" if v >= 1 else f"1/{1 / v:g}x"))
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.grid(True, axis="x", alpha=0.3)


def _value_label(ax, value: float, y: float, ends: list[float], text: str) -> None:
    """``text`` beside a bar drawn from 1x: right of its far end (whisker included) above 1x, left of it below."""
    if value >= 1:
        ax.text(max(ends), y, f" {text}", va="center", ha="left", fontsize=6)
    else:
        ax.text(min(ends), y, f"{text} ", va="center", ha="right", fontsize=6)


def _draw_one_size(fig, report: dict, rows: list[dict]) -> None:
    """Speedup and memory ratio over the original of every row at one size, as bars from 1x on log axes."""
    import matplotlib
    import matplotlib.lines
    import matplotlib.patches
    import matplotlib.ticker
    import matplotlib.transforms

    entries = _one_size_entries(rows)
    header, footer, per_row = 0.8, 1.3, 0.22  # inches: three title lines; axis labels and legend; one row
    height = header + footer + per_row * max(len(entries), 4)
    fig.set_size_inches(12, height)
    axes = fig.subplots(1, 2, sharey=True)
    positions = list(range(len(entries)))[::-1]
    paired = any(e["speed"] and e["speed"][4] for e in entries)
    for ax, panel in zip(axes, ("speed", "memory")):
        note_at = matplotlib.transforms.blended_transform_factory(ax.transAxes, ax.transData)
        reach = []
        for y, entry in zip(positions, entries):
            colour = variant_colour(entry["row"]["variant"])
            if panel == "speed" and entry["speed"] is not None:
                value, p20, p80, text, is_paired = entry["speed"]
                ax.barh(y, value - 1, left=1, height=0.7, color=colour)
                ends = [value]
                if is_paired:
                    ax.plot([p20, p80], [y, y], color="black", linewidth=1)
                    ax.plot([value], [y], "o", color="black", markersize=2.5)
                    ax.plot([entry["row"]["speedup"]], [y], "D", markerfacecolor="none", markeredgecolor="black",
                            markeredgewidth=0.6, markersize=3)
                    ends += [p20, p80, entry["row"]["speedup"]]
                elif paired:
                    text += " (ratio of medians)"
                reach += ends
                _value_label(ax, value, y, ends, text)
            elif panel == "memory" and entry["memory"] is not None:
                value = entry["memory"]
                ax.barh(y, value - 1, left=1, height=0.7, color=colour)
                reach.append(value)
                _value_label(ax, value, y, [value], f"{value:.1f}x")
            else:
                note = entry.get(f"{panel}_note", "n/a")
                ax.text(0.01, y, note, transform=note_at, va="center", ha="left", fontsize=6, color=FAILED_COLOUR)
        _ratio_axis(ax, matplotlib, reach)
        if not entries:
            ax.text(0.5, 0.5, "nothing to compare: " + ("no row but the original's" if rows else "no rows"),
                    transform=ax.transAxes,
                    ha="center", va="center", color=FAILED_COLOUR)
        elif not reach:
            ax.text(0.5, 1.0, "no ratio to draw: see the notes at each row", transform=ax.transAxes,
                    ha="center", va="bottom", fontsize=7, color=FAILED_COLOUR)
    axes[0].set_ylim(-0.7, max(len(entries), 1) - 0.3)
    axes[0].set_yticks(positions)
    axes[0].set_yticklabels([e["label"] for e in entries], fontsize=7)
    if paired:
        how = ("bars, dots and labels: the median over rounds of the original's time / the row's in the same "
               "round\n(paired; as the markdown's paired column); whiskers and (...): its p20-p80; "
               "diamonds: ratio of the medians")
    else:
        how = "bars and labels: the original's median time / the row's"
    axes[0].set_xlabel(f"speedup over the original (log scale, bars from 1x = same)\n{how}", fontsize=8)
    axes[1].set_xlabel("peak extra memory: the original's / the row's (log scale, bars from 1x = same)\n"
                       "label: as the markdown's mem ratio column", fontsize=8)
    present = list(dict.fromkeys(e["row"]["variant"] for e in entries))
    handles = [matplotlib.patches.Patch(color=variant_colour(v), label=v) for v in _in_table_order(present)]
    if paired:
        handles += [matplotlib.lines.Line2D([], [], color="black", linewidth=1, marker="o", markersize=2.5,
                                            label="paired median, p20-p80"),
                    matplotlib.lines.Line2D([], [], linestyle="none", marker="D", markerfacecolor="none",
                                            markeredgecolor="black", markersize=3, label="ratio of medians")]
    if handles:
        fig.legend(handles=handles, loc="lower center", bbox_to_anchor=(0.5, 0.0), ncol=min(len(handles), 8),
                   fontsize=7, frameon=False)
    sizes = sorted({r["size"] for r in rows})
    head = (f"size {sizes[0]} ({IMAGE_PX_PER_SIZE * sizes[0]}-px images), each row against the original"
            if sizes else "no rows")
    fig.suptitle(_plot_title(report, head), fontsize=9, y=1 - 0.05 / height, va="top")
    fig.tight_layout(rect=(0, 0.3 / height, 1, 1))  # tight_layout leaves room for the title, not for the legend


def _in_table_order(variants: list[str]) -> list[str]:
    """``variants`` in :data:`VARIANT_COLOURS`'s order, unknown ones last (a legend reads the same everywhere)."""
    known = list(VARIANT_COLOURS)
    return sorted(variants, key=lambda v: (known.index(v) if v in known else len(known), v))


def _draw_sweep(fig, report: dict, rows: list[dict], sizes: list[int]) -> None:
    """Median time and peak extra memory against size for one case (the learner forward where it ran): a
    colour per variant, a line style per mask; a failed or unmeasured point is an 'x' at the panel's top
    edge (the line breaks there) and named in a note below."""
    import matplotlib.lines
    import matplotlib.transforms

    case = "learner_forward" if any(r["case"] == "learner_forward" for r in rows) else rows[0]["case"]
    chosen = [r for r in rows if r["case"] == case]
    masks = sorted({r["mask"] for r in chosen}, key=lambda m: (list(MASK_STYLES).index(m) if m in MASK_STYLES
                                                               else len(MASK_STYLES), m))
    variants = _in_table_order(list(dict.fromkeys(r["variant"] for r in chosen)))
    fig.set_size_inches(12.5, 5.6)
    axes = fig.subplots(1, 2)
    missing = {}  # (variant, mask, size) -> why a point has no value
    for ax, panel in zip(axes, ("time", "memory")):
        top_edge = matplotlib.transforms.blended_transform_factory(ax.transData, ax.transAxes)
        drawn = False
        for mask in masks:
            style = MASK_STYLES.get(mask, ":")
            for variant in variants:
                series = {r["size"]: r for r in chosen if (r["mask"], r["variant"]) == (mask, variant)}
                if not series:
                    continue
                xs, ys, gaps = sorted(series), [], []
                for size in xs:
                    row = series[size]
                    if "median_s" not in row:
                        value, why = None, f"failed: {_short(row.get('error') or 'no time recorded', 70)}"
                    elif panel == "time":
                        value, why = row["median_s"] * 1e3, None
                    elif row.get("peak_bytes") is None:
                        value = None
                        why = "memory not measured" + (f": {_short(row['measure_error'], 60)}"
                                                       if row.get("measure_error") else "")
                    else:
                        value, why = row["peak_bytes"] / 2**20, None
                    ys.append(float("nan") if value is None else value)
                    if value is None:
                        gaps.append(size)
                        missing.setdefault((variant, mask, size), why)
                colour = variant_colour(variant)
                if any(y == y for y in ys):  # not all NaN
                    ax.plot(xs, ys, style, marker="o", markersize=4, color=colour)
                    drawn = True
                if gaps:
                    ax.plot(gaps, [0.97] * len(gaps), linestyle="none", marker="x", markersize=8,
                            markeredgewidth=2, color=colour, transform=top_edge, clip_on=False)
        if drawn:
            ax.set_yscale("log")
        else:
            ax.set_yticks([])
            ax.text(0.5, 0.5, "nothing measured to draw:\nevery point failed (see the notes below)",
                    transform=ax.transAxes, ha="center", va="center", color=FAILED_COLOUR)
        ax.set_xlim(min(sizes) - 0.06 * (max(sizes) - min(sizes)), max(sizes) + 0.06 * (max(sizes) - min(sizes)))
        ax.set_xticks(sizes)
        ax.set_xlabel(f"size: side of the finest feature map (x{IMAGE_PX_PER_SIZE} = image side in px)")
        top = ax.secondary_xaxis("top", functions=(lambda s: s * IMAGE_PX_PER_SIZE, lambda px: px / IMAGE_PX_PER_SIZE))
        top.set_xticks([size * IMAGE_PX_PER_SIZE for size in sizes])
        top.set_xlabel("image side (px)", fontsize=8)
        top.tick_params(labelsize=8)
        ax.grid(True, alpha=0.3)
    axes[0].set_ylabel("median time (ms)")
    axes[1].set_ylabel("peak extra memory (MiB)")
    Line2D = matplotlib.lines.Line2D
    handles = [Line2D([], [], color=variant_colour(v), linewidth=2, label=v) for v in variants]
    handles += [Line2D([], [], color="black", linestyle=MASK_STYLES.get(m, ":"), label=f"{m} mask") for m in masks]
    if missing:
        handles.append(Line2D([], [], color="black", linestyle="none", marker="x", markeredgewidth=2,
                              label="failed / not measured\n(at the top edge)"))
    # One legend for both panels, outside them on the right.
    fig.legend(handles=handles, loc="center left", bbox_to_anchor=(0.835, 0.5), fontsize=8, frameon=False,
               title="colour: variant\nline: support mask", title_fontsize=8)
    bottom = 0.0
    if missing:
        grouped = {}  # (variant, mask, why) -> sizes
        for (variant, mask, size), why in missing.items():
            grouped.setdefault((variant, mask, why), []).append(size)
        reasons = {why for _, _, why in grouped}
        if len(reasons) == 1 and len(missing) == len({(r["variant"], r["mask"], r["size"]) for r in chosen}):
            notes = [f"every point: {reasons.pop()}"]
        else:
            notes = [f"{variant} ({mask}) at size{'s' if len(sizes_) > 1 else ''} "
                     f"{', '.join(map(str, sorted(sizes_)))}: {why}"
                     for (variant, mask, why), sizes_ in sorted(grouped.items(), key=lambda item: (
                         min(item[1]), variants.index(item[0][0]), item[0][1]))]
        shown = notes[:5] + ([f"... and {len(notes) - 5} more (see the markdown)"] if len(notes) > 5 else [])
        fig.text(0.01, 0.01, "x = no value: " + "\n".join(shown), fontsize=7, color=FAILED_COLOUR, va="bottom")
        bottom = (0.2 + 0.14 * len(shown)) / 5.6
    fig.suptitle(_plot_title(report, f"{case} against size, both masks"), fontsize=9, y=0.99, va="top")
    fig.tight_layout(rect=(0, bottom, 0.83, 1))  # room for the title is left by tight_layout itself


def figure(report: dict):
    """The report's plot as a matplotlib Figure (:func:`plot` saves it): across sizes, time and memory against
    size (:func:`_draw_sweep`); at one size, speedup and memory ratio of every row (:func:`_draw_one_size`)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure()
    FigureCanvasAgg(fig)
    rows = report["rows"]
    sizes = sorted({r["size"] for r in rows})
    if len(sizes) > 1:
        _draw_sweep(fig, report, rows, sizes)
    else:
        _draw_one_size(fig, report, rows)
    return fig


def plot(report: dict, path: Path) -> None:
    """Draw :func:`figure` into the PNG ``path`` (replaced atomically)."""
    fig = figure(report)
    _atomic_write(path, lambda handle: fig.savefig(handle, format="png", dpi=110), binary=True)


def _write_results(stem: Path, report: dict, text: str) -> None:
    """``<stem>.json`` (the report) and ``<stem>.md`` (its table), each replaced atomically."""
    _atomic_write(stem.with_name(stem.name + ".json"), lambda handle: json.dump(report, handle, indent=1))
    _atomic_write(stem.with_name(stem.name + ".md"), lambda handle: handle.write(text))


def _atomic_write(path: Path, write, binary: bool = False) -> None:
    """Write ``path`` through a temporary file in its folder, then replace it (hypertriton's own atomic
    write: the file gets the mode a plain ``open`` gives, 0644 under umask 022)."""
    from hypertriton._io import atomic_file

    with atomic_file(path, "wb" if binary else "w") as handle:
        write(handle)


def search_max_sizes(args, groups: list[dict], info: dict, launch, device: str, dtype: str) -> int:
    """``--max-size``: per (case, mask, variant), the largest size that runs (:func:`largest_fitting`), each
    try one fresh process running the case once after a warm-up; written as ``<name>-max-size.{json,md}``."""
    from tqdm import tqdm

    if args.max_size < args.size:
        raise SystemExit(f"--max-size: expected at least --size ({args.size}), got {args.max_size}")
    limit_bytes = None if args.memory_limit is None else args.memory_limit * 2**30
    progress = tqdm(desc="largest size", unit="try")
    found = []
    out = _out_folder(args)
    stem = args.name or _unused_stem(out, f"{device.split(':')[0]}-{args.backbone}-b{args.batch}-{dtype}-max-size")

    def write() -> tuple[dict, str]:
        """JSON and markdown of the searches done so far (rewritten after each: an interrupted run keeps them)."""
        report = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  "machine": dict(info, load_average_end=os.getloadavg()),
                  "args": {"backbone": args.backbone, "batch": args.batch, "dtype": dtype, "start": args.size,
                           "max_size": args.max_size, "memory_limit_gib": args.memory_limit,
                           "machine": args.machine, "note": args.note},
                  "max_sizes": found}
        text = max_size_markdown(report)
        _write_results(out / stem, report, text)
        return report, text

    for group in [g for g in groups if g["size"] == groups[0]["size"]]:
        for variant in group["variants"]:
            peaks, errors = {}, {}
            # Written after every try, marked unfinished, so a search cut short still reports the largest
            # size seen to run (a lower bound).
            row = {"case": group["case"], "mask": group["mask"], "variant": variant, "largest": None,
                   "at_limit": False, "peak_bytes": None, "tried": {}, "first_failure": None, "unfinished": True}
            found.append(row)

            def fits(size: int) -> bool:
                progress.set_postfix_str(f"{group['case']} {group['mask']} {variant} size {size}")
                job = {k: v for k, v in group.items() if k != "variants"} | {"variant": variant, "size": size,
                                                                            "fit_only": True}
                result = launch("measure", job)
                progress.update(1)
                peak = result.get("peak_bytes")
                if "error" in result:
                    errors[size], ok = result["error"], False
                elif limit_bytes is not None and peak is not None and peak > limit_bytes:
                    errors[size], ok = f"peak {peak / 2**20:.1f} MiB > limit {limit_bytes / 2**20:.1f} MiB", False
                else:
                    peaks[size], ok = peak, True
                row["tried"][str(size)] = ok
                if ok and (row["largest"] is None or size > row["largest"]):
                    row["largest"], row["peak_bytes"] = size, peak
                write()
                return ok

            largest, tried = largest_fitting(fits, args.size, args.max_size)
            row.update({"largest": largest, "at_limit": largest == args.max_size, "peak_bytes": peaks.get(largest),
                        "tried": {str(k): v for k, v in sorted(tried.items())},
                        "first_failure": errors.get(min((k for k, v in tried.items() if not v), default=-1)),
                        "unfinished": False})
            write()
    progress.close()
    report, text = write()
    print(text)
    print(f"wrote {out / stem}.{{json,md}}")
    return 0


def max_size_markdown(report: dict) -> str:
    info, args = report["machine"], report["args"]
    limit = "" if args["memory_limit_gib"] is None else f", counting only runs under {args['memory_limit_gib']} GiB"
    lines = [f"# hypertriton: largest size that runs, {args['backbone']}, batch {args['batch']}, {args['dtype']}, "
             f"{info['device']}", "",
             f"- machine: {args['machine'] or info['cpu']}" + (f", GPU {info['gpu']}" if info.get("gpu") else ""),
             f"- versions: python {info['python']}, torch {info['torch']}, triton {info['triton']}, "
             f"hypertriton {info['hypertriton']}; date {report['date']}",
             f"- search from size {args['start']} up to {args['max_size']}{limit}; one fresh process per try"]
    lines += _bf16_note(info)
    if args.get("note"):
        lines.append(f"- note: {args['note']}")
    lines += ["", "Size = side of the finest feature map (image side = 8 x size px). A size runs when the case "
              "completes (on CUDA: without running out of memory); the search assumes that every smaller "
              "size runs too.", "",
              "| case | mask | variant | largest size | image px | peak MiB there | first failure |",
              "|---|---|---|---:|---:|---:|---|"]
    for row in report["max_sizes"]:
        largest = row["largest"]
        shown = "none" if largest is None else f"{largest}" + (" (the limit)" if row["at_limit"] else "")
        if row.get("unfinished"):
            shown = ("none yet" if largest is None else f"at least {largest}") + " (search cut short)"
        peak = row.get("peak_bytes")
        failure = (row.get("first_failure") or "-")[:90].replace("|", "/")
        lines.append(f"| {row['case']} | {row['mask']} | {row['variant']} | {shown} | "
                     f"{'-' if largest is None else 8 * largest} | "
                     f"{_fmt(None if peak is None else peak / 2**20, '.0f')} | {failure} |")
    return "\n".join(lines) + "\n"


def measure_group(group: dict, launch, progress, on_update=None) -> list[dict]:
    """The rows of one (size, case, mask): its variants timed together in one process (``launch("time", ...)``),
    then each one's peak memory, FLOPs and error in a fresh process (``launch("measure", ...)``).
    ``on_update(rows)`` is called with the group's rows after the timing and after each measurement, so that
    a run cut short (a GPU session's time limit) keeps what it has."""
    label = f"{group['size']} {group['case']} {group['mask']}"
    progress.set_postfix_str(f"{label} timing")
    timing = launch("time", group)
    alone = {}
    if "error" in timing and len(group["variants"]) > 1:
        # The whole process died (a timeout, a crash, the kernel's out-of-memory killer): time each variant
        # in a process of its own, so that one variant's failure does not take the others' numbers along.
        progress.write(f"{label}: timing the variants together failed ({timing['error']}); timing each alone")
        for variant in group["variants"]:
            progress.set_postfix_str(f"{label} {variant} timing alone")
            alone[variant] = launch("time", group | {"variants": [variant]})
    progress.update(1)
    rows = []
    for variant in group["variants"]:
        row = {k: group[k] for k in ("size", "case", "mask")} | {"variant": variant}
        variant_timing = alone.get(variant, timing)
        if variant in alone:
            row["timed_alone"] = f"the variants timed together failed: {timing['error']}"
        error = variant_timing.get("error") or variant_timing.get("errors", {}).get(variant)
        if error:
            row["error"] = error
        else:
            row["times"] = variant_timing["times"][variant]
        rows.append(row)
    if on_update is not None:
        on_update(rows)
    for row in rows:
        variant = row["variant"]
        progress.set_postfix_str(f"{label} {variant} memory")
        if "times" in row:
            measured = launch("measure", {k: v for k, v in group.items() if k != "variants"} | {"variant": variant})
            if "error" in measured:
                row["measure_error"] = measured["error"]
            row.update({k: v for k, v in measured.items() if k != "error"})
            if on_update is not None:
                on_update(rows)
        if "error" in row or "measure_error" in row:
            progress.write(f"failed: {row}")
        progress.update(1)
    return rows


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The description as written; each option's default after its help, where it has one to state."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.default not in (None, False, argparse.SUPPRESS) and "default" not in text and action.option_strings:
            text += " (default: %(default)s)"
        return text


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=_HelpFormatter)
    parser.add_argument("--size", type=int, default=50, help="side of the finest feature map (50 = 400 px)")
    parser.add_argument("--sweep", default=None, help="comma-separated sizes, e.g. 13,25,50,75,100 (overrides --size)")
    parser.add_argument("--backbone", default="resnet50", help="resnet50, resnet101 or vgg16 (feature shapes)")
    parser.add_argument("--batch", type=int, default=1, help="episodes per forward")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="the features' dtype")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    parser.add_argument("--backend", default=None,
                        help="comma-separated backends to time (default: all available on the device; the CPU "
                             "interpreter only if 'triton' is named here with TRITON_INTERPRET=1)")
    parser.add_argument("--cases", default=None, help="comma-separated subset of the cases")
    parser.add_argument("--masks", default="object,full", help="object and/or full")
    parser.add_argument("--variants", default=None, help="comma-separated subset of variants (e.g. original,torch)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads per row (default: torch's choice; 1 is steadier on a busy machine)")
    parser.add_argument("--tf32", default="off", choices=["off", "on", "torch"],
                        help="CUDA fp32 math for every variant: off (IEEE fp32 everywhere, the default) or on "
                             "(TF32 in matrix products and convolutions) sets PyTorch's matmul and cuDNN flags "
                             "alike; torch keeps PyTorch's defaults (TF32 in cuDNN convolutions only, while "
                             "our kernels follow the matmul flag)")
    parser.add_argument("--bf16", default="auto", choices=["auto", "on", "off"],
                        help="CPU: time the torch+bf16 variant (autocast) where the CPU computes bf16 natively "
                             "(auto: AVX512-BF16 or AMX; elsewhere it runs PyTorch's fallback kernels, about 25x "
                             "slower than fp32 without AVX-512), always (on) or never (off)")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per row")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs per row (at least 1)")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per row before it is reported failed")
    parser.add_argument("--out", default=None,
                        help="output folder (default: bench/results); with --replot, the PNG file to write or the "
                             "folder to write it into (default: beside the JSON)")
    parser.add_argument("--name", default=None,
                        help="file name stem of the outputs, replaced if they exist (default: device-backbone-"
                             "size-batch-dtype, with -2, -3, ... added where that run's files exist already)")
    parser.add_argument("--machine", default=None, help="free-text machine name written into the results")
    parser.add_argument("--note", default=None, help="free-text note written into the results")
    parser.add_argument("--max-size", type=int, default=None,
                        help="instead of timing: find, per variant, the largest size (up to this one) that runs "
                             "(on CUDA: fits in GPU memory), starting from --size; default cases: learner_forward")
    parser.add_argument("--memory-limit", type=float, default=None,
                        help="with --max-size: also count a run as not fitting when its peak extra memory "
                             "exceeds this many GiB (e.g. to emulate a smaller device)")
    parser.add_argument("--replot", default=None, metavar="RESULTS.json",
                        help="instead of measuring: redraw the PNG plot from an earlier run's JSON (beside it, "
                             "or where --out says)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--worker-mode", default=None, choices=["time", "measure", "peak"],
                        help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def _out_folder(args) -> Path:
    """``--out``: the folder the results are written to (default ``bench/results``)."""
    return Path(args.out) if args.out else HERE / "results"


def _unused_stem(out: Path, stem: str) -> str:
    """``stem``, or ``stem-2``, ``stem-3``, ... the first whose outputs do not exist in ``out``: a run without
    ``--name`` never replaces an earlier run's results (the committed ones among them); ``--name`` does."""
    candidate, number = stem, 1
    while any((out / f"{candidate}{suffix}").exists() for suffix in (".json", ".md", ".png")):
        number += 1
        candidate = f"{stem}-{number}"
    return candidate


def _replot_target(source: Path, out: str | None) -> Path:
    """Where ``--replot`` writes the plot of ``source``: beside it; with ``--out``, that file when it names a
    ``.png``, else into that folder under the JSON's stem."""
    if not out:
        return source.with_suffix(".png")
    target = Path(out)
    return target if target.suffix.lower() == ".png" else target / source.with_suffix(".png").name


def check_args(args) -> None:
    """Bad values named before any worker starts (they used to fail at the end, in the plot)."""
    from hypertriton.backbones import BACKBONES

    if args.backbone not in BACKBONES:
        raise SystemExit(f"--backbone: unknown backbone {args.backbone!r}; expected one of "
                         f"{', '.join(sorted(BACKBONES))}")
    for name, least in (("size", 1), ("batch", 1), ("repeats", 1), ("warmup", 1)):
        value = getattr(args, name)
        if value < least:
            raise SystemExit(f"--{name}: expected an integer >= {least}, got {value}")
    if args.threads is not None and args.threads < 1:
        raise SystemExit(f"--threads: expected an integer >= 1, got {args.threads}")
    if args.sweep:
        try:
            sizes = [int(size) for size in args.sweep.split(",")]
        except ValueError:
            raise SystemExit(f"--sweep: expected comma-separated integers, got {args.sweep!r}") from None
        if min(sizes) < 1:
            raise SystemExit(f"--sweep: expected sizes >= 1, got {args.sweep!r}")
    if args.device != "auto" and not re.fullmatch(r"cpu|cuda(:\d+)?", args.device):
        raise SystemExit(f"--device: expected cpu, cuda, cuda:N or auto, got {args.device!r}")


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker is not None:
        work = {"time": time_variants, "measure": measure_variant, "peak": gemm_peak}[args.worker_mode]
        print(RESULT_MARK + json.dumps(work(json.loads(args.worker))), flush=True)
        return 0
    if args.replot is not None:
        source = Path(args.replot)
        try:
            report = json.loads(source.read_text())
        except (OSError, ValueError) as error:
            raise SystemExit(f"--replot: cannot read {source}: {error}")
        if not report.get("rows"):
            raise SystemExit(f"--replot: {source} holds no timed rows (a --max-size search has nothing to plot)")
        target = _replot_target(source, args.out)
        try:
            plot(report, target)
        except ImportError:
            raise SystemExit("--replot: drawing needs matplotlib, which is not installed (pip install -e \".[bench]\")")
        print(f"wrote {target}")
        return 0

    import torch
    from tqdm import tqdm

    sys.path.insert(0, str(HERE))
    import cases

    check_args(args)
    if args.repeats < 3 and args.max_size is None:
        print(f"note: --repeats {args.repeats}: a median of so few runs is noise on a busy machine (one run has read "
              "0.95x where five read 3.2x); 5 or more for numbers to compare", file=sys.stderr)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"--device {device}: CUDA is not available on this machine")
    sizes = [int(s) for s in args.sweep.split(",")] if args.sweep else [args.size]
    backends = args.backend.split(",") if args.backend else available_backends(device)
    from hypertriton.backend import BACKENDS

    for name in backends:
        if name not in BACKENDS:
            raise SystemExit(f"--backend: unknown backend {name!r}; expected some of {', '.join(BACKENDS)}")
    default_cases = ["learner_forward"] if args.max_size else list(cases.CASES)
    chosen_cases = args.cases.split(",") if args.cases else default_cases
    for name in chosen_cases:
        if name not in cases.CASES:
            raise SystemExit(f"--cases: unknown case {name!r}; expected some of {', '.join(cases.CASES)}")
    masks = args.masks.split(",")
    for name in masks:
        if name not in cases.MASKS:
            raise SystemExit(f"--masks: unknown mask {name!r}; expected some of {', '.join(cases.MASKS)}")
    dtype = DTYPES[args.dtype]

    bf16 = {"auto": None, "on": True, "off": False}[args.bf16]
    bf16_skipped = cases.bf16_skip_reason(torch.device(device)) if bf16 is None else None
    groups = []  # one per (size, case, mask): timed together, then each variant measured alone
    known: set[str] = set()
    for size in sizes:
        for case in chosen_cases:
            for mask in masks:
                variants = [v for v in cases.variants_for(case, torch.device(device), backends, bf16)
                            if not args.variants or v in args.variants.split(",")]
                known.update(cases.variants_for(case, torch.device(device), backends, True))
                groups.append({"size": size, "case": case, "mask": mask, "variants": variants, "device": device,
                               "dtype": dtype, "backbone": args.backbone, "batch": args.batch,
                               "repeats": args.repeats, "warmup": args.warmup, "threads": args.threads,
                               "tf32": args.tf32})

    unknown = sorted(set(args.variants.split(",")) - known) if args.variants else []
    if unknown:
        raise SystemExit(f"--variants: {', '.join(map(repr, unknown))} is not a variant of these cases here; "
                         f"expected some of {', '.join(sorted(known))}")
    if args.threads:
        torch.set_num_threads(args.threads)
    _apply_tf32(args.tf32)
    info = machine_info(device)
    if bf16_skipped is not None:
        info["bf16_not_timed"] = bf16_skipped
    # Memory workers: large blocks always come from (and go back to) mmap, so a freed tensor's pages are
    # not silently reused and peak RSS sees every allocation. Timing workers keep the allocator's
    # defaults, as users run: forcing mmap there makes every large tensor fault in fresh pages, which
    # slows all variants (the original by about 1.3x on the 2-core VM) and the ones with many
    # medium-sized temporaries most (bf16 autocast by about 1.75x).
    memory_env = dict(os.environ)
    memory_env.setdefault("MALLOC_MMAP_THRESHOLD_", "131072")
    memory_env.setdefault("MALLOC_TRIM_THRESHOLD_", "131072")

    def launch(mode: str, job: dict) -> dict:
        env = memory_env if mode == "measure" else dict(os.environ)
        try:
            proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(job),
                                   "--worker-mode", mode], env=env, capture_output=True, text=True,
                                  timeout=args.timeout)
        except subprocess.TimeoutExpired:
            return {"error": f"timed out after {args.timeout:.0f} s"}
        lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT_MARK)]
        if proc.returncode != 0 or not lines:
            tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            return {"error": f"exit {proc.returncode}: {tail}"}
        return json.loads(lines[-1][len(RESULT_MARK):])

    if args.max_size is not None:
        return search_max_sizes(args, groups, info, launch, device, dtype)

    peak_dtypes = list(dict.fromkeys([dtype] + (["bfloat16"] if any(v.endswith("+bf16") for g in groups
                                                                   for v in g["variants"]) else [])))
    peaks = launch("peak", {"device": device, "threads": args.threads, "dtypes": peak_dtypes, "tf32": args.tf32})
    if "error" in peaks:
        print(f"GEMM peak not measured: {peaks['error']}", file=sys.stderr)
        peaks = {}
    info["gemm_peak_gflops"] = peaks

    out = _out_folder(args)
    stem = args.name or _unused_stem(out, f"{device.split(':')[0]}-{args.backbone}-size{'_'.join(map(str, sizes))}-"
                                          f"b{args.batch}-{dtype}")

    def write_report(rows: list[dict], groups_done: int) -> tuple[dict, str]:
        """JSON and markdown of the rows so far: rewritten after every group, so that an interrupted run
        (a time limit, Ctrl-C) keeps what it measured."""
        report = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  "machine": dict(info, load_average_end=os.getloadavg()), "backends": backends,
                  "args": {"backbone": args.backbone, "batch": args.batch, "dtype": dtype, "sizes": sizes,
                           "repeats": args.repeats, "warmup": args.warmup, "masks": masks, "cases": chosen_cases,
                           "machine": args.machine, "note": args.note},
                  "rows": summarize(rows, peaks, dtype)}
        if groups_done < len(groups):
            report["partial"] = f"{groups_done} of {len(groups)} (size, case, mask) groups measured so far"
        report["targets"] = targets(report)
        text = markdown(report)
        _write_results(out / stem, report, text)
        return report, text

    rows = []
    progress = tqdm(total=sum(len(g["variants"]) + 1 for g in groups), desc="bench", unit="run")
    for done, group in enumerate(groups):
        rows += measure_group(group, launch, progress,
                              on_update=lambda group_rows, done=done: write_report(rows + group_rows, done))
        if done + 1 < len(groups):
            write_report(rows, done + 1)
    progress.close()
    report, text = write_report(rows, len(groups))
    print(text)
    try:
        plot(report, out / f"{stem}.png")
        print(f"wrote {out / stem}.{{json,md,png}}")
    except ImportError:  # the plot is optional: the numbers are already on disk
        print(f"wrote {out / stem}.{{json,md}}; no plot: matplotlib is not installed (pip install -e \".[bench]\")")
    return 0


if __name__ == "__main__":
    sys.exit(main())
