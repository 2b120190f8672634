"""`dis plot` as a library: PNG plots of a training run, a demo report, an evaluation report.

:func:`plot` looks at what it is given:

- a run folder (``runs/voc``, holding ``pretrain/log.jsonl`` and/or ``finetune/log.jsonl``), a
  stage folder (``runs/voc/finetune``) or a ``log.jsonl``: the training curves: the losses and
  the learning rate against the iteration (the phases and rounds one after the other, their
  boundaries marked), the validation mIoU when the run logged it (``--val``), and the
  statistics of every E-step (mean confidence, share of kept pixels, tags changed by round);
  default output ``<run>/training.png`` (``<name>.png`` beside a log file);
- a demo report (``report.json`` of ``dis demo``, or its folder): mIoU against t_ts for every
  t_tr with the baseline and the bound as lines, and per-class IoU bars; default output
  ``report.png`` beside it;
- an evaluation report (the JSON of ``dis evaluate --json``): per-class IoU bars of every setup
  and, when it holds them, the confusion matrices; default output ``<name>.png`` beside it.

matplotlib is imported inside the functions (its object API with the Agg canvas: no window, no
global pyplot state). Every file is written atomically and an input is never overwritten.
"""

from __future__ import annotations

import io
import json
import re
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from discli.data.fileio import read_text
from discli.storage import atomic_write
from discli.errors import BadInputError, UsageError, first_line

LOSS_KEYS = ("loss", "map", "img", "tag")
ESTEP_KEYS = ("mean_confidence", "kept_share")


def _figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110)
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Any, path: Path, inputs: Sequence[Path] = ()) -> Path:
    path = Path(path)
    if any(path.resolve() == Path(p).resolve() for p in inputs):
        raise UsageError(f"-o {path} is an input file: choose another output")
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    atomic_write(path, lambda f: f.write(buffer.getvalue()))
    return path


# ----------------------------------------------------------------------------- training logs


def read_log(path: Path) -> list[dict[str, Any]]:
    """The records of a ``log.jsonl``; a line torn by a kill (not JSON) is skipped."""
    records = []
    for line in read_text(path, "training log").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and "phase" in record:
            records.append(record)
    if not records:
        raise BadInputError("no training log records in it (lines with a 'phase')", path)
    return records


def find_logs(path: Path) -> list[Path]:
    """The logs of a run folder (pretrain before finetune), a stage folder or a log file."""
    if path.is_file():
        return [path]
    found = [p for p in (path / "log.jsonl", path / "pretrain" / "log.jsonl",
                         path / "finetune" / "log.jsonl") if p.is_file()]
    if not found:
        raise BadInputError("no log.jsonl in it, its pretrain/ or its finetune/ (not a run "
                            "folder?)", path)
    return found


def _segment(record: dict[str, Any]) -> tuple[Any, ...]:
    return (record.get("stage"), record.get("phase"), record.get("step"), record.get("round"))


def _label(key: tuple[Any, ...]) -> str:
    stage, phase, _, round_ = key
    return f"round {round_}" if phase == "mstep" and round_ is not None else str(phase)


def training_series(records: list[dict[str, Any]]) -> dict[str, Any]:
    """The log laid out for plotting: every training record at ``x`` = its iteration plus the
    iterations of the phases before it (in the order they first appear), the boundaries of the
    phases, validation points and E-step records (by round)."""
    offsets: dict[tuple[Any, ...], int] = {}
    lengths: dict[tuple[Any, ...], int] = {}
    for rec in records:
        if "iter" in rec:
            key = _segment(rec)
            lengths[key] = max(lengths.get(key, 0), int(rec["iter"]))
    total = 0
    for key, length in lengths.items():
        offsets[key] = total
        total += length
    train: dict[str, list[tuple[int, float]]] = {}
    val: list[tuple[int, float]] = []
    estep: list[dict[str, Any]] = []
    for rec in records:
        if rec.get("phase") == "estep":
            estep.append(rec)
            continue
        if "iter" not in rec:
            continue
        x = offsets[_segment(rec)] + int(rec["iter"])
        if "val_miou" in rec:
            val.append((x, float(rec["val_miou"])))
        for key in (*LOSS_KEYS, "lr"):
            if isinstance(rec.get(key), (int, float)):
                train.setdefault(key, []).append((x, float(rec[key])))
    bounds = [(offsets[k], _label(k)) for k in lengths]
    return {"train": train, "val": val, "estep": estep, "bounds": bounds, "total": total}


