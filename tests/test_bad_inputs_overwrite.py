"""Issue #15: outputs never overwrite inputs, untrusted files cannot exhaust the machine, and
ordinary faults (a full disk, a read-only folder) get one clear line.

Each class of problem has cases run through :func:`discli.cli.app.main` (what the console script
calls): the documented exit code (README: 2 bad option or an output that would replace an input,
3 bad input data, 4 incompatible checkpoint, 6 the system refused a file operation), exactly one
``dis: error:`` line naming the file(s), no traceback, and every file that existed before the
command byte-for-byte unchanged.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from discli.infer.checkpoint import load_checkpoint, save_checkpoint
from discli.data.labelmap import write_palette_png
from factories import CLASSES, one_thread, save_model, tiny_model  # noqa: F401
from factories import noise_png as png
from test_bad_inputs import labelled_set, manifest, run_main

DIS = shutil.which("dis") or str(Path(sys.executable).with_name("dis"))



@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return save_model(tmp_path_factory.mktemp("ck") / "tiny.pth", tiny_model())


def snapshot(root: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in root.rglob("*") if p.is_file() and not p.is_symlink()}


def assert_unchanged(before: dict[Path, bytes]) -> None:
    for path, data in before.items():
        assert path.is_file(), f"{path} was removed"
        assert path.read_bytes() == data, f"{path} was changed"


def one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert "Traceback" not in err and "internal error" not in err, err
    assert len(lines) == 1 and lines[0].startswith("dis: error: "), err
    return lines[0]


def infer_args(ckpt: Path, *inputs: object, extra: tuple = ()) -> list[str]:
    return ["infer", *map(str, inputs), "-c", str(ckpt), "--device", "cpu", "-q", *extra]


# ----------------------------------------------------------------------------- outputs never
# overwrite inputs: each builder gets (tmp, checkpoint copy) and returns (argv, the paths the
# message must name). The refusal is exit 2 whatever the flags, and changes nothing.

Builder = Callable[[Path, Path], tuple[list[str], list[str]]]
OVERLAP: dict[str, Builder] = {}


def overlap(name: str) -> Callable[[Builder], Builder]:
    def register(fn: Builder) -> Builder:
        OVERLAP[name] = fn
        return fn
    return register


@overlap("infer-out-is-the-manifests-labelmap-folder")
def _(tmp, ck):
    m = labelled_set(tmp / "voc")
    return infer_args(ck, m, extra=("-o", tmp / "voc" / "gt")), ["gt/i0.png", "labelmap"]


@overlap("infer-out-is-the-manifests-labelmap-folder-overwrite")
def _(tmp, ck):
    m = labelled_set(tmp / "voc")
    return infer_args(ck, m, extra=("-o", tmp / "voc" / "gt", "--overwrite")), ["gt/i0.png"]


@overlap("infer-out-is-the-input-images-folder")
def _(tmp, ck):
    png(tmp / "in" / "a.png")
    return infer_args(ck, tmp / "in" / "a.png", extra=("-o", tmp / "in")), ["in/a.png",
                                                                              "input image"]


@overlap("infer-probs-is-the-checkpoint")
def _(tmp, ck):
    png(tmp / "a.png")
    return infer_args(ck, tmp / "a.png", extra=("--probs", ck)), [ck.name, "checkpoint"]


@overlap("infer-probs-is-the-checkpoint-overwrite")
def _(tmp, ck):
    png(tmp / "a.png")
    return infer_args(ck, tmp / "a.png", extra=("--probs", ck, "--overwrite")), [ck.name]


@overlap("infer-probs-is-the-manifest")
def _(tmp, ck):
    m = labelled_set(tmp / "d")
    return infer_args(ck, m, extra=("--probs", m, "--overwrite")), ["set.jsonl", "manifest"]


@overlap("infer-probs-is-an-input-image")
def _(tmp, ck):
    png(tmp / "a.png")
    return infer_args(ck, tmp / "a.png", extra=("--probs", tmp / "a.png")), ["a.png"]


@overlap("infer-output-is-a-hard-link-to-the-input")
def _(tmp, ck):
    png(tmp / "in" / "a.png")
    (tmp / "out").mkdir()
    (tmp / "out" / ".dis-infer.json").write_text("{}")  # even in a dis output folder
    os.link(tmp / "in" / "a.png", tmp / "out" / "a.png")
    return infer_args(ck, tmp / "in" / "a.png", extra=("-o", tmp / "out", "--overwrite")), \
        ["out/a.png", "in/a.png"]


@overlap("infer-output-folder-is-a-symlink-to-the-inputs")
def _(tmp, ck):
    png(tmp / "in" / "a.png")
    (tmp / "out").symlink_to(tmp / "in")
    return infer_args(ck, tmp / "in" / "a.png", extra=("-o", tmp / "out")), ["a.png"]


@overlap("infer-into-a-folder-of-someone-elses-files")
def _(tmp, ck):
    # `dis infer VOC2012/JPEGImages -o VOC2012/SegmentationClass`: the labelmaps there are not
    # read by this run, but they are not dis outputs either: never replaced
    png(tmp / "JPEGImages" / "a.png")
    write_palette_png(tmp / "SegmentationClass" / "a.png", np.ones((32, 40), np.uint8))
    return infer_args(ck, tmp / "JPEGImages", extra=("-o", tmp / "SegmentationClass",
                                                     "--overwrite")), \
        ["SegmentationClass/a.png", "not made by dis infer"]


@overlap("prepare-idw-out-is-the-caption-file")
def _(tmp, ck):
    png(tmp / "a.png")
    (tmp / "caps.jsonl").write_text('{"image": "a.png", "caption": "a cat"}\n')
    return ["prepare-idw", str(tmp / "caps.jsonl"), "-o", str(tmp / "caps.jsonl"), "-q"], \
        ["caps.jsonl", "caption source"]


@overlap("prepare-idw-out-is-an-image")
def _(tmp, ck):
    png(tmp / "a.png")
    (tmp / "caps.jsonl").write_text('{"image": "a.png", "caption": "a cat"}\n')
    return ["prepare-idw", str(tmp / "caps.jsonl"), "-o", str(tmp / "a.png"), "-q"], \
        ["a.png", "image"]


@overlap("prepare-idw-out-is-a-caption-txt-of-a-folder")
def _(tmp, ck):
    png(tmp / "f" / "a.png")
    (tmp / "f" / "a.txt").write_text("a cat\n")
    return ["prepare-idw", str(tmp / "f"), "-o", str(tmp / "f" / "a.txt"), "-q"], ["a.txt"]


@overlap("clean-tags-run-out-is-the-checkpoint")
def _(tmp, ck):
    m = labelled_set(tmp / "d")
    return ["clean-tags", "run", str(m), "-c", str(ck), "-o", str(ck), "--overwrite", "-q"], \
        [ck.name, "checkpoint"]


@pytest.mark.parametrize("name", sorted(OVERLAP))
def test_outputs_never_overwrite_inputs(name, ckpt, tmp_path, capfd, monkeypatch):
    ck = Path(shutil.copy(ckpt, tmp_path / "ck.pth"))
    argv, needles = OVERLAP[name](tmp_path, ck)
    before = snapshot(tmp_path)
    code, _, err = run_main(capfd, argv, None, monkeypatch)
    line = one_error_line(err)
    assert code == 2, err
    assert all(n in line for n in needles), line
    assert_unchanged(before)
    load_checkpoint(ck)  # still a checkpoint


# ----------------------------------------------------------------------------- provenance


def test_infer_redoes_an_output_whose_input_changed(ckpt, tmp_path, capfd, monkeypatch):
    """Same id, another image: the old output is not taken as done; the record says what made
    each output."""
    rng = np.random.default_rng(5)
    img = tmp_path / "in" / "a.png"
    png(img)
    out = tmp_path / "out"
    argv = infer_args(ckpt, img, extra=("-o", out, "--json", "--probs", tmp_path / "p.h5"))

    def run() -> dict:
        code, stdout, err = run_main(capfd, argv, None, monkeypatch)
        assert code == 0, err
        return json.loads(stdout)

    assert run()["skipped"] is False
    assert run()["skipped"] is True  # unchanged input: resumed
    Image.fromarray(rng.integers(0, 255, (48, 24, 3), dtype=np.uint8)).save(img)
    summary = run()
    assert summary["skipped"] is False and summary["size"] == [48, 24]
    with Image.open(out / "a.png") as im:
        assert im.size == (24, 48)
    records = [json.loads(x) for x in (out / ".dis-infer.outputs.jsonl").read_text().split("\n")
               if x]
    from discli.infer.checkpoint import file_hash

    assert records[-1]["id"] == "a" and records[-1]["input"] == file_hash(img)
    import h5py

    with h5py.File(tmp_path / "p.h5", "r") as h5:
        assert h5["entries"]["a"]["probs"].shape[1:] == (48, 24)
        assert h5["entries"]["a"].attrs["input"] == file_hash(img)
    assert run()["skipped"] is True


def test_infer_redoes_an_output_without_a_record(ckpt, tmp_path, capfd, monkeypatch):
    """A kill between writing an image's files and recording them: the image is redone."""
    png(tmp_path / "a.png")
    out = tmp_path / "out"
    argv = infer_args(ckpt, tmp_path / "a.png", extra=("-o", out, "--json"))
    code, _, err = run_main(capfd, argv, None, monkeypatch)
    assert code == 0, err
    (out / ".dis-infer.outputs.jsonl").write_text('{"id": "a", "inp')  # torn line
    code, stdout, err = run_main(capfd, argv, None, monkeypatch)
    assert code == 0 and json.loads(stdout)["skipped"] is False, err
    code, stdout, err = run_main(capfd, argv, None, monkeypatch)
    assert code == 0 and json.loads(stdout)["skipped"] is True, err
    assert len((out / ".dis-infer.outputs.jsonl").read_text().splitlines()) == 1  # compacted


