import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from factories import CLASSES, save_tiny, write_dataset
from test_infer_cli import cli, dis, one_thread, tiny_checkpoint  # noqa: F401

from discli.infer.checkpoint import load_model
from discli.data.dataset import normalize
from discli.data.manifest import read_manifest
from discli.data.images import read_image
from discli.data.labelmap import read_labelmap
from discli.evaluation.evaluate import EvalOutputs, Evaluator, Scoring, evaluate
from discli.infer.settings import parse_steps
from discli.infer.loop import InferenceConfig, infer
from discli.infer.runtime import RunOptions, Views

SIZES = [(32, 40), (32, 40), (40, 32), (48, 48), (32, 40)]
CFG = InferenceConfig(lr=0.5, momentum=0.9)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("data"), SIZES, seed=5)


def reference_scores(model, manifest_path, steps: list[int]) -> tuple[float, list]:
    """Independent computation: image by image, separate inference runs per t, per-class
    intersection and union counted with numpy set operations (no confusion matrix)."""
    manifest = read_manifest(manifest_path)
    inter = np.zeros(len(CLASSES))
    union = np.zeros(len(CLASSES))
    for rec in manifest.records:
        image = read_image(manifest.image_path(rec))
        gt = read_labelmap(manifest.labelmap_path(rec), len(CLASSES))
        probs = [F.interpolate(infer(model, normalize(image)[None], t, CFG).probs,
                               size=gt.shape, mode="bilinear", align_corners=False)
                 for t in steps]
        pred = torch.stack(probs).mean(dim=0).argmax(dim=1)[0].numpy()
        valid = gt != 255
        for c in range(len(CLASSES)):
            p, g = (pred == c) & valid, (gt == c) & valid
            inter[c] += (p & g).sum()
            union[c] += (p | g).sum()
    iou = [None if u == 0 else i / u for i, u in zip(inter, union)]
    return float(np.mean([v for v in iou if v is not None])), iou


def _setup(report, name):
    return next(s for s in report["setups"] if s["name"] == name)


def test_multi_t_and_ensemble_equal_separate_runs(tiny_checkpoint, dataset):
    model, _ = load_model(tiny_checkpoint)
    manifest = read_manifest(dataset)
    both = evaluate(model, manifest, Scoring([0, 3]), CFG, run=RunOptions(batch_size=2))
    assert [s["name"] for s in both["setups"]] == ["t=0", "t=3", "ensemble"]
    assert both["images"] == len(SIZES)
    for t in (0, 3):
        alone = evaluate(model, manifest, Scoring([t]), CFG, run=RunOptions(batch_size=1))
        assert [s["name"] for s in alone["setups"]] == [f"t={t}"]
        a, b = _setup(both, f"t={t}"), alone["setups"][0]
        assert a["miou"] == pytest.approx(b["miou"], abs=1e-9)
        assert a["iou"] == pytest.approx(b["iou"], abs=1e-9)
        assert a["boundary"] == pytest.approx(b["boundary"])
        ref_miou, ref_iou = reference_scores(model, dataset, [t])
        assert a["miou"] == pytest.approx(ref_miou)
        assert list(a["iou"].values()) == pytest.approx(ref_iou)
    ref_miou, ref_iou = reference_scores(model, dataset, [0, 3])
    ens = _setup(both, "ensemble")
    assert ens["miou"] == pytest.approx(ref_miou)
    assert list(ens["iou"].values()) == pytest.approx(ref_iou)
    assert ens["steps"] == [0, 3]


