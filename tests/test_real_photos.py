"""The path a user with real photos takes, through the CLI: a folder of photos and masks
(`dis prepare-folder`) and captions (`dis prepare-idw`) -> `dis pretrain --config PRESET` ->
`dis finetune` -> `dis evaluate` / `dis infer`, for the paper's `voc-resnet101` preset and the
`photos` one, at toy size (a few iterations, 65 px crops) on crops and mirrors of a real VOC
photo (tests/data/voc2012-sample). The backbones start from random weights saved in
torchvision's key layout and passed as `--backbone-weights PATH`, the route an offline machine
takes; the downloader is replaced by one that fails, so a run that tried the network fails.
Without the weights, pretraining stops with one line saying which file is missing and where it
is looked for (exit 3)."""

import json
import math
import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image, ImageOps
from test_backbone_mobilenet import offline  # noqa: F401 - a fixture
from test_infer_cli import cli

from discli.data.voc import VOC_CLASSES

SAMPLE = Path(__file__).resolve().parent / "data" / "voc2012-sample"
# (the photo's box, mirrored?): six labelled photos of about 100x75 px
LABELLED = [((0, 0, 500, 366), False), ((0, 0, 500, 366), True), ((0, 40, 400, 340), False),
            ((0, 40, 400, 340), True), ((100, 26, 500, 366), False), ((60, 0, 460, 300), True)]
CAPTIONS = [((50, 0, 450, 366), "an aeroplane parked on the runway"),
            ((0, 0, 300, 300), "a plane at the airport"),
            ((200, 66, 500, 366), "jet airplane on the tarmac, mirrored"),
            ((0, 66, 300, 366), "a white airliner and a person")]


