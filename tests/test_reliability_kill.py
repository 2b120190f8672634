"""Kill anywhere, lose nothing: `dis pretrain`, `dis finetune` and `dis infer` as real processes,
SIGKILLed at several moments (during a checkpoint, cache-part or output write among them), then
re-run with the same command until done, against an uninterrupted run of the same command:

- pretrain / finetune: the final weights (and every intermediate step file) equal the
  uninterrupted run's bit for bit (CPU), the cache has exactly one complete entry per image;
- infer: every output exists, opens, has its image's size and equals the uninterrupted run's;
- while a run is stopped (SIGSTOP) holding its folder, a second identical command is refused
  with exit code 5 (the lock), and nothing of the first run is damaged.

Kill moments are chosen by polling the run folder for a file to appear (a ``.tmp<pid>`` file
means a write is in progress) plus seeded random delays, so the suite is reproducible in what
it tries, if not in the exact instruction it interrupts.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from factories import make_split
from PIL import Image

from discli.infer.checkpoint import load_checkpoint

DIS = shutil.which("dis") or str(Path(sys.executable).with_name("dis"))
pytestmark = pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs POSIX signals")

RNG = random.Random(8)


def env_for(command: str) -> dict[str, str]:
    # one intra-op thread everywhere: the same float summation order in every run
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
            "DIS_LOAD_PLUGINS": command}


def start(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([DIS, *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env_for(args[0]))


def finish(args: list[str]) -> subprocess.CompletedProcess:
    r = subprocess.run([DIS, *map(str, args)], capture_output=True, text=True, timeout=300,
                       env=env_for(args[0]))
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def temps(folder: Path, prefix: str = "") -> list[Path]:
    return [p for p in folder.glob(f".{prefix}*.tmp*")] if folder.is_dir() else []


def holds(lock: Path, proc: subprocess.Popen) -> bool:
    """Whether ``proc`` holds the lock file ``lock`` (the holder writes its pid there)."""
    try:
        return lock.read_text().strip() == str(proc.pid)
    except OSError:
        return False


Ready = Callable[[subprocess.Popen], bool]


def wait_for(proc: subprocess.Popen, ready: Ready, timeout: float = 120) -> bool:
    """Poll (tightly) until ``ready(proc)``; False when the process ended first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ready(proc):
            return True
        if proc.poll() is not None:
            return ready(proc)
        time.sleep(0.0003)
    raise AssertionError("timed out waiting for the run to reach the kill point")


def kill(proc: subprocess.Popen) -> bool:
    """SIGKILL; True when the process was still running (a real interruption)."""
    alive = proc.poll() is None
    if alive:
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    proc.stdout.close()
    proc.stderr.close()
    return alive


def kill_when(args: list[str], lock: Path, ready: Callable[[], bool],
              delay: float = 0.0) -> bool:
    """Start a run; SIGKILL it once it holds ``lock`` and ``ready()`` (+ ``delay`` seconds)."""
    proc = start(args)
    wait_for(proc, lambda p: holds(lock, p) and ready())
    if delay:
        time.sleep(delay)
    return kill(proc)


def assert_refused_while_stopped(args: list[str], lock: Path, ready: Callable[[], bool],
                                 second: list[str] | None = None) -> None:
    """Start a run, SIGSTOP it once it holds ``lock`` and ``ready()``, check that a second
    process on the same output is refused (exit 5), then SIGKILL the stopped run."""
    proc = start(args)
    try:
        assert wait_for(proc, lambda p: holds(lock, p) and ready()), "ended before the check"
        os.kill(proc.pid, signal.SIGSTOP)
        r = subprocess.run([DIS, *map(str, second or args)], capture_output=True, text=True,
                           timeout=300, env=env_for((second or args)[0]))
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 5, r.stderr[-2000:]
        assert len(lines) == 1 and "Traceback" not in r.stderr
        assert f"another dis process (pid {proc.pid}) is writing here" in lines[0], lines[0]
    finally:
        kill(proc)


def same_weights(a: Path, b: Path) -> None:
    wa, wb = load_checkpoint(a)["model"], load_checkpoint(b)["model"]
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.equal(wa[key], wb[key]), f"{a.name}: {key} differs"


def no_leftovers(folder: Path) -> None:
    left = [p for p in folder.rglob("*") if ".tmp" in p.name or p.name.endswith(".parts")]
    assert not left, left


# ----------------------------------------------------------------------------- data


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("kill-data")
    return {"root": root, "labelled": make_split(root, "train", 6, 0, True),
            "tagged": make_split(root, "web", 6, 1, False, tag_source="caption")}


def pretrain_args(data, out: Path) -> list[str]:
    return ["pretrain", "--labelled", data["labelled"], "--out", out, "--backbone", "tiny",
            "--batch-size", "4", "--crop-size", "32", "--device", "cpu", "--quiet",
            "--iters", "8", "--iters", "4", "--iters", "8", "--set", "channels=16",
            "--set", "ckpt_every=1", "--set", "log_every=1"]


