"""Shipped training presets (`--config NAME`) and config files with [pretrain]/[finetune] tables."""

import tomllib
from pathlib import Path

import pytest
from test_infer_cli import cli

from discli.configs import PRESETS, preset_path
from discli.errors import BadInputError
from discli.train.config import dump_toml, load_config
from discli.train.keys import TrainConfig

ROOT = Path(__file__).resolve().parents[1]


def test_presets_are_shipped():
    assert PRESETS == ("demo", "photos", "quick", "voc-resnet101")
    for name in PRESETS:
        assert preset_path(name) == preset_path(f"{name}.toml")
        assert preset_path(name).is_file() and preset_path(name).parent.name == "configs"
        assert preset_path(name).read_text().startswith("#")  # says what it is for
    assert preset_path("nosuch") is None and preset_path("../pyproject") is None
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    setuptools = project["tool"]["setuptools"]
    assert setuptools["packages"].count("discli.configs") == 1
    assert setuptools["package-data"]["discli"].count("configs/*.toml") == 1


@pytest.mark.parametrize("name", PRESETS)
@pytest.mark.parametrize("section", ["pretrain", "finetune"])
def test_every_preset_loads_and_validates(name, section):
    data = tomllib.loads(preset_path(name).read_text())
    assert set(data) - {"extends"} <= {"train", "pretrain", "finetune"}
    cfg = load_config(name, section=section)  # validated by load_config
    assert isinstance(cfg, TrainConfig)
    assert load_config(preset_path(name), section=section) == cfg
    if section == "pretrain":
        assert cfg.loss_img == 1.0  # pretraining trains subnet-2


def test_preset_values():
    # demo/quick are tuned on the synthetic benchmark (values may move): check their shape only
    for name in ("demo", "quick"):
        pre, fine = (load_config(name, section=s) for s in ("pretrain", "finetune"))
        assert pre.backbone == fine.backbone == "tiny" and pre.crop_size == 64
        assert pre.loss_img == 1.0 and fine.loss_img == 0.0  # M-step leaves subnet-2 alone
        assert pre.inf_lr == fine.inf_lr and pre.iters_step1 > 0 and fine.mstep_iters > 0
    demo, quick = (load_config(n, section="pretrain") for n in ("demo", "quick"))
    assert quick.iters_step1 < demo.iters_step1
    # voc-resnet101: the paper's recipe (docs/running.md "Training on VOC12 + captions")
    voc_pre = load_config("voc-resnet101", section="pretrain")
    voc_fine = load_config("voc-resnet101", section="finetune")
    assert (voc_pre.backbone, voc_pre.backbone_weights, voc_pre.optimizer, voc_pre.lr,
            voc_pre.head_lr_mult, voc_pre.crop_size, voc_pre.batch_size) == \
        ("resnet101", "imagenet", "sgd", 0.01, 10.0, 321, 10)
    assert (voc_pre.iters_step1, voc_pre.iters_step2, voc_pre.iters_step3) == (20000, 5000, 10000)
    assert (voc_fine.t_tr, voc_fine.rounds, voc_fine.mstep_iters) == (30, 3, 10000)
    assert voc_pre.loss_img == voc_fine.loss_img == 1.0


def test_quick_extends_demo_and_states_only_what_it_changes():
    quick = tomllib.loads(preset_path("quick").read_text())
    assert quick["extends"] == "demo" and "train" not in quick
    for section in ("pretrain", "finetune"):
        demo, short = (load_config(n, section=section) for n in ("demo", "quick"))
        changed = {k for k, v in demo.to_dict().items() if short.to_dict()[k] != v}
        assert changed == set(quick.get(section, {}))  # every other key is demo's
    assert load_config("quick", section="finetune").rounds == 1


def test_extends_a_file_beside_it_then_overrides(tmp_path):
    (tmp_path / "base.toml").write_text("[train]\nlr = 0.5\nbatch_size = 3\n"
                                        "[finetune]\nrounds = 4\n")
    (tmp_path / "child.toml").write_text('extends = "base.toml"\n[train]\nlr = 0.25\n')
    cfg = load_config(tmp_path / "child.toml", section="finetune")
    assert (cfg.lr, cfg.batch_size, cfg.rounds) == (0.25, 3, 4)
    # a preset name works too, and the command line still wins
    (tmp_path / "mine.toml").write_text('extends = "demo"\n[finetune]\nrounds = 3\n')
    mine = load_config(tmp_path / "mine.toml", {"lr": 0.001}, section="finetune")
    demo = load_config("demo", section="finetune")
    assert (mine.rounds, mine.lr, mine.mstep_iters) == (3, 0.001, demo.mstep_iters)