def plot_training(logs: Sequence[Path], out: Path) -> Path:
    records = [rec for log in logs for rec in read_log(log)]
    series = training_series(records)
    panels = ["losses", "lr"] + (["val"] if series["val"] else []) + (
        ["estep"] if series["estep"] else [])
    fig = _figure(7.0, 2.3 * len(panels))
    axes = fig.subplots(len(panels), 1, squeeze=False)[:, 0]
    by_name = dict(zip(panels, axes))
    ax = by_name["losses"]
    for key in LOSS_KEYS:
        points = series["train"].get(key)
        if points:
            ax.plot(*zip(*points), label=key, linewidth=1.2 if key == "loss" else 0.9)
    ax.set_ylabel("loss")
    ax.legend(fontsize=7, loc="upper right")
    if series["train"].get("lr"):
        by_name["lr"].plot(*zip(*series["train"]["lr"]), color="tab:purple", linewidth=1)
    by_name["lr"].set_ylabel("learning rate")
    if "val" in by_name:
        xs, ys = zip(*series["val"])
        by_name["val"].plot(xs, [100 * y for y in ys], marker="o", color="tab:green")
        by_name["val"].set_ylabel("val mIoU %")
    for name in ("losses", "lr", "val"):
        if name in by_name:
            for x, label in series["bounds"]:
                by_name[name].axvline(x, color="grey", linewidth=0.6, linestyle=":")
                if name == "losses":
                    by_name[name].annotate(label, (x, 1), xycoords=("data", "axes fraction"),
                                           fontsize=6, va="top", xytext=(2, -2),
                                           textcoords="offset points")
            by_name[name].set_xlabel("iteration (phases one after the other)")
            by_name[name].grid(alpha=0.3)
    if "estep" in by_name:
        ax = by_name["estep"]
        rounds = [int(r.get("round", i + 1)) for i, r in enumerate(series["estep"])]
        for key, label in (("mean_confidence", "mean confidence"),
                           ("kept_share", "kept pixels (confidence >= threshold)")):
            ax.plot(rounds, [float(r.get(key, float("nan"))) for r in series["estep"]],
                    marker="o", label=label)
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("E-step round")
        ax.set_ylabel("share")
        ax.set_xticks(rounds)
        twin = ax.twinx()
        width = 0.18
        twin.bar([r - width / 2 for r in rounds], [r.get("tags_added", 0)
                                                    for r in series["estep"]], width,
                 color="tab:olive", alpha=0.5, label="tags added")
        twin.bar([r + width / 2 for r in rounds], [r.get("tags_removed", 0)
                                                    for r in series["estep"]], width,
                 color="tab:red", alpha=0.5, label="tags removed")
        twin.set_ylabel("tags changed")
        lines, labels = ax.get_legend_handles_labels()
        more, more_labels = twin.get_legend_handles_labels()
        ax.legend(lines + more, labels + more_labels, fontsize=7, loc="lower right")
        ax.grid(alpha=0.3)
    fig.suptitle(" + ".join(str(p) for p in logs), fontsize=7)
    fig.tight_layout()
    return _save(fig, out, logs)


# ----------------------------------------------------------------------------- reports


def _t_points(setups: list[dict[str, Any]]) -> list[tuple[int, float]]:
    return [(int(s["name"][2:]), 100 * s["miou"]) for s in setups
            if s["name"].startswith("t=") and s.get("miou") is not None]


