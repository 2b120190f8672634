"""Inference settings travel in the checkpoint; `dis infer`, `dis evaluate` and `dis clean-tags
run` default to them, and their flags override them."""

import json
import math

import pytest
from factories import make_split
from test_infer_cli import cli, one_thread  # noqa: F401

from discli.pseudo.cache import PseudoCache
from discli.infer.checkpoint import (default_inference_settings, inference_settings,
                                     load_checkpoint, save_checkpoint)
from discli.errors import BadInputError, IncompatibleError
from discli.infer.loop import InferenceConfig
from discli.infer.checkpoint import load_for_inference
from discli.infer.provenance import RUN_INFO
from discli.train.config import load_config
from discli.train.keys import TrainConfig
from discli.train.pretrain import pretrain

SETTINGS = {"t_tr": 2, "t_ts": 3, "lr": 0.007, "momentum": 0.8, "tag_weight": 5.0,
            "proximity": 0.0, "method": "auto"}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny model pretrained for a couple of iterations with non-default inference settings."""
    root = tmp_path_factory.mktemp("settings")
    labelled = make_split(root / "data", "train", 4, 0, True)
    tagged = make_split(root / "data", "web", 3, 1, False, tag_source="caption")
    cfg = TrainConfig(labelled=str(labelled), out=str(root / "run"), backbone="tiny", channels=8,
                      batch_size=2, crop_size=32, iters_step1=2, iters_step2=1, iters_step3=2,
                      t_tr=2, t_ts=3, inf_lr=0.007, inf_momentum=0.8, inf_tag_weight=5.0,
                      ckpt_every=100, log_every=1, device="cpu", amp=False)
    pretrain(cfg)
    return {"checkpoint": root / "run" / "pretrain" / "final.pth", "labelled": labelled,
            "tagged": tagged}


def test_checkpoint_holds_the_settings(run):
    state = load_checkpoint(run["checkpoint"])
    assert state["inference"] == SETTINGS
    assert inference_settings(state) == SETTINGS
    loaded = load_for_inference(run["checkpoint"])
    assert loaded.inference == SETTINGS
    cfg = loaded.inference_config(3, momentum=0.5, lr=None)
    assert (cfg.steps, cfg.lr, cfg.momentum, cfg.tag_weight) == (3, 0.007, 0.5, 5.0)
    assert TrainConfig(t_ts=3, inf_lr=0.007).inference_settings()["t_ts"] == 3


def test_older_checkpoint_gets_the_defaults(run, tmp_path):
    state = load_checkpoint(run["checkpoint"])
    del state["inference"]
    defaults = InferenceConfig()
    expected = {"t_tr": 0, "t_ts": 0, "lr": defaults.lr, "momentum": defaults.momentum,
                "tag_weight": defaults.tag_weight, "proximity": defaults.proximity,
                "method": defaults.method}
    assert inference_settings(state) == expected == default_inference_settings()
    assert expected["lr"] == 0.003 and expected["tag_weight"] == 1.0
    old = tmp_path / "old.pth"
    save_checkpoint(old, state)
    assert load_for_inference(old).inference == expected
    # a partial entry (a future or older writer) is merged over the defaults
    assert inference_settings({"inference": {"lr": 0.02, "new_key": 1}}) == {**expected,
                                                                             "lr": 0.02}


@pytest.mark.parametrize("key,value", [("lr", math.nan), ("momentum", math.inf),
                                       ("t_ts", "3"), ("t_tr", -1), ("tag_weight", True),
                                       ("method", "magic")])
def test_bad_settings_are_refused(run, tmp_path, key, value):
    state = load_checkpoint(run["checkpoint"])
    state["inference"] = {**state["inference"], key: value}
    bad = tmp_path / "bad.pth"
    save_checkpoint(bad, state)
    with pytest.raises(IncompatibleError, match=key) as info:
        load_for_inference(bad)
    assert "bad.pth" in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(IncompatibleError):
        inference_settings({"inference": [1, 2]})


def test_nan_setting_is_exit_4_on_the_command_line(run, tmp_path, capsys):
    state = load_checkpoint(run["checkpoint"])
    state["inference"]["lr"] = math.nan
    save_checkpoint(tmp_path / "nan.pth", state)
    code, _, err = cli(capsys, "evaluate", str(run["labelled"]), "-c", str(tmp_path / "nan.pth"),
                       "--device", "cpu", "-q")
    assert code == 4 and "nan.pth" in err and "'lr'" in err and len(err.strip().splitlines()) == 1


def test_evaluate_defaults_to_the_checkpoint_and_flags_override(run, capsys):
    args = ("evaluate", str(run["labelled"]), "-c", str(run["checkpoint"]), "--device", "cpu",
            "--json", "-q")
    code, out, err = cli(capsys, *args)
    assert code == 0, err
    report = json.loads(out)
    assert report["steps"] == [3] and [s["name"] for s in report["setups"]] == ["t=3"]
    assert report["inference"]["lr"] == 0.007 and report["inference"]["momentum"] == 0.8
    assert report["inference"]["t_ts"] == [3]
    code, out, err = cli(capsys, *args, "--lr", "0.01", "--t-ts", "0")
    assert code == 0, err
    report = json.loads(out)
    assert report["steps"] == [0] and report["inference"]["lr"] == 0.01
    assert report["inference"]["momentum"] == 0.8


def test_infer_defaults_to_the_checkpoint(run, tmp_path, capsys):
    out = tmp_path / "preds"
    code, _, err = cli(capsys, "infer", str(run["labelled"]), "-c", str(run["checkpoint"]),
                       "--out", str(out), "--device", "cpu", "-q")
    assert code == 0, err
    info = json.loads((out / RUN_INFO).read_text())
    assert info["steps"] == 3 and info["inference"]["lr"] == 0.007
    code, _, err = cli(capsys, "infer", str(run["labelled"]), "-c", str(run["checkpoint"]),
                       "--out", str(tmp_path / "p2"), "--t-ts", "0", "--lr", "0.02",
                       "--device", "cpu", "-q")
    assert code == 0, err
    info = json.loads((tmp_path / "p2" / RUN_INFO).read_text())
    assert info["steps"] == 0 and info["inference"]["lr"] == 0.02


def test_clean_tags_run_defaults_to_the_checkpoint(run, tmp_path, capsys):
    out = tmp_path / "cache.h5"
    code, _, err = cli(capsys, "clean-tags", "run", str(run["tagged"]), "-c",
                       str(run["checkpoint"]), "--out", str(out), "--device", "cpu", "-q")
    assert code == 0, err
    cache = PseudoCache(out)
    used = json.loads(cache.attrs["inference"])
    assert cache.attrs["t_tr"] == 2
    assert (used["lr"], used["momentum"], used["tag_weight"]) == (0.007, 0.8, 5.0)
    cache.close()
    code, _, err = cli(capsys, "clean-tags", "run", str(run["tagged"]), "-c",
                       str(run["checkpoint"]), "--out", str(tmp_path / "c2.h5"), "--t-tr", "1",
                       "--tag-weight", "2", "--device", "cpu", "-q")
    assert code == 0, err
    cache = PseudoCache(tmp_path / "c2.h5")
    used = json.loads(cache.attrs["inference"])
    assert cache.attrs["t_tr"] == 1 and used["tag_weight"] == 2.0 and used["lr"] == 0.007
    cache.close()


def test_t_ts_is_validated():
    assert load_config(None, {"t_ts": 10}).t_ts == 10
    with pytest.raises(BadInputError, match="t_ts"):
        load_config(None, {"t_ts": -1})
