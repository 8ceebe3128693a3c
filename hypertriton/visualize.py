"""Masks drawn on images so that they read whatever the object's colour, and the sheets that lay them out.

A colour tint vanishes on an object of that colour (a red tint on a red car, a blue one on the sea), so
masks are shown by *spotlighting*: everything outside the mask is dimmed and the mask's border drawn in
white, at a width that stays visible when a large photo is viewed scaled down. Errors against a truth
are drawn in two colours that colour-blind readers tell apart (Okabe and Ito's orange and blue).

Used by ``hypertriton evaluate --visualize`` (:func:`hypertriton.evaluation.render_panel`), ``hypertriton
predict``'s overlays (:func:`hypertriton.predict.overlay`) and ``examples/one_shot_demo.py``. Arrays are
uint8 RGB ``[H, W, 3]``; masks are bool ``[H, W]``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

__all__ = ["DIM", "FALSE_POSITIVE", "MISSED", "IGNORED", "outline_width", "border", "spotlight", "error_map",
           "fit_height", "captioned", "sheet"]

DIM = 0.3  # what is left of the brightness outside a mask
OUTLINE = (255, 255, 255)
FALSE_POSITIVE = (230, 159, 0)  # predicted, not in the truth (orange)
MISSED = (0, 114, 178)  # in the truth, not predicted (blue)
IGNORED = (128, 128, 128)  # not scored (PASCAL's object boundaries)
_CAPTION_SIZE = 14


def outline_width(height: int, width: int) -> int:
    """Border width in pixels for an image of that size: its longer side / 400, rounded, at least 1 (1 px
    up to 599 px; a 1-px line on a 2000-px photo disappears when the photo is shown on a screen)."""
    return max(1, round(max(height, width) / 400))


def _erode(mask: np.ndarray) -> np.ndarray:
    padded = np.pad(mask, 1, constant_values=False)
    return padded[1:-1, 1:-1] & padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]


def border(mask: np.ndarray, width: int = 1) -> np.ndarray:
    """The pixels of ``mask`` within ``width`` steps (4-neighbourhood) of its outside or the image edge."""
    inner = mask
    for _ in range(width):
        inner = _erode(inner)
    return mask & ~inner


def spotlight(image: np.ndarray, mask: np.ndarray, dim: float = DIM, width: int | None = None) -> np.ndarray:
    """``image`` with everything outside ``mask`` dimmed to ``dim`` of its brightness and the mask's border
    drawn in white (``width`` px, by default :func:`outline_width`); inside, the image as it is."""
    _check(image, mask, "mask")
    width = outline_width(*mask.shape) if width is None else width
    outside = ~mask
    if outside.mean() < 0.25:  # a large object: dim the few pixels around it (a whole-image lookup: 40x slower)
        out = image.copy()
        out[outside] = _dim_table(dim)[image[outside]]
    else:  # a table lookup over the image, then the object copied back (float arithmetic took 5x the time)
        out = _dimmed(image, dim)
        np.copyto(out, image, where=mask[..., None])
    out[border(mask, width)] = OUTLINE
    return out


def _dim_table(dim: float) -> np.ndarray:
    """Each uint8 value at ``dim`` of its brightness, rounded as ``round(value * dim)`` in float32."""
    if not 0 <= dim <= 1:
        raise ValueError(f"dim: expected a share of the brightness in [0, 1], got {dim!r}")
    return (np.arange(256, dtype=np.float32) * np.float32(dim)).round().astype(np.uint8)


def _dimmed(image: np.ndarray, dim: float) -> np.ndarray:
    """``image`` at ``dim`` of its brightness (:func:`_dim_table`)."""
    return _dim_table(dim)[image]


def error_map(image: np.ndarray, pred: np.ndarray, truth: np.ndarray, ignore: np.ndarray | None = None,
              dim: float = DIM) -> np.ndarray:
    """The prediction against the truth: correct object pixels as in ``image``, false positives in
    :data:`FALSE_POSITIVE`, missed pixels in :data:`MISSED`, ignored ones in :data:`IGNORED`, the
    correct background dimmed."""
    _check(image, pred, "pred")
    _check(image, truth, "truth")
    out = _dimmed(image, dim)
    hit = pred & truth
    out[hit] = image[hit]
    out[pred & ~truth] = FALSE_POSITIVE
    out[~pred & truth] = MISSED
    if ignore is not None:
        _check(image, ignore, "ignore")
        out[ignore] = IGNORED
    return out


def _check(image: np.ndarray, mask: np.ndarray, name: str) -> None:
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image: expected uint8 [H, W, 3], got {image.dtype} {list(image.shape)}")
    if mask.dtype != bool or mask.shape != image.shape[:2]:
        raise ValueError(f"{name}: expected bool [H, W] = {list(image.shape[:2])}, got {mask.dtype} {list(mask.shape)}")


def fit_height(image: np.ndarray, height: int) -> Image.Image:
    """``image`` scaled to ``height`` px, its aspect ratio kept (nearest neighbour when enlarging, so that
    borders stay sharp; averaging when shrinking, so that thin lines do not vanish between samples)."""
    if image.ndim != 3 or 0 in image.shape[:2] or height < 1:
        raise ValueError(f"image, height: expected an [H, W, 3] image with H, W >= 1 and a height >= 1, got "
                         f"{list(image.shape)} and {height}")
    source = Image.fromarray(image)
    width = max(1, round(image.shape[1] * height / image.shape[0]))
    if (width, height) == source.size:
        return source
    return source.resize((width, height), Image.NEAREST if height >= image.shape[0] else Image.BOX)


def _font(size: int = _CAPTION_SIZE):
    try:
        return ImageFont.load_default(size=size)  # a scalable font (Pillow >= 10.1 with FreeType)
    except (TypeError, ImportError, OSError):
        return ImageFont.load_default()


def captioned(tile: Image.Image, caption: str) -> Image.Image:
    """``tile`` under a white strip holding ``caption`` (in a smaller font where it would not fit, down to
    10 px; cut beyond that)."""
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    for size in range(_CAPTION_SIZE, 9, -1):
        font = _font(size)
        if probe.textlength(caption, font=font) <= tile.width - 6:
            break
    strip = _CAPTION_SIZE + 8
    cell = Image.new("RGB", (tile.width, tile.height + strip), "white")
    cell.paste(tile, (0, strip))
    ImageDraw.Draw(cell).text((3, 3), caption, fill="black", font=font)
    return cell


def sheet(rows: Sequence[Sequence[Image.Image]], title: str | None = None,
          legend: Sequence[tuple[tuple[int, int, int], str]] = (), gap: int = 6) -> Image.Image:
    """Cells laid out in rows (left-aligned, ``gap`` px apart) under an optional title line, which ends
    with ``legend``: coloured squares, each followed by its meaning."""
    if not rows or not all(rows):
        raise ValueError(f"rows: expected at least one row of at least one cell, got {[len(row) for row in rows]}")
    font = _font()
    head = 0 if title is None and not legend else _CAPTION_SIZE + 12
    widths = [sum(cell.width for cell in row) + gap * (len(row) - 1) for row in rows]
    heights = [max(cell.height for cell in row) for row in rows]
    draw_probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    legend_width = sum(draw_probe.textlength(text, font=font) + _CAPTION_SIZE + 14 for _, text in legend)
    title_width = draw_probe.textlength(title or "", font=font) + 20
    width = int(max(max(widths), title_width + legend_width))
    out = Image.new("RGB", (width, head + sum(heights) + gap * (len(rows) - 1)), "white")
    draw = ImageDraw.Draw(out)
    x = 3
    if title:
        draw.text((x, 5), title, fill="black", font=font)
        x = int(title_width)
    for colour, text in legend:
        draw.rectangle([x, 6, x + _CAPTION_SIZE - 2, 6 + _CAPTION_SIZE - 2], fill=colour, outline="black")
        x += _CAPTION_SIZE + 4
        draw.text((x, 5), text, fill="black", font=font)
        x += int(draw.textlength(text, font=font)) + 10
    y = head
    for row, height in zip(rows, heights):
        x = 0
        for cell in row:
            out.paste(cell, (x, y))
            x += cell.width + gap
        y += height + gap
    return out
