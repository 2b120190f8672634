"""The synthetic benchmark: determinism, layout in the real formats, caption noise, fairness."""

import json
from pathlib import Path

import numpy as np
import pytest

from discli.data.captions import parse_caption
from discli.data.dataset import SegDataset, collate
from discli.data.images import read_image
from discli.data.manifest import read_manifest
from discli.synth import DEFAULT_CLASSES, SynthConfig, generate_benchmark, render_scene
from discli.data.labelmap import labelmap_tags, read_labelmap
from discli.errors import UsageError

SMALL = dict(n_labelled=4, n_tagged=12, n_test=3)


def files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "syn"
    return out, generate_benchmark(out, SynthConfig(seed=3, **SMALL))


def test_same_seed_same_bytes(bench, tmp_path):
    out, _ = bench
    generate_benchmark(tmp_path / "syn", SynthConfig(seed=3, **SMALL))
    assert files(tmp_path / "syn") == files(out)


def test_other_seed_other_images_and_parts_independent(bench, tmp_path):
    out, _ = bench
    generate_benchmark(tmp_path / "b", SynthConfig(seed=4, **SMALL), manifests=False)
    a, b = files(out), files(tmp_path / "b")
    jpg = "VOCdevkit/VOC2012/JPEGImages/lab_0000.jpg"
    assert a[jpg] != b[jpg] and a["idw/captions.jsonl"] != b["idw/captions.jsonl"]
    # Changing the size of one part leaves the other parts' images untouched.
    generate_benchmark(tmp_path / "c", SynthConfig(seed=3, n_labelled=4, n_tagged=5, n_test=3),
                       manifests=False)
    c = files(tmp_path / "c")
    for name, data in c.items():
        if name.startswith("VOCdevkit/"):
            assert a[name] == data


def test_layout_and_real_formats(bench):
    out, result = bench
    voc = out / "VOCdevkit" / "VOC2012"
    sets = voc / "ImageSets" / "Segmentation"
    assert sets.joinpath("train.txt").read_text().split() == [f"lab_{i:04d}" for i in range(4)]
    assert sets.joinpath("val.txt").read_text().split() == [f"test_{i:04d}" for i in range(3)]
    assert (out / "classes.txt").read_text().split() == DEFAULT_CLASSES
    for image_id in sets.joinpath("train.txt").read_text().split():
        img = read_image(voc / "JPEGImages" / f"{image_id}.jpg")
        lm = read_labelmap(voc / "SegmentationClass" / f"{image_id}.png", len(DEFAULT_CLASSES))
        assert img.shape[:2] == lm.shape and 48 <= min(lm.shape) <= max(lm.shape) <= 96
        assert set(np.unique(lm).tolist()) <= set(range(6)) | {255}
        assert 255 in lm and (lm > 0).any()  # objects with VOC-style void borders
    truth = [json.loads(x) for x in (out / "idw" / "true_tags.jsonl").read_text().splitlines()]
    caps = [json.loads(x) for x in (out / "idw" / "captions.jsonl").read_text().splitlines()]
    assert len(truth) == len(caps) == 12
    for t, c in zip(truth, caps):
        assert c["image"] == f"images/{t['id']}.jpg" and (out / "idw" / c["image"]).is_file()
        lm = read_labelmap(out / "idw" / "labels" / f"{t['id']}.png", 6)
        assert labelmap_tags(lm, DEFAULT_CLASSES) == t["tags"]
    assert set(result["stats"]) == {"caption_tag_precision", "caption_tag_recall",
                                    "caption_tag_f1"}


def test_manifests_from_the_real_preparation(bench):
    out, result = bench
    m = {k: read_manifest(v) for k, v in result["manifests"].items()}
    assert set(m) == {"train", "val", "tagged", "tagged_oracle"}
    assert len(m["train"]) == 4 and len(m["val"]) == 3 and len(m["tagged"]) == 12
    assert all(r.tag_source == "caption" and r.labelmap is None for r in m["tagged"].records)
    assert all(r.labelmap for r in m["tagged_oracle"].records)
    truth = {json.loads(x)["id"]: json.loads(x)["tags"]
             for x in (out / "idw" / "true_tags.jsonl").read_text().splitlines()}
    assert {r.id: r.tags for r in m["tagged_oracle"].records} == truth
    for r in m["tagged"].records:
        assert r.tags == parse_caption(r.caption, DEFAULT_CLASSES)
    batch = collate([SegDataset(m["train"])[i] for i in range(2)])
    assert batch["image"].shape[0] == 2 and batch["tags"].shape == (2, 6)


