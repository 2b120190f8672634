"""Labelmaps: the one place for the void index, the formats registry, the colour map and PNG I/O.

A labelmap is a uint8 (H, W) array of class indices with :data:`IGNORE` (255) = void, exactly
what VOC's ``SegmentationClass/*.png`` hold as palette indices. Readers are registered by file
suffix in :data:`LABELMAP_FORMATS`: ``.png`` (palette or greyscale index PNGs) here, ``.mat``
(SBD's ``GTcls`` files) by :mod:`discli.data.sbd`, others by the ``dis.labelmap_formats`` entry
points; :func:`read_labelmap` validates every format the same way. The built-in providers are
imported the first time the registry is asked for a name it lacks (no import cycle: they import
this module, not the other way round).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from discli.storage import atomic_write
from discli.data.images import open_checked, probe_image, read_image, size_mismatch
from discli.errors import BadInputError, UsageError
from discli.registry import Registry

__all__ = ["IGNORE", "LABELMAP_FORMATS", "voc_palette", "read_labelmap", "write_palette_png",
           "labelmap_tags", "check_pair"]

IGNORE = 255  # void: the label of pixels no loss or metric counts ("ignore")

LabelmapReader = Callable[[Path], np.ndarray]
LABELMAP_FORMATS: Registry[LabelmapReader] = Registry(
    "labelmap format", group="dis.labelmap_formats", builtins=("discli.data.sbd",))


def voc_palette() -> list[int]:
    """The VOC colour map as 768 ints (256 RGB triples); index 255 is (224, 224, 192).

    The devkit's ``labelcolormap``: the bits of the index are spread over the three channels,
    most significant first, so neighbouring classes get clearly different colours.
    """
    palette = []
    for index in range(256):
        r = g = b = 0
        c = index
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        palette += [r, g, b]
    return palette


@LABELMAP_FORMATS.register(".png")
def _read_png_labelmap(path: Path) -> np.ndarray:
    with open_checked(path, what="labelmap") as im:
        if im.mode not in ("P", "L", "I;16", "I;16B", "I;16L"):
            raise BadInputError(f"labelmap is a {im.mode} image, not a palette or greyscale "
                                "index PNG (colour-coded labelmaps must be converted to class "
                                "indices first)", path)
        try:
            im.load()
            values = np.array(im)  # a writable copy (torch.from_numpy warns on read-only)
        except (OSError, SyntaxError, ValueError, EOFError) as exc:
            raise BadInputError(f"truncated or corrupt labelmap ({exc})", path) from None
    if values.dtype != np.uint8:  # 16-bit index PNGs are fine when the values fit
        if values.max(initial=0) > IGNORE:
            raise BadInputError(f"labelmap value {int(values.max())} is out of range "
                                "(class indices and 255 = void)", path)
        values = values.astype(np.uint8)
    return values


def read_labelmap(path: str | Path, num_classes: int) -> np.ndarray:
    """Read a labelmap as uint8 (H, W); values must be in 0..num_classes-1 or 255."""
    path = Path(path)
    try:
        reader = LABELMAP_FORMATS.get(path.suffix.lower())
    except UsageError:
        raise BadInputError(f"unsupported labelmap file type {path.suffix!r} (known: "
                            f"{', '.join(LABELMAP_FORMATS.names())})", path) from None
    values = reader(path)
    bad = np.unique(values[(values >= num_classes) & (values != IGNORE)])
    if bad.size:
        shown = ", ".join(str(int(v)) for v in bad[:5])
        raise BadInputError(f"labelmap has value(s) {shown} outside 0..{num_classes - 1} and "
                            f"255 (void); wrong class list?", path)
    return values


def write_palette_png(path: str | Path, labelmap: np.ndarray) -> None:
    """Write a labelmap the VOC way: a palette PNG with the VOC colour map.

    Atomic (temp file + rename: a killed run never leaves a torn PNG), without an fsync per file.
    """
    labelmap = np.asarray(labelmap)
    if labelmap.ndim != 2:
        raise ValueError(f"labelmap must be 2-D (H, W), got shape {labelmap.shape}")
    if labelmap.size and (labelmap.min() < 0 or labelmap.max() > 255):
        raise ValueError("labelmap values must be in 0..255")
    im = Image.fromarray(labelmap.astype(np.uint8))  # mode L ...
    im.putpalette(voc_palette())  # ... becomes P, indices unchanged
    atomic_write(path, lambda f: im.save(f, format="PNG", optimize=False), durable=False)


def labelmap_tags(labelmap: np.ndarray, classes: Sequence[str]) -> list[str]:
    """Class names present in a labelmap (background and void excluded), in index order."""
    present = np.unique(labelmap)
    return [classes[int(v)] for v in present if 0 < v < len(classes)]


def check_pair(image: str | Path, labelmap: str | Path, num_classes: int,
               decode: bool = False) -> np.ndarray:
    """Validate an image and its labelmap together and return the labelmap.

    ``decode=False`` reads only the image header (fast, still catches missing, empty,
    unidentifiable and oversized files); ``decode=True`` decodes it fully (catches truncation).
    """
    h, w = read_image(image).shape[:2] if decode else probe_image(image)
    values = read_labelmap(labelmap, num_classes)
    if values.shape != (h, w):
        raise BadInputError(size_mismatch(values.shape, image, (h, w)), labelmap)
    return values
