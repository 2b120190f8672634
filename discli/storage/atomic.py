"""Atomic writes: a killed process leaves either the old file or the new one, never a torn one.

:func:`atomic_path` is the project's one place that renames a finished temporary file onto its
target (``os.replace``); :func:`atomic_write` is the same for a writer of a binary stream. The
temporary name, ``.<name>.tmp<pid>`` beside the target, starts with a dot so globbing ``*.png``
never picks it up, and carries the writer's pid so that :func:`remove_stale_temps` can tell the
files of a dead writer from those of a live one.
"""

from __future__ import annotations

import errno as _errno
import hashlib
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import IO

from discli.errors import UsageError, system_error


def temp_path(path: Path) -> Path:
    """The temporary name of a write of ``path`` by this process."""
    return path.with_name(f".{fitting_name(path.name, 16)}.tmp{os.getpid()}")


def fitting_name(name: str, extra: int) -> str:
    """``name``, or a shortened form unique to it, such that ``extra`` more bytes (a helper
    file's prefix and suffix) still fit the 255 bytes a file name may have: an output whose own
    name is 250 bytes long is fine, its temporary or lock file must be too."""
    raw = name.encode("utf-8", "surrogateescape")
    if len(raw) + extra <= 255:
        return name
    digest = hashlib.sha1(raw).hexdigest()[:12]
    head = raw[:255 - extra - 13].decode("utf-8", "ignore")
    return f"{head}~{digest}"


def _fsync(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def atomic_path(path: str | Path, fill: Callable[[Path], object], durable: bool = True) -> None:
    """Call ``fill(temporary_path)`` to write a file beside ``path``, then rename it in place.

    ``durable`` fsyncs the file before the rename (survives a power cut); writers of thousands of
    small files (labelmaps, the synthetic benchmark) turn it off, as one fsync per file costs
    more than the write. An OSError of the user's environment (a full disk, a read-only folder)
    becomes the one-line error naming ``path``; the old file, if any, is untouched.
    """
    path = Path(path)
    tmp = temp_path(path)
    try:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except FileExistsError as exc:  # a file where the folder should be
            raise NotADirectoryError(_errno.ENOTDIR, str(exc), exc.filename) from exc
        fill(tmp)
        if durable:
            _fsync(tmp)
        os.replace(tmp, path)
    except OSError as exc:
        refused = system_error(exc, path)
        if refused is None:
            raise
        raise refused from exc
    finally:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass  # e.g. a read-only folder: there is no temporary file to remove


def atomic_write(path: str | Path, writer: Callable[[IO[bytes]], object],
                 durable: bool = True) -> None:
    """Call ``writer(binary_file)`` on a temporary file beside ``path``, then rename it in place
    (:func:`atomic_path`)."""
    def fill(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            stream = _Remembering(f)
            try:
                writer(stream)  # type: ignore[arg-type]
            except Exception as exc:
                # torch.save swallows its stream's OSError (a full disk) and raises a
                # RuntimeError about the write position instead: say what really happened.
                if stream.failure is not None and not isinstance(exc, OSError):
                    raise stream.failure from exc
                raise
            if durable:
                f.flush()
                os.fsync(f.fileno())

    atomic_path(path, fill, durable=False)


class _Remembering:
    """A binary file that remembers the OSError of a failed write, for writers that replace
    it with an error of their own."""

    def __init__(self, file: IO[bytes]):
        self._file = file
        self.failure: OSError | None = None

    def write(self, data: bytes) -> int:
        try:
            return self._file.write(data)
        except OSError as exc:
            self.failure = exc
            raise

    def flush(self) -> None:
        try:
            self._file.flush()
        except OSError as exc:
            self.failure = exc
            raise

    def __getattr__(self, name: str) -> object:
        return getattr(self._file, name)


def same_bytes(a: str | Path, b: str | Path, chunk: int = 1 << 22) -> bool:
    """Whether files ``a`` and ``b`` both exist and hold the same bytes (a missing one:
    False). A copy is checked against its source this way, at the cost of reading both."""
    a, b = Path(a), Path(b)
    try:
        if a.stat().st_size != b.stat().st_size:
            return False
        with open(a, "rb") as fa, open(b, "rb") as fb:
            while True:
                block = fa.read(chunk)
                if block != fb.read(chunk):
                    return False
                if not block:
                    return True
    except FileNotFoundError:
        return False


def make_folder(folder: str | Path, option: str = "{opt:out}") -> Path:
    """Create an output folder (and its parents), or raise UsageError when a file is in the way."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise UsageError(f"{option}: exists and is not a folder (or a file is in its path)",
                         folder) from None
    except PermissionError:
        raise UsageError(f"{option}: no permission to create the folder", folder) from None
    return folder


_TEMP = re.compile(r"^\..+\.tmp(\d+)$")


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temps(folder: str | Path, recursive: bool = False) -> int:
    """Delete ``.<name>.tmp<pid>`` files (atomic writes torn by a kill) whose process is gone.

    Call it while holding the folder's lock; returns how many were removed.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    removed = 0
    for path in folder.rglob(".*.tmp*") if recursive else folder.glob(".*.tmp*"):
        match = _TEMP.match(path.name)
        if match and path.is_file() and not _alive(int(match.group(1))):
            try:
                path.unlink()
                removed += 1
            except OSError:
                pass
    return removed
