"""Segment your own images: checked image/mask reading, the bundled checkpoint, atomic PNG output.

The library side of ``hypertriton predict`` and ``examples/one_shot_demo.py``:

- :func:`read_image`, :func:`read_mask`: load files with errors that name the file and the problem
  (missing, unreadable, mask size different from its image, mask not binary, mask empty).
- :func:`load_model`: an HSNet from a checkpoint file (original format or the compact format of the
  bundled weights), or the bundled synthetic-benchmark checkpoint when no file is given.
- :func:`segment`: a query's mask from K annotated supports, at the query's own size;
  :func:`prepare_supports` runs the supports through the backbone once for many queries.
- :func:`overlay`, :func:`write_pngs`: outputs, written all-or-nothing.
- :func:`save_compact`, :func:`load_compact` (from :mod:`hypertriton.compact`): the bundled
  checkpoint's storage (per-tensor k-means codebooks, 4 or 8 bits per weight).

Example::

    from hypertriton.predict import load_model, prepare_supports, read_image, read_mask, segment
    model, img_size = load_model()                      # the bundled checkpoint
    support = read_image("support.jpg")
    mask = segment(model, read_image("query.jpg"), [support], [read_mask("support.png", support.shape[:2])],
                   img_size)                            # bool [H, W] at the query's size
    prepared = prepare_supports(model, [support], [read_mask("support.png", support.shape[:2])], img_size)
    masks = [segment(model, read_image(path), prepared) for path in ("q1.jpg", "q2.jpg")]
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from ._io import load_on_cpu, temporary_path
from .compact import is_compact, load_compact, save_compact  # noqa: F401  (part of this module's API)

if TYPE_CHECKING:  # for annotations only: the functions import the model where they use it
    from .model import HSNet

__all__ = [
    "BUNDLED_CHECKPOINT", "BUNDLED_BACKBONE", "BUNDLED_IMG_SIZE", "IMAGE_SUFFIXES", "InputError",
    "VanishingMaskWarning", "InputWarning", "read_image", "read_mask", "image_tensor", "mask_tensor",
    "vanishing_masks", "load_model", "PreparedSupports", "prepare_supports", "segment", "overlay", "write_pngs",
    "save_compact", "load_compact", "is_compact", "read_train_config", "MIN_IMG_SIZE", "MAX_IMG_SIZE",
]

BUNDLED_CHECKPOINT = Path(__file__).resolve().parent / "weights" / "synthetic_resnet18.pt"
BUNDLED_BACKBONE = "resnet18"
BUNDLED_IMG_SIZE = 96
DEFAULT_IMG_SIZE = 400  # the original HSNet's input size, for user checkpoints
MIN_IMG_SIZE = 64  # the smallest model input the command line accepts (HSNet runs from 32 px, poorly)
MAX_IMG_SIZE = 4096  # the largest training size a compact checkpoint may record (beyond: hours per image)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".gif")
REPRODUCE_HINT = "docs/synthetic.md (in the source distribution) gives the commands that train it"
# Under transparent pixels: the ImageNet mean colour, which the model's input normalization maps to 0.
TRANSPARENT_FILL = (124, 116, 104, 255)

class InputError(ValueError):
    """A user-supplied file that cannot be used; the message names the file and the problem."""


class VanishingMaskWarning(UserWarning):
    """A support mask whose object pixels all vanish at the model's input size."""


class InputWarning(UserWarning):
    """A user-supplied file that is read, but maybe not as its owner expects (a multi-frame file, 16-bit
    data that reads dark)."""


# --------------------------------------------------------------------------------------------------
# Reading


def _open(path, role: str) -> Image.Image:
    path = Path(path)
    if not path.exists():
        raise InputError(f"{role}: no such file {str(path)!r}")
    if not path.is_file():
        raise InputError(f"{role}: {str(path)!r} is not a file")
    image = None
    try:
        image = Image.open(path)
        image.load()  # decode now, so a truncated file fails here and not halfway through a run
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as error:
        if image is not None:
            image.close()  # the error's traceback would keep the file open until a garbage collection
        raise InputError(f"{role}: cannot read {str(path)!r} as an image ({type(error).__name__}: {error})") from None
    frames = getattr(image, "n_frames", 1)
    if frames > 1:
        # Phone JPEGs (MPO) carry extra frames (a preview, a depth map) behind the photo: no warning there.
        if image.format != "MPO":
            warnings.warn(f"{role}: {str(path)!r} holds {frames} frames (an animation or a multi-page file); "
                          "the first is used", InputWarning, stacklevel=3)
        # PIL keeps a multi-frame file open to seek its other frames; keep the first frame, close the file.
        first = image.copy()
        image.close()
        image = first
    # Upright as viewers and annotation tools show it: phone photos store their pixels sideways and say
    # so in the EXIF orientation tag, which PIL does not apply by itself. Unparsable EXIF: as stored.
    try:
        return ImageOps.exif_transpose(image)
    except (OSError, ValueError, SyntaxError, TypeError, KeyError):
        return image


