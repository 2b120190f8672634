"""A new user's first hour (issue 27): continuing and watching a run, getting data in, and the
small things a user sees. Each test drives the command a user types (in-process where that is
enough: fast) and checks the line or file that user reads."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from factories import CLASSES, save_tiny, write_dataset
from test_clean_tags import ENTRIES, TRUTH, make_cache
from test_data_formats import make_voc
from test_infer_cli import cli, one_thread, tiny_checkpoint  # noqa: F401
from test_train import config, data, killed_after_checkpoint  # noqa: F401

from discli.data.manifest import Manifest, Record, parse_classes, write_manifest
from discli.errors import UsageError


def flat(text: str) -> str:
    """``text`` with every run of whitespace one space (help text is wrapped to the terminal)."""
    return " ".join(text.split())


# ------------------------------------------------------------------ continuing and watching a run

def test_a_runs_own_config_is_accepted_back_and_the_resume_is_announced(data, tmp_path, capsys):
    """The refusal of changed settings points at <out>/pretrain/config.toml; passing that file
    back with --config continues the run (it used to be refused as "would overwrite the
    --config file"), and the re-run says on stderr where it resumed."""
    cfg = config(data, tmp_path / "run")
    killed_after_checkpoint(cfg, "step1", 2)
    record = tmp_path / "run" / "pretrain" / "config.toml"
    code, _, err = cli(capsys, "pretrain", "--config", str(record), "--out",
                       str(tmp_path / "run"), "--lr", "0.5", "--quiet")
    assert code == 2 and f"--config {record} gives them" in err, err
    code, out, err = cli(capsys, "pretrain", "--config", str(record), "--out",
                         str(tmp_path / "run"), "--json")
    assert code == 0, err
    assert json.loads(out)["steps"] == {"1": "trained", "2": "trained", "3": "trained"}
    resumed = [line for line in err.splitlines() if "resuming" in line]
    assert len(resumed) == 1, err
    assert "resuming pretrain step 1 at iteration 2 of 6" in resumed[0]
    assert "last.pth" in resumed[0]


def test_train_help_says_a_preset_sets_its_own_defaults(capsys):
    for command in ("pretrain", "finetune"):
        code, out, _ = cli(capsys, command, "--help")
        assert code == 0
        assert "defaults shown below are the library's; a --config preset sets its own " \
               "(`dis config show demo` lists them)" in flat(out)


# ------------------------------------------------------------------------------ getting data in

def test_prepare_voc_names_what_is_missing_and_skips_a_missing_split(tmp_path, capsys):
    voc = make_voc(tmp_path / "a", {"train": ["a", "b"]})
    lists = voc / "ImageSets" / "Segmentation"
    for name in ("train.txt",):
        (lists / name).rename(tmp_path / name)
    lists.rmdir()
    code, _, err = cli(capsys, "prepare-voc", str(tmp_path / "a"), "-o", str(tmp_path / "m"))
    assert code == 3 and "JPEGImages/ is there but ImageSets/Segmentation/ is missing" in err
    assert str(voc) in err
    lists.mkdir()
    (tmp_path / "train.txt").rename(lists / "train.txt")
    code, _, err = cli(capsys, "prepare-voc", str(voc), "-o", str(tmp_path / "m"), "--splits",
                       "train,val", "--json", "-q")
    assert code == 0, err
    assert f"dis: warning: {lists / 'val.txt'} not found: that split was skipped" in err
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["train.jsonl"]
    code, _, err = cli(capsys, "prepare-voc", str(voc), "-o", str(tmp_path / "m"), "--splits",
                       "val")
    assert code == 2 and "split(s) val not in" in err  # nothing left to write: refused


def test_named_class_lists_and_a_lone_name_refused(tmp_path, capsys):
    voc = parse_classes("voc")
    assert len(voc) == 21 and voc[0] == "background" and voc[-1] == "tvmonitor"
    coco = parse_classes("coco")
    assert len(coco) == 81 and coco[1] == "person" and "toothbrush" in coco
    (tmp_path / "mine.txt").write_text("background\ncat\n")
    assert parse_classes(str(tmp_path / "mine.txt")) == ["background", "cat"]
    assert parse_classes("background,cat") == ["background", "cat"]
    with pytest.raises(UsageError, match=r"'vocc': no such file and not a named list \(voc, "
                                         r"coco\); for a single class give background,NAME"):
        parse_classes("vocc")
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    code, _, err = cli(capsys, "prepare-folder", str(tmp_path / "images"),
                       str(tmp_path / "masks"), "--classes", "classes.txt", "-o",
                       str(tmp_path / "m.jsonl"))
    assert code == 2 and "--classes 'classes.txt': no such file" in err, err


def test_prepare_idw_names_the_image_path_it_looked_at_and_suggests_root(tmp_path, capsys):
    from PIL import Image

    (tmp_path / "caps").mkdir()
    (tmp_path / "photos").mkdir()
    Image.new("RGB", (20, 16)).save(tmp_path / "photos" / "w1.jpg")
    captions = tmp_path / "caps" / "c.jsonl"
    captions.write_text('{"image": "w1.jpg", "captions": ["a cat"]}\n')
    code, _, err = cli(capsys, "prepare-idw", str(captions), "-o", str(tmp_path / "m.jsonl"))
    assert code == 3 and len(err.strip().splitlines()) == 1
    assert f"{tmp_path / 'caps' / 'w1.jpg'}: image not found" in err
    assert "give --root the folder that holds the images" in err
    code, _, err = cli(capsys, "prepare-idw", str(captions), "-o", str(tmp_path / "m.jsonl"),
                       "--root", str(tmp_path / "photos"), "--json")
    assert code == 0, err


PLAIN = [i for i in TRUTH if "/" not in i]  # a manifest's ids are file names


def _truth_manifest(path: Path, tag_source: str = "pixels") -> Path:
    records = [Record(id=i, image=f"{i}.png", tags=TRUTH[i], tag_source=tag_source)
               for i in PLAIN]
    write_manifest(path, Manifest(list(CLASSES), records, path.parent))
    return path


def test_clean_tags_stats_takes_a_manifest_as_truth(tmp_path, capsys):
    cache = make_cache(tmp_path / "c.h5", {i: ENTRIES[i] for i in PLAIN})
    lines = tmp_path / "truth.jsonl"
    lines.write_text("".join(json.dumps({"id": i, "tags": TRUTH[i]}) + "\n" for i in PLAIN))
    code, out, err = cli(capsys, "clean-tags", "stats", str(cache), "--truth", str(lines),
                         "--json")
    assert code == 0, err
    manifest = _truth_manifest(tmp_path / "truth_manifest.jsonl")
    code, from_manifest, err = cli(capsys, "clean-tags", "stats", str(cache), "--truth",
                                   str(manifest), "--json")
    assert code == 0, err
    assert json.loads(from_manifest) == json.loads(out)
    noisy = _truth_manifest(tmp_path / "captions.jsonl", tag_source="caption")
    code, _, err = cli(capsys, "clean-tags", "stats", str(cache), "--truth", str(noisy))
    assert code == 3 and "come from captions" in err


def test_score_cache_defaults_to_the_runs_confidence_and_says_so(tmp_path, capsys):
    from discli.data.labelmap import write_palette_png

    round_dir = tmp_path / "run" / "finetune" / "round-1"
    round_dir.mkdir(parents=True)
    record = tmp_path / "run" / "finetune" / "config.toml"
    record.write_text("[train]\nconfidence = 0.7\n")
    from discli.pseudo.cache import CacheEntry, CacheWriter, make_attrs

    labelmap = np.zeros((8, 6), np.uint8)
    labelmap[2:, :3], labelmap[2:, 3:] = 1, 2
    confidence = np.repeat(np.linspace(0.1, 0.8, 8)[:, None], 6, axis=1).astype(np.float16)
    writer = CacheWriter(round_dir / "cache.h5", make_attrs(list(CLASSES), 5, "h", {"lr": 0.1}))
    writer.write([CacheEntry(i, labelmap, confidence, np.array([1, 0.9, 0.2], np.float32),
                             np.array([1, 1, 0], np.uint8)) for i in ("a", "b")])
    path = writer.merge()
    truth = tmp_path / "truth"
    records = []
    for image_id in ("a", "b"):
        write_palette_png(truth / f"{image_id}.png", labelmap)
        records.append(Record(id=image_id, image=f"{image_id}.png", labelmap=f"{image_id}.png"))
    write_manifest(truth / "m.jsonl", Manifest(list(CLASSES), records, truth))
    code, out, err = cli(capsys, "score-cache", str(path), str(truth / "m.jsonl"), "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["confidence"] == 0.7 and report["kept_share"] < 1
    assert f"dis: confidence 0.7 (the run's, from {record})" in err
    code, out, err = cli(capsys, "score-cache", str(path), str(truth / "m.jsonl"),
                         "--confidence", "0", "--json")
    assert json.loads(out)["confidence"] == 0 and "confidence 0 (--confidence)" in err
    # the table's title (the cache's path) is one line however narrow the columns
    code, out, _ = cli(capsys, "score-cache", str(path), str(truth / "m.jsonl"))
    assert code == 0 and f"{path} (2 images)" in out.splitlines()[0]


def test_bad_manifest_is_refused_before_torch_loads_and_leaves_no_run_folder(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"nope": 1}\n')
    script = ("import sys\nfrom discli.cli.app import main\n"
              f"code = main(['pretrain', '--labelled', {str(bad)!r}, '--out', "
              f"{str(tmp_path / 'runs' / 'a')!r}])\n"
              "print(code, 'torch' in sys.modules)\n")
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=120)
    assert run.stdout.split() == ["3", "False"], run.stdout + run.stderr
    assert "bad.jsonl: line 1: not a dis manifest" in run.stderr
    assert not (tmp_path / "runs").exists()
    # a refusal from inside the library (no manifest at all): the folder it made is removed
    code, _, err = cli(capsys, "pretrain", "--out", str(tmp_path / "runs" / "b"))
    assert code == 2 and "--labelled" in err
    assert not (tmp_path / "runs").exists()
    kept = tmp_path / "mine"
    kept.mkdir()
    code, _, _ = cli(capsys, "pretrain", "--out", str(kept))
    assert code == 2 and kept.is_dir()  # a folder the user made stays


# ------------------------------------------------------------------- small things a user sees

def test_evaluate_from_stdin_progress_in_percent_and_png_overlays(tiny_checkpoint, tmp_path,
                                                                  monkeypatch):
    import io

    from PIL import Image

    from discli.evaluation.evaluate import EvalOutputs, Scoring, evaluate_checkpoint
    from discli.infer.runtime import RunOptions

    manifest = write_dataset(tmp_path / "data", [(32, 40), (32, 40)], seed=5)
    shown = []

    class Recorder:
        def start(self, task, total=None):
            pass

        def advance(self, n=1, **metrics):
            shown.append(metrics)

        def log(self, message):
            pass

    monkeypatch.setattr(sys, "stdin", io.StringIO(manifest.read_text()))
    report = evaluate_checkpoint(tiny_checkpoint, "-", root=manifest.parent,
                                 scoring=Scoring(steps=[0]), run=RunOptions(device="cpu"),
                                 outputs=EvalOutputs(save_dir=tmp_path / "shown",
                                                     overlay_format="png"),
                                 reporter=Recorder())
    assert report["manifest"] == "<stdin>"
    assert shown[-1]["mIoU"] == pytest.approx(100 * report["setups"][-1]["miou"])
    overlays = sorted((tmp_path / "shown" / "t0").glob("*_overlay.*"))
    assert [p.suffix for p in overlays] == [".png", ".png"]
    with Image.open(overlays[0]) as im:
        assert im.format == "PNG"


def test_infer_overlay_format(tiny_checkpoint, tmp_path, capsys):
    from PIL import Image

    from factories import noise_png

    noise_png(tmp_path / "x.png")
    code, _, err = cli(capsys, "infer", str(tmp_path / "x.png"), "-c", str(tiny_checkpoint),
                       "-o", str(tmp_path / "out"), "--overlay", "--overlay-format", "png",
                       "--device", "cpu", "-q")
    assert code == 0, err
    with Image.open(tmp_path / "out" / "x_overlay.png") as im:
        assert im.format == "PNG"
    code, _, err = cli(capsys, "infer", str(tmp_path / "x.png"), "-c", str(tiny_checkpoint),
                       "-o", str(tmp_path / "out2"), "--overlay", "--overlay-format", "gif")
    assert code == 2 and "--overlay-format must be jpg or png, got 'gif'" in err


def _boxes_overlap(boxes) -> bool:
    for i, a in enumerate(boxes):
        for b in boxes[i + 1:]:
            if a.x0 < b.x1 - 0.5 and b.x0 < a.x1 - 0.5 and a.y0 < b.y1 - 0.5 and b.y0 < a.y1 - 0.5:
                return True
    return False


@pytest.mark.parametrize("size", [4.5, 11.0])  # `dis plot`'s panel; --save-dir's confusion.png
def test_confusion_matrix_labels_and_counts_do_not_overlap(size):
    from discli.data.voc import VOC_CLASSES
    from discli.evaluation.plots import _figure, draw_confusion

    rng = np.random.default_rng(0)
    k = len(VOC_CLASSES)
    matrix = (rng.random((k, k)) ** 8 * 1e6).astype(int) + np.diag(rng.integers(10**5, 10**7, k))
    fig = _figure(size, size)
    ax = fig.subplots()
    draw_confusion(ax, matrix.tolist(), VOC_CLASSES, "t=0")
    fig.tight_layout()
    renderer = fig.canvas.get_renderer()
    fig.canvas.draw()
    for labels in (ax.get_xticklabels(), ax.get_yticklabels()):
        assert not _boxes_overlap([t.get_window_extent(renderer) for t in labels])
    counts = [t.get_window_extent(renderer) for t in ax.texts]
    assert not _boxes_overlap(counts)
    if size > 10:
        assert len(counts) > k  # room for the counts: they are drawn
