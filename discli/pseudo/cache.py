"""HDF5 caches of pseudo-labels: what the E-step infers for every tagged image.

Layout of a finished cache (``round-N/cache.h5``), readable with plain h5py::

    /                      attrs: format="dis-pseudo-cache", format_version=1,
                                  classes (JSON list), t_tr, checkpoint_hash, inference (JSON),
                                  dis_version, created
    /entries/<key>         one group per image, key = id with "/" escaped as "%2F"
        labelmap           uint8 (H, W)   pseudo-labelmap at the image's own resolution
        confidence         float16 (H, W) probability of the chosen class
        tag_probs          float32 (K,)   cleaned tag probabilities, sigmoid(v3) after inference
        noisy_tags         uint8 (K,)     the tags the image came with (multi-hot, background 1)
        attrs: id (the original id), digest (:func:`entry_digest` of the four arrays)

HDF5 checks no checksum of its own (the datasets carry no fletcher32 filter), so one flipped
bit in an uncompressed array reads back silently: every entry carries the SHA-256 of its arrays,
written with it and checked on every read (:meth:`PseudoCache.get`; 10-15% of what reading
a 500x375 entry costs). Entries of caches written before have none and read
unverified.

Crash safety (:mod:`discli.storage.parts`): while a round is in progress, entries go to small
*part files* (``cache.parts/part-r<rank>-<seq>.h5``), each written to a temporary name and
renamed when complete: a part is either fully there or absent. A re-run lists the ids of the
finished parts and skips them. When every image is done the parts are merged into ``cache.h5``
(again temp + rename) and removed. Under DDP each rank writes parts with its own rank number and
rank 0 merges.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from discli import __version__
from discli.errors import BadInputError, CorruptError, DisError, IncompatibleError
from discli.storage.parts import PartWriter, id_of, key_of

FORMAT = "dis-pseudo-cache"
FORMAT_VERSION = 1


@dataclass
class CacheEntry:
    id: str
    labelmap: np.ndarray  # uint8 (H, W)
    confidence: np.ndarray  # float16 (H, W)
    tag_probs: np.ndarray  # float32 (K,)
    noisy_tags: np.ndarray  # uint8 (K,)


def make_attrs(classes: list[str], t_tr: int, checkpoint_hash: str,
               inference: dict[str, Any]) -> dict[str, Any]:
    return {"format": FORMAT, "format_version": FORMAT_VERSION, "classes": json.dumps(classes),
            "t_tr": int(t_tr), "checkpoint_hash": checkpoint_hash,
            "inference": json.dumps(inference), "dis_version": __version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


ARRAYS = ("labelmap", "confidence", "tag_probs", "noisy_tags")


def entry_digest(arrays: Iterable[np.ndarray]) -> str:
    """SHA-256 (hex) of an entry's arrays, in :data:`ARRAYS` order: dtype, shape and bytes."""
    digest = hashlib.sha256()
    for array in arrays:
        array = np.ascontiguousarray(array)
        digest.update(f"{array.dtype.str}{array.shape};".encode())
        digest.update(memoryview(array).cast("B"))
    return digest.hexdigest()


def _fill_entry(entry: CacheEntry) -> Callable[[h5py.Group], None]:
    def fill(g: h5py.Group) -> None:
        arrays = (entry.labelmap.astype(np.uint8), entry.confidence.astype(np.float16),
                  entry.tag_probs.astype(np.float32), entry.noisy_tags.astype(np.uint8))
        for name, data in zip(ARRAYS, arrays):
            gzip = {"compression": "gzip", "compression_opts": 1} if data.ndim == 2 else {}
            g.create_dataset(name, data=data, **gzip)
        g.attrs["digest"] = entry_digest(arrays)

    return fill


def check_attrs(attrs: Any, path: Path, checkpoint_hash: str | None = None,
                force: bool = False) -> None:
    if attrs.get("format") != FORMAT:
        raise IncompatibleError("not a dis pseudo-label cache", path)
    version = int(attrs.get("format_version", -1))
    if version != FORMAT_VERSION:
        raise IncompatibleError(f"cache format version {version} is not supported (this dis reads "
                                f"version {FORMAT_VERSION}); re-run the E-step to rebuild it", path)
    if checkpoint_hash is not None and not force and attrs.get("checkpoint_hash") != checkpoint_hash:
        raise IncompatibleError(f"stale cache: made by checkpoint {attrs.get('checkpoint_hash')}, "
                                f"not the current {checkpoint_hash} (delete it, or pass "
                                f"{{opt:force=True}} to use it anyway)", path)


