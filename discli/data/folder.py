"""``dis prepare-folder``: your own data, a folder of images and a folder of index masks.

``prepare-voc`` needs the VOCdevkit layout (split lists, ``JPEGImages/``,
``SegmentationClass/``); this importer takes any two folders:

- ``IMAGES_DIR``: images of any type :func:`discli.data.images.read_image` reads (searched
  recursively; hidden files skipped);
- ``MASKS_DIR``: for ``IMAGES_DIR/a/b.jpg``, the mask ``MASKS_DIR/a/b<suffix>`` for a suffix
  registered in :data:`discli.data.labelmap.LABELMAP_FORMATS` (``.png``: a palette or greyscale
  index PNG; ``.mat``: SBD; plugins add more), of the image's size, with values ``0..K-1``
  (the ``--classes`` list, background first) and 255 for void; a mask may also be
  named ``b_mask.png``, ``b_label.png`` or ``b_gt.png`` (the suffixes in :data:`MASK_STEMS`).

The manifest (``data_manifests/README.md``) lists every image with its mask and the tags the
mask holds (``tag_source: "pixels"``), with its root the deepest folder holding both folders;
``dis pretrain``, ``dis finetune`` and ``dis evaluate`` read it like any other. An image
without a mask stops the run (with ``skip_bad``: it is left out and listed) unless
``allow_unlabelled`` keeps it without one (both :class:`FolderChecks`; ``finetune`` needs tags
or labelmaps, so it gets none); masks without an image are listed in the report.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from discli.data.fileio import files_under
from discli.data.idw import IMAGE_SUFFIXES, make_ids
from discli.data.images import probe_image, read_image
from discli.data.manifest import Manifest, Record, write_manifest
from discli.data.prepare import tag_counts
from discli.data.problems import Problems
from discli.data.labelmap import LABELMAP_FORMATS, check_pair, labelmap_tags
from discli.errors import BadInputError, UsageError
from discli.progress import NullReporter, Reporter

MASK_STEMS = ("", "_mask", "_label", "_gt")


def _files(folder: Path, suffixes: set[str]) -> list[Path]:
    return sorted(p for p in files_under(folder) if p.suffix.lower() in suffixes and p.is_file()
                  and not any(part.startswith(".") for part in p.relative_to(folder).parts))


def find_mask(masks: Path, relative: Path) -> Path | None:
    """The mask of the image at ``relative`` (to the images folder), or None."""
    folder = masks / relative.parent
    suffixes = LABELMAP_FORMATS.names()
    for stem in MASK_STEMS:
        for suffix in suffixes:
            for candidate in (f"{relative.stem}{stem}{suffix}",
                              f"{relative.stem}{stem}{suffix.upper()}"):
                if (folder / candidate).is_file():
                    return folder / candidate
    return None


@dataclass(frozen=True)
class FolderChecks:
    """What :func:`prepare_folder` does with imperfect inputs."""

    allow_unlabelled: bool = False  # keep an image without a mask (no labelmap, no tags)
    decode: bool = False  # decode every image fully (finds truncated files); else headers only
    skip_bad: bool = False  # leave bad images out and list them, instead of stopping


def prepare_folder(images: str | Path, masks: str | Path, classes: Sequence[str],
                   out: str | Path, split: str = "train",
                   checks: FolderChecks = FolderChecks(),
                   reporter: Reporter | None = None) -> dict[str, Any]:
    """Write the manifest of ``images`` and their ``masks`` to ``out`` (``"-"``: stdout) and
    return a report: ``{"out", "records", "with_labelmap", "tag_counts", "orphan_masks",
    "bad"}``."""
    reporter = reporter or NullReporter()
    classes = list(classes)
    images, masks = Path(images).absolute(), Path(masks).absolute()
    for folder, what in ((images, "images"), (masks, "masks")):
        if not folder.is_dir():
            raise BadInputError(f"{what} folder not found (or not a folder)", folder)
    if images == masks:
        raise UsageError("give the images and the masks in two different folders")
    root = Path(os.path.commonpath([images, masks]))
    files = [p for p in _files(images, IMAGE_SUFFIXES)
             if not (masks in p.parents)]  # masks nested inside the images folder
    if not files:
        raise BadInputError(f"no images in it (suffixes {', '.join(sorted(IMAGE_SUFFIXES))})",
                            images)
    problems = Problems(checks.skip_bad)
    ids = make_ids([p.relative_to(images).as_posix() for p in files])
    records: list[Record] = []
    used: set[Path] = set()
    reporter.start("prepare-folder", total=len(files))
    for path, rec_id in zip(files, ids):
        with problems.guard():
            mask = find_mask(masks, path.relative_to(images))
            image = path.relative_to(root).as_posix()
            if mask is None:
                if not checks.allow_unlabelled:
                    raise BadInputError(f"no mask for it in {masks} (looked for "
                                        f"{path.stem}.png and the other known suffixes)", path)
                read_image(path) if checks.decode else probe_image(path)
                records.append(Record(id=rec_id, image=image, split=split))
            else:
                values = check_pair(path, mask, len(classes), checks.decode)
                used.add(mask)
                records.append(Record(id=rec_id, image=image,
                                      labelmap=mask.relative_to(root).as_posix(),
                                      tags=labelmap_tags(values, classes), tag_source="pixels",
                                      split=split))
        reporter.advance()
    if not records:
        raise BadInputError("no usable image (every one was bad)", images)
    suffixes = {s.lower() for s in LABELMAP_FORMATS.names()}
    orphans = [p.relative_to(masks).as_posix() for p in _files(masks, suffixes)
               if p not in used and not (images in p.parents)]
    if str(out) != "-" and Path(out).resolve() in {
            (root / r).resolve() for rec in records for r in (rec.image, rec.labelmap) if r}:
        raise UsageError(f"-o {out} is one of the input files: choose another manifest path")
    write_manifest(out, Manifest(classes, records, root))
    return {"out": str(out), "records": len(records),
            "with_labelmap": sum(r.labelmap is not None for r in records),
            "tag_counts": tag_counts(records, classes), "orphan_masks": orphans,
            "bad": problems.items}
