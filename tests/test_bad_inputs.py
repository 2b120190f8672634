"""The bad-input corpus: every kind of bad input, across the subcommands, gets one line.

Contract for each case of :data:`CASES` (run in this process through :func:`discli.cli.main`,
which is what the console script calls): the documented exit code (README: 2 bad option, 3 bad
input data, 4 incompatible checkpoint or cache, 5 busy), exactly one line on stderr that starts
with ``dis: error:``, names the input and says what is wrong, and no traceback unless
``--debug``. Also here: inputs that look odd but are fine (CMYK, 16-bit), finished work surviving
a failing run, the broken-pipe exit, and property-based tests of the manifest reader and the
caption parser (complementing the round-trip properties of tests/test_data_*.py).
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from discli.pseudo.cache import CacheEntry
from discli.infer.checkpoint import file_hash, save_checkpoint
from discli.data.manifest import Manifest, Record, write_manifest
from discli.data.labelmap import write_palette_png
from factories import (CLASSES, bomb_png, one_thread, save_model, tiny_model,  # noqa: F401
                       write_cache)
from factories import noise_png as png

DIS = shutil.which("dis") or str(Path(sys.executable).with_name("dis"))



# ----------------------------------------------------------------------------- file makers


def manifest(path: Path, records: list[dict], classes=CLASSES, root: str = ".") -> Path:
    header = {"format": "dis-manifest", "version": 1, "root": root, "classes": classes}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(json.dumps(x) for x in [header, *records]) + "\n")
    return path


def labelled_set(root: Path, n: int = 3, classes=CLASSES, size=(40, 32)) -> Path:
    records = []
    for i in range(n):
        png(root / "img" / f"i{i}.png", size)
        lm = np.zeros(size[::-1], np.uint8)
        lm[4:12, 4:12] = 1
        write_palette_png(root / "gt" / f"i{i}.png", lm)
        records.append(Record(id=f"i{i}", image=f"img/i{i}.png", labelmap=f"gt/i{i}.png",
                              tags=[classes[1]]))
    path = root / "set.jsonl"
    write_manifest(path, Manifest(classes=list(classes), records=records, root=root))
    return path


def cache_file(path: Path, checkpoint_hash: str = "h", classes=CLASSES,
               ids=("i0", "i1", "i2")) -> Path:
    k = len(classes)
    return write_cache(path, [CacheEntry(i, np.zeros((32, 40), np.uint8),
                                         np.ones((32, 40), np.float16),
                                         np.full(k, 0.9, np.float32), np.ones(k, np.uint8))
                              for i in ids], classes, t_tr=2, checkpoint_hash=checkpoint_hash)


class Exploit:
    """A pickle payload: unpickling it creates ``marker`` (it must never happen)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@dataclass
class Env:
    root: Path
    ckpt: Path  # a tiny model with CLASSES
    img: Path  # a good 40x32 image
    labelled: Path  # manifest with images + labelmaps (CLASSES)
    cache: Path  # a finished cache made by `ckpt`


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> Env:
    root = tmp_path_factory.mktemp("bad-inputs")
    ckpt = save_model(root / "tiny.pth", tiny_model())
    labelled = labelled_set(root / "data")
    return Env(root, ckpt, png(root / "good.png"), labelled,
               cache_file(root / "cache.h5", file_hash(ckpt)))


def train_args(env: Env, out: Path) -> list[str]:
    return ["--labelled", str(env.labelled), "--out", str(out), "--backbone", "tiny",
            "--batch-size", "2", "--crop-size", "16", "--device", "cpu", "--set", "channels=8",
            "--iters", "1", "--iters", "1", "--iters", "1", "--quiet"]


def with_config(env: Env, tmp: Path, toml: str, name: str = "run.toml", without=()
                ) -> tuple[list[str], str, None]:
    """A pretrain command reading the config file ``toml`` (its options ``without`` left out,
    so that the file's value is the one used): the case's argv, the file's name, no stdin."""
    (tmp / name).write_text(toml)
    args = [a for a in train_args(env, tmp / "o") if a not in without]
    return ["pretrain", *args, "--config", str(tmp / name)], name, None


def finetune_args(env: Env, out: Path, tagged: Path | None = None) -> list[str]:
    return ["--labelled", str(env.labelled), "--tagged", str(tagged or env.labelled),
            "--init", str(env.ckpt), "--out", str(out), "--backbone", "tiny", "--batch-size",
            "2", "--crop-size", "16", "--device", "cpu", "--set", "channels=8", "--t-tr", "1",
            "--mstep-iters", "1", "--rounds", "1", "--quiet"]


def clean_tags_run(env: Env, tmp: Path, *extra: str) -> list[str]:
    return ["clean-tags", "run", str(env.labelled), "-c", str(env.ckpt), "-o", str(tmp / "c.h5"),
            *extra]


def plot_log(tmp: Path, record: str) -> tuple[list[str], str, None]:
    """``dis plot`` of a run whose pretraining log is the one line ``record``."""
    (tmp / "run" / "pretrain").mkdir(parents=True)
    (tmp / "run" / "pretrain" / "log.jsonl").write_text(record + "\n")
    return ["plot", str(tmp / "run"), "-o", str(tmp / "p.png")], "log.jsonl", None


def infer(env: Env, *inputs: str, ckpt: Path | None = None, extra=()) -> list[str]:
    return ["infer", *inputs, "-c", str(ckpt or env.ckpt), "--device", "cpu", "--json", "-q",
            *extra]


# ----------------------------------------------------------------------------- the corpus
# Each builder gets (env, tmp) and returns (argv, the name the message must contain, stdin).

Builder = Callable[[Env, Path], tuple[list[str], str, str | None]]
CASES: dict[str, tuple[Builder, int, str]] = {}


def case(name: str, code: int, needle: str) -> Callable[[Builder], Builder]:
    def register(fn: Builder) -> Builder:
        assert name not in CASES
        CASES[name] = (fn, code, needle)
        return fn
    return register


# --- checkpoints
@case("checkpoint-truncated", 4, "truncated or corrupt")
def _(env, tmp):
    bad = tmp / "trunc.pth"
    bad.write_bytes(env.ckpt.read_bytes()[:3000])
    return infer(env, str(env.img), ckpt=bad), "trunc.pth", None


@case("checkpoint-missing", 3, "checkpoint not found")
def _(env, tmp):
    return infer(env, str(env.img), ckpt=tmp / "nope.pth"), "nope.pth", None


@case("checkpoint-runs-pickle-code", 4, "arbitrary pickle code")
def _(env, tmp):
    bad = tmp / "evil.pth"
    torch.save({"format": "dis-checkpoint", "x": Exploit(tmp / "pwned")}, bad)
    return infer(env, str(env.img), ckpt=bad), "evil.pth", None


