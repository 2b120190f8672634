"""Manifests: one JSON Lines file lists a dataset split with its images, labelmaps and tags.

Format (documented with examples in ``data_manifests/README.md``)::

    {"format": "dis-manifest", "version": 1, "root": "../VOCdevkit/VOC2012", "classes": [...]}
    {"id": "2007_000033", "image": "JPEGImages/2007_000033.jpg", "labelmap": "SegmentationClass/
     2007_000033.png", "tags": ["aeroplane"], "tag_source": "pixels", "split": "train"}
    ...

The header's ``root`` is relative to the folder of the manifest file (or absolute); record paths
are relative to the root (or absolute). A relative record path may not contain ``..``: a
manifest must never point dis outside the tree it describes, and since ids name the files that
``dis infer`` and the caches write, ids are restricted to safe file names as well.

Every problem is a :class:`BadInputError` naming the file and the line.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from discli.data.fileio import (check_line, decode_utf8, json_loads, read_bytes, read_text,
                                write_text)
from discli.errors import BadInputError, UsageError, quote

if TYPE_CHECKING:  # torch is only needed by tag_vector; keep `import manifest` light
    import torch

FORMAT = "dis-manifest"
VERSION = 1
TAG_SOURCES = ("pixels", "caption", "manual")
# A file-name-safe id: ids become file names of predictions and cache keys.
ID_PATTERN = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._+-]{0,199}")
_RECORD_KEYS = {"id", "image", "labelmap", "tags", "tag_source", "split", "caption"}
# Labelmaps are 8-bit and 255 means void: class indices 0..254, so at most 255 classes.
MAX_CLASSES = 255


@dataclass
class Record:
    id: str
    image: str  # relative to the manifest root, or absolute
    labelmap: str | None = None
    tags: list[str] = field(default_factory=list)  # class names, never the background
    tag_source: str = "pixels"  # "pixels" | "caption" | "manual"
    split: str = "train"
    caption: str | None = None


@dataclass
class Manifest:
    classes: list[str]  # index order, background first
    records: list[Record]
    root: Path
    path: Path | None = None

    def image_path(self, rec: Record) -> Path:
        return self.root / rec.image

    def labelmap_path(self, rec: Record) -> Path | None:
        return None if rec.labelmap is None else self.root / rec.labelmap

    def tag_vector(self, rec: Record) -> torch.Tensor:
        """(K,) float multi-hot; the background (index 0) is always present."""
        import torch

        index = {name: i for i, name in enumerate(self.classes)}
        vec = torch.zeros(len(self.classes), dtype=torch.float32)
        vec[0] = 1.0
        for tag in rec.tags:
            vec[index[tag]] = 1.0
        return vec

    def select(self, split: str | None = None) -> Manifest:
        """A manifest with only the records of ``split`` (all when None)."""
        records = [r for r in self.records if split is None or r.split == split]
        return replace(self, records=records)

    def __len__(self) -> int:
        return len(self.records)


def check_id(value: object) -> str:
    if not isinstance(value, str) or not ID_PATTERN.fullmatch(value):
        raise ValueError(f"id {quote(value)} is not a safe file name (letters, digits, '_', '-', "
                         "'+', '.', not starting with '.' or '-', at most 200 characters)")
    return value


def check_relpath(value: object, key: str) -> str:
    """A record path: absolute, or relative without any '..' component."""
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{key!r} must be a non-empty string")
    if "\x00" in value:
        raise ValueError(f"{key!r} contains a NUL byte")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # a file name of bytes that are not UTF-8 (os.fsdecode's escapes)
        raise ValueError(f"{key!r} path {quote(value)} is not valid UTF-8, which a manifest "
                         f"(JSON) cannot hold; rename the file") from None
    if os.path.isabs(value):
        return value
    if ".." in PurePosixPath(value.replace("\\", "/")).parts:
        raise ValueError(f"{key!r} path {quote(value)} escapes the manifest root ('..' is not "
                         f"allowed)")
    return value


def normalize_tags(tags: object, classes: Sequence[str]) -> list[str]:
    """Validate tag names and return them unique, in class-index order."""
    if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
        raise ValueError("'tags' must be a list of class names")
    index = {name: i for i, name in enumerate(classes)}
    for tag in tags:
        if tag not in index:
            raise ValueError(f"unknown class {quote(tag)} in tags (classes: "
                             f"{', '.join(classes[1:])})")
        if index[tag] == 0:
            raise ValueError(f"{quote(tag)} is the background class, which is never a tag")
    return sorted(set(tags), key=index.__getitem__)


def check_classes(classes: object) -> list[str]:
    if (not isinstance(classes, list) or len(classes) < 2
            or not all(isinstance(c, str) and c.strip() == c and c for c in classes)):
        raise ValueError("'classes' must list at least two non-empty names, background first")
    if len(set(classes)) != len(classes):
        raise ValueError("'classes' has duplicate names")
    if len(classes) > MAX_CLASSES:
        raise ValueError(f"'classes' lists {len(classes)} names; at most {MAX_CLASSES} are "
                         f"possible (labelmaps are 8-bit and 255 means void)")
    return list(classes)


def record_from_dict(obj: object, classes: Sequence[str]) -> Record:
    if not isinstance(obj, dict):
        raise ValueError("a record must be a JSON object")
    unknown = set(obj) - _RECORD_KEYS
    if unknown:
        raise ValueError(f"unknown key(s) {quote(sorted(unknown))} (known: "
                         f"{sorted(_RECORD_KEYS)})")
    for key in ("id", "image"):
        if key not in obj:
            raise ValueError(f"missing key {key!r}")
    labelmap = obj.get("labelmap")
    caption = obj.get("caption")
    tag_source = obj.get("tag_source", "pixels")
    split = obj.get("split", "train")
    if tag_source not in TAG_SOURCES:
        raise ValueError(f"'tag_source' must be one of {', '.join(TAG_SOURCES)}, "
                         f"not {quote(tag_source)}")
    if not isinstance(split, str) or not split:
        raise ValueError("'split' must be a non-empty string")
    if caption is not None and not isinstance(caption, str):
        raise ValueError("'caption' must be a string or null")
    return Record(id=check_id(obj["id"]), image=check_relpath(obj["image"], "image"),
                  labelmap=None if labelmap is None else check_relpath(labelmap, "labelmap"),
                  tags=normalize_tags(obj.get("tags", []), classes), tag_source=tag_source,
                  split=split, caption=caption)


def record_to_dict(rec: Record) -> dict[str, Any]:
    out: dict[str, Any] = {"id": rec.id, "image": rec.image}
    if rec.labelmap is not None:
        out["labelmap"] = rec.labelmap
    out.update(tags=list(rec.tags), tag_source=rec.tag_source, split=rec.split)
    if rec.caption is not None:
        out["caption"] = rec.caption
    return out


def _parse_header(line: str, path: object) -> dict[str, Any]:
    try:
        header = json_loads(line)
    except json.JSONDecodeError:
        header = None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise BadInputError(f'line 1: not a dis manifest (the first line must be a header '
                            f'{{"format": "{FORMAT}", "version": {VERSION}, "root": ..., '
                            f'"classes": [...]}})', path)
    if header.get("version") != VERSION:
        raise BadInputError(f"line 1: manifest format version {header.get('version')!r} is not "
                            f"supported (this dis reads version {VERSION})", path)
    try:
        header["classes"] = check_classes(header.get("classes"))
    except ValueError as exc:
        raise BadInputError(f"line 1: {exc}", path) from None
    root = header.get("root", ".")
    if not isinstance(root, str) or not root:
        raise BadInputError("line 1: 'root' must be a non-empty path string", path)
    return header


def parse_manifest(text: str, path: str | Path = "<manifest>",
                   root: str | Path | None = None, base: Path | None = None) -> Manifest:
    """Parse manifest text; ``base`` is the folder the header's relative root is taken from."""
    # Split on "\n" only: str.splitlines() also breaks at U+0085, U+2028..., which JSON strings
    # written with ensure_ascii=False may contain.
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()  # the final newline
    if not lines:
        raise BadInputError("empty manifest (no header line)", path)
    header = _parse_header(lines[0], path)
    classes = header["classes"]
    records: list[Record] = []
    seen: dict[str, int] = {}
    for n, line in enumerate(lines[1:], start=2):
        if not line.strip():
            raise BadInputError(f"line {n}: empty line", path)
        check_line(line, path, n, "manifest line")
        try:
            obj = json_loads(line)
        except json.JSONDecodeError as exc:
            raise BadInputError(f"line {n}: malformed JSON ({exc.msg} at column {exc.colno})",
                                path) from None
        try:
            rec = record_from_dict(obj, classes)
        except ValueError as exc:
            raise BadInputError(f"line {n}: {exc}", path) from None
        if rec.id in seen:
            raise BadInputError(f"line {n}: duplicate id {quote(rec.id)} (first on line "
                                f"{seen[rec.id]})", path)
        seen[rec.id] = n
        records.append(rec)
    if root is None:
        root = Path(header["root"])
        if not root.is_absolute():
            root = (base or Path.cwd()) / root
    root = Path(os.path.normpath(Path(root).absolute()))
    return Manifest(classes=classes, records=records, root=root,
                    path=None if str(path).startswith("<") else Path(path))