def test_caption_noise_rates(tmp_path):
    exact = generate_benchmark(tmp_path / "a", SynthConfig(n_labelled=0, n_tagged=30, n_test=0,
                                                           miss_rate=0, spurious_rate=0),
                               manifests=False)["stats"]
    assert exact["caption_tag_precision"] == 1 and exact["caption_tag_recall"] == 1
    noisy = generate_benchmark(tmp_path / "b", SynthConfig(n_labelled=0, n_tagged=30, n_test=0,
                                                           miss_rate=1, spurious_rate=1),
                               manifests=False)["stats"]
    assert noisy["caption_tag_recall"] == 0 and noisy["caption_tag_precision"] == 0


def test_refuses_to_clobber(tmp_path, bench):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("precious")
    with pytest.raises(UsageError, match="not empty"):
        generate_benchmark(tmp_path / "mine", SynthConfig(**SMALL))
    generate_benchmark(tmp_path / "b", SynthConfig(**SMALL), manifests=False)
    with pytest.raises(UsageError, match="already holds a benchmark"):
        generate_benchmark(tmp_path / "b", SynthConfig(**SMALL))
    (tmp_path / "b" / "idw" / "images" / "stale.jpg").write_bytes(b"old")
    generate_benchmark(tmp_path / "b", SynthConfig(**SMALL), overwrite=True, manifests=False)
    assert not (tmp_path / "b" / "idw" / "images" / "stale.jpg").exists()
    with pytest.raises(UsageError, match="some of aeroplane"):
        generate_benchmark(tmp_path / "c", SynthConfig(classes=["background", "dog"]))
    with pytest.raises(UsageError, match="unknown difficulty 'brutal'"):
        generate_benchmark(tmp_path / "d", SynthConfig(difficulty="brutal"))


@pytest.mark.parametrize("difficulty", ["easy", "medium", "hard"])
def test_colour_alone_does_not_decide_the_class(difficulty):
    """Per-pixel colour statistics overlap between classes (findings.md: a colour-only set is
    too easy). Fit the best colour-only rule on the very images it is scored on: it must still
    fail on object classes."""
    rng = np.random.default_rng(0)
    hist = np.zeros((8 ** 3, 6))
    pixels, labels = [], []
    for i in range(40):
        scene = render_scene(np.random.default_rng([9, i]), DEFAULT_CLASSES,
                             (int(rng.integers(48, 97)), int(rng.integers(48, 97))), difficulty)
        q = (scene.image // 32).astype(np.int64)
        pixels.append(q[..., 0] * 64 + q[..., 1] * 8 + q[..., 2])
        labels.append(scene.labelmap.astype(np.int64))
    x = np.concatenate([p.ravel() for p in pixels])
    y = np.concatenate([lab.ravel() for lab in labels])
    keep = y != 255
    np.add.at(hist, (x[keep], y[keep]), 1)
    pred = hist.argmax(1)[x[keep]]
    conf = np.bincount(6 * y[keep] + pred, minlength=36).reshape(6, 6)
    iou = np.diag(conf) / (conf.sum(0) + conf.sum(1) - np.diag(conf)).clip(1)
    assert iou[1:].mean() < 0.4, iou


def test_difficulty_sets_clutter_and_is_recorded(tmp_path):
    """Harder levels draw more clutter; the level is written to benchmark.json."""
    def edges(difficulty):
        total = 0.0
        for i in range(12):  # mean vertical gradient over background pixels
            scene = render_scene(np.random.default_rng([3, i]), DEFAULT_CLASSES, (64, 64),
                                 difficulty)
            grad = np.abs(np.diff(scene.image.astype(np.float32), axis=0)).sum(-1)
            total += grad[scene.labelmap[1:] == 0].mean()
        return total
    assert edges("easy") < edges("hard")
    generate_benchmark(tmp_path / "b", SynthConfig(difficulty="hard", **SMALL), manifests=False)
    meta = json.loads((tmp_path / "b" / "benchmark.json").read_text())
    assert meta["config"]["difficulty"] == "hard"
