"""`dis infer` as a library: collect inputs, batch by size, write labelmaps and probabilities.

Outputs for an image with id ``ID`` under ``out_dir`` (an id may contain "/": sub-folders):

    ID.png           class indices, 8-bit greyscale ('L'), at the image's own resolution
    ID_color.png     the same labelmap with the VOC palette ('P')
    ID_overlay.jpg   (overlay=True) the image with the labelmap's non-background pixels blended
                     with their class colour at ``opacity`` (background left as it is)

Final probabilities (stride 8) are upsampled bilinearly (align_corners=False) to the image size
before the argmax. Images are batched only with images of the *same size* (never padded), so an
image's prediction does not depend on its batch mates. Every file is written atomically (temp +
rename); an image whose requested outputs all exist *and were made from the same input file
with the same checkpoint and settings* is skipped (resume) unless ``overwrite``.
``out_dir/.dis-infer.json`` records the checkpoint and settings: resuming into a folder made with
other ones is refused. ``out_dir/.dis-infer.outputs.jsonl`` records what made each output, one
line per image appended once its files are written: ``{"id", "input": hash of the input file's
bytes, "made": hash of checkpoint and settings}``. An image whose record is missing or differs
(another image under the same id, say) is predicted again; a folder without ``.dis-infer.json``
that already holds a file of an output's name is refused (the file was not made by dis infer).

No output may be a file the run reads: an input image, a labelmap of an input manifest, the
manifest, the checkpoint (:func:`discli.safety.refuse_overlap`, exit 2, whatever the flags).

``probs_path`` (HDF5): root attrs ``format="dis-probs"``, ``format_version``, ``classes`` (JSON),
``steps``, ``checkpoint_hash``; ``/entries/<key>`` per image (key = id with "/" as "%2F") holds
``probs`` float16 (K, H, W) at the image's resolution, ``tag_probs`` float32 (K,), attrs ``id``
and ``input`` (hash of the input file: an entry of another image under the same id is redone).
While a run is in progress, entries go to small part files (``.<name>.parts/part-NNNNNN.h5``),
each written under a temporary name and renamed when complete (every :data:`PROBS_PART_IMAGES`
images or :data:`PROBS_PART_SECONDS` seconds); when the run ends (also on an error or ^C) the
entries of the existing file and of the parts are merged into a new file that replaces it
(temp + rename). So the file is never torn, and a run killed with SIGKILL loses at most the
part being written: a re-run takes the finished parts as done.

Only one process may write an output folder or probabilities file at a time: :func:`predict`
locks them (:mod:`discli.lock`); a second one stops with exit code 5.

Under torchrun (same command line; :func:`discli.distributed.setup_distributed`) every rank
takes its own per-rank lock (:mod:`discli.lock`), so the ranks of one job never refuse each other
while a second job still is refused. Rank 0 alone cleans torn temporary files, checks and writes
``.dis-infer.json``, decides which images are already done, and plans the batches one process
would form (from the image headers, :func:`plan_batches`); it broadcasts that plan and the ranks
take batches round-robin (:func:`discli.distributed.shard`): every image is computed exactly once,
in the batch it would have had alone. Each rank writes its own images' files and its own
probability parts (``part-r<rank>-NNNNNN.h5`` beside rank 0's ``part-NNNNNN.h5``); after a
barrier rank 0 merges all the parts into the one file. A failure while locking or checking on any
rank stops every rank (:func:`discli.distributed.together`).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import itertools
import json
import os
import re
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import h5py
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from discli.cache import key_of
from discli.checkpoint import (atomic_write_bytes, default_inference_settings, file_hash,
                               inference_config, inference_settings, load_model)
from discli.distributed import (DistInfo, barrier, gather_to_main, on_main, setup_distributed,
                                shard, together)
from discli.data.fileio import MAX_LINE_BYTES, MAX_TEXT_BYTES
from discli.errors import BadInputError, IncompatibleError, UsageError, quote, system_error
from discli.inference import InferenceConfig, InferenceResult, infer_steps
from discli.lock import lock_file, lock_folder, make_folder, remove_stale_temps
from discli.model import DISNet
from discli.multiscale import check_scales
from discli.progress import NullReporter, Reporter
from discli.safety import refuse_overlap

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm"}
PROBS_FORMAT = "dis-probs"
PROBS_FORMAT_VERSION = 1
RUN_INFO = ".dis-infer.json"
OUTPUT_RECORDS = ".dis-infer.outputs.jsonl"
PROBS_PART_IMAGES = 32  # a kill loses at most this many images' probabilities ...
PROBS_PART_SECONDS = 60.0  # ... or this much work


# ------------------------------------------------------------------------------------- model


def checkpoint_classes(state: dict[str, Any], num_classes: int) -> list[str]:
    classes = state.get("classes")
    if isinstance(classes, (list, tuple)) and len(classes) == num_classes:
        return [str(c) for c in classes]
    return ["background"] + [f"class{k}" for k in range(1, num_classes)]


@dataclass
class LoadedModel:
    model: DISNet
    classes: list[str]
    checkpoint_hash: str
    path: Path
    # the checkpoint's inference settings (t_tr, t_ts, lr, momentum, tag_weight, proximity,
    # method): :func:`discli.checkpoint.inference_settings`
    inference: dict[str, Any] = field(default_factory=default_inference_settings)

    def inference_config(self, steps: int | None = None, **overrides: Any) -> InferenceConfig:
        """The checkpoint's inference settings, with every override that is not None."""
        return inference_config(self.inference, steps, **overrides)


