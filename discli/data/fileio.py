"""Small file helpers shared by the data modules: atomic writes and strict UTF-8 reading.

:func:`atomic_write` is the project's one atomic writer (``discli.checkpoint`` re-exports it as
``atomic_write_bytes``); it lives here, free of torch, so that reading and writing datasets never
pulls in the model code (``dis prepare-idw`` should start without torch).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import IO

from discli.errors import BadInputError


def atomic_write(path: str | Path, writer: Callable[[IO[bytes]], object],
                 durable: bool = True) -> None:
    """Call ``writer(binary_file)`` on a temporary file beside ``path``, then rename it in place.

    A killed process leaves either the old file or the new one, never a torn one; the temporary
    name starts with a dot so globbing ``*.png`` never picks it up. ``durable`` also fsyncs
    before the rename (survives a power cut); writers of thousands of small files (labelmaps,
    the synthetic benchmark) turn it off, as one fsync per file costs more than the write.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            writer(f)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: str | Path, text: str) -> None:
    """Write UTF-8 text atomically; ``"-"`` writes to stdout."""
    if str(path) == "-":
        sys.stdout.write(text)
        sys.stdout.flush()
        return
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def decode_utf8(data: bytes, path: str | Path, line: int | None = None) -> str:
    """Decode UTF-8 (a leading BOM is dropped) or raise a one-line error naming the file."""
    try:
        return data.decode("utf-8-sig" if line in (None, 1) else "utf-8")
    except UnicodeDecodeError as exc:
        where = f"line {line}: " if line is not None else ""
        raise BadInputError(f"{where}not UTF-8 text (byte 0x{data[exc.start]:02x} at offset "
                            f"{exc.start}); re-save the file as UTF-8", path) from None


def read_bytes(path: str | Path, what: str = "file") -> bytes:
    path = Path(path)
    if path.is_dir():
        raise BadInputError(f"expected a {what}, found a folder", path)
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise BadInputError(f"{what} not found", path) from None
    except OSError as exc:
        raise BadInputError(f"cannot read {what}: {exc.strerror or exc}", path) from None


def read_text(path: str | Path, what: str = "text file") -> str:
    """Read a whole UTF-8 text file; ``"-"`` reads stdin."""
    if str(path) == "-":
        return decode_utf8(sys.stdin.buffer.read(), "<stdin>")
    return decode_utf8(read_bytes(path, what), path)