def read_manifest(path: str | Path, root: str | Path | None = None) -> Manifest:
    """Read a manifest file (``"-"`` reads stdin); ``root`` overrides the header's root."""
    if str(path) == "-":
        return parse_manifest(read_text("-"), "<stdin>", root=root, base=Path.cwd())
    path = Path(path)
    data = read_bytes(path, "manifest")
    # Decode per line so a stray non-UTF-8 byte is reported with its line number.
    lines = []
    for n, raw in enumerate(data.split(b"\n"), start=1):
        check_line(raw, path, n, "manifest line")
        lines.append(decode_utf8(raw, path, n))
    return parse_manifest("\n".join(lines), path, root=root, base=path.absolute().parent)


def format_manifest(manifest: Manifest, root_text: str) -> str:
    classes = check_classes(list(manifest.classes))
    header = {"format": FORMAT, "version": VERSION, "root": root_text, "classes": classes}
    lines = [json.dumps(header, ensure_ascii=False)]
    seen: set[str] = set()
    for rec in manifest.records:
        # Validate on the way out too: dis never writes a manifest it would refuse to read.
        try:
            obj = record_from_dict(record_to_dict(rec), classes)
        except ValueError as exc:
            raise BadInputError(f"record {rec.id!r}: {exc}", manifest.path) from None
        if obj.id in seen:
            raise BadInputError(f"duplicate id {obj.id!r}", manifest.path)
        seen.add(obj.id)
        lines.append(json.dumps(record_to_dict(obj), ensure_ascii=False))
    return "\n".join(lines) + "\n"