@pytest.fixture(scope="module")
def pretrained(data, tmp_path_factory) -> Path:
    """The uninterrupted pretrain run (also the --init of the finetune runs)."""
    out = tmp_path_factory.mktemp("pretrain-ref")
    finish(pretrain_args(data, out))
    return out / "pretrain"


# ----------------------------------------------------------------------------- pretrain


def test_pretrain_killed_anywhere_resumes_bit_identically(data, pretrained, tmp_path):
    args = pretrain_args(data, tmp_path)
    folder = tmp_path / "pretrain"
    lock = folder / ".dis.lock"
    interrupted = 0
    # 1. during a checkpoint write (the temporary file of last.pth exists)
    interrupted += kill_when(args, lock, lambda: bool(temps(folder, "last.pth")))
    torn = temps(folder, "last.pth")  # almost always: the kill landed inside the write
    # 2. a second run while this one holds the folder: refused, not interleaved
    assert_refused_while_stopped(args, lock, lambda: (folder / "last.pth").exists())
    # 3. at random moments of steps 2 and 3 (around the copies of step files, too)
    interrupted += kill_when(args, lock, lambda: (folder / "step1.pth").exists(),
                             RNG.uniform(0, .4))
    interrupted += kill_when(args, lock, lambda: bool(temps(folder)), RNG.uniform(0, .05))
    assert interrupted >= 2, "most kills should interrupt a running process"
    finish(args)
    for name in ("step1.pth", "step2.pth", "final.pth"):
        same_weights(pretrained / name, folder / name)
    no_leftovers(tmp_path)
    assert not any(p.exists() for p in torn)  # torn writes of killed runs are cleaned up
    # the log holds each iteration once, in order, despite the kills
    import json

    log = [json.loads(line) for line in (folder / "log.jsonl").read_text().splitlines()]
    iters = [(r["phase"], r["iter"]) for r in log]
    assert len(iters) == len(set(iters)) == 8 + 4 + 8


def test_killed_between_last_checkpoint_and_step_copy(data, pretrained, tmp_path):
    """The window the kill tests may miss, made exact: step 3 finished (last.pth says done)
    but final.pth was never copied; the re-run must produce it, not skip it."""
    from discli.train.keys import TrainConfig
    from discli.train.pretrain import pretrain

    folder = tmp_path / "pretrain"
    shutil.copytree(pretrained, folder)
    (folder / "final.pth").unlink()
    cfg = TrainConfig(labelled=str(data["labelled"]), out=str(tmp_path), channels=16,
                      batch_size=4, crop_size=32, iters_step1=8, iters_step2=4, iters_step3=8,
                      device="cpu")
    summary = pretrain(cfg)
    assert summary["steps"] == {1: "already done", 2: "already done", 3: "already done"}
    assert summary["checkpoint"].endswith("final.pth")
    assert (folder / "final.pth").read_bytes() == (folder / "last.pth").read_bytes()


# ----------------------------------------------------------------------------- finetune


def finetune_args(data, out: Path, init: Path) -> list[str]:
    return ["finetune", "--labelled", data["labelled"], "--tagged", data["tagged"],
            "--out", out, "--init", init, "--backbone", "tiny", "--batch-size", "4",
            "--crop-size", "32", "--device", "cpu", "--quiet", "--t-tr", "3", "--rounds", "1",
            "--mstep-iters", "8", "--set", "channels=16", "--set", "ckpt_every=1",
            "--set", "estep_batch_size=1", "--set", "estep_part_images=1"]


def check_cache(path: Path, manifest_ids: list[str], sizes: dict[str, tuple[int, int]]) -> None:
    with h5py.File(path, "r") as h5:
        groups = list(h5["entries"].values())
        assert sorted(str(g.attrs["id"]) for g in groups) == sorted(manifest_ids)
        for g in groups:
            h, w = sizes[str(g.attrs["id"])]
            assert set(g.keys()) == {"labelmap", "confidence", "tag_probs", "noisy_tags"}
            assert g["labelmap"].shape == (h, w) and g["labelmap"].dtype == np.uint8
            assert g["confidence"].shape == (h, w) and g["confidence"].dtype == np.float16
            assert g["tag_probs"].shape == (4,) and g["noisy_tags"].shape == (4,)