def read_image(path, role: str = "image") -> np.ndarray:
    """An image file as RGB ``uint8`` ``[H, W, 3]``, turned upright by its EXIF orientation (as image
    viewers show it). 16-bit grey images are scaled to 8 bits (divided by 257; PIL's own conversion
    clips them), with a warning when their values use 12 bits or fewer. Transparent pixels take the
    ImageNet mean colour, which the model's normalization maps to zero, whatever colour the file hides
    under them. Multi-frame files (animations, multi-page TIFFs): the first frame, with a warning (not
    for a phone's MPO JPEG, whose other frames are previews).

    Raises:
        InputError: the file is missing or is not a readable image.
    """
    image = _open(path, role)
    if image.mode.startswith("I") or image.mode == "F":
        image = Image.fromarray(_grey_to_8bit(np.asarray(image), image.mode, path, role))
    elif image.mode in ("RGBA", "RGBa", "LA", "La", "PA") or "transparency" in image.info:
        image = Image.alpha_composite(Image.new("RGBA", image.size, TRANSPARENT_FILL), image.convert("RGBA"))
    return np.asarray(image.convert("RGB"))


_SCALE_BLOCK_PIXELS = 1 << 20


def _grey_to_8bit(values: np.ndarray, mode: str, path, role: str) -> np.ndarray:
    """A 16-bit, 32-bit integer or float grey image (PIL modes ``I;16*``, ``I``, ``F``) as ``uint8``.

    16-bit values are divided by 257, whatever the image holds, so that images from one camera keep their
    relative brightness; data of 12 bits or fewer in a 16-bit file then reads dark, which a warning says.
    """
    top = float(values.max()) if values.size else 0.0
    if float(values.min(initial=0)) < 0:
        scale = None
    elif mode == "F":
        scale = 255.0 if top <= 1 else (1.0 if top <= 255 else None)
    else:  # integers: 16-bit files, or 8/16-bit values that an older PIL reads as 32-bit
        scale = 1.0 if mode == "I" and top <= 255 else (1 / 257 if top <= 65535 else None)
    if scale is None:
        raise InputError(f"{role}: {str(path)!r} is a {mode} image with values in [{values.min():g}, {top:g}]; "
                         "expected an 8- or 16-bit image (or floats in [0, 1])")
    if scale == 1 / 257 and 0 < top < 4096:
        warnings.warn(f"{role}: {str(path)!r} is a 16-bit image whose values reach only {top:g} of 65535 (data of "
                      f"12 bits or fewer?): read as 16-bit it comes out dark (at most {round(top / 257)} of 255); "
                      "scale it to the full range first if that is not what it shows", InputWarning,
                      stacklevel=4)
    # Row blocks of about a million pixels: float64 arithmetic on a whole photo-sized 16-bit scan took 13 times
    # its size in memory (4.6 GiB for 169M pixels); each block gives the same bytes.
    result = np.empty(values.shape, dtype=np.uint8)
    rows = max(1, _SCALE_BLOCK_PIXELS // max(1, values.shape[1] if values.ndim > 1 else 1))
    for start in range(0, values.shape[0], rows):
        block = values[start:start + rows].astype(np.float64)
        block *= scale
        result[start:start + rows] = np.rint(block, out=block).clip(0, 255, out=block)
    return result


def _palette_is_black_and_white(image: Image.Image) -> bool:
    """Whether every palette entry a ``P``/``PA`` image uses is black or white (or 0/1 greys): a drawing
    saved with a palette, to read by its colours in whatever index order the editor chose."""
    indices = np.unique(np.asarray(image if image.mode == "P" else image.getchannel(0)))
    palette = np.asarray(image.getpalette("RGB") or [], dtype=np.uint8).reshape(-1, 3)
    if indices.size and int(indices.max()) >= len(palette):
        return False
    used = palette[indices]
    greys = set(used[:, 0].tolist())
    return bool((used == used[:, :1]).all()) and (greys <= {0, 255} or greys <= {0, 1})


def read_mask(path, image_hw: tuple[int, int] | None = None, role: str = "mask",
              image_path=None) -> np.ndarray:
    """A binary mask file as ``bool`` ``[H, W]`` (True = object).

    Accepted: one channel (or equal RGB channels) holding only 0 and 1, or only 0 and 255 (or 65535 in
    a 16-bit file); one value alone is fine. Palette images are read by their colours when every colour
    they use is black or white (as image editors save black-and-white drawings, in any index order) and
    by their indices otherwise (VOC's class masks). An alpha channel (a palette's transparent entry too)
    is ignored unless the colours are all the same and it is not: then it is the mask (an object drawn as
    the opaque part of a layer). An EXIF
    orientation, if the file has one, is applied as in :func:`read_image`.

    Args:
        image_hw: the ``(H, W)`` of the mask's image; a mask of another size is refused.
        image_path: the image's path, only to name it in the error message.

    Raises:
        InputError: missing or unreadable file, size different from the image, values other than
            {0, 1} / {0, 255}, or no object pixel at all.
    """
    image = _open(path, role)
    if image.mode in ("P", "PA") and _palette_is_black_and_white(image):
        transparent = image.mode == "PA" or "transparency" in image.info
        image = image.convert("LA" if transparent else "L")
    alpha = np.asarray(image.getchannel("A")) if image.mode in ("RGBA", "RGBa", "LA", "La", "PA") else None
    if image.mode in ("RGB", "RGBA", "RGBa"):
        rgb = np.asarray(image.convert("RGB"))
        if not (np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 0], rgb[..., 2])):
            raise InputError(f"{role}: {str(path)!r} is a colour image; a mask must be one channel (or grey) "
                             "holding 0 for background and 1 or 255 for the object")
        values = rgb[..., 0]
    elif image.mode == "1":
        values = np.asarray(image, dtype=np.uint8)
    elif alpha is not None:  # grey or palette index, plus an alpha channel
        values = np.asarray(image.getchannel(0))
    else:  # L, P (palette indices, as VOC masks), I, I;16, F
        values = np.asarray(image)
    channel = ""
    if alpha is not None and values.size and values.min() == values.max() and alpha.min() != alpha.max():
        values, channel = alpha, " in its alpha channel (its colours are all the same)"
    if values.ndim != 2:
        raise InputError(f"{role}: {str(path)!r} has {values.shape[2]} channels (PIL mode {image.mode}); a mask "
                         "must be one channel (or grey) holding 0 for background and 1 or 255 for the object")
    height, width = values.shape[:2]
    if image_hw is not None and (height, width) != tuple(image_hw):
        of = f" {str(image_path)!r}" if image_path is not None else ""
        turned = ("; the two are turned by 90 degrees: images are read upright by their EXIF orientation, as "
                  "viewers show them; draw the mask on the upright image") if (width, height) == tuple(image_hw) else ""
        raise InputError(f"{role}: {str(path)!r} is {width}x{height} (WxH) but its image{of} is "
                         f"{image_hw[1]}x{image_hw[0]}; a mask must have its image's size{turned}")
    found = np.unique(values)
    if not any(set(found.tolist()) <= {0, top} for top in (1, 255, 65535)):
        shown = ", ".join(str(v) for v in found[:8]) + (", ..." if len(found) > 8 else "")
        hint = ""
        if Path(path).suffix.lower() in (".jpg", ".jpeg"):
            hint = "; JPEG compression blurs a mask's edges into other values: save masks as PNG"
        elif 255 in found.tolist() and len(found) > 2:
            hint = ("; a PASCAL class mask marks each object by its class index and the boundary by 255 "
                    "(ignored): write the object you want as 255 and everything else as 0")
        raise InputError(f"{role}: {str(path)!r} is not a binary mask: it holds the values {{{shown}}}{channel}; "
                         f"expected only 0 (background) and 1 or 255 (object){hint}")
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


