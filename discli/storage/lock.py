"""One writer per output: an exclusive, non-blocking advisory lock on a ``.lock`` file.

Every library function that writes a run folder or a cache takes the lock first:
:func:`discli.train.pretrain.pretrain` (``<out>/pretrain/.dis.lock``),
:func:`discli.train.finetune.finetune` (``<out>/finetune/.dis.lock``),
:func:`discli.train.estep.run_estep` (``.<cache>.lock`` beside the cache) and
:func:`discli.infer.predict.predict` (``<out>/.dis.lock`` and/or ``.<probs>.lock``). A second
process pointed at the same place gets :class:`discli.errors.BusyError` (exit code 5) instead of
corrupting the first one's files.

The lock is ``fcntl.flock``: the kernel drops it when the holder's file is closed, which happens
when the process dies in any way (SIGKILL included), so a killed run never leaves a stale lock
behind and a re-run can start at once. The lock file itself stays (deleting it would race with
a process that has just opened it); it holds the pid of the last holder, for the message.

Locks are re-entrant within one process (a library function holding a folder may call another
that locks the same folder). Under torchrun each rank locks its own name (``.dis.lock`` for
rank 0, ``.dis.lock.rank<N>`` for the others), so the ranks of one job never refuse each other
but two jobs on the same folder still do.

Where ``fcntl`` does not exist (Windows) locking is a no-op.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from discli.errors import BusyError
from discli.storage.atomic import fitting_name

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

LOCK_NAME = ".dis.lock"

_held: dict[str, tuple[int, int]] = {}  # resolved lock path -> (fd, depth)
_guard = threading.Lock()


def _rank_suffix() -> str:
    from discli.distributed import dist_info

    rank = dist_info().rank
    return "" if rank == 0 else f".rank{rank}"


def folder_lock_path(folder: str | Path) -> Path:
    return Path(folder) / (LOCK_NAME + _rank_suffix())


def file_lock_path(path: str | Path) -> Path:
    """The lock of a single output file: ``.<name>.lock`` beside it (hidden)."""
    path = Path(path)
    return path.with_name(f".{fitting_name(path.name, 24)}.lock{_rank_suffix()}")


def _holder(lock_path: Path) -> str:
    try:
        text = lock_path.read_text().strip()
    except OSError:
        text = ""
    return f"pid {text}" if text.isdigit() else "pid unknown"


def _acquire(lock_path: Path, what: Path) -> None:
    key = str(lock_path.resolve())
    with _guard:
        if key in _held:
            fd, depth = _held[key]
            _held[key] = (fd, depth + 1)
            return
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise BusyError(f"another dis process ({_holder(lock_path)}) is writing here; "
                                f"wait for it to finish (or stop it) and run again",
                                what) from None
        try:
            os.ftruncate(fd, 0)
            os.write(fd, str(os.getpid()).encode())
        except OSError:  # a full disk: the pid only informs a second process; the flock holds,
            pass  # and the command's first real output fails with its own path named
        _held[key] = (fd, 1)


def _release(lock_path: Path) -> None:
    key = str(lock_path.resolve())
    with _guard:
        fd, depth = _held[key]
        if depth > 1:
            _held[key] = (fd, depth - 1)
            return
        del _held[key]
        os.close(fd)  # closing the only descriptor drops the flock


@contextmanager
def locked(lock_path: str | Path, what: str | Path | None = None) -> Iterator[Path]:
    """Hold the exclusive lock ``lock_path`` for the body, or raise BusyError naming ``what``."""
    lock_path = Path(lock_path)
    _acquire(lock_path, Path(what) if what is not None else lock_path.parent)
    try:
        yield lock_path
    finally:
        _release(lock_path)


def lock_folder(folder: str | Path):  # noqa: ANN201 - a context manager
    """Lock an output folder (created if missing)."""
    return locked(folder_lock_path(folder), folder)


def lock_file(path: str | Path):  # noqa: ANN201 - a context manager
    """Lock one output file (e.g. a cache) through a hidden lock file beside it."""
    return locked(file_lock_path(path), path)
