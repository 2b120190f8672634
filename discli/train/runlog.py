"""The log of a run folder: ``log.jsonl``, one JSON record per line, the record of truth (what
the summaries are read from), optionally mirrored to TensorBoard.

Every record goes through :func:`append`. With a :class:`TensorBoardMirror` its numbers also go
to TensorBoard event files (``<folder>/tensorboard/``): one TensorBoard run per phase
(``step1``..``step3``, ``mstep-round1``.., ``estep``), the iteration as the step (the round for
E-step records). TensorBoard is an optional dependency, imported only when asked for.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from discli.errors import UsageError

# bookkeeping and settings, not metrics
_NOT_SCALARS = ("iter", "step", "round", "time", "t_tr", "confidence")
_TAGS = {"loss": "loss/total", "map": "loss/labelmap", "img": "loss/reconstruction",
         "tag": "loss/tags", "val_miou": "val/miou"}


def append(path: Path, record: dict[str, Any], mirror: TensorBoardMirror | None = None) -> None:
    """Append ``record`` to the log at ``path`` (and to TensorBoard through ``mirror``)."""
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
    if mirror is not None:
        mirror.add(record)


def read_log(path: Path) -> list[dict[str, Any]]:
    """The records of a log (none if it does not exist; lines torn by a kill are skipped)."""
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def latest(records: list[dict[str, Any]], **match: Any) -> dict[str, Any]:
    """The latest value of every key among the records whose items include ``match``."""
    values: dict[str, Any] = {}
    for rec in records:
        if all(rec.get(k) == v for k, v in match.items()):
            values.update(rec)
    return values


def summary_writer_class() -> Any:
    """``torch.utils.tensorboard.SummaryWriter``, or a one-line error if TensorBoard is absent."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise UsageError("{opt:tensorboard=True} needs the tensorboard package: "
                         "pip install 'dis-seg[tensorboard]' (or pip install tensorboard)"
                         ) from None
    return SummaryWriter


def require_tensorboard(enabled: bool) -> None:
    """Fail early (before any work) if TensorBoard logging is asked for but not installed."""
    if enabled:
        summary_writer_class()


class TensorBoardMirror:
    """Writes the numbers of log records as TensorBoard scalars under ``folder``."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.writer_class = summary_writer_class()
        self.writers: dict[str, Any] = {}

    def add(self, record: dict[str, Any]) -> None:
        phase = str(record.get("phase", record.get("stage", "run")))
        if "iter" in record:
            run = phase + (f"-round{record['round']}" if "round" in record else "")
            step = int(record["iter"])
        else:  # an E-step record: one per round
            run, step = phase, int(record.get("round", 0))
        writer = self.writers.get(run)
        if writer is None:
            # purge_step: events a killed attempt wrote from this step on are dropped, as the
            # log's own lines past the checkpoint are (the run redoes those iterations)
            writer = self.writer_class(log_dir=str(self.folder / run), purge_step=step)
            self.writers[run] = writer
        for key, value in record.items():
            if key in _NOT_SCALARS or isinstance(value, bool) or not isinstance(value,
                                                                               (int, float)):
                continue
            tag = _TAGS.get(key, f"estep/{key}" if phase == "estep" else key)
            writer.add_scalar(tag, value, step)

    def close(self) -> None:
        for writer in self.writers.values():
            writer.close()
        self.writers.clear()


def open_mirror(folder: Path, enabled: bool) -> TensorBoardMirror | None:
    return TensorBoardMirror(folder) if enabled else None
