"""Pascal VOC: the 21 classes and the VOCdevkit layout (split lists, records).

The labelmap format itself (void = 255, the VOC colour map, index PNGs, the formats registry) is
:mod:`discli.data.labelmap`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from discli.data.fileio import read_text
from discli.data.images import probe_image, read_image
from discli.data.manifest import ID_PATTERN, Record
from discli.data.problems import Problems
from discli.errors import BadInputError
from discli.data.labelmap import check_pair, labelmap_tags

__all__ = ["VOC_CLASSES", "find_voc_root", "voc_split_ids", "voc_records"]

# A list (not a tuple) so that ``manifest.classes == VOC_CLASSES`` compares as expected.
VOC_CLASSES = ["background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car",
               "cat", "chair", "cow", "diningtable", "dog", "horse", "motorbike", "person",
               "pottedplant", "sheep", "sofa", "train", "tvmonitor"]

# --- the VOCdevkit layout -------------------------------------------------------------------

def find_voc_root(path: str | Path) -> Path:
    """The ``VOC2012``-style folder (holding JPEGImages) given it, its VOCdevkit or a parent."""
    path = Path(path)
    candidates = [path, path / "VOC2012", path / "VOCdevkit" / "VOC2012"]
    for parent in (path, path / "VOCdevkit"):
        if parent.is_dir():
            candidates += sorted(p for p in parent.glob("VOC20*") if p.is_dir())
    halves = []  # folders with one of the two: the message names what the other lacks
    for c in candidates:
        images, lists = (c / "JPEGImages").is_dir(), (c / "ImageSets" / "Segmentation").is_dir()
        if images and lists:
            return c
        if images or lists:
            halves.append((c, images))
    if halves:
        folder, images = halves[0]
        if images:
            raise BadInputError("JPEGImages/ is there but ImageSets/Segmentation/ is missing (it "
                                "holds the split lists, e.g. train.txt and val.txt: one image id "
                                "a line)", folder)
        raise BadInputError("ImageSets/Segmentation/ is there but JPEGImages/ (the images) is "
                            "missing", folder)
    raise BadInputError("not a VOCdevkit tree (no JPEGImages/ nor ImageSets/Segmentation/ in "
                        "it, its VOC2012/ or VOCdevkit/VOC2012/)", path)


def read_id_list(path: Path) -> list[str]:
    """Ids of a split file (one a line, blank lines ignored), validated as safe names."""
    first: dict[str, int] = {}  # id -> its line
    for n, line in enumerate(read_text(path, "split list").splitlines(), start=1):
        name = line.strip().split()[0] if line.strip() else ""
        if not name:
            continue
        if not ID_PATTERN.fullmatch(name):
            raise BadInputError(f"line {n}: {name!r} is not a valid image id", path)
        if name in first:
            raise BadInputError(f"line {n}: duplicate id {name!r} (first on line {first[name]})",
                                path)
        first[name] = n
    return list(first)


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