def load_for_inference(checkpoint: str | Path, device: torch.device | str = "cpu"
                       ) -> LoadedModel:
    model, state = load_model(checkpoint, device)
    return LoadedModel(model, checkpoint_classes(state, model.num_classes), file_hash(checkpoint),
                       Path(checkpoint), inference_settings(state, checkpoint))


def check_classes(model_classes: Sequence[str], other: Sequence[str], what: str,
                  path: str | Path | None, checkpoint: str | Path | None = None) -> None:
    """Refuse data or a cache whose class count differs from the checkpoint's."""
    if len(model_classes) != len(other):
        model = f"checkpoint {checkpoint}" if checkpoint is not None else "the model"
        raise IncompatibleError(f"{what} has {len(other)} classes but {model} has "
                                f"{len(model_classes)}; use a checkpoint trained on these "
                                f"classes", path)


# ----------------------------------------------------------------------------- inputs


@dataclass
class InputImage:
    id: str
    path: Path
    labelmap: Path | None = None  # the manifest's labelmap of the image: never written over
    source: Path | None = None  # the manifest the image came from: never written over


def _inside(path: Path, folder: Path | None) -> bool:
    return folder is not None and (path.resolve() == folder or folder in path.resolve().parents)


def _folder_images(folder: Path, exclude: Path | None = None) -> list[InputImage]:
    found = sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".")
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
    total = 0
    for n in itertools.count(1):
        line = stream.readline(MAX_LINE_BYTES + 1)
        if not line:
            return
        total += len(line)
        if len(line) > MAX_LINE_BYTES or total > MAX_TEXT_BYTES:
            raise BadInputError(f"line {n}: the list of paths has a line longer than "
                                f"{MAX_LINE_BYTES >> 20} MiB or is larger than "
                                f"{MAX_TEXT_BYTES >> 20} MiB: not a list of paths", "<stdin>")
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


# ----------------------------------------------------------------------------- output paths


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


# ----------------------------------------------------------------------------- writers


@functools.lru_cache(maxsize=1)
def palette() -> np.ndarray:
    """The VOC colour map, uint8 (256, 3)."""
    from discli.data.voc import voc_palette

    return np.asarray(voc_palette(), dtype=np.uint8).reshape(256, 3)


def _save_image(path: Path, image: Image.Image, fmt: str, **options: Any) -> None:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    atomic_write_bytes(path, lambda f: f.write(buffer.getvalue()))


def write_index_png(path: Path, labelmap: np.ndarray) -> None:
    _save_image(path, Image.fromarray(labelmap.astype(np.uint8), mode="L"), "PNG")


def write_color_png(path: Path, labelmap: np.ndarray) -> None:
    h, w = labelmap.shape
    image = Image.frombytes("P", (w, h), labelmap.astype(np.uint8).tobytes())
    image.putpalette(palette().reshape(-1).tolist())
    _save_image(path, image, "PNG")