def vanishing_masks(masks: Sequence[np.ndarray], size: int,
                    resized: Sequence[torch.Tensor] | None = None) -> list[int]:
    """Indices of the ``bool`` ``[H, W]`` masks that mark object pixels but none once resized to
    ``size`` x ``size`` (nearest neighbour, as the model's input); ``resized``: those resized masks,
    if already computed."""
    resized = resized if resized is not None else [mask_tensor(mask, size) for mask in masks]
    return [k for k, (mask, small) in enumerate(zip(masks, resized)) if mask.any() and not small.any()]


# --------------------------------------------------------------------------------------------------
# Model


def read_train_config(checkpoint) -> dict | None:
    """The ``config.json`` that ``hypertriton train`` wrote next to ``checkpoint``, or None when there is
    no such file.

    Raises:
        ValueError: a ``config.json`` is there but is not train's (unreadable, not JSON, no ``benchmark``
            field), saying why.
    """
    path = Path(checkpoint).parent / "config.json"
    if not path.exists():
        return None
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as error:  # (JSON nested past Python's recursion limit)
        raise ValueError(f"{type(error).__name__}: {error}") from None
    if not isinstance(config, dict) or "benchmark" not in config:
        raise ValueError("no 'benchmark' field")
    return config


def _training_img_size(checkpoint: Path) -> int | None:
    """The image size in the ``config.json`` that ``hypertriton train`` wrote next to ``checkpoint``,
    or None (no such file, or not one of train's)."""
    try:
        config = read_train_config(checkpoint)
    except ValueError:
        return None
    size = config.get("img_size") if config is not None else None
    if not isinstance(size, int) or isinstance(size, bool):
        return None
    from .model import MIN_IMAGE_SIZE  # (train accepts sizes from there; the command line from 64)

    if not MIN_IMAGE_SIZE <= size <= MAX_IMG_SIZE:  # a file's value decides an allocation: bounded
        warnings.warn(f"{checkpoint}: the config.json next to it records img_size {size}, outside "
                      f"{MIN_IMAGE_SIZE}..{MAX_IMG_SIZE}; ignored", InputWarning, stacklevel=3)
        return None
    return size