@pytest.mark.parametrize("text, message", [
    ('extends = "loop.toml"\n', "loops back"),
    ('extends = 3\n', "must name a preset or a config file"),
    ('extends = "nosuch"\n', "config file not found"),
])
def test_bad_extends_is_one_clear_line(tmp_path, text, message):
    (tmp_path / "loop.toml").write_text(text)
    with pytest.raises(BadInputError, match=message):
        load_config(tmp_path / "loop.toml", section="pretrain")


def _capture(monkeypatch, module: str, function: str) -> list:
    import importlib

    seen: list = []

    def fake(cfg, **kwargs):
        seen.append(cfg)
        return {"steps": [], "rounds": [], "out": cfg.out}

    monkeypatch.setattr(importlib.import_module(module), function, fake)
    return seen


def test_config_name_resolves_on_the_command_line(monkeypatch, capsys, tmp_path):
    seen = _capture(monkeypatch, "discli.train.pretrain", "pretrain")
    code, _, err = cli(capsys, "pretrain", "--config", "demo", "--out", str(tmp_path),
                       "--lr", "0.004", "--json", "-q")
    assert code == 0, err
    assert seen[-1] == load_config("demo", {"out": str(tmp_path), "lr": 0.004},
                                   section="pretrain")
    assert seen[-1].loss_img == 1.0 and seen[-1].lr == 0.004
    seen = _capture(monkeypatch, "discli.train.finetune", "finetune")
    code, _, err = cli(capsys, "finetune", "--config", "quick", "--out", str(tmp_path),
                       "--set", "rounds=3", "--json", "-q")
    assert code == 0, err
    assert seen[-1] == load_config("quick", {"out": str(tmp_path), "rounds": 3},
                                   section="finetune")
    assert seen[-1].loss_img == 0.0 and seen[-1].rounds == 3


