"""The demo's report: a Table-3 style table (markdown + JSON), the command lines that give the
same results, and a Fig.-5 style figure (PNG)."""

from __future__ import annotations

import io
import json
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from discli.demo.jobs import stage_name
from discli.storage import atomic_write
from discli.train.keys import TrainConfig

if TYPE_CHECKING:
    from discli.demo.run import DemoConfig


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def table_rows(report: dict[str, Any]) -> list[tuple[str, list[float | None], float]]:
    """(setup, per-class IoU, mIoU) in the order of the paper's Table 3: baseline, then each
    t_tr with every t_ts (and their ensemble), then the fully supervised bound."""
    classes = report["classes"]
    rows = []
    for model, setups in report["scores"].items():
        for setup in setups["setups"]:
            t_ts = setup["name"]
            if model in ("baseline", "bound") and t_ts != "t=0":
                continue
            label = {"baseline": "baseline (pretrained only)",
                     "bound": "fully supervised bound"}.get(model, f"{model}, t_ts={t_ts[2:]}"
                                                             if t_ts != "ensemble" else
                                                             f"{model}, ensemble")
            rows.append((label, [setup["iou"].get(c) for c in classes], setup["miou"]))
    order = {"baseline": 0, "fully": 2}
    return sorted(rows, key=lambda r: order.get(r[0].split()[0].rstrip(","), 1))


def inference_gain(report: dict[str, Any]) -> list[str]:
    """Lines saying what training-time inference adds: mIoU of each t_tr > 0 minus t_tr = 0, at
    every t_ts (nothing without a t_tr = 0 run)."""
    scores = report["scores"]
    if "t_tr=0" not in scores:
        return []
    base = {s["name"]: s["miou"] for s in scores["t_tr=0"]["setups"]}
    lines = []
    for model, result in scores.items():
        if not model.startswith("t_tr=") or model == "t_tr=0":
            continue
        diffs = [f"{s['name'].replace('t=', 't_ts=')} {100 * (s['miou'] - base[s['name']]):+.1f}"
                 for s in result["setups"] if s["name"] in base and s["name"] != "ensemble"]
        lines.append(f"- {model} minus t_tr=0 (mIoU points): " + ", ".join(diffs))
    return ["", "Training-time inference, against the same loop without it:", "", *lines]


def _toml(value: Any) -> str:
    return ("true" if value else "false") if isinstance(value, bool) else str(value)


def train_command(command: str, cfg: TrainConfig, preset: str = "demo") -> str:
    """The `dis pretrain|finetune` command line that trains with ``cfg``: ``--config PRESET``,
    its manifests, run folders and t_tr as options where they differ from the preset's, and
    every other setting that differs as --set KEY=VALUE (derived from the config itself, so the
    listed commands cannot drift from what ran)."""
    from discli.train.config import load_config

    section = "pretrain" if command == "pretrain" else "finetune"
    defaults = asdict(load_config(preset, {}, section=section))
    options = ("labelled", "tagged", "init", "out", "t_tr")
    paths = [f"--{key.replace('_', '-')} {value}" for key, value in asdict(cfg).items()
             if key in options and value != defaults[key]]
    sets = [f"--set {key}={_toml(value)}" for key, value in asdict(cfg).items()
            if key not in options and value != defaults[key]]
    return " ".join([f"dis {command} --config {preset}", *paths, *sets])


def demo_commands(demo: DemoConfig, bench: Path, runs: Path,
                  configs: dict[str, tuple[str, TrainConfig]]) -> list[str]:
    """The command lines a user would run for the same results (the report lists them):
    ``dis synth``, every training run of ``configs``, then ``dis evaluate`` and
    ``dis clean-tags stats`` of the largest t_tr."""
    m = bench / "manifests"
    last = configs[f"t_tr={demo.t_tr[-1]}"][1] if demo.t_tr else None
    lines = [f"dis synth {bench} --seed {demo.seed} --n-labelled {demo.n_labelled} "
             f"--n-tagged {demo.n_tagged} --n-test {demo.n_test} "
             f"--difficulty {demo.difficulty} --min-size {demo.min_size} "
             f"--max-size {demo.max_size}"]
    lines += [train_command(command, cfg, demo.preset_name) for command, cfg in configs.values()]
    ts = ",".join(str(t) for t in demo.t_ts)
    if last is not None:
        lines.append(f"dis evaluate --checkpoint {runs}/dis-t{demo.t_tr[-1]}/finetune/final.pth "
                     f"--manifest {m}/val.jsonl --t-ts {ts}")
        lines.append(f"dis clean-tags stats {runs}/dis-t{demo.t_tr[-1]}/finetune/round-"
                     f"{last.rounds}/cache.h5 --truth {bench}/idw/true_tags.jsonl")
    return lines