@case("checkpoint-not-dis", 4, "not a dis checkpoint")
def _(env, tmp):
    bad = tmp / "plain.pth"
    torch.save(tiny_model().state_dict(), bad)
    return infer(env, str(env.img), ckpt=bad), "plain.pth", None


@case("checkpoint-format-version", 4, "format version 7")
def _(env, tmp):
    bad = tmp / "future.pth"
    torch.save({"format": "dis-checkpoint", "format_version": 7}, bad)
    return infer(env, str(env.img), ckpt=bad), "future.pth", None


@case("checkpoint-weights-of-another-width", 4, "weights do not fit")
def _(env, tmp):
    model = tiny_model(channels=16)
    state = {"model": model.state_dict(), "classes": CLASSES,
             "model_config": {**model.config.to_dict(), "backbone_kwargs": {"channels": 8}}}
    save_checkpoint(tmp / "wide.pth", state)
    return infer(env, str(env.img), ckpt=tmp / "wide.pth"), "wide.pth", None


@case("checkpoint-needs-a-backbone-not-installed", 4, "unknown backbone 'convnext9000'")
def _(env, tmp):
    model = tiny_model()
    state = {"model": model.state_dict(), "classes": CLASSES,
             "model_config": {**model.config.to_dict(), "backbone": "convnext9000"}}
    save_checkpoint(tmp / "alien.pth", state)
    return infer(env, str(env.img), ckpt=tmp / "alien.pth"), "alien.pth", None


@case("checkpoint-is-a-folder", 3, "expected a checkpoint file, found a folder")
def _(env, tmp):
    (tmp / "ckpt.pth").mkdir()
    return infer(env, str(env.img), ckpt=tmp / "ckpt.pth"), "ckpt.pth", None


@case("checkpoint-other-architecture", 4, "backbone='tiny' but this run asks for 'small'")
def _(env, tmp):
    args = finetune_args(env, tmp / "run")
    args[args.index("tiny")] = "small"
    return ["finetune", *args, "--only", "estep"], "tiny.pth", None


@case("checkpoint-other-class-count", 4, "has 5 classes but checkpoint")
def _(env, tmp):
    classes = [*CLASSES, "bird", "car"]
    return (["evaluate", str(labelled_set(tmp / "d5", classes=classes)), "-c", str(env.ckpt),
             "--device", "cpu", "-q", "--json"], "set.jsonl", None)


@case("checkpoint-other-classes-for-finetune", 4, "classes")
def _(env, tmp):
    other = save_model(tmp / "other.pth", tiny_model(), ["background", "cow", "sheep"])
    args = finetune_args(env, tmp / "run")
    args[args.index(str(env.ckpt))] = str(other)
    return ["finetune", *args, "--only", "estep"], "other.pth", None


# --- caches
@case("cache-other-format-version", 4, "cache format version 99")
def _(env, tmp):
    path = shutil.copy(env.cache, tmp / "old.h5")
    import h5py

    with h5py.File(path, "r+") as h5:
        h5.attrs["format_version"] = 99
    return ["clean-tags", "export", str(path)], "old.h5", None


@case("cache-stale-from-another-checkpoint", 4, "stale cache")
def _(env, tmp):
    rdir = tmp / "run" / "finetune" / "round-1"
    cache_file(rdir / "cache.h5", checkpoint_hash="0123456789abcdef")
    return ["finetune", *finetune_args(env, tmp / "run"), "--only", "mstep"], "cache.h5", None


@case("cache-not-hdf5", 3, "not a readable HDF5 file")
def _(env, tmp):
    (tmp / "junk.h5").write_bytes(b"\x89HDF\r\n but not really")
    return ["clean-tags", "export", str(tmp / "junk.h5")], "junk.h5", None


@case("probs-file-not-hdf5", 3, "not a readable HDF5 file")
def _(env, tmp):
    (tmp / "p.h5").write_text("hello")
    return infer(env, str(env.img), extra=["--probs", str(tmp / "p.h5")]), "p.h5", None


# --- configuration and options
@case("config-unknown-key", 3, "unknown key 'bogus'")
def _(env, tmp):
    return with_config(env, tmp, "[train]\nbogus = 1\n")


@case("config-wrong-type", 3, "key 'batch_size' must be int, got str")
def _(env, tmp):
    return with_config(env, tmp, "batch_size = 'eight'\n")


@case("config-not-toml", 3, "not valid TOML")
def _(env, tmp):
    return with_config(env, tmp, "lr = = 1\n")


@case("config-invalid-value", 3, "invalid value 0 for 'ckpt_every'")
def _(env, tmp):
    return with_config(env, tmp, "ckpt_every = 0\n")


@case("t-tr-negative", 2, "greater than or equal to 0")
def _(env, tmp):
    return ["finetune", *finetune_args(env, tmp / "o"), "--t-tr", "-1"], "--t-tr", None


@case("clean-tags-t-tr-negative", 2, "--t-tr")
def _(env, tmp):
    return clean_tags_run(env, tmp, "--t-tr", "-1"), "--t-tr", None


@case("set-without-value", 2, "--set expects KEY=VALUE")
def _(env, tmp):
    return ["pretrain", *train_args(env, tmp / "o"), "--set", "lr"], "--set", None


# --- image lists
@case("empty-image-folder", 3, "no input images")
def _(env, tmp):
    (tmp / "empty").mkdir()
    return infer(env, str(tmp / "empty")), "empty", None


@case("empty-stdin-list", 3, "no input images")
def _(env, tmp):
    return infer(env, "-"), "<stdin>", ""


@case("manifest-without-records", 3, "no record with a labelmap")
def _(env, tmp):
    return ["pretrain", *train_args(env, tmp / "o")[2:], "--labelled",
            str(manifest(tmp / "none.jsonl", []))], "none.jsonl", None


# --- images
@case("image-missing", 3, "no such image")
def _(env, tmp):
    return infer(env, str(tmp / "gone.png")), "gone.png", None


@case("image-zero-byte", 3, "empty image file (0 bytes)")
def _(env, tmp):
    (tmp / "zero.png").write_bytes(b"")
    return infer(env, str(tmp / "zero.png")), "zero.png", None


@case("image-1x1", 3, "image too small")
def _(env, tmp):
    return infer(env, str(png(tmp / "px.png", (1, 1)))), "px.png", None


@case("image-decompression-bomb", 3, "decompression bomb")
def _(env, tmp):
    return infer(env, str(bomb_png(tmp / "bomb.png"))), "bomb.png", None


@case("image-truncated", 3, "truncated or corrupt")
def _(env, tmp):
    path = png(tmp / "cut.png", (64, 64))
    path.write_bytes(path.read_bytes()[:500])
    return infer(env, str(path)), "cut.png", None


@case("image-not-an-image", 3, "not a decodable image")
def _(env, tmp):
    (tmp / "text.png").write_text("hello, I am text")
    return infer(env, str(tmp / "text.png")), "text.png", None


