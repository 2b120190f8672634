"""Small file helpers shared by the data modules: atomic writes and strict UTF-8 reading.

:func:`write_text` writes through the project's one atomic writer,
:func:`discli.storage.atomic_write`; this module is free of torch, so that reading and writing
datasets never pulls in the model code (``dis prepare-idw`` should start without torch).

Reading is defensive because the files are untrusted: only regular files are read (``/dev/zero``
or a FIFO given as a manifest would never end), text files are capped at
:data:`MAX_TEXT_BYTES` (a multi-gigabyte archive passed by mistake is refused, not loaded) and
their lines at :data:`MAX_LINE_BYTES`, and :func:`json_loads` turns the RecursionError of a
deeply nested line (``[[[[...``) into an ordinary JSON error.
"""

from __future__ import annotations

import json
import os
import re
import stat
import sys
from pathlib import Path

from discli.errors import BadInputError, UsageError, system_error
from discli.storage.atomic import atomic_write

# A text input (manifest, captions, lexicon, tag file) larger than this is refused: 256 MiB is
# several times the largest real one (COCO's train captions are ~90 MB). DIS_MAX_TEXT_BYTES
# raises it (:func:`text_limit`).
MAX_TEXT_BYTES = 256 << 20
# One line of a line-based text input (a manifest record, a caption line, a path): a real one
# is a few hundred bytes.
MAX_LINE_BYTES = 1 << 20


def env_limit(name: str, default: int) -> int:
    """The positive whole number in environment variable ``name`` (unset or empty: ``default``).
    Read when a limit is applied, not on import: a bad value then fails the command that needs
    it with one line, instead of every plugin module that imports this one."""
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise UsageError(f"environment variable {name}: expected a positive whole number, got "
                         f"{text[:40]!r}")
    return value


def text_limit() -> int:
    """Bytes a text input may have: DIS_MAX_TEXT_BYTES, else :data:`MAX_TEXT_BYTES`."""
    return env_limit("DIS_MAX_TEXT_BYTES", MAX_TEXT_BYTES)


def files_under(folder: Path) -> list[Path]:
    """Every non-folder entry below ``folder`` (symbolic links to folders are not followed, as
    with ``Path.rglob``), in one walk that refuses a subfolder dis may not list, where
    ``rglob`` skips it without a word and its images would silently be missing."""
    def refuse(exc: OSError) -> None:
        refused = system_error(exc, exc.filename)
        raise refused if refused is not None else exc

    return [Path(top, name) for top, _, names in os.walk(folder, onerror=refuse)
            for name in names]


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


def check_regular(path: Path, what: str) -> os.stat_result:
    """The stat of ``path``, refusing folders and anything that is not a regular file (a device
    such as /dev/zero, a FIFO, a socket: reading one may never end)."""
    try:
        st = path.stat()
    except FileNotFoundError:
        raise BadInputError(f"{what} not found", path) from None
    except OSError as exc:
        raise BadInputError(f"cannot read {what}: {exc.strerror or exc}", path) from None
    if stat.S_ISDIR(st.st_mode):
        raise BadInputError(f"expected a {what}, found a folder", path)
    if not stat.S_ISREG(st.st_mode):
        raise BadInputError(f"expected a {what}, found a device, pipe or socket (not a regular "
                            f"file)", path)
    return st


def _too_big(size: int, what: str, limit: int) -> str:
    return (f"{size / 2**20:.0f} MiB is more than the {limit / 2**20:.0f} MiB a {what} may have "
            f"(is it the right file? raise DIS_MAX_TEXT_BYTES if it is)")


def read_bytes(path: str | Path, what: str = "file", limit: int | None = None) -> bytes:
    """A whole regular file of at most ``limit`` bytes (default :func:`text_limit`)."""
    path = Path(path)
    limit = text_limit() if limit is None else limit
    st = check_regular(path, what)
    if st.st_size > limit:
        raise BadInputError(_too_big(st.st_size, what, limit), path)
    try:
        with open(path, "rb") as f:
            data = f.read(limit + 1)  # the file may have grown since the stat
    except FileNotFoundError:
        raise BadInputError(f"{what} not found", path) from None
    except OSError as exc:
        raise BadInputError(f"cannot read {what}: {exc.strerror or exc}", path) from None
    if len(data) > limit:
        raise BadInputError(_too_big(len(data), what, limit), path)
    return data


def read_stdin_bytes(what: str = "input", limit: int | None = None) -> bytes:
    """All of stdin, refusing more than ``limit`` bytes (``dis infer - < /dev/zero``)."""
    limit = text_limit() if limit is None else limit
    stream = getattr(sys.stdin, "buffer", None)
    data = stream.read(limit + 1) if stream is not None else sys.stdin.read(limit + 1).encode()
    if len(data) > limit:
        raise BadInputError(f"more than {limit / 2**20:.0f} MiB on stdin for a {what} (raise "
                            f"DIS_MAX_TEXT_BYTES if that is right)", "<stdin>")
    return data


def check_line(raw: bytes | str, path: str | Path, line: int, what: str) -> None:
    """Refuse a line longer than :data:`MAX_LINE_BYTES` (a binary file read as text)."""
    if len(raw) > MAX_LINE_BYTES:
        raise BadInputError(f"line {line}: longer than {MAX_LINE_BYTES >> 20} MiB ({len(raw)} "
                            f"bytes): not a {what}", path)


def read_text(path: str | Path, what: str = "text file") -> str:
    """Read a whole UTF-8 text file; ``"-"`` reads stdin."""
    if str(path) == "-":
        return decode_utf8(read_stdin_bytes(what), "<stdin>")
    return decode_utf8(read_bytes(path, what), path)


def json_loads(text: str | bytes) -> object:
    """:func:`json.loads`, with what the parser accepts or raises but no caller can use
    reported as the :class:`json.JSONDecodeError` every caller already handles: nesting too
    deep (``[[[[...``, a RecursionError), an integer of more than 4300 digits (a ValueError),
    and a ``\\uD800``-style escape of half a character (a lone surrogate: not text, and no
    output file can hold it)."""
    try:
        obj = json.loads(text)
    except RecursionError:
        raise json.JSONDecodeError("nested too deeply", "", 0) from None
    except json.JSONDecodeError:
        raise
    except ValueError:
        raise json.JSONDecodeError("a number with too many digits", "", 0) from None
    raw = text if isinstance(text, str) else text.decode("utf-8", "replace")
    if _SURROGATE_ESCAPE.search(raw):  # rare: check the parsed strings only then
        try:
            json.dumps(obj, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise json.JSONDecodeError("a \\u escape of half a character (a lone surrogate), "
                                       "which is not text", "", 0) from None
    return obj


_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
