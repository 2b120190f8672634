"""Pictures of labelmaps without matplotlib: colours, overlays, legends and image grids (PIL).

- :func:`colorize`: a labelmap (class indices, 255 = void) as RGB with the VOC colour map.
- :func:`overlay`: a labelmap drawn over its image the way ``torchvision.utils.
  draw_segmentation_masks`` draws masks: only the pixels of a class other than the background
  (and void) are blended with their class colour at ``opacity``; background and void pixels keep
  the image's own pixels, so the picture is not darkened where nothing was found.
- :func:`write_index_png`, :func:`write_color_png`, :func:`write_overlay`: ``dis infer``'s
  outputs (class indices as 8-bit greyscale, the VOC palette PNG, the overlay JPEG or PNG),
  written
  atomically (:func:`discli.storage.atomic_write`).
- :func:`legend`: swatches with class names; :func:`grid`: a figure of aspect-preserving
  tiles under column headings, with a legend of the class colours below (the demo's
  ``figure.png``).

Plots with axes (training curves, the confusion matrix) are in :mod:`discli.evaluation.plots`.
"""

from __future__ import annotations

import functools
import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from discli.errors import UsageError
from discli.storage import atomic_write
from discli.data.labelmap import IGNORE, voc_palette

BACKGROUND = 0
DEFAULT_OPACITY = 0.5


@functools.lru_cache(maxsize=1)
def palette() -> np.ndarray:
    """The VOC colour map, uint8 (256, 3); 255 (void) is (224, 224, 192)."""
    return np.asarray(voc_palette(), dtype=np.uint8).reshape(256, 3)


def check_opacity(opacity: float) -> float:
    if not 0.0 <= opacity <= 1.0:
        raise UsageError(f"{{opt:opacity}} must be within 0..1, got {opacity}")
    return float(opacity)


def colorize(labelmap: np.ndarray) -> np.ndarray:
    """uint8 (H, W, 3): every pixel in its class colour (void in the VOC void colour)."""
    return palette()[np.asarray(labelmap, dtype=np.uint8)]


def overlay(image: np.ndarray, labelmap: np.ndarray,
            opacity: float = DEFAULT_OPACITY) -> np.ndarray:
    """``image`` (uint8 (H, W, 3)) with the labelled non-background pixels of ``labelmap``
    blended with their class colour: ``(1 - opacity) * pixel + opacity * colour``. Background
    and void pixels are left exactly as they are."""
    check_opacity(opacity)
    labelmap = np.asarray(labelmap)
    if image.shape[:2] != labelmap.shape:
        raise ValueError(f"image is {image.shape[:2]}, labelmap {labelmap.shape}")
    out = image.astype(np.float32)
    mask = (labelmap != BACKGROUND) & (labelmap != IGNORE)
    colours = palette()[labelmap[mask].astype(np.uint8)].astype(np.float32)
    out[mask] = (1.0 - opacity) * out[mask] + opacity * colours
    return out.round().clip(0, 255).astype(np.uint8)


