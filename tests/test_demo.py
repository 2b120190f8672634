"""`dis demo --quick` end to end (slow: a few minutes on 2 CPU cores)."""

import json
import subprocess

import pytest
from PIL import Image

from discli.errors import UsageError


@pytest.mark.slow
def test_demo_quick_end_to_end(tmp_path):
    out = tmp_path / "demo"
    result = subprocess.run(["dis", "demo", "--quick", "--out", str(out), "--quiet", "--json"],
                            capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout)
    assert report == json.loads((out / "report.json").read_text())
    classes = report["classes"]
    assert classes[0] == "background" and len(classes) >= 3
    assert set(report["scores"]) == {"baseline", "t_tr=0", "t_tr=10", "t_tr=30", "bound"}
    for scores in report["scores"].values():
        names = [s["name"] for s in scores["setups"]]
        assert names == ["t=0", "t=10", "t=30", "ensemble"]
        for setup in scores["setups"]:
            assert 0.0 <= setup["miou"] <= 1.0 and set(setup["iou"]) == set(classes)
    for stats in report["tags"].values():
        for kind in ("noisy", "cleaned"):
            assert 0.0 <= stats[kind]["micro"]["f1"] <= 1.0
    assert set(report["pseudo_labels"]) == {"t_tr=0", "t_tr=10", "t_tr=30"}
    for rounds in report["pseudo_labels"].values():
        assert [r["round"] for r in rounds] == [1]  # the quick preset runs one round
        assert all(0.0 <= r["miou"] <= 1.0 and 0.0 < r["kept_share"] <= 1.0 for r in rounds)
        assert all(0.0 <= r["caption_f1"] <= 1.0 and 0.0 <= r["cleaned_f1"] <= 1.0
                   for r in rounds)
    md = (out / "report.md").read_text()
    t0 = {s["name"]: s["miou"] for s in report["scores"]["t_tr=0"]["setups"]}
    t30 = {s["name"]: s["miou"] for s in report["scores"]["t_tr=30"]["setups"]}
    assert (f"t_tr=30 minus t_tr=0 (mIoU points): t_ts=0 {100 * (t30['t=0'] - t0['t=0']):+.1f}"
            in md)
    assert "| setup |" in md and "fully supervised bound" in md and "cleaned F1" in md
    assert "Pseudo-labels of the tagged images" in md
    assert "dis pretrain --config quick" in md and "dis finetune --config quick" in md
    assert Image.open(out / "curves.png").width > 300
    figure = Image.open(out / "figure.png")
    assert figure.width >= 7 * 64 and figure.height > 64
    # A re-run finds every stage finished and only rewrites the report.
    again = subprocess.run(["dis", "demo", "--quick", "--out", str(out), "--quiet", "--json"],
                           capture_output=True, text=True, timeout=600)
    assert again.returncode == 0
    assert json.loads(again.stdout)["scores"] == report["scores"]


