import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from datagen import make_split
from discli.cache import PseudoCache
from discli.checkpoint import file_hash, load_checkpoint, save_checkpoint
from discli.errors import BadInputError, IncompatibleError, UsageError
from discli.train.config import TrainConfig, load_config
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


def weights(path):
    return load_checkpoint(path)["model"]


def _fixed_batch_losses(path, manifest_path):
    from discli.checkpoint import load_model
    from discli.data.dataset import SegDataset, collate
    from discli.data.manifest import read_manifest
    from discli.train.engine import PHASES, compute_losses

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
    import discli.train.engine as engine

    real = engine.save_checkpoint

    class Killed(Exception):
        pass

    def kill_after_iter2(path, state):
        real(path, state)
        if state["phase"] == "step3" and state["iteration"] == 4:
            raise Killed

    engine.save_checkpoint = kill_after_iter2
    try:
        with pytest.raises(Killed):
            pretrain(stop)
    finally:
        engine.save_checkpoint = real
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