@case("image-missing-in-tagged-manifest", 3, "image not found")
def _(env, tmp):
    tagged = manifest(tmp / "web.jsonl", [{"id": "w0", "image": "nope.png", "tags": ["cat"]}])
    return ["finetune", *finetune_args(env, tmp / "run", tagged), "--only", "estep"], \
        "nope.png", None


# --- manifests and labelmaps
@case("manifest-path-escapes-root", 3, "escapes the manifest root")
def _(env, tmp):
    path = manifest(tmp / "m.jsonl", [{"id": "a", "image": "../../etc/passwd"}])
    return infer(env, str(path)), "m.jsonl", None


@case("manifest-unsafe-id", 3, "is not a safe file name")
def _(env, tmp):
    path = manifest(tmp / "m.jsonl", [{"id": "../../escape", "image": "good.png"}])
    return infer(env, str(path), extra=["-o", str(tmp / "out")]), "m.jsonl", None


@case("manifest-malformed-json", 3, "line 2: malformed JSON")
def _(env, tmp):
    path = manifest(tmp / "m.jsonl", [])
    path.write_text(path.read_text() + "{oops\n")
    return ["evaluate", str(path), "-c", str(env.ckpt), "--device", "cpu", "-q"], "m.jsonl", None


@case("manifest-unknown-class", 3, "unknown class 'kitten'")
def _(env, tmp):
    path = manifest(tmp / "m.jsonl", [{"id": "a", "image": "a.png", "tags": ["kitten"]}])
    return ["pretrain", *train_args(env, tmp / "o")[2:], "--labelled", str(path)], "m.jsonl", None


@case("manifest-not-utf8", 3, "not UTF-8")
def _(env, tmp):
    path = manifest(tmp / "m.jsonl", [])
    path.write_bytes(path.read_bytes() + b'{"id": "a", "image": "\xff.png"}\n')
    return infer(env, str(path)), "m.jsonl", None


@case("manifest-classes-differ", 3, "differ from the labelled manifest")
def _(env, tmp):
    tagged = manifest(tmp / "web.jsonl", [], classes=["background", "cow"])
    return ["finetune", *finetune_args(env, tmp / "run", tagged)], "web.jsonl", None


@case("labelmap-missing", 3, "not found")
def _(env, tmp):
    png(tmp / "a.png")
    path = manifest(tmp / "m.jsonl", [{"id": "a", "image": "a.png", "labelmap": "gt/a.png"}])
    return ["pretrain", *train_args(env, tmp / "o")[2:], "--labelled", str(path)], "a.png", None


@case("labelmap-size-differs", 3, "labelmap is 20x20 but its image is 40x32")
def _(env, tmp):
    png(tmp / "a.png", (40, 32))
    write_palette_png(tmp / "gt.png", np.zeros((20, 20), np.uint8))
    path = manifest(tmp / "m.jsonl", [{"id": "a", "image": "a.png", "labelmap": "gt.png"}])
    return ["evaluate", str(path), "-c", str(env.ckpt), "--device", "cpu", "-q"], "gt.png", None


# --- captions and tag files
@case("caption-not-utf8", 3, "not UTF-8")
def _(env, tmp):
    png(tmp / "a.png")
    (tmp / "caps.jsonl").write_bytes(b'{"image": "a.png", "caption": "a \xe9t\xe9 cat"}\n')
    return ["prepare-idw", str(tmp / "caps.jsonl"), "-o", str(tmp / "out.jsonl")], "caps.jsonl", \
        None


@case("truth-file-malformed", 3, "line 1: malformed JSON")
def _(env, tmp):
    (tmp / "truth.jsonl").write_text("{nope\n")
    return ["clean-tags", "stats", str(env.cache), "--truth", str(tmp / "truth.jsonl")], \
        "truth.jsonl", None


# --- output locations
@case("output-folder-is-a-file", 2, "not a folder")
def _(env, tmp):
    (tmp / "out").write_text("I am a file")
    return infer(env, str(env.img), extra=["-o", str(tmp / "out")]), "out", None


@case("output-outside-through-symlink", 3, "would write outside the output folder")
def _(env, tmp):
    (tmp / "in" / "sub").mkdir(parents=True)
    png(tmp / "in" / "sub" / "x.png")
    (tmp / "out").mkdir()
    (tmp / "elsewhere").mkdir()
    (tmp / "out" / "sub").symlink_to(tmp / "elsewhere")
    return infer(env, str(tmp / "in"), extra=["-o", str(tmp / "out")]), "out", None


# --- found by a sweep of 625 bad inputs across the subcommands (2026-12-06)
@case("weights-file-empty", 4, "weights file is empty (0 bytes)")
def _(env, tmp):
    (tmp / "e.pth").write_bytes(b"")
    return ["pretrain", *train_args(env, tmp / "run"), "--backbone-weights",
            str(tmp / "e.pth")], "e.pth", None


@case("output-folder-where-a-file-is", 6, "a component of the path is a file")
def _(env, tmp):
    png(tmp / "a.png")
    (tmp / "caps.jsonl").write_text('{"image": "a.png", "caption": "a cat"}\n')
    (tmp / "taken.txt").write_text("a file")
    return ["prepare-idw", str(tmp / "caps.jsonl"), "-o", str(tmp / "taken.txt" / "m.jsonl")], \
        "taken.txt", None


@case("synth-negative-seed", 2, "--seed must be an integer from 0")
def _(env, tmp):
    return ["synth", str(tmp / "s"), "--seed", "-1"], "--seed", None


@case("synth-nothing-to-write", 2, "every image count is 0")
def _(env, tmp):
    return ["synth", str(tmp / "s"), "--n-labelled", "0", "--n-tagged", "0", "--n-test", "0",
            "--n-dev", "0"], "nothing to write", None


@case("synth-count-past-int64", 2, "image counts must be from 0 to")
def _(env, tmp):
    return ["synth", str(tmp / "s"), "--n-labelled", "99999999999999999999"], "counts", None


@case("t-ts-beyond-any-run", 2, "expected integers from 0 to 10000")
def _(env, tmp):
    return ["evaluate", str(env.labelled), "-c", str(env.ckpt), "--device", "cpu", "-q",
            "--t-ts", "99999999999999999999"], "--t-ts", None


@case("set-t-ts-beyond-any-run", 2, "(at most 10000)")
def _(env, tmp):
    return ["pretrain", *train_args(env, tmp / "run"), "--set", "t_ts=99999999"], "t_ts", None


@case("iters-beyond-any-run", 2, "(at most 1000000000)")
def _(env, tmp):
    args = train_args(env, tmp / "run")
    args[args.index("--iters") + 1] = "99999999999999999999"
    return ["pretrain", *args], "iters_step1", None


