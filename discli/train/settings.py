"""A run folder holds one run: re-running a command on it continues that run, so its settings
must be the ones the run was started with. Otherwise the finished steps, caches and checkpoints
of one run would be silently mixed with the rest of another (`dis demo` refuses the same way).

The held settings are the folder's ``config.toml`` (written when a run starts work), or the
configuration stored in its checkpoint. Keys marked ``neutral`` (device, workers, log and
checkpoint frequency, validation: where and how the run executes) may differ, as may keys of
the other stage; ``rounds`` may grow (a finished fine-tuning run is extended by a round).
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from dataclasses import fields
from pathlib import Path
from typing import Any

from discli.errors import BadInputError, UsageError
from discli.train.config import file_values
from discli.train.keys import TrainConfig

PATHS = ("labelled", "tagged", "init", "val")  # the same file by another spelling is the same
EXTENDABLE = ("rounds",)  # a larger value continues the run: earlier rounds are unchanged


def _same_file(old: object, new: object) -> bool:
    """``m.jsonl``, ``./m.jsonl`` and its absolute path name one input (seen from here)."""
    try:
        return bool(old) and bool(new) and os.path.samefile(str(old), str(new))
    except (OSError, ValueError):
        return False


def held_settings(folder: Path, state: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """The settings the run in ``folder`` was started with: its ``config.toml``, else the
    configuration in its checkpoint ``state``; None if neither says."""
    path = folder / "config.toml"
    if path.is_file():
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            raise BadInputError(f"cannot read the run's settings: {exc}", path) from None
        return file_values(data)  # any layout: flat, [train], [train.<group>] tables
    if state is not None and isinstance(state.get("config"), dict):
        return state["config"]
    return None


def changed_settings(held: dict[str, Any], cfg: TrainConfig, stage: str) -> list[str]:
    """``["lr 0.01 -> 0.5", ...]``: the keys that change a result of ``stage`` and differ.
    A key the held settings lack (an older version's) counts as its default."""
    changes = []
    for f in fields(TrainConfig):
        if f.metadata["neutral"] or f.metadata["stage"] not in (None, stage):
            continue
        old, new = held.get(f.name, f.default), getattr(cfg, f.name)
        if isinstance(new, float) and isinstance(old, int) and not isinstance(old, bool):
            old = float(old)
        if old == new or (f.name in EXTENDABLE and isinstance(old, int) and new > old):
            continue
        if f.name in PATHS and _same_file(old, new):
            continue
        changes.append(f"{f.name} {old!r} -> {new!r}")
    return changes


def check_same_run(folder: Path, held: dict[str, Any] | None, cfg: TrainConfig,
                   stage: str) -> None:
    """Refuse (exit 2) to continue the run in ``folder`` with settings that change a result."""
    if held is None:
        return
    changes = changed_settings(held, cfg, stage)
    if changes:
        record = folder / "config.toml"
        where = (f" (they are in {record}: {{opt:config={record}}} gives them)"
                 if record.is_file() else "")
        raise UsageError(f"{folder} holds a {stage} run with other settings ("
                         f"{', '.join(changes)}): give the same settings to continue it{where}, "
                         "or another {opt:out}")


def check_same_on_every_rank(cfg: TrainConfig, stage: str) -> None:
    """Under torchrun, refuse (exit 2 on every rank) settings that change a result and differ
    from rank 0's: the ranks would train apart (another learning rate) or wait forever on each
    other (another number of iterations). A collective: every rank calls it after joining."""
    from discli.distributed import dist_info, on_main, together

    info = dist_info()
    if not info.enabled:
        return
    reference = on_main(lambda: dataclasses.asdict(cfg))

    def agree() -> None:
        changes = changed_settings(reference, cfg, stage)
        if changes:
            raise UsageError(f"rank {info.rank} has other settings than rank 0 "
                             f"({', '.join(changes)}): every process of a torchrun job must "
                             f"be given the same ones")

    together(agree)