def _photo(box, mirror, scale=4):
    image = Image.open(SAMPLE / "2007_000033.jpg").crop(box)
    labels = Image.open(SAMPLE / "2007_000033.png").crop(box)
    if mirror:
        image, labels = ImageOps.mirror(image), ImageOps.mirror(labels)
    size = (image.width // scale, image.height // scale)
    return image.resize(size, Image.BILINEAR), labels.resize(size, Image.NEAREST)


@pytest.fixture
def manifests(tmp_path, capsys):
    """train.jsonl (6 photos with masks, VOC's classes) and idw.jsonl (4 captioned photos)."""
    for folder in ("photos", "masks", "web"):
        (tmp_path / folder).mkdir()
    for i, (box, mirror) in enumerate(LABELLED):
        image, labels = _photo(box, mirror)
        image.save(tmp_path / "photos" / f"p{i}.jpg", quality=90)
        labels.save(tmp_path / "masks" / f"p{i}.png")  # VOC's palette PNG, kept
    lines = []
    for i, (box, caption) in enumerate(CAPTIONS):
        _photo(box, "mirrored" in caption)[0].save(tmp_path / "web" / f"w{i}.jpg")
        lines.append(json.dumps({"image": f"w{i}.jpg", "caption": caption}) + "\n")
    (tmp_path / "captions.jsonl").write_text("".join(lines))
    (tmp_path / "classes.txt").write_text("\n".join(VOC_CLASSES) + "\n")
    code, _, err = cli(capsys, "prepare-folder", str(tmp_path / "photos"),
                       str(tmp_path / "masks"), "--classes", str(tmp_path / "classes.txt"),
                       "-o", str(tmp_path / "train.jsonl"), "-q")
    assert code == 0, err
    code, _, err = cli(capsys, "prepare-idw", str(tmp_path / "captions.jsonl"), "--root",
                       str(tmp_path / "web"), "-o", str(tmp_path / "idw.jsonl"), "-q")
    assert code == 0, err
    tags = [json.loads(line).get("tags") for line in
            (tmp_path / "idw.jsonl").read_text().splitlines()[1:]]
    assert tags == [["aeroplane"]] * 3 + [["aeroplane", "person"]]
    return tmp_path / "train.jsonl", tmp_path / "idw.jsonl"


PRESETS = {"voc-resnet101": ("resnet101-cd907fc2.pth", torchvision.models.resnet101),
           "photos": ("mobilenet_v3_large-8738ca79.pth", torchvision.models.mobilenet_v3_large)}


@pytest.mark.parametrize("preset", PRESETS)
def test_pretrain_offline_names_the_missing_weights(preset, manifests, offline, capsys,
                                                    tmp_path):
    train, _ = manifests
    code, out, err = cli(capsys, "pretrain", "--config", preset, "--labelled", str(train),
                         "--out", str(tmp_path / "run"), "--device", "cpu", "-q")
    expected = tmp_path / "torch" / "hub" / "checkpoints" / PRESETS[preset][0]
    assert code == 3, err
    assert out == "" and len(err.strip().splitlines()) == 1
    assert err.startswith(f"dis: error: {expected}: ImageNet weights of the ")
    assert "downloading them from https://download.pytorch.org/models/" in err
    assert "(URLError: " in err and "$TORCH_HOME/hub/checkpoints" in err
    assert "--backbone-weights PATH" in err and "internal error" not in err
    assert len(offline) == 1 and not list((tmp_path / "run").rglob("*.pth"))


def _log(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


# ResNet-101 writes checkpoints of 0.3 GB: about 30 s on 2 cores (slow); MobileNetV3 about 5 s
@pytest.mark.parametrize("preset", [pytest.param("voc-resnet101", marks=pytest.mark.slow),
                                    "photos"])
def test_preset_end_to_end_on_real_photos(preset, manifests, offline, capsys, tmp_path):
    train, idw = manifests
    weights = tmp_path / "backbone.pth"
    torch.manual_seed(0)
    torch.save(PRESETS[preset][1](weights=None).state_dict(), weights)  # torchvision's keys
    run = tmp_path / "run"
    toy = ["--device", "cpu", "--batch-size", "2", "--crop-size", "65", "--set", "log_every=1"]
    code, out, err = cli(capsys, "pretrain", "--config", preset, "--labelled", str(train),
                         "--out", str(run), "--backbone-weights", str(weights), *toy,
                         "--set", "iters_step1=2", "--set", "iters_step2=1",
                         "--set", "iters_step3=1", "-q")
    assert code == 0, err
    assert out.strip() == str(run / "pretrain" / "final.pth")
    saved = tomllib.loads((run / "pretrain" / "config.toml").read_text())
    model_keys = saved["train"]["model"]
    assert model_keys["backbone_weights"] == str(weights)
    assert model_keys["backbone"] == {"voc-resnet101": "resnet101",
                                      "photos": "mobilenet_v3_large"}[preset]
    log = _log(run / "pretrain" / "log.jsonl")
    assert [r["phase"] for r in log] == ["step1", "step1", "step2", "step3"]
    assert all(math.isfinite(r["loss"]) for r in log)

    code, out, err = cli(capsys, "finetune", "--config", preset, "--labelled", str(train),
                         "--tagged", str(idw), "--out", str(run), *toy, "--t-tr", "2",
                         "--set", "rounds=1", "--set", "mstep_iters=2",
                         "--set", "subnet2_refit_iters=1", "--json", "-q")
    assert code == 0, err
    summary = json.loads(out)
    assert summary["rounds"] == {"1": "trained"}
    result = summary["results"]["1"]
    assert result["iterations"] == 2 and math.isfinite(result["loss"])
    assert result["estep"]["images"] == 4 and result["estep"]["t_tr"] == 2
    assert (run / "finetune" / "round-1" / "cache.h5").is_file()

    code, out, err = cli(capsys, "evaluate", str(train), "-c", str(run / "finetune" / "final.pth"),
                         "--device", "cpu", "--t-ts", "0,2", "--json", "-q")
    assert code == 0, err
    report = json.loads(out)
    assert report["images"] == len(LABELLED)
    assert [s["name"] for s in report["setups"]] == ["t=0", "t=2", "ensemble"]
    for setup in report["setups"]:
        assert 0.0 <= setup["miou"] <= 1.0 and setup["classes_counted"] >= 1
        # every labelled pixel but the void ones is scored, at the photos' own size
        assert setup["pixels"] == sum(int((np.asarray(_photo(box, m)[1]) != 255).sum())
                                      for box, m in LABELLED)

    code, out, err = cli(capsys, "infer", str(tmp_path / "photos"), "-c",
                         str(run / "finetune" / "final.pth"), "-o", str(tmp_path / "pred"),
                         "--device", "cpu", "--json", "-q")
    assert code == 0, err
    for i, (box, mirror) in enumerate(LABELLED):
        labelmap = Image.open(tmp_path / "pred" / f"p{i}.png")
        assert labelmap.size == _photo(box, mirror)[0].size
    assert offline == []  # the local file was used; the network never tried
