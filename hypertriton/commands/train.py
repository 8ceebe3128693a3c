"""``hypertriton train``: train HSNet with the original recipe (one process, or many with torchrun).

Examples::

    hypertriton train --benchmark pascal --fold 0 --backbone resnet50 \\
        --datapath /data --splits /data/splits --logpath runs/pascal-f0-r50
    hypertriton train --logpath runs/pascal-f0-r50 --resume ...        # continue after a stop
    torchrun --nproc_per_node 4 -m hypertriton train --bsz 20 ...      # 4 GPUs, same global batch
"""

from __future__ import annotations

import argparse
import os
import sys

from hypertriton.commands import print_error
from hypertriton.train_config import BACKBONE_NAMES, BENCHMARK_NAMES, LR_SCHEDULES, ORIGINAL_BSZ, TrainConfig

__all__ = ["add_arguments", "run", "config_from_args"]

_DEFAULTS = TrainConfig()


def _int_at_least(text: str, least: int, what: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or value < least:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
    return value


def _positive_int(text: str) -> int:
    return _int_at_least(text, 1, "a positive integer")


def _non_negative_int(text: str) -> int:
    return _int_at_least(text, 0, "an integer >= 0")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--benchmark", default=_DEFAULTS.benchmark, choices=BENCHMARK_NAMES,
                        help="few-shot benchmark (default: %(default)s)")
    parser.add_argument("--fold", type=int, default=_DEFAULTS.fold, help="fold whose classes are held out "
                        "(default: %(default)s)")
    parser.add_argument("--backbone", default=_DEFAULTS.backbone, choices=BACKBONE_NAMES,
                        help="frozen feature extractor (default: %(default)s)")
    parser.add_argument("--no-pretrained", dest="pretrained", action="store_false",
                        help="keep the backbone's random initialisation instead of ImageNet weights")
    parser.add_argument("--backbone-weights", metavar="FILE", help="torchvision ImageNet weights file for the "
                        "backbone (default: torch hub's cache, downloaded if missing)")
    parser.add_argument("--backend", help="hypertriton op backend (triton, torch, reference; default: automatic)")
    parser.add_argument("--datapath", metavar="DIR", help="data root holding VOC2012/, COCO2014/ or FSS-1000/ "
                        "(required for pascal, coco and fss)")
    parser.add_argument("--splits", metavar="DIR", help="folder with the original split files (pascal/, coco/, "
                        "fss/; required for pascal, coco and fss)")
    parser.add_argument("--logpath", metavar="DIR", help="output folder for checkpoints and logs "
                        "(default: logs/<benchmark>-fold<fold>-<backbone>)")
    parser.add_argument("--epochs", type=_positive_int, default=_DEFAULTS.epochs,
                        help="total epochs (default: %(default)s, as the original)")
    parser.add_argument("--bsz", type=_positive_int,
                        help="global batch size, split over the torchrun processes (default: the original's, "
                        f"{ORIGINAL_BSZ['coco']} for coco, {ORIGINAL_BSZ['default']} otherwise)")
    parser.add_argument("--lr", type=float, default=_DEFAULTS.lr, help="Adam learning rate (default: %(default)s)")
    parser.add_argument("--lr-schedule", default=_DEFAULTS.lr_schedule, choices=LR_SCHEDULES,
                        help="constant (the original) or cosine decay to 0 over the run (default: %(default)s)")
    parser.add_argument("--nworker", type=_non_negative_int, default=min(8, os.cpu_count() or 1),
                        help="data-loader workers per process (default: %(default)s)")
    parser.add_argument("--img-size", type=_positive_int, default=_DEFAULTS.img_size,
                        help="side of the resized square images (default: %(default)s)")
    parser.add_argument("--nshot", type=_positive_int, default=_DEFAULTS.nshot,
                        help="shots per episode (default: %(default)s, as the original)")
    parser.add_argument("--amp", nargs="?", const="auto", default="off", choices=["off", "auto", "bf16", "fp16"],
                        help="mixed precision; bare --amp means auto: bf16 on CPUs with AVX512-BF16 or AMX (else "
                             "fp32), bf16 or fp16 on GPU")
    parser.add_argument("--resume", nargs="?", const="auto", metavar="CKPT",
                        help="continue a stopped run from CKPT (bare --resume: <logpath>/last.pt)")
    parser.add_argument("--seed", type=int, default=_DEFAULTS.seed, help="seed (default: %(default)s)")
    parser.add_argument("--max-steps-per-epoch", type=_positive_int, help="cap optimizer steps per epoch "
                        "(quick runs)")
    parser.add_argument("--val-episodes", type=_non_negative_int,
                        help="validation episodes per epoch (default: the whole val split; 0: no validation)")
    parser.add_argument("--val-bsz", type=_positive_int,
                        help="validation batch size per process (default: --bsz over the processes)")
    parser.add_argument("--log-every", type=_positive_int, default=_DEFAULTS.log_every,
                        help="write the step loss to log.jsonl every N steps (default: %(default)s)")
    parser.add_argument("--device", help="cuda or cpu (default: cuda when available; cuda:LOCAL_RANK "
                        "under torchrun)")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="hide progress bars")


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The :class:`TrainConfig` the parsed command line describes."""
    logpath = args.logpath or os.path.join("logs", f"{args.benchmark}-fold{args.fold}-{args.backbone}")
    return TrainConfig(
        benchmark=args.benchmark, fold=args.fold, backbone=args.backbone, pretrained=args.pretrained,
        backbone_weights=args.backbone_weights, backend=args.backend,
        datapath=args.datapath, splits=args.splits, logpath=logpath, epochs=args.epochs,
        bsz=args.bsz,
        lr=args.lr, lr_schedule=args.lr_schedule, nworker=args.nworker, img_size=args.img_size, nshot=args.nshot, amp=args.amp,
        resume=args.resume, seed=args.seed, max_steps_per_epoch=args.max_steps_per_epoch,
        val_episodes=args.val_episodes, val_bsz=args.val_bsz, log_every=args.log_every, device=args.device,
        progress=args.progress)


def run(args: argparse.Namespace) -> int:
    from hypertriton.backbones import WeightsUnavailableError
    from hypertriton.distributed import env_ranks
    from hypertriton.training import LAST_CHECKPOINT, train

    try:
        config = config_from_args(args)
    except ValueError as error:  # TrainConfig checks its values when built
        print_error("train", error, same_on_every_rank=True)
        return 2
    if config.benchmark != "synthetic" and (config.datapath is None or config.splits is None):
        print_error("train", f"--datapath and --splits are required for --benchmark {config.benchmark}",
                    same_on_every_rank=True)
        return 2
    is_main = env_ranks()[0] == 0
    try:
        summary = train(config)
    except KeyboardInterrupt:
        if is_main:
            print(f"interrupted; continue with --resume (state in {config.logpath}/{LAST_CHECKPOINT} "
                  "if it was saved)", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, WeightsUnavailableError) as error:
        print_error("train", error, same_on_every_rank=False)
        return 2
    if is_main:
        best = summary["best_miou"]
        best_text = (f"best mIoU {best:.2f} (epoch {summary['best_epoch']})" if best is not None
                     else "no epoch validated yet" if summary["interrupted"] else "no validation")
        print(f"{summary['epochs_completed']} epochs, {summary['global_step']} steps, {best_text}; "
              f"checkpoints in {config.logpath}")
        if summary["interrupted"]:
            print(f"stopped early; continue with: hypertriton train ... --logpath {config.logpath} --resume",
                  file=sys.stderr)
    return 130 if summary["interrupted"] else 0