def overlay_image(image: np.ndarray, labelmap: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """:func:`overlay`: labelled non-background pixels blended, the rest kept."""
    return overlay(image, labelmap, alpha)


def _save_image(path: Path, image: Image.Image, fmt: str, **options: Any) -> None:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    atomic_write(path, lambda f: f.write(buffer.getvalue()))


def write_index_png(path: Path, labelmap: np.ndarray) -> None:
    """Class indices as an 8-bit greyscale ('L') PNG."""
    _save_image(path, Image.fromarray(labelmap.astype(np.uint8), mode="L"), "PNG")


def write_color_png(path: Path, labelmap: np.ndarray) -> None:
    """The labelmap with the VOC palette ('P')."""
    h, w = labelmap.shape
    image = Image.frombytes("P", (w, h), labelmap.astype(np.uint8).tobytes())
    image.putpalette(palette().reshape(-1).tolist())
    _save_image(path, image, "PNG")


OVERLAY_FORMATS = ("jpg", "png")  # jpg: small; png: exact colours, no ringing at edges


def check_overlay_format(fmt: str) -> str:
    if fmt not in OVERLAY_FORMATS:
        raise UsageError(f"{{opt:overlay_format}} must be {' or '.join(OVERLAY_FORMATS)}, got "
                         f"{fmt!r}")
    return fmt


def overlay_bytes(image: np.ndarray, labelmap: np.ndarray, opacity: float = 0.5,
                  fmt: str = "jpg") -> bytes:
    """:func:`overlay` encoded as ``fmt``: a JPEG of quality 90, or a PNG."""
    buffer = io.BytesIO()
    picture = Image.fromarray(overlay(image, labelmap, opacity))
    if check_overlay_format(fmt) == "png":
        picture.save(buffer, format="PNG")
    else:
        picture.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def write_overlay(path: Path, image: np.ndarray, labelmap: np.ndarray,
                  opacity: float = 0.5) -> None:
    """:func:`overlay` as a PNG when ``path`` ends in .png, else a JPEG (quality 90)."""
    data = overlay_bytes(image, labelmap, opacity,
                         "png" if Path(path).suffix.lower() == ".png" else "jpg")
    atomic_write(path, lambda f: f.write(data))


def font(size: int = 11) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _text_size(draw: ImageDraw.ImageDraw, text: str, face: object) -> tuple[int, int]:
    left, top, right, bottom = draw.multiline_textbbox((0, 0), text, font=face)
    return right - left, bottom - top


def legend(classes: Sequence[str], width: int, indices: Sequence[int] | None = None,
           void: bool = True, swatch: int = 12) -> Image.Image:
    """Rows of colour swatches with class names, wrapped to ``width`` pixels. ``indices``:
    which classes (default: all); ``void`` adds the void colour (index 255)."""
    entries = [(i, classes[i]) for i in (range(len(classes)) if indices is None else indices)]
    if void:
        entries.append((IGNORE, "void"))
    face = font()
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    cells = [(i, name, swatch + 4 + _text_size(probe, name, face)[0] + 12) for i, name in entries]
    rows: list[list[tuple[int, str, int]]] = [[]]
    used = 0
    for cell in cells:
        if rows[-1] and used + cell[2] > width:
            rows.append([])
            used = 0
        rows[-1].append(cell)
        used += cell[2]
    line = swatch + 6
    image = Image.new("RGB", (width, 6 + line * len(rows)), "white")
    draw = ImageDraw.Draw(image)
    colours = palette()
    for r, row in enumerate(rows):
        x, y = 4, 4 + r * line
        for index, name, cell_width in row:
            draw.rectangle([x, y, x + swatch - 1, y + swatch - 1],
                           fill=tuple(int(c) for c in colours[index]), outline=(80, 80, 80))
            draw.text((x + swatch + 4, y), name, fill=(0, 0, 0), font=face)
            x += cell_width
    return image


def fit(array: np.ndarray, box: int, nearest: bool) -> Image.Image:
    """The image scaled (aspect ratio kept) so that its longer side is ``box`` pixels."""
    image = Image.fromarray(array)
    h, w = array.shape[:2]
    scale = box / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return image.resize(size, Image.NEAREST if nearest else Image.BILINEAR)


def grid(rows: Sequence[Sequence[tuple[np.ndarray, bool]]], headings: Sequence[str],
         box: int = 96, classes: Sequence[str] | None = None, gap: int = 4) -> Image.Image:
    """A figure of tiles: ``rows`` of ``(array, nearest)`` (nearest: resample as a labelmap),
    each fitted into a ``box`` x ``box`` cell with its aspect ratio kept and centred, under
    ``headings`` (one per column, may hold line breaks), with a :func:`legend` of ``classes``
    below."""
    columns = len(headings)
    if any(len(row) != columns for row in rows):
        raise ValueError("every row needs one tile per heading")
    face = font()
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    header = 6 + max((_text_size(probe, h, face)[1] for h in headings), default=0)
    width = columns * (box + gap) + gap
    key = legend(classes, width) if classes is not None else None
    canvas = Image.new("RGB", (width, header + len(rows) * (box + gap) + gap
                               + (key.height if key is not None else 0)), "white")
    draw = ImageDraw.Draw(canvas)
    for c, heading in enumerate(headings):
        text_width = _text_size(probe, heading, face)[0]
        x = gap + c * (box + gap) + max(0, (box - text_width) // 2)
        draw.multiline_text((x, 2), heading, fill=(0, 0, 0), font=face, align="center")
    for r, row in enumerate(rows):
        for c, (array, nearest) in enumerate(row):
            tile = fit(array, box, nearest)
            x = gap + c * (box + gap) + (box - tile.width) // 2
            y = header + gap + r * (box + gap) + (box - tile.height) // 2
            canvas.paste(tile, (x, y))
    if key is not None:
        canvas.paste(key, (0, canvas.height - key.height))
    return canvas
