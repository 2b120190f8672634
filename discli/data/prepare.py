"""``dis prepare-voc``: a VOCdevkit tree (and optionally SBD) -> one manifest per split.

Written into the output folder:

- ``<split>.jsonl`` for every ``ImageSets/Segmentation/<split>.txt`` (train, val, trainval,
  test when present), root = the VOC2012 folder;
- with SBD: ``sbd_train.jsonl``, ``sbd_val.jsonl`` and ``train_aug.jsonl``, the usual
  augmented training set: (VOC train ∪ SBD train ∪ SBD val) minus VOC val. An id that VOC
  itself labels keeps VOC's labelmap (finer, with void borders); the others use SBD's. Their root
  is the deepest folder holding both trees, so record paths stay inside it.

Tags come from the labelmaps (``tag_source: "pixels"``). Only manifests are written, never
copies of images or labelmaps.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from discli.data.manifest import Manifest, Record, write_manifest
from discli.data.problems import Problems
from discli.data.sbd import find_sbd_root, sbd_records
from discli.data.voc import (VOC_CLASSES, find_voc_root, read_id_list, voc_records,
                             voc_split_ids, voc_splits)
from discli.errors import UsageError
from discli.progress import NullReporter, Reporter


def rebase(records: list[Record], old_root: Path, new_root: Path) -> list[Record]:
    """Re-express record paths (relative to old_root, or absolute) relative to new_root."""
    def rel(p: str | None) -> str | None:
        if p is None:
            return None
        return Path(os.path.relpath(old_root / p, new_root)).as_posix()

    return [replace(r, image=rel(r.image), labelmap=rel(r.labelmap)) for r in records]


def tag_counts(records: list[Record], classes: Sequence[str]) -> dict[str, int]:
    counts = Counter(t for r in records for t in r.tags)
    return {c: counts.get(c, 0) for c in classes[1:]}


def _summary(path: Path, manifest: Manifest) -> dict[str, Any]:
    return {"path": str(path), "records": len(manifest.records),
            "with_labelmap": sum(r.labelmap is not None for r in manifest.records),
            "tag_counts": tag_counts(manifest.records, manifest.classes)}


def _splits_to_write(voc_root: Path, available: list[str], splits: Sequence[str] | None,
                     with_sbd: bool) -> tuple[list[str], list[str]]:
    """The VOC splits to write, and those asked for (or train/val when ``splits`` is None)
    that the tree lacks; with none of them there, UsageError."""
    # without splits: every list there, and the usual train and val are expected
    wanted = list(splits) if splits else [*available,
                                          *(s for s in ("train", "val") if s not in available)]
    missing = [s for s in wanted if s not in available]
    if missing and len(missing) == len(wanted):
        raise UsageError(f"split(s) {', '.join(missing)} not in {voc_root}/ImageSets/"
                         f"Segmentation (available: {', '.join(available) or 'none'})")
    # A tree with train.txt but no val.txt is common (a VOC subset): the splits that exist are
    # still worth writing; the report lists the skipped ones for the caller to warn about.
    wanted = [s for s in wanted if s in available]
    if with_sbd:  # train_aug needs VOC's train labelmaps and val list
        wanted += [s for s in ("train", "val") if s in available and s not in wanted]
    return wanted, missing


def _train_aug(voc_train: Manifest, sbd_recs: dict[str, list[Record]], val_ids: set[str],
               both: Path) -> Manifest:
    """(VOC train ∪ SBD train ∪ SBD val) minus VOC val, the first record of an id kept (VOC's
    labelmaps are the finer), relative to ``both`` (the folder holding both trees)."""
    merged: dict[str, Record] = {}
    for rec in [*rebase(voc_train.records, voc_train.root, both), *sbd_recs.get("train", []),
                *sbd_recs.get("val", [])]:
        if rec.id not in val_ids and rec.id not in merged:
            merged[rec.id] = replace(rec, split="train_aug")
    return Manifest(voc_train.classes, list(merged.values()), both)


def _write_all(manifests: dict[str, Manifest], out_dir: Path) -> dict[str, Any]:
    """Write ``<name>.jsonl`` for every manifest; returns their summaries."""
    out = {}
    for name, manifest in manifests.items():
        path = out_dir / f"{name}.jsonl"
        write_manifest(path, manifest)
        out[name] = _summary(path, manifest)
    return out


def prepare_voc(voc: str | Path, out_dir: str | Path, sbd: str | Path | None = None,
                splits: Sequence[str] | None = None, classes: Sequence[str] = VOC_CLASSES,
                skip_bad: bool = False, decode: bool = False,
                reporter: Reporter | None = None) -> dict[str, Any]:
    """Write the manifests; returns a report: ``{"out", "manifests": {name: summary}, "bad",
    "skipped"}`` (``skipped``: the split lists asked for, or train/val when ``splits`` is None,
    that the tree lacks; the others are written; with none of them there, UsageError).

    ``decode=True`` decodes every image fully (catches truncated JPEGs; slower); by default
    only image headers are read, which still catches missing, empty, unidentifiable, oversized
    and wrongly sized images. Every labelmap is always read (the tags come from it).
    """
    reporter = reporter or NullReporter()
    classes = list(classes)
    voc_root = find_voc_root(voc).absolute()
    sbd_root = find_sbd_root(sbd).absolute() if sbd is not None else None
    out_dir = Path(out_dir)
    available = voc_splits(voc_root)
    wanted, missing = _splits_to_write(voc_root, available, splits, sbd_root is not None)
    sbd_splits = [s for s in ("train", "val") if sbd_root and (sbd_root / f"{s}.txt").is_file()]
    total = sum(len(voc_split_ids(voc_root, s)) for s in wanted)
    total += sum(len(read_id_list(sbd_root / f"{s}.txt")) for s in sbd_splits)
    problems = Problems(skip_bad)
    reporter.start("prepare-voc", total=total or None)
    manifests: dict[str, Manifest] = {}
    for split in wanted:
        recs = voc_records(voc_root, split, classes, problems, decode, reporter.advance)
        manifests[split] = Manifest(classes, recs, voc_root)
    if sbd_root is not None:
        both = Path(os.path.commonpath([voc_root, sbd_root]))
        sbd_recs: dict[str, list[Record]] = {}
        for split in sbd_splits:
            recs = sbd_records(sbd_root, split, voc_root, classes, problems, decode,
                               reporter.advance)
            sbd_recs[split] = recs = rebase(recs, both, both)  # absolute -> relative to both
            manifests[f"sbd_{split}"] = Manifest(classes, recs, both)
        if "train" in manifests and "val" in available:
            # The val list from the file, not the val records: a skipped bad val image must
            # still never leak into training.
            manifests["train_aug"] = _train_aug(manifests["train"], sbd_recs,
                                                set(voc_split_ids(voc_root, "val")), both)
    out = _write_all(manifests, out_dir)
    reporter.log(f"wrote {len(out)} manifest(s) to {out_dir}")
    skipped = [f"{voc_root / 'ImageSets' / 'Segmentation' / s}.txt" for s in missing]
    return {"out": str(out_dir), "manifests": out, "bad": problems.items, "skipped": skipped}
