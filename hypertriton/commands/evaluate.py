"""``hypertriton evaluate``: mIoU and FB-IoU of a checkpoint on a benchmark's test episodes.

Prints a progress bar, then ``mIoU: xx.xx  FB-IoU: yy.yy``; ``--json FILE`` also writes the per-class
IoU (atomically). Under ``torchrun`` the episodes are split over the processes and the counts summed,
so the numbers are those of a single process. Ctrl-C stops after the current batch and prints the
result over the episodes evaluated so far, marked as such (no JSON); a second Ctrl-C stops at once.

Examples::

    hypertriton evaluate --benchmark pascal --fold 0 --nshot 1 --backbone resnet50 \\
        --load pascal_fold0_r50.pt --datapath /data --splits /data/splits --json result.json
    torchrun --nproc_per_node 4 -m hypertriton evaluate ... --visualize panels/
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from hypertriton._signals import StopRequest
from hypertriton.commands import print_error

__all__ = ["add_arguments", "run"]


def _class_name(dataset, class_id: int) -> str | None:
    """The dataset's name for ``class_id`` (None where its files give none: COCO)."""
    name_of = getattr(dataset, "class_name", None)
    return name_of(class_id) if callable(name_of) else None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--benchmark", required=True, choices=["pascal", "coco", "fss", "synthetic"])
    parser.add_argument("--fold", type=int, default=0, help="0..3 (ignored for fss; default: %(default)s)")
    parser.add_argument("--nshot", type=int, default=1, help="supports per episode (default: %(default)s)")
    parser.add_argument("--backbone", help="vgg16, resnet50, resnet101, ... (default: inferred from the checkpoint)")
    parser.add_argument("--load", required=True, metavar="CKPT", help="checkpoint (original or hypertriton format)")
    parser.add_argument("--datapath", metavar="DIR", help="data root holding VOC2012/, COCO2014/ or FSS-1000/")
    parser.add_argument("--splits", metavar="DIR", help="folder with the original split files (pascal/, coco/, fss/)")
    parser.add_argument("--split", default="test", choices=["test", "val"], help="episodes to evaluate: the "
                        "test split (the protocol's) or the validation split used while training (default: "
                        "%(default)s)")
    parser.add_argument("--img-size", type=int, help="side of the resized images, at least 64 (default: the "
                        "training size the checkpoint records, or the config.json that train wrote next to it, "
                        "else 400, the protocol's)")
    parser.add_argument("--use-original-imgsize", action="store_true",
                        help="score at each query image's original size (logits resized to it)")
    parser.add_argument("--visualize", metavar="DIR", help="write a PNG panel per episode: supports, query, "
                        "prediction, truth (each dimmed outside its mask, outlined in white) and errors (orange: "
                        "false positive, blue: missed), titled with episode, class, shots and IoU")
    parser.add_argument("--json", metavar="FILE", help="write the result with per-class IoU as JSON")
    parser.add_argument("--bsz", type=int, default=1, help="episodes per batch (default: %(default)s; must be 1 "
                        "with --use-original-imgsize)")
    parser.add_argument("--nworker", type=int, default=0, help="data-loader workers (default: %(default)s)")
    parser.add_argument("--max-episodes", type=int, metavar="N", help="only the first N episodes (a quick check, "
                        "not the protocol)")
    parser.add_argument("--device", help="cuda or cpu (default: cuda when available; cuda:LOCAL_RANK under torchrun)")
    parser.add_argument("--backend", help="hypertriton op backend (triton, torch, reference; default: automatic)")
    parser.add_argument("--amp", nargs="?", const="auto", default="off", choices=["off", "auto", "bf16", "fp16"],
                        help="reduced-precision inference under torch.autocast (bare --amp means auto, as in train): "
                        "bf16 (CPU or GPU), fp16 (GPU), "
                        "auto (bf16 where the hardware has it: CPUs with AVX512-BF16 or AMX, else fp32; GPUs: else "
                        "fp16) (default: %(default)s)")
    parser.add_argument("--lean", action="store_true", help="stream the squeeze blocks over query rows: about "
                        "half the learner's peak memory with large objects (little for small ones), about 2x its "
                        "time, same results (HSNet(lean=True))")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="hide the progress bar")


