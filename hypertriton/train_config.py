"""The settings of a training run (:class:`TrainConfig`), without importing torch: the command line
builds its parser from these defaults, and ``hypertriton --help`` should not wait for torch to load.
:mod:`hypertriton.training` re-exports everything here (its ``__all__`` includes this module's)."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

__all__ = ["BACKBONE_NAMES", "BENCHMARK_NAMES", "LR_SCHEDULES", "ORIGINAL_BSZ", "TRAJECTORY_FIELDS", "TrainConfig"]

# What the command line offers, without importing the modules that define them (torch, torchvision);
# tests check these against hypertriton.backbones.BACKBONES and hypertriton.data.BENCHMARKS.
BACKBONE_NAMES = ("resnet101", "resnet18", "resnet34", "resnet50", "vgg16")
BENCHMARK_NAMES = ("coco", "fss", "pascal", "synthetic")
LR_SCHEDULES = ("constant", "cosine")
# The original recipe's global batch: 40 episodes on COCO, 20 on the other benchmarks.
ORIGINAL_BSZ = {"coco": 40, "default": 20}

# Config fields that change the training trajectory: resuming with a different value cannot continue
# the same run.
TRAJECTORY_FIELDS = ("benchmark", "fold", "backbone", "bsz", "seed", "img_size", "nshot", "pretrained")


@dataclass
class TrainConfig:
    """Everything :func:`hypertriton.train` needs; the defaults are the original recipe.

    Attributes:
        benchmark: ``"pascal"``, ``"coco"``, ``"fss"`` or ``"synthetic"``.
        fold: cross-validation fold (PASCAL/COCO/synthetic 0..3; FSS-1000 0).
        backbone: ``"vgg16"``, ``"resnet50"``, ``"resnet101"`` (or the small ``"resnet18"``/``"resnet34"``).
        pretrained: start from ImageNet backbone weights (the original recipe). ``False`` keeps the
            random initialisation (tests, synthetic experiments).
        backbone_weights: path of a torchvision weights file for the backbone (offline machines;
            implies ``pretrained``).
        backend: op backend of the hypercorrelation and 4D convolutions (``None``: automatic).
        datapath: root folder of the datasets (original layouts).
        splits: folder with the original split files.
        logpath: output folder (checkpoints, logs); ``hypertriton train``'s default is
            ``logs/<benchmark>-fold<fold>-<backbone>``.
        epochs: total number of epochs (the run stops after epoch ``epochs - 1``).
        bsz: global batch size (episodes per optimizer step, summed over all ranks); None (the
            default): the original's for the benchmark, :data:`ORIGINAL_BSZ` (COCO 40, else 20).
        lr: Adam learning rate (the peak rate under ``lr_schedule="cosine"``).
        lr_schedule: ``"constant"`` (the original recipe) or ``"cosine"``: the rate falls from ``lr``
            to 0 along half a cosine over the run's ``epochs * steps_per_epoch`` optimizer steps. The
            rate is a function of the global step alone, so a resumed run follows the same schedule.
        nworker: data-loader worker processes per rank (``hypertriton train``'s default: the CPU count,
            at most 8).
        img_size: side of the square training/validation images.
        nshot: supports per episode: validation votes over all of them (the original's k-shot);
            training draws them but learns from the first, as the original trains 1-shot.
        amp: ``"off"``, ``"auto"`` (bf16 on CPUs with AVX512-BF16 or AMX, else off; bf16 on GPUs that
            support it, else fp16),
            ``"bf16"`` or ``"fp16"`` (GPU only, with gradient scaling).
        resume: path of a ``last.pt`` to continue from, ``"auto"`` for ``logpath/last.pt``, or ``None``.
        seed: seeds model initialisation, episode order and episode draws.
        max_steps_per_epoch: cap on optimizer steps per epoch (quick runs); ``None`` = full epochs.
        val_episodes: validation episodes per epoch (``None``: the whole validation split; 0: no
            validation, so no ``best_model.pt``). Fewer episodes than the split's classes leave some
            classes without one; ``val_miou`` still averages over all of them (those count 0, as the
            protocol's mean), which lowers it but not which epoch is best (the episodes are the same
            every epoch).
        val_bsz: validation batch size per process (``None``: the training batch per process, ``bsz``
            divided by the number of processes).
        log_every: write a ``step`` row to ``log.jsonl`` every this many optimizer steps.
        device: ``"cuda"``, ``"cpu"`` or ``None`` (CUDA when available).
        progress: show tqdm progress bars (rank 0 only).
        tensorboard: also log to TensorBoard when it is installed.
    """

    benchmark: str = "pascal"
    fold: int = 0
    backbone: str = "resnet101"
    pretrained: bool = True
    backbone_weights: str | None = None
    backend: str | None = None
    datapath: str | None = None
    splits: str | None = None
    logpath: str = "logs/train"
    epochs: int = 2000
    bsz: int | None = None
    lr: float = 1e-3
    lr_schedule: str = "constant"
    nworker: int = 0
    img_size: int = 400
    nshot: int = 1
    amp: str = "off"
    resume: str | None = None
    seed: int = 0
    max_steps_per_epoch: int | None = None
    val_episodes: int | None = None
    val_bsz: int | None = None
    log_every: int = 50
    device: str | None = None
    progress: bool = True
    tensorboard: bool = True

    def __post_init__(self) -> None:
        # At construction too, so an impossible value fails where it is made (names of backbones,
        # benchmarks and folds are checked when train() builds them).
        self.validate()

    def original_bsz(self) -> int:
        """The original recipe's global batch for this benchmark."""
        return ORIGINAL_BSZ.get(self.benchmark, ORIGINAL_BSZ["default"])

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first field with an impossible value (also run by :func:`hypertriton.train`,
        which sees any field changed after construction). ``bsz=None`` becomes :meth:`original_bsz`."""
        if self.bsz is None:
            self.bsz = self.original_bsz()
        positive = {"epochs": self.epochs, "bsz": self.bsz, "img_size": self.img_size, "nshot": self.nshot,
                    "log_every": self.log_every}
        for name, value in positive.items():
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: expected a positive integer, got {value!r}")
        if not (isinstance(self.lr, (int, float)) and not isinstance(self.lr, bool) and math.isfinite(self.lr)
                and self.lr > 0):
            raise ValueError(f"lr: expected a positive finite number, got {self.lr!r}")
        # Plain Python values: last.pt holds the config (and the optimizer the rate), and is read back with
        # weights_only=True, which refuses a numpy scalar (a np.float64 passes as a float above).
        self.lr = float(self.lr)
        for name in ("backbone_weights", "datapath", "splits", "logpath", "resume"):
            if isinstance(getattr(self, name), os.PathLike):
                setattr(self, name, os.fspath(getattr(self, name)))
        if not isinstance(self.seed, int) or not 0 <= self.seed < 2**64:
            raise ValueError(f"seed: expected an integer in [0, 2**64), got {self.seed!r}")
        if not isinstance(self.nworker, int) or self.nworker < 0:
            raise ValueError(f"nworker: expected an integer >= 0, got {self.nworker!r}")
        for name in ("max_steps_per_epoch", "val_bsz"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name}: expected a positive integer or None, got {value!r}")
        if self.val_episodes is not None and (not isinstance(self.val_episodes, int) or self.val_episodes < 0):
            raise ValueError(f"val_episodes: expected an integer >= 0 or None, got {self.val_episodes!r}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule: expected one of {LR_SCHEDULES}, got {self.lr_schedule!r}")
        if self.amp not in ("off", "auto", "bf16", "fp16"):
            raise ValueError(f"amp: expected one of 'off', 'auto', 'bf16', 'fp16', got {self.amp!r}")
        if self.backend is not None:  # (hypertriton.backend imports torch, which the parser need not wait for)
            from hypertriton.backend import check_backend_name

            try:
                check_backend_name(self.backend)
            except TypeError as error:  # this method promises ValueError for every field
                raise ValueError(str(error)) from None