def draw_curves(ax: Any, report: dict[str, Any]) -> None:
    """mIoU against t_ts for every fine-tuned model, the baseline and the bound as lines."""
    for name, scores in report["scores"].items():
        points = _t_points(scores["setups"])
        if not points:
            continue
        if name in ("baseline", "bound"):
            value = points[0][1]
            ax.axhline(value, linestyle="--", color="grey" if name == "baseline" else "black",
                       label=f"{name} (t_ts={points[0][0]}): {value:.1f}")
        else:
            ax.plot([t for t, _ in points], [m for _, m in points], marker="o", label=name)
    ax.set_xlabel("t_ts (test-time inference iterations)")
    ax.set_ylabel("mIoU % (test images)")
    ax.legend(fontsize=7, loc="best")
    ax.grid(alpha=0.3)


def draw_iou_bars(ax: Any, classes: Sequence[str], series: dict[str, dict[str, Any]],
                  title: str) -> None:
    """Grouped bars: per class, one bar per series (name -> {class: IoU or None})."""
    n = max(1, len(series))
    width = 0.8 / n
    for i, (name, iou) in enumerate(series.items()):
        ax.bar([c + (i - (n - 1) / 2) * width for c in range(len(classes))],
               [100 * (iou.get(c) or 0.0) for c in classes], width, label=name)
    ax.set_xticks(range(len(classes)))
    ax.set_xticklabels(classes, rotation=45, ha="right", fontsize=7)
    ax.set_ylabel("IoU %")
    ax.set_ylim(0, 100)
    ax.set_title(title, fontsize=8)
    ax.legend(fontsize=6, loc="upper right", ncol=2)
    ax.grid(alpha=0.3, axis="y")