def write_manifest(path: str | Path, manifest: Manifest) -> None:
    """Write atomically (temp file + rename); ``"-"`` writes to stdout.

    The header's root is stored relative to the manifest's folder when possible, so a dataset
    folder moved as a whole keeps working; on stdout it is absolute (the reader's folder is
    unknown).
    """
    root = Path(os.path.normpath(Path(manifest.root).absolute()))
    if str(path) == "-":
        root_text = str(root)
    else:
        folder = Path(path).absolute().parent
        try:
            root_text = Path(os.path.relpath(root, folder)).as_posix()
        except ValueError:  # another drive on Windows
            root_text = str(root)
    write_text(path, format_manifest(manifest, root_text))


# COCO's 80 object classes in their usual (category id) order; masks index them 1..80.
COCO_THINGS = (
    "person bicycle car motorcycle airplane bus train truck boat traffic_light fire_hydrant "
    "stop_sign parking_meter bench bird cat dog horse sheep cow elephant bear zebra giraffe "
    "backpack umbrella handbag tie suitcase frisbee skis snowboard sports_ball kite "
    "baseball_bat baseball_glove skateboard surfboard tennis_racket bottle wine_glass cup fork "
    "knife spoon bowl banana apple sandwich orange broccoli carrot hot_dog pizza donut cake "
    "chair couch potted_plant bed dining_table toilet tv laptop mouse remote keyboard "
    "cell_phone microwave oven toaster sink refrigerator book clock vase scissors teddy_bear "
    "hair_drier toothbrush").split()


def named_classes(name: str) -> list[str] | None:
    """A shipped class list by name: ``voc`` (the 21 VOC12 classes), ``coco`` (background and
    COCO's 80 objects, spaces as ``_``); None for any other name."""
    if name == "voc":
        from discli.data.voc import VOC_CLASSES  # (voc imports this module)

        return list(VOC_CLASSES)
    if name == "coco":
        return ["background", *COCO_THINGS]
    return None


def parse_classes(spec: str | Sequence[str]) -> list[str]:
    """Classes from a comma list (``"cat,dog"``), a file (one name a line), a named list
    (:func:`named_classes`: ``"voc"``, ``"coco"``) or a sequence.

    ``background`` is put first when missing; anywhere but first it is an error. A single name
    that is neither a file nor a named list is refused: it is far more often a mistyped file or
    list name than a one-class problem (which ``"background,NAME"`` still gives).
    """
    path = None
    if isinstance(spec, str):
        candidate = Path(spec)
        named = named_classes(spec.strip()) if "," not in spec else None
        if named is not None and not candidate.is_file():
            return named
        if "," not in spec and candidate.is_file():
            path = candidate
            names = [line.split("#", 1)[0].strip() for line in read_text(path).splitlines()]
        elif "," not in spec and spec.strip() and spec.strip() != "background":
            raise UsageError(f"{{opt:classes}} {quote(spec)}: no such file and not a named list "
                             "(voc, coco); for a single class give background,NAME")
        else:
            names = [part.strip() for part in spec.split(",")]
        names = [n for n in names if n]
    else:
        names = list(spec)
    if "background" not in names:
        names = ["background", *names]
    problem = None
    if names[0] != "background":
        problem = "'background' must come first"
    else:
        try:
            names = check_classes(names)
        except ValueError as exc:
            problem = str(exc)
    if problem:
        if path is not None:
            raise BadInputError(f"class list: {problem}", path)
        raise UsageError(f"{{opt:classes}}: {problem}")
    return names

