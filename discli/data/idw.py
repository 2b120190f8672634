"""``dis prepare-idw``: images with captions -> a manifest tagged from the captions.

IDW ("Image Descriptions in the Wild", the paper's 40k web images) pairs each image with
sentences; the paper parses them into VOC tags. Here the captions may come in any format
registered in :data:`CAPTION_FORMATS` (third-party packages add more through the
``dis.caption_formats`` entry-point group):

- ``jsonl``: one JSON object a line, ``{"image": "images/a.jpg", "caption": "..."}`` or
  ``"captions": [...]``, optionally ``"id"``; image paths relative to the file's folder;
- ``coco``: a COCO captions JSON (``images`` with ``id`` and ``file_name``, ``annotations`` with
  ``image_id`` and ``caption``); file names relative to the JSON's folder (or ``--root``);
- ``folder``: a folder of images, each with ``<name>.txt`` beside it (one caption a line);
- ``manifest``: a dis manifest whose records carry captions, re-tagged (another class list or
  lexicon).

Every image is decoded once to validate it. Several captions of one image (COCO has five) are
all kept, one per line in the record's ``caption``, and tagged as their union.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from discli.data.captions import parse_captions
from discli.data.fileio import (check_line, decode_utf8, files_under, json_loads,
                                read_bytes, read_text)
from discli.data.images import read_image
from discli.data.manifest import (FORMAT as MANIFEST_FORMAT, Manifest, Record, check_id,
                                  check_relpath, read_manifest, write_manifest)
from discli.data.problems import Problems
from discli.data.voc import VOC_CLASSES
from discli.errors import BadInputError, UsageError
from discli.progress import NullReporter, Reporter
from discli.registry import Registry
from discli.storage.safety import refuse_overlap

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


@dataclass
class CaptionItem:
    image: str  # as written in the source: relative to the root, or absolute
    captions: list[str] = field(default_factory=list)
    where: str = ""  # "file:line" for messages
    id: str | None = None


@dataclass
class CaptionSource:
    root: Path  # where relative image paths are resolved unless --root says otherwise
    items: list[CaptionItem]


@dataclass
class CaptionFormat:
    read: Callable[[Path, Problems], CaptionSource]
    matches: Callable[[Path], bool]  # for format auto-detection; formats must not overlap


CAPTION_FORMATS: Registry[Any] = Registry("caption format", group="dis.caption_formats")


def _first_line(path: Path) -> str:
    try:
        with open(path, "rb") as f:
            return f.readline(65536).decode("utf-8-sig", "replace").strip()
    except OSError:
        return ""


def _is_manifest(path: Path) -> bool:
    return path.is_file() and f'"{MANIFEST_FORMAT}"' in _first_line(path)


def _captions_of(obj: dict[str, Any]) -> list[str]:
    caps = obj.get("captions", [obj["caption"]] if "caption" in obj else None)
    if not isinstance(caps, list) or not all(isinstance(c, str) for c in caps):
        raise ValueError("needs \"caption\": a string, or \"captions\": a list of strings")
    return caps


def read_jsonl(path: Path, problems: Problems) -> CaptionSource:
    items = []
    for n, raw in enumerate(read_bytes(path, "caption file").split(b"\n"), start=1):
        with problems.guard():
            check_line(raw, path, n, "caption line")
            line = decode_utf8(raw, path, n).strip()
            if not line:
                continue
            try:
                obj = json_loads(line)
                if not isinstance(obj, dict) or not isinstance(obj.get("image"), str):
                    raise ValueError('needs "image": a path string')
                item = CaptionItem(obj["image"], _captions_of(obj), f"{path}:{n}", obj.get("id"))
            except json.JSONDecodeError as exc:
                raise BadInputError(f"line {n}: malformed JSON ({exc.msg})", path) from None
            except ValueError as exc:
                raise BadInputError(f"line {n}: {exc}", path) from None
            items.append(item)
    return CaptionSource(path.parent, items)


def read_coco(path: Path, problems: Problems) -> CaptionSource:
    try:
        data = json_loads(read_text(path, "caption file"))
    except json.JSONDecodeError as exc:
        raise BadInputError(f"malformed JSON ({exc.msg} at line {exc.lineno})", path) from None
    if not (isinstance(data, dict) and isinstance(data.get("images"), list)
            and isinstance(data.get("annotations"), list)):
        raise BadInputError('not a COCO captions file (needs "images" and "annotations" lists)',
                            path)
    items: dict[Any, CaptionItem] = {}
    for i, img in enumerate(data["images"]):
        with problems.guard():
            if not isinstance(img, dict) or not isinstance(img.get("file_name"), str) \
                    or "id" not in img:
                raise BadInputError(f"images[{i}]: needs \"id\" and \"file_name\"", path)
            items[img["id"]] = CaptionItem(img["file_name"], [], f"{path}:images[{i}]")
    for i, ann in enumerate(data["annotations"]):
        with problems.guard():
            ok = isinstance(ann, dict) and isinstance(ann.get("caption"), str)
            if not ok or ann.get("image_id") not in items:
                raise BadInputError(f"annotations[{i}]: needs a \"caption\" string and the "
                                    "\"image_id\" of a listed image", path)
            items[ann["image_id"]].captions.append(ann["caption"])
    return CaptionSource(path.parent, list(items.values()))


def read_folder(path: Path, problems: Problems) -> CaptionSource:
    items = []
    for image in sorted(p for p in files_under(path) if p.suffix.lower() in IMAGE_SUFFIXES
                        and p.is_file() and not p.name.startswith(".")):
        rel = image.relative_to(path).as_posix()
        with problems.guard():
            txt = image.with_suffix(".txt")
            if not txt.is_file():
                raise BadInputError(f"no caption file {txt.name} beside the image", image)
            lines = [line.strip() for line in read_text(txt, "caption file").splitlines()]
            items.append(CaptionItem(rel, [line for line in lines if line], str(txt)))
    return CaptionSource(path, items)


def read_manifest_captions(path: Path, problems: Problems) -> CaptionSource:
    manifest = read_manifest(path)
    items = [CaptionItem(r.image, [c for c in (r.caption or "").split("\n") if c.strip()],
                         f"{path}:{r.id}", r.id) for r in manifest.records]
    return CaptionSource(manifest.root, items)


CAPTION_FORMATS.add("jsonl", CaptionFormat(
    read_jsonl, lambda p: p.is_file() and p.suffix.lower() in (".jsonl", ".ndjson")
    and not _is_manifest(p)))
CAPTION_FORMATS.add("coco", CaptionFormat(read_coco,
                                          lambda p: p.is_file() and p.suffix.lower() == ".json"))
CAPTION_FORMATS.add("folder", CaptionFormat(read_folder, lambda p: p.is_dir()))
CAPTION_FORMATS.add("manifest", CaptionFormat(read_manifest_captions, _is_manifest))


def detect_format(path: Path) -> str:
    found = [name for name in CAPTION_FORMATS.names() if CAPTION_FORMATS.get(name).matches(path)]
    if not found:
        raise UsageError(f"cannot tell the caption format of {path} (known: "
                         f"{', '.join(CAPTION_FORMATS.names())}); pass {{opt:format}}")
    return found[0]


_UNSAFE = re.compile(r"[^A-Za-z0-9._+-]")


def make_ids(images: Sequence[str]) -> list[str]:
    """File-name-safe ids: the file stem, or the whole relative path where stems collide."""
    def safe(text: str) -> str:
        return _UNSAFE.sub("_", text).lstrip(".-") or "image"  # no hidden or option-like ids

    stems = [safe(PurePosixPath(p.replace("\\", "/")).stem) for p in images]
    counts = Counter(stems)
    ids = [s if counts[s] == 1 else safe(str(PurePosixPath(p.replace("\\", "/")).with_suffix(""))
                                         .strip("/").replace("/", "__"))
           for s, p in zip(stems, images)]
    seen: Counter[str] = Counter()
    unique = []
    for i in ids:
        seen[i] += 1
        unique.append(i if seen[i] == 1 else f"{i}-{seen[i]}")
    return unique


def _merge(items: list[CaptionItem]) -> list[CaptionItem]:
    """One item per image: several lines (or COCO annotations) for one image pool captions."""
    merged: dict[str, CaptionItem] = {}
    for item in items:
        key = item.image.replace("\\", "/")
        if key in merged:
            merged[key].captions += item.captions
        else:
            merged[key] = CaptionItem(item.image, list(item.captions), item.where, item.id)
    return list(merged.values())


@dataclass(frozen=True)
class CaptionReading:
    """How :func:`prepare_idw` reads its captions: their format, the folder their image paths
    are relative to and the lexicon that turns their words into classes."""

    fmt: str = "auto"  # a name in CAPTION_FORMATS, or "auto": told from the source
    root: str | Path | None = None  # None: the format's own (the caption file's folder)
    lexicon: str | Path | None = None  # a lexicon JSON replacing the shipped one


def prepare_idw(source: str | Path, out: str | Path, classes: Sequence[str] = VOC_CLASSES,
                split: str = "train", reading: CaptionReading = CaptionReading(),
                skip_bad: bool = False, reporter: Reporter | None = None,
                allow_empty: bool = False) -> dict[str, Any]:
    """Write a caption-tagged manifest to ``out`` (``"-"``: stdout) and return a report:
    ``{"out", "format", "records", "tag_counts", "untagged", "bad"}``. A source without any
    usable image is refused unless ``allow_empty`` (a benchmark without tagged images)."""
    reporter = reporter or NullReporter()
    classes = list(classes)
    source = Path(source)
    if not source.exists():
        raise BadInputError("caption input not found", source)
    root, lexicon = reading.root, reading.lexicon
    fmt = detect_format(source) if reading.fmt == "auto" else reading.fmt
    problems = Problems(skip_bad)
    src = CAPTION_FORMATS.get(fmt).read(source, problems)
    image_root = Path(root) if root is not None else src.root
    items = _merge(src.items)
    # The manifest written must not replace what it is made from (`-o caps.jsonl`).
    refuse_overlap([(out, "output manifest")],
                   [(source, f"caption source ({fmt})")]
                   + [(image_root / it.image, "image") for it in items]
                   + [(Path(it.where), "caption file") for it in items if fmt == "folder"]
                   + [(lexicon, "lexicon")], advice="choose another {opt:out}")
    ids = make_ids([it.image for it in items])
    records: list[Record] = []
    taken: set[str] = set()
    reporter.start("prepare-idw", total=len(items))
    for item, auto_id in zip(items, ids):
        with problems.guard():
            try:
                image = check_relpath(item.image, "image")
                rec_id = check_id(item.id) if item.id is not None else auto_id
            except ValueError as exc:
                raise BadInputError(str(exc), item.where) from None
            if rec_id in taken:
                raise BadInputError(f"duplicate id {rec_id!r}", item.where)
            path = image_root / image
            if not path.exists():  # name the path looked at: "w1.jpg" alone says not where
                base = ("{opt:root}" if root is not None
                        else "the caption file's folder; give {opt:root} the folder that holds "
                             "the images")
                raise BadInputError(f"image not found (paths of {source.name} are relative to "
                                    f"{base})", path.absolute())
            read_image(path)
            taken.add(rec_id)
            records.append(Record(id=rec_id, image=image,
                                  tags=parse_captions(item.captions, classes, lexicon),
                                  tag_source="caption", split=split,
                                  caption="\n".join(item.captions) if item.captions else None))
        reporter.advance()
    if not records and not allow_empty:  # it would only fail later, in finetune
        left_out = f" ({len(problems.items)} left out as bad)" if problems.items else ""
        raise BadInputError(f"no captioned image found ({fmt} format){left_out}; nothing "
                            f"written", source)
    write_manifest(out, Manifest(classes, records, image_root))
    counts = Counter(t for r in records for t in r.tags)
    return {"out": str(out), "format": fmt, "records": len(records),
            "tag_counts": {c: counts.get(c, 0) for c in classes[1:]},
            "untagged": [r.id for r in records if not r.tags], "bad": problems.items}