def overlay_image(image: np.ndarray, labelmap: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """:func:`discli.visual.overlay`: labelled non-background pixels blended, the rest kept."""
    from discli.visual import overlay

    return overlay(image, labelmap, alpha)


def write_overlay(path: Path, image: np.ndarray, labelmap: np.ndarray,
                  opacity: float = 0.5) -> None:
    _save_image(path, Image.fromarray(overlay_image(image, labelmap, opacity)), "JPEG",
                quality=90)


class ProbsWriter:
    """Writes the ``--probs`` HDF5 file (see the module docstring): crash-safe part files while
    the run goes, merged into the file (temp + rename) by :meth:`close`.

    ``rank``: under torchrun, rank 0 cleans torn temporaries, deletes old parts (``overwrite``),
    checks the file and the parts and lists the ids already done (:attr:`done`), and merges every
    rank's parts in the end; the other ranks only write parts of their own name (``rank`` > 0:
    nothing is read or deleted, :attr:`done` stays empty, close with ``commit=False``).
    """

    def __init__(self, path: str | Path, attrs: dict[str, Any], overwrite: bool = False,
                 part_images: int = PROBS_PART_IMAGES,
                 part_seconds: float = PROBS_PART_SECONDS, rank: int = 0):
        self.path = Path(path)
        self.attrs = attrs
        self.overwrite = overwrite
        self.part_images, self.part_seconds = part_images, part_seconds
        self.parts_dir = self.path.with_name(f".{self.path.name}.parts")
        self.rank = rank
        self._prefix = "part-" if rank == 0 else f"part-r{rank}-"
        self.done: set[str] = set()
        self.inputs: dict[str, str] = {}  # id -> hash of the input its entry was made from
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if rank == 0:
            remove_stale_temps(self.path.parent)
            remove_stale_temps(self.parts_dir)
            if overwrite:
                for part in self.parts():
                    part.unlink()
            else:
                for source in ([self.path] if self.path.exists() else []) + self.parts():
                    self._check(source)
                    entries = self._ids(source)
                    self.done |= set(entries)
                    self.inputs.update(entries)
        own = re.compile(re.escape(self._prefix) + r"(\d+)\.h5")
        seqs = [int(m.group(1)) for m in (own.fullmatch(p.name) for p in self.parts()) if m]
        self._seq = max(seqs, default=-1) + 1
        self._h5: h5py.File | None = None
        self._tmp: Path | None = None
        self._count = 0
        self._opened = 0.0

    def parts(self) -> list[Path]:
        return sorted(self.parts_dir.glob("part-*.h5")) if self.parts_dir.is_dir() else []

    @staticmethod
    def _ids(path: Path) -> dict[str, str]:
        """id -> the input hash of each entry ("" for entries written before dis recorded it)."""
        with h5py.File(path, "r") as h5:
            return {str(g.attrs["id"]): str(g.attrs.get("input", ""))
                    for g in h5.get("entries", {}).values()}

    def _check(self, path: Path) -> None:
        try:
            with h5py.File(path, "r") as h5:
                attrs = dict(h5.attrs)
        except OSError as exc:
            raise BadInputError(f"not a readable HDF5 file ({exc}); pass --overwrite to replace "
                                f"it", path) from None
        if attrs.get("format") != PROBS_FORMAT:
            raise IncompatibleError("not a dis probabilities file; pass --overwrite to replace it",
                                    path)
        for key in ("classes", "steps", "checkpoint_hash", "inference"):
            if str(attrs.get(key)) != str(self.attrs.get(key)):
                raise IncompatibleError(f"made with another {key} ({attrs.get(key)}, now "
                                        f"{self.attrs.get(key)}); pass --overwrite to replace "
                                        f"it", path)

    def _part_name(self) -> str:
        return f"{self._prefix}{self._seq:06d}.h5"

    def _open_part(self) -> h5py.File:
        if self._h5 is None:
            self.parts_dir.mkdir(parents=True, exist_ok=True)
            self._tmp = self.parts_dir / f".{self._part_name()}.tmp{os.getpid()}"
            self._h5 = h5py.File(self._tmp, "w")
            self._h5.attrs.update(self.attrs)
            self._h5.require_group("entries")
            self._count, self._opened = 0, time.monotonic()
        return self._h5

    def _finish_part(self) -> None:
        """Close the part being written and give it its final name (it is now complete)."""
        if self._h5 is None:
            return
        self._h5.close()
        self._h5 = None
        tmp, self._tmp = self._tmp, None
        assert tmp is not None
        if self._count:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp, self.parts_dir / self._part_name())
            self._seq += 1
        else:
            tmp.unlink(missing_ok=True)

    def add(self, image_id: str, probs: np.ndarray, tag_probs: np.ndarray,
            input_hash: str = "") -> None:
        try:
            self._add(image_id, probs, tag_probs, input_hash)
        except OSError as exc:  # a full disk: name the file, not "Can't write data"
            refused = system_error(exc, self.path)
            if refused is None:
                raise
            raise refused from exc

    def _add(self, image_id: str, probs: np.ndarray, tag_probs: np.ndarray,
             input_hash: str) -> None:
        entries = self._open_part()["entries"]
        key = key_of(image_id)
        try:
            g = entries.create_group(key)
            g.attrs["id"] = image_id
            g.attrs["input"] = input_hash
            g.create_dataset("probs", data=probs.astype(np.float16), compression="gzip",
                             compression_opts=1, chunks=True)
            g.create_dataset("tag_probs", data=tag_probs.astype(np.float32))
        except BaseException:
            if key in entries:  # never keep a half-written entry
                del entries[key]
            raise
        self._count += 1
        self.done.add(image_id)
        self.inputs[image_id] = input_hash
        if (self._count >= self.part_images
                or time.monotonic() - self._opened >= self.part_seconds):
            self._finish_part()

    def close(self, commit: bool = True) -> None:
        """Finish the current part; with ``commit``, merge everything into the file (every
        rank's finished parts: under torchrun only rank 0 commits, once the others are done)."""
        self._finish_part()
        parts = self.parts()
        if not commit or (not parts and self.path.exists() and not self.overwrite):
            return  # nothing new: the file is already what a merge would write
        tmp = self.path.with_name(f".{self.path.name}.tmp{os.getpid()}")
        try:
            with h5py.File(tmp, "w") as h5:
                h5.attrs.update(self.attrs)
                entries = h5.require_group("entries")
                sources = parts[::-1]  # the newest copy of an entry wins
                if self.path.exists() and not self.overwrite:
                    sources.append(self.path)
                for source in sources:
                    with h5py.File(source, "r") as src:
                        for key, group in src.get("entries", {}).items():
                            if key not in entries:
                                src.copy(group, entries, name=key)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        finally:
            tmp.unlink(missing_ok=True)
        self.overwrite = False
        for part in parts:
            part.unlink()
        try:
            self.parts_dir.rmdir()
        except OSError:
            pass