def load_model(checkpoint: str | os.PathLike | None = None, backbone: str | None = None, backend: str | None = None,
               device: str | torch.device = "cpu") -> tuple[HSNet, int]:
    """An HSNet ready to predict, and the image size to feed it.

    Args:
        checkpoint: a checkpoint file (original format, :meth:`hypertriton.HSNet.save_checkpoint`, or compact), or
            None for the bundled synthetic-benchmark checkpoint.
        backbone: the backbone name; inferred from the checkpoint's keys when None.
        backend: op backend (None: automatic).
        device: where the model is put.

    Returns:
        ``(model, img_size)``: the model in eval mode on ``device``; ``img_size`` is the side it was
        trained at: from a compact checkpoint's metadata (the bundled one; an integer from 32 to 4096),
        else from the ``config.json`` that ``hypertriton train`` writes next to its ``best_model.pt``,
        else 400 (the original's).

    Raises:
        InputError: missing bundled checkpoint, missing file, a file that is not a fitting checkpoint, or
            a compact file that is malformed or records an image size outside the above.
    """
    from .checkpoint import CheckpointError
    from .model import MIN_IMAGE_SIZE, HSNet

    if checkpoint is None:
        if not BUNDLED_CHECKPOINT.is_file():
            raise InputError(f"the bundled checkpoint {BUNDLED_CHECKPOINT} is missing (a source checkout without "
                             f"the weights, or a broken install); pass --checkpoint PATH, or train it: "
                             f"{REPRODUCE_HINT}")
        checkpoint = BUNDLED_CHECKPOINT
    path = Path(checkpoint)
    img_size = DEFAULT_IMG_SIZE
    source = path
    try:
        loaded = load_on_cpu(path)
    except Exception:  # missing, a folder, not even a torch file: let from_checkpoint phrase the error
        loaded = None
    if is_compact(loaded):
        try:
            state_dict, metadata = load_compact(loaded, name=repr(str(path)))
        except CheckpointError as error:
            raise InputError(str(error)) from None
        # The file's metadata is data like its weights: a size the model cannot run at (or would take
        # hours at) is refused here, naming the file, rather than crashing or hanging later.
        img_size = metadata.get("img_size", img_size)
        if type(img_size) is not int or not MIN_IMAGE_SIZE <= img_size <= MAX_IMG_SIZE:  # not isinstance: True
            raise InputError(f"checkpoint {str(path)!r}: its metadata gives img_size={img_size!r}; expected an "
                             f"integer from {MIN_IMAGE_SIZE} to {MAX_IMG_SIZE} (the side the model was trained at)")
        backbone = backbone or metadata.get("backbone")  # an unknown name is refused by HSNet, below
        source = state_dict
    elif isinstance(loaded, Mapping):
        source = loaded  # read once, not twice
        img_size = _training_img_size(path) or img_size
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