def test_ignored_pixels_are_not_counted(tiny_checkpoint, tmp_path):
    from discli.data.labelmap import write_palette_png

    model, _ = load_model(tiny_checkpoint)
    path = write_dataset(tmp_path, [(32, 32), (32, 32)], seed=9)
    manifest = read_manifest(path)
    before = evaluate(model, manifest, Scoring([0]), CFG)["setups"][0]
    # void the whole bottom half of the first labelmap: 512 fewer pixels, and IoU changes only
    # through the pixels removed (checked against the independent reference)
    lm_path = manifest.labelmap_path(manifest.records[0])
    lm = read_labelmap(lm_path, 3)
    lm[16:] = 255
    write_palette_png(lm_path, lm)
    after = evaluate(model, manifest, Scoring([0]), CFG)["setups"][0]
    assert after["pixels"] == before["pixels"] - 16 * 32
    assert after["miou"] == pytest.approx(reference_scores(model, path, [0])[0])


def test_cli_json_matches_library(tiny_checkpoint, dataset):
    r = dis("evaluate", str(dataset), "-c", str(tiny_checkpoint), "--t-ts", "0,3", "--json",
            "--device", "cpu", "--lr", str(CFG.lr), "--momentum", str(CFG.momentum), "-b", "3")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert [s["name"] for s in report["setups"]] == ["t=0", "t=3", "ensemble"]
    assert report["classes"] == CLASSES and report["images"] == len(SIZES)
    model, _ = load_model(tiny_checkpoint)
    lib = evaluate(model, read_manifest(dataset), Scoring([0, 3]), CFG)
    for got, want in zip(report["setups"], lib["setups"]):
        assert set(got["iou"]) == set(CLASSES)
        assert got["miou"] == pytest.approx(want["miou"], abs=1e-6)
        assert 0 <= got["boundary"]["f1"] <= 1 and got["ms_per_image"] > 0
        assert 0 <= got["pixel_acc"] <= 1


def test_cli_table_and_split(tiny_checkpoint, dataset, capsys):
    code, out, err = cli(capsys, "evaluate", "--manifest", str(dataset), "-c",
                         str(tiny_checkpoint), "--t-ts", "0", "--device", "cpu", "-q")
    assert code == 0, err
    assert "mIoU" in out and "boundary F" in out and "cat" in out
    code, _, err = cli(capsys, "evaluate", str(dataset), "-c", str(tiny_checkpoint),
                       "--split", "train", "--device", "cpu", "-q")
    assert code == 3 and "no records with a labelmap in split 'train'" in err
    code, _, err = cli(capsys, "evaluate", "-c", str(tiny_checkpoint))
    assert code == 2 and "manifest" in err


def test_one_workers_spelling_in_help_older_one_accepted(tiny_checkpoint, dataset, capsys):
    code, out, _ = cli(capsys, "evaluate", "--help")
    assert code == 0 and "--num-workers" in out and "--workers" not in out
    code, out, err = cli(capsys, "evaluate", str(dataset), "-c", str(tiny_checkpoint), "--t-ts",
                         "0", "--device", "cpu", "--workers", "0", "--json")
    assert code == 0, err
    assert json.loads(out)["setups"][0]["name"] == "t=0"


def test_class_count_mismatch_is_incompatible(tmp_path, dataset, capsys):
    from discli.model.net import ModelConfig, build_model

    other = build_model(ModelConfig(backbone="tiny", num_classes=5,
                                    backbone_kwargs={"channels": 16}))
    ckpt = save_tiny(tmp_path / "k5.pt", other, ["background", "a", "b", "c", "d"])
    code, _, err = cli(capsys, "evaluate", str(dataset), "-c", str(ckpt), "--device", "cpu")
    assert code == 4 and "3 classes" in err and "k5.pt" in err and str(dataset) in err


def test_bad_t_ts_is_usage_error(capsys):
    for bad in ("a,b", "-1", ""):
        with pytest.raises(Exception) as info:
            parse_steps(bad)
        assert getattr(info.value, "exit_code", None) == 2
    assert parse_steps("30, 0,10,10") == [0, 10, 30]


