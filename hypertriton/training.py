"""Train HSNet with the original recipe, on one process or many (``torchrun`` + DDP).

The defaults are the original recipe: 1-shot episodes, Adam with a constant learning rate of 1e-3, a
batch of 20 episodes (40 for COCO), cross-entropy over {background, foreground} averaged over the query
pixels, and the checkpoint kept by best validation mIoU. Only the 4D learner and decoder train; the backbone is
frozen.

Files in ``logpath`` (written by rank 0 only, each checkpoint atomically: temp file + ``os.replace``):

- ``best_model.pt``: the best model by validation mIoU, in the original checkpoint format (a
  ``module.``-prefixed state_dict) that :meth:`hypertriton.HSNet.from_checkpoint` and the original code
  load.
- ``last.pt``: everything needed to continue exactly (the trained weights, optimizer, AMP scaler, epoch,
  step within the epoch, best mIoU, python/numpy/torch/cuda RNG states; the frozen backbone is rebuilt
  on resume and checked against a SHA-256 fingerprint instead of being stored). It is rewritten at the
  end of every epoch's training (before its validation, which a resume from there runs again), after
  the validation, and when the run is stopped (Ctrl-C or SIGTERM: the current step finishes, or a
  validation stops at once, on every rank before the same batch; ``last.pt`` is saved, then the run
  exits; a second Ctrl-C stops at once). A new run refuses a ``logpath`` that holds ``last.pt`` or ``best_model.pt``.
- ``log.jsonl``: one JSON object per line, ``event`` = ``start``/``resume``, ``step`` (``loss``: the
  step's mean over all ranks), ``epoch`` (``train_loss``, ``train_miou``, ``train_fbiou``, ``val_miou``,
  ``val_fbiou``, ``best_miou``), ``best``, ``stop``, ``end``; ``config.json``; TensorBoard scalars
  under ``tensorboard/`` when ``tensorboard`` is installed (skipped silently otherwise). After a crash
  (no clean stop) a resumed run repeats the steps since the last save: ``log.jsonl`` then holds their
  rows twice, the later ones after the ``resume`` row; TensorBoard drops the earlier ones.

Exact resume: every training episode is drawn under its own seed, a function of ``(seed, epoch,
episode index)`` only, and the epoch's episode order is a function of ``(seed, epoch)``. A run resumed
from ``last.pt`` therefore sees the same batches in the same order as an uninterrupted run, whatever
the number of data-loader workers, and ends with the same parameters (on a GPU, up to the run-to-run
nondeterminism of some CUDA kernels, which two uninterrupted runs show too).

Distributed: ``bsz`` is the global batch, split evenly over the ranks (so ``--bsz 20`` is the original
recipe on any number of GPUs: DDP averages the per-rank gradients of equal-sized shards). Where the world
size does not divide the epoch's episodes, the sampler evens the shards by repeating up to ``W - 1`` of
them in the epoch's last step; the repeats count for nothing there (loss weight 0, and not in the
training mIoU), so that step too equals the single-process one. Validation
is sharded over the ranks by :func:`hypertriton.evaluation.evaluate`, whose all-reduced counts equal a
single-process evaluation.

Example::

    from hypertriton.training import TrainConfig, train
    summary = train(TrainConfig(benchmark="synthetic", backbone="resnet18", pretrained=False,
                                img_size=96, epochs=2, bsz=8, max_steps_per_epoch=20, val_episodes=48,
                                logpath="runs/demo"))  # a minute on a CPU; full epochs: hours
    print(summary["best_miou"])
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
import math
import os
import random
import time
import traceback
import warnings
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Callable, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from hypertriton import distributed as hdist
from hypertriton.backend import reduced_precision_slow_reason, resolve_backend, warn_if_reduced_precision_slow
from hypertriton._io import (atomic_file, atomic_save, check_writable, load_error_summary, load_on_cpu,
                             remove_stale_temporaries)
from hypertriton._pickle_guard import UnsafeFileError
from hypertriton._signals import (StopRequest, ignore_stop_signals_in_worker, refuse_while_a_spawned_process_imports,
                                  start_loader, stop_loader_workers)
from hypertriton.checkpoint import TRAIN_STATE_FORMAT
from hypertriton.evaluation import EvaluationStopped, evaluate
from hypertriton.model import foreground
from hypertriton.train_config import (  # noqa: F401  (part of this module's API)
    BACKBONE_NAMES, BENCHMARK_NAMES, LR_SCHEDULES, ORIGINAL_BSZ, TRAJECTORY_FIELDS, TrainConfig)

__all__ = [
    "BACKBONE_NAMES",
    "BENCHMARK_NAMES",
    "LR_SCHEDULES",
    "ORIGINAL_BSZ",
    "TRAJECTORY_FIELDS",
    "TrainConfig",
    "EpisodeSampler",
    "SeededEpisodes",
    "atomic_save",
    "compute_loss",
    "episode_seed",
    "load_training_state",
    "train",
    "training_step",
    "scheduled_lr",
    "backbone_fingerprint",
]

LAST_CHECKPOINT = "last.pt"
BEST_CHECKPOINT = "best_model.pt"
LOG_FILE = "log.jsonl"
STATE_FORMAT = TRAIN_STATE_FORMAT
STATE_VERSION = 1


def scheduled_lr(lr: float, schedule: str, step: int, total_steps: int) -> float:
    """Learning rate of optimizer step ``step`` (0-based) of ``total_steps``: ``lr`` throughout for
    ``"constant"``; for ``"cosine"``, ``lr * (1 + cos(pi * step / total_steps)) / 2`` (``lr`` at step 0,
    near 0 at the last step)."""
    if schedule == "constant":
        return lr
    if schedule != "cosine":
        raise ValueError(f"schedule: expected one of {LR_SCHEDULES}, got {schedule!r}")
    progress = min(max(step, 0), total_steps) / max(total_steps, 1)
    return 0.5 * lr * (1.0 + math.cos(math.pi * progress))


# --------------------------------------------------------------------------------------------------
# Files


class _RunLog:
    """JSON lines (and TensorBoard scalars when available); silent on ranks other than 0."""

    def __init__(self, logdir: Path, enabled: bool, tensorboard: bool, resumed_at: int | None = None):
        self.enabled = enabled
        self._file = None
        self._tb = None
        if not enabled:
            return
        logdir.mkdir(parents=True, exist_ok=True)
        self._file = open(logdir / LOG_FILE, "a", encoding="utf-8")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard not installed: JSON lines only
                SummaryWriter = None
            if SummaryWriter is not None:
                # A run resumed after a crash repeats the steps since its last save: TensorBoard drops the
                # earlier copies of those (steps >= purge_step) instead of drawing both.
                self._tb = SummaryWriter(log_dir=str(logdir / "tensorboard"), purge_step=resumed_at)

    def write(self, event: str, **fields) -> None:
        if not self.enabled:
            return
        row = {"event": event, "time": round(time.time(), 3), **fields}
        self._file.write(json.dumps(row) + "\n")
        # Flushed per row so a killed run keeps its log up to its last step.
        self._file.flush()

    def scalars(self, step: int, values: Mapping[str, float | None]) -> None:
        """TensorBoard scalars at ``step``; a ``None`` (no validation this epoch) is left out."""
        if self._tb is None:
            return
        for name, value in values.items():
            if value is not None:
                self._tb.add_scalar(name, value, step)
        self._tb.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        if self._tb is not None:
            self._tb.close()


# --------------------------------------------------------------------------------------------------
# Randomness


def _rng_state() -> dict:
    """The global RNG streams as tensors and plain Python values (loadable with ``weights_only=True``)."""
    name, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    state = {"python": random.getstate(),
             "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)},
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    python = state["python"]
    random.setstate((python[0], tuple(python[1]), python[2]))
    numpy = state["numpy"]
    np.random.set_state((numpy["name"], numpy["keys"].numpy().astype(np.uint32), numpy["pos"],
                         numpy["has_gauss"], numpy["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"][: torch.cuda.device_count()])


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@contextmanager
def _isolated_rng():
    """Run a block (validation) without moving the global RNG streams of the training run."""
    state = _rng_state()
    try:
        yield
    finally:
        _set_rng_state(state)


def episode_seed(seed: int, epoch: int, index: int) -> int:
    """The seed a training episode is drawn under: a hash of ``(seed, epoch, index)``, in ``[0, 2**63)``.

    Keying by the episode index (not its position in a batch or a rank) makes an episode's support draw
    independent of the loader's workers, the number of ranks and where a run was resumed.
    """
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(2, np.uint32).view(np.uint64)[0]
               >> np.uint64(1))


class SeededEpisodes(Dataset):
    """Wrap a dataset so that item ``(index, seed)`` is ``dataset[index]`` drawn under ``seed``.

    The original datasets draw supports from the global ``random``/``numpy``/``torch`` streams; this
    wrapper seeds those streams for the one call and then restores them, so the draw depends on the
    seed alone.
    """

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]):
        index, seed = key
        state = (random.getstate(), np.random.get_state(), torch.get_rng_state())
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.default_generator.manual_seed(seed)  # the CPU stream only: torch.manual_seed reseeds every GPU too
        try:
            return self.dataset[index]
        finally:
            random.setstate(state[0])
            np.random.set_state(state[1])
            torch.set_rng_state(state[2])


class EpisodeSampler(DistributedSampler):
    """:class:`~torch.utils.data.DistributedSampler` that yields ``(index, episode_seed)`` pairs and can
    skip the episodes a resumed run has already trained on.

    Works without a process group (pass ``num_replicas=1, rank=0``). The epoch order is the
    DistributedSampler's (a permutation seeded by ``seed + epoch``), sharded ``rank::num_replicas``.
    """

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int, seed: int):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=False)
        self.start = 0

    def set_start(self, start: int) -> None:
        """Skip this rank's first ``start`` episodes of the epoch (the steps already trained)."""
        self.start = int(start)

    def __iter__(self):
        for position, index in enumerate(super().__iter__()):
            if position >= self.start:
                yield index, episode_seed(self.seed, self.epoch, index)

    def __len__(self) -> int:
        return max(super().__len__() - self.start, 0)