@case("demo-t-tr-not-integers", 2, "--t-tr: expected comma-separated integers")
def _(env, tmp):
    return ["demo", "--t-tr", "abc", "--out", str(tmp / "demo")], "--t-tr", None


@case("val-manifest-of-other-classes", 3, "differ from the labelled manifest")
def _(env, tmp):
    val = labelled_set(tmp / "val", classes=["background", "cow"])
    return ["pretrain", *train_args(env, tmp / "run"), "--val", str(val)], "set.jsonl", None


@case("captions-file-empty", 3, "no captioned image found")
def _(env, tmp):
    (tmp / "caps.jsonl").write_text("\n\n")
    return ["prepare-idw", str(tmp / "caps.jsonl"), "-o", str(tmp / "out.jsonl")], "caps.jsonl", \
        None


@case("truth-manifest-of-other-classes", 3, "differ from the cache's")
def _(env, tmp):
    truth = labelled_set(tmp / "truth", classes=["background", "cow"])
    return ["clean-tags", "stats", str(env.cache), "--truth", str(truth)], "set.jsonl", None


def edited_cache(env: Env, tmp: Path, edit: Callable[[object], object]) -> Path:
    """A copy of the good cache with ``edit(h5_file)`` applied."""
    import h5py

    bad = tmp / "c.h5"
    shutil.copy(env.cache, bad)
    with h5py.File(bad, "a") as h5:
        edit(h5)
    return bad


@case("cache-without-entries", 4, "no 'entries' group")
def _(env, tmp):
    bad = edited_cache(env, tmp, lambda h5: h5.pop("entries"))
    return ["clean-tags", "export", str(bad)], "c.h5", None


@case("cache-entry-not-a-group", 4, "entry 'i0' is incomplete or unreadable")
def _(env, tmp):
    def to_dataset(h5):
        del h5["entries/i0"]
        h5["entries/i0"] = np.zeros(3)

    bad = edited_cache(env, tmp, to_dataset)
    return ["score-cache", str(bad), str(env.labelled)], "c.h5", None


@case("cache-is-a-folder", 3, "expected a cache file, found a folder")
def _(env, tmp):
    (tmp / "c.h5").mkdir()
    return ["clean-tags", "show", str(tmp / "c.h5"), "i0"], "c.h5", None


@case("probs-file-is-a-folder", 3, "expected a probabilities file (.h5), found a folder")
def _(env, tmp):
    (tmp / "p.h5").mkdir()
    return infer(env, str(env.img), extra=["--probs", str(tmp / "p.h5")]), "p.h5", None


@case("infer-record-torn", 4, "does not read back")
def _(env, tmp):
    (tmp / "out").mkdir()
    (tmp / "out" / ".dis-infer.json").write_text('{"x')
    return infer(env, str(env.img), extra=["-o", str(tmp / "out")]), "out", None


@case("log-value-of-wrong-type", 3, "malformed training log: ValueError")
def _(env, tmp):
    return plot_log(tmp, '{"stage": "pretrain", "phase": "step1", "iter": "x"}')


@case("evaluation-report-confusion-not-a-matrix", 3, "'confusion' is not a 2x2 matrix")
def _(env, tmp):
    report = {"classes": ["background", "cat"], "setups": [
        {"name": "t=0", "iou": {"background": 0.9, "cat": 0.5}, "confusion": "x"}]}
    (tmp / "ev.json").write_text(json.dumps(report))
    return ["plot", str(tmp / "ev.json")], "ev.json", None


@case("evaluation-report-classes-cut", 3, "'iou' does not hold one value per class")
def _(env, tmp):
    report = {"classes": ["background"], "setups": [
        {"name": "t=0", "iou": {"background": 0.9, "cat": 0.5}}]}
    (tmp / "ev.json").write_text(json.dumps(report))
    return ["plot", str(tmp / "ev.json")], "ev.json", None


# --- found by the third sweep: values and files that reached torch or Python unchecked
@case("device-of-another-backend", 2, "device 'mps' is not supported")
def _(env, tmp):
    return ["infer", str(env.img), "-c", str(env.ckpt), "--device", "mps", "--json", "-q"], \
        "--device", None


@case("output-folder-empty", 2, "an empty path")
def _(env, tmp):  # an unset shell variable: the current folder, silently
    return infer(env, str(env.img), extra=("-o", "")), "--out", None


@case("probs-file-is-root", 2, "is a folder, not a file name")
def _(env, tmp):
    return infer(env, str(env.img), extra=("--probs", "/")), "--probs", None


@case("set-negative-weight-decay", 2, "invalid value -1.0 for 'weight_decay'")
def _(env, tmp):
    return ["pretrain", *train_args(env, tmp / "o"), "--set", "weight_decay=-1"], \
        "command line", None


@case("config-momentum-of-one", 3, "invalid value 1.0 for 'momentum'")
def _(env, tmp):
    return with_config(env, tmp, "optimizer = 'sgd'\nmomentum = 1.0\n", "m.toml")


@case("config-device-of-another-backend", 3, "invalid value 'mps' for 'device'")
def _(env, tmp):
    return with_config(env, tmp, "device = 'mps'\n", "d.toml", ("--device", "cpu"))


@case("config-unknown-backbone", 3, "unknown backbone 'nope'")
def _(env, tmp):
    return with_config(env, tmp, "backbone = 'nope'\n", "b.toml", ("--backbone", "tiny"))


@case("workers-beyond-any-machine", 2, "--num-workers")
def _(env, tmp):  # 100000 worker processes exhaust the memory before the first batch
    return clean_tags_run(env, tmp, "--num-workers", "100000"), "--num-workers", None


@case("inference-momentum-of-five", 2, "--momentum must be at least 0 and below 1")
def _(env, tmp):
    return infer(env, str(env.img), extra=("--t-ts", "2", "--momentum", "5")), "--momentum", None


@case("clean-tags-steps-beyond-the-limit", 2, "--t-tr")
def _(env, tmp):
    return clean_tags_run(env, tmp, "--t-tr", "100000000"), "--t-tr", None


@case("evaluate-classes-in-another-order", 4, "(names or order)")
def _(env, tmp):
    lines = env.labelled.read_text().splitlines()
    header = json.loads(lines[0])
    header["classes"] = [header["classes"][0], *reversed(header["classes"][1:])]
    header["root"] = str(env.labelled.parent)
    (tmp / "r.jsonl").write_text("\n".join([json.dumps(header), *lines[1:]]) + "\n")
    return ["evaluate", str(tmp / "r.jsonl"), "-c", str(env.ckpt), "--device", "cpu", "-q"], \
        "r.jsonl", None