# ----------------------------------------------------------------------------- batching


def size_batches(items: Iterable[Any], size_of: Callable[[Any], tuple[int, ...]],
                 batch_size: int, max_pending: int | None = None) -> Iterator[list[Any]]:
    """Group a stream into batches of items of equal size, in roughly input order.

    At most ``max_pending`` items (default 4 batches) wait for mates: past that, the fullest
    bucket goes out even if short, so memory stays bounded on sets with many sizes.
    """
    max_pending = max_pending or 4 * batch_size
    buckets: dict[tuple[int, ...], list[Any]] = {}
    pending = 0
    for item in items:
        bucket = buckets.setdefault(tuple(size_of(item)), [])
        bucket.append(item)
        pending += 1
        if len(bucket) >= batch_size:
            pending -= len(bucket)
            yield buckets.pop(tuple(size_of(item)))
        elif pending > max_pending:
            key = max(buckets, key=lambda k: len(buckets[k]))
            pending -= len(buckets[key])
            yield buckets.pop(key)
    yield from buckets.values()


def plan_batches(sizes: Sequence[Sequence[int]], batch_size: int) -> list[list[int]]:
    """The batches :func:`size_batches` forms over a stream of items of these sizes, as lists of
    indices: what one process streaming the decoded images would do, planned from the headers
    (:func:`discli.data.images.probe_image`) so that torchrun ranks can share them out."""
    return list(size_batches(range(len(sizes)), lambda i: tuple(sizes[i]), batch_size))