def demo_bars(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per-class IoU of every model of a demo report at its first t_ts (t=0)."""
    bars = {}
    for name, scores in report["scores"].items():
        first = next((s for s in scores["setups"] if s["name"].startswith("t=")), None)
        if first is not None:
            bars[f"{name} ({first['name'].replace('t=', 't_ts=')})"] = first["iou"]
    return bars


def write_curves(path: Path, report: dict[str, Any]) -> Path:
    """The demo's ``curves.png``: mIoU against t_ts (the paper's Table 3 as a picture)."""
    fig = _figure(5.5, 3.6)
    draw_curves(fig.subplots(), report)
    fig.tight_layout()
    return _save(fig, path)


def plot_demo(report: dict[str, Any], out: Path, source: Path) -> Path:
    fig = _figure(11.0, 4.0)
    left, right = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1, 1.4]})
    draw_curves(left, report)
    left.set_title("mIoU against t_ts per t_tr", fontsize=8)
    draw_iou_bars(right, report["classes"], demo_bars(report), "per-class IoU")
    fig.tight_layout()
    return _save(fig, out, [source])


def _compact(count: float) -> str:
    """A pixel count in at most 4 characters (``"987"``, ``"12k"``, ``"3.4M"``): a 21-class
    matrix has no room for ``"1234567"`` in a cell."""
    for limit, unit in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if count >= limit:
            value = count / limit
            return f"{value:.1f}{unit}" if value < 10 else f"{value:.0f}{unit}"
    return f"{int(count)}"


def _cell_points(ax: Any, k: int) -> float:
    """The side of one matrix cell in points, from the axes' share of the figure (before
    tight_layout shrinks it a little: 0.85)."""
    box = ax.get_position()
    width, height = ax.figure.get_size_inches()
    return 0.85 * 72 * min(box.width * width, box.height * height) / k


def draw_confusion(ax: Any, matrix: Sequence[Sequence[int]], classes: Sequence[str],
                   title: str = "") -> None:
    """Rows = true class, columns = predicted; colour = share of the row, text = pixels.

    Font sizes follow the cell size, so that 21 classes in a small panel do not overlap: class
    names at most one cell high (the x labels turned upright when there are many), counts
    in compact form (12k) and left out when even that does not fit (the colours remain)."""
    import numpy as np

    counts = np.asarray(matrix, dtype=np.float64)
    rows = counts.sum(axis=1, keepdims=True)
    shares = np.divide(counts, rows, out=np.zeros_like(counts), where=rows > 0)
    ax.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    k = len(classes)
    cell = _cell_points(ax, k)
    label_size = max(2.5, min(7.0, cell / 1.4))  # a text line is ~1.2 font sizes high
    ax.set_xticks(range(k))
    ax.set_yticks(range(k))
    if k > 8:
        ax.set_xticklabels(classes, rotation=90, ha="center", fontsize=label_size)
    else:
        ax.set_xticklabels(classes, rotation=45, ha="right", fontsize=label_size)
    ax.set_yticklabels(classes, fontsize=label_size)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    if title:
        ax.set_title(title, fontsize=8)
    texts = {(i, j): _compact(counts[i, j]) for i in range(k) for j in range(k) if counts[i, j]}
    widest = max((len(t) for t in texts.values()), default=1)
    number_size = min(6.0, cell / (0.65 * widest + 0.5))  # a digit is ~0.6 font sizes wide
    if number_size < 3.0:
        return  # unreadable however drawn
    for (i, j), text in texts.items():
        ax.text(j, i, text, ha="center", va="center", fontsize=number_size,
                color="white" if shares[i, j] > 0.5 else "black")


def write_confusions(path: Path, matrices: dict[str, Sequence[Sequence[int]]],
                     classes: Sequence[str]) -> Path:
    """One confusion-matrix panel per setup (name -> K x K pixel counts) in one PNG."""
    size = max(4.0, 0.45 * len(classes) + 2.0)
    fig = _figure(size * len(matrices), size)
    axes = fig.subplots(1, len(matrices), squeeze=False)[0]
    for ax, (name, matrix) in zip(axes, matrices.items()):
        draw_confusion(ax, matrix, classes, name)
    fig.tight_layout()
    return _save(fig, path)


def plot_evaluation(report: dict[str, Any], out: Path, source: Path) -> Path:
    setups = report["setups"]
    with_confusion = [s for s in setups if s.get("confusion")]
    fig = _figure(4.5 * (1 + len(with_confusion)), 4.2)
    axes = fig.subplots(1, 1 + len(with_confusion), squeeze=False)[0]
    draw_iou_bars(axes[0], report["classes"], {s["name"]: s["iou"] for s in setups},
                  f"{Path(report.get('manifest') or '').name} "
                  f"({report.get('images', '?')} images)")
    for ax, setup in zip(axes[1:], with_confusion):
        draw_confusion(ax, setup["confusion"], report["classes"], setup["name"])
    fig.tight_layout()
    return _save(fig, out, [source])


def _read_json(path: Path) -> Any:
    try:
        return json.loads(read_text(path, "report"))
    except json.JSONDecodeError as exc:
        raise BadInputError(f"not JSON ({exc.msg} at line {exc.lineno})", path) from None


def _checked_classes(report: dict[str, Any], path: Path) -> list[str]:
    """A report's ``classes``, refused unless a non-empty list of names."""
    classes = report["classes"]
    if not (isinstance(classes, list) and classes and all(isinstance(c, str) for c in classes)):
        raise BadInputError("'classes' is not a list of class names", path)
    return classes


def _check_evaluation(report: dict[str, Any], path: Path) -> None:
    """Refuse an evaluation report whose per-class lists do not match its class list (the
    plot would label the wrong bars and cells)."""
    classes = _checked_classes(report, path)
    k = len(classes)
    if not isinstance(report["setups"], list):
        raise BadInputError("'setups' is not a list", path)
    for setup in report["setups"]:
        if not isinstance(setup, dict) or not isinstance(setup.get("name"), str):
            raise BadInputError("a setup without a name", path)
        iou, confusion = setup.get("iou"), setup.get("confusion")
        if not isinstance(iou, dict) or sorted(iou) != sorted(classes):
            raise BadInputError(f"setup {setup['name']!r}: 'iou' does not hold one value per "
                                f"class of 'classes' ({k})", path)
        if confusion and not (isinstance(confusion, list) and len(confusion) == k and all(
                isinstance(row, list) and len(row) == k for row in confusion)):
            raise BadInputError(f"setup {setup['name']!r}: 'confusion' is not a {k}x{k} "
                                f"matrix", path)