def test_evaluator_all_reduce_single_process_group(tmp_path):
    import torch.distributed as dist

    acc = Evaluator(3, [0, 2])
    gt = torch.tensor([[[0, 1], [2, 255]]])
    acc.update("t=0", torch.tensor([[[0, 1], [1, 0]]]), gt)
    acc.add_time(9.0, 1)  # warm-up batch: left out of the mean
    acc.add_time(0.5, 1)
    before = acc.result(CLASSES)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0,
                            world_size=1)
    try:
        after = acc.all_reduce().result(CLASSES)
    finally:
        dist.destroy_process_group()
    assert after["setups"][0] == before["setups"][0] and before["setups"][0]["pixels"] == 3
    assert after["images"] == 2 and after["ms_per_image"] == pytest.approx(500)


def test_confusion_matrix_in_the_report(tiny_checkpoint, dataset):
    """Rows = true class, columns = predicted, pixel counts: the matrix sums to the scored
    (non-void) pixels, its row sums are the ground truth's class counts, and the IoU computed
    from it is the reported one."""
    model, _ = load_model(tiny_checkpoint)
    manifest = read_manifest(dataset)
    report = evaluate(model, manifest, Scoring([0, 2]), CFG)
    truth = np.zeros(len(CLASSES), np.int64)
    for rec in manifest.records:
        gt = read_labelmap(manifest.labelmap_path(rec), len(CLASSES))
        truth += np.bincount(gt[gt != 255].ravel(), minlength=len(CLASSES))
    for setup in report["setups"]:
        mat = np.array(setup["confusion"])
        assert mat.shape == (len(CLASSES), len(CLASSES))
        assert mat.sum() == setup["pixels"] == truth.sum()
        assert list(mat.sum(axis=1)) == list(truth)  # rows: true classes
        union = mat.sum(axis=0) + mat.sum(axis=1) - np.diag(mat)
        iou = [np.diag(mat)[c] / union[c] for c in range(len(CLASSES)) if union[c]]
        assert np.mean(iou) == pytest.approx(setup["miou"])


def test_save_dir_writes_what_was_scored(tiny_checkpoint, dataset, tmp_path):
    """--save-dir: per setup a VOC palette PNG of every prediction (recounted against the
    ground truth they give back the reported confusion matrix exactly) and an overlay that
    leaves background pixels alone; confusion.png with a panel per setup."""
    from PIL import Image

    from discli.data.labelmap import voc_palette
    from discli.infer.visual import overlay

    out = tmp_path / "shown"
    r = dis("evaluate", str(dataset), "-c", str(tiny_checkpoint), "--t-ts", "0,2", "--json",
            "--device", "cpu", "--lr", str(CFG.lr), "--momentum", str(CFG.momentum),
            "--save-dir", str(out), "--opacity", "0.6")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    manifest = read_manifest(dataset)
    assert sorted(p.name for p in out.iterdir()) == ["confusion.png", "ensemble", "t0", "t2"]
    for setup in report["setups"]:
        folder = out / setup["name"].replace("=", "")
        mat = np.zeros((len(CLASSES), len(CLASSES)), np.int64)
        for rec in manifest.records:
            gt = read_labelmap(manifest.labelmap_path(rec), len(CLASSES))
            image = read_image(manifest.image_path(rec))
            with Image.open(folder / f"{rec.id}.png") as im:
                assert im.mode == "P" and im.size == (gt.shape[1], gt.shape[0])
                assert im.getpalette()[:3 * len(CLASSES)] == voc_palette()[:3 * len(CLASSES)]
                pred = np.asarray(im)
            keep = gt != 255
            np.add.at(mat, (gt[keep], pred[keep]), 1)
            with Image.open(folder / f"{rec.id}_overlay.jpg") as im:
                shown = np.asarray(im.convert("RGB")).astype(int)
            assert shown.shape == image.shape
            # JPEG keeps region means (not noisy pixels): background as bright as the image
            # (a blend with black would take 60% off), labelled pixels as the exact overlay
            expected = overlay(image, pred, 0.6).astype(int)
            for region in (pred == 0, pred > 0):
                if region.sum() > 50:
                    assert abs(shown[region].mean() - expected[region].mean()) < 4
            assert np.array_equal(expected[pred == 0], image[pred == 0])
        assert mat.tolist() == setup["confusion"]
    with Image.open(out / "confusion.png") as im:
        assert im.width > 2.5 * im.height  # three panels side by side
    code = dis("evaluate", str(dataset), "-c", str(tiny_checkpoint), "--device", "cpu",
               "--save-dir", str(out), "--opacity", "1.5")
    assert code.returncode == 2 and "--opacity" in code.stderr