@case("manifest-number-of-5000-digits", 3, "not a dis manifest")
def _(env, tmp):
    lines = env.labelled.read_text().splitlines()
    (tmp / "v.jsonl").write_text("\n".join([lines[0].replace('"version": 1', '"version": 1'
                                                              + "0" * 5000), *lines[1:]]) + "\n")
    return ["evaluate", str(tmp / "v.jsonl"), "-c", str(env.ckpt), "-q"], "v.jsonl", None


@case("caption-half-a-character", 3, "lone surrogate")
def _(env, tmp):
    (tmp / "c.jsonl").write_text('{"image": "%s", "caption": "a \\ud800 cat"}\n' % env.img)
    return ["prepare-idw", str(tmp / "c.jsonl"), "-o", str(tmp / "m.jsonl")], "c.jsonl", None


@case("checkpoint-is-an-image", 4, "not a checkpoint: a PNG image")
def _(env, tmp):
    return infer(env, str(env.img), ckpt=env.img), "good.png", None


@case("cache-truncated", 4, "a truncated or corrupt HDF5 file")
def _(env, tmp):
    (tmp / "t.h5").write_bytes(env.cache.read_bytes()[:4000])
    return ["score-cache", str(tmp / "t.h5"), str(env.labelled)], "t.h5", None


@case("cache-is-a-device", 3, "found a device, pipe or socket")
def _(env, tmp):
    return ["score-cache", "/dev/null", str(env.labelled)], "/dev/null", None


# --- found by the fourth sweep
@case("probs-file-is-an-output-of-the-same-run", 2, "is also an output of this command")
def _(env, tmp):  # the HDF5 file replaced a predicted labelmap with --overwrite before
    return infer(env, str(env.img), extra=("-o", str(tmp / "o"), "--probs",
                                           str(tmp / "o" / "good.png"))), "--probs", None


def run_cache(env: Env, tmp: Path, config: str) -> Path:
    """A copy of the corpus cache inside a run folder whose config.toml holds ``config``."""
    (tmp / "run" / "round-1").mkdir(parents=True)
    shutil.copy(env.cache, tmp / "run" / "round-1" / "cache.h5")
    (tmp / "run" / "config.toml").write_text(config)
    return tmp / "run" / "round-1" / "cache.h5"


@case("run-config-beside-a-cache-out-of-range", 3, "invalid value 5.0 for 'confidence'")
def _(env, tmp):  # used silently before: every pixel below 5 ignored
    cache = run_cache(env, tmp, "[train.finetune]\nconfidence = 5\n")
    return ["score-cache", str(cache), str(env.labelled)], "config.toml", None


@case("run-config-beside-a-cache-bad-rule", 3, "invalid value 'bogus' for 'tag_rule'")
def _(env, tmp):
    cache = run_cache(env, tmp, "[train.finetune]\ntag_rule = 'bogus'\n")
    return ["clean-tags", "diff", str(cache)], "config.toml", None


@case("log-iteration-infinite", 3, "malformed training log: OverflowError")
def _(env, tmp):
    return plot_log(tmp, '{"stage": "pretrain", "phase": "step1", "iter": 1e400, "loss": 1.0}')


@case("demo-report-score-not-a-number", 3, "'miou' or 'iou' is not a fraction")
def _(env, tmp):
    report = {"classes": ["background", "cat"], "scores": {"t_tr=0": {"setups": [
        {"name": "t=0", "miou": "high", "iou": {"background": 0.9, "cat": 0.5}}]}}}
    (tmp / "report.json").write_text(json.dumps(report))
    return ["plot", str(tmp / "report.json")], "report.json", None


@case("demo-report-without-models", 3, "'scores' holds no models")
def _(env, tmp):
    (tmp / "report.json").write_text(json.dumps({"classes": ["background"], "scores": {}}))
    return ["plot", str(tmp / "report.json")], "report.json", None


def run_main(capfd, argv: list[str], stdin: str | None, monkeypatch) -> tuple[int, str, str]:
    from discli.cli.app import main

    capfd.readouterr()
    if stdin is not None:
        import io

        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    code = main(argv)
    out, err = capfd.readouterr()
    return code, out, err


def test_corpus_is_large_enough():
    assert len(CASES) >= 25
    assert {2, 3, 4} <= {code for _, code, _ in CASES.values()}


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input(name, env, tmp_path, capfd, monkeypatch):
    build, code, needle = CASES[name]
    argv, filename, stdin = build(env, tmp_path)
    got, _, err = run_main(capfd, argv, stdin, monkeypatch)
    lines = err.strip().splitlines()
    assert got == code, err
    assert "Traceback" not in err and "internal error" not in err, err
    assert len(lines) == 1, err
    assert lines[0].startswith("dis: error: "), lines[0]
    assert filename in lines[0] and needle in lines[0], lines[0]
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize("name", ["checkpoint-truncated", "image-zero-byte", "set-without-value",
                                  "cache-stale-from-another-checkpoint"])
def test_debug_shows_a_traceback(name, env, tmp_path, capfd, monkeypatch):
    build, code, needle = CASES[name]
    argv, _, stdin = build(env, tmp_path)
    got, _, err = run_main(capfd, ["--debug", *argv], stdin, monkeypatch)
    assert got == code and "Traceback (most recent call last)" in err and needle in err


def test_busy_output_folder(env, tmp_path, capfd, monkeypatch):
    """Another process holds the output folder: exit 5 naming it and the holder's pid."""
    out = tmp_path / "out"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from discli.storage.lock import lock_folder\n"
         "with lock_folder(sys.argv[1]):\n print('held', flush=True); time.sleep(60)", str(out)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        code, _, err = run_main(capfd, infer(env, str(env.img), extra=["-o", str(out)]), None,
                                monkeypatch)
        assert code == 5 and len(err.strip().splitlines()) == 1, err
        assert str(out) in err and f"pid {holder.pid}" in err
        assert not (out / "good.png").exists()
    finally:
        holder.kill()
        holder.wait()
    code, _, err = run_main(capfd, infer(env, str(env.img), extra=["-o", str(out)]), None,
                            monkeypatch)
    assert code == 0 and (out / "good.png").is_file(), err  # a dead holder leaves no lock


# ----------------------------------------------------------------------------- odd but valid


def test_cmyk_and_16bit_png_inputs_are_predicted(env, tmp_path, capfd, monkeypatch):
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 255, (30, 44, 3), dtype=np.uint8)).convert("CMYK").save(
        tmp_path / "cmyk.jpg")
    Image.fromarray(rng.integers(0, 65535, (36, 28), dtype=np.uint16)).save(tmp_path / "g16.png")
    import io as _io

    # a genuine 16-bit-per-channel RGB PNG, written by hand (PIL cannot write one)
    raw = np.full((24, 20, 3), 4000, ">u2")
    rows = b"".join(b"\x00" + raw[y].tobytes() for y in range(24))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))

    buf = _io.BytesIO()
    buf.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 20, 24, 16, 2, 0, 0, 0))
              + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))
    (tmp_path / "rgb16.png").write_bytes(buf.getvalue())
    out = tmp_path / "out"
    code, stdout, err = run_main(capfd, infer(env, str(tmp_path / "cmyk.jpg"),
                                              str(tmp_path / "g16.png"),
                                              str(tmp_path / "rgb16.png"),
                                              extra=["-o", str(out)]), None, monkeypatch)
    assert code == 0, err
    sizes = {json.loads(line)["id"]: json.loads(line)["size"] for line in stdout.splitlines()}
    assert sizes == {"cmyk": [30, 44], "g16": [36, 28], "rgb16": [24, 20]}
    for name, (h, w) in sizes.items():
        with Image.open(out / f"{name}.png") as im:
            assert im.size == (w, h)