# --------------------------------------------------------------------------------------------------
# One step


# What a training batch must hold (a collated dataset item each): see train()'s train_dataset.
TRAINING_KEYS = ("query_img", "query_mask", "support_imgs", "support_masks")


def compute_loss(logits: torch.Tensor, query_mask: torch.Tensor,
                 episode_weights: torch.Tensor | None = None) -> torch.Tensor:
    """The original loss: cross-entropy over {background, foreground}, mean over all query pixels.

    ``episode_weights`` ``[B]``: instead, the sum over episodes of each one's weight times its mean over
    its pixels (under torchrun, the last step of an epoch gives the sampler's repeated padding episodes
    weight 0).

    Shape:
        logits ``[B, 2, H, W]``; query_mask ``[B, H, W]`` with values in {0, 1} (PASCAL boundary pixels
        are background here, as in the original: no ignore index). Returns a 0-dim float32 tensor.
    """
    _check_logits_and_mask(logits, query_mask)
    if episode_weights is None:
        return F.cross_entropy(logits.float(), query_mask.long())
    per_episode = F.cross_entropy(logits.float(), query_mask.long(), reduction="none").flatten(1).mean(dim=1)
    return (per_episode * episode_weights.to(per_episode)).sum()


def _check_logits_and_mask(logits: torch.Tensor, query_mask: torch.Tensor) -> None:
    if logits.dim() != 4 or logits.shape[1] != 2:
        raise ValueError(f"logits: expected shape [B, 2, H, W], got {tuple(logits.shape)}")
    if query_mask.shape != (logits.shape[0], *logits.shape[2:]):
        raise ValueError(f"query_mask: expected shape {(logits.shape[0], *logits.shape[2:])} to match "
                         f"logits {tuple(logits.shape)}, got {tuple(query_mask.shape)}")
    # Any other value would be truncated to a class silently (0.6 -> background) or fail inside
    # cross_entropy (255).
    if query_mask.dtype != torch.bool and bool(((query_mask != 0) & (query_mask != 1)).any()):
        values = torch.unique(query_mask)
        raise ValueError(f"query_mask: expected values 0 (background) and 1 (object) only, found "
                         f"{values[:6].tolist()}{' ...' if values.numel() > 6 else ''}; a 0/255 mask needs "
                         "(mask > 0), a soft one thresholding")


