"""The inputs of ``dis infer``: image files, folders, manifests and a list of paths on stdin;
what it writes (:class:`InferOutputs`) and the output paths derived from the ids (never outside
the output folder, never a file the run reads)."""

from __future__ import annotations

import itertools
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from discli.infer.checkpoint import file_hash
from discli.data.fileio import MAX_LINE_BYTES, files_under, text_limit
from discli.errors import BadInputError, UsageError, quote
from discli.infer.provenance import OUTPUT_RECORDS, RUN_INFO
from discli.infer.visual import check_overlay_format
from discli.storage.safety import refuse_overlap

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm"}


@dataclass
class InputImage:
    id: str
    path: Path
    labelmap: Path | None = None  # the manifest's labelmap of the image: never written over
    source: Path | None = None  # the manifest the image came from: never written over


Plan = tuple[InputImage, dict[str, Path]]  # an input image and its output paths by kind


@dataclass(frozen=True)
class InferOutputs:
    """What ``dis infer`` writes (:mod:`discli.infer.predict`): labelmaps under ``out_dir``, with
    ``overlay`` blends too (``overlay_format`` "jpg" or "png", labelled pixels at ``opacity``),
    the probabilities file ``probs_path``; ``overwrite``: recompute the images whose outputs
    exist. ``protect``: files the run reads besides its inputs, as ``(path, what)`` pairs (the
    checkpoint), never written over."""

    out_dir: str | Path | None = None
    overlay: bool = False
    overlay_format: str = "jpg"
    opacity: float = 0.5
    probs_path: str | Path | None = None
    overwrite: bool = False
    protect: tuple[tuple[str | Path, str], ...] = ()

    @property
    def folder(self) -> Path | None:
        return Path(self.out_dir) if self.out_dir is not None else None


def _inside(path: Path, folder: Path | None) -> bool:
    return folder is not None and (path.resolve() == folder or folder in path.resolve().parents)


def _folder_images(folder: Path, exclude: Path | None = None) -> list[InputImage]:
    found = sorted(p for p in files_under(folder) if p.is_file() and not p.name.startswith(".")
                   and p.suffix.lower() in IMAGE_EXTENSIONS and not _inside(p, exclude))
    return [InputImage(p.relative_to(folder).with_suffix("").as_posix(), p) for p in found]


def _manifest_images(path: Path) -> list[InputImage]:
    from discli.data.manifest import read_manifest

    manifest = read_manifest(path)
    return [InputImage(rec.id, Path(manifest.image_path(rec)),
                       None if rec.labelmap is None else Path(manifest.labelmap_path(rec)), path)
            for rec in manifest.records]


def _expand(source: str, exclude: Path | None) -> list[InputImage]:
    path = Path(source)
    if path.is_dir():
        return _folder_images(path, exclude)
    if not path.exists():
        raise BadInputError("no such image, folder or manifest", path)
    if path.suffix.lower() in IMAGE_EXTENSIONS:
        return [InputImage(path.stem, path)]
    return _manifest_images(path)


def _stdin_lines(stream: TextIO | None) -> Iterator[str]:
    """The lines of a list of paths on stdin, bounded: ``dis infer - < /dev/zero`` (or an archive
    piped by mistake) is refused instead of read until memory runs out."""
    if stream is None:  # sys.stdin is None when fd 0 is closed
        return
    total, limit = 0, text_limit()
    for n in itertools.count(1):
        line = stream.readline(MAX_LINE_BYTES + 1)
        if not line:
            return
        total += len(line)
        if len(line) > MAX_LINE_BYTES or total > limit:
            raise BadInputError(f"line {n}: the list of paths has a line longer than "
                                f"{MAX_LINE_BYTES >> 20} MiB or is larger than "
                                f"{limit >> 20} MiB: not a list of paths", "<stdin>")
        yield line


