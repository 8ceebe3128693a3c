"""Segment your own images: checked image/mask reading, the bundled checkpoint, atomic PNG output.

The library side of ``hypertriton predict`` and ``examples/one_shot_demo.py``:

- :func:`read_image`, :func:`read_mask`: load files with errors that name the file and the problem
  (missing, unreadable, mask size different from its image, mask not binary, mask empty).
- :func:`load_model`: an HSNet from a checkpoint file (original format or the compact format of the
  bundled weights), or the bundled synthetic-benchmark checkpoint when no file is given.
- :func:`segment`: a query's mask from K annotated supports, at the query's own size.
- :func:`overlay`, :func:`write_pngs`: outputs, written all-or-nothing.
- :func:`save_compact`, :func:`load_compact`: the bundled checkpoint's storage (per-tensor k-means
  codebooks, 4 or 8 bits per weight), expanded on load to an original-format state_dict.

Example::

    from hypertriton.predict import load_model, read_image, read_mask, segment
    model, img_size = load_model()                      # the bundled checkpoint
    support = read_image("support.jpg")
    mask = segment(model, read_image("query.jpg"), [support], [read_mask("support.png", support.shape[:2])],
                   img_size)                            # bool [H, W] at the query's size
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

__all__ = [
    "BUNDLED_CHECKPOINT", "BUNDLED_BACKBONE", "BUNDLED_IMG_SIZE", "IMAGE_SUFFIXES", "InputError",
    "read_image", "read_mask", "image_tensor", "mask_tensor", "load_model", "segment", "overlay",
    "write_pngs", "save_compact", "load_compact", "is_compact",
]

BUNDLED_CHECKPOINT = Path(__file__).resolve().parent / "weights" / "synthetic_resnet18.pt"
BUNDLED_BACKBONE = "resnet18"
BUNDLED_IMG_SIZE = 96
DEFAULT_IMG_SIZE = 400  # the original HSNet's input size, for user checkpoints
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
REPRODUCE_HINT = "docs/synthetic.md gives the commands that train it"

class InputError(ValueError):
    """A user-supplied file that cannot be used; the message names the file and the problem."""


# --------------------------------------------------------------------------------------------------
# Reading


def _open(path, role: str) -> Image.Image:
    path = Path(path)
    if not path.exists():
        raise InputError(f"{role}: no such file {str(path)!r}")
    if not path.is_file():
        raise InputError(f"{role}: {str(path)!r} is not a file")
    try:
        image = Image.open(path)
        image.load()  # decode now, so a truncated file fails here and not halfway through a run
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as error:
        raise InputError(f"{role}: cannot read {str(path)!r} as an image ({type(error).__name__}: {error})") from None
    return image


def read_image(path, role: str = "image") -> np.ndarray:
    """An image file as RGB ``uint8`` ``[H, W, 3]``.

    Raises:
        InputError: the file is missing or is not a readable image.
    """
    return np.asarray(_open(path, role).convert("RGB"))


def read_mask(path, image_hw: tuple[int, int] | None = None, role: str = "mask",
              image_path=None) -> np.ndarray:
    """A binary mask file as ``bool`` ``[H, W]`` (True = object).

    Accepted: one channel (or equal RGB channels, or palette indices) holding only 0 and 1, or only 0
    and 255 (one value alone is fine).

    Args:
        image_hw: the ``(H, W)`` of the mask's image; a mask of another size is refused.
        image_path: the image's path, only to name it in the error message.

    Raises:
        InputError: missing or unreadable file, size different from the image, values other than
            {0, 1} / {0, 255}, or no object pixel at all.
    """
    image = _open(path, role)
    if image.mode in ("RGB", "RGBA"):
        rgb = np.asarray(image.convert("RGB"))
        if not (np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 0], rgb[..., 2])):
            raise InputError(f"{role}: {str(path)!r} is a colour image; a mask must be one channel (or grey) "
                             "holding 0 for background and 1 or 255 for the object")
        values = rgb[..., 0]
    elif image.mode == "1":
        values = np.asarray(image, dtype=np.uint8)
    else:  # L, P (palette indices, as VOC masks), I, I;16, F
        values = np.asarray(image)
    height, width = values.shape[:2]
    if image_hw is not None and (height, width) != tuple(image_hw):
        of = f" {str(image_path)!r}" if image_path is not None else ""
        raise InputError(f"{role}: {str(path)!r} is {width}x{height} (WxH) but its image{of} is "
                         f"{image_hw[1]}x{image_hw[0]}; a mask must have its image's size")
    found = np.unique(values)
    if not (set(found.tolist()) <= {0, 1} or set(found.tolist()) <= {0, 255}):
        shown = ", ".join(str(v) for v in found[:8]) + (", ..." if len(found) > 8 else "")
        raise InputError(f"{role}: {str(path)!r} is not a binary mask: it holds the values {{{shown}}}; expected "
                         "only 0 (background) and 1 or 255 (object)")
    mask = values > 0
    if not mask.any():
        raise InputError(f"{role}: {str(path)!r} marks no object pixel (all zero)")
    return mask


# --------------------------------------------------------------------------------------------------
# Model input


def image_tensor(image: np.ndarray, size: int) -> torch.Tensor:
    """RGB ``uint8`` ``[H, W, 3]`` -> ``[3, size, size]`` ImageNet-normalised (bilinear resize, aspect
    ratio not kept, as the original transforms)."""
    from .data.common import build_transform

    return build_transform(size)(Image.fromarray(image))


def mask_tensor(mask: np.ndarray, size: int) -> torch.Tensor:
    """``bool`` ``[H, W]`` -> float 0/1 ``[size, size]`` (nearest neighbour, as the original)."""
    from .data.common import resize_mask

    return resize_mask(torch.from_numpy(mask), (size, size))


# --------------------------------------------------------------------------------------------------
# Compact checkpoints (the bundled file): per-tensor k-means codebooks


COMPACT_FORMAT = "hypertriton-compact-checkpoint"
_MIN_QUANTIZED = 4096  # smaller tensors (BN, GroupNorm, biases) are kept in fp16


def _kmeans_codebook(values: torch.Tensor, levels: int, iterations: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    """1D k-means of ``values`` (flat float32): ``(codebook [levels], index [N] int64)``.

    At most ``levels`` distinct values are kept exactly (the codebook is then those values, padded)."""
    distinct = values.unique()
    if len(distinct) <= levels:
        codebook = torch.cat([distinct, distinct[-1:].expand(levels - len(distinct))])
        return codebook, torch.bucketize(values, distinct)
    sorted_values = values.sort().values
    quantiles = (torch.arange(levels, dtype=torch.float64) + 0.5) / levels
    codebook = sorted_values[(quantiles * (len(values) - 1)).round().long()].clone()
    for _ in range(iterations):
        codebook = codebook.sort().values
        index = torch.bucketize(values, (codebook[1:] + codebook[:-1]) / 2)
        sums = torch.zeros(levels, dtype=torch.float64).index_add_(0, index, values.double())
        counts = torch.bincount(index, minlength=levels).double()
        codebook = torch.where(counts > 0, sums / counts.clamp(min=1), codebook.double()).float()
    codebook = codebook.sort().values
    return codebook, torch.bucketize(values, (codebook[1:] + codebook[:-1]) / 2)


def save_compact(state_dict: Mapping[str, torch.Tensor], path, bits: Mapping[str, int] | int = 4,
                 metadata: Mapping[str, object] | None = None) -> Path:
    """Write a state_dict in the compact format, atomically.

    Floating tensors of at least 4096 elements are stored as a per-tensor k-means codebook of
    ``2**bits`` fp16 values plus ``bits``-bit indices (4-bit indices packed two per byte); smaller
    floating tensors as fp16; other tensors unchanged. The keys (``module.`` prefix included) are kept.

    Args:
        bits: 4 or 8 for every quantized tensor, or ``{key_prefix: bits}`` (the longest matching prefix
            wins; ``""`` is the default).
        metadata: strings and numbers stored next to the weights (backbone, image size, ...).
    """
    from .checkpoint import atomic_save

    def bits_for(key: str) -> int:
        if isinstance(bits, int):
            return bits
        matches = [prefix for prefix in bits if key.startswith(prefix)]
        if not matches:
            raise ValueError(f"bits: no entry matches {key!r} (add a default under the key '')")
        return bits[max(matches, key=len)]

    entries = {}
    for key, value in state_dict.items():
        value = value.detach().cpu()
        if not value.is_floating_point():
            entries[key] = {"kind": "raw", "data": value.clone()}
        elif value.numel() < _MIN_QUANTIZED:
            entries[key] = {"kind": "fp16", "data": value.to(torch.float16)}
        else:
            nbits = bits_for(key)
            if nbits not in (4, 8):
                raise ValueError(f"bits: expected 4 or 8 for {key!r}, got {nbits!r}")
            codebook, index = _kmeans_codebook(value.float().reshape(-1), 2 ** nbits)
            index = index.to(torch.uint8)
            if nbits == 4:
                if index.numel() % 2:
                    index = torch.cat([index, index.new_zeros(1)])
                index = index[0::2] | (index[1::2] << 4)
            entries[key] = {"kind": f"codebook{nbits}", "codebook": codebook.to(torch.float16), "index": index,
                            "shape": torch.tensor(value.shape, dtype=torch.int64),
                            "dtype": str(value.dtype).removeprefix("torch.")}
    payload = {"format": COMPACT_FORMAT, "version": 1, "metadata": dict(metadata or {}), "tensors": entries}
    return atomic_save(payload, path)


def is_compact(loaded) -> bool:
    """Whether an object read by ``torch.load`` is a compact checkpoint."""
    return isinstance(loaded, Mapping) and loaded.get("format") == COMPACT_FORMAT


def load_compact(source) -> tuple[dict[str, torch.Tensor], dict]:
    """Expand a compact checkpoint (a path or the loaded object) to ``(state_dict, metadata)``; every
    floating tensor comes back as float32 (or its saved dtype)."""
    loaded = torch.load(source, map_location="cpu", weights_only=True) if isinstance(source, (str, os.PathLike)) \
        else source
    if not is_compact(loaded):
        raise InputError(f"checkpoint: {source!r} is not a compact hypertriton checkpoint")
    state_dict = {}
    for key, entry in loaded["tensors"].items():
        kind = entry["kind"]
        if kind == "raw":
            state_dict[key] = entry["data"]
        elif kind == "fp16":
            state_dict[key] = entry["data"].float()
        else:
            shape = torch.Size(entry["shape"].tolist())
            index = entry["index"]
            if kind == "codebook4":
                index = torch.stack([index & 0x0F, index >> 4], dim=1).reshape(-1)
            index = index[: shape.numel()].long()
            dtype = getattr(torch, entry["dtype"])
            state_dict[key] = entry["codebook"].float()[index].reshape(shape).to(dtype)
    return state_dict, dict(loaded.get("metadata", {}))


# --------------------------------------------------------------------------------------------------
# Model


def load_model(checkpoint=None, backbone: str | None = None, backend: str | None = None,
               device: str | torch.device = "cpu"):
    """An HSNet ready to predict, and the image size to feed it.

    Args:
        checkpoint: a checkpoint file (original format, :meth:`HSNet.save_checkpoint`, or compact), or
            None for the bundled synthetic-benchmark checkpoint.
        backbone: the backbone name; inferred from the checkpoint's keys when None.
        backend: op backend (None: automatic).

    Returns:
        ``(model, img_size)``: the model in eval mode on ``device``; ``img_size`` is the side it was
        trained at (bundled: from its metadata; other files: 400, the original's).

    Raises:
        InputError: missing bundled checkpoint, missing file, or a file that is not a fitting checkpoint.
    """
    from .checkpoint import CheckpointError
    from .model import HSNet

    if checkpoint is None:
        if not BUNDLED_CHECKPOINT.is_file():
            raise InputError(f"the bundled checkpoint {BUNDLED_CHECKPOINT} is missing (a source checkout without "
                             f"the weights, or a broken install); pass --checkpoint PATH, or train it: "
                             f"{REPRODUCE_HINT}")
        checkpoint = BUNDLED_CHECKPOINT
    path = Path(checkpoint)
    if not path.is_file():
        raise InputError(f"checkpoint: no such file {str(path)!r}")
    img_size = DEFAULT_IMG_SIZE
    source = path
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # not even a torch file: let from_checkpoint phrase the error
        loaded = None
    if is_compact(loaded):
        state_dict, metadata = load_compact(loaded)
        img_size = int(metadata.get("img_size", img_size))
        backbone = backbone or metadata.get("backbone")
        source = state_dict
    elif isinstance(loaded, Mapping):
        source = loaded  # read once, not twice
    try:
        model = HSNet.from_checkpoint(source, backbone=backbone, backend=backend)
    except (CheckpointError, FileNotFoundError, TypeError) as error:
        message = str(error)
        if not isinstance(source, Path):
            message = message.replace("the given state_dict", repr(str(path)))
        raise InputError(message) from None
    except ValueError as error:  # e.g. an unknown backbone name
        raise InputError(f"checkpoint {str(path)!r}: {error}") from None
    return model.to(device).eval(), img_size


def segment(model, query: np.ndarray, supports: Sequence[np.ndarray], support_masks: Sequence[np.ndarray],
            img_size: int) -> np.ndarray:
    """The query's object mask given K supports, at the query's own size.

    Every image is resized to ``img_size`` x ``img_size`` for the model (as in training); the logits are
    resized back to the query's size before the argmax (as the original's ``use_original_imgsize``),
    and K > 1 shots are combined by the original vote.

    Args:
        query: RGB ``uint8`` ``[H, W, 3]``.
        supports: K RGB images ``[Hk, Wk, 3]`` (any sizes).
        support_masks: K ``bool`` masks ``[Hk, Wk]``.

    Returns:
        ``bool`` ``[H, W]``.
    """
    if len(supports) != len(support_masks) or not supports:
        raise ValueError(f"supports/support_masks: expected K >= 1 of each, got {len(supports)} and "
                         f"{len(support_masks)}")
    device = next(model.parameters()).device
    batch = {
        "query_img": image_tensor(query, img_size)[None].to(device),
        "support_imgs": torch.stack([image_tensor(s, img_size) for s in supports])[None].to(device),
        "support_masks": torch.stack([mask_tensor(m, img_size) for m in support_masks])[None].to(device),
        "org_query_imsize": (query.shape[1], query.shape[0]),  # PIL order (W, H), as the datasets give it
    }
    with torch.no_grad():
        mask = model.predict_mask_nshot(batch, len(supports))
    return mask[0].cpu().numpy() > 0


# --------------------------------------------------------------------------------------------------
# Output


def overlay(image: np.ndarray, mask: np.ndarray, colour=(255, 40, 40), alpha: float = 0.5) -> np.ndarray:
    """``image`` ``[H, W, 3]`` uint8 with ``mask`` ``[H, W]`` tinted in ``colour`` and outlined."""
    out = image.astype(np.float32).copy()
    tint = np.asarray(colour, dtype=np.float32)
    out[mask] = (1 - alpha) * out[mask] + alpha * tint
    edge = mask & ~_erode(mask)
    out[edge] = tint
    return out.round().clip(0, 255).astype(np.uint8)


def _erode(mask: np.ndarray) -> np.ndarray:
    padded = np.pad(mask, 1, constant_values=False)
    return (padded[1:-1, 1:-1] & padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:])


def write_pngs(files: Mapping[Path, np.ndarray]) -> list[Path]:
    """Write every ``{path: uint8 array [H, W] or [H, W, 3]}`` as PNG, all or nothing.

    Each image goes to a temporary file next to its target first; only when all are written are they
    renamed into place. On any error the temporaries are removed and no target is touched.
    """
    staged: list[tuple[str, Path]] = []
    try:
        for path, array in files.items():
            path = Path(path)
            path.parent.mkdir(parents=True, exist_ok=True)
            handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
            staged.append((temporary, path))
            with os.fdopen(handle, "wb") as stream:
                Image.fromarray(np.ascontiguousarray(array)).save(stream, format="PNG")
        for temporary, path in staged:
            os.replace(temporary, path)
    except BaseException:
        for temporary, _path in staged:
            Path(temporary).unlink(missing_ok=True)
        raise
    return [path for _temporary, path in staged]