def _own_loss(loss_fn, logits: torch.Tensor, query_mask: torch.Tensor,
              episode_weights: torch.Tensor | None) -> torch.Tensor:
    """A caller's per-episode loss, reduced as :func:`compute_loss` reduces the original's: given the same
    checked inputs (float32 logits, also under autocast; a 0/1 mask)."""
    _check_logits_and_mask(logits, query_mask)
    per_episode = loss_fn(logits.float(), query_mask)
    if not isinstance(per_episode, torch.Tensor) or per_episode.shape != (logits.shape[0],):
        got = list(per_episode.shape) if isinstance(per_episode, torch.Tensor) else type(per_episode).__name__
        raise ValueError(f"loss_fn: expected each episode's loss, a tensor [B] = [{logits.shape[0]}], got {got}")
    per_episode = per_episode.float()
    if episode_weights is None:
        return per_episode.mean()
    return (per_episode * episode_weights.to(per_episode)).sum()


def _autocast(device: torch.device, amp_dtype: torch.dtype | None):
    if amp_dtype is None:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=amp_dtype)


def training_step(model: torch.nn.Module, batch: dict, optimizer: torch.optim.Optimizer,
                  scaler: torch.amp.GradScaler | None = None, amp_dtype: torch.dtype | None = None,
                  meter=None, episode_weights: torch.Tensor | None = None,
                  loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None) -> float:
    """One optimizer step on a batch of 1-shot episodes; returns the loss (a Python float).

    ``batch`` holds ``query_img`` ``[B, 3, H, W]``, ``query_mask`` ``[B, H, W]``, ``support_imgs``
    ``[B, K, 3, H, W]`` and ``support_masks`` ``[B, K, H, W]`` on the model's device; the first shot is
    used, as in the original training. With a :class:`~hypertriton.metrics.SegmentationMeter`, the
    argmax prediction of this step is counted into it (the original's training mIoU/FB-IoU).
    ``episode_weights`` ``[B]``: see :func:`compute_loss`; episodes of weight 0 are not counted either.
    ``loss_fn(logits, query_mask) -> [B]``: each episode's loss instead of the original's cross-entropy
    (see :func:`train`); averaged over the batch, or weighted by ``episode_weights``.
    """
    missing = [key for key in TRAINING_KEYS if key not in batch]
    if missing:
        raise ValueError(f"batch: missing {missing}; a training batch holds {list(TRAINING_KEYS)} (see train's "
                         f"train_dataset), got keys {sorted(batch)}")
    for key, layout in (("support_imgs", "[B, K, 3, H, W]"), ("support_masks", "[B, K, H, W]")):
        value = batch[key]
        if not isinstance(value, torch.Tensor) or value.dim() != layout.count(",") + 1:
            got = list(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise ValueError(f"batch['{key}']: expected {layout} (a dataset item holds K shots, "
                             f"{layout.replace('B, ', '')}, even for K = 1), got {got}")
    device = batch["query_img"].device
    optimizer.zero_grad(set_to_none=True)
    with _autocast(device, amp_dtype):
        logits = model(batch["query_img"], batch["support_imgs"][:, 0], batch["support_masks"][:, 0])
    loss = (compute_loss(logits, batch["query_mask"], episode_weights) if loss_fn is None
            else _own_loss(loss_fn, logits, batch["query_mask"], episode_weights))
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        optimizer.step()
    if meter is not None:
        prediction = foreground(logits.detach())
        if episode_weights is not None and not bool((episode_weights != 0).all()):
            keep = (episode_weights != 0).to(prediction.device)
            prediction, batch = prediction[keep], _select_episodes(batch, keep)
        meter.update(prediction, batch)
    return float(loss.detach())


def _select_episodes(batch: dict, keep: torch.Tensor) -> dict:
    """The episodes of ``batch`` flagged in ``keep`` ``[B]`` (entries without a batch dim kept whole)."""
    count = keep.shape[0]
    return {key: value[keep.to(value.device)] if isinstance(value, torch.Tensor) and value.dim() > 0
            and value.shape[0] == count else value for key, value in batch.items()}


def _padding_episode_weights(rank: int, world_size: int, dataset_size: int, first: int,
                            size: int) -> torch.Tensor | None:
    """Per-episode loss weights ``[size]`` of a rank's batch whose episodes hold positions
    ``first .. first+size-1`` of its :class:`EpisodeSampler` shard, or None when every rank's batch at
    this step is made of real episodes (the plain mean loss then holds).

    With a dataset size that the world size does not divide, DistributedSampler pads the epoch by
    repeating its first episodes (shard position ``i`` of rank ``r`` is padded position ``r + W*i``; those
    past the dataset's size are repeats), all in the last step. Repeats get weight 0 and the others
    ``W / (real episodes of the step over all ranks)``: DDP's average over the ranks then gives each real
    episode of the step the same weight, as one process would."""
    start, stop = world_size * first, world_size * (first + size)
    if stop <= dataset_size:
        return None
    real_in_step = max(min(dataset_size, stop) - start, 0)
    positions = rank + world_size * torch.arange(first, first + size)
    real = positions < dataset_size
    return real.double() * (world_size / real_in_step) if real_in_step else real.double()


def _to_device(batch: dict, device: torch.device) -> dict:
    non_blocking = device.type == "cuda"
    return {key: value.to(device, non_blocking=non_blocking) if torch.is_tensor(value) else value
            for key, value in batch.items()}


def _resolve_amp(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of ``amp`` on ``device`` (None: fp32). ``"auto"`` picks a reduced precision only
    where the hardware computes it (:func:`hypertriton.backend.reduced_precision_slow_reason`): bf16 on
    CPUs with AVX512-BF16 or AMX, else fp32 (on an AVX2-only CPU bf16 runs about 25x slower); bf16 on GPUs
    that have it, else fp16. An explicit ``"bf16"`` where it is slow runs as asked, with a warning."""
    if amp == "off":
        return None
    if device.type == "cpu":
        if amp == "fp16":
            raise ValueError("amp='fp16' needs a CUDA device; use amp='bf16' (or 'auto') on CPU")
        if amp == "auto":
            return torch.bfloat16 if reduced_precision_slow_reason(torch.bfloat16, device) is None else None
        warn_if_reduced_precision_slow(torch.bfloat16, device, "amp='bf16'")
        return torch.bfloat16
    if amp == "auto":
        return torch.bfloat16 if reduced_precision_slow_reason(torch.bfloat16, device) is None else torch.float16
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    warn_if_reduced_precision_slow(dtype, device, f"amp={amp!r}")
    return dtype


# --------------------------------------------------------------------------------------------------
# Stop requests (Ctrl-C / SIGTERM)


class _StopNow(BaseException):
    """Raised by the first SIGINT/SIGTERM inside :meth:`_StopRequest.validation` on one process (a
    BaseException, so that no ``except Exception`` in the interrupted code takes it)."""


class _StopRequest(StopRequest):
    """First SIGINT/SIGTERM asks the loop to stop after the current step, or the validation at once (it
    changes nothing a resume needs); a second Ctrl-C interrupts."""

    def __init__(self, verbose: bool):
        super().__init__(verbose)
        self._validating = False
        self._raise_now = False

    @contextmanager
    def validation(self, raise_now: bool):
        """A validation: the first signal raises :class:`_StopNow` in it when ``raise_now`` (one process);
        else the validation itself must look at :attr:`requested` (torchrun: the ranks stop together)."""
        previous = self._validating, self._raise_now
        self._validating, self._raise_now = True, raise_now
        try:
            yield
        finally:
            self._validating, self._raise_now = previous

    def describe(self) -> str:
        doing = "stopping the validation (it reruns on --resume)" if self._validating else "finishing the current step"
        return f"{doing} and saving {LAST_CHECKPOINT}"

    def on_first_signal(self) -> None:
        if self._raise_now:
            raise _StopNow


# --------------------------------------------------------------------------------------------------
# Building blocks (model, data, validation) -- replaceable through train()'s keyword arguments


def _build_model(config: TrainConfig) -> torch.nn.Module:
    from hypertriton.model import HSNet

    return HSNet(backbone=config.backbone, pretrained=config.pretrained, backend=config.backend,
                 backbone_weights=config.backbone_weights)


def _build_dataset(config: TrainConfig, split: str, nshot: int) -> Dataset:
    from hypertriton.data import build_dataset

    return build_dataset(config.benchmark, config.datapath, config.splits, config.fold, split, nshot,
                         img_size=config.img_size, use_original_imgsize=False)


def _validate(model: torch.nn.Module, dataset: Dataset, config: TrainConfig, device: torch.device,
              show_progress: bool, stop_requested=None) -> dict[str, float]:
    # evaluate() shards the episodes over the ranks and all-reduces the counts itself; with
    # stop_requested it raises EvaluationStopped on every rank once any rank is asked to stop.
    result = evaluate(model, dataset, nshot=config.nshot, device=device, progress=show_progress,
                      bsz=config.val_bsz or max(config.bsz // hdist.get_world_size(), 1), nworker=config.nworker,
                      max_episodes=config.val_episodes,
                      stop_requested=stop_requested)
    return {"miou": float(result["miou"]), "fbiou": float(result["fb_iou"])}


def load_training_state(path: str | os.PathLike) -> dict:
    """Read a ``last.pt`` written by :func:`train` (on the CPU) and check its format."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"resume: no training state at {path}")
    try:
        state = load_on_cpu(path)
    except UnsafeFileError as error:
        raise ValueError(f"resume: {error}") from None
    except Exception as error:  # unpickling, zip and EOF errors all mean "not a training state"
        raise ValueError(f"resume: {path} is not a readable training state ({load_error_summary(error)})") from error
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise ValueError(f"resume: {path} is not a hypertriton training state (expected a {LAST_CHECKPOINT} "
                         f"written by 'hypertriton train'; {BEST_CHECKPOINT} holds weights only)")
    if state.get("version") != STATE_VERSION:
        raise ValueError(f"resume: {path} has state version {state.get('version')!r}, expected {STATE_VERSION}")
    return state


FROZEN_PREFIX = "backbone."


def _trainable_state(model: torch.nn.Module, built_buffers: dict[str, torch.Tensor] | None = None
                     ) -> dict[str, torch.Tensor]:
    """What training changes (CPU copies): everything but the backbone, and of the backbone what moved
    from its build: parameters that train (a model fine-tuning part of it) and buffers that differ from
    ``built_buffers`` (the batch-norm statistics of a backbone left in training mode). HSNet's own frozen
    backbone adds nothing; these were silently dropped, and a resumed run went on from the built ones."""
    training = {name for name, parameter in model.named_parameters() if parameter.requires_grad}
    state = {}
    for key, value in model.state_dict().items():
        if key.startswith(FROZEN_PREFIX) and key not in training:
            built = (built_buffers or {}).get(key)
            if built is None or torch.equal(built, value.detach().cpu()):
                continue
        state[key] = value.detach().cpu().clone()
    return state


def _backbone_buffers(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """CPU copies of the backbone's buffers (batch-norm statistics), to tell later which ones moved."""
    buffers = {name for name, _ in model.named_buffers()}
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()
            if k.startswith(FROZEN_PREFIX) and k in buffers}


def backbone_fingerprint(model: torch.nn.Module) -> str:
    """SHA-256 of the frozen backbone's names, shapes, dtypes and values.

    ``last.pt`` stores this instead of the backbone itself (ResNet-101: 170 MB per save): a resumed run
    rebuilds the backbone from the same settings, and the fingerprint proves it did; what training moved
    in it (a model that fine-tunes part of it) is saved beside (:func:`_trainable_state`).
    """
    digest = hashlib.sha256()
    for key, value in model.state_dict().items():
        if key.startswith(FROZEN_PREFIX):
            value = value.detach().cpu().contiguous()
            digest.update(f"{key}:{tuple(value.shape)}:{value.dtype};".encode())
            digest.update(value.view(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def _load_trainable_state(model: torch.nn.Module, state: dict, path) -> None:
    if state.get("backbone_sha256") != backbone_fingerprint(model):
        raise ValueError(f"resume: the backbone differs from the one {path} was trained with (other "
                         "--backbone-weights or ImageNet weights file?); resume with the same weights. (For a model "
                         "that trains its backbone: a last.pt that an older hypertriton, from before last.pt kept the "
                         "trained backbone, resumed and saved holds the wrong fingerprint and cannot be resumed.)")
    missing, unexpected = model.load_state_dict(state["model"], strict=False)
    missing = [key for key in missing if not key.startswith(FROZEN_PREFIX)]
    if missing or unexpected:
        raise ValueError(f"resume: {path} does not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}")


# --------------------------------------------------------------------------------------------------
# The loop


def _train_meter(dataset: Dataset, counts: dict | None = None):
    """A meter over the training classes (``dataset.class_ids``), or None for datasets without them;
    ``counts`` restores a partly counted epoch."""
    from hypertriton.metrics import SegmentationMeter

    class_ids = getattr(dataset, "class_ids", None)
    if class_ids is None:
        return None
    meter = SegmentationMeter(class_ids)
    if counts is not None:
        meter.intersection, meter.union = counts["intersection"].clone(), counts["union"].clone()
        meter.episodes = counts["episodes"]
        if "class_episodes" in counts:  # older training states lack it
            meter.class_episodes = counts["class_episodes"].clone()
    return meter


def _check_resume_config(saved: dict, config: TrainConfig, world_size: int, warn: bool = True) -> None:
    """Refuse a resume whose settings change the run's trajectory; warn (when ``warn``: rank 0 under
    torchrun, so that each warning shows once) about settings that change its outcome only."""
    def note(message: str) -> None:
        if warn:
            warnings.warn(message, stacklevel=5)  # at the call of train()

    changed = [name for name in TRAJECTORY_FIELDS if saved.get(name) != getattr(config, name)]
    if changed:
        details = ", ".join(f"{name}: {saved.get(name)!r} -> {getattr(config, name)!r}" for name in changed)
        raise ValueError(f"resume: the run was started with different settings ({details}); "
                         "resume with the original values or start a new run")
    for name in ("lr", "lr_schedule", "amp", "max_steps_per_epoch"):
        if saved.get(name) != getattr(config, name):
            note(f"resume: {name} changed from {saved.get(name)!r} to {getattr(config, name)!r}; "
                 "the continued run will differ from an uninterrupted one")
    if "cosine" in (saved.get("lr_schedule"), config.lr_schedule) and saved.get("epochs") != config.epochs:
        note(f"resume: epochs changed from {saved.get('epochs')!r} to {config.epochs!r}; the cosine "
             "schedule now spans the new length, so the learning rate jumps where the run resumes")
    if saved.get("val_episodes") != config.val_episodes:
        note(f"resume: val_episodes changed from {saved.get('val_episodes')!r} to {config.val_episodes!r}; the "
             "best mIoU so far was measured on other episodes, so best_model.pt is chosen by comparing scores "
             "over different sets")
    if saved.get("world_size", world_size) != world_size:
        note(f"resume: the run used {saved.get('world_size')} processes, now {world_size}; the "
             "episodes are the same but float rounding in gradient averaging differs")


def train(config: TrainConfig, *, model: torch.nn.Module | None = None, train_dataset: Dataset | None = None,
          val_dataset: Dataset | None = None, on_step: Callable[[dict], None] | None = None,
          validate_fn: Callable[..., dict] | None = None,
          loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None) -> dict:
    """Train HSNet; returns a summary dict.

    Args:
        config: the run's settings (see :class:`TrainConfig`).
        model: an HSNet to train instead of the one ``config`` describes (``backbone``, ``pretrained``,
            ``backbone_weights``, ``backend``); its weights are replaced by the saved ones when resuming.
            Any module will do that has ``forward(query_img, support_img, support_mask)`` returning
            logits ``[B, 2, H, W]`` at the query mask's size (cross-entropy is taken over them), and,
            for the default validation, ``predict_mask_nshot(batch, nshot)`` (as :func:`evaluate`);
            a frozen part under the ``backbone.`` prefix is saved in ``last.pt`` only where it changed.
        train_dataset, val_dataset: datasets instead of ``hypertriton.data.build_dataset(...)``
            (``config.img_size`` then does not apply: the items come at the dataset's size). Items are
            dicts as the original datasets return them (:class:`hypertriton.data.FewShotDataset`):
            training needs ``query_img`` float ``[3, H, W]`` (ImageNet-normalized), ``query_mask``
            ``[H, W]`` of 0 and 1, ``support_imgs`` ``[K, 3, H, W]`` and ``support_masks`` ``[K, H, W]``
            (K >= 1, with the K axis), plus ``class_id`` (an int) when the dataset has a ``class_ids``
            attribute (the classes the training mIoU averages over). Validation needs ``class_id`` in
            every item and ``class_ids`` on the dataset.
        on_step: called on every rank after every optimizer step with ``{"epoch", "step",
            "global_step", "loss"}`` (``step`` counts the epoch's steps done, from 1).
        validate_fn: ``validate_fn(model, dataset, config, device, show_progress) -> {"miou", "fbiou"}``
            instead of :func:`hypertriton.evaluation.evaluate`. Ctrl-C stops a validation at once: on one
            process always; under torchrun where ``validate_fn`` takes a ``stop_requested`` keyword (a
            callable to pass on to ``evaluate(stop_requested=...)``, as the default one does), else it
            runs to its end there.
        loss_fn: ``loss_fn(logits [B, 2, H, W], query_mask [B, H, W]) -> [B]``, each episode's loss,
            instead of the original's cross-entropy (:func:`compute_loss`), given float32 logits (also
            under autocast) and a mask checked to hold 0 and 1; the step takes their mean
            (under torchrun the sampler's padding episodes weigh 0). Not saved: pass it again to resume.

    Returns:
        ``{"epochs_completed", "global_step", "best_miou", "best_epoch", "train_loss" (last epoch's
        mean), "val" (last validation, or None), "interrupted", "logpath"}``.

    Under torchrun (``WORLD_SIZE`` set) the process group is joined here and left at the end if this
    call created it. The global random generators (Python's ``random``, NumPy's, torch's) are seeded
    from ``config.seed`` (or restored from ``last.pt`` when resuming) and left as training leaves them.
    """
    refuse_while_a_spawned_process_imports("train()")
    config.validate()
    for name, value in (("loss_fn", loss_fn), ("validate_fn", validate_fn), ("on_step", on_step)):
        if value is not None and not callable(value):
            raise TypeError(f"{name}: expected a callable or None, got {type(value).__name__}")
    created_group = not hdist.is_distributed()
    ctx = hdist.init_distributed(config.device)
    try:
        result = _train(config, ctx, model, train_dataset, val_dataset, on_step, validate_fn or _validate, loss_fn)
    except KeyboardInterrupt:
        # A second Ctrl-C means now: the process exits anyway, and the teardown below is where a gloo run
        # can hang (a test's two-process run did, once in 240 s).
        raise
    except BaseException as error:
        if created_group:
            # The traceback's frames hold the DDP model, whose reducer would then outlive the group's
            # registration and drop its last reference while this thread holds the GIL: gloo's worker thread,
            # still releasing the last collective's tensor, needs the GIL, and the process hangs (seen under
            # load with gdb). Freed first, the group goes with its registration instead.
            traceback.clear_frames(error.__traceback__)
            hdist.cleanup_distributed()
        raise
    if created_group:
        hdist.cleanup_distributed()
    return result


def _train(config: TrainConfig, ctx: hdist.DistributedContext, model, train_dataset, val_dataset, on_step,
           validate_fn, loss_fn=None) -> dict:
    from tqdm.auto import tqdm

    from hypertriton.checkpoint import save_checkpoint

    device = ctx.device
    logdir = Path(config.logpath)
    if config.bsz % ctx.world_size:
        raise ValueError(f"bsz: the global batch ({config.bsz}) must divide evenly over the "
                         f"{ctx.world_size} processes")
    rank_bsz = config.bsz // ctx.world_size
    amp_dtype = _resolve_amp(config.amp, device)
    show = config.progress and ctx.is_main
    try:  # here, not at the first forward: before any file is written or data read
        resolve_backend(config.backend if model is None else getattr(model, "backend", None), device)
    except RuntimeError as error:
        raise ValueError(f"backend: {error}") from None

    check_writable(logdir, "logpath", folder=True)
    resume_path = None
    if config.resume is not None:
        resume_path = logdir / LAST_CHECKPOINT if config.resume == "auto" else Path(config.resume)
    else:
        earlier = [name for name in (LAST_CHECKPOINT, BEST_CHECKPOINT) if (logdir / name).exists()]
        if earlier:  # a new run would replace them (and append to the old run's log)
            raise ValueError(f"logpath: {str(logdir)!r} holds an earlier run ({', '.join(earlier)}); continue it "
                             "with --resume (resume='auto'), or choose another logpath, or delete those files "
                             "to start over")
    if config.resume == "auto" and not resume_path.exists() and (logdir / LOG_FILE).exists():
        raise FileNotFoundError(f"resume: no training state at {resume_path}: the run logged in {str(logdir)!r} "
                                "ended before its first save; start it again without resume")
    state = load_training_state(resume_path) if resume_path is not None else None
    if state is not None:
        _check_resume_config(state["config"], config, ctx.world_size, warn=ctx.is_main)

    # The data first: a wrong datapath or splits folder is said before a backbone's ImageNet weights are
    # fetched (100+ MB). Building a dataset draws nothing from the global generators (each has its own).
    own_data, own_model = train_dataset is not None, model is not None
    if train_dataset is None:
        train_dataset = _build_dataset(config, "trn", config.nshot)
    if config.val_episodes == 0:
        val_dataset = None
    elif val_dataset is None:
        val_dataset = _build_dataset(config, "val", config.nshot)
    # Every rank builds the same initial model (DDP would broadcast rank 0's anyway).
    _seed_everything(config.seed)
    if model is None:
        model = _build_model(config)
    model = model.to(device)
    val_count = 0 if val_dataset is None else min(len(val_dataset), config.val_episodes or len(val_dataset))

    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("model: no parameter requires a gradient; nothing to train")
    validates = val_dataset is not None and validate_fn is _validate
    if validates and not callable(getattr(model, "predict_mask_nshot", None)):
        # (it failed at the first validation, after an epoch of training)
        raise TypeError(f"model: the default validation calls model.predict_mask_nshot(batch, nshot), which "
                        f"{type(model).__name__} lacks; define it (see hypertriton.evaluate), pass validate_fn, "
                        "or set val_episodes=0")
    optimizer = torch.optim.Adam(params, lr=config.lr)
    scaler = torch.amp.GradScaler(device.type) if amp_dtype == torch.float16 else None

    start_epoch, start_step, global_step = 0, 0, 0
    best_miou, best_epoch = float("-inf"), None
    loss_sum, loss_count, train_counts = 0.0, 0, None
    # The backbone as built (a resumed run's saved changes to it are loaded below): what last.pt's
    # fingerprint proves and what its changed entries are told from.
    backbone_sha256 = backbone_fingerprint(model) if ctx.is_main else None
    built_buffers = _backbone_buffers(model) if ctx.is_main else None
    if state is not None:
        _load_trainable_state(model, state, resume_path)
        optimizer.load_state_dict(state["optimizer"])
        for group in optimizer.param_groups:
            group["lr"] = config.lr
        if scaler is not None and state.get("scaler") is not None:
            scaler.load_state_dict(state["scaler"])
        start_epoch, start_step, global_step = state["epoch"], state["step"], state["global_step"]
        best_miou, best_epoch = state["best_miou"], state["best_epoch"]
        # Totals over all ranks so far in the epoch, which every rank carries on from.
        loss_sum, loss_count = state["loss_sum"], state["loss_count"]
        train_counts = state["train_counts"]
        _set_rng_state(state["rng"])

    train_model = model
    if ctx.is_distributed:
        # Only the frozen backbone has buffers; they are equal on every rank after DDP's initial sync, so
        # re-broadcasting them before every forward would be wasted traffic.
        sync_kwarg = ("forward_sync_buffers" if "forward_sync_buffers" in
                      inspect.signature(torch.nn.parallel.DistributedDataParallel).parameters else "broadcast_buffers")
        train_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None, **{sync_kwarg: False})

    sampler = EpisodeSampler(train_dataset, ctx.world_size, ctx.rank, config.seed)
    loader = DataLoader(SeededEpisodes(train_dataset), batch_size=rank_bsz, sampler=sampler,
                        num_workers=config.nworker, pin_memory=device.type == "cuda",
                        worker_init_fn=ignore_stop_signals_in_worker if config.nworker else None,
                        persistent_workers=config.nworker > 0)
    full_steps = math.ceil(math.ceil(len(train_dataset) / ctx.world_size) / rank_bsz)
    steps_per_epoch = min(full_steps, config.max_steps_per_epoch or full_steps)
    total_steps = config.epochs * steps_per_epoch

    if ctx.is_main:
        # What a writer killed mid-save left (a best_model.pt's temporary is the whole model, and is otherwise
        # removed only by the next best, which may never come; last.pt's go at its first save).
        for name in (BEST_CHECKPOINT, "config.json"):
            remove_stale_temporaries(logdir / name)
    log = _RunLog(logdir, ctx.is_main, config.tensorboard, resumed_at=global_step if state is not None else None)
    try:  # (the loop's own try closes it from there on)
        if ctx.is_main:
            recorded = dataclasses.asdict(config)
            if own_data:  # the items come at the dataset's own size (None: unknown), which predict reads here
                recorded["img_size"] = getattr(train_dataset, "img_size", None)
            if own_model:  # config's backbone field then describes nothing that ran: say what did
                recorded["model"] = f"{type(model).__module__}.{type(model).__qualname__}"
                recorded["backbone"] = getattr(model, "backbone_name", None)
            with atomic_file(logdir / "config.json", "w") as handle:
                json.dump(recorded, handle, indent=2)
        log.write("resume" if state is not None else "start", epoch=start_epoch, step=start_step,
                  global_step=global_step, world_size=ctx.world_size, device=str(device),
                  steps_per_epoch=steps_per_epoch, train_episodes=len(train_dataset), val_episodes=val_count,
                  amp=str(amp_dtype).replace("torch.", "") if amp_dtype else "off")
    except BaseException:
        log.close()
        raise

    def save_last() -> None:
        if not ctx.is_main:
            return
        atomic_save({"format": STATE_FORMAT, "version": STATE_VERSION,
                     "model": _trainable_state(model, built_buffers), "backbone_sha256": backbone_sha256,
                     "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict() if scaler else None,
                     "epoch": epoch, "step": step, "global_step": global_step,
                     "best_miou": best_miou, "best_epoch": best_epoch,
                     "loss_sum": loss_sum, "loss_count": loss_count, "rng": _rng_state(),
                     "train_counts": None if meter is None else {
                         "intersection": meter.intersection, "union": meter.union,
                         "class_episodes": meter.class_episodes, "episodes": meter.episodes},
                     "config": {**dataclasses.asdict(config), "world_size": ctx.world_size}},
                    logdir / LAST_CHECKPOINT)

    stop = _StopRequest(verbose=ctx.is_main)
    try:
        takes_stop_request = "stop_requested" in inspect.signature(validate_fn).parameters
    except (TypeError, ValueError):  # a callable without a signature (a builtin): called as documented
        takes_stop_request = False
    stop.install()
    stopping = False
    last_val, epoch_loss, meter = None, None, None
    epoch, step = start_epoch, start_step
    # False only while an optimizer step is under way (model and optimizer then hold half an update).
    consistent, uncounted = True, None
    try:
        while epoch < config.epochs and not stopping:
            sampler.set_epoch(epoch)
            sampler.set_start(step * rank_bsz)
            model.train()  # HSNet keeps its frozen backbone in eval mode
            meter = _train_meter(train_dataset, train_counts)
            train_counts = None
            bar = tqdm(total=steps_per_epoch, initial=step, desc=f"epoch {epoch}", disable=not show,
                       dynamic_ncols=True, leave=False)
            for batch in (start_loader(loader) if step < steps_per_epoch else ()):
                batch = _to_device(batch, device)
                for group in optimizer.param_groups:
                    group["lr"] = scheduled_lr(config.lr, config.lr_schedule, global_step, total_steps)
                # Under torchrun each rank counts its own batch, summed over the ranks with the loss below:
                # the epoch's meter then holds every rank's episodes at every step, which last.pt keeps
                # even when a second Ctrl-C leaves no time for a collective.
                step_meter = _train_meter(train_dataset) if meter is not None and ctx.is_distributed else meter
                size = batch["query_img"].shape[0]
                weights = _padding_episode_weights(ctx.rank, ctx.world_size, len(train_dataset), step * rank_bsz, size)
                consistent = False
                loss = training_step(train_model, batch, optimizer, scaler, amp_dtype, step_meter,
                                     episode_weights=None if weights is None else weights.to(device),
                                     loss_fn=loss_fn)
                step += 1
                global_step += 1
                if weights is not None:  # this rank's loss sum and count over its real episodes
                    real = int((weights != 0).sum())
                    loss, size = (loss / float(weights.max()) / real if real else 0.0), real
                # This rank's share of the step's loss, until the all-reduce below counts every rank's: a second
                # Ctrl-C in between saves the step with it (the whole loss on one process).
                uncounted = (loss * size, size)
                consistent = True
                # One collective per step: the batch's loss (and counts) summed over ranks, and whether any
                # rank was asked to stop (all ranks must leave the loop after the same step, or DDP deadlocks).
                payload = torch.tensor([loss * size, size, float(stop.requested)], dtype=torch.float64)
                if step_meter is not meter:
                    payload = torch.cat([payload, step_meter.counts_vector()])
                totals = hdist.all_reduce_sum(payload)
                if step_meter is not meter:
                    meter.add_counts_vector(totals[3:])
                loss = float(totals[0] / totals[1])
                loss_sum, loss_count, uncounted = loss_sum + float(totals[0]), loss_count + int(totals[1]), None
                stopping = bool(totals[2] > 0)
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}")
                if global_step % config.log_every == 0:
                    log.write("step", epoch=epoch, step=step, global_step=global_step, loss=loss)
                    log.scalars(global_step, {"train/step_loss": loss})
                if on_step is not None:
                    on_step({"epoch": epoch, "step": step, "global_step": global_step, "loss": loss})
                if stopping or step >= steps_per_epoch:
                    break
            bar.close()
            # A request that came during the epoch's last step must not wait for a whole validation.
            stopping = stopping or hdist.any_rank(stop.requested, device)
            if stopping:
                save_last()
                log.write("stop", epoch=epoch, step=step, global_step=global_step, reason="signal",
                          checkpoint=LAST_CHECKPOINT)
                break

            epoch_loss = loss_sum / max(loss_count, 1)
            if val_dataset is not None:
                # The epoch's training is kept before a validation that may take minutes (PASCAL) and
                # may not finish: from this state --resume runs the validation again. torchrun gives its
                # workers 30 s after Ctrl-C before it kills them.
                save_last()
                model.eval()
                try:
                    # A stop request ends the validation at once: on one process the signal handler raises
                    # _StopNow; under torchrun the validation asks every rank before each batch
                    # (a rank cannot leave alone: the counts are summed over the ranks at the end).
                    # A validate_fn of one's own that takes no stop_requested runs to its end there.
                    extra = {"stop_requested": lambda: stop.requested} if takes_stop_request else {}
                    with stop.validation(raise_now=not ctx.is_distributed), _isolated_rng(), torch.no_grad():
                        last_val = validate_fn(model, val_dataset, config, device, show, **extra)
                except (_StopNow, EvaluationStopped):  # last.pt holds this state already (saved above)
                    log.write("stop", epoch=epoch, step=step, global_step=global_step, reason="signal",
                              during="validation", checkpoint=LAST_CHECKPOINT)
                    stopping = True
                    break
                if last_val["miou"] > best_miou:
                    # The new best counts only once its file is written: a second Ctrl-C during the write
                    # must leave last.pt with the old best, so that --resume's rerun of this validation
                    # writes it again.
                    if ctx.is_main:
                        save_checkpoint(model, logdir / BEST_CHECKPOINT)  # atomic, original format
                    best_miou, best_epoch = float(last_val["miou"]), epoch  # a validate_fn's np.float64 too
                    log.write("best", epoch=epoch, miou=best_miou, checkpoint=BEST_CHECKPOINT)
            row = {"train_loss": epoch_loss, "train_miou": meter.miou() if meter else None,
                   "train_fbiou": meter.fb_iou() if meter else None,
                   "val_miou": last_val["miou"] if last_val else None,
                   "val_fbiou": last_val["fbiou"] if last_val else None,
                   "best_miou": best_miou if best_epoch is not None else None}
            log.write("epoch", epoch=epoch, global_step=global_step, lr=optimizer.param_groups[0]["lr"], **row)
            log.scalars(epoch, {"train/loss": epoch_loss, "train/miou": row["train_miou"],
                                "train/fbiou": row["train_fbiou"], "val/miou": row["val_miou"],
                                "val/fbiou": row["val_fbiou"]})
            if show:
                val_text = f", val mIoU {row['val_miou']:.2f} FB-IoU {row['val_fbiou']:.2f}" if last_val else ""
                tqdm.write(f"epoch {epoch}: loss {epoch_loss:.4f}{val_text}")
            epoch, step, loss_sum, loss_count, meter = epoch + 1, 0, 0.0, 0, None
            save_last()
        summary = {"epochs_completed": epoch, "global_step": global_step,
                   "best_miou": best_miou if best_epoch is not None else None, "best_epoch": best_epoch,
                   "train_loss": epoch_loss, "val": last_val, "interrupted": stopping, "logpath": str(logdir)}
        log.write("end", **{k: v for k, v in summary.items() if k != "logpath"})
    except KeyboardInterrupt:
        # A second Ctrl-C: no collective is safe any more; rank 0 keeps what it has if it is whole.
        if consistent:
            if uncounted is not None:
                loss_sum, loss_count = loss_sum + uncounted[0], loss_count + uncounted[1]
            save_last()
            log.write("stop", epoch=epoch, step=step, global_step=global_step, reason="interrupt",
                      checkpoint=LAST_CHECKPOINT)
        raise
    finally:
        stop.restore()
        stop_loader_workers(loader)  # see there: they ignore SIGTERM, so they are told to stop
        log.close()  # on any error too (the log file, TensorBoard's writer thread)

    hdist.barrier()
    return summary
