"""Pascal VOC formats: the 21 classes, the colour map, labelmap PNGs and the VOCdevkit layout.

A labelmap is a uint8 (H, W) array of class indices with 255 = void ("ignore"), exactly what
VOC's ``SegmentationClass/*.png`` hold as palette indices. Readers are registered by file suffix
in :data:`LABELMAP_FORMATS` (``.png`` here, ``.mat`` for SBD's ``GTcls`` files), so a manifest
can point at either and :func:`read_labelmap` validates both the same way.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from discli.data.fileio import atomic_write, read_text
from discli.data.images import open_checked, probe_image, read_image, size_mismatch
from discli.data.manifest import ID_PATTERN, Record
from discli.data.problems import Problems
from discli.errors import BadInputError, UsageError
from discli.registry import Registry

__all__ = ["VOC_CLASSES", "IGNORE", "voc_palette", "read_labelmap", "write_palette_png",
           "read_image", "labelmap_tags", "check_pair", "find_voc_root", "voc_split_ids",
           "voc_records", "LABELMAP_FORMATS"]

# A list (not a tuple) so that ``manifest.classes == VOC_CLASSES`` compares as expected.
VOC_CLASSES = ["background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car",
               "cat", "chair", "cow", "diningtable", "dog", "horse", "motorbike", "person",
               "pottedplant", "sheep", "sofa", "train", "tvmonitor"]
IGNORE = 255

LabelmapReader = Callable[[Path], np.ndarray]
LABELMAP_FORMATS: Registry[LabelmapReader] = Registry("labelmap format",
                                                      group="dis.labelmap_formats")


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
        if values.max(initial=0) > 255:
            raise BadInputError(f"labelmap value {int(values.max())} is out of range "
                                "(class indices and 255 = void)", path)
        values = values.astype(np.uint8)
    return values


@LABELMAP_FORMATS.register(".mat")
def _read_mat_labelmap(path: Path) -> np.ndarray:
    from discli.data.sbd import read_sbd_mat  # sbd imports this module

    return read_sbd_mat(path)


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


# --- the VOCdevkit layout -------------------------------------------------------------------

def find_voc_root(path: str | Path) -> Path:
    """The ``VOC2012``-style folder (holding JPEGImages) given it, its VOCdevkit or a parent."""
    path = Path(path)
    candidates = [path, path / "VOC2012", path / "VOCdevkit" / "VOC2012"]
    for parent in (path, path / "VOCdevkit"):
        if parent.is_dir():
            candidates += sorted(p for p in parent.glob("VOC20*") if p.is_dir())
    for c in candidates:
        if (c / "JPEGImages").is_dir() and (c / "ImageSets" / "Segmentation").is_dir():
            return c
    raise BadInputError("not a VOCdevkit tree (no JPEGImages/ and ImageSets/Segmentation/ in "
                        "it, its VOC2012/ or VOCdevkit/VOC2012/)", path)


def read_id_list(path: Path) -> list[str]:
    """Ids of a split file (one a line, blank lines ignored), validated as safe names."""
    ids = []
    for n, line in enumerate(read_text(path, "split list").splitlines(), start=1):
        name = line.strip().split()[0] if line.strip() else ""
        if not name:
            continue
        if not ID_PATTERN.fullmatch(name):
            raise BadInputError(f"line {n}: {name!r} is not a valid image id", path)
        ids.append(name)
    return ids


def voc_split_ids(voc_root: Path, split: str) -> list[str]:
    return read_id_list(voc_root / "ImageSets" / "Segmentation" / f"{split}.txt")


def voc_splits(voc_root: Path) -> list[str]:
    return sorted(p.stem for p in (voc_root / "ImageSets" / "Segmentation").glob("*.txt"))


def voc_records(voc_root: Path, split: str, classes: Sequence[str] = VOC_CLASSES,
                problems: Problems | None = None, decode: bool = False,
                progress: Callable[[], None] | None = None) -> list[Record]:
    """Records of a VOC segmentation split, tags derived from the labelmaps.

    Paths are relative to ``voc_root``. The ``test`` split has no public labelmaps: its records
    carry none (and no tags).
    """
    problems = problems if problems is not None else Problems()
    records = []
    for image_id in voc_split_ids(voc_root, split):
        image = f"JPEGImages/{image_id}.jpg"
        rec = None
        with problems.guard():
            if split == "test":
                if decode:
                    read_image(voc_root / image)
                else:
                    probe_image(voc_root / image)
                rec = Record(id=image_id, image=image, tags=[], tag_source="pixels", split=split)
            else:
                labelmap = f"SegmentationClass/{image_id}.png"
                values = check_pair(voc_root / image, voc_root / labelmap, len(classes), decode)
                rec = Record(id=image_id, image=image, labelmap=labelmap,
                             tags=labelmap_tags(values, classes), tag_source="pixels", split=split)
        if rec is not None:
            records.append(rec)
        if progress:
            progress()
    return records