def _check_arguments(args: argparse.Namespace) -> None:
    """The values alone (the same verdict on every rank)."""
    from hypertriton.backend import check_backend_name
    from hypertriton.predict import MIN_IMG_SIZE

    for name in ("nshot", "bsz"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.img_size is not None and args.img_size < MIN_IMG_SIZE:
        raise ValueError(f"--img-size must be >= {MIN_IMG_SIZE} (the model's smallest supported input), got "
                         f"{args.img_size}")
    check_backend_name(args.backend, "--backend")
    if args.nworker < 0:
        raise ValueError(f"--nworker must be >= 0, got {args.nworker}")
    if args.max_episodes is not None and args.max_episodes < 1:
        raise ValueError(f"--max-episodes must be >= 1, got {args.max_episodes}")
    if args.use_original_imgsize and args.bsz != 1:
        raise ValueError(f"--use-original-imgsize needs --bsz 1 (query sizes differ), got --bsz {args.bsz}")
    if args.benchmark != "synthetic" and args.splits is None:
        raise ValueError(f"--splits is required for {args.benchmark}")


def _check_paths(args: argparse.Namespace) -> None:
    """The output paths, checked now: one that cannot be written must not cost the evaluation's result at
    the end (under torchrun each node sees its own file system, so the verdict may be one rank's)."""
    from hypertriton._io import check_writable
    from hypertriton.evaluation import check_no_earlier_panels

    if args.json:
        check_writable(args.json, "--json")
    if args.visualize:
        check_writable(args.visualize, "--visualize", folder=True)
        check_no_earlier_panels(args.visualize, "--visualize")


class _StopAfterBatch(StopRequest):
    def describe(self) -> str:
        return "stopping after the current batch"


def write_json_atomic(data: dict, path: str | os.PathLike) -> Path:
    """Write ``data`` as JSON to ``path`` via a temporary file renamed over it."""
    from hypertriton._io import atomic_file

    with atomic_file(path, "w") as handle:
        json.dump(data, handle, indent=2)
        handle.write("\n")
    return Path(path)


def run(args: argparse.Namespace) -> int:
    from hypertriton import distributed as hdist
    from hypertriton.backend import resolve_backend
    from hypertriton.data import build_dataset
    from hypertriton.evaluation import EvaluationStopped, evaluate, format_result
    from hypertriton.predict import load_model
    from hypertriton.training import _resolve_amp

    try:
        _check_arguments(args)
    except (ValueError, FileNotFoundError) as error:
        print_error("evaluate", error, same_on_every_rank=True)
        return 2
    try:
        _check_paths(args)
    except (ValueError, FileNotFoundError) as error:
        print_error("evaluate", error, same_on_every_rank=False)
        return 2
    try:
        ctx = hdist.init_distributed(args.device)
        try:  # here, not at the first episode after the model and data are loaded
            resolve_backend(args.backend, ctx.device)
        except RuntimeError as error:
            raise ValueError(f"--backend: {error}") from None
        amp = _resolve_amp(args.amp, ctx.device)
        model, checkpoint_img_size = load_model(args.load, args.backbone, backend=args.backend, device=ctx.device)
        model.lean = args.lean
        args.img_size = args.img_size or checkpoint_img_size
        dataset = build_dataset(args.benchmark, args.datapath, args.splits, args.fold, args.split, args.nshot,
                                img_size=args.img_size, use_original_imgsize=args.use_original_imgsize)
    except (ValueError, FileNotFoundError) as error:  # DatasetError, CheckpointError, InputError included
        print_error("evaluate", error, same_on_every_rank=False)
        hdist.cleanup_distributed()  # a process group joined before the error is left, not abandoned
        return 2
    from hypertriton.data import DatasetError

    episodes = min(len(dataset), args.max_episodes or len(dataset))
    try:
        if ctx.is_main:
            print(f"{args.benchmark} fold {args.fold} {args.nshot}-shot: {episodes} episodes at {args.img_size} px, "
                  f"{model.backbone_name} from {args.load}, {ctx.world_size} process(es) on {ctx.device}",
                  file=sys.stderr)
        try:
            with _StopAfterBatch(verbose=ctx.is_main) as stop:
                result = evaluate(model, dataset, args.nshot, ctx.device, progress=args.progress,
                                  visualize_dir=args.visualize, bsz=args.bsz, nworker=args.nworker,
                                  max_episodes=args.max_episodes, amp=amp, stop_requested=lambda: stop.requested)
        except EvaluationStopped as stop:
            if ctx.is_main:
                print(f"interrupted after {stop.partial['episodes']} of {episodes} episodes; the numbers below are "
                      f"over those only (not the protocol's){'; --json not written' if args.json else ''}",
                      file=sys.stderr)
                # Marked on stdout too, where a redirected result would otherwise look final.
                print(f"partial, interrupted after {stop.partial['episodes']} of {episodes} episodes: "
                      f"{format_result(stop.partial)}")
            return 130
        if ctx.is_main:
            print(format_result(result))  # first: the result is on screen whatever happens to the file
            if args.json:
                write_json_atomic({
                    "benchmark": args.benchmark, "fold": args.fold, "nshot": args.nshot, "split": args.split,
                    "backbone": model.backbone_name, "checkpoint": str(args.load), "img_size": args.img_size,
                    "use_original_imgsize": args.use_original_imgsize, "amp": args.amp, "episodes": result["episodes"],
                    "miou": result["miou"], "fb_iou": result["fb_iou"],
                    "per_class_iou": {str(c): v for c, v in result["per_class_iou"].items()},
                    "class_names": {str(c): _class_name(dataset, c) for c in result["per_class_iou"]},
                    "classes_evaluated": result["classes_evaluated"],
                    "miou_of_evaluated_classes": result["miou_of_evaluated_classes"],
                }, args.json)
    except DatasetError as error:
        print_error("evaluate", error, same_on_every_rank=False)
        return 2
    finally:
        hdist.cleanup_distributed()
    return 0
