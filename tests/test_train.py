import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from factories import make_split
from discli.pseudo.cache import PseudoCache
from discli.infer.checkpoint import file_hash, load_checkpoint, save_checkpoint
from discli.errors import BadInputError, IncompatibleError, UsageError
from discli.train.config import load_config
from discli.train.keys import TrainConfig
from discli.train.finetune import finetune
from discli.train.pretrain import pretrain


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    return {"labelled": make_split(root, "train", 6, 0, True),
            "tagged": make_split(root, "web", 5, 1, False, tag_source="caption")}


def config(data, out, **kw):
    base = dict(labelled=str(data["labelled"]), tagged=str(data["tagged"]), out=str(out),
                backbone="tiny", channels=16, batch_size=4, crop_size=32, lr=0.01,
                iters_step1=6, iters_step2=4, iters_step3=6, mstep_iters=6, rounds=1,
                t_tr=3, ckpt_every=2, log_every=1, estep_batch_size=2, device="cpu")
    base.update(kw)
    return TrainConfig(**base)


def killed_after_checkpoint(cfg, phase, iteration, stage=pretrain):
    """``stage(cfg)`` (pretrain or finetune) stopped as by a kill right after it saved
    ``phase``'s checkpoint of ``iteration``."""
    import discli.train.engine as engine

    real = engine.save_checkpoint

    class Killed(Exception):
        pass

    def save_then_die(path, state):
        real(path, state)
        if state["phase"] == phase and state["iteration"] == iteration:
            raise Killed

    engine.save_checkpoint = save_then_die
    try:
        with pytest.raises(Killed):
            stage(cfg)
    finally:
        engine.save_checkpoint = real


def weights(path):
    return load_checkpoint(path)["model"]


def _fixed_batch_losses(path, manifest_path):
    from discli.infer.checkpoint import load_model
    from discli.data.dataset import SegDataset, collate
    from discli.data.manifest import read_manifest
    from discli.train.phases import PHASES, compute_losses

    model, _ = load_model(path)
    items = SegDataset(read_manifest(manifest_path))
    batch = collate([items[i] for i in range(1, len(items), 3)])  # one size: no padding
    with torch.no_grad():
        return {k: float(v) for k, v in compute_losses(model, batch, PHASES["step3"],
                                                       TrainConfig(), torch.device("cpu")).items()}


def test_one_step_moves_losses_the_right_way(data, tmp_path):
    cfg = config(data, tmp_path, iters_step1=30, iters_step2=30, iters_step3=0, lr=0.02,
                 ckpt_every=1000)
    pretrain(cfg, steps=[1])
    start = tmp_path / "start.pth"
    save_checkpoint(start, {**load_checkpoint(tmp_path / "pretrain/last.pth"), "iteration": 0})
    # The model before step 1 is the seed's initialisation: rebuild it the same way.
    from discli.train.pretrain import new_model

    init = new_model(cfg, ["background", "aeroplane", "bird", "car"])
    state = load_checkpoint(start)
    save_checkpoint(start, {**state, "model": init.state_dict()})
    pretrain(cfg, steps=[2])
    before = _fixed_batch_losses(start, data["labelled"])
    after1 = _fixed_batch_losses(tmp_path / "pretrain/step1.pth", data["labelled"])
    after2 = _fixed_batch_losses(tmp_path / "pretrain/step2.pth", data["labelled"])
    assert after1["map"] < 0.8 * before["map"] and after1["tag"] < 0.8 * before["tag"]
    assert after2["img"] < after1["img"]
    assert after2["map"] == after1["map"] and after2["tag"] == after1["tag"]


def test_step2_freezes_everything_but_subnet2(data, tmp_path):
    cfg = config(data, tmp_path)
    pretrain(cfg, steps=[1])
    before = weights(tmp_path / "pretrain/step1.pth")
    pretrain(cfg, steps=[2])
    after = weights(tmp_path / "pretrain/step2.pth")
    for key in before:
        changed = not torch.equal(before[key], after[key])
        assert changed == key.startswith("subnet2."), key