# ----------------------------------------------------------------------------- untrusted files


def _forged(ckpt: Path, tmp: Path, name: str, **model_config) -> Path:
    state = load_checkpoint(ckpt)
    state["model_config"] = {**state["model_config"], **model_config}
    save_checkpoint(tmp / name, state)
    return tmp / name


@pytest.mark.parametrize("forged, needle", [
    ({"backbone_kwargs": {"channels": 300000}}, "out of bounds"),
    ({"backbone_kwargs": {"channels": 40000}}, "in the file but (40000,) in its model_config"),
    ({"num_classes": 100000}, "num_classes 100000 is not an integer from 2 to 255"),
    ({"num_classes": 300}, "num_classes 300"),
    ({"backbone": "resnet101"}, "weights do not fit resnet101"),
    ({"backbone_kwargs": {"channels": float("nan")}}, "out of bounds"),
])
def test_forged_checkpoint_config_is_refused_before_building(forged, needle, ckpt, tmp_path,
                                                             capfd, monkeypatch):
    """A checkpoint's model_config is checked (bounds, then the shapes it implies against the
    tensors it holds) before the network is built: no terabyte allocation, exit 4, at once."""
    bad = _forged(ckpt, tmp_path, "forged.pth", **forged)
    png(tmp_path / "a.png")
    start = time.perf_counter()
    code, _, err = run_main(capfd, infer_args(bad, tmp_path / "a.png", extra=("--json",)), None,
                            monkeypatch)
    line = one_error_line(err)
    assert code == 4 and "forged.pth" in line and needle in line, line
    assert time.perf_counter() - start < 20  # a real 40000-channel build takes minutes and GBs