def upsample_probs(probs: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Final probabilities (B,K,h,w) -> (B,K,H,W), bilinear, align_corners=False."""
    return F.interpolate(probs.float(), size=size, mode="bilinear", align_corners=False)


def run_inference(model: DISNet, images: torch.Tensor, steps: Sequence[int],
                  cfg: InferenceConfig, amp: bool = False) -> dict[int, InferenceResult]:
    """:func:`infer_steps` with the backbone forward under autocast when ``amp`` on CUDA."""
    use_amp = amp and images.device.type == "cuda"
    with torch.autocast("cuda", dtype=torch.float16, enabled=use_amp):
        return infer_steps(model, images, steps, cfg)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------- predict


def _normalize(image: np.ndarray) -> torch.Tensor:
    from discli.data.dataset import normalize

    return torch.as_tensor(normalize(image))


def input_hash(path: Path) -> str:
    """Hash of an input image's bytes ("" when it cannot be read: such an image is never taken
    as done, and reading it for prediction gives the proper error)."""
    try:
        return file_hash(path)
    except OSError:
        return ""


def settings_hash(settings: dict[str, Any]) -> str:
    """What made an output besides its input: checkpoint hash, steps, inference settings,
    classes."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


class OutputRecords:
    """``out_dir/.dis-infer.outputs.jsonl``: one line per image whose files are written,
    ``{"id", "input", "made"}`` (module docstring). Appended one line at a time (``O_APPEND``:
    the ranks of a torchrun job share it); the last line of each id wins, and a line torn by a
    kill is ignored (its image is redone)."""

    def __init__(self, out_dir: Path, made: str):
        self.path = out_dir / OUTPUT_RECORDS
        self.made = made
        self.records: dict[str, dict[str, Any]] = {}

    def load(self) -> None:
        """Read the records (rank 0, before anyone appends); rewrite them compacted when older
        lines were superseded, so that resuming many times does not grow the file."""
        from discli.data.fileio import read_bytes

        if not self.path.exists():
            return
        lines = read_bytes(self.path, "record of outputs").split(b"\n")
        for line in lines:
            try:
                rec = json.loads(line)
            except (ValueError, RecursionError):
                continue
            if isinstance(rec, dict) and isinstance(rec.get("id"), str):
                self.records[rec["id"]] = rec
        if sum(1 for line in lines if line.strip()) > len(self.records):
            text = "".join(json.dumps(rec) + "\n" for rec in self.records.values())
            atomic_write_bytes(self.path, lambda f: f.write(text.encode()))

    def matches(self, image_id: str, input_digest: str) -> bool:
        """Whether the outputs of ``image_id`` were made from this input with these settings."""
        rec = self.records.get(image_id)
        return (bool(input_digest) and rec is not None and rec.get("input") == input_digest
                and rec.get("made") == self.made)

    def add(self, image_id: str, input_digest: str) -> None:
        line = json.dumps({"id": image_id, "input": input_digest, "made": self.made}) + "\n"
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, line.encode())  # one write: lines of two ranks never interleave
            finally:
                os.close(fd)
        except OSError as exc:
            refused = system_error(exc, self.path)
            if refused is None:
                raise
            raise refused from exc
        self.records[image_id] = json.loads(line)


def _refuse_foreign(out_dir: Path, plans: list[tuple[InputImage, dict[str, Path]]]) -> None:
    """A folder dis infer has not written to (no .dis-infer.json) may not already hold a file
    of an output's name: it is someone else's (ground-truth labelmaps, photos), never replaced,
    whatever the flags."""
    if (out_dir / RUN_INFO).exists():
        return
    for _, paths in plans:
        for path in paths.values():
            if os.path.lexists(path):
                raise UsageError(f"{path} exists and was not made by dis infer (the folder has no "
                                 f"{RUN_INFO}); choose another --out, or move the file away "
                                 f"(nothing was written)", out_dir)