def test_demo_folder_refuses_other_settings(tmp_path):
    """Finished stages are reused as they are, so a folder resumes only its own run: other
    settings or a folder from an older version are refused before any work, in one line."""
    from discli.demo.run import DemoConfig, check_settings

    results = tmp_path / "demo" / "results"
    results.mkdir(parents=True)
    with pytest.raises(UsageError, match="unknown difficulty"):
        check_settings(results, DemoConfig(difficulty="brutal"))
    assert not (results / "settings.json").exists()  # a typo does not lock the folder
    check_settings(results, DemoConfig(seed=3))
    check_settings(results, DemoConfig(seed=3, device="cpu", out="elsewhere"))  # neutral
    with pytest.raises(UsageError, match=r"other settings \(n_tagged, seed\)"):
        check_settings(results, DemoConfig(seed=4, n_tagged=10))
    result = subprocess.run(["dis", "demo", "--out", str(tmp_path / "demo"), "--seed", "5",
                             "--quiet"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "other settings (seed)" in result.stderr
    assert "Traceback" not in result.stderr
    result = subprocess.run(["dis", "demo", "--out", str(tmp_path / "demo"), "--seed", "3",
                             "--min-size", "48", "--max-size", "96", "--quiet"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "other settings (max_size, min_size)" in result.stderr
    with pytest.raises(UsageError, match="8 <= min_size <= max_size"):
        check_settings(results, DemoConfig(seed=3, min_size=200))  # the benchmark's own check
    old = tmp_path / "old" / "results"
    old.mkdir(parents=True)
    (old / "benchmark.json").write_text("{}")
    with pytest.raises(UsageError, match="older version"):
        check_settings(old, DemoConfig())


def test_listed_commands_rebuild_the_configs_that_ran():
    """report.md lists the `dis` commands behind each stage (`--config demo` plus what differs
    from the preset); parsed the way `dis pretrain` / `dis finetune` parse them, they give back
    the very configs the demo trained with."""
    import shlex
    from pathlib import Path

    from dis_plugins.options import build_config
    from discli.demo.report import train_command
    from discli.demo.run import DemoConfig, _train_config

    for command, section, extra, differs in [
            ("finetune", "finetune", dict(init="base.pth", t_tr=10, labelled="m/train.jsonl",
                                          tagged="m/tagged.jsonl"), ["seed=2"]),
            ("pretrain", "pretrain", dict(labelled="m/train.jsonl", iters_step3=1700),
             ["iters_step3=1700", "seed=2"])]:
        cfg = _train_config(DemoConfig(seed=2), Path("runs/x"), section, **extra)
        words = shlex.split(train_command(command, cfg))
        assert words[:4] == ["dis", command, "--config", "demo"]
        options = dict(zip(words[4::2], words[5::2]))
        sets = [value for key, value in zip(words[4::2], words[5::2]) if key == "--set"]
        assert sorted(sets) == differs  # only what differs from the preset
        paths = {k[2:].replace("-", "_"): v for k, v in options.items() if k != "--set"}
        if section == "finetune":
            paths["t_tr"] = int(paths["t_tr"])  # typer parses --t-tr as an int
        rebuilt = build_config(Path("demo"), sets, section=section, **paths)
        assert rebuilt == cfg


def test_figure_keeps_aspect_ratio_labels_columns_and_has_a_legend(tmp_path):
    """figure.png (the paper's Fig. 5) from tiny checkpoints: one row per test image, every
    tile with its image's aspect ratio, a heading naming t_tr and t_ts over every prediction
    column, and the class colours in a legend below."""
    import numpy as np
    from factories import CLASSES, save_tiny, trained_tiny, write_dataset

    from discli.data.manifest import read_manifest
    from discli.demo.run import DemoConfig
    from discli.demo.report import figure_headings, write_figure
    from discli.infer.visual import palette

    manifest = read_manifest(write_dataset(tmp_path / "data", [(32, 64), (64, 32)], seed=4))
    model = trained_tiny()
    checkpoints = {name: save_tiny(tmp_path / f"{name}.pt", model)
                   for name in ("baseline", "t_tr=0", "t_tr=2")}
    demo = DemoConfig(t_tr=[0, 2], t_ts=[0, 1], figure_rows=2)
    headings = figure_headings(demo, True)
    assert headings[3:] == ["baseline\nt_ts=0", "t_tr=0\nt_ts=0", "t_tr=2\nt_ts=0",
                            "t_tr=2\nt_ts=1"]
    write_figure(tmp_path / "figure.png", checkpoints, manifest, demo, tile=96)
    figure = np.asarray(Image.open(tmp_path / "figure.png").convert("RGB"))
    assert figure.shape[1] == 7 * (96 + 4) + 4
    # column 0 holds the inputs (no white pixel in them): 96 x 48, then 48 x 96
    column = (figure[:, 4:100] != 255).any(axis=2)
    rows = np.flatnonzero(column.any(axis=1))
    runs = np.split(rows, np.flatnonzero(np.diff(rows) > 1) + 1)
    tiles = [r for r in runs if len(r) >= 40]
    assert [len(r) for r in tiles[:2]] == [48, 96]
    first = column[tiles[0]]
    assert first.any(axis=0).sum() == 96
    second = column[tiles[1]]
    assert second.any(axis=0).sum() == 48
    legend_part = figure[tiles[1][-1] + 5:].reshape(-1, 3).tolist()
    for index in [*range(len(CLASSES)), 255]:
        assert palette()[index].tolist() in legend_part


def test_demo_trains_runs_side_by_side_as_it_would_one_after_the_other(tmp_path):
    # The demo trains its fine-tuning runs and the bound in worker processes: the weights must
    # be those of the same run in this process, and a worker's error must reach the caller
    # whole (type, path, option markers).
    import torch

    from factories import make_split
    from discli.demo.jobs import Job, run_graph, train_job
    from discli.errors import BadInputError
    from discli.train.keys import TrainConfig

    labelled = make_split(tmp_path, "train", 4, 0, True)

    def cfg(out, **kw):
        return TrainConfig(**{**dict(labelled=str(labelled), out=str(tmp_path / out),
                                     backbone="tiny", channels=8, batch_size=2, crop_size=32,
                                     iters_step1=3, iters_step2=2, iters_step3=3,
                                     device="cpu", seed=1), **kw})

    train_job("pretrain", cfg("here"))
    jobs = [Job("a", train_job, ("pretrain", cfg("a"))),
            Job("b", train_job, ("pretrain", cfg("b", output_stride=4)), after=("a",))]
    assert [name for name, _ in run_graph(jobs, workers=2)] == ["a", "b"]  # b waits for a

    def weights(out):
        return torch.load(tmp_path / out / "pretrain" / "final.pth", weights_only=False)["model"]

    here, there = weights("here"), weights("a")
    assert here.keys() == there.keys() and all(torch.equal(here[k], there[k]) for k in here)
    assert not torch.equal(weights("b")["subnet1.weight"], here["subnet1.weight"])

    broken = tmp_path / "broken.jsonl"
    broken.write_text("{not json\n")
    with pytest.raises(BadInputError) as raised:
        list(run_graph([Job("c", train_job, ("pretrain", cfg("c", labelled=str(broken))))],
                       workers=2))
    assert raised.value.path == str(broken)


def test_schedule_keeps_both_lanes_busy():
    from discli.demo.jobs import Job, makespan, schedule

    def job(name, cost, after=()):
        return Job(name, print, (), after, cost)

    first = [job("base", 46), job("bound", 89)]
    tuned = [job(f"t{t}", cost, ("base",)) for t, cost in ((0, 74), (10, 82), (30, 110))]
    evals = [job("e", 5, ("t30",))]
    assert makespan([*first, *tuned, *evals], workers=1) == 46 + 89 + 74 + 82 + 110 + 5
    order = schedule(first, tuned, evals, workers=2)
    # the longest fine-tuning on the bound's lane, the other two on the baseline's
    assert [j.name for j in order] == ["base", "bound", "t0", "t30", "t10", "e"]
    assert makespan(order, 2) == 89 + 110 + 5  # the bound's lane, then the evaluation
    assert makespan([*first, *tuned, *evals], 2) == 46 + 74 + 110 + 5  # t_tr order: later


def test_demo_workers():
    from discli.demo.jobs import demo_workers

    assert demo_workers(3, "cpu") == 3 and demo_workers(1, "cpu") == 1
    assert 1 <= demo_workers(0, "cpu") <= 2
    with pytest.raises(UsageError, match="workers must be >= 0"):
        demo_workers(-1, "cpu")


def test_demo_in_one_process_reports_every_stage_and_phase(tmp_path):
    # --workers 1: every job in this process, in the report's order; the profile names every
    # phase of every run from its log.jsonl, and a re-run only rewrites the report
    from discli.demo.run import DemoConfig, run_demo

    tiny = {"iters_step1": 4, "iters_step2": 2, "iters_step3": 3, "mstep_iters": 3,
            "subnet2_refit_iters": 2, "channels": 64, "ckpt_every": 2, "log_every": 1}
    demo = DemoConfig.quick_config(out=str(tmp_path / "d"), n_labelled=4, n_tagged=6, n_test=3,
                                   t_tr=[0, 2], t_ts=[0, 1], workers=1, figure_rows=1,
                                   min_size=48, max_size=64, train=tiny)
    report = run_demo(demo)
    assert list(report["timings_s"]) == [
        "benchmark", "pretrain", "finetune t_tr=0", "finetune t_tr=2", "bound",
        "evaluate baseline", "evaluate t_tr=0", "evaluate t_tr=2", "evaluate bound",
        "figure", "curves"]
    profile = report["profile_s"]
    assert list(profile) == ["baseline", "t_tr=0", "t_tr=2", "bound"]
    assert list(profile["baseline"]) == ["step1", "step2", "step3"]
    assert list(profile["t_tr=2"]) == ["estep 1", "mstep 1", "refit 1"]
    assert all(seconds >= 0 for phases in profile.values() for seconds in phases.values())
    md = (tmp_path / "d" / "report.md").read_text()
    assert "Per phase" in md and "| t_tr=2 | estep 1 " in md and "Wall time of this run" in md
    assert run_demo(demo)["scores"] == report["scores"]