def markdown(report: dict[str, Any]) -> str:
    classes = report["classes"]
    lines = ["# dis demo report", "",
             f"Synthetic benchmark: {report['config']['n_labelled']} pixel-labelled, "
             f"{report['config']['n_tagged']} tagged (captions), {report['config']['n_test']} "
             f"test images; difficulty {report['config'].get('difficulty', 'hard')}, seed "
             f"{report['config']['seed']}.", "",
             "## Segmentation (IoU %, test images)", "",
             "| setup | " + " | ".join(classes) + " | mIoU |",
             "|---" * (len(classes) + 2) + "|"]
    for label, ious, miou in table_rows(report):
        lines.append(f"| {label} | " + " | ".join(_pct(x) for x in ious) + f" | **{_pct(miou)}** |")
    lines += inference_gain(report)
    lines += ["", "## Tags of the tagged images (micro over classes, %)", "",
              "| E-step | noisy P | noisy R | noisy F1 | cleaned P | cleaned R | cleaned F1 |",
              "|---|---|---|---|---|---|---|"]
    for name, stats in report["tags"].items():
        n, c = stats["noisy"]["micro"], stats["cleaned"]["micro"]
        lines.append(f"| {name} | {_pct(n['precision'])} | {_pct(n['recall'])} | "
                     f"{_pct(n['f1'])} | {_pct(c['precision'])} | {_pct(c['recall'])} | "
                     f"**{_pct(c['f1'])}** |")
    pseudo = report.get("pseudo_labels", {})
    if pseudo:
        lines += ["", "## Pseudo-labels of the tagged images (mIoU % against their true "
                  "labelmaps)", "",
                  "| E-step | round | mIoU | mIoU of kept pixels | kept pixels | caption tag F1 "
                  "| cleaned tag F1 | " + " | ".join(classes) + " |",
                  "|---" * (len(classes) + 7) + "|"]
        for name, rounds in pseudo.items():
            for r in rounds:
                lines.append(f"| {name} | {r['round']} | **{_pct(r['miou'])}** | "
                             f"{_pct(r['kept_miou'])} | {_pct(r['kept_share'])} | "
                             f"{_pct(r.get('caption_f1'))} | {_pct(r.get('cleaned_f1'))} | "
                             + " | ".join(_pct(r["iou"].get(c)) for c in classes) + " |")
    lines += ["", "![mIoU against t_ts](curves.png)"]
    lines += ["", "## Timings (s)", "", "| stage | seconds |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in report["timings_s"].items()]
    lines += profile_lines(report)
    lines += ["", "## Commands", "", "```"] + report["commands"] + ["```", "",
              "![figure](figure.png)", ""]
    return "\n".join(lines)


def profile_lines(report: dict[str, Any]) -> list[str]:
    """Where each training run's seconds went: its phases as its log.jsonl timed them, and the
    rest of the job (start-up, model builds, checkpoint reads and writes, E-step statistics)."""
    profile = report.get("profile_s") or {}
    if not profile:
        return []
    lines = ["", f"Wall time of this run: {report['wall_s']} s (the jobs run side by side)."
             if "wall_s" in report else ""]
    lines += ["", "Per phase (s; `other`: the job's time outside its phases):", "",
             "| run | phases | other |", "|---|---|---|"]
    for run, phases in profile.items():
        job = report["timings_s"].get(stage_name(run))
        other = "" if job is None else f"{job - sum(phases.values()):.1f}"
        listed = ", ".join(f"{phase} {seconds:.1f}" for phase, seconds in phases.items())
        lines.append(f"| {run} | {listed} | {other} |")
    return lines


def write_report(out: Path, report: dict[str, Any]) -> None:
    atomic_write(out / "report.json",
                       lambda f: f.write(json.dumps(report, indent=1).encode()))
    atomic_write(out / "report.md", lambda f: f.write(markdown(report).encode()))


def figure_headings(demo: Any, with_t0: bool) -> list[str]:
    """Column headings of the figure: every prediction column names its t_tr and t_ts."""
    t_dis = max(demo.t_tr)
    headings = ["input", "recon.\ntarget", "ground\ntruth", "baseline\nt_ts=0"]
    if with_t0:
        headings.append("t_tr=0\nt_ts=0")
    return headings + [f"t_tr={t_dis}\nt_ts={t}" for t in demo.t_ts]


def write_figure(path: Path, checkpoints: dict[str, Path], manifest: Any, demo: Any,
                 tile: int = 96) -> None:
    """Rows of test images; columns: input, reconstruction target, ground truth, baseline,
    t_tr = 0, and the largest-t_tr DIS model at every t_ts (the layout of the paper's Fig. 5).
    Every image keeps its aspect ratio; a legend of the class colours is drawn below."""
    from discli.infer.checkpoint import load_for_inference
    from discli.data.dataset import SegDataset, denormalize
    from discli.model.losses import recon_target
    from discli.infer.runtime import infer_views
    from discli.infer.visual import colorize, grid

    dataset = SegDataset(manifest)
    loaded = {name: load_for_inference(p) for name, p in checkpoints.items()}
    models = {name: entry.model for name, entry in loaded.items()}
    dis_name = f"t_tr={max(demo.t_tr)}"
    # the DIS model's test-time inference, as its checkpoint says
    cfg = loaded[dis_name].inference_config()
    with_t0 = "t_tr=0" in models and dis_name != "t_tr=0"
    rows = []
    for r in range(min(demo.figure_rows, len(dataset))):
        item = dataset[r]
        image = item["image"][None]
        size = image.shape[-2:]
        pixels = (denormalize(image[0]).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        target = recon_target(image, (max(1, size[0] // 8), max(1, size[1] // 8)))
        target = (denormalize(target[0]).permute(1, 2, 0).numpy() * 255).round().astype(
            np.uint8)
        gt = item["labelmap"].numpy().astype(np.uint8)
        tiles = [(pixels, False), (target, False), (colorize(gt), True)]

        def predict(model: Any, t: int) -> tuple[np.ndarray, bool]:
            full = infer_views(model, image, [t], cfg)[t].probs
            return colorize(full.argmax(1)[0].numpy().astype(np.uint8)), True

        with torch.no_grad():
            tiles.append(predict(models["baseline"], 0))
            if with_t0:
                tiles.append(predict(models["t_tr=0"], 0))
            tiles += [predict(models[dis_name], t) for t in demo.t_ts]
        rows.append(tiles)
    canvas = grid(rows, figure_headings(demo, with_t0), tile, list(manifest.classes))
    buffer = io.BytesIO()
    canvas.save(buffer, format="PNG")
    atomic_write(path, lambda f: f.write(buffer.getvalue()))