def _check_rgb(image, name: str) -> None:
    """``image`` must be what :func:`read_image` returns: a numpy RGB ``uint8`` ``[H, W, 3]``."""
    if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        got = f"{image.dtype} {list(image.shape)}" if isinstance(image, np.ndarray) else type(image).__name__
        raise ValueError(f"{name}: expected a numpy RGB uint8 image [H, W, 3] (as read_image returns), got {got}")


@dataclass(frozen=True)
class PreparedSupports:
    """K supports resized for a model and run through its backbone once (:func:`prepare_supports`), for
    segmenting many queries against them. Tied to the model and its weights at preparation time."""

    model: object
    features: list  # per shot, the backbone's feature maps, batch 1
    masks: torch.Tensor  # [1, K, img_size, img_size]
    img_size: int

    @property
    def shots(self) -> int:
        return len(self.features)


def prepare_supports(model: HSNet, supports: Sequence[np.ndarray], support_masks: Sequence[np.ndarray],
                     img_size: int) -> PreparedSupports:
    """Check K supports, resize them to ``img_size`` x ``img_size`` and compute their backbone features.

    Args:
        model: the HSNet that will segment the queries (the features are its backbone's).
        supports: K RGB ``uint8`` images ``[Hk, Wk, 3]`` (any sizes).
        support_masks: K ``bool`` masks ``[Hk, Wk]``.
        img_size: the model's input side (see :func:`load_model`).

    Returns:
        What :func:`segment` takes as ``supports`` for every query, for this model and size.

    Raises:
        ValueError: no supports, counts that differ, or an image or mask of the wrong shape or type.

    Warns :class:`VanishingMaskWarning` for a mask whose object vanishes at ``img_size``.
    """
    if len(supports) != len(support_masks) or not supports:
        raise ValueError(f"supports/support_masks: expected K >= 1 of each, got {len(supports)} and "
                         f"{len(support_masks)}")
    for k, (image, mask) in enumerate(zip(supports, support_masks)):
        _check_rgb(image, f"supports[{k}]")
        if not isinstance(mask, np.ndarray) or mask.shape != image.shape[:2]:
            got = mask.shape if isinstance(mask, np.ndarray) else type(mask).__name__
            raise ValueError(f"support_masks[{k}]: expected a numpy array [H, W] = {list(image.shape[:2])} "
                             f"(its image's size), got {got}")
    device = next(model.parameters()).device
    resized_masks = [mask_tensor(m, img_size) for m in support_masks]
    for k in vanishing_masks(support_masks, img_size, resized_masks):
        warnings.warn(f"support_masks[{k}]: its {int(support_masks[k].sum())} object pixels all vanish when the "
                      f"mask is resized to {img_size}x{img_size} for the model, which then sees no object; mark "
                      "a larger region or use a larger img_size", VanishingMaskWarning, stacklevel=2)
    with torch.no_grad():
        features = [model.extract_features(image_tensor(image, img_size)[None].to(device)) for image in supports]
    return PreparedSupports(model, features, torch.stack(resized_masks)[None].to(device), img_size)