def _write_run_info(out_dir: Path, info: dict[str, Any]) -> None:
    atomic_write_bytes(out_dir / RUN_INFO, lambda f: f.write(json.dumps(info, indent=1).encode()))


def _check_run_info(out_dir: Path, info: dict[str, Any], overwrite: bool) -> None:
    """Refuse to add outputs of other settings to a folder; with ``overwrite``, mark the folder
    as being replaced until the run finishes (a run killed meanwhile leaves outputs of two
    settings side by side: only another ``--overwrite`` run may continue there)."""
    path = out_dir / RUN_INFO
    if path.exists() and not overwrite:
        try:
            old = json.loads(path.read_text())
        except (OSError, ValueError):
            old = None
        if isinstance(old, dict) and old.get("replacing"):
            raise IncompatibleError(f"an --overwrite run into this folder did not finish, so it "
                                    f"holds outputs of two settings (see {RUN_INFO}); pass "
                                    f"--overwrite to finish replacing them", out_dir)
        if old != info:
            changed = sorted(k for k in info if not isinstance(old, dict) or old.get(k) != info[k])
            raise IncompatibleError(f"outputs there were made with another {', '.join(changed)} "
                                    f"(see {RUN_INFO}); pass --overwrite to replace them, or "
                                    f"another --out", out_dir)
    _write_run_info(out_dir, {**info, "replacing": True} if overwrite else info)


def predict(model: DISNet, inputs: Sequence[InputImage], *, classes: Sequence[str],
            out_dir: str | Path | None = None, steps: int = 0, cfg: InferenceConfig | None = None,
            batch_size: int = 8, device: str | torch.device = "cpu", amp: bool = False,
            overlay: bool = False, probs_path: str | Path | None = None, overwrite: bool = False,
            checkpoint_hash: str = "", reporter: Reporter | None = None, opacity: float = 0.5,
            protect: Iterable[tuple[str | Path, str]] = (), scales: Sequence[float] = (1.0,),
            flip: bool = False) -> Iterator[dict[str, Any]]:
    """Infer every input and write its outputs; yields one summary dict per image.

    Summary: ``id``, ``image`` (path), ``size`` [H, W], ``skipped`` (outputs already there),
    ``outputs`` {kind: path}, and for computed images ``classes`` {name: pixel fraction}
    (largest first), ``tags`` {name: probability} (background excluded), ``loss`` (final
    objective) and ``ms`` (inference time of the image's share of its batch).

    Under torchrun (see the module docstring) every rank must pass the same ``inputs`` (e.g.
    collected on rank 0 and shared with :func:`discli.distributed.on_main`). Rank 0 yields the
    summary of every image, the skipped ones first, then its own as they are computed, then
    those of the other ranks once all are done; the other ranks yield their own images' only.

    ``scales`` / ``flip``: multi-scale and flip testing (:mod:`discli.multiscale`).

    No output may be a file the run reads: the inputs, their manifests and labelmaps, and the
    files of ``protect`` (``(path, what)`` pairs: the checkpoint); refused with
    :class:`UsageError` before anything is written, whatever ``overwrite`` says.
    """
    cfg = cfg or InferenceConfig()
    reporter = reporter or NullReporter()
    device, info = setup_distributed(device)
    model = model.to(device).eval()
    out = Path(out_dir) if out_dir is not None else None
    settings = {"checkpoint_hash": checkpoint_hash, "steps": int(steps),
                "inference": {"lr": cfg.lr, "momentum": cfg.momentum,
                              "proximity": cfg.proximity}, "classes": list(classes)}
    try:
        views = {"scales": list(check_scales(scales)), "flip": bool(flip)}
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if views != {"scales": [1.0], "flip": False}:  # (folders of the single view keep their hash)
        settings["views"] = views
    plans = [(item, output_paths(out, item.id, overlay) if out is not None else {})
             for item in inputs]
    targets = [p for _, paths in plans for p in paths.values()]
    if len(set(targets)) != len(targets):
        raise BadInputError("two images would write the same output file (an id ending in "
                            "'_color' or '_overlay' next to its stem?)", out)
    manifests = {item.source for item in inputs if item.source is not None}
    refuse_overlap(
        [(p, "output file") for p in targets] + [(probs_path, "--probs file")]
        + ([(out / RUN_INFO, "run record"), (out / OUTPUT_RECORDS, "record of outputs")]
           if out is not None else []),
        [(item.path, "input image") for item in inputs]
        + [(item.labelmap, "labelmap of the input manifest") for item in inputs]
        + [(m, "input manifest") for m in manifests] + list(protect),
        advice="choose another --out or --probs")
    if out is not None:
        _refuse_foreign(out, plans)  # again under the lock; here before the lock file exists
    with contextlib.ExitStack() as locks:
        def take_locks() -> None:  # per-rank lock names: the ranks of one job share the folder
            if out is not None:
                make_folder(out)
                locks.enter_context(lock_folder(out))
            if probs_path is not None:
                locks.enter_context(lock_file(probs_path))

        together(take_locks)
        yield from _predict_locked(model, plans, classes, out, steps, cfg, batch_size, device,
                                   amp, probs_path, overwrite, checkpoint_hash, settings,
                                   reporter, info, opacity)