# ----------------------------------------------------------------------------- finished work


def test_failed_runs_leave_finished_work_alone(env, tmp_path, capfd, monkeypatch):
    out = tmp_path / "run"
    code, _, err = run_main(capfd, ["pretrain", *train_args(env, out)], None, monkeypatch)
    assert code == 0, err
    before = {p.name: p.read_bytes() for p in (out / "pretrain").iterdir() if p.is_file()}
    assert "final.pth" in before
    (tmp_path / "bad.toml").write_text("bogus = 1\n")
    bad_runs = [
        ["pretrain", *train_args(env, out), "--config", str(tmp_path / "bad.toml")],
        ["pretrain", *train_args(env, out)[2:], "--labelled", str(manifest(
            tmp_path / "m.jsonl", [{"id": "a", "image": "../x.png"}]))],
        ["pretrain", *train_args(env, out), "--backbone", "small"],  # another architecture
    ]
    for argv in bad_runs:  # a bad config file, a bad manifest, another architecture: refused
        code, _, err = run_main(capfd, argv, None, monkeypatch)  # (2: other settings than the
        assert code in (2, 3, 4) and len(err.strip().splitlines()) == 1, err  # run's)
    after = {p.name: p.read_bytes() for p in (out / "pretrain").iterdir() if p.is_file()}
    assert after == before

    # infer: outputs of a first run survive a second run that stops on a bad image
    pred = tmp_path / "pred"
    code, _, err = run_main(capfd, infer(env, str(env.img), extra=["-o", str(pred)]), None,
                            monkeypatch)
    assert code == 0, err
    first = (pred / "good.png").read_bytes()
    (tmp_path / "zero.png").write_bytes(b"")
    code, _, err = run_main(capfd, infer(env, str(env.img), str(tmp_path / "zero.png"),
                                         extra=["-o", str(pred)]), None, monkeypatch)
    assert code == 3 and "zero.png" in err
    assert (pred / "good.png").read_bytes() == first


def test_an_output_truncated_outside_dis_is_redone(env, tmp_path, capfd, monkeypatch):
    pred = tmp_path / "pred"
    argv = infer(env, str(env.img), extra=["-o", str(pred)])
    assert run_main(capfd, argv, None, monkeypatch)[0] == 0
    first = (pred / "good.png").read_bytes()
    (pred / "good.png").write_bytes(b"")  # e.g. a copy that ran out of space
    code, out, err = run_main(capfd, argv, None, monkeypatch)
    assert code == 0, err
    assert (pred / "good.png").read_bytes() == first


def test_out_of_memory_is_one_line_naming_what_to_reduce(capfd, monkeypatch):
    from discli.cli import app
    from discli.errors import EXIT_SYSTEM, out_of_memory

    cpu = RuntimeError("[enforce fail at alloc_cpu.cpp:127] data. DefaultCPUAllocator: can't "
                       "allocate memory: you tried to allocate 479793622176 bytes. Error code "
                       "12 (Cannot allocate memory)")
    numpy = MemoryError("Unable to allocate 149. GiB for an array with shape (100000, 100000, "
                        "4) and data type float32")
    assert "a tensor of 446.8 GiB" in str(out_of_memory(cpu))
    assert "a tensor of 149 GiB" in str(out_of_memory(numpy))
    assert out_of_memory(RuntimeError("shape mismatch")) is None
    assert out_of_memory(ValueError("out of memory")) is None  # only allocators' errors

    def exhausted(*args, **kwargs):
        raise numpy

    monkeypatch.setattr(app, "build_app", exhausted)
    capfd.readouterr()
    assert app.main(["plugins"]) == EXIT_SYSTEM
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("dis: error: not enough memory"), err
    assert "--batch-size" in err[0] and "internal error" not in err[0]


def test_a_full_disk_while_saving_a_checkpoint_names_it(tmp_path, monkeypatch):
    import errno

    from discli.errors import SystemRefusedError
    from discli.storage import atomic

    real_open = open

    class Full:  # a file on a disk with 1 KiB left
        def __init__(self, path, mode):
            self.file, self.left = real_open(path, mode), 1024

        def write(self, data):
            if len(data) > self.left:
                raise OSError(errno.ENOSPC, "No space left on device")
            self.left -= len(data)
            return self.file.write(data)

        def __getattr__(self, name):
            return getattr(self.file, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.file.close()

    target = tmp_path / "run" / "last.pth"
    save_checkpoint(target, {"model": tiny_model().state_dict()})
    before = target.read_bytes()
    monkeypatch.setattr(atomic, "open", Full, raising=False)
    with pytest.raises(SystemRefusedError, match="no space left on the device") as caught:
        save_checkpoint(target, {"model": tiny_model(channels=16).state_dict()})
    assert str(target) in str(caught.value)  # torch's own error would be "unexpected pos"
    assert target.read_bytes() == before  # the checkpoint before is kept
    assert [p.name for p in target.parent.iterdir()] == ["last.pth"]  # no temporary left


def test_a_full_disk_while_finishing_a_cache_part_gives_its_space_back(tmp_path):
    from discli.errors import SystemRefusedError
    from discli.pseudo.cache import CacheWriter, make_attrs

    writer = CacheWriter(tmp_path / "cache.h5", make_attrs(list(CLASSES), 0, "h", {}))
    parts = writer._writer
    k = len(CLASSES)
    entry = CacheEntry("i0", np.zeros((4, 4), np.uint8), np.ones((4, 4), np.float16),
                       np.full(k, 0.5, np.float32), np.ones(k, np.uint8))
    parts.add("i0", lambda g: [g.create_dataset(n, data=a) for n, a in
                               zip(("labelmap", "confidence"), (entry.labelmap,
                                                                entry.confidence))])
    torn = parts._tmp
    assert torn is not None and torn.exists()

    class FullDisk:  # what HDF5 raises when the last write of a file fails
        def close(self):
            raise RuntimeError("Can't decrement id ref count (file write failed: errno = 28, "
                               "error message = 'No space left on device')")

    real, parts._h5 = parts._h5, FullDisk()
    real.close()
    with pytest.raises(SystemRefusedError, match="no space left on the device"):
        parts.flush()
    assert not torn.exists() and parts.parts() == []  # nothing half-written kept


# ----------------------------------------------------------------------------- pipes


def _shell(command: str, **env: str) -> subprocess.CompletedProcess:
    full = {**os.environ, "OMP_NUM_THREADS": "1", **env}
    return subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=120,
                          env=full)


