"""Outputs never overwrite inputs: one check every writing command makes before it writes.

A command knows the files it reads in a run (images, the labelmaps its manifest lists, the
manifest itself, the checkpoint, its config) and the files it will write. :func:`refuse_overlap`
refuses, whatever the flags (``--overwrite`` included), when any file to be written *is* one to
be read: the same path once symbolic links and ``..`` are resolved, or the same file through
another name (a hard link, a case-insensitive file system), compared by device and inode.
The error is a :class:`discli.errors.UsageError` (exit 2) naming both paths.

Labelmaps count although ``dis infer`` does not read them: predictions written over a
manifest's ground truth make ``dis evaluate`` score them against themselves.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from discli.errors import UsageError, shorten

PathLike = str | os.PathLike


def _identity(path: Path) -> tuple[str, tuple[int, int] | None]:
    """(resolved path, (device, inode) when the file exists)."""
    resolved = os.path.realpath(path)
    try:
        st = os.stat(resolved)
    except OSError:
        return resolved, None
    return resolved, (st.st_dev, st.st_ino)


def refuse_overlap(writes: Iterable[tuple[PathLike, str]],
                   reads: Iterable[tuple[PathLike | None, str]],
                   advice: str = "choose another output") -> None:
    """Raise :class:`UsageError` if a path of ``writes`` is a file of ``reads``.

    Both are ``(path, what)`` pairs, ``what`` saying what the file is to the command ("input
    image", "labelmap", "checkpoint", "--probs file"); None paths are skipped. A read that does
    not exist yet still counts by its path (a manifest's missing labelmap must not be created
    by a prediction either).
    """
    by_path: dict[str, tuple[str, str]] = {}
    by_inode: dict[tuple[int, int], tuple[str, str]] = {}
    for path, what in reads:
        if path is None or str(path) == "-":
            continue
        resolved, inode = _identity(Path(path))
        by_path.setdefault(resolved, (str(path), what))
        if inode is not None:
            by_inode.setdefault(inode, (str(path), what))
    for path, what in writes:
        if path is None or str(path) == "-":
            continue
        resolved, inode = _identity(Path(path))
        hit = by_path.get(resolved) or (by_inode.get(inode) if inode is not None else None)
        if hit is not None:
            read_path, read_what = hit
            raise UsageError(f"the {what} would overwrite the {read_what} {shorten(read_path)}; "
                             f"{advice} (nothing was written)", path)