def test_resume_from_mid_step_checkpoint(data, tmp_path):
    full = config(data, tmp_path / "full", ckpt_every=2)
    pretrain(full)
    # Keep the iteration-2 checkpoint of step 3 by running a copy that stops there.
    stop = config(data, tmp_path / "stop", ckpt_every=2)
    pretrain(stop, steps=[1, 2])
    killed_after_checkpoint(stop, "step3", 4)
    assert load_checkpoint(tmp_path / "stop/pretrain/last.pth")["iteration"] == 4
    pretrain(stop)
    a = weights(tmp_path / "full/pretrain/final.pth")
    b = weights(tmp_path / "stop/pretrain/final.pth")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_finetune_estep_cache_and_mstep(data, tmp_path):
    cfg = config(data, tmp_path)
    pretrain(cfg)
    summary = finetune(cfg, only="estep")
    assert summary["rounds"][1] == "estep done"
    cache_path = tmp_path / "finetune/round-1/cache.h5"
    cache = PseudoCache(cache_path, checkpoint_hash=file_hash(tmp_path / "pretrain/final.pth"))
    assert sorted(cache.ids()) == [f"web_{i:03d}" for i in range(5)]
    assert cache.attrs["t_tr"] == 3 and cache.classes[0] == "background"
    entry = cache.get("web_000")
    assert entry.labelmap.shape == (48, 48) and entry.labelmap.dtype == np.uint8
    assert entry.tag_probs.shape == (4,) and 0 <= entry.confidence.min()
    summary = finetune(cfg, only="mstep")
    assert summary["rounds"][1] == "trained"
    assert (tmp_path / "finetune/final.pth").exists()
    assert finetune(cfg)["rounds"][1] == "already done"


def test_subnet2_refit_after_the_mstep_trains_subnet2_alone(data, tmp_path):
    # Same pretrained start for both runs: the refit changes subnet-2 only, on top of an
    # M-step identical to the run without it, and logs its reconstruction loss.
    plain = config(data, tmp_path / "plain", loss_img=0.0)
    pretrain(plain)
    init = str(tmp_path / "plain/pretrain/final.pth")
    plain = config(data, tmp_path / "plain", loss_img=0.0, init=init)
    refit = config(data, tmp_path / "refit", loss_img=0.0, init=init, subnet2_refit_iters=5)
    finetune(plain)
    finetune(refit)
    a = weights(tmp_path / "plain/finetune/final.pth")
    b = weights(tmp_path / "refit/finetune/final.pth")
    for key in a:
        assert torch.equal(a[key], b[key]) != key.startswith("subnet2."), key
    records = [json.loads(line) for line in
               (tmp_path / "refit/finetune/log.jsonl").read_text().splitlines()]
    refits = [r for r in records if r.get("phase") == "refit"]
    assert [r["iter"] for r in refits] == [1, 2, 3, 4, 5]
    assert all(r["img"] > 0 and r["loss"] == r["img"] and r["round"] == 1 for r in refits)
    assert sorted(p.name for p in (tmp_path / "refit/finetune/round-1").glob("*.pth")) == [
        "model.pth"]


def test_subnet2_refit_killed_midway_resumes_to_the_same_model(data, tmp_path):
    full = config(data, tmp_path / "full", subnet2_refit_iters=5)
    pretrain(full)
    init = str(tmp_path / "full/pretrain/final.pth")
    full = config(data, tmp_path / "full", subnet2_refit_iters=5, init=init)
    finetune(full)
    stop = config(data, tmp_path / "stop", subnet2_refit_iters=5, init=init)
    killed_after_checkpoint(stop, "refit", 2, stage=finetune)
    rdir = tmp_path / "stop/finetune/round-1"
    assert load_checkpoint(rdir / "refit.pth")["iteration"] == 2
    assert load_checkpoint(rdir / "last.pth")["done"]  # the M-step had finished
    finetune(stop)
    a = weights(tmp_path / "full/finetune/final.pth")
    b = weights(tmp_path / "stop/finetune/final.pth")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not (rdir / "refit.pth").exists() and not (rdir / "last.pth").exists()


