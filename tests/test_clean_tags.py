import csv
import io
import json

import numpy as np
import pytest
from factories import CLASSES, save_tiny, write_cache, write_dataset
from test_infer_cli import cli, dis, one_thread, tiny_checkpoint  # noqa: F401

from discli.pseudo.cache import CacheEntry, CacheWriter, PseudoCache, make_attrs
from discli.pseudo.tags import diff, read_export, rows, tag_stats

# id: (noisy tags, tag probabilities [bg, cat, dog])
ENTRIES = {
    "a": ([1, 1, 0], [0.99, 0.90, 0.70]),  # dog added
    "b": ([1, 1, 1], [0.99, 0.20, 0.80]),  # cat removed
    "c": ([1, 0, 1], [0.99, 0.10, 0.60]),  # unchanged
    "d/e": ([1, 0, 0], [0.99, 0.55, 0.10]),  # cat added (an id with a slash)
}
TRUTH = {"a": ["cat", "dog"], "b": ["dog"], "c": ["dog"], "d/e": []}


def make_cache(path, entries=ENTRIES, classes=CLASSES, checkpoint_hash="h"):
    return write_cache(path, [CacheEntry(i, np.zeros((8, 8), np.uint8),
                                         np.ones((8, 8), np.float16), np.array(p, np.float32),
                                         np.array(n, np.uint8))
                              for i, (n, p) in entries.items()],
                       classes, t_tr=5, checkpoint_hash=checkpoint_hash, inference={"lr": 0.1})


@pytest.fixture
def cache(tmp_path):
    return make_cache(tmp_path / "c.h5")


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "tsv"])
def test_export_parses_back(cache, capsys, fmt):
    code, out, err = cli(capsys, "clean-tags", "export", str(cache), "--format", fmt)
    assert code == 0, err
    parsed = read_export(io.StringIO(out), fmt)
    assert [r["id"] for r in parsed] == list(ENTRIES)
    by_id = {r["id"]: r for r in parsed}
    assert by_id["a"]["noisy"] == ["cat"] and by_id["a"]["cleaned"] == ["cat", "dog"]
    assert by_id["b"]["cleaned"] == ["dog"] and by_id["d/e"]["cleaned"] == ["cat"]
    assert by_id["a"]["probs"] == pytest.approx({"cat": 0.9, "dog": 0.7})
    if fmt != "jsonl":
        header = next(csv.reader(io.StringIO(out), delimiter="," if fmt == "csv" else "\t"))
        assert header == ["id", "noisy", "cleaned", "p_cat", "p_dog"]


def test_export_threshold_and_file_output(cache, tmp_path, capsys):
    target = tmp_path / "tags.jsonl"
    code, out, _ = cli(capsys, "clean-tags", "export", str(cache), "--threshold", "0.65",
                       "-o", str(target))
    assert code == 0 and out == ""
    parsed = {r["id"]: r for r in read_export(target.open())}
    assert parsed["c"]["cleaned"] == [] and parsed["a"]["cleaned"] == ["cat", "dog"]
    code, _, err = cli(capsys, "clean-tags", "export", str(cache), "--format", "xml")
    assert code == 2 and "--format" in err


def test_export_pipe_to_head_through_console_script(tmp_path):
    rng = np.random.default_rng(0)
    many = {f"im{i:05d}": ([1, 1, 0], rng.random(3).tolist()) for i in range(1500)}
    path = make_cache(tmp_path / "big.h5", many)
    r = dis("clean-tags", "export", str(path), "|", "head", "-n", "3", shell=True)
    assert r.returncode == 0
    assert len(r.stdout.splitlines()) == 3
    assert "Traceback" not in r.stderr and "BrokenPipe" not in r.stderr, r.stderr
    assert [json.loads(line)["id"] for line in r.stdout.splitlines()] == list(many)[:3]


def test_show(cache, capsys):
    code, out, err = cli(capsys, "clean-tags", "show", str(cache), "a", "--json")
    assert code == 0, err
    info = json.loads(out)
    assert info["added"] == ["dog"] and info["removed"] == [] and info["noisy"] == ["cat"]
    code, out, _ = cli(capsys, "clean-tags", "show", str(cache), "d/e")
    assert code == 0 and "cat" in out and "added" in out
    code, _, err = cli(capsys, "clean-tags", "show", str(cache), "zzz")
    assert code == 3 and "'zzz'" in err and str(cache) in err


