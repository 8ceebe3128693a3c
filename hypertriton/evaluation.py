"""Evaluate a few-shot segmentation model on a benchmark's episodes: mIoU, FB-IoU, per-class IoU.

Runs the original test loop: every episode in order, ``model.predict_mask_nshot(batch, nshot)``, bg/fg
intersections and unions accumulated per class (:mod:`hypertriton.metrics`). Under ``torchrun`` (an
initialized process group) rank ``r`` of ``n`` evaluates episodes ``r, r + n, r + 2n, ...`` (no padding,
so no episode counts twice) and the counts are all-reduced, so every rank returns the numbers a single
process would.

Example::

    >>> from hypertriton.data import build_dataset
    >>> from hypertriton.evaluation import evaluate
    >>> ds = build_dataset("fss", "/data", "splits", fold=0, split="test", nshot=1)          # doctest: +SKIP
    >>> evaluate(model, ds, nshot=1, device="cuda")["miou"]                                   # doctest: +SKIP
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Callable, Iterator, Mapping, Protocol

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm.auto import tqdm

from . import distributed as hdist
from . import visualize
from ._io import atomic_file
from ._signals import (ignore_stop_signals_in_worker, refuse_while_a_spawned_process_imports, start_loader,
                       stop_loader_workers)
from .data.common import IMAGENET_MEAN, IMAGENET_STD, resize_mask
from .metrics import SegmentationMeter

__all__ = ["EpisodePredictor", "EvaluationStopped", "ShardSampler", "evaluate", "format_result", "panel_tiles",
           "render_panel", "check_no_earlier_panels"]


class EvaluationStopped(Exception):
    """:func:`evaluate` stopped before its last batch because ``stop_requested`` said so (on some rank).

    ``partial`` holds the result over the episodes evaluated before the stop (on every rank), in the
    format :func:`evaluate` returns: a run cut short, not the protocol's numbers.
    """

    def __init__(self, partial: dict):
        super().__init__(f"evaluation stopped on request after {partial['episodes']} episodes")
        self.partial = partial


class ShardSampler(Sampler[int]):
    """Indices ``rank, rank + world_size, ...`` of ``range(length)``: a partition of the episodes with no
    padding duplicates (ranks may get one episode fewer than others)."""

    def __init__(self, length: int, rank: int = 0, world_size: int = 1):
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"expected 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        self.length, self.rank, self.world_size = int(length), int(rank), int(world_size)

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.length, self.world_size))

    def __len__(self) -> int:
        return len(range(self.rank, self.length, self.world_size))


def _to_device(batch: Mapping, device: torch.device, original_size: bool) -> dict:
    # The model resizes its logits to ``org_query_imsize`` whenever the batch has it; the datasets always
    # carry it (as the original does), so it is passed on only when scoring at the original size.
    return {key: value.to(device, non_blocking=True) if isinstance(value, torch.Tensor) else value
            for key, value in batch.items() if original_size or key != "org_query_imsize"}


def _base_dataset(dataset):
    """The benchmark dataset under wrappers such as ``Subset`` (which hide ``class_ids``)."""
    while not hasattr(dataset, "class_ids") and hasattr(dataset, "dataset"):
        dataset = dataset.dataset
    return dataset


def _loader(source, bsz: int, nworker: int, max_episodes: int | None,
            device: torch.device = torch.device("cpu")) -> DataLoader:
    """A loader over this rank's shard of the episodes (the first ``max_episodes`` when given), pinning
    memory only for a GPU ``device`` (pinning for a CPU run on a GPU machine opened a CUDA context).

    A caller's ``DataLoader`` is used as given when its sampler is this rank's :class:`ShardSampler`;
    otherwise a new one over the shard keeps its batch size, workers, collate function, worker start
    method and ``worker_init_fn`` (run after the workers' own), timeout, prefetching, generator and
    pinning (for a GPU ``device`` only, as above). Not persistence: that loader serves this one call, so
    its workers are stopped when it ends (persistent ones outlived a failed call in its traceback).
    """
    settings: dict = {"pin_memory": device.type == "cuda"}
    user_init = None
    if isinstance(source, DataLoader):
        dataset = source.dataset
        bsz = source.batch_size or bsz
        nworker, user_init = source.num_workers, source.worker_init_fn
        settings.update(collate_fn=source.collate_fn, multiprocessing_context=source.multiprocessing_context,
                        timeout=source.timeout, generator=source.generator,
                        pin_memory=source.pin_memory and device.type == "cuda")
        if nworker > 0:
            settings["prefetch_factor"] = source.prefetch_factor
        sampler = source.sampler
        if (isinstance(sampler, ShardSampler) and max_episodes is None and sampler.rank == hdist.get_rank()
                and sampler.world_size == hdist.get_world_size()):
            return source
    elif isinstance(source, Dataset):
        dataset = source
    else:
        raise TypeError(f"dataset_or_loader must be a torch Dataset or DataLoader, got {type(source).__name__}")
    length = len(dataset) if max_episodes is None else min(int(max_episodes), len(dataset))
    sampler = ShardSampler(length, hdist.get_rank(), hdist.get_world_size())
    init = (None if not nworker else ignore_stop_signals_in_worker if user_init is None
            else functools.partial(_init_worker_then, user_init))
    return DataLoader(dataset, batch_size=bsz, sampler=sampler, num_workers=nworker, worker_init_fn=init, **settings)


def _init_worker_then(user_init: Callable[[int], None], worker_id: int) -> None:
    """A worker's own set-up, then the caller's loader's ``worker_init_fn`` (a module-level function and
    a ``partial``, so that it pickles for spawned workers)."""
    ignore_stop_signals_in_worker(worker_id)
    user_init(worker_id)


_init_worker_then.unblocks_stop_signals = True  # it calls ignore_stop_signals_in_worker first


def _agree(stop: bool, has_batch: bool) -> tuple[bool, bool]:
    """Whether any rank asks to stop, and whether any rank has a batch left (one all-reduce; the
    values themselves on one process). A rank whose shard is done (shards differ by one episode) keeps
    calling this until no rank has a batch, so that every rank makes the same collectives."""
    totals = hdist.all_reduce_sum(torch.tensor([float(stop), float(has_batch)], dtype=torch.float64))
    return bool(totals[0] > 0), bool(totals[1] > 0)


class EpisodePredictor(Protocol):
    """What :func:`evaluate` needs of a model: an ``HSNet``, a DDP-wrapped one, or any object with this method
    (its ``train``/``eval`` are used where it has them)."""

    def predict_mask_nshot(self, batch: Mapping, nshot: int) -> torch.Tensor:
        """``[B, H, W]`` 0/1 masks at the size of ``batch["query_mask"]``."""
        ...


def evaluate(model: EpisodePredictor, dataset_or_loader: Dataset | DataLoader, nshot: int,
             device: str | torch.device, progress: bool = True,
             visualize_dir: str | os.PathLike | None = None, bsz: int = 1, nworker: int = 0,
             class_ids=None, max_episodes: int | None = None, amp: torch.dtype | None = None,
             stop_requested: Callable[[], bool] | None = None) -> dict:
    """Evaluate ``model`` on every episode of a dataset (sharded across ranks under torchrun).

    Args:
        model: has ``predict_mask_nshot(batch, nshot) -> [B, H, W]`` 0/1 mask at the query mask's size
            (an ``HSNet``, possibly wrapped in DistributedDataParallel).
        dataset_or_loader: a benchmark dataset (``hypertriton.data.build_dataset``) or a DataLoader over
            one; a loader is re-sharded unless its sampler is a :class:`ShardSampler` of this process's rank and
            world size.
        nshot: supports per episode used by the k-shot vote.
        device: where batches go.
        progress: show a tqdm bar (rank 0 only).
        visualize_dir: write one PNG panel per episode there (supports with masks, query, prediction,
            truth; see :func:`render_panel`).
        bsz, nworker: loader batch size and workers when a dataset is given.
        class_ids: classes the scores average over (default ``dataset.class_ids``).
        max_episodes: evaluate only the first episodes (a quick check; not the protocol).
        amp: run the model under ``torch.autocast`` with this dtype (``torch.bfloat16`` on CPU or GPU,
            ``torch.float16`` on GPU); None: full precision.
        stop_requested: asked before every batch; once it returns True, :class:`EvaluationStopped` is
            raised instead of a result (it carries the result so far). Under torchrun the ranks agree
            before every batch (one small all-reduce), so all of them stop at the same point when any one
            is asked to (training and ``hypertriton evaluate`` use this to stop on Ctrl-C).

    Returns:
        ``{"miou", "fb_iou", "per_class_iou": {class_id: iou}, "episodes", "benchmark", "nshot",
        "classes", "classes_evaluated", "miou_of_evaluated_classes"}`` with IoUs in percent (``"fbiou"``
        repeats ``fb_iou`` for callers using the original's spelling). ``miou`` is the protocol's mean over
        all ``classes`` (their number, an int); a run cut short by ``max_episodes`` may leave some
        unevaluated (counted as 0 there), so ``miou_of_evaluated_classes`` averages over
        ``classes_evaluated`` (the ids of those that had an episode) only.

    Raises:
        EvaluationStopped: ``stop_requested`` answered True (it carries the result so far).
        ValueError: ``bsz > 1`` on a dataset scored at the original image sizes, or a bad argument.
        TypeError: ``dataset_or_loader`` is neither a ``Dataset`` nor a ``DataLoader``.

    Example:
        >>> from hypertriton import HSNet
        >>> from hypertriton.data import build_dataset
        >>> dataset = build_dataset("synthetic", None, None, 0, "test", 1, img_size=64)
        >>> result = evaluate(HSNet("resnet18"), dataset, 1, "cpu", progress=False, max_episodes=2)
        >>> result["episodes"], 0 <= result["miou_of_evaluated_classes"] <= 100
        (2, True)
    """
    refuse_while_a_spawned_process_imports("evaluate()")
    device = torch.device(device)
    loader = _loader(dataset_or_loader, bsz, nworker, max_episodes, device)
    dataset = _base_dataset(loader.dataset)
    original_size = bool(getattr(dataset, "use_original_imgsize", False))
    if original_size and (loader.batch_size or 1) > 1:
        raise ValueError(f"bsz: a use_original_imgsize dataset gives each query mask at its own size, which "
                         f"cannot be batched; expected bsz=1, got {loader.batch_size}")
    class_ids = getattr(dataset, "class_ids", None) if class_ids is None else class_ids
    if class_ids is None:
        raise ValueError("class_ids: the dataset has no class_ids attribute; pass the classes to average over")
    meter = SegmentationMeter(class_ids)
    net = model.module if hasattr(model, "module") else model
    # Each module's own mode comes back at the end (a BatchNorm the caller froze in eval mode stays so);
    # a model that is no nn.Module but has train()/eval() gets train() back if it was training.
    modes = [(module, module.training) for module in net.modules()] if isinstance(net, torch.nn.Module) else []
    was_training = getattr(net, "training", False)
    if hasattr(net, "eval"):
        net.eval()
    visualize_dir = Path(visualize_dir) if visualize_dir is not None else None
    if visualize_dir is not None:
        try:
            check_no_earlier_panels(visualize_dir)
            refused = None
        except ValueError as error:
            refused = error
        # Agreed before any rank writes a panel (which another rank would then take for an earlier one).
        if hdist.any_rank(refused is not None, device):
            raise refused or ValueError(f"visualize_dir: another process found panels of an earlier evaluation "
                                        f"in {str(visualize_dir)!r}")
        visualize_dir.mkdir(parents=True, exist_ok=True)

    indices = iter(loader.sampler)  # a ShardSampler: this rank's episode indices in loader order
    batches = start_loader(loader)  # its workers ignore Ctrl-C from birth, also when spawned
    # Counted by hand: tqdm.auto's bar calls iter() on an iterable it wraps, which for a loader would start
    # a second set of workers (and read every episode twice).
    # In episodes of all ranks: rank 0 shows it, and its shard is the largest (ranks go batch by batch).
    world_size = hdist.get_world_size()
    bar = tqdm(total=loader.sampler.length, unit="episode", dynamic_ncols=True,
               desc=f"evaluate {getattr(dataset, 'benchmark', '')} {nshot}-shot".strip(),
               disable=not progress or not hdist.is_main_process())
    stopped = False
    try:
        with torch.no_grad():
            while True:
                batch = next(batches, None)
                more = batch is not None
                if stop_requested is not None:
                    stop, more = _agree(bool(stop_requested()), more)
                    if stop and more:  # (a request after the last batch lets the result through)
                        stopped = True
                        break
                if batch is None:
                    if more:
                        continue  # other ranks still have a batch: join their agreement
                    break
                batch_dev = _to_device(batch, device, original_size)
                with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                    pred = net.predict_mask_nshot(batch_dev, nshot=nshot)
                if pred.shape != batch_dev["query_mask"].shape:
                    raise ValueError(
                        f"the model predicted masks of shape {tuple(pred.shape)} but the query masks are "
                        f"{tuple(batch_dev['query_mask'].shape)}; with use_original_imgsize the model must "
                        f"resize its logits to batch['org_query_imsize']")
                inter, union = meter.update(pred, batch_dev)
                episode_index = [next(indices) for _ in range(pred.shape[0])]
                if visualize_dir is not None:
                    _write_panels(visualize_dir, batch, pred.cpu(), inter.cpu(), union.cpu(), episode_index,
                                  getattr(dataset, "class_name", None))
                bar.update(min(pred.shape[0] * world_size, bar.total - bar.n))
                if progress and world_size == 1:  # (under torchrun the counts are summed only at the end)
                    bar.set_postfix_str(_progress_text(meter), refresh=False)
    finally:
        bar.close()
        if not loader.persistent_workers:  # a caller's loader keeps its persistent workers for its next use
            stop_loader_workers(batches)
        for module, mode in modes:
            module.training = mode
        if not modes and was_training and hasattr(net, "train"):
            net.train()
    meter.all_reduce()  # every rank gets here, stopped or not: they stop before the same batch
    # The last collective before a caller leaves the process group: a barrier holds no Python tensor. Gloo's
    # worker thread needs the GIL to release the all-reduce's tensor, and a teardown right after it holds the
    # GIL while it waits for that thread (training.train ends with a barrier for the same reason).
    hdist.barrier()
    fb_iou = meter.fb_iou()
    result = {"benchmark": getattr(dataset, "benchmark", None), "nshot": nshot, "miou": meter.miou(),
              "fb_iou": fb_iou, "fbiou": fb_iou, "per_class_iou": meter.per_class_iou(),
              "episodes": meter.episodes, "classes": len(meter.class_ids),
              "classes_evaluated": meter.evaluated_classes(),
              "miou_of_evaluated_classes": meter.miou_of_evaluated_classes()}
    if stopped:
        raise EvaluationStopped(result)
    return result


# --------------------------------------------------------------------------------------------------
# Visualization

_MEAN = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
_STD = torch.tensor(IMAGENET_STD).view(3, 1, 1)


def _to_rgb(image: torch.Tensor) -> np.ndarray:
    """Normalized ``[3, H, W]`` -> uint8 ``[H, W, 3]``."""
    rgb = (image.detach().cpu().float() * _STD + _MEAN).clamp(0, 1)
    return (rgb.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


def _as_batch(batch: Mapping, pred: torch.Tensor) -> tuple[Mapping, torch.Tensor]:
    """``batch`` and ``pred`` with a leading batch axis: a dataset item gets one, a collated batch is checked."""
    missing = [key for key in ("query_img", "support_imgs", "support_masks", "query_mask") if key not in batch]
    if missing:
        raise KeyError(f"batch: missing {', '.join(missing)} (expected a dataset item or a collated batch)")
    if batch["query_img"].dim() == 3:  # one item
        keys = ("query_img", "support_imgs", "support_masks", "query_mask", "query_ignore_idx")
        batch = {**batch, **{key: batch[key][None] for key in keys if batch.get(key) is not None}}
        pred = pred[None] if isinstance(pred, torch.Tensor) and pred.dim() == 2 else pred
    query_img = batch["query_img"]
    if query_img.dim() != 4 or query_img.shape[1] != 3:
        raise ValueError(f"batch['query_img']: expected [B, 3, H, W] (or [3, H, W] for one item), got "
                         f"{list(query_img.shape)}")
    if batch["support_imgs"].dim() != 5 or batch["support_masks"].dim() != 4:
        raise ValueError(f"batch['support_imgs'] / ['support_masks']: expected [B, K, 3, H, W] / [B, K, H, W], "
                         f"got {list(batch['support_imgs'].shape)} / {list(batch['support_masks'].shape)}")
    if not isinstance(pred, torch.Tensor) or pred.dim() != 3 or pred.shape[0] != query_img.shape[0]:
        got = list(pred.shape) if isinstance(pred, torch.Tensor) else type(pred).__name__
        raise ValueError(f"pred: expected [B, H, W] with B = {query_img.shape[0]} (the batch's), got {got}")
    return batch, pred


def _progress_text(meter: SegmentationMeter) -> str:
    """The bar's running score: the mean over the classes seen so far (the protocol's mIoU counts a class
    not yet seen as 0, which read as a broken model early in a run: 1.95 climbing to 57.65)."""
    seen = meter.miou_of_evaluated_classes()
    return "" if seen is None else (f"mIoU {seen:.2f} over the {len(meter.evaluated_classes())} of "
                                    f"{len(meter.class_ids)} classes seen")


def panel_tiles(batch: Mapping, pred: torch.Tensor, row: int = 0) -> list[tuple[str, np.ndarray]]:
    """The pictures of one episode's panel, each ``(caption, uint8 [H, W, 3])`` at its image's own size:
    every support spotlighting its mask, the query, the query spotlighting the prediction and the truth
    (ignored pixels grey), and the errors (:func:`hypertriton.visualize.error_map`). Arguments as for
    :func:`render_panel`. The query's tiles are at the size its masks are scored at: with
    ``use_original_imgsize`` the image's own (the resized query image is enlarged back, so that the
    prediction is shown at the resolution, and in the aspect ratio, it is scored in); support masks of
    another size than their image are resized to it (nearest)."""
    batch, pred = _as_batch(batch, pred)
    if not -len(pred) <= row < len(pred):
        raise IndexError(f"row: {row} is out of range for a batch of {len(pred)} episodes")
    query = _to_rgb(batch["query_img"][row])
    size = tuple(batch["query_mask"][row].shape[-2:])
    if size != query.shape[:2]:
        query = np.array(Image.fromarray(query).resize(size[::-1], Image.BILINEAR))
    ignore = batch.get("query_ignore_idx")
    ignore = _mask_at(ignore[row], size) if ignore is not None else None
    supports = [_to_rgb(image) for image in batch["support_imgs"][row]]
    tiles = [(f"support {k + 1}", visualize.spotlight(image, _mask_at(mask, image.shape[:2])))
             for k, (image, mask) in enumerate(zip(supports, batch["support_masks"][row]))]
    predicted, truth = _mask_at(pred[row], size), _mask_at(batch["query_mask"][row], size)
    shown_truth = visualize.spotlight(query, truth)
    if ignore is not None:
        shown_truth[ignore] = visualize.IGNORED
    return tiles + [("query", query), ("prediction", visualize.spotlight(query, predicted)), ("truth", shown_truth),
                    ("errors", visualize.error_map(query, predicted, truth, ignore))]


def render_panel(batch: Mapping, pred: torch.Tensor, row: int = 0, title: str | None = None) -> Image.Image:
    """One episode as a PIL image: :func:`panel_tiles` side by side, captioned, at one height (at least
    160 px; each keeps its aspect ratio), under a title line with the error colours' legend.

    Args:
        batch: a collated batch dict (``query_img`` ``[B, 3, H, W]``, ``support_imgs`` ``[B, K, 3, H, W]``,
            ``support_masks`` ``[B, K, H, W]``, ``query_mask`` ``[B, H, W]``, optional ``query_ignore_idx``),
            or one dataset item (the same without ``B``).
        pred: ``[B, H, W]`` predicted 0/1 masks (``[H, W]`` with one item).
        row: which episode of the batch.
        title: the title line (default: the number of shots).
    """
    tiles = panel_tiles(batch, pred, row)
    height = max(_PANEL_MIN_HEIGHT, max(tile.shape[0] for _, tile in tiles))
    shots = len(tiles) - 4
    cells = [visualize.captioned(visualize.fit_height(tile, height), caption) for caption, tile in tiles]
    legend = [(visualize.FALSE_POSITIVE, "false positive"), (visualize.MISSED, "missed")]
    if batch.get("query_ignore_idx") is not None:
        legend.append((visualize.IGNORED, "not scored"))
    return visualize.sheet([cells], title=title or f"{shots}-shot episode", legend=legend)


_PANEL_MIN_HEIGHT = 160


def _mask_at(layer: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    """A 0/1 (or 255-ignore) map as a bool array of ``size`` (nearest, as masks are resized everywhere)."""
    layer = layer.detach().cpu().float()
    if tuple(layer.shape) != tuple(size):
        layer = resize_mask(layer, size)
    return layer.numpy() > 0.5


PANEL_GLOB = "episode*_class*_iou*.png"


def check_no_earlier_panels(folder: str | os.PathLike, name: str = "visualize_dir") -> None:
    """Refuse a panel folder that holds an earlier evaluation's panels: their names carry the episode's IoU,
    so a new run would not replace them but add its own beside them."""
    folder = Path(folder)
    earlier = sorted(folder.glob(PANEL_GLOB)) if folder.is_dir() else []
    if earlier:
        raise ValueError(f"{name}: {str(folder)!r} holds {len(earlier)} panels of an earlier evaluation (such as "
                         f"{earlier[0].name}); new ones would be mixed with them: choose another folder or delete "
                         "those")


def _write_panels(folder: Path, batch, pred, inter, union, episode_index, class_name=None) -> None:
    """One panel per episode of the batch; ``class_name`` (the dataset's, where it has one) names the class
    in the title beside its id."""
    for row in range(pred.shape[0]):
        index, class_id = episode_index[row], int(batch["class_id"][row])
        name = class_name(class_id) if class_name is not None else None
        shots = batch["support_imgs"].shape[1]
        if float(union[row, 1]) > 0:
            fg_iou = float(inter[row, 1]) / float(union[row, 1]) * 100
            iou_name, iou_text = f"{fg_iou:.1f}", f"foreground IoU {fg_iou:.1f}"
        else:  # no object in the truth nor in the prediction: right, but no IoU to give
            iou_name, iou_text = "NA", "foreground IoU n/a (no object in truth or prediction)"
        path = folder / f"episode{index:05d}_class{class_id}_iou{iou_name}.png"
        title = f"episode {index} | class {class_id}{f' ({name})' if name else ''} | {shots}-shot | {iou_text}"
        with atomic_file(path) as handle:
            render_panel(batch, pred, row, title=title).save(handle, format="PNG")


def format_result(result: Mapping) -> str:
    """The final line of an evaluation: ``mIoU: xx.xx  FB-IoU: yy.yy``, and where some classes had no
    episode (a run cut short), a second line that says so with the mean over the evaluated ones."""
    line = f"mIoU: {result['miou']:.2f}  FB-IoU: {result['fb_iou']:.2f}"
    evaluated, classes = result.get("classes_evaluated"), result.get("classes")
    if evaluated is not None and classes is not None and len(evaluated) < classes:
        over = result.get("miou_of_evaluated_classes")
        line += (f"\nnote: only {len(evaluated)} of {classes} classes had an episode; mIoU counts the other "
                 f"{classes - len(evaluated)} as 0 (the protocol's mean over all classes)"
                 + (f"; over the {len(evaluated)} evaluated: {over:.2f}" if over is not None else ""))
    return line