def segment(model: HSNet, query: np.ndarray, supports: Sequence[np.ndarray] | PreparedSupports,
            support_masks: Sequence[np.ndarray] | None = None, img_size: int | None = None) -> np.ndarray:
    """The query's object mask given K supports, at the query's own size.

    Every image is resized to ``img_size`` x ``img_size`` for the model (as in training); the logits are
    resized back to the query's size before the argmax (as the original's ``use_original_imgsize``),
    and K > 1 shots are combined by the original vote.

    Args:
        model: an HSNet (see :func:`load_model`).
        query: RGB ``uint8`` ``[H, W, 3]``.
        supports: K RGB images ``[Hk, Wk, 3]`` (any sizes), with ``support_masks`` (K ``bool`` masks
            ``[Hk, Wk]``) and ``img_size`` (the model's input side); or what :func:`prepare_supports`
            returned for this model (then neither), which spares their backbone for every query.

    Returns:
        ``bool`` ``[H, W]``.

    Raises:
        ValueError: an image that is not RGB ``uint8`` ``[H, W, 3]``, masks that do not match their
            supports, or prepared supports of another model or size.

    Example:
        >>> model, size = load_model()  # the bundled checkpoint (synthetic benchmark)
        >>> image = np.zeros((80, 120, 3), np.uint8)
        >>> image[20:60, 30:90] = (220, 40, 40)
        >>> mask = np.zeros((80, 120), bool)
        >>> mask[20:60, 30:90] = True
        >>> segment(model, image, [image], [mask], size).shape
        (80, 120)
    """
    _check_rgb(query, "query")  # before the supports' backbone runs
    if isinstance(supports, PreparedSupports):
        if supports.model is not model:
            raise ValueError("supports: prepared for another model; prepare them again with this one")
        if support_masks is not None or img_size not in (None, supports.img_size):
            raise ValueError(f"support_masks/img_size: prepared supports hold their masks and their size "
                             f"({supports.img_size}); pass neither")
        prepared = supports
    else:
        if img_size is None:
            raise ValueError("img_size: required with support images (the side the model's input is resized to)")
        if support_masks is None:
            raise ValueError("support_masks: required with support images (one bool [H, W] mask per support)")
        prepared = prepare_supports(model, supports, support_masks, img_size)
    device = next(model.parameters()).device
    with torch.no_grad():
        query_feats = model.extract_features(image_tensor(query, prepared.img_size)[None].to(device))
        mask = model.predict_from_features(query_feats, prepared.features, prepared.masks, query.shape[:2])
    return mask[0].cpu().numpy() > 0


# --------------------------------------------------------------------------------------------------
# Output


def overlay(image: np.ndarray, mask: np.ndarray, colour: tuple[int, int, int] | None = None,
            alpha: float | None = None) -> np.ndarray:
    """``image`` ``[H, W, 3]`` uint8 with everything outside ``mask`` ``[H, W]`` (bool) dimmed and the mask's
    border drawn in white, wider on larger images (:func:`hypertriton.visualize.spotlight`): it reads on
    an object of any colour, where a colour tint vanished on objects of its colour.

    ``colour``/``alpha`` (deprecated) draw the former overlay instead: the mask tinted in ``colour`` at
    ``alpha`` (default (255, 40, 40) at 0.5) and outlined in it.
    """
    from .visualize import border, spotlight

    if colour is None and alpha is None:
        return spotlight(image, mask)
    warnings.warn("overlay(colour=..., alpha=...) draws the former tinted overlay, which vanishes on objects of "
                  "that colour; overlay(image, mask) spotlights the mask instead", DeprecationWarning, stacklevel=2)
    tint = np.asarray((255, 40, 40) if colour is None else colour, dtype=np.float32)
    alpha = 0.5 if alpha is None else alpha
    out = image.copy()
    out[mask] = ((1 - alpha) * image[mask].astype(np.float32) + alpha * tint).round().clip(0, 255).astype(np.uint8)
    out[border(mask)] = tint.round().clip(0, 255).astype(np.uint8)
    return out


def write_pngs(files: Mapping[Path, np.ndarray]) -> list[Path]:
    """Write every ``{path: uint8 array [H, W] or [H, W, 3]}`` as PNG, all or nothing.

    Each image goes to a temporary file next to its target first; only when all are written are they
    renamed into place. On any error the temporaries are removed and no target is touched.
    """
    staged: list[tuple[Path, Path]] = []
    try:
        for path, array in files.items():
            path = Path(path)
            path.parent.mkdir(parents=True, exist_ok=True)
            temporary = temporary_path(path)
            with open(temporary, "xb") as stream:
                staged.append((temporary, path))
                # Level 1 for colour images (overlays): a photo-sized one encodes 4x faster than at PIL's
                # default, 6, for files about 30% larger.
                Image.fromarray(np.ascontiguousarray(array)).save(stream, format="PNG",
                                                                   compress_level=1 if array.ndim == 3 else 6)
        for temporary, path in staged:
            os.replace(temporary, path)
    except BaseException:
        for temporary, _path in staged:
            Path(temporary).unlink(missing_ok=True)
        raise
    return [path for _temporary, path in staged]