def test_diff_counts(cache, capsys):
    result = diff(PseudoCache(cache))
    assert result["images"] == [{"id": "a", "added": ["dog"], "removed": []},
                                {"id": "b", "added": [], "removed": ["cat"]},
                                {"id": "d/e", "added": ["cat"], "removed": []}]
    assert result["per_class"]["cat"] == {"added": 1, "removed": 1, "noisy": 2, "cleaned": 2}
    assert result["per_class"]["dog"] == {"added": 1, "removed": 0, "noisy": 2, "cleaned": 3}
    assert result["changed_images"] == 3 and result["total_images"] == 4
    code, out, _ = cli(capsys, "clean-tags", "diff", str(cache))
    assert code == 0 and "a\t+dog" in out and "b\t-cat" in out
    code, out, _ = cli(capsys, "clean-tags", "diff", str(cache), "--json")
    assert json.loads(out)["added"] == 2


def test_stats_against_truth(cache, tmp_path, capsys):
    truth = tmp_path / "truth.jsonl"
    truth.write_text("".join(json.dumps({"id": i, "tags": t}) + "\n" for i, t in TRUTH.items()))
    code, out, err = cli(capsys, "clean-tags", "stats", str(cache), "--truth", str(truth),
                         "--json")
    assert code == 0, err
    result = json.loads(out)
    # noisy: cat tp=a fp=b fn=-; dog tp=b,c fn=a  -> micro tp 3 fp 1 fn 1
    noisy = result["noisy"]
    assert noisy["per_class"]["cat"]["precision"] == 0.5
    assert noisy["per_class"]["dog"]["recall"] == pytest.approx(2 / 3)
    assert (noisy["micro"]["tp"], noisy["micro"]["fp"], noisy["micro"]["fn"]) == (3, 1, 1)
    # cleaned: cat a, d/e (fp) ; dog a, b, c all right -> tp 4 fp 1 fn 0
    cleaned = result["cleaned"]
    assert (cleaned["micro"]["tp"], cleaned["micro"]["fp"], cleaned["micro"]["fn"]) == (4, 1, 0)
    assert cleaned["micro"]["f1"] == pytest.approx(2 * 0.8 * 1.0 / 1.8)
    assert result["images"] == 4
    code, out, _ = cli(capsys, "clean-tags", "stats", str(cache), "--truth", str(truth))
    assert code == 0 and "micro" in out
    direct = tag_stats(PseudoCache(cache), {k: set(v) for k, v in TRUTH.items()})
    assert direct["cleaned"]["micro"] == cleaned["micro"]


def test_stats_bad_truth_names_the_file(cache, tmp_path, capsys):
    truth = tmp_path / "truth.jsonl"
    truth.write_text('{"id": "a", "tags": ["cow"]}\n')
    code, _, err = cli(capsys, "clean-tags", "stats", str(cache), "--truth", str(truth))
    assert code == 3 and "truth.jsonl" in err and "cow" in err and "line 1" in err


def test_rows_threshold_validation(cache):
    with pytest.raises(Exception) as info:
        list(rows(PseudoCache(cache), threshold=1.5))
    assert getattr(info.value, "exit_code", None) == 2


def test_run_computes_cleaned_tags(tiny_checkpoint, tmp_path, capsys):
    pytest.importorskip("discli.train.estep")
    manifest = write_dataset(tmp_path / "data", [(32, 32), (32, 40), (32, 32)], split="train")
    out = tmp_path / "round" / "cache.h5"
    args = ("clean-tags", "run", str(manifest), "-c", str(tiny_checkpoint), "--out", str(out),
            "--t-tr", "2", "--device", "cpu", "--json", "-q")
    code, stdout, err = cli(capsys, *args)
    assert code == 0, err
    summary = json.loads(stdout)
    assert summary["total_images"] == 3 and not summary["reused"]
    cache = PseudoCache(out)
    assert sorted(cache.ids()) == ["img000", "img001", "img002"]
    assert cache.attrs["t_tr"] == 2
    code, stdout, _ = cli(capsys, *args)
    assert code == 0 and json.loads(stdout)["reused"]
    code, stdout, _ = cli(capsys, "clean-tags", "export", str(out))
    assert len(stdout.splitlines()) == 3
    code, _, err = cli(capsys, *args[:-2], "--t-tr", "3")
    assert code == 4 and "t_tr" in err


