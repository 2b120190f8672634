"""`dis plot`: training curves of a run folder, a demo report, an evaluation report."""

import json

import numpy as np
import pytest
from PIL import Image
from test_infer_cli import cli

from discli.evaluation.plots import plot, read_log, training_series


def _write_log(path, records, torn=False):
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(r) + "\n" for r in records)
    path.write_text(text + ('{"stage": "finetune", "ph' if torn else ""))


def _run(tmp_path):
    run = tmp_path / "run"
    pre = [{"stage": "pretrain", "phase": f"step{s}", "step": s, "iter": i, "lr": 0.01 / i,
            "loss": 1.0 / i, "map": 0.5 / i, "tag": 0.3 / i} for s in (1, 2) for i in (5, 10)]
    pre.append({"stage": "pretrain", "phase": "step2", "step": 2, "iter": 10, "val_miou": 0.4})
    fine = []
    for r in (1, 2):
        fine.append({"stage": "finetune", "phase": "estep", "round": r, "t_tr": 3,
                     "mean_confidence": 0.8 + r / 100, "kept_share": 0.7, "tags_added": r,
                     "tags_removed": 2 * r, "images_with_changed_tags": r})
        fine += [{"stage": "finetune", "phase": "mstep", "round": r, "iter": i, "lr": 0.001,
                  "loss": 0.2, "map": 0.1, "img": 0.05, "tag": 0.05} for i in (4, 8)]
    _write_log(run / "pretrain" / "log.jsonl", pre)
    _write_log(run / "finetune" / "log.jsonl", fine, torn=True)
    return run


def test_training_series_lays_phases_end_to_end(tmp_path):
    run = _run(tmp_path)
    records = read_log(run / "pretrain" / "log.jsonl") + read_log(run / "finetune" / "log.jsonl")
    series = training_series(records)
    assert [x for x, _ in series["train"]["loss"]] == [5, 10, 15, 20, 24, 28, 32, 36]
    assert series["bounds"] == [(0, "step1"), (10, "step2"), (20, "round 1"), (28, "round 2")]
    assert series["val"] == [(20, 0.4)]
    assert [r["round"] for r in series["estep"]] == [1, 2]
    assert series["total"] == 36


def test_plot_run_folder_through_the_cli(tmp_path, capsys):
    run = _run(tmp_path)
    code, out, err = cli(capsys, "plot", str(run))
    assert code == 0, err
    assert out.strip() == str(run / "training.png")
    with Image.open(run / "training.png") as im:
        # four panels: losses, lr, validation mIoU, E-step statistics
        assert im.format == "PNG" and im.width > 600
        four = im.height
    code, out, _ = cli(capsys, "plot", str(run / "finetune" / "log.jsonl"), "-o",
                       str(tmp_path / "f.png"))
    assert code == 0 and out.strip() == str(tmp_path / "f.png")
    with Image.open(tmp_path / "f.png") as im:
        assert im.height == pytest.approx(0.75 * four, abs=2)  # no validation panel
    before = (run / "pretrain" / "log.jsonl").read_bytes()
    code, _, err = cli(capsys, "plot", str(run / "pretrain"), "-o",
                       str(run / "pretrain" / "log.jsonl"))
    assert code == 2 and "input" in err
    assert (run / "pretrain" / "log.jsonl").read_bytes() == before
    code, _, err = cli(capsys, "plot", str(tmp_path / "nothing"))
    assert code == 3 and "nothing" in err
    (tmp_path / "empty").mkdir()
    code, _, err = cli(capsys, "plot", str(tmp_path / "empty"))
    assert code == 3 and "log.jsonl" in err and len(err.strip().splitlines()) == 1


def _setup(name, miou, iou, k=3):
    confusion = (np.eye(k, dtype=int) * 10 + 1).tolist()
    return {"name": name, "miou": miou, "iou": iou, "confusion": confusion}


def test_plot_demo_and_evaluation_reports(tmp_path, capsys):
    classes = ["background", "cat", "dog"]
    iou = {"background": 0.9, "cat": 0.4, "dog": None}
    setups = [_setup(f"t={t}", 0.5 + t / 100, iou) for t in (0, 10)]
    report = {"classes": classes, "scores": {
        name: {"setups": setups + [_setup("ensemble", 0.6, iou)]}
        for name in ("baseline", "t_tr=0", "t_tr=10", "bound")}}
    (tmp_path / "demo").mkdir()
    (tmp_path / "demo" / "report.json").write_text(json.dumps(report))
    code, out, err = cli(capsys, "plot", str(tmp_path / "demo"))
    assert code == 0, err
    assert out.strip() == str(tmp_path / "demo" / "report.png")
    with Image.open(tmp_path / "demo" / "report.png") as im:
        assert im.width > 2 * im.height  # curves and per-class bars side by side
    evaluation = {"manifest": "m.jsonl", "images": 3, "classes": classes, "setups": setups}
    (tmp_path / "eval.json").write_text(json.dumps(evaluation))
    assert plot(tmp_path / "eval.json") == [tmp_path / "eval.png"]
    with Image.open(tmp_path / "eval.png") as im:
        assert im.width > 2 * im.height  # IoU bars and two confusion matrices
    (tmp_path / "other.json").write_text("[1, 2]")
    code, _, err = cli(capsys, "plot", str(tmp_path / "other.json"))
    assert code == 3 and "neither" in err


def test_demo_curves_png(tmp_path):
    from discli.evaluation.plots import write_curves

    iou = {"background": 0.9}
    report = {"classes": ["background"], "scores": {
        name: {"setups": [_setup("t=0", 0.3, iou, 1), _setup("t=5", 0.35, iou, 1)]}
        for name in ("baseline", "t_tr=5", "bound")}}
    write_curves(tmp_path / "curves.png", report)
    with Image.open(tmp_path / "curves.png") as im:
        assert im.format == "PNG" and im.width > 300