def collect_inputs(sources: Sequence[str], stdin: TextIO | None = None,
                   exclude: str | Path | None = None) -> list[InputImage]:
    """Expand image files, folders (recursively; id = relative path without suffix), manifests
    (id = record id) and ``-`` (one path per line on stdin) into a list of unique ids.

    Folder scans skip hidden files and anything under ``exclude`` (the output folder, so a
    re-run does not take its own outputs for inputs).
    """
    exclude = Path(exclude).resolve() if exclude is not None else None
    images: list[InputImage] = []
    for source in sources:
        if source == "-":
            stream = stdin if stdin is not None else sys.stdin
            try:
                for line in _stdin_lines(stream):
                    line = line.strip()
                    if line and not line.startswith("#"):
                        images.extend(_expand(line, exclude))
            except UnicodeDecodeError as exc:
                raise BadInputError(f"the list of paths is not UTF-8 text ({exc.reason} at byte "
                                    f"{exc.start} of a line)", "<stdin>") from None
        else:
            images.extend(_expand(source, exclude))
    seen: dict[str, Path] = {}
    for image in images:
        try:
            image.id.encode("utf-8")
        except UnicodeEncodeError:  # bytes that are not UTF-8, as os.fsdecode's escapes
            raise BadInputError(f"file name {quote(image.id)} is not valid UTF-8, which the "
                                f"outputs (JSON, HDF5) cannot hold; rename the file",
                                image.path) from None
        if image.id in seen:
            raise BadInputError(f"two inputs share the id {quote(image.id)}: {seen[image.id]} and "
                                f"{image.path}; rename one or pass them in separate runs",
                                image.path)
        seen[image.id] = image.path
    if not images:
        where = ", ".join("<stdin>" if x == "-" else str(x) for x in sources) or "command line"
        raise BadInputError("no input images (give image files, folders, a manifest, or - for "
                            "a list of paths on stdin)", where)
    return images


def safe_join(out_dir: Path, name: str) -> Path:
    """``out_dir/name`` for an id-derived name, refusing anything that would leave out_dir."""
    parts = name.replace("\\", "/").split("/")
    if (not name or "\x00" in name or name.startswith("/") or any(p in ("", ".", "..")
                                                                    for p in parts)
            or (len(parts[0]) >= 2 and parts[0][1] == ":")):
        raise BadInputError(f"image id {quote(name)} would write outside the output folder "
                            f"(absolute, empty or '..' path component)", out_dir)
    path = out_dir.joinpath(*parts)
    root = out_dir.resolve()
    resolved = path.resolve()
    if resolved != root and root not in resolved.parents:
        raise BadInputError(f"image id {quote(name)} would write outside the output folder "
                            f"(through a symbolic link)", out_dir)
    return path


def output_paths(out_dir: Path, image_id: str, overlay: bool) -> dict[str, Path]:
    paths = {"labelmap": safe_join(out_dir, f"{image_id}.png"),
             "color": safe_join(out_dir, f"{image_id}_color.png")}
    if overlay:
        paths["overlay"] = safe_join(out_dir, f"{image_id}_overlay.jpg")
    return paths


def input_hash(path: Path) -> str:
    """Hash of an input image's bytes ("" when it cannot be read: such an image is never taken
    as done, and reading it for prediction gives the proper error)."""
    try:
        return file_hash(path)
    except OSError:
        return ""


def plan_outputs(inputs: Sequence[InputImage], outputs: InferOutputs) -> list[Plan]:
    """Every input with its output paths (none without an output folder); two images writing
    one file are refused."""
    out = outputs.folder
    plans = [(item, output_paths(out, item.id, outputs.overlay) if out is not None else {})
             for item in inputs]
    fmt = check_overlay_format(outputs.overlay_format)
    if fmt != "jpg":  # write_overlay goes by the suffix
        for _, paths in plans:
            if "overlay" in paths:
                paths["overlay"] = paths["overlay"].with_suffix(f".{fmt}")
    targets = [p for _, paths in plans for p in paths.values()]
    if len(set(targets)) != len(targets):
        raise BadInputError("two images would write the same output file (an id ending in "
                            "'_color' or '_overlay' next to its stem?)", out)
    return plans


def refuse_overlaps(inputs: Sequence[InputImage], plans: list[Plan],
                     outputs: InferOutputs) -> None:
    """No output may be a file the run reads (module docstring), whatever the flags say."""
    out = outputs.folder
    targets = [p for _, paths in plans for p in paths.values()]
    records = [out / RUN_INFO, out / OUTPUT_RECORDS] if out is not None else []
    if outputs.probs_path is not None:  # an HDF5 file written over a labelmap, and locked
        probs = outputs.probs_path.resolve()
        clash = next((p for p in targets + records if p.resolve() == probs), None)
        if clash is not None:
            raise UsageError(f"{{opt:probs}} {outputs.probs_path} is also an output of this "
                             f"command ({clash}); choose another {{opt:probs}} file")
    manifests = {item.source for item in inputs if item.source is not None}
    refuse_overlap(
        [(p, "output file") for p in targets] + [(outputs.probs_path, "{opt:probs} file")]
        + ([(out / RUN_INFO, "run record"), (out / OUTPUT_RECORDS, "record of outputs")]
           if out is not None else []),
        [(item.path, "input image") for item in inputs]
        + [(item.labelmap, "labelmap of the input manifest") for item in inputs]
        + [(m, "input manifest") for m in manifests] + list(outputs.protect),
        advice="choose another {opt:out} or {opt:probs}")