def test_run_refuses_a_cache_of_another_class_count(tiny_checkpoint, tmp_path, capsys):
    manifest = write_dataset(tmp_path / "data", [(32, 32)], split="train")
    out = make_cache(tmp_path / "c5.h5", {"img000": ([1, 0, 0, 0, 1], [1, .1, .2, .3, .9])},
                     classes=["background", "a", "b", "c", "d"])
    code, _, err = cli(capsys, "clean-tags", "run", str(manifest), "-c", str(tiny_checkpoint),
                       "--out", str(out), "--device", "cpu")
    assert code == 4
    assert "existing cache has 5 classes" in err and "has 3" in err and "c5.h5" in err


def test_run_refuses_a_manifest_of_another_class_count(tmp_path, capsys):
    from discli.model.net import ModelConfig, build_model

    model = build_model(ModelConfig(backbone="tiny", num_classes=5,
                                    backbone_kwargs={"channels": 16}))
    ckpt = save_tiny(tmp_path / "k5.pt", model, ["background", "a", "b", "c", "d"])
    manifest = write_dataset(tmp_path / "data", [(32, 32)], split="train")
    code, _, err = cli(capsys, "clean-tags", "run", str(manifest), "-c", str(ckpt), "--out",
                       str(tmp_path / "c.h5"), "--device", "cpu")
    assert code == 4 and "manifest has 3 classes" in err and "k5.pt" in err


def test_help_lists_subcommands(capsys):
    code, out, _ = cli(capsys, "clean-tags", "--help")
    assert code == 0
    for name in ("export", "show", "diff", "stats", "run"):
        assert name in out


def _labelled_cache(path):
    """Two entries with real pseudo-labelmaps: left half cat, right half dog, one void pixel;
    confidence rising from 0.1 (top row) to 0.8 (bottom row)."""
    labelmap = np.zeros((8, 6), np.uint8)
    labelmap[2:, :3], labelmap[2:, 3:], labelmap[0, 0] = 1, 2, 255
    confidence = np.repeat(np.linspace(0.1, 0.8, 8)[:, None], 6, axis=1).astype(np.float16)
    writer = CacheWriter(path, make_attrs(list(CLASSES), 5, "h", {"lr": 0.1}))
    writer.write([CacheEntry("a", labelmap, confidence, np.array([1, 0.9, 0.2], np.float32),
                             np.array([1, 1, 0], np.uint8)),
                  CacheEntry("d/e", labelmap, confidence, np.array([1, 0.1, 0.7], np.float32),
                             np.array([1, 1, 1], np.uint8))])
    return writer.merge(), labelmap, confidence


def test_export_folder_writes_palette_labelmaps_and_tags(tmp_path, capsys):
    from PIL import Image

    from discli.data.labelmap import voc_palette

    path, labelmap, confidence = _labelled_cache(tmp_path / "c.h5")
    out = tmp_path / "labels"
    code, stdout, err = cli(capsys, "clean-tags", "export", str(path), "-o", str(out),
                            "--confidence", "0.5", "--gate", "cleaned")
    assert code == 0, err
    assert stdout.strip() == str(out)
    lines = [json.loads(line) for line in (out / "tags.jsonl").read_text().splitlines()]
    assert [r["id"] for r in lines] == ["a", "d/e"]
    assert lines[0]["cleaned"] == ["cat"] and lines[1]["cleaned"] == ["dog"]
    low = confidence.astype(np.float32) < 0.5
    for row, absent in zip(lines, (2, 1)):  # "a": dog not a cleaned tag; "d/e": cat
        with Image.open(out / row["labelmap"]) as im:
            assert im.mode == "P" and im.size == (6, 8)
            assert im.getpalette()[:9] == voc_palette()[:9]
            assert tuple(im.getpalette()[765:768]) == (224, 224, 192)  # void: VOC's white
            values = np.asarray(im)
        want = labelmap.copy()
        want[low] = 255
        want[want == absent] = 255
        assert np.array_equal(values, want)
        assert row["ignored"] == pytest.approx((want == 255).mean(), abs=1e-6)
    assert (out / "d" / "e.png").is_file()
    # the tag table export to a file still works as before
    code, _, err = cli(capsys, "clean-tags", "export", str(path), "-o", str(tmp_path / "t.csv"),
                       "--format", "csv")
    assert code == 0 and (tmp_path / "t.csv").read_text().startswith("id,noisy,cleaned")
    code, _, err = cli(capsys, "clean-tags", "export", str(path), "-o", str(out), "--gate",
                       "sometimes")
    assert code == 2 and "--gate" in err