class CacheWriter:
    """Writes a round's cache as atomic part files, then merges them (see module docstring): the
    cache's schema over :class:`discli.storage.parts.PartWriter`.

    Parts are ``cache.parts/part-r<rank>-NNNNNN.h5``; every finished part (every rank's) must
    have been made by the same checkpoint (:func:`check_attrs`, ``force`` skips the checkpoint
    check). Rank 0 first removes the temporaries of killed writers."""

    def __init__(self, path: str | Path, attrs: dict[str, Any], rank: int = 0,
                 force: bool = False):
        self.path = Path(path)
        self.parts_dir = self.path.with_name(self.path.name.removesuffix(".h5") + ".parts")
        self.attrs = attrs
        self.rank = rank
        self.parts_dir.mkdir(parents=True, exist_ok=True)
        self._writer = PartWriter(self.path, attrs, self.parts_dir, prefix=f"part-r{rank}-",
                                  pattern="part-r*.h5", clean=rank == 0)
        for part in self.parts():
            try:
                h5 = h5py.File(part, "r")
            except OSError:  # unreadable: rank 0 removes it and its images are redone
                continue
            with h5:
                check_attrs(h5.attrs, part, attrs["checkpoint_hash"], force)

    def parts(self) -> list[Path]:
        return self._writer.parts()

    def done_ids(self) -> set[str]:
        return self._writer.done_ids()

    def write(self, entries: list[CacheEntry]) -> None:
        """One part file holding ``entries`` (nothing for none)."""
        for entry in entries:
            self._writer.add(entry.id, _fill_entry(entry))
        self._writer.flush()

    def merge(self, expected_ids: Iterable[str] | None = None) -> Path:
        """Merge all parts into the final cache file (atomic) and remove the parts."""
        parts = self.parts()
        expected = None if expected_ids is None else set(expected_ids)
        if expected is not None and not expected <= self.done_ids():
            missing = sorted(expected - self.done_ids())
            raise DisError(f"cannot finish the cache: {len(missing)} images have no entry yet "
                           f"(first: {missing[0]!r}); re-run to complete them", self.path)
        self._writer.merge(parts, None if expected is None else expected.__contains__,
                           drop_torn=True)
        return self.path


REOPEN_EVERY = 1000


def _hdf5_signature(path: Path) -> bool:
    """Whether the file starts with the HDF5 signature (at offset 0, where dis writes it)."""
    try:
        with open(path, "rb") as f:
            return f.read(8) == b"\x89HDF\r\n\x1a\n"
    except OSError:
        return False


class PseudoCache:
    """Read access to a finished cache; the file is opened lazily (safe in DataLoader workers)."""

    def __init__(self, path: str | Path, checkpoint_hash: str | None = None,
                 force: bool = False):
        self.path = Path(path)
        if self.path.is_dir():
            raise BadInputError("expected a cache file, found a folder", self.path)
        if not self.path.is_file():
            raise BadInputError("cache not found" if not self.path.exists() else
                                "expected a cache file, found a device, pipe or socket", self.path)
        try:
            with h5py.File(self.path, "r") as h5:
                self.attrs = {k: (v.item() if isinstance(v, np.generic) else v)
                              for k, v in h5.attrs.items()}
                # From the link names alone: opening 50k groups for their "id" attribute cost
                # seconds and a hundred MB (each object header stays cached while open).
                entries = h5.get("entries")
                if not isinstance(entries, h5py.Group):
                    raise CorruptError("no 'entries' group: not a finished dis cache (corrupt "
                                       "cache?) delete it and re-run the E-step", self.path)
                self._ids = [id_of(key) for key in entries.keys()]
        except OSError as exc:
            if _hdf5_signature(self.path):  # an HDF5 file cut short or damaged
                raise CorruptError(f"a truncated or corrupt HDF5 file ({exc}); re-run the step "
                                   f"that wrote it", self.path) from None
            raise BadInputError(f"not a readable HDF5 file ({exc})", self.path) from None
        check_attrs(self.attrs, self.path, checkpoint_hash, force)
        try:
            self.classes: list[str] = json.loads(self.attrs["classes"])
        except (KeyError, TypeError, ValueError):
            raise IncompatibleError("cache has no valid 'classes' attribute (corrupt cache?)",
                                    self.path) from None
        self._id_set = set(self._ids)
        self._reads = 0  # every REOPEN_EVERY reads the file is reopened: see get()
        self._h5: h5py.File | None = None

    def ids(self) -> list[str]:
        return list(self._ids)

    def __len__(self) -> int:
        return len(self._ids)

    def __contains__(self, image_id: str) -> bool:
        return image_id in self._id_set

    def get(self, image_id: str) -> CacheEntry:
        # HDF5 keeps what it learnt of every group it opened until the file closes: reading the
        # 20k entries of one open file grew the process by 200 MB (benchmarks/scale.py), so the
        # file is reopened every REOPEN_EVERY reads (a millisecond) and memory stays flat.
        self._reads += 1
        if self._reads % REOPEN_EVERY == 0:
            self.close()
        if self._h5 is None:
            self._h5 = h5py.File(self.path, "r")
        try:
            g = self._h5["entries"][key_of(image_id)]
        except KeyError:
            raise BadInputError(f"no entry for image {image_id!r}", self.path) from None
        try:
            arrays = [g[name][()] for name in ARRAYS]
            stored = g.attrs.get("digest")
        except (KeyError, OSError, ValueError, TypeError, AttributeError) as exc:
            raise CorruptError(f"entry {image_id!r} is incomplete or unreadable ({exc}); "
                               f"corrupt cache? delete it and re-run the E-step",
                               self.path) from None
        if stored is not None and entry_digest(arrays) != str(stored):
            raise CorruptError(f"corrupt: entry {image_id!r} does not match the digest written "
                               f"with it (the file changed after dis wrote it: a damaged disk, "
                               f"copy or transfer); delete the cache and re-run the E-step",
                               self.path)
        return CacheEntry(image_id, *arrays)

    def __iter__(self) -> Iterator[CacheEntry]:
        for image_id in self._ids:
            yield self.get(image_id)

    def close(self) -> None:
        if self._h5 is not None:
            self._h5.close()
            self._h5 = None

    def __getstate__(self) -> dict[str, Any]:  # picklable for DataLoader workers
        state = self.__dict__.copy()
        state["_h5"] = None
        return state