def test_stale_cache_refused(data, tmp_path):
    cfg = config(data, tmp_path)
    pretrain(cfg)
    finetune(cfg, only="estep")
    # The pretrained checkpoint changes after the E-step: its cache is now stale.
    final = tmp_path / "pretrain/final.pth"
    state = load_checkpoint(final)
    state["model"]["subnet1.bias"] += 1.0
    save_checkpoint(final, state)
    with pytest.raises(IncompatibleError, match="stale cache"):
        finetune(cfg, only="mstep")
    assert finetune(cfg, only="mstep", force=True)["rounds"][1] == "trained"


def test_config_file_and_overrides(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text("[train]\nlr = 0.5\nbatch_size = 3\nt_tr = 10\n")
    cfg = load_config(path, {"lr": 0.1, "t_tr": None})
    assert cfg.lr == 0.1 and cfg.batch_size == 3 and cfg.t_tr == 10
    path.write_text("lr = 0.5\nbogus = 1\n")
    with pytest.raises(BadInputError, match="run.toml: unknown key 'bogus'"):
        load_config(path)
    path.write_text("batch_size = 'eight'\n")
    with pytest.raises(BadInputError, match="run.toml: key 'batch_size' must be int"):
        load_config(path)
    with pytest.raises(BadInputError, match="t_tr"):
        load_config(None, {"t_tr": -1})


def test_step_order_enforced(data, tmp_path):
    with pytest.raises(UsageError, match="step 1 has not finished"):
        pretrain(config(data, tmp_path), steps=[2])


def test_cli_pretrain_and_finetune(data, tmp_path):
    base = ["--labelled", str(data["labelled"]), "--out", str(tmp_path), "--backbone", "tiny",
            "--batch-size", "4", "--crop-size", "32", "--device", "cpu", "--set", "channels=16",
            "--quiet", "--json"]
    out = subprocess.run(["dis", "pretrain", *base, "--iters", "3", "--iters", "2",
                          "--iters", "3"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["checkpoint"].endswith("pretrain/final.pth")
    assert (tmp_path / "pretrain/config.toml").read_text().count("iters_step2 = 2") == 1
    out = subprocess.run(["dis", "finetune", *base, "--tagged", str(data["tagged"]),
                          "--t-tr", "2", "--rounds", "1", "--mstep-iters", "2"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert Path(json.loads(out.stdout)["checkpoint"]).exists()
    out = subprocess.run(["dis", "finetune", *base, "--tagged", str(data["tagged"]),
                          "--t-tr", "-1"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    bad = tmp_path / "bad.toml"
    bad.write_text("nope = 1\n")
    out = subprocess.run(["dis", "pretrain", *base, "--config", str(bad)], capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 3 and "bad.toml: unknown key 'nope'" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


# ----------------------------------------------------------------------------- a folder, one run
def _files(folder):
    return {p: p.read_bytes() for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def test_rerun_with_other_settings_is_refused_and_rewrites_nothing(data, tmp_path):
    cfg = config(data, tmp_path)
    pretrain(cfg)
    before = _files(tmp_path / "pretrain")
    with pytest.raises(UsageError, match=r"holds a pretrain run with other settings "
                                         r"\(batch_size 4 -> 2, lr 0.01 -> 0.5\)") as info:
        pretrain(config(data, tmp_path, lr=0.5, batch_size=2))
    assert info.value.exit_code == 2 and "config.toml" in str(info.value)
    # settings that change no result may differ; a run with nothing to do writes nothing
    again = config(data, tmp_path, device="cpu", num_workers=1, log_every=3, ckpt_every=5,
                   t_ts=0, rounds=4, mstep_iters=99)  # finetune keys: not pretrain's business
    summary = pretrain(again)
    assert summary["steps"] == {1: "already done", 2: "already done", 3: "already done"}
    assert _files(tmp_path / "pretrain") == before
    assert summary["results"][1]["iterations"] == 6 and summary["results"][3]["loss"] > 0
    # the same manifest by another spelling is the same setting; another file is not
    link = tmp_path / "same.jsonl"
    link.symlink_to(data["labelled"])
    assert pretrain(config(data, tmp_path, labelled=str(link)))["steps"][1] == "already done"
    with pytest.raises(UsageError, match="labelled"):
        pretrain(config(data, tmp_path, labelled=str(data["tagged"])))


def test_interrupted_run_continues_only_with_its_settings(data, tmp_path):
    killed_after_checkpoint(config(data, tmp_path), "step1", 4)
    with pytest.raises(UsageError, match=r"crop_size 32 -> 48"):
        pretrain(config(data, tmp_path, crop_size=48))
    assert pretrain(config(data, tmp_path))["steps"][1] == "trained"


def test_finetune_rerun_refuses_other_settings_and_extends_rounds(data, tmp_path):
    cfg = config(data, tmp_path, mstep_iters=2, t_tr=1)
    pretrain(cfg)
    finetune(cfg)
    folder = tmp_path / "finetune"
    before = _files(folder)
    with pytest.raises(UsageError, match=r"finetune run with other settings \(t_tr 1 -> 5\)"):
        finetune(config(data, tmp_path, mstep_iters=2, t_tr=5))
    with pytest.raises(UsageError, match=r"rounds 1 -> 0"):
        finetune(config(data, tmp_path, mstep_iters=2, t_tr=1, rounds=0))
    # pretrain-only keys and neutral keys may differ: nothing to do, nothing rewritten
    same = config(data, tmp_path, mstep_iters=2, t_tr=1, iters_step1=99, estep_batch_size=1)
    assert finetune(same)["rounds"] == {1: "already done"}
    assert _files(folder) == before
    # more rounds continue the run
    summary = finetune(config(data, tmp_path, mstep_iters=2, t_tr=1, rounds=2))
    assert summary["rounds"] == {1: "already done", 2: "trained"}
    assert (folder / "final.pth").read_bytes() == (folder / "round-2/model.pth").read_bytes()
    assert summary["results"][2]["estep"]["images"] == 5 and summary["results"][2]["loss"] > 0


def test_cli_refuses_other_settings_in_one_line(data, tmp_path, capsys):
    from test_infer_cli import cli

    args = ["pretrain", "--labelled", str(data["labelled"]), "--out", str(tmp_path),
            "--batch-size", "4", "--crop-size", "32", "--device", "cpu", "--iters", "2,1,2",
            "--set", "channels=16", "-q", "--json"]
    code, out, err = cli(capsys, *args)
    assert code == 0, err
    code, out, err = cli(capsys, *args[:-2], "--lr", "0.5")
    assert code == 2 and out == ""
    assert err.startswith("dis: error: ") and "lr 0.01 -> 0.5" in err
    assert len(err.strip().splitlines()) == 1
    # the summary: a table on stderr, the checkpoint on stdout
    code, out, err = cli(capsys, *args[:-2], "--num-workers", "0")
    assert code == 0, err
    assert out.strip().endswith("pretrain/final.pth") and len(out.splitlines()) == 1
    assert "already done" in err and "step" in err and "{1:" not in err


# ----------------------------------------------------------------------------- TensorBoard
class FakeWriter:
    made: list = []

    def __init__(self, log_dir, purge_step=None):
        self.log_dir, self.purge_step, self.scalars, self.closed = log_dir, purge_step, [], False
        FakeWriter.made.append(self)

    def add_scalar(self, tag, value, step):
        self.scalars.append((tag, value, step))

    def close(self):
        self.closed = True


def test_tensorboard_mirrors_the_log(data, tmp_path, monkeypatch):
    import discli.train.runlog as runlog

    FakeWriter.made = []
    monkeypatch.setattr(runlog, "summary_writer_class", lambda: FakeWriter)
    cfg = config(data, tmp_path, mstep_iters=2, t_tr=1, val=str(data["labelled"]))
    pretrain(cfg, tensorboard=True)
    finetune(cfg, tensorboard=True)
    writers = {Path(w.log_dir).relative_to(tmp_path).as_posix(): w for w in FakeWriter.made}
    assert set(writers) == {"pretrain/tensorboard/step1", "pretrain/tensorboard/step2",
                            "pretrain/tensorboard/step3", "finetune/tensorboard/estep",
                            "finetune/tensorboard/mstep-round1"}
    assert all(w.closed for w in writers.values())
    step1 = writers["pretrain/tensorboard/step1"]
    assert step1.purge_step == 1
    # the same numbers as log.jsonl, record for record
    log = [json.loads(line) for line in (tmp_path / "pretrain/log.jsonl").read_text().splitlines()]
    losses = [(r["iter"], r["loss"]) for r in log if r.get("step") == 1 and "loss" in r]
    assert [(s, v) for t, v, s in step1.scalars if t == "loss/total"] == losses
    tags = {t for t, _, _ in step1.scalars}
    assert {"loss/total", "loss/labelmap", "loss/tags", "lr", "val/miou"} <= tags
    estep = {t: (v, s) for t, v, s in writers["finetune/tensorboard/estep"].scalars}
    assert estep["estep/images"] == (5, 1) and "estep/kept_share" in estep
    mstep = {t for t, _, _ in writers["finetune/tensorboard/mstep-round1"].scalars}
    assert {"loss/total", "loss/reconstruction", "lr", "val/miou"} <= mstep


def test_tensorboard_missing_is_one_clear_error(data, tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails
    with pytest.raises(UsageError, match=r"^tensorboard=True needs the tensorboard package") \
            as caught:
        pretrain(config(data, tmp_path), tensorboard=True)
    assert caught.value.cli_message().startswith("--tensorboard needs the tensorboard package")
    assert not (tmp_path / "pretrain").exists()  # before any work


def test_tensorboard_real_writer(data, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    pretrain(config(data, tmp_path, iters_step1=4, iters_step2=0, iters_step3=0),
             tensorboard=True)
    events = EventAccumulator(str(tmp_path / "pretrain/tensorboard/step1"))
    events.Reload()
    assert [e.step for e in events.Scalars("loss/total")] == [1, 2, 3, 4]


def test_non_finite_loss_stops_before_the_step_and_keeps_the_checkpoint(data, tmp_path, capsys):
    from discli.cli.app import main
    from discli.errors import TrainingDivergedError

    cfg = config(data, tmp_path, iters_step1=4, ckpt_every=2, clip_grad_norm=0.0)
    pretrain(cfg, steps=[1])  # a finished step 1 ...
    saved = (tmp_path / "pretrain/step1.pth").read_bytes()
    import discli.train.engine as engine

    real = engine.compute_losses
    calls = {"n": 0}

    def poisoned(*args, **kwargs):  # ... then step 2's third loss is NaN
        losses = real(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 3:
            losses["loss"] = losses["loss"] * float("nan")
        return losses

    engine.compute_losses = poisoned
    try:
        with pytest.raises(TrainingDivergedError, match=r"step2: the loss is not finite at "
                                                        r"iteration 3 .*clip_grad_norm") as info:
            pretrain(cfg, steps=[2])
    finally:
        engine.compute_losses = real
    assert info.value.exit_code == 7
    assert (tmp_path / "pretrain/step1.pth").read_bytes() == saved
    state = load_checkpoint(tmp_path / "pretrain/last.pth")
    assert state["phase"] == "step2" and state["iteration"] == 2  # the checkpoint before it
    assert all(torch.isfinite(v.float()).all() for v in state["model"].values())


def test_gradient_clipping_bounds_the_update(data, tmp_path):
    import discli.train.engine as engine

    norms = []
    real = torch.nn.utils.clip_grad_norm_

    def spy(params, max_norm, *args, **kwargs):
        params = list(params)
        total = real(params, max_norm, *args, **kwargs)  # the norm before clipping
        after = torch.norm(torch.stack([p.grad.norm() for p in params if p.grad is not None]))
        norms.append((float(total), float(after), max_norm))
        return total

    engine.nn.utils.clip_grad_norm_ = spy
    try:
        pretrain(config(data, tmp_path, iters_step1=3, lr=0.5, clip_grad_norm=1e-3),
                 steps=[1])
    finally:
        engine.nn.utils.clip_grad_norm_ = real
    assert len(norms) == 3
    for before, after, limit in norms:
        assert limit == 1e-3 and before > limit and after == pytest.approx(limit, rel=1e-3)