@pytest.mark.parametrize("what", ["manifest", "image", "checkpoint"])
def test_devices_and_fifos_are_refused_not_read(what, ckpt, tmp_path, capfd, monkeypatch):
    """/dev/zero or a FIFO where a file is expected: refused at once (reading never ends)."""
    fifo = tmp_path / ("x.png" if what == "image" else "x.pth" if what == "checkpoint" else "x")
    os.mkfifo(fifo)
    png(tmp_path / "a.png")
    argv = (infer_args(ckpt, fifo, extra=("--json",)) if what != "checkpoint"
            else infer_args(fifo, tmp_path / "a.png", extra=("--json",)))
    code, _, err = run_main(capfd, argv, None, monkeypatch)
    line = one_error_line(err)
    assert code == 3 and "x" in line and "device, pipe or socket" in line, line
    code, _, err = run_main(capfd, infer_args(ckpt, "/dev/zero", extra=("--json",)), None,
                            monkeypatch)
    assert code == 3 and "/dev/zero" in one_error_line(err)


def test_dev_zero_on_stdin_is_refused(ckpt):
    r = subprocess.run(f"{DIS} infer - -c {ckpt} --device cpu --json < /dev/zero", shell=True,
                       capture_output=True, text=True, timeout=60,
                       env={**os.environ, "DIS_LOAD_PLUGINS": "infer", "OMP_NUM_THREADS": "1"})
    assert r.returncode == 3, r.stderr
    assert one_error_line(r.stderr).startswith("dis: error: <stdin>: line 1:")


