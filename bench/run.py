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
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
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
    lines.append("| size | case | mask | variant | median ms | p20 ms | p80 ms | speedup | paired (p20-p80) | peak MB "
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


def plot(report: dict, path: Path) -> None:
    """A PNG of the report: across sizes, median time and peak extra memory against size for the learner
    forward (one colour per variant, solid for the object mask, dashed for the full one); at one size,
    speedup and memory ratio over the original for every case, mask and variant."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in report["rows"] if "median_s" in r]
    sizes = sorted({r["size"] for r in rows})
    args = report["args"]
    title = f"{args['backbone']}, batch {args['batch']}, {args['dtype']}, {report['machine']['device']}"
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    colours = {v: plt.get_cmap("tab10")(i % 10) for i, v in enumerate(variants)}
    if len(sizes) > 1:
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        case = "learner_forward" if any(r["case"] == "learner_forward" for r in rows) else rows[0]["case"]
        for mask, style in (("object", "-"), ("full", "--")):
            for variant in variants:
                points = sorted((r["size"], r["median_s"], r.get("peak_bytes")) for r in rows
                                if (r["case"], r["mask"], r["variant"]) == (case, mask, variant))
                if not points:
                    continue
                xs, label = [p[0] for p in points], f"{variant} ({mask})"
                axes[0].plot(xs, [p[1] * 1e3 for p in points], style, marker="o", color=colours[variant], label=label)
                if all(p[2] is not None for p in points):
                    axes[1].plot(xs, [p[2] / 2**20 for p in points], style, marker="o", color=colours[variant],
                                 label=label)
        for ax, label in zip(axes, ("median time (ms)", "peak extra memory (MB)")):
            ax.set_xlabel("size (side of the finest feature map)")
            ax.set_ylabel(label)
            ax.set_yscale("log")
            ax.grid(True, alpha=0.3)
        axes[0].legend(fontsize=7)
        fig.suptitle(f"{case}: {title}")
    else:
        bars = [r for r in rows if r["variant"] != "original" and r.get("speedup")]
        # Room for the title and the two-line axis labels, then per bar.
        fig, axes = plt.subplots(1, 2, figsize=(12, 1.9 + 0.25 * max(len(bars), 1)), sharey=True)
        positions = list(range(len(bars)))[::-1]
        labels = [f"{r['case']} / {r['mask']} / {r['variant']}" for r in bars]
        for ax, key, name in zip(axes, ("speedup", "memory_ratio"), ("speedup over the original",
                                                                     "peak memory: original / row")):
            values = [r.get(key) or 0 for r in bars]
            ax.barh(positions, values, color=[colours[r["variant"]] for r in bars])
            spread = key == "speedup" and any(r.get("paired_speedup") for r in bars)
            for y, value, row in zip(positions, values, bars):
                if spread and row.get("paired_speedup"):
                    # How far the rounds agree: the paired ratios' p20-p80, the dot at their median.
                    ax.plot([row["paired_p20"], row["paired_p80"]], [y, y], color="black", linewidth=1)
                    ax.plot([row["paired_speedup"]], [y], "o", color="black", markersize=2)
                    value = max(value, row["paired_p80"])
                if value:
                    ax.text(value, y, f" {row.get(key) or 0:.2f}x", va="center", fontsize=6)
            ax.axvline(1.0, color="black", linewidth=0.8)
            ax.set_xscale("log")
            reach = values + [r["paired_p80"] for r in bars if spread and r.get("paired_speedup")]
            ax.set_xlim(right=max(reach + [1.0]) * 1.6)  # room for the value labels
            ax.xaxis.set_major_locator(matplotlib.ticker.LogLocator(base=2))
            ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}x"))
            ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
            ax.set_xlabel(f"{name} (log scale; 1x = same)" + ("\nbars: ratio of medians; whiskers: paired ratios, "
                                                               "p20-p80 and median" if spread else ""))
            ax.grid(True, axis="x", alpha=0.3)
        axes[0].set_yticks(positions)
        axes[0].set_yticklabels(labels, fontsize=7)
        fig.suptitle(f"size {sizes[0]}: {title}")
    fig.tight_layout()
    _atomic_write(path, lambda handle: fig.savefig(handle, format="png", dpi=110), binary=True)
    plt.close(fig)


def _write_results(stem: Path, report: dict, text: str) -> None:
    """``<stem>.json`` (the report) and ``<stem>.md`` (its table), each replaced atomically."""
    _atomic_write(stem.with_name(stem.name + ".json"), lambda handle: json.dump(report, handle, indent=1))
    _atomic_write(stem.with_name(stem.name + ".md"), lambda handle: handle.write(text))


def _atomic_write(path: Path, write, binary: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb" if binary else "w") as handle:
            write(handle)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def search_max_sizes(args, groups: list[dict], info: dict, launch, device: str, dtype: str) -> int:
    """``--max-size``: per (case, mask, variant), the largest size that runs (:func:`largest_fitting`), each
    try one fresh process running the case once after a warm-up; written as ``<name>-max-size.{json,md}``."""
    from tqdm import tqdm

    if args.max_size < args.size:
        raise SystemExit(f"--max-size: expected at least --size ({args.size}), got {args.max_size}")
    limit_bytes = None if args.memory_limit is None else args.memory_limit * 2**30
    progress = tqdm(desc="largest size", unit="try")
    found = []
    stem = args.name or f"{device.split(':')[0]}-{args.backbone}-b{args.batch}-{dtype}-max-size"
    out = Path(args.out)

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
                    errors[size], ok = f"peak {peak / 2**20:.1f} MB > limit {limit_bytes / 2**20:.1f} MB", False
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
              "| case | mask | variant | largest size | image px | peak MB there | first failure |",
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


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=50, help="side of the finest feature map (50 = 400 px)")
    parser.add_argument("--sweep", default=None, help="comma-separated sizes, e.g. 13,25,50,75,100 (overrides --size)")
    parser.add_argument("--backbone", default="resnet50", help="resnet50, resnet101 or vgg16 (feature shapes)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
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
    parser.add_argument("--out", default=str(HERE / "results"), help="output folder")
    parser.add_argument("--name", default=None, help="file name stem of the outputs")
    parser.add_argument("--machine", default=None, help="free-text machine name written into the results")
    parser.add_argument("--note", default=None, help="free-text note written into the results")
    parser.add_argument("--max-size", type=int, default=None,
                        help="instead of timing: find, per variant, the largest size (up to this one) that runs "
                             "(on CUDA: fits in GPU memory), starting from --size; default cases: learner_forward")
    parser.add_argument("--memory-limit", type=float, default=None,
                        help="with --max-size: also count a run as not fitting when its peak extra memory "
                             "exceeds this many GiB (e.g. to emulate a smaller device)")
    parser.add_argument("--replot", default=None, metavar="RESULTS.json",
                        help="instead of measuring: redraw the PNG plot (beside it) from an earlier run's JSON")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--worker-mode", default=None, choices=["time", "measure", "peak"],
                        help=argparse.SUPPRESS)
    return parser.parse_args(argv)


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
        try:
            plot(report, source.with_suffix(".png"))
        except ImportError:
            raise SystemExit("--replot: drawing needs matplotlib, which is not installed (pip install -e \".[bench]\")")
        print(f"wrote {source.with_suffix('.png')}")
        return 0

    import torch
    from tqdm import tqdm

    sys.path.insert(0, str(HERE))
    import cases

    check_args(args)
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

    stem = args.name or (f"{device.split(':')[0]}-{args.backbone}-size{'_'.join(map(str, sizes))}-b{args.batch}-"
                         f"{dtype}")
    out = Path(args.out)

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
