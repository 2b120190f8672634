"""Crash-safe, rank-aware HDF5 files of per-image entries: part files, ``done_ids``, merge.

HDF5 files are not journaled: a kill during a write can corrupt the whole file. So while a run is
in progress, entries (one group ``/entries/<key>`` per image, key = id with "/" escaped as
"%2F") go to small *part files* in a folder beside the file; a part is written under a temporary
name (:func:`discli.storage.atomic.atomic_path`) and renamed when complete, so it is either fully
there or absent. A re-run lists the ids of the finished parts (:meth:`PartWriter.done_ids`) and
skips them; when every image is done the parts are merged into the file (again temp + rename)
and removed. A finished part that does not read back (truncated or damaged after its rename: a
full disk that lied, a copy of the folder cut short) is removed with a warning naming it, and
its images count as not done, so they are done again.

Under torchrun every rank writes parts under its own prefix (``part-r<rank>-NNNNNN.h5``) and
rank 0 alone merges. The schemas over this writer (the pseudo-label cache,
:mod:`discli.pseudo.cache`; the ``--probs`` file, :mod:`discli.infer.probs`) choose the folder, the
names, the root attributes, what an entry holds and how existing files are checked.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import h5py

from discli.errors import first_line, system_error, warn
from discli.storage.atomic import atomic_path, remove_stale_temps, temp_path


def key_of(image_id: str) -> str:
    """The group name of an image id: "%" and "/" escaped."""
    return image_id.replace("%", "%25").replace("/", "%2F")


def id_of(key: str) -> str:
    """The inverse of :func:`key_of`."""
    return re.sub(r"%(25|2F)", lambda m: "%" if m.group(1) == "25" else "/", key)


def entry_attrs(path: Path) -> dict[str, dict[str, Any]]:
    """id -> the attributes of its entry, for every entry of an HDF5 file of entries."""
    with h5py.File(path, "r") as h5:
        return {str(g.attrs["id"]): dict(g.attrs) for g in h5.get("entries", {}).values()}


def _as_os_error(exc: BaseException) -> OSError:
    """``exc`` as the OSError it reports: HDF5 turns a failed write into a RuntimeError whose
    text carries the errno ("errno = 28, error message = 'No space left on device'")."""
    if isinstance(exc, OSError):
        return exc
    match = re.search(r"errno = (\d+)", str(exc))
    return OSError(int(match.group(1)) if match else None, str(exc))


def write_h5(path: Path, fill: Callable[[h5py.File], object]) -> None:
    """Write an HDF5 file atomically: ``fill(h5)`` on a temporary file, fsync, rename."""
    def make(tmp: Path) -> None:
        with h5py.File(tmp, "w") as h5:
            fill(h5)

    atomic_path(path, make)


def merge_entries(path: Path, attrs: dict[str, Any], sources: Sequence[Path],
                  keep: Callable[[str], bool] | None = None) -> None:
    """Write ``path`` (atomically) with root ``attrs`` and the entries of ``sources``; the first
    source holding an entry wins; ``keep(id)`` False leaves an entry out."""
    def fill(h5: h5py.File) -> None:
        h5.attrs.update(attrs)
        entries = h5.require_group("entries")
        for source in sources:
            with h5py.File(source, "r") as src:
                for key, group in src.get("entries", {}).items():
                    if key not in entries and (keep is None or keep(group.attrs["id"])):
                        src.copy(group, entries, name=key)

    write_h5(path, fill)


class PartWriter:
    """Streams entries into part files of ``parts_dir`` and merges them into ``path``.

    ``prefix``: the names of this rank's parts (``<prefix>NNNNNN.h5``); ``pattern``: the glob of
    every rank's parts. A part is finished (renamed to its final name) by :meth:`flush`, or
    automatically after ``part_images`` entries or ``part_seconds`` seconds. ``clean``: remove
    the temporaries of dead writers beside ``path`` and in ``parts_dir`` first (rank 0).
    """

    def __init__(self, path: str | Path, attrs: dict[str, Any], parts_dir: str | Path, *,
                 prefix: str, pattern: str = "part-*.h5", part_images: int | None = None,
                 part_seconds: float | None = None, clean: bool = False):
        self.path = Path(path)
        self.attrs = attrs
        self.parts_dir = Path(parts_dir)
        self.prefix, self.pattern = prefix, pattern
        self.part_images, self.part_seconds = part_images, part_seconds
        if clean:
            remove_stale_temps(self.path.parent)
            remove_stale_temps(self.parts_dir)
            self._drop_unreadable()
        own = re.compile(re.escape(prefix) + r"(\d+)\.h5")
        seqs = [int(m.group(1)) for m in (own.fullmatch(p.name) for p in self.parts()) if m]
        self._seq = max(seqs, default=-1) + 1
        self._h5: h5py.File | None = None
        self._tmp: Path | None = None
        self._count = 0
        self._opened = 0.0

    def parts(self) -> list[Path]:
        """Every rank's finished parts, by name."""
        return sorted(self.parts_dir.glob(self.pattern)) if self.parts_dir.is_dir() else []

    def _drop_unreadable(self) -> None:
        for part in self.parts():
            try:
                entry_attrs(part)
            except (OSError, KeyError) as exc:
                part.unlink(missing_ok=True)
                warn(f"part file does not read back ({type(exc).__name__}: "
                     f"{first_line(exc, 160)}); removed it, its images will be done again",
                     part)

    def drop_parts(self) -> None:
        """Delete every finished part (a run that replaces the file starts afresh)."""
        for part in self.parts():
            part.unlink()
        self._seq = 0

    def done(self, sources: Iterable[Path] | None = None) -> dict[str, dict[str, Any]]:
        """id -> entry attributes of every entry of ``sources`` (default: the finished parts)."""
        found: dict[str, dict[str, Any]] = {}
        for source in self.parts() if sources is None else sources:
            try:
                found.update(entry_attrs(source))
            except (OSError, KeyError):
                if sources is not None:
                    raise
                # a part rank 0 is removing as unreadable (_drop_unreadable): not done
        return found

    def done_ids(self) -> set[str]:
        return set(self.done())

    def _open_part(self) -> h5py.File:
        if self._h5 is None:
            self.parts_dir.mkdir(parents=True, exist_ok=True)
            self._tmp = temp_path(self.parts_dir / f"{self.prefix}{self._seq:06d}.h5")
            self._h5 = h5py.File(self._tmp, "w")
            self._h5.attrs.update(self.attrs)
            self._h5.require_group("entries")
            self._count, self._opened = 0, time.monotonic()
        return self._h5

    def add(self, image_id: str, fill: Callable[[h5py.Group], object]) -> None:
        """Add the entry of ``image_id``: ``fill(group)`` writes its datasets and attributes (the
        ``id`` attribute is set here); a failed entry is removed, never kept half-written."""
        try:
            entries = self._open_part()["entries"]
            key = key_of(image_id)
            try:
                group = entries.create_group(key)
                group.attrs["id"] = image_id
                fill(group)
            except BaseException:
                if key in entries:
                    del entries[key]
                raise
        except (OSError, RuntimeError) as exc:  # a full disk: name the file, not "Can't write"
            self._refuse(exc)
            raise
        self._count += 1
        if ((self.part_images is not None and self._count >= self.part_images)
                or (self.part_seconds is not None
                    and time.monotonic() - self._opened >= self.part_seconds)):
            self.flush()

    def _refuse(self, exc: BaseException) -> None:
        """Raise the one-line error naming the file for a failed write of the user's machine
        (a full disk), after giving the space of the unfinished part back (its images are
        redone on resume; left behind, it would keep the disk full for the next run). Any
        other failure returns, for the caller to re-raise."""
        refused = system_error(_as_os_error(exc), self.path)
        if refused is not None:
            self.abort()
            raise refused from exc

    def abort(self) -> None:
        """Drop the part being written, unfinished (its entries are not done)."""
        h5, tmp = self._h5, self._tmp
        self._h5 = self._tmp = None
        try:
            if h5 is not None:
                h5.close()
        except Exception:  # noqa: BLE001 - a torn file on a full disk: removed below anyway
            pass
        if tmp is not None:
            tmp.unlink(missing_ok=True)

    def flush(self) -> None:
        """Finish the part being written: close it and give it its final name (an empty one is
        dropped)."""
        if self._h5 is None:
            return
        try:
            self._h5.close()
        except (OSError, RuntimeError) as exc:  # HDF5 reports a failed write as RuntimeError
            self._refuse(exc)
            raise
        self._h5 = None
        tmp, self._tmp = self._tmp, None
        assert tmp is not None
        if self._count:
            # the part was streamed to its temporary name: atomic_path only fsyncs and renames
            atomic_path(self.parts_dir / f"{self.prefix}{self._seq:06d}.h5", lambda _: None)
            self._seq += 1
        else:
            tmp.unlink(missing_ok=True)

    def merge(self, sources: Sequence[Path], keep: Callable[[str], bool] | None = None,
              drop_torn: bool = False) -> None:
        """Merge ``sources`` (the first holding an entry wins) into the file, then remove the
        finished parts, with ``drop_torn`` every temporary part (only when no writer of this file
        can be alive: a finished run), and the parts folder."""
        parts = self.parts()
        merge_entries(self.path, self.attrs, sources, keep)
        for part in parts:
            part.unlink()
        if drop_torn and self.parts_dir.is_dir():
            for leftover in self.parts_dir.glob(".part-*.tmp*"):  # torn writes of killed runs
                leftover.unlink(missing_ok=True)
        try:
            self.parts_dir.rmdir()
        except OSError:
            pass