def test_text_files_are_capped(ckpt, tmp_path, capfd, monkeypatch):
    """A file too large for a manifest (an archive passed by mistake) and a line too long for
    one are refused naming the file, before they are held in memory."""
    import discli.data.fileio as fileio

    m = labelled_set(tmp_path / "d")
    monkeypatch.setattr(fileio, "MAX_TEXT_BYTES", 200)
    code, _, err = run_main(capfd, infer_args(ckpt, m, extra=("--json",)), None, monkeypatch)
    assert code == 3 and "set.jsonl" in one_error_line(err) and "MiB" in err, err
    monkeypatch.undo()
    monkeypatch.setattr(fileio, "MAX_LINE_BYTES", 100)
    long = manifest(tmp_path / "long.jsonl", [{"id": "a", "image": "x" * 200 + ".png"}])
    code, _, err = run_main(capfd, infer_args(ckpt, long, extra=("--json",)), None, monkeypatch)
    assert code == 3 and "long.jsonl: line 2: longer than" in one_error_line(err), err


@pytest.mark.parametrize("where", ["manifest", "captions"])
def test_deeply_nested_json_is_bad_input_not_a_crash(where, ckpt, tmp_path, capfd, monkeypatch):
    deep = "[" * 200_000
    if where == "manifest":
        path = manifest(tmp_path / "m.jsonl", [])
        path.write_text(path.read_text() + deep + "\n")
        argv = infer_args(ckpt, path, extra=("--json",))
    else:
        path = tmp_path / "caps.jsonl"
        path.write_text(deep + "\n")
        argv = ["prepare-idw", str(path), "-o", str(tmp_path / "o.jsonl"), "-q"]
    code, _, err = run_main(capfd, argv, None, monkeypatch)
    line = one_error_line(err)
    assert code == 3 and path.name in line and "nested too deeply" in line, line


def test_more_than_255_classes_are_refused(ckpt, tmp_path, capfd, monkeypatch):
    classes = ["background", *[f"c{i}" for i in range(299)]]
    m = manifest(tmp_path / "m.jsonl", [{"id": "a", "image": "a.png"}], classes=classes)
    code, _, err = run_main(capfd, infer_args(ckpt, m, extra=("--json",)), None, monkeypatch)
    line = one_error_line(err)
    assert code == 3 and "m.jsonl" in line and "at most 255" in line, line


# ----------------------------------------------------------------------------- the environment


@pytest.mark.parametrize("err_no, needle", [(errno.ENOSPC, "no space left"),
                                            (errno.EROFS, "read-only file system"),
                                            (errno.EACCES, "permission denied")])
def test_write_failures_name_the_file_and_keep_finished_outputs(err_no, needle, ckpt, tmp_path,
                                                                capfd, monkeypatch):
    """A full disk / read-only or forbidden folder while writing (simulated: the write's
    fsync fails, as it does on a full disk): exit 6, one line naming the output, and the outputs
    finished before are intact."""
    png(tmp_path / "in" / "a.png")
    png(tmp_path / "in" / "b.png", (24, 24))
    out = tmp_path / "out"
    code, _, err = run_main(capfd, infer_args(ckpt, tmp_path / "in" / "a.png",
                                              extra=("-o", out)), None, monkeypatch)
    assert code == 0, err
    before = snapshot(tmp_path)

    real_fsync = os.fsync

    def refuse(fd):  # the disk fills up at image b
        if "b.png" not in os.readlink(f"/proc/self/fd/{fd}"):
            return real_fsync(fd)
        raise OSError(err_no, os.strerror(err_no))  # what write() gives: no file name

    monkeypatch.setattr(os, "fsync", refuse)
    code, _, err = run_main(capfd, infer_args(ckpt, tmp_path / "in", extra=("-o", out)), None,
                            monkeypatch)
    line = one_error_line(err)
    assert code == 6 and needle in line and str(out / "b") in line, line
    monkeypatch.undo()
    for path, data in before.items():
        if path.name != ".dis-infer.json":
            assert path.read_bytes() == data
    assert not [p for p in out.iterdir() if ".tmp" in p.name]  # no torn temporary files
    code, _, err = run_main(capfd, infer_args(ckpt, tmp_path / "in", extra=("-o", out)), None,
                            monkeypatch)
    assert code == 0 and (out / "b.png").is_file(), err