def _predict_locked(model: DISNet, plans: list[tuple[InputImage, dict[str, Path]]],
                    classes: Sequence[str], out: Path | None, steps: int, cfg: InferenceConfig,
                    batch_size: int, device: torch.device, amp: bool,
                    probs_path: str | Path | None, overwrite: bool, checkpoint_hash: str,
                    settings: dict[str, Any], reporter: Reporter, info: DistInfo,
                    opacity: float = 0.5) -> Iterator[dict[str, Any]]:
    main = info.is_main
    views = settings.get("views", {"scales": [1.0], "flip": False})

    # an overlay's look is part of what made it: another --opacity redoes the overlays
    overlay = any("overlay" in paths for _, paths in plans)
    made = settings_hash({**settings, "overlay_opacity": opacity if overlay else None})
    records = OutputRecords(out, made) if out is not None else None

    def prepare() -> ProbsWriter | None:
        if out is not None and main:
            # image writes torn by a kill: only where this run writes (never a scan of a big tree)
            for folder in {out, *(p.parent for _, paths in plans for p in paths.values())}:
                remove_stale_temps(folder)
            _refuse_foreign(out, plans)
            _check_run_info(out, settings, overwrite)
            assert records is not None
            records.load()
        if probs_path is None:
            return None
        return ProbsWriter(probs_path, {"format": PROBS_FORMAT,
                                        "format_version": PROBS_FORMAT_VERSION,
                                        "classes": json.dumps(list(classes)),
                                        "steps": int(steps), "checkpoint_hash": checkpoint_hash,
                                        "inference": json.dumps(settings["inference"])},
                           overwrite=overwrite, rank=info.rank)

    probs = together(prepare)

    def plan() -> tuple[list[int], list[int], list[list[int]] | None]:
        """(skipped, to do, batches of the to-do images when sharded), decided by rank 0."""
        skipped, todo = [], []
        for i, (item, paths) in enumerate(plans):
            done = (bool(paths) or probs is not None) and not overwrite and all(
                p.is_file() for p in paths.values()) and (probs is None or item.id in probs.done)
            if done:  # outputs of this id exist: were they made from this input, these settings?
                digest = input_hash(item.path)
                done = ((records is None or records.matches(item.id, digest))
                        and (probs is None or (bool(digest)
                                               and probs.inputs.get(item.id) == digest)))
            (skipped if done else todo).append(i)
        if not info.enabled:
            return skipped, todo, None
        from discli.data.images import probe_image

        sizes = [probe_image(plans[i][0].path) for i in todo]
        return skipped, todo, [[todo[j] for j in batch]
                               for batch in plan_batches(sizes, batch_size)]

    try:
        # Nobody writes before rank 0 has decided what is done: the plan comes after every
        # rank's ProbsWriter exists and before any of them writes.
        skipped, todo, planned = on_main(plan)
        if planned is None:
            mine = None
            batches = size_batches(_loaded([plans[i] for i in todo]), lambda x: x[2].shape,
                                   batch_size)
            own_total = len(todo)
        else:
            mine = shard(planned, info)
            batches = (list(_loaded([plans[i] for i in batch])) for batch in mine)
            own_total = sum(len(batch) for batch in mine)
        reporter.start("infer", total=(len(skipped) if main else 0) + own_total)
        if main:
            for i in skipped:
                item, paths = plans[i]
                reporter.advance(1)
                yield {"id": item.id, "image": str(item.path), "skipped": True,
                       "outputs": {k: str(p) for k, p in paths.items()}}
        own: list[dict[str, Any]] = []
        for summary in _predict_batches(model, batches, classes, steps, cfg, device, amp, probs,
                                        reporter, opacity, records, views["scales"],
                                        views["flip"]):
            if not main:
                own.append(summary)  # for rank 0 to report
            yield summary
        if probs is not None:
            probs.close(commit=False)  # this rank's last part is complete
        barrier()  # every rank's parts are complete
        together(lambda: _finish(probs, out, overwrite, settings) if main else None)
        others = gather_to_main(own) if info.enabled else None
    finally:
        # Entries are complete one by one: keep what was done, even after an error or ^C,
        # so a re-run resumes from there (rank 0 merges the parts finished so far).
        if probs is not None:
            probs.close(commit=main)
    for rank_summaries in (others or [])[1:]:
        yield from rank_summaries