def _check_demo(report: dict[str, Any], path: Path) -> None:
    """Refuse a demo report the plot would draw wrongly without a word: no models, a score
    that is not a number in 0..1, an IoU of a class the report does not list."""
    classes = _checked_classes(report, path)
    scores = report["scores"]
    if not (isinstance(scores, dict) and scores):
        raise BadInputError("'scores' holds no models", path)

    def fraction(value: object) -> bool:
        return value is None or (isinstance(value, (int, float)) and not isinstance(value, bool)
                                 and 0 <= value <= 1)  # nan fails both comparisons

    for name, score in scores.items():
        setups = score.get("setups") if isinstance(score, dict) else None
        if not (isinstance(setups, list) and setups):
            raise BadInputError(f"model {name!r}: 'setups' is not a non-empty list", path)
        for setup in setups:
            label = setup.get("name") if isinstance(setup, dict) else None
            if not isinstance(label, str) or (label.startswith("t=")
                                              and not re.fullmatch(r"t=\d{1,5}", label)):
                raise BadInputError(f"model {name!r}: a setup without a name, or t= without "
                                    f"a number of steps", path)
            iou = setup.get("iou")
            if not (fraction(setup.get("miou")) and isinstance(iou, dict)
                    and set(iou) <= set(classes) and all(map(fraction, iou.values()))):
                raise BadInputError(f"model {name!r}, {label}: 'miou' or 'iou' is not a "
                                    f"fraction (0..1) per class of 'classes'", path)


def plot(source: str | Path, out: str | Path | None = None) -> list[Path]:
    """Plot a run folder, a ``log.jsonl``, a demo report or an evaluation report (see the
    module docstring); returns the written path(s)."""
    source = Path(source)
    if not source.exists():
        raise BadInputError("not found", source)
    report_path = source / "report.json" if source.is_dir() else source
    if source.is_dir() and not report_path.is_file():
        logs = find_logs(source)
        return _drawn(lambda: plot_training(logs, Path(out) if out else source / "training.png"),
                      "training log", logs[0] if len(logs) == 1 else source)
    if report_path.suffix == ".json":
        report = _read_json(report_path)
        target = Path(out) if out else report_path.with_suffix(".png")
        if isinstance(report, dict) and "scores" in report and "classes" in report:
            _check_demo(report, report_path)
            return _drawn(lambda: plot_demo(report, target, report_path), "demo report",
                          report_path)
        if isinstance(report, dict) and "setups" in report and "classes" in report:
            _check_evaluation(report, report_path)
            return _drawn(lambda: plot_evaluation(report, target, report_path),
                          "evaluation report", report_path)
        raise BadInputError("neither a dis demo report (report.json) nor a dis evaluate --json "
                            "report", report_path)
    return _drawn(lambda: plot_training([source], Path(out) if out else source.with_suffix(".png")),
                  "training log", source)


def _drawn(draw: Any, what: str, path: Path) -> list[Path]:
    """``[draw()]``; a value of the wrong type or shape in the file read becomes one line
    naming it (these files are written by dis, but can be edited or torn by hand)."""
    try:
        with warnings.catch_warnings():  # matplotlib's (an empty legend...): stderr is dis's
            warnings.simplefilter("ignore")
            return [draw()]
    except (KeyError, TypeError, ValueError, IndexError, AttributeError, OverflowError) as exc:
        raise BadInputError(f"malformed {what}: {type(exc).__name__}: {first_line(exc)}",
                            path) from None
