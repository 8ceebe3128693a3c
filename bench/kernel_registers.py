"""Registers, spills and shared memory of every Triton kernel config, compiled for a Hopper GPU without one.

Each kernel's GPU autotune configs are compiled ahead of time for sm_90 (H100/H200) with Triton's
bundled ptxas, whose report gives the registers per thread, the bytes spilled to local memory and the
shared memory per program. A config that spills in its inner loop runs far below the GPU's rate, and
the autotuner only learns that on a GPU, by timing it; this finds it on any machine, so that the
configs are sound before a GPU session. Compile-only: it measures no speed.

    python bench/kernel_registers.py                  # the table, every kernel x variant x config
    python bench/kernel_registers.py --check          # exit 1 on a failed compile or a spilling config
    python bench/kernel_registers.py --out bench/results   # sm90-kernel-registers-triton<version>.{json,md}

Variants: fp32 operands with IEEE and with TF32 products, and bf16 operands, all with int32 indexing
(what every realistic shape runs), are held to ``--max-spill`` bytes of spill stores; an fp16 variant
with int64 indexing (offsets past 2^31: the 64-bit index math needs about twice the registers) is
compiled and reported, not held to it.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import datetime
import io
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

# The kernels must be compiled, not interpreted: the flag is read when they are imported.
os.environ.pop("TRITON_INTERPRET", None)

HERE = Path(__file__).resolve().parent
ARCH = 90
# (operand dtype, dot input precision, int64 indexing, held to the spill limit)
VARIANTS = [("fp32", "ieee", False, True), ("fp32", "tf32", False, True), ("bf16", "tf32", False, True),
            ("fp16", "tf32", True, False)]
# A few spilled registers (saved once, outside the inner loop) cost nothing measurable; hundreds of
# bytes mean spills inside it.
DEFAULT_MAX_SPILL = 64


def _kernels() -> dict:
    """name -> (autotuned kernel, extra constexprs, pointer arguments that are always fp32), covering every
    kernel of ``hypertriton.kernels.autotuned_kernels()``."""
    from hypertriton import kernels

    autotuned = kernels.autotuned_kernels()
    table = {
        "correlation": (autotuned["correlation"], {"HAS_ACTIVE": True}, ()),
        # One kernel, two sides of the backward: support blocks skipped one by one (query side, 1) or
        # the whole support tile (support side, 2).
        "correlation_grad/query": (autotuned["correlation_grad"], {"ACTIVE_SIDE": 1}, ()),
        "correlation_grad/support": (autotuned["correlation_grad"], {"ACTIVE_SIDE": 2}, ()),
        "center_pivot_conv4d": (autotuned["center_pivot_conv4d"], {"HAS_BQ": True, "HAS_BS": True}, ()),
        "center_pivot_conv4d_grad_input": (autotuned["center_pivot_conv4d_grad_input"], {}, ()),
        # Partial weight and bias gradients accumulate in fp32.
        "center_pivot_conv4d_grad_weight": (autotuned["center_pivot_conv4d_grad_weight"], {}, ("p_pw", "p_pb")),
        # HSNet's layer2-level first layer (5x5 support kernel, 16 outputs); its output is fp32.
        "fused_support_branch": (autotuned["fused_support_branch"],
                                 {"COUT": 16, "KS": 5, "BLOCK_T": 32, "BLOCK_O": 16}, ("p_out",)),
    }
    missing = {name for name, kernel in autotuned.items() if all(kernel is not row[0] for row in table.values())}
    if missing:
        raise RuntimeError(f"bench/kernel_registers.py does not know how to compile {sorted(missing)}")
    return table


def _ptxas():
    from triton.backends.nvidia.compiler import get_ptxas

    try:
        tool = get_ptxas(ARCH)
    except TypeError:  # older Triton: no arch argument
        tool = get_ptxas()
    return getattr(tool, "path", tool)


def _signature(fn, constexprs: dict, dtype: str, fp32_pointers) -> dict:
    signature = {}
    for name in fn.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in fp32_pointers:
            signature[name] = "*fp32"
        elif name in ("p_windows", "p_counts"):
            signature[name] = "*i32"
        elif name == "p_active":
            signature[name] = "*i8"
        elif name.startswith("p_"):
            signature[name] = "*" + dtype
        else:
            signature[name] = "i32"
    return signature


def _parse_ptxas_log(log: str) -> dict | None:
    registers = re.search(r"Used (\d+) registers", log)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    if registers is None or spills is None:
        return None
    return {"registers": int(registers.group(1)), "spill_stores": int(spills.group(1)),
            "spill_loads": int(spills.group(2))}


def _run_ptxas(ptx: str) -> dict:
    """ptxas's report on ``ptx``, for a Triton that cannot print its own (see :func:`compile_one`)."""
    with tempfile.TemporaryDirectory() as folder:
        source = Path(folder) / "kernel.ptx"
        source.write_text(ptx)
        result = subprocess.run([_ptxas(), "-v", "-lineinfo", f"--gpu-name=sm_{ARCH}a", str(source), "-o",
                                 str(Path(folder) / "kernel.cubin")], capture_output=True, text=True)
    report = _parse_ptxas_log(result.stderr)
    if result.returncode != 0 or report is None:
        raise RuntimeError(f"ptxas gave no report (exit {result.returncode}): {result.stderr[-2000:]}")
    return report