def test_stdout_closed_early_in_a_pipeline(env, tmp_path):
    """`dis ... | head -n 1`: no traceback, no message; dis exits 141 (128 + SIGPIPE)."""
    many = [f"x{i:04d}" for i in range(3000)]
    big = cache_file(tmp_path / "big.h5", ids=many)
    r = _shell(f"set -o pipefail; {DIS} clean-tags export {big} | head -n 1; "
               f"echo \"codes ${{PIPESTATUS[*]}}\" >&2", DIS_LOAD_PLUGINS="clean-tags")
    assert json.loads(r.stdout.splitlines()[0])["id"] == "x0000"
    assert r.stderr.strip() == "codes 141 0", r.stderr
    images = tmp_path / "imgs"
    for i in range(12):
        png(images / f"p{i:02d}.png", (16, 16))
    r = _shell(f"ls {images}/*.png | {DIS} infer - -c {env.ckpt} --device cpu --json -q -b 1 "
               f"| head -n 1; echo \"codes ${{PIPESTATUS[*]}}\" >&2", DIS_LOAD_PLUGINS="infer")
    assert json.loads(r.stdout)["id"] == "p00"
    assert "Traceback" not in r.stderr and r.stderr.strip().endswith("codes 0 141 0"), r.stderr


def test_a_table_cut_short_by_its_reader_exits_141(env, tmp_path):
    """rich's own handler of a broken pipe exits 1 without a word: a table on stdout ends like
    any other output (`| true` has gone before dis, a second later, writes)."""
    for command, plugin in ((f"clean-tags show {env.cache} i0", "clean-tags"),
                            ("plugins", "plugins")):
        r = _shell(f"{DIS} {command} | true; echo \"codes ${{PIPESTATUS[*]}}\" >&2",
                   DIS_LOAD_PLUGINS=plugin)
        assert r.stderr.strip() == "codes 141 0", (command, r.stderr)


def test_stderr_closed_keeps_the_exit_codes(env, tmp_path):
    """`2>&-`: the error line has nowhere to go, but the exit code still says what happened."""
    r = _shell(f"{DIS} infer {tmp_path / 'nope.png'} -c {env.ckpt} -o {tmp_path / 'o'} "
               f"--device cpu -q 2>&-; echo \"code $?\"", DIS_LOAD_PLUGINS="infer")
    assert r.stdout.strip().endswith("code 3"), r.stdout
    r = _shell(f"{DIS} plugins 2>&- >/dev/null; echo \"code $?\"")
    assert r.stdout.strip().endswith("code 0"), r.stdout


def test_file_names_dis_cannot_store_or_would_misread(env, tmp_path, capfd, monkeypatch):
    from discli.data.idw import make_ids

    assert make_ids(["-x.jpg", "sub/.y.jpg"]) == ["x", "y"]  # no option-like or hidden ids
    images, masks = tmp_path / "i", tmp_path / "m"
    png(images / os.fsdecode(b"bad\xff.png"))
    write_palette_png(masks / os.fsdecode(b"bad\xff.png"), np.zeros((32, 40), np.uint8))
    code, _, err = run_main(capfd, ["prepare-folder", str(images), str(masks), "--classes",
                                    ",".join(CLASSES), "-o", str(tmp_path / "m.jsonl")], None,
                            monkeypatch)
    assert code == 3 and "is not valid UTF-8" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "m.jsonl").exists()


def test_an_input_file_name_that_is_not_utf8_is_refused_by_infer(env, tmp_path, capfd,
                                                                   monkeypatch):
    png(tmp_path / "i" / os.fsdecode(b"x\xff.png"))
    code, stdout, err = run_main(capfd, infer(env, str(tmp_path / "i"), extra=(
        "--probs", str(tmp_path / "p.h5"))), None, monkeypatch)
    assert code == 3 and "is not valid UTF-8" in err and len(err.strip().splitlines()) == 1, err
    assert not stdout and not (tmp_path / "p.h5").exists()


def test_a_size_limit_in_the_environment_is_checked_when_used(env, capfd, monkeypatch):
    """A bad DIS_MAX_IMAGE_PIXELS used to fail on import, taking every plugin (and command)
    with it, without naming the variable."""
    monkeypatch.setenv("DIS_MAX_IMAGE_PIXELS", "1e9")
    code, _, err = run_main(capfd, infer(env, str(env.img)), None, monkeypatch)
    assert code == 2 and err.strip() == ("dis: error: environment variable DIS_MAX_IMAGE_PIXELS: "
                                         "expected a positive whole number, got '1e9'"), err
    monkeypatch.setenv("DIS_MAX_IMAGE_PIXELS", "100")  # a valid one applies
    code, _, err = run_main(capfd, infer(env, str(env.img)), None, monkeypatch)
    assert code == 3 and "more than the limit of 100" in err, err


def test_the_largest_seed_trains(env, tmp_path, capfd, monkeypatch):
    """Every seed the config accepts (up to 2**64 - 1) seeds the batch order: the mixed seeds
    overflowed torch's 64-bit generator seed before."""
    code, _, err = run_main(capfd, ["pretrain", *train_args(env, tmp_path / "o"), "--set",
                                    f"seed={2**64 - 1}"], None, monkeypatch)
    assert code == 0 and (tmp_path / "o" / "pretrain" / "final.pth").is_file(), err