def test_an_os_error_anywhere_is_one_line_not_a_bug(tmp_path, capfd, monkeypatch):
    import discli.data.idw as idw

    def boom(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(tmp_path / "locked"))

    monkeypatch.setattr(idw, "prepare_idw", boom)
    (tmp_path / "caps.jsonl").write_text("")
    code, _, err = run_main(capfd, ["prepare-idw", str(tmp_path / "caps.jsonl"), "-o",
                                    str(tmp_path / "o.jsonl")], None, monkeypatch)
    line = one_error_line(err)
    assert code == 6 and "locked: permission denied" in line, line


def test_config_given_a_folder(tmp_path, capfd, monkeypatch):
    m = labelled_set(tmp_path / "d")
    (tmp_path / "cfg").mkdir()
    code, _, err = run_main(capfd, ["pretrain", "--labelled", str(m), "--out", str(tmp_path / "o"),
                                    "--config", str(tmp_path / "cfg"), "-q"], None, monkeypatch)
    line = one_error_line(err)
    assert code == 3 and "cfg" in line and "folder" in line, line


# ----------------------------------------------------------------------------- options, messages


def test_non_finite_option_values_are_refused(ckpt, tmp_path, capfd, monkeypatch):
    png(tmp_path / "a.png")
    for value in ("nan", "inf", "-inf"):
        code, stdout, err = run_main(capfd, infer_args(ckpt, tmp_path / "a.png", extra=(
            "--t-ts", "2", "--lr", value, "--json")), None, monkeypatch)
        line = one_error_line(err)
        assert code == 2 and "--lr" in line and "finite" in line and not stdout, line


def test_diverging_inference_stops_instead_of_answering(ckpt, tmp_path, capfd, monkeypatch):
    """A huge step makes the labelmap and tags NaN, which argmax reads as all background: a
    wrong answer with exit 0 before. Now exit 7 (diverged), one line naming the step size, and
    nothing on stdout; JSON never carries NaN either way."""
    png(tmp_path / "a.png")
    code, stdout, err = run_main(capfd, infer_args(ckpt, tmp_path / "a.png", extra=(
        "--t-ts", "1", "--lr", "1e38", "--json")), None, monkeypatch)
    line = one_error_line(err)
    assert code == 7 and "diverged by step 1" in line and "--lr" in line and not stdout, line
    from discli.cli.output import finite_json

    assert finite_json({"a": [float("nan"), 1.0, float("inf")]}) == {"a": [None, 1.0, None]}


def _train(tmp: Path, *extra: str) -> list[str]:
    m = labelled_set(tmp / "d")
    return ["pretrain", "--labelled", str(m), "--out", str(tmp / "run"), "--batch-size", "2",
            "--device", "cpu", "--set", "channels=8", "-q", *extra]


@pytest.mark.parametrize("extra, needle", [
    (("--crop-size", "7", "--set", "crop_size=64"), "--crop-size 7 and --set crop_size=64 "
                                                    "disagree"),
    (("--crop-size", "4"), "invalid value 4 for 'crop_size'"),
    (("--set", "crop_size=4"), "invalid value 4 for 'crop_size'"),
])
def test_bad_training_options_are_exit_2(extra, needle, tmp_path, capfd, monkeypatch):
    code, _, err = run_main(capfd, _train(tmp_path, *extra), None, monkeypatch)
    line = one_error_line(err)
    assert code == 2 and needle in line, line
    assert not (tmp_path / "run").exists()


def test_a_bad_value_in_a_config_file_is_still_bad_input(tmp_path, capfd, monkeypatch):
    (tmp_path / "run.toml").write_text("crop_size = 4\n")
    code, _, err = run_main(capfd, _train(tmp_path, "--config", str(tmp_path / "run.toml")),
                            None, monkeypatch)
    line = one_error_line(err)
    assert code == 3 and "run.toml" in line and "crop_size" in line, line


