"""The demo's report: a Table-3 style table (markdown + JSON) and a Fig.-5 style figure (PNG)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from discli.checkpoint import atomic_write_bytes


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
                  "| E-step | round | mIoU | mIoU of kept pixels | kept pixels | "
                  + " | ".join(classes) + " |", "|---" * (len(classes) + 5) + "|"]
        for name, rounds in pseudo.items():
            for r in rounds:
                lines.append(f"| {name} | {r['round']} | **{_pct(r['miou'])}** | "
                             f"{_pct(r['kept_miou'])} | {_pct(r['kept_share'])} | "
                             + " | ".join(_pct(r["iou"].get(c)) for c in classes) + " |")
    lines += ["", "![mIoU against t_ts](curves.png)"]
    lines += ["", "## Timings (s)", "", "| stage | seconds |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in report["timings_s"].items()]
    lines += ["", "## Commands", "", "```"] + report["commands"] + ["```", "",
              "![figure](figure.png)", ""]
    return "\n".join(lines)


def write_report(out: Path, report: dict[str, Any]) -> None:
    atomic_write_bytes(out / "report.json",
                       lambda f: f.write(json.dumps(report, indent=1).encode()))
    atomic_write_bytes(out / "report.md", lambda f: f.write(markdown(report).encode()))


def _tile(array: np.ndarray, size: int) -> Image.Image:
    image = Image.fromarray(array)
    if image.mode == "P" or array.ndim == 2:
        return image.resize((size, size), Image.NEAREST)
    return image.resize((size, size), Image.BILINEAR)


def _colour(labelmap: np.ndarray) -> np.ndarray:
    from discli.data.voc import voc_palette

    palette = np.array(voc_palette(), dtype=np.uint8).reshape(-1, 3)
    return palette[labelmap]


def write_figure(path: Path, checkpoints: dict[str, Path], manifest: Any, demo: Any,
                 tile: int = 96) -> None:
    """Rows of test images; columns: input, reconstruction target, ground truth, baseline,
    t_tr = 0, and the largest-t_tr DIS model at every t_ts (the layout of the paper's Fig. 5)."""
    from discli.checkpoint import load_model
    from discli.data.dataset import SegDataset, denormalize
    from discli.inference import infer_steps
    from discli.losses import recon_target

    from discli.checkpoint import inference_config, inference_settings

    dataset = SegDataset(manifest)
    loaded = {name: load_model(p) for name, p in checkpoints.items()}
    models = {name: model for name, (model, _) in loaded.items()}
    dis_name = f"t_tr={max(demo.t_tr)}"
    # the DIS model's test-time inference, as its checkpoint says
    cfg = inference_config(inference_settings(loaded[dis_name][1]))
    columns = ["input", "recon target", "ground truth", "baseline"]
    if "t_tr=0" in models:
        columns.append("t_tr=0")
    columns += [f"DIS t_ts={t}" for t in demo.t_ts]
    header = 14
    canvas = Image.new("RGB", (tile * len(columns), header + tile * demo.figure_rows), "white")
    draw = ImageDraw.Draw(canvas)
    for c, name in enumerate(columns):
        draw.text((c * tile + 3, 1), name, fill=(0, 0, 0))
    for r in range(min(demo.figure_rows, len(dataset))):
        item = dataset[r]
        image = item["image"][None]
        size = image.shape[-2:]
        pixels = (denormalize(image[0]).permute(1, 2, 0).numpy() * 255).astype(np.uint8)
        target = recon_target(image, (max(1, size[0] // 8), max(1, size[1] // 8)))
        target = (denormalize(target[0]).permute(1, 2, 0).numpy() * 255).astype(np.uint8)
        gt = item["labelmap"].numpy().astype(np.uint8)
        tiles = [pixels, target, _colour(gt)]

        def predict(model: Any, t: int) -> np.ndarray:
            probs = infer_steps(model, image, [t], cfg)[t].probs
            full = F.interpolate(probs, size=size, mode="bilinear", align_corners=False)
            return _colour(full.argmax(1)[0].numpy().astype(np.uint8))

        with torch.no_grad():
            tiles.append(predict(models["baseline"], 0))
            if "t_tr=0" in models:
                tiles.append(predict(models["t_tr=0"], 0))
            tiles += [predict(models[dis_name], t) for t in demo.t_ts]
        for c, array in enumerate(tiles):
            canvas.paste(_tile(array, tile), (c * tile, header + r * tile))
    atomic_write_bytes(path, lambda f: canvas.save(f, format="PNG"))


def write_curves(path: Path, report: dict[str, Any]) -> None:
    """mIoU against t_ts for every fine-tuned model, the baseline and the bound as lines (the
    paper's Table 3 as a picture)."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.6), dpi=110)
    for name, scores in report["scores"].items():
        points = [(int(s["name"][2:]), 100 * s["miou"]) for s in scores["setups"]
                  if s["name"].startswith("t=")]
        if name in ("baseline", "bound"):
            value = next(m for t, m in points if t == 0)
            ax.axhline(value, linestyle="--", color="grey" if name == "baseline" else "black",
                       label=f"{name} (t_ts=0): {value:.1f}")
        else:
            ax.plot([t for t, _ in points], [m for _, m in points], marker="o", label=name)
    ax.set_xlabel("t_ts (test-time inference iterations)")
    ax.set_ylabel("mIoU % (test images)")
    ax.legend(fontsize=7, loc="best")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    atomic_write_bytes(path, lambda f: f.write(buf.getvalue()))