def test_a_plugin_module_that_exits_or_prints_on_import(tmp_path, monkeypatch, capsys):
    from importlib import metadata

    from discli.entrypoints import PluginLoadError, load_entry_point

    (tmp_path / "exits.py").write_text("import sys\nsys.exit(0)\n")
    (tmp_path / "prints.py").write_text("print('noise')\ndef cmd(): pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(PluginLoadError, match="exited while loading"):
        load_entry_point(metadata.EntryPoint("x", "exits:cmd", "dis.commands"))
    assert callable(load_entry_point(metadata.EntryPoint("y", "prints:cmd", "dis.commands")))
    out, err = capsys.readouterr()
    assert out == "" and "noise" in err  # stdout carries the commands' data


@pytest.mark.parametrize("factory, needle", [
    (lambda weights=None: 1 / 0, "failed to build: ZeroDivisionError"),
    (lambda weights=None: None, "returned NoneType, not a backbone"),
])
def test_a_backbone_plugin_that_fails_is_named(factory, needle, monkeypatch):
    from discli.errors import PluginError
    from discli.model.backbones import BACKBONES, build_backbone

    monkeypatch.setitem(BACKBONES._factories, "broken", factory)
    monkeypatch.setitem(BACKBONES._packages, "broken", "broken-pkg")
    with pytest.raises(PluginError, match=f"backbone 'broken' of the plugin package broken-pkg "
                                          f".*{needle}"):
        build_backbone("broken")


def test_a_full_disk_when_taking_the_lock_is_left_to_the_outputs(tmp_path, monkeypatch):
    """The pid in a lock file only informs a second process: a full disk there must not end
    the command with a message that names no file (its first output names its own path)."""
    import errno

    from discli.storage import lock

    def full(fd, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(lock.os, "write", full)
    with lock.lock_folder(tmp_path / "out") as path:
        assert path.exists()


def test_plot_keeps_matplotlibs_warnings_off_stderr(tmp_path, capfd, monkeypatch):
    """A log of E-step records only draws an empty legend: matplotlib warned on stderr (two
    lines with its source line), which is dis's."""
    (tmp_path / "run" / "finetune").mkdir(parents=True)
    (tmp_path / "run" / "finetune" / "log.jsonl").write_text(
        '{"stage": "finetune", "phase": "estep", "round": 1, "t_tr": 2}\n')
    code, out, err = run_main(capfd, ["plot", str(tmp_path / "run"), "-o",
                                      str(tmp_path / "p.png")], None, monkeypatch)
    assert code == 0 and err == "" and out.strip() == str(tmp_path / "p.png"), err


def test_helper_files_of_a_long_output_name_fit_the_file_system(tmp_path):
    from discli.storage.atomic import atomic_write, temp_path
    from discli.storage.lock import file_lock_path, lock_file

    target = tmp_path / ("C" * 247 + ".h5")  # 250 bytes: a valid name
    assert len(temp_path(target).name.encode()) <= 255
    assert len(file_lock_path(target).name.encode()) <= 255
    assert temp_path(target) != temp_path(tmp_path / ("C" * 246 + "D.h5"))  # still unique
    with lock_file(target):
        atomic_write(target, lambda f: f.write(b"data"))
    assert target.read_bytes() == b"data"


def test_what_dis_may_not_read_is_refused_not_skipped(env, tmp_path, capfd, monkeypatch):
    import errno

    from discli.data import fileio, images

    (tmp_path / "imgs" / "locked").mkdir(parents=True)
    png(tmp_path / "imgs" / "ok.png")
    real_walk = os.walk

    def walk(top, onerror=None, **kwargs):  # as os.walk finds a folder it may not list
        yield from real_walk(top, onerror=onerror, **kwargs)
        onerror(PermissionError(errno.EACCES, "Permission denied",
                                str(tmp_path / "imgs" / "locked")))

    monkeypatch.setattr(fileio.os, "walk", walk)
    code, _, err = run_main(capfd, infer(env, str(tmp_path / "imgs"),
                                         extra=["-o", str(tmp_path / "o")]), None, monkeypatch)
    assert code == 6 and "locked: permission denied" in err, err
    monkeypatch.setattr(fileio.os, "walk", real_walk)

    def unreadable(path, *args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    monkeypatch.setattr(images.Image, "open", unreadable)
    code, _, err = run_main(capfd, infer(env, str(tmp_path / "imgs" / "ok.png"),
                                         extra=["-o", str(tmp_path / "o2")]), None, monkeypatch)
    assert code == 6 and "ok.png: permission denied" in err, err


def test_stdin_closed_gives_no_input_images(env):
    r = _shell(f"{DIS} infer - -c {env.ckpt} --device cpu --json <&-", DIS_LOAD_PLUGINS="infer")
    assert r.returncode == 3 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.startswith("dis: error: <stdin>: no input images"), r.stderr


# ----------------------------------------------------------------------------- properties


@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=400) | st.lists(
    st.sampled_from([b'{"format": "dis-manifest", "version": 1, "root": ".", "classes": '
                     b'["background", "cat"]}', b'{"id": "a", "image": "a.png"}', b"{",
                     b'{"id": "a", "image": "../a.png"}', b'{"id": "..", "image": "a"}',
                     b'{"id": "b", "image": "/abs.png", "tags": ["cat", "cat"]}', b"",
                     b'{"id": "c", "image": "x", "labelmap": 3}', b"\xff\xfe", b"null",
                     b'{"id": "d", "image": "d", "tags": "cat"}', b"[]", b'"str"']),
    max_size=6).map(b"\n".join))
def test_manifest_reader_never_crashes(tmp_path_factory, data):
    """Any bytes: a Manifest or one-line BadInputError naming the file, nothing else; an
    accepted record never points outside its root and its id is a safe file name."""
    from discli.data.manifest import read_manifest
    from discli.errors import BadInputError

    path = tmp_path_factory.mktemp("fuzz") / "m.jsonl"
    path.write_bytes(data)
    try:
        m = read_manifest(path)
    except BadInputError as exc:
        assert str(exc).startswith(str(path)) and "\n" not in str(exc)
        return
    for rec in m.records:
        assert "/" not in rec.id and not rec.id.startswith(".")
        for rel in (rec.image, rec.labelmap):
            if rel is not None and not os.path.isabs(rel):
                resolved = os.path.normpath(m.root / rel)
                assert resolved.startswith(str(m.root))


SEPARATORS = st.sampled_from([" ", ", ", "! ", " - ", "\n", "... ", " (", ") ", "; "])


@settings(max_examples=200, deadline=None)
@given(words=st.lists(st.sampled_from(["cat", "dog", "cats", "person", "people", "motor", "bike",
                                       "hot", "dog", "the", "a", "on", "sofa", "tv", "monitor",
                                       "dining", "table", "car", "aeroplane", "zzz"]),
                      max_size=10), seps=st.lists(SEPARATORS, min_size=10, max_size=10),
       upper=st.booleans())
def test_caption_parser_ignores_case_and_punctuation(words, seps, upper):
    """Tags depend on the words only, not on case or the punctuation between them."""
    from discli.data.captions import parse_caption

    plain = " ".join(words)
    fancy = "".join(w + s for w, s in zip(words, seps))
    assert parse_caption(fancy.upper() if upper else fancy) == parse_caption(plain)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(raw=st.binary(max_size=200))
def test_caption_file_bytes_are_text_or_a_clear_error(tmp_path_factory, raw):
    """Caption bytes that are not UTF-8 are refused with the file and line, never a crash."""
    from discli.data.fileio import decode_utf8
    from discli.errors import BadInputError

    try:
        text = decode_utf8(raw, "caps.txt", 3)
    except BadInputError as exc:
        assert str(exc).startswith("caps.txt: line 3: not UTF-8")
        return
    from discli.data.captions import parse_caption
    from discli.data.voc import VOC_CLASSES

    assert set(parse_caption(text)) <= set(VOC_CLASSES[1:])