def test_save_dir_never_writes_over_inputs(tiny_checkpoint, tmp_path):
    """A save dir whose outputs would land on the manifest's own labelmaps is refused before
    anything is written."""
    from discli.errors import UsageError

    root = tmp_path / "d"
    path = write_dataset(root, [(32, 32)], seed=2)
    manifest = read_manifest(path)
    rec = manifest.records[0]
    # labels/img000.png is the labelmap: a save dir whose "t0" folder is labels/ hits it
    (root / "t0").symlink_to(root / "labels")
    before = (root / "labels" / f"{rec.id}.png").read_bytes()
    model, _ = load_model(tiny_checkpoint)
    with pytest.raises(UsageError, match="over an input file"):
        evaluate(model, manifest, Scoring([0]), CFG, outputs=EvalOutputs(save_dir=root))
    assert (root / "labels" / f"{rec.id}.png").read_bytes() == before


def test_multiscale_and_flip(tiny_checkpoint, dataset, capsys):
    model, _ = load_model(tiny_checkpoint)
    manifest = read_manifest(dataset)
    plain = evaluate(model, manifest, Scoring([0, 3]), CFG)
    single = evaluate(model, manifest, Scoring([0, 3]), CFG,
                      run=RunOptions(views=Views([1.0], False)))
    assert [s["confusion"] for s in single["setups"]] == [s["confusion"] for s in plain["setups"]]
    multi = evaluate(model, manifest, Scoring([0, 3]), CFG,
                     run=RunOptions(views=Views([0.75, 1.25], True)))
    assert multi["images"] == plain["images"]
    assert [s["confusion"] for s in multi["setups"]] != [s["confusion"] for s in plain["setups"]]
    code, out, err = cli(capsys, "evaluate", str(dataset), "-c", str(tiny_checkpoint), "--t-ts",
                         "0,3", "--scales", "0.75,1.25", "--flip", "--device", "cpu", "-q",
                         "--json", "--lr", str(CFG.lr), "--momentum", str(CFG.momentum))
    assert code == 0, err
    report = json.loads(out)
    assert report["inference"]["scales"] == [0.75, 1.25] and report["inference"]["flip"]
    for got, want in zip(report["setups"], multi["setups"]):
        assert got["confusion"] == want["confusion"]
    code, _, err = cli(capsys, "evaluate", str(dataset), "-c", str(tiny_checkpoint),
                       "--scales", "0.5,nan", "--device", "cpu")
    assert code == 2 and "--scales" in err


@pytest.mark.parametrize("flag, wanted", [("--compile", True), ("--no-compile", False)])
def test_compile_flag_sets_the_switch_and_changes_no_score(tiny_checkpoint, dataset, capsys,
                                                           monkeypatch, flag, wanted):
    import discli.infer.settings as settings

    seen = []
    monkeypatch.setattr(settings, "use_compiled", lambda on: seen.append(on) or False)
    args = ["evaluate", str(dataset), "-c", str(tiny_checkpoint), "--t-ts", "0,3",
            "--device", "cpu", "-q", "--json"]
    code, out, err = cli(capsys, *args, flag)
    assert code == 0, err
    assert seen == [wanted]
    plain = cli(capsys, *args)[1]
    assert json.loads(out)["setups"][1]["miou"] == json.loads(plain)["setups"][1]["miou"]
