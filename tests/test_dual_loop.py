"""The M-step of Eq. 1 (tag targets, tag gate, class-balanced thresholds, untagged images),
pseudo-label statistics and scores, E-step logging, validation during training, the warm-up
schedule and the shipped backbone weights."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from factories import make_split, write_cache
from discli.pseudo.cache import CacheEntry, PseudoCache
from discli.data.manifest import read_manifest
from discli.data.labelmap import write_palette_png
from discli.errors import BadInputError, UsageError
from discli.pseudo.stats import cache_stats, score_cache
from discli.train.keys import TrainConfig
from discli.train.engine import poly
from discli.train.finetune import finetune, mstep_records
from discli.train.pretrain import pretrain
from discli.pseudo.tags import TagRule
from discli.pseudo.tags import gate_labelmap
from discli.train.pseudo import class_thresholds, cutmix_box, paste, tag_target

CLASSES = ["background", "aeroplane", "bird", "car"]


def test_tag_targets_follow_eq1():
    noisy = np.array([1, 1, 0, 0], np.uint8)  # caption: aeroplane
    probs = np.array([0.2, 0.1, 0.9, 0.3], np.float32)
    cleaned = TagRule("threshold", 0.5).clean(noisy, probs, None)  # bird
    assert tag_target(noisy, cleaned, "noisy").tolist() == [1, 1, 0, 0]
    assert tag_target(noisy, cleaned, "cleaned").tolist() == [1, 0, 1, 0]
    assert tag_target(noisy, cleaned, "mix").tolist() == [1, 0.5, 0.5, 0]
    assert tag_target(noisy, TagRule("threshold", 0.25).clean(noisy, probs, None),
                      "cleaned").tolist() == [1, 0, 1, 1]
    with pytest.raises(ValueError, match="tag target"):
        tag_target(noisy, cleaned, "both")


def test_evidence_rule_corrects_the_caption_by_probability_and_area():
    rule = TagRule("evidence", keep=0.4, add=0.25)
    noisy = np.array([1, 1, 1, 0, 0], np.uint8)  # caption: classes 1 and 2
    probs = np.array([0.9, 0.05, 0.6, 0.2, 0.1], np.float32)
    labelmap = np.zeros((10, 10), np.uint8)
    labelmap[0, :6] = 1    # 6% of the image: score 0.5 * 0.05 + 0.5 * 0.6 = 0.325 < keep
    labelmap[1:3, :] = 3   # 20%: score 0.5 * 0.2 + 0.5 = 0.6 >= add, though v3 says 0.2
    labelmap[5, 0] = 255   # ignored pixels count for no class
    # class 2: no pixels, probability 0.6 -> score 0.3 < keep; class 4: 0.05 < add
    assert rule.clean(noisy, probs, labelmap).tolist() == [True, False, False, True, False]
    labelmap[6, :5] = 2    # 5% more evidence for class 2: 0.3 + 0.25 = 0.55 -> kept
    assert rule.clean(noisy, probs, labelmap).tolist() == [True, False, True, True, False]
    with pytest.raises(ValueError, match="pseudo-labelmap"):
        rule.clean(noisy, probs, None)


def test_gate_ignores_absent_classes_never_background():
    labelmap = np.array([[0, 1, 2], [3, 255, 2]], np.uint8)
    gated = gate_labelmap(labelmap, np.array([False, True, False, True]))
    assert gated.tolist() == [[0, 1, 255], [3, 255, 255]]


def test_cutmix_box_stays_inside_and_covers_its_share():
    torch.manual_seed(0)
    for _ in range(200):
        top, left, bh, bw = cutmix_box(64, 48)
        assert 0 <= top and top + bh <= 64 and 0 <= left and left + bw <= 48
        assert 0.01 <= bh * bw / (64 * 48) <= 0.45  # area (0.02, 0.4), rounding and clipping


def test_paste_mixes_image_labelmap_and_tags_alike():
    def item(value, cls, tags):
        return {"image": torch.full((3, 16, 16), float(value)),
                "labelmap": torch.full((16, 16), cls, dtype=torch.int64),
                "tags": torch.tensor(tags, dtype=torch.float32)}
    torch.manual_seed(3)
    mixed = paste(item(0, 1, [1, 1, 0, 0]), item(5, 3, [1, 0, 0, 0.5]))
    boxed = mixed["labelmap"] == 3
    assert 0 < int(boxed.sum()) < 256  # a box, not everything or nothing
    assert bool((mixed["image"][:, boxed] == 5).all() and (mixed["image"][:, ~boxed] == 0).all())
    assert mixed["labelmap"][~boxed].eq(1).all()
    assert mixed["tags"].tolist() == [1, 1, 0, 0.5]  # the union of the two targets


def _write_cache(path, entries, classes=CLASSES):
    return PseudoCache(write_cache(path, entries, classes))


def _entry(image_id, labelmap, confidence, probs, noisy):
    return CacheEntry(image_id, np.asarray(labelmap, np.uint8),
                      np.asarray(confidence, np.float16), np.asarray(probs, np.float32),
                      np.asarray(noisy, np.uint8))


def test_class_thresholds_keep_the_best_pixels_of_an_unsure_class(tmp_path):
    labelmap = np.array([[0, 0, 0, 0], [1, 1, 1, 1]])
    confidence = np.array([[0.9, 0.95, 0.99, 0.97], [0.3, 0.4, 0.5, 0.6]])
    cache = _write_cache(tmp_path / "c.h5", [_entry("a", labelmap, confidence, [1, 1, 0, 0],
                                                    [1, 1, 0, 0])])
    thresholds = class_thresholds(cache, confidence=0.7, keep=0.5)
    assert thresholds[0] == pytest.approx(0.7)  # confident class: the global threshold
    assert 0.4 < thresholds[1] <= 0.5 + 1e-3  # unsure class: its best half survives
    assert thresholds[2] == pytest.approx(0.7)  # no pixel: the global threshold


def _scored_cache(tmp_path):
    """Two images with one true labelmap: "a" labelled perfectly (its tags add bird), "b" all
    background (its tags drop aeroplane; two of its pixels below confidence 0.7)."""
    from discli.data.manifest import Manifest, Record, write_manifest

    truth_lm = np.array([[0, 0, 1, 1], [0, 2, 2, 255]], np.uint8)
    root = tmp_path / "truth"
    write_palette_png(root / "a.png", truth_lm)
    write_palette_png(root / "b.png", truth_lm)
    rows = [{"id": i, "image": f"{i}.jpg", "labelmap": f"{i}.png", "tags": ["aeroplane"]}
            for i in ("a", "b")]
    manifest_path = root / "m.jsonl"
    write_manifest(manifest_path, Manifest(CLASSES, [Record(**r) for r in rows], root))
    perfect = np.where(truth_lm == 255, 0, truth_lm)
    wrong = np.zeros_like(truth_lm)
    conf = np.full(truth_lm.shape, 0.9)
    conf_low = conf.copy()
    conf_low[0, :2] = 0.5
    cache = _write_cache(tmp_path / "c.h5", [
        _entry("a", perfect, conf, [0.9, 0.8, 0.7, 0.1], [1, 1, 0, 0]),
        _entry("b", wrong, conf_low, [0.9, 0.1, 0.1, 0.1], [1, 1, 0, 0])])
    return manifest_path, cache


def test_stats_and_scores_of_a_cache(tmp_path):
    manifest_path, cache = _scored_cache(tmp_path)
    stats = cache_stats(cache, confidence=0.7)
    assert stats["images"] == 2 and stats["tags_added"] == 1 and stats["tags_removed"] == 1
    assert stats["images_with_changed_tags"] == 2
    assert stats["kept_share"] == pytest.approx(14 / 16)
    assert stats["mean_confidence"] == pytest.approx((16 * 0.9 - 2 * 0.4) / 16, abs=1e-3)
    score = score_cache(cache, read_manifest(manifest_path), confidence=0.7)
    assert score["images"] == 2
    # background: tp 3+3, gt 6, pred 3+7 -> 6/10; aeroplane 2/4; bird 2/4
    assert score["all"]["iou"]["background"] == pytest.approx(0.6)
    assert score["all"]["iou"]["aeroplane"] == pytest.approx(0.5)
    assert score["all"]["iou"]["car"] is None
    assert score["kept_share"] == pytest.approx(12 / 14)


def test_score_cache_command(tmp_path):
    import subprocess

    manifest_path, cache = _scored_cache(tmp_path)
    out = subprocess.run(["dis", "score-cache", str(cache.path), str(manifest_path),
                          "--confidence", "0.7", "--json"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["all"]["iou"]["background"] == pytest.approx(0.6)
    assert report["stats"]["tags_added"] == 1
    table = subprocess.run(["dis", "score-cache", str(cache.path), str(manifest_path)],
                           capture_output=True, text=True, timeout=120)
    assert table.returncode == 0 and "mIoU" in table.stdout
    missing = subprocess.run(["dis", "score-cache", str(tmp_path / "none.h5"),
                              str(manifest_path)], capture_output=True, text=True, timeout=120)
    assert missing.returncode == 3 and "none.h5" in missing.stderr
    assert "Traceback" not in missing.stderr


def test_pseudo_entries_ignore_what_the_tags_suppressed():
    from discli.model.net import final_probs
    from discli.train.estep import pseudo_entries

    u3 = torch.zeros(1, 3, 2, 2)
    u3[0, 1, 0, :] = 3.0  # class 1 wins the top row before re-weighting
    u3[0, 2, 1, 0] = 3.0  # class 2 one pixel
    v3 = torch.tensor([[5.0, -8.0, 5.0]])  # the tags call class 1 absent
    batch = {"image": torch.zeros(1, 3, 2, 2), "id": ["x"], "tags": torch.tensor([[1., 1, 0]])}
    plain = pseudo_entries(final_probs(u3, v3), v3, batch)[0]
    assert plain.labelmap.tolist() == [[0, 0], [2, 0]]  # suppressed class 1 -> background
    marked = pseudo_entries(final_probs(u3, v3), v3, batch, u3=u3)[0]
    assert marked.labelmap.tolist() == [[255, 255], [2, 0]]
    assert marked.noisy_tags.tolist() == [1, 1, 0]


def test_suppressed_pixels_ignored_under_either_pseudo_map():
    from discli.train.estep import cache_entries

    labelmap_probs = torch.tensor([[0.1, 0.8, 0.1], [0.7, 0.2, 0.1]]).T.reshape(1, 3, 1, 2)
    final = torch.tensor([[0.6, 0.3, 0.1], [0.7, 0.2, 0.1]]).T.reshape(1, 3, 1, 2)  # 1 -> bg
    batch = {"id": ["x"], "tags": torch.tensor([[1., 0, 0]])}
    tags = torch.tensor([[0.9, 0.1, 0.1]])
    kept = cache_entries(labelmap_probs, tags, batch)[0]
    assert kept.labelmap.tolist() == [[1, 0]]
    # the labelmap head's map, its pixel that the tags re-weight to background ignored
    assert cache_entries(labelmap_probs, tags, batch, final)[0].labelmap.tolist() == [[255, 0]]
    assert cache_entries(final, tags, batch, labelmap_probs)[0].labelmap.tolist() == [[255, 0]]


def test_untagged_images_left_out_of_the_mstep(tmp_path):
    manifest = make_split(tmp_path, "web", 4, 1, False, tag_source="caption")
    tagged = read_manifest(manifest)
    tagged.records[0].tags = []
    cfg = TrainConfig(tagged=str(manifest))
    kept = mstep_records(tagged, cfg)
    assert [r.id for r in kept.records] == [r.id for r in tagged.records[1:]]
    assert len(mstep_records(tagged, TrainConfig(drop_untagged=False)).records) == 4
    for rec in tagged.records:
        rec.tags = []
    with pytest.raises(BadInputError, match="no tagged image has a tag"):
        mstep_records(tagged, cfg)


def test_poly_schedule_warms_up_then_decays():
    factor = poly(100, 1.0, warmup=10)
    assert factor(0) == pytest.approx(0.1 * 1.0) and factor(4) == pytest.approx(0.5 * 0.96)
    assert factor(9) == pytest.approx(1.0 * 0.91)
    assert factor(50) == pytest.approx(0.5) and factor(100) == 0.0
    assert poly(100, 1.0)(0) == 1.0


def test_finetune_logs_estep_stats_and_validation(tmp_path):
    labelled = make_split(tmp_path, "train", 6, 0, True)
    tagged = make_split(tmp_path, "web", 5, 1, False, tag_source="caption")
    cfg = TrainConfig(labelled=str(labelled), tagged=str(tagged), out=str(tmp_path / "run"),
                      backbone="tiny", channels=16, batch_size=4, crop_size=32, lr=0.01,
                      iters_step1=4, iters_step2=2, iters_step3=4, mstep_iters=6, rounds=2,
                      t_tr=2, ckpt_every=100, log_every=1, estep_batch_size=2, device="cpu",
                      mstep_tags="mix", tag_gate="noisy", confidence=0.3, class_keep=0.5,
                      mstep_lr_mult=0.5, mstep_warmup=4, val=str(labelled), val_every=3,
                      cutmix=0.5, subnet2_refit_iters=2)
    pretrain(cfg)
    finetune(cfg)
    records = [json.loads(line) for line in
               (tmp_path / "run/finetune/log.jsonl").read_text().splitlines()]
    estep = [r for r in records if r["phase"] == "estep"]
    assert [r["round"] for r in estep] == [1, 2]
    assert all(r["images"] == 5 and 0 <= r["kept_share"] <= 1 for r in estep)
    val = [r for r in records if "val_miou" in r and r["phase"] == "mstep"]
    assert [(r["round"], r["iter"]) for r in val] == [(1, 3), (1, 6), (2, 3), (2, 6)]
    assert all(0 <= r["val_miou"] <= 1 for r in val)
    lrs = [r["lr"] for r in records if r["phase"] == "mstep" and "lr" in r and r["round"] == 1]
    assert lrs[0] < lrs[1] < lrs[2] > lrs[3]  # warm-up: the rate rises, then decays
    assert lrs[2] == pytest.approx(0.01 * 0.5 * 10 * 0.5 ** 0.9)  # lr x mult x head x poly
    pretrain_log = (tmp_path / "run/pretrain/log.jsonl").read_text()
    assert '"val_miou"' in pretrain_log


def test_shipped_backbone_weights_load_by_name():
    from discli.model.backbones import build_backbone
    from discli.model.weights import weights_file

    path = weights_file("tiny", 64)
    assert path.is_file() and path.with_suffix(".json").is_file()
    meta = json.loads(path.with_suffix(".json").read_text())
    assert "cat" not in meta["source_classes"] and "bottle" in meta["source_classes"]
    net = build_backbone("tiny", "shapes", channels=64)
    state = torch.load(path, weights_only=True)
    assert torch.equal(net.state_dict()["stage1.0.weight"], state["stage1.0.weight"])
    with pytest.raises(UsageError, match="no shipped 'shapes' weights for the tiny backbone "
                                         "with 32 channels"):
        build_backbone("tiny", "shapes", channels=32)


def test_make_weights_is_reproducible_and_loads(tmp_path):
    from discli.model.backbones import build_backbone
    from discli.train.ship_weights import WeightsRecipe, make_weights

    recipe = WeightsRecipe("tiny", 8, n_images=6, iters=3, batch_size=2)
    a = make_weights(recipe, out=tmp_path / "a.pth", workdir=tmp_path)
    b = make_weights(recipe, out=tmp_path / "b.pth", workdir=tmp_path)
    sa, sb = torch.load(a["out"], weights_only=True), torch.load(b["out"], weights_only=True)
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not any(k.startswith("backbone.") for k in sa)
    build_backbone("tiny", str(tmp_path / "a.pth"), channels=8)  # loads as a state dict path
    assert Path(a["out"]).with_suffix(".json").is_file()


def test_cli_val_options_log_validation(tmp_path):
    import subprocess

    labelled = make_split(tmp_path, "train", 4, 0, True)
    out = subprocess.run(["dis", "pretrain", "--labelled", str(labelled), "--out",
                          str(tmp_path / "run"), "--backbone", "tiny", "--set", "channels=8",
                          "--batch-size", "2", "--crop-size", "32", "--device", "cpu",
                          "--iters", "2", "--iters", "1", "--iters", "2", "--val", str(labelled),
                          "--quiet"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    records = [json.loads(line) for line in
               (tmp_path / "run/pretrain/log.jsonl").read_text().splitlines()]
    val = [(r["step"], r["iter"]) for r in records if "val_miou" in r]
    assert val == [(1, 2), (2, 1), (3, 2)]  # --val-every 0: at the end of every step


@pytest.mark.parametrize("key", ["inf_lr", "inf_momentum", "inf_proximity", "weight_decay",
                                 "mstep_lr_mult", "class_keep", "confidence"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_training_config_refuses_non_finite_numbers(key, value):
    from discli.train.config import load_config

    with pytest.raises(BadInputError, match=rf"invalid value \w+ for '{key}'"):
        load_config(None, {key: value})


def _estep_setup(tmp_path):
    """Three caption-tagged images, a tiny random model and the inference settings."""
    from discli.infer.loop import InferenceConfig
    from discli.model.net import ModelConfig, build_model

    tagged = read_manifest(make_split(tmp_path, "web", 3, 1, False, tag_source="caption"))
    torch.manual_seed(0)
    model = build_model(ModelConfig(backbone="tiny", num_classes=4,
                                    backbone_kwargs={"channels": 8})).eval()
    return tagged, model, InferenceConfig(lr=0.01, tag_weight=30.0)


@pytest.mark.parametrize("pseudo_map", ["final", "labelmap"])
def test_estep_pseudo_map_is_the_chosen_map(tmp_path, pseudo_map):
    import torch.nn.functional as F

    from discli.data.dataset import SegDataset
    from discli.infer.loop import infer
    from discli.train.estep import Execution, PseudoLabelling, run_estep

    tagged, model, cfg = _estep_setup(tmp_path)
    cache_path = run_estep(model, tagged, tmp_path / "c.h5",
                           PseudoLabelling("h", 3, cfg, pseudo_map=pseudo_map), Execution(1))
    cache = PseudoCache(cache_path)
    assert json.loads(cache.attrs["inference"])["pseudo_map"] == pseudo_map
    for item in SegDataset(tagged, use_labelmaps=False):
        result = infer(model, item["image"][None], 3, cfg, tags=item["tags"][None])
        probs = result.probs if pseudo_map == "final" else result.u3.softmax(dim=1)
        want = F.interpolate(probs, size=item["image"].shape[-2:], mode="bilinear",
                             align_corners=False).argmax(dim=1)[0]
        assert np.array_equal(cache.get(item["id"]).labelmap, want.numpy().astype(np.uint8))


def test_estep_flip_averages_the_image_and_its_mirror(tmp_path):
    import torch.nn.functional as F

    from discli.data.dataset import SegDataset
    from discli.infer.loop import infer
    from discli.train.estep import Execution, PseudoLabelling, run_estep

    tagged, model, cfg = _estep_setup(tmp_path)
    cache_path = run_estep(model, tagged, tmp_path / "c.h5",
                           PseudoLabelling("h", 3, cfg, pseudo_map="labelmap", flip=True),
                           Execution(1))
    cache = PseudoCache(cache_path)
    assert json.loads(cache.attrs["inference"])["flip"] is True
    plain = run_estep(model, tagged, tmp_path / "p.h5",
                      PseudoLabelling("h", 3, cfg, pseudo_map="labelmap"), Execution(1))
    assert "flip" not in json.loads(PseudoCache(plain).attrs["inference"])  # old caches match
    for item in SegDataset(tagged, use_labelmaps=False):
        image, tags, size = item["image"][None], item["tags"][None], item["image"].shape[-2:]
        maps = []
        for view in (image, image.flip(-1)):
            u3 = infer(model, view, 3, cfg, tags=tags).u3
            maps.append(F.interpolate(u3.softmax(dim=1), size=size, mode="bilinear",
                                      align_corners=False))
        want = ((maps[0] + maps[1].flip(-1)) / 2).max(dim=1)
        entry = cache.get(item["id"])
        assert np.array_equal(entry.labelmap, want.indices[0].numpy().astype(np.uint8))
        assert np.allclose(entry.confidence, want.values[0].numpy(), atol=2e-3)


def test_study_oracle_manifests_hold_the_hidden_truth(tmp_path):
    """benchmarks/dual_loop.py --oracle: the true tags in place of the captions (no labelmaps),
    and every labelmap of the benchmark (the bound's data) in one manifest whose paths resolve."""
    import importlib.util

    from discli.synth import SynthConfig, generate_benchmark

    script = Path(__file__).parents[1] / "benchmarks" / "dual_loop.py"
    spec = importlib.util.spec_from_file_location("dual_loop_study", script)
    study = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(study)
    bench = tmp_path / "bench"
    generate_benchmark(bench, SynthConfig(seed=3, n_labelled=3, n_tagged=6, n_test=2,
                                          min_size=32, max_size=40))
    mdir = bench / "manifests"
    paths = study.oracle_manifests(mdir)
    caption = read_manifest(mdir / "tagged.jsonl")
    oracle = read_manifest(mdir / "tagged_oracle.jsonl")
    true_tags = read_manifest(paths["tags"])
    assert [r.id for r in true_tags.records] == [r.id for r in caption.records]
    assert [r.tags for r in true_tags.records] == [r.tags for r in oracle.records]
    assert all(r.labelmap is None for r in true_tags.records)
    assert [r.tags for r in caption.records] != [r.tags for r in oracle.records]  # noisy captions
    everything = read_manifest(paths["pixels"])
    train = read_manifest(mdir / "train.jsonl")
    assert [r.id for r in everything.records] == [r.id for r in train.records + oracle.records]
    by_id = {r.id: r for r in everything.records}
    for m in (train, oracle):
        for r in m.records:
            assert everything.image_path(by_id[r.id]).samefile(m.image_path(r))
            assert everything.labelmap_path(by_id[r.id]).samefile(m.labelmap_path(r))
    keys = study.oracle_overrides("pixels", {"train": mdir / "train.jsonl"})
    assert keys == {"labelled": str(paths["pixels"]), "tagged_ratio": 0.0}