def test_section_keys_win_over_train(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text("[train]\nlr = 0.5\nbatch_size = 3\nloss_img = 0.3\n"
                    "[pretrain]\nloss_img = 1.0\n"
                    "[finetune]\nlr = 0.1\nloss_img = 0.0\n")
    pre = load_config(path, section="pretrain")
    fine = load_config(path, section="finetune")
    assert (pre.lr, pre.batch_size, pre.loss_img) == (0.5, 3, 1.0)
    assert (fine.lr, fine.batch_size, fine.loss_img) == (0.1, 3, 0.0)
    assert load_config(path, {"lr": 0.2, "loss_img": None}, section="finetune").lr == 0.2
    with pytest.raises(BadInputError, match="section"):
        load_config(path)  # tables for two commands: which one?
    path.write_text("[train]\nlr = 0.5\n[finetune]\nbogus = 1\n")
    with pytest.raises(BadInputError, match=r"run.toml \[finetune\]: unknown key 'bogus'"):
        load_config(path, section="pretrain")  # a typo in the other table is caught too
    path.write_text("[train]\nlr = 0.5\n[finetune]\nrounds = 'two'\n")
    with pytest.raises(BadInputError, match="key 'rounds' must be int"):
        load_config(path, section="finetune")


def test_unknown_preset_fails_with_exit_3(capsys, tmp_path):
    with pytest.raises(BadInputError,
                       match=r"config file not found \(presets: demo, photos, quick, "
                             r"voc-resnet101\)"):
        load_config("nosuch", section="pretrain")
    for command in ("pretrain", "finetune"):
        code, _, err = cli(capsys, command, "--config", "nosuch", "--out", str(tmp_path))
        assert code == 3
        assert "nosuch: config file not found (presets: demo, photos, quick, voc-resnet101)" in err
        assert len(err.strip().splitlines()) == 1


def test_flat_file_still_works(tmp_path, monkeypatch):
    path = tmp_path / "flat.toml"
    path.write_text("lr = 0.5\nbatch_size = 3\n")
    for section in (None, "pretrain", "finetune"):
        cfg = load_config(path, {"t_tr": 10}, section=section)
        assert (cfg.lr, cfg.batch_size, cfg.t_tr) == (0.5, 3, 10)
    # a file of a preset's name wins over the preset
    monkeypatch.chdir(tmp_path)
    Path("demo").write_text("lr = 0.123\n")
    assert load_config("demo", section="pretrain").lr == 0.123
    assert load_config("quick", section="pretrain") == load_config(preset_path("quick"),
                                                                    section="pretrain")


def test_dumped_config_loads_for_both_sections(tmp_path):
    cfg = load_config("voc-resnet101", section="finetune")
    path = tmp_path / "config.toml"
    path.write_text(dump_toml(cfg))
    assert load_config(path, section="pretrain") == cfg == load_config(path, section="finetune")


# ----------------------------------------------------------------------------- finding the options
def test_voc12_alias_is_the_paper_preset():
    assert preset_path("voc12-resnet101") == preset_path("voc-resnet101")
    for section in ("pretrain", "finetune"):
        assert load_config("voc12-resnet101", section=section) == \
            load_config("voc-resnet101", section=section)


def test_config_keys_lists_every_key_with_default_and_help(capsys):
    import dataclasses
    import json

    from discli.train.keys import config_keys

    code, out, err = cli(capsys, "config", "keys")
    assert code == 0, err
    lines = out.splitlines()
    names = [f.name for f in dataclasses.fields(TrainConfig)]
    assert [line.split()[0] for line in lines[1:]] == names
    row = next(line for line in lines if line.startswith("crop_size "))
    assert row.split()[:5] == ["crop_size", "int", "321", "both", "same"]
    assert row.endswith("training crop size in pixels")
    assert all(k.help and "\n" not in k.help for k in config_keys())  # one line of help each
    code, out, _ = cli(capsys, "config", "keys", "--stage", "pretrain", "--json")
    keys = {k["name"]: k for k in json.loads(out)}
    assert "iters_step1" in keys and "mstep_iters" not in keys
    assert keys["device"]["neutral"] and not keys["lr"]["neutral"]


@pytest.mark.parametrize("name", [*PRESETS, "voc12-resnet101"])
def test_config_show_prints_a_preset_resolved(capsys, name, tmp_path):
    code, out, err = cli(capsys, "config", "show", name)
    assert code == 0, err
    path = tmp_path / "shown.toml"
    path.write_text(out)
    from discli.train.keys import config_keys

    for section in ("pretrain", "finetune"):  # the output is a config file: the same configs
        used = [k.name for k in config_keys() if k.stage in (None, section)]
        shown, preset = (load_config(p, section=section) for p in (path, name))
        assert [getattr(shown, k) for k in used] == [getattr(preset, k) for k in used]
    # each command's table holds the keys that command uses, not the other's
    tables = tomllib.loads(out)
    assert "iters_step1" not in tables["finetune"] and "rounds" not in tables["pretrain"]
    assert "iters_step1" in tables["pretrain"] and "mstep_iters" in tables["finetune"]
    code, out, _ = cli(capsys, "config", "show", name, "--stage", "finetune")
    assert out.count("[finetune]") == 1 and "[pretrain]" not in out
    assert "iters_step1" not in out and "mstep_iters" in out
    code, _, err = cli(capsys, "config", "show", "nosuch")
    assert code == 3 and "presets: demo, photos, quick, voc-resnet101" in err


def test_unknown_set_key_suggests_the_close_one(capsys, tmp_path):
    code, _, err = cli(capsys, "pretrain", "--out", str(tmp_path), "--set", "bach_size=4")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "--set bach_size=4: unknown key 'bach_size' (did you mean 'batch_size'" in err
    code, _, err = cli(capsys, "finetune", "--out", str(tmp_path), "--set", "zzz=1")
    assert code == 2 and "`dis config keys` lists them" in err
    code, _, err = cli(capsys, "pretrain", "--out", str(tmp_path), "--set", "iters_step1=x")
    assert code == 2 and "--set iters_step1=x: key 'iters_step1' must be int" in err
    assert "--iters-step1" not in err  # no flag of that name exists
    path = tmp_path / "run.toml"
    path.write_text("[train]\ncrop_szie = 64\n")
    with pytest.raises(BadInputError, match=r"unknown key 'crop_szie' \(did you mean "
                                            r"'crop_size'\?\)"):
        load_config(path, section="pretrain")


def test_help_shows_every_default_and_out_is_required(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("COLUMNS", "200")
    for command in ("pretrain", "finetune"):
        code, out, _ = cli(capsys, command, "--help")
        assert code == 0
        text = " ".join(out.split())
        for shown in ("--backbone <str> Backbone name (`dis plugins` lists them). "
                      "[default: (tiny)]", "[default: (8)]", "[default: (321)]",
                      "[default: (0.01)]", "--num-workers", "--tensorboard", "[required]"):
            assert shown in text, (command, shown)
        code, _, err = cli(capsys, command, "--labelled", "x.jsonl")
        assert code == 2 and "Missing option '--out'" in err
    code, out, _ = cli(capsys, "finetune", "--help")
    text = " ".join(out.split())
    assert "[default: (30)]" in text and "[default: (2)]" in text  # --t-tr, --rounds
    code, out, _ = cli(capsys, "pretrain", "--help")
    assert "(1000,300,500)" in " ".join(out.split())


# ----------------------------------------------------------------------------- groups and tables
def test_written_config_has_a_table_per_group(tmp_path):
    from discli.train.keys import GROUPS, config_keys, key_group

    cfg = load_config("demo", section="finetune")
    text = dump_toml(cfg)
    data = tomllib.loads(text)
    assert set(data) == {"train"} and set(data["train"]) == set(GROUPS)
    assert data["train"]["inference"]["t_tr"] == 30 and data["train"]["model"]["backbone"] == "tiny"
    assert key_group("t_tr") == key_group("inf_lr") == key_group("t_ts") == "inference"
    assert {k.group for k in config_keys()} == set(GROUPS)
    path = tmp_path / "config.toml"
    path.write_text(text)
    assert load_config(path) == cfg  # no command tables: either command, or none, reads it


def test_group_tables_are_shared_and_command_tables_override(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text("[optim]\nlr = 0.5\nloss_img = 0.3\n[inference]\nt_tr = 7\n"
                    "[train.pretrain]\niters_step1 = 11\n"
                    "[pretrain]\nloss_img = 1.0\n"
                    "[finetune.inference]\nt_tr = 30\n")
    pre, fine = (load_config(path, section=s) for s in ("pretrain", "finetune"))
    assert (pre.lr, pre.loss_img, pre.t_tr, pre.iters_step1) == (0.5, 1.0, 7, 11)
    assert (fine.lr, fine.loss_img, fine.t_tr, fine.iters_step1) == (0.5, 0.3, 30, 11)
    path.write_text("[model]\nlr = 0.5\n")
    with pytest.raises(BadInputError, match=r"run.toml \[model\]: key 'lr' belongs in \[optim\]"):
        load_config(path, section="pretrain")
    path.write_text("[train.inference]\nbatch_size = 2\n")
    with pytest.raises(BadInputError, match=r"\[train.inference\]: key 'batch_size' belongs in"):
        load_config(path, section="pretrain")


def test_set_takes_a_group_or_command_prefix(monkeypatch, capsys, tmp_path):
    seen = _capture(monkeypatch, "discli.train.finetune", "finetune")
    code, _, err = cli(capsys, "finetune", "--config", "quick", "--out", str(tmp_path),
                       "--set", "finetune.t_tr=12", "--set", "inference.t_ts=3",
                       "--set", "pretrain.lr=0.9", "--json", "-q")
    assert code == 0, err
    assert (seen[-1].t_tr, seen[-1].t_ts, seen[-1].lr) == (12, 3, 0.002)  # pretrain.* ignored
    seen = _capture(monkeypatch, "discli.train.pretrain", "pretrain")
    code, _, err = cli(capsys, "pretrain", "--config", "quick", "--out", str(tmp_path),
                       "--set", "finetune.t_tr=12", "--set", "t_ts=4", "--json", "-q")
    assert code == 0, err
    assert (seen[-1].t_tr, seen[-1].t_ts) == (load_config("quick", section="pretrain").t_tr, 4)
    code, _, err = cli(capsys, "pretrain", "--out", str(tmp_path), "--set", "model.t_tr=3")
    assert code == 2 and "key 't_tr' belongs in [inference], not [model]" in err
    code, _, err = cli(capsys, "pretrain", "--out", str(tmp_path), "--set", "nosuch.t_tr=3")
    assert code == 2 and "unknown table 'nosuch'" in err


def test_config_keys_shows_the_group(capsys):
    import json

    code, out, _ = cli(capsys, "config", "keys")
    assert code == 0
    row = next(line for line in out.splitlines() if line.startswith("t_tr "))
    assert row.split()[5] == "inference"
    code, out, _ = cli(capsys, "config", "keys", "--json")
    assert {k["name"]: k["group"] for k in json.loads(out)}["backbone"] == "model"


def test_held_settings_read_every_layout(tmp_path):
    from discli.train.settings import held_settings

    cfg = load_config("demo", section="pretrain")
    (tmp_path / "config.toml").write_text(dump_toml(cfg))
    assert held_settings(tmp_path) == cfg.to_dict()
    (tmp_path / "config.toml").write_text("[train]\nlr = 0.5\nbatch_size = 3\n")  # older runs
    assert held_settings(tmp_path) == {"lr": 0.5, "batch_size": 3}