def _finish(probs: ProbsWriter | None, out: Path | None, overwrite: bool,
            settings: dict[str, Any]) -> None:
    """Rank 0, once every image is done: merge the probabilities, mark the folder complete."""
    if probs is not None:
        probs.close()
    if out is not None and overwrite:
        _write_run_info(out, settings)  # every output is now of these settings


def _loaded(todo: list[tuple[InputImage, dict[str, Path]]]
            ) -> Iterator[tuple[InputImage, dict[str, Path], np.ndarray, str]]:
    """(image, its output paths, decoded RGB, hash of its file) for each image to predict."""
    from discli.data.voc import read_image

    for item, paths in todo:
        rgb = read_image(item.path)
        yield item, paths, rgb, input_hash(item.path)


def _predict_batches(model: DISNet,
                     batches: Iterable[list[tuple[InputImage, dict[str, Path], np.ndarray, str]]],
                     classes: Sequence[str], steps: int, cfg: InferenceConfig,
                     device: torch.device, amp: bool, probs: ProbsWriter | None,
                     reporter: Reporter, opacity: float = 0.5,
                     records: OutputRecords | None = None, scales: Sequence[float] = (1.0,),
                     flip: bool = False) -> Iterator[dict[str, Any]]:
    from discli.multiscale import infer_views

    names = list(classes)
    for batch in batches:
        images = torch.stack([_normalize(rgb) for _, _, rgb, _ in batch]).to(device)
        size = batch[0][2].shape[:2]
        start = time.perf_counter()
        result = infer_views(model, images, [steps], cfg, scales, flip, amp)[steps]
        full = result.probs
        labelmaps = full.argmax(dim=1).to(torch.uint8).cpu().numpy()
        synchronize(device)
        ms = 1000 * (time.perf_counter() - start) / len(batch)
        tag_probs = result.tag_probs.float().cpu().numpy()
        for i, (item, paths, rgb, digest) in enumerate(batch):
            lm = labelmaps[i]
            if "labelmap" in paths:
                write_index_png(paths["labelmap"], lm)
                write_color_png(paths["color"], lm)
            if "overlay" in paths:
                write_overlay(paths["overlay"], rgb, lm, opacity)
            if records is not None and paths:
                records.add(item.id, digest)  # after its files: a kill before it redoes them
            if probs is not None:
                probs.add(item.id, full[i].cpu().numpy(), tag_probs[i], digest)
            counts = np.bincount(lm.reshape(-1), minlength=len(names))
            order = np.argsort(-counts, kind="stable")
            reporter.advance(1)
            yield {"id": item.id, "image": str(item.path), "size": [int(size[0]), int(size[1])],
                   "skipped": False, "outputs": {k: str(p) for k, p in paths.items()},
                   "classes": {names[k]: round(float(counts[k]) / lm.size, 4) for k in order
                               if counts[k] > 0},
                   "tags": {names[k]: round(float(tag_probs[i][k]), 4)
                            for k in range(1, len(names))},
                   "loss": float(result.loss[i]), "ms": round(ms, 2)}