def test_error_lines_quote_a_bounded_amount(ckpt, tmp_path, capfd, monkeypatch):
    long_id = "a" * 100_000
    m = manifest(tmp_path / "m.jsonl", [{"id": long_id, "image": "a.png"}])
    code, _, err = run_main(capfd, infer_args(ckpt, m, extra=("--json",)), None, monkeypatch)
    line = one_error_line(err)
    assert code == 3 and "m.jsonl" in line and "characters cut" in line, line
    assert len(line) < 1000
    code, _, err = run_main(capfd, infer_args(ckpt, tmp_path / ("b" * 200 + "\nx.png"),
                                              extra=("--json",)), None, monkeypatch)
    line = one_error_line(err)  # a newline in a name does not make a second line either
    assert code == 3 and "\\nx.png" in line and len(line) < 1000, line
    code, _, err = run_main(capfd, infer_args(ckpt, tmp_path / ("c" * 5000), extra=("--json",)),
                            None, monkeypatch)
    line = one_error_line(err)  # a name too long for the file system: the machine says no
    assert code == 6 and "file name too long" in line and len(line) < 1000, line


def test_labelmap_size_mismatch_explained_by_exif_rotation(ckpt, tmp_path, capfd, monkeypatch):
    """An image stored 40x32 with EXIF orientation 6 (shown 32x40) and a labelmap drawn on the
    stored pixels: the message says that the EXIF rotation explains it."""
    rgb = np.random.default_rng(0).integers(0, 255, (32, 40, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(rgb).save(tmp_path / "a.jpg", exif=exif.tobytes())
    write_palette_png(tmp_path / "a_gt.png", np.zeros((32, 40), np.uint8))
    m = manifest(tmp_path / "m.jsonl", [{"id": "a", "image": "a.jpg", "labelmap": "a_gt.png"}])
    code, _, err = run_main(capfd, ["evaluate", str(m), "-c", str(ckpt), "--device", "cpu", "-q"],
                            None, monkeypatch)
    # the dataset's warning about EXIF-rotated labelled images comes first, then the refusal
    warning, _, err = err.partition("\n")
    assert warning.startswith("dis: warning: ") and "a.jpg" in warning, warning
    line = one_error_line(err)
    assert code == 3 and "a_gt.png" in line and "EXIF" in line and "orientation 6" in line, line
    from discli.data.labelmap import check_pair
    from discli.errors import BadInputError

    with pytest.raises(BadInputError, match="EXIF rotation"):
        check_pair(tmp_path / "a.jpg", tmp_path / "a_gt.png", len(CLASSES))


def test_disk_full_while_training_keeps_loadable_checkpoints(tmp_path, capfd, monkeypatch):
    """The disk fills up when pretraining saves step 2: exit 6 naming that file; the step-1
    checkpoint written before it still loads."""
    real_fsync = os.fsync

    def full(fd):
        if "step2" in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", full)
    code, _, err = run_main(capfd, _train(tmp_path, "--crop-size", "16", "--iters", "1",
                                          "--iters", "1", "--iters", "1"), None, monkeypatch)
    line = one_error_line(err)
    assert code == 6 and "step2.pth" in line and "no space left" in line, line
    from discli.infer.checkpoint import load_model

    load_model(tmp_path / "run" / "pretrain" / "step1.pth")
    assert not [p for p in (tmp_path / "run" / "pretrain").iterdir() if ".tmp" in p.name]


def test_clean_tags_export_never_replaces_its_cache(tmp_path, capfd, monkeypatch):
    from test_bad_inputs import cache_file

    cache = cache_file(tmp_path / "cache.h5")
    before = snapshot(tmp_path)
    code, _, err = run_main(capfd, ["clean-tags", "export", str(cache), "-o", str(cache)], None,
                            monkeypatch)
    line = one_error_line(err)
    assert code == 2 and "cache.h5" in line and "would overwrite the cache" in line, line
    assert_unchanged(before)


def test_training_never_replaces_its_config_file(tmp_path, capfd, monkeypatch):
    """`--config runs/x/pretrain/config.toml --out runs/x`: the run would write its effective
    configuration over the file it reads."""
    config = tmp_path / "run" / "pretrain" / "config.toml"
    config.parent.mkdir(parents=True)
    config.write_text("# my notes\n[train]\ncrop_size = 16\n")
    before = snapshot(tmp_path)
    code, _, err = run_main(capfd, _train(tmp_path, "--config", str(config)), None, monkeypatch)
    line = one_error_line(err)
    assert code == 2 and "config.toml" in line and "--config file" in line, line
    assert_unchanged(before)
