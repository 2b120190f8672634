"""`dis prepare-folder`: a folder of images + a folder of index masks -> a manifest that
`dis evaluate` (and pretrain / finetune, through the same reader) accepts."""

import json

import numpy as np
import pytest
from PIL import Image
from factories import CLASSES, make_sample
from test_infer_cli import cli, dis, one_thread, tiny_checkpoint  # noqa: F401

from discli.infer.checkpoint import load_model
from discli.data.manifest import Manifest, Record, read_manifest
from discli.data.labelmap import write_palette_png
from discli.evaluation.evaluate import Scoring, evaluate
from discli.infer.loop import InferenceConfig

CFG = InferenceConfig(lr=0.5, momentum=0.9)


@pytest.fixture
def folders(tmp_path):
    """images/{a.jpg, b.png, sub/c.png}; masks/{a.png (palette), b_mask.png (greyscale L),
    sub/c.png}; classes.txt; returns (root, {relative image: labelmap})."""
    rng = np.random.default_rng(7)
    root = tmp_path / "mine"
    truth = {}
    for rel, (h, w) in {"a.jpg": (40, 48), "b.png": (40, 48), "sub/c.png": (36, 52)}.items():
        image, labelmap = make_sample(rng, h, w)
        labelmap[0, :5] = 255  # some void
        (root / "images" / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(root / "images" / rel, quality=95)
        stem = rel.rsplit(".", 1)[0]
        if rel == "b.png":
            (root / "masks").mkdir(parents=True, exist_ok=True)
            Image.fromarray(labelmap, mode="L").save(root / "masks" / "b_mask.png")
        else:
            write_palette_png(root / "masks" / f"{stem}.png", labelmap)
        truth[rel] = labelmap
    (root / "classes.txt").write_text("# my classes\nbackground\ncat\ndog\n")
    return root, truth


def test_round_trip_through_evaluate(folders, tiny_checkpoint, capsys):
    root, truth = folders
    out = root / "manifests" / "mine.jsonl"
    code, stdout, err = cli(capsys, "prepare-folder", str(root / "images"), str(root / "masks"),
                            "--classes", str(root / "classes.txt"), "-o", str(out),
                            "--split", "val", "--json")
    assert code == 0, err
    report = json.loads(stdout)
    assert report["records"] == report["with_labelmap"] == 3 and report["orphan_masks"] == []
    manifest = read_manifest(out)
    assert manifest.classes == CLASSES and manifest.root == root
    by_image = {rec.image: rec for rec in manifest.records}
    assert sorted(by_image) == ["images/a.jpg", "images/b.png", "images/sub/c.png"]
    assert by_image["images/b.png"].labelmap == "masks/b_mask.png"
    for rel, labelmap in truth.items():
        rec = by_image[f"images/{rel}"]
        assert rec.split == "val" and rec.tag_source == "pixels"
        assert rec.tags == [CLASSES[c] for c in (1, 2) if (labelmap == c).any()]
    assert {rec.id for rec in manifest.records} == {"a", "b", "c"}
    # dis evaluate reads it, and scores exactly what a hand-written manifest of the same
    # files scores
    r = dis("evaluate", str(out), "-c", str(tiny_checkpoint), "--t-ts", "0", "--json",
            "--device", "cpu", "--lr", str(CFG.lr), "--momentum", str(CFG.momentum))
    assert r.returncode == 0, r.stderr
    scored = json.loads(r.stdout)["setups"][0]
    by_hand = Manifest(list(CLASSES), [
        Record(id=f"x{i}", image=f"images/{rel}",
               labelmap=f"masks/{'b_mask.png' if rel == 'b.png' else rel.replace('.jpg', '.png')}")
        for i, rel in enumerate(truth)], root)
    model, _ = load_model(tiny_checkpoint)
    want = evaluate(model, by_hand, Scoring([0]), CFG)["setups"][0]
    assert scored["confusion"] == want["confusion"]
    assert scored["pixels"] == sum(int((lm != 255).sum()) for lm in truth.values())


def test_bad_masks_are_refused_with_the_file_named(folders, capsys):
    root, truth = folders
    args = ["prepare-folder", str(root / "images"), str(root / "masks"), "--classes",
            "cat,dog", "-o", str(root / "m.jsonl")]
    (root / "masks" / "a.png").rename(root / "masks" / "zz.png")  # a's mask missing
    code, _, err = cli(capsys, *args)
    assert code == 3 and "a.jpg" in err and "no mask" in err
    assert not (root / "m.jsonl").exists()
    code, out, err = cli(capsys, *args, "--allow-unlabelled", "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["records"] == 3 and report["with_labelmap"] == 2
    assert report["orphan_masks"] == ["zz.png"]
    (root / "masks" / "zz.png").rename(root / "masks" / "a.png")
    bad = truth["sub/c.png"].copy()
    bad[5, 5] = 7  # not a class
    write_palette_png(root / "masks" / "sub" / "c.png", bad)
    code, _, err = cli(capsys, *args)
    assert code == 3 and "c.png" in err and "value(s) 7" in err
    code, out, err = cli(capsys, *args, "--skip-bad", "--json")
    assert code == 0 and json.loads(out)["records"] == 2
    assert "c.png" in json.loads(out)["bad"][0]["path"]
    Image.new("RGB", (52, 36)).save(root / "masks" / "sub" / "c.png")  # a colour mask
    code, _, err = cli(capsys, *args)
    assert code == 3 and "not a palette or greyscale" in err
    write_palette_png(root / "masks" / "sub" / "c.png", np.zeros((10, 10), np.uint8))
    code, _, err = cli(capsys, *args)
    assert code == 3 and "10x10" in err
    code, _, err = cli(capsys, *args[:3], "--classes", "cat,dog", "-o",
                       str(root / "masks" / "b_mask.png"), "--skip-bad")
    assert code == 2 and "input" in err