def test_export_folder_defaults_to_the_runs_settings(tmp_path, capsys):
    """A cache in a run folder is exported with the run's confidence and tag gate, i.e. the
    pixels that run's M-step trained on."""
    from PIL import Image

    round_dir = tmp_path / "run" / "finetune" / "round-1"
    round_dir.mkdir(parents=True)
    (tmp_path / "run" / "finetune" / "config.toml").write_text(
        '[train]\nconfidence = 0.7\ntag_gate = "noisy"\n')
    path, labelmap, confidence = _labelled_cache(round_dir / "cache.h5")
    code, out, err = cli(capsys, "clean-tags", "export", str(path), "-o",
                         str(tmp_path / "x") + "/", "--json")
    assert code == 0, err
    result = json.loads(out)
    assert result["confidence"] == 0.7 and result["gate"] == "noisy"
    values = np.asarray(Image.open(tmp_path / "x" / "a.png"))
    want = labelmap.copy()
    want[confidence.astype(np.float32) < 0.7] = 255
    want[want == 2] = 255  # "a"'s caption names no dog
    assert np.array_equal(values, want)
    assert np.array_equal(np.asarray(Image.open(tmp_path / "x" / "d" / "e.png")),
                          np.where(confidence.astype(np.float32) < 0.7, 255, labelmap))
    assert result["ignored_share"] == pytest.approx(
        ((want == 255).sum() + (np.where(confidence.astype(np.float32) < 0.7, 255, labelmap)
                                == 255).sum()) / (2 * labelmap.size))


def test_commands_clean_tags_with_the_runs_rule_unless_given_a_threshold(tmp_path, capsys):
    """In a run folder, show / diff / stats / export clean the tags as that run's M-step did
    (its tag_rule); --threshold asks for the tag head alone at that probability."""
    round_dir = tmp_path / "run" / "finetune" / "round-1"
    round_dir.mkdir(parents=True)
    (tmp_path / "run" / "finetune" / "config.toml").write_text(
        '[finetune]\ntag_rule = "evidence"\ntag_keep = 0.0\ntag_add = 0.75\n')
    path = make_cache(round_dir / "cache.h5")  # all-background labelmaps: evidence = prob / 2
    code, out, err = cli(capsys, "clean-tags", "diff", str(path), "--json")
    assert code == 0, err
    result = json.loads(out)
    # keep 0 keeps every caption tag, and no probability reaches add 0.75 at half weight
    assert result["rule"] == "evidence" and result["added"] == result["removed"] == 0
    code, out, _ = cli(capsys, "clean-tags", "diff", str(path), "--json", "--threshold", "0.5")
    assert json.loads(out)["rule"] == "threshold" and json.loads(out)["added"] == 2
    code, out, _ = cli(capsys, "clean-tags", "show", str(path), "b", "--json")
    assert json.loads(out)["cleaned"] == ["cat", "dog"]  # the caption's cat kept
    truth = tmp_path / "truth.jsonl"
    truth.write_text("".join(json.dumps({"id": k, "tags": v}) + "\n" for k, v in TRUTH.items()))
    code, out, _ = cli(capsys, "clean-tags", "stats", str(path), "--truth", str(truth), "--json")
    stats = json.loads(out)
    assert stats["rule"] == "evidence"
    assert stats["cleaned"]["micro"]["f1"] == pytest.approx(stats["noisy"]["micro"]["f1"])
    code, out, _ = cli(capsys, "clean-tags", "export", str(path))
    assert {r["id"]: r["cleaned"] for r in read_export(io.StringIO(out))}["a"] == ["cat"]
