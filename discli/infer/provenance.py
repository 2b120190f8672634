"""What made the outputs of ``dis infer`` in a folder: the run record and the record of outputs.

``out_dir/.dis-infer.json`` (:data:`RUN_INFO`) records the checkpoint and settings: resuming into
a folder made with other ones is refused. ``out_dir/.dis-infer.outputs.jsonl``
(:data:`OUTPUT_RECORDS`) records what made each output, one line per image appended once its
files are written: ``{"id", "input": hash of the input file's bytes, "made": hash of checkpoint
and settings}``. A folder without the run record that already holds a file of an output's name
is refused: the file was not made by dis infer.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from discli.errors import IncompatibleError, UsageError, system_error
from discli.storage import atomic_write

RUN_INFO = ".dis-infer.json"
OUTPUT_RECORDS = ".dis-infer.outputs.jsonl"


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
            atomic_write(self.path, lambda f: f.write(text.encode()))

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


def refuse_foreign(out_dir: Path, plans: list[tuple[Any, dict[str, Path]]]) -> None:
    """A folder dis infer has not written to (no .dis-infer.json) may not already hold a file
    of an output's name: it is someone else's (ground-truth labelmaps, photos), never replaced,
    whatever the flags."""
    if (out_dir / RUN_INFO).exists():
        return
    for _, paths in plans:
        for path in paths.values():
            if os.path.lexists(path):
                raise UsageError(f"{path} exists and was not made by dis infer (the folder has no "
                                 f"{RUN_INFO}); choose another {{opt:out}}, or move the file away "
                                 f"(nothing was written)", out_dir)


def write_run_info(out_dir: Path, info: dict[str, Any]) -> None:
    atomic_write(out_dir / RUN_INFO, lambda f: f.write(json.dumps(info, indent=1).encode()))


def check_run_info(out_dir: Path, info: dict[str, Any], overwrite: bool) -> None:
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
            raise IncompatibleError(f"a run with {{opt:overwrite=True}} into this folder did not "
                                    f"finish, so it holds outputs of two settings (see "
                                    f"{RUN_INFO}); pass "
                                    f"{{opt:overwrite=True}} to finish replacing them", out_dir)
        if not isinstance(old, dict):
            raise IncompatibleError(f"its {RUN_INFO} does not read back (not a JSON object: torn "
                                    f"or edited), so what its outputs were made with is unknown; "
                                    f"pass {{opt:overwrite=True}} to replace them, or another "
                                    f"{{opt:out}}", out_dir)
        if old != info:
            changed = sorted(k for k in info if not isinstance(old, dict) or old.get(k) != info[k])
            raise IncompatibleError(f"outputs there were made with another {', '.join(changed)} "
                                    f"(see {RUN_INFO}); pass {{opt:overwrite=True}} to replace "
                                    f"them, or another {{opt:out}}", out_dir)
    write_run_info(out_dir, {**info, "replacing": True} if overwrite else info)