def test_finetune_estep_and_mstep_killed_anywhere(data, pretrained, tmp_path):
    init = pretrained / "final.pth"
    ref = tmp_path / "ref"
    finish(finetune_args(data, ref, init))
    out = tmp_path / "run"
    args = finetune_args(data, out, init)
    rdir = out / "finetune" / "round-1"
    parts = rdir / "cache.parts"
    lock, cache_lock = out / "finetune" / ".dis.lock", rdir / ".cache.h5.lock"
    # 1. E-step: during the write of a cache part
    kill_when(args, cache_lock, lambda: bool(temps(parts, "part-")))
    # 2. a second E-step writer of the same cache, while this one holds it: refused
    n_parts = lambda: len(list(parts.glob("part-*.h5"))) if parts.is_dir() else 0  # noqa: E731
    first = n_parts()
    assert_refused_while_stopped(
        args, cache_lock, lambda: n_parts() > first,
        ["clean-tags", "run", data["tagged"], "-c", init, "-o", rdir / "cache.h5",
         "--t-tr", "3", "--device", "cpu", "-q"])
    assert n_parts() >= 1 and not (rdir / "cache.h5").exists(), "the E-step should resume"
    # 3. M-step: during a checkpoint write, then at a random later moment
    kill_when(args, lock, lambda: bool(temps(rdir, "last.pth")))
    kill_when(args, lock, lambda: (rdir / "last.pth").exists(), RNG.uniform(0, .3))
    finish(args)
    from discli.data.manifest import read_manifest

    tagged = read_manifest(data["tagged"])
    sizes = {r.id: tuple(np.asarray(Image.open(tagged.image_path(r))).shape[:2])
             for r in tagged.records}
    check_cache(rdir / "cache.h5", [r.id for r in tagged.records], sizes)
    ref_cache, cache = ref / "finetune/round-1/cache.h5", rdir / "cache.h5"
    with h5py.File(ref_cache, "r") as a, h5py.File(cache, "r") as b:
        for key in a["entries"]:
            for name in ("labelmap", "confidence", "tag_probs", "noisy_tags"):
                assert np.array_equal(a["entries"][key][name][()], b["entries"][key][name][()])
    same_weights(ref / "finetune/round-1/model.pth", rdir / "model.pth")
    same_weights(ref / "finetune/final.pth", out / "finetune/final.pth")
    no_leftovers(out)
    assert not (rdir / "last.pth").exists()


# ----------------------------------------------------------------------------- infer


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("kill-images")
    rng = np.random.default_rng(5)
    for i in range(14):
        h, w = (40, 48) if i % 2 else (36, 30)
        folder = root / ("sub" if i % 5 == 0 else "")
        folder.mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(
            folder / f"im{i:02d}.png")
    return root


def infer_args(images: Path, ckpt: Path, out: Path, probs: Path) -> list[str]:
    return ["infer", images, "-c", ckpt, "-o", out, "--probs", probs, "--t-ts", "3",
            "-b", "1", "--overlay", "--device", "cpu", "-q"]


def test_infer_killed_anywhere_completes_every_output(pretrained, images, tmp_path):
    ckpt = pretrained / "final.pth"
    ref, ref_probs = tmp_path / "ref", tmp_path / "ref.h5"
    finish(infer_args(images, ckpt, ref, ref_probs))
    out, probs = tmp_path / "out", tmp_path / "probs.h5"
    args = infer_args(images, ckpt, out, probs)
    lock, probs_parts = out / ".dis.lock", tmp_path / ".probs.h5.parts"
    outputs = lambda: list(out.rglob("im*.png")) if out.is_dir() else []  # noqa: E731
    # 1. during the write of an output image
    kill_when(args, lock, lambda: bool(list(out.rglob(".im*.tmp*"))))
    # 2. a second writer of the same folder, and of the same probabilities file: refused
    n = len(outputs())
    assert_refused_while_stopped(args, lock, lambda: len(outputs()) >= n + 2)
    assert_refused_while_stopped(args, lock, lambda: len(outputs()) >= n + 4,
                                 infer_args(images, ckpt, tmp_path / "other", probs))
    # 3. at a random moment after a part of the probabilities was written
    kill_when(args, lock, lambda: bool(list(probs_parts.glob("part-*"))
                                       if probs_parts.is_dir() else False), RNG.uniform(0, .3))
    finish(args)
    names = sorted(p.relative_to(images).with_suffix("").as_posix()
                   for p in images.rglob("*.png"))
    for name in names:
        with Image.open(images / f"{name}.png") as im:
            size = im.size
        for suffix in (".png", "_color.png", "_overlay.jpg"):
            with Image.open(out / f"{name}{suffix}") as im:
                im.load()  # a truncated file fails here
                assert im.size == size, (name, suffix)
            if suffix != "_overlay.jpg":
                assert np.array_equal(np.asarray(Image.open(out / f"{name}{suffix}")),
                                      np.asarray(Image.open(ref / f"{name}{suffix}")))
    with h5py.File(probs, "r") as a, h5py.File(ref_probs, "r") as b:
        assert sorted(str(g.attrs["id"]) for g in a["entries"].values()) == names
        for key in b["entries"]:
            assert np.array_equal(a["entries"][key]["probs"][()], b["entries"][key]["probs"][()])
    no_leftovers(tmp_path)