def compile_one(job: dict) -> dict:
    """Compile one (kernel, variant, config) for sm_90 and return its row (``error`` set on failure)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    autotuned, extra, fp32_pointers = _kernels()[job["kernel"]]
    config = autotuned.configs[job["config"]]
    fn = autotuned.fn
    # The fused kernel's fp32 product of correlations and weights: TF32 only with PyTorch's flag, off by default.
    weight_precision = job["precision"] if job["dtype"] == "fp32" else "ieee"
    constexprs = {**extra, "INPUT_PRECISION": job["precision"], "WEIGHT_PRECISION": weight_precision,
                  "INT64": job["int64"], **config.kwargs}
    constexprs = {name: value for name, value in constexprs.items() if name in fn.arg_names}
    row = {**job, "blocks": config.kwargs, "num_warps": config.num_warps, "num_stages": config.num_stages}
    # Triton prints ptxas's report as it compiles (its flags differ between versions), and only when
    # it compiles: the cache is bypassed.
    os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"
    os.environ["TRITON_ALWAYS_COMPILE"] = "1"
    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(ASTSource(fn, _signature(fn, constexprs, job["dtype"], fp32_pointers),
                                                constexprs=constexprs),
                                      target=GPUTarget("cuda", ARCH, 32),
                                      options={"num_warps": config.num_warps, "num_stages": config.num_stages})
        report = _parse_ptxas_log(log.getvalue()) or _run_ptxas(compiled.asm["ptx"])
        row.update(report, shared_bytes=int(compiled.metadata.shared))
    except Exception as error:  # noqa: BLE001 (reported per row; --check fails on it)
        row["error"] = f"{type(error).__name__}: {str(error)[:2000]}"
    return row


def jobs() -> list[dict]:
    return [{"kernel": name, "dtype": dtype, "precision": precision, "int64": int64, "held": held, "config": index}
            for name, (autotuned, _, _) in _kernels().items()
            for dtype, precision, int64, held in VARIANTS
            for index in range(len(autotuned.configs))]


def _variant(row: dict) -> str:
    return f"{row['dtype']}" + ("/ieee" if row["precision"] == "ieee" else "/tf32" if row["dtype"] == "fp32" else "") + (
        " int64" if row["int64"] else "")


def _config(row: dict) -> str:
    blocks = " ".join(f"{name.removeprefix('BLOCK_')}={value}" for name, value in row["blocks"].items())
    return f"{blocks} w{row['num_warps']} s{row['num_stages']}"


def over_limit(row: dict, max_spill: int) -> bool:
    return row["held"] and "error" not in row and row["spill_stores"] > max_spill


def markdown(report: dict) -> str:
    lines = [f"# Triton kernels compiled for sm_{ARCH} (compile-only, no GPU run)", "",
             f"{report['date']}; Triton {report['triton']}, {report['ptxas']}; spill limit for int32 "
             f"variants: {report['max_spill']} bytes of spill stores. Registers are per thread (255 is the "
             f"most a thread can have); shared memory per program.", "",
             "| kernel | variant | config | registers | spill stores / loads (bytes) | shared KiB |",
             "|---|---|---|---|---|---|"]
    for row in report["rows"]:
        if "error" in row:
            lines.append(f"| {row['kernel']} | {_variant(row)} | {_config(row)} | failed: {row['error'][:200]} | | |")
            continue
        mark = " **over**" if over_limit(row, report["max_spill"]) else ""
        lines.append(f"| {row['kernel']} | {_variant(row)} | {_config(row)} | {row['registers']} | "
                     f"{row['spill_stores']} / {row['spill_loads']}{mark} | {row['shared_bytes'] / 1024:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true",
                        help="exit 1 if a config fails to compile or an int32 variant spills over --max-spill")
    parser.add_argument("--max-spill", type=int, default=DEFAULT_MAX_SPILL, help="bytes of spill stores allowed")
    parser.add_argument("--kernels", default="", help="comma-separated kernel names (default: all)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="compiles in parallel")
    parser.add_argument("--out", type=Path, help="write <name>.json and <name>.md there")
    parser.add_argument("--name", help=f"file stem (default: sm{ARCH}-kernel-registers-triton<version>)")
    args = parser.parse_args(argv)

    import triton

    from hypertriton import kernels

    if kernels.INTERPRETED:
        parser.error("the kernels were imported under TRITON_INTERPRET; run this in a fresh process")
    todo = jobs()
    if args.kernels:
        wanted = set(args.kernels.split(","))
        unknown = wanted - {job["kernel"] for job in todo}
        if unknown:
            parser.error(f"--kernels: unknown {sorted(unknown)}; known: {sorted({job['kernel'] for job in todo})}")
        todo = [job for job in todo if job["kernel"] in wanted]
    ptxas_version = subprocess.run([_ptxas(), "--version"], capture_output=True, text=True).stdout.strip()
    ptxas_version = ptxas_version.splitlines()[-1] if ptxas_version else "ptxas (version unknown)"

    rows = []
    # Fresh interpreters (spawn): Triton's compiler state is not meant to be forked.
    context = __import__("multiprocessing").get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max(1, args.jobs), mp_context=context) as pool:
        for done, row in enumerate(pool.map(compile_one, todo), 1):
            rows.append(row)
            status = row.get("error", "")[:120] or (
                f"{row['registers']:3d} registers, spills {row['spill_stores']}/{row['spill_loads']} B, "
                f"{row['shared_bytes'] / 1024:.0f} KiB shared" + ("  OVER" if over_limit(row, args.max_spill) else ""))
            print(f"[{done}/{len(todo)}] {row['kernel']:32s} {_variant(row):12s} {_config(row):28s} {status}",
                  flush=True)

    report = {"date": datetime.date.today().isoformat(), "triton": triton.__version__, "ptxas": ptxas_version,
              "arch": f"sm_{ARCH}", "max_spill": args.max_spill, "rows": rows}
    if args.out:
        args.name = args.name or f"sm{ARCH}-kernel-registers-triton{triton.__version__}"
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"{args.name}.json").write_text(json.dumps(report, indent=1))
        (args.out / f"{args.name}.md").write_text(markdown(report))
    failed = [row for row in rows if "error" in row]
    over = [row for row in rows if over_limit(row, args.max_spill)]
    configs = len({(row["kernel"], row["config"]) for row in rows})
    print(f"compiled {len(rows) - len(failed)} of {len(rows)} (kernel, variant, config) for sm_{ARCH}: {configs} "
          f"configs; {len(failed)} failed; {len(over)} int32 variants over {args.max_spill} bytes of spills")
    for row in failed + over:
        print(f"  {'FAILED' if 'error' in row else 'SPILLS'} {row['kernel']} {_variant(row)} {_config(row)}: "
              f"{row.get('error') or str(row['spill_stores']) + ' bytes'}")
    return 1 if args.check and (failed or over) else 0


if __name__ == "__main__":
    sys.exit(main())
