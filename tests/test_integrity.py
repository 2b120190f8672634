"""Stored state is verified before it is trusted; faults of the machine or of a peer are named.

- a checkpoint or cache entry with one flipped bit is refused (exit 4, one line naming the file),
  while a checkpoint written without a digest still loads;
- re-running a finished pretrain / finetune whose final.pth was truncated rebuilds it from the
  run's good copy; a corrupt last.pth resumes from the last finished step;
- a truncated cache part is removed with a warning naming it, and its images are redone;
- SIGTERM during training saves a checkpoint at the iteration boundary and exits 143 with one
  line saying what was kept; a collective broken by a dead torchrun peer is exit 8;
- images with an EXIF orientation tag and a labelmap are named in one warning per dataset.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

from discli.pseudo.cache import CacheEntry, CacheWriter, PseudoCache, make_attrs
from discli.infer.checkpoint import load_checkpoint, save_checkpoint
from discli.errors import CorruptError, DisWarning, peer_failure
from discli.data.labelmap import write_palette_png
from discli.data.manifest import Manifest, Record, write_manifest
from factories import CLASSES, make_split, one_thread, save_tiny, tiny_model  # noqa: F401

DIS = shutil.which("dis") or str(Path(sys.executable).with_name("dis"))


def cli(capsys, *args: str) -> tuple[int, str]:
    """`dis ARGS` in this process; returns (exit code, stderr)."""
    from discli.cli.app import main

    capsys.readouterr()
    code = main([str(a) for a in args])
    return code, capsys.readouterr().err


def flip_bit(path: Path, offset: int, bit: int = 3) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 1 << bit
    path.write_bytes(bytes(data))


def weight_offset(path: Path) -> int:
    """Where, in a checkpoint's file, the middle of its largest weight lies."""
    tensor = max(torch.load(path, weights_only=True)["model"].values(), key=torch.numel)
    raw = tensor.contiguous().view(-1).numpy().tobytes()
    offset = path.read_bytes().find(raw)
    assert offset > 0
    return offset + len(raw) // 2


def one_error_line(err: str, path: Path) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dis: error: "), err
    assert str(path) in lines[0], lines[0]
    return lines[0]


# ----------------------------------------------------------------------------- checkpoints


def test_bit_flipped_checkpoint_is_refused(tmp_path, capsys):
    ckpt = save_tiny(tmp_path / "tiny.pth", tiny_model())
    flip_bit(ckpt, weight_offset(ckpt))
    with pytest.raises(CorruptError, match="does not match the digest"):
        load_checkpoint(ckpt)
    Image.new("RGB", (24, 24), (90, 120, 30)).save(tmp_path / "im.png")
    code, err = cli(capsys, "infer", tmp_path / "im.png", "-c", ckpt, "-o", tmp_path / "out",
                    "--device", "cpu", "-q")
    assert code == 4, err
    assert "corrupt" in one_error_line(err, ckpt)
    assert not (tmp_path / "out" / "im.png").exists()


def test_checkpoint_without_digest_still_loads(tmp_path):
    model = tiny_model()
    old = tmp_path / "old.pth"
    torch.save({"format": "dis-checkpoint", "format_version": 1, "model": model.state_dict(),
                "model_config": model.config.to_dict(), "classes": CLASSES}, old)
    state = load_checkpoint(old)
    assert all(torch.equal(state["model"][k], v) for k, v in model.state_dict().items())
    # and what save_checkpoint writes round-trips through its digest, which is not returned
    save_checkpoint(tmp_path / "new.pth", {**state, "digest": "stale"})
    assert "digest" not in load_checkpoint(tmp_path / "new.pth")
    with zipfile.ZipFile(tmp_path / "new.pth") as z:  # the digest is stored inside the file
        assert any(name.endswith("data.pkl") for name in z.namelist())


# ----------------------------------------------------------------------------- caches


def entry(i: int, rng: np.random.Generator) -> CacheEntry:
    return CacheEntry(f"im{i}", rng.integers(0, 3, (12, 10), dtype=np.uint8),
                      rng.random((12, 10)).astype(np.float16),
                      rng.random(3).astype(np.float32), np.array([1, 1, 0], np.uint8))


def test_bit_flipped_cache_entry_is_refused(tmp_path, capsys):
    rng = np.random.default_rng(0)
    writer = CacheWriter(tmp_path / "cache.h5", make_attrs(CLASSES, 0, "h", {}))
    writer.write([entry(i, rng) for i in range(3)])
    path = writer.merge()
    with h5py.File(path, "r") as h5:  # tag_probs is stored raw: a flip there reads back silently
        offset = h5["entries/im1/tag_probs"].id.get_offset()
    flip_bit(path, offset + 2, bit=6)
    cache = PseudoCache(path)
    cache.get("im0")  # the other entries stay readable
    with pytest.raises(CorruptError, match="'im1' does not match the digest"):
        cache.get("im1")
    cache.close()
    code, err = cli(capsys, "clean-tags", "show", path, "im1")
    assert code == 4, err
    assert "im1" in one_error_line(err, path)


def test_truncated_part_is_removed_and_redone(tmp_path):
    rng = np.random.default_rng(1)
    attrs = make_attrs(CLASSES, 0, "h", {})
    writer = CacheWriter(tmp_path / "cache.h5", attrs)
    writer.write([entry(0, rng), entry(1, rng)])
    writer.write([entry(2, rng)])
    first, second = writer.parts()
    first.write_bytes(first.read_bytes()[:first.stat().st_size // 2])
    with pytest.warns(DisWarning, match="part file does not read back") as caught:
        writer = CacheWriter(tmp_path / "cache.h5", attrs)  # the resumed E-step's writer
    assert str(first) in str(caught[0].message)
    assert not first.exists() and writer.parts() == [second]
    assert writer.done_ids() == {"im2"}
    writer.write([entry(0, rng), entry(1, rng)])
    cache = PseudoCache(writer.merge(expected_ids=["im0", "im1", "im2"]))
    assert sorted(cache.ids()) == ["im0", "im1", "im2"]


# ----------------------------------------------------------------------------- finished runs


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("integrity-data")
    return {"labelled": make_split(root, "train", 4, 0, True),
            "tagged": make_split(root, "web", 3, 1, False, tag_source="caption")}


def config(data, out: Path, **more):
    from discli.train.keys import TrainConfig

    return TrainConfig(labelled=str(data["labelled"]), tagged=str(data["tagged"]), out=str(out),
                       channels=8, batch_size=2, crop_size=24, iters_step1=2, iters_step2=1,
                       iters_step3=2, mstep_iters=2, rounds=1, t_tr=1, device="cpu", **more)


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:path.stat().st_size * 2 // 3])


def test_finished_runs_verify_and_rebuild_their_outputs(data, tmp_path):
    from discli.train.finetune import finetune
    from discli.train.pretrain import pretrain

    cfg = config(data, tmp_path)
    pretrain(cfg)
    folder = tmp_path / "pretrain"
    good = (folder / "final.pth").read_bytes()
    truncate(folder / "final.pth")
    with pytest.warns(DisWarning, match="final.pth: does not match last.pth"):
        summary = pretrain(cfg)
    assert set(summary["steps"].values()) == {"already done"}
    assert (folder / "final.pth").read_bytes() == good

    # a corrupt last.pth: continue from the last finished step's file
    flip_bit(folder / "last.pth", weight_offset(folder / "last.pth"))
    with pytest.warns(DisWarning, match="continuing from final.pth"):
        pretrain(cfg)
    assert (folder / "last.pth").read_bytes() == good

    finetune(cfg)
    ft = tmp_path / "finetune"
    model = ft / "round-1" / "model.pth"
    good = model.read_bytes()
    truncate(ft / "final.pth")
    with pytest.warns(DisWarning, match="final.pth: does not match"):
        summary = finetune(cfg)
    assert summary["rounds"] == {1: "already done"} and summary["checkpoint"].endswith("final.pth")
    assert (ft / "final.pth").read_bytes() == good
    truncate(model)  # the round's model: final.pth holds the same round
    with pytest.warns(DisWarning, match="rebuilt it from"):
        finetune(cfg)
    assert model.read_bytes() == good
    truncate(model)
    truncate(ft / "final.pth")  # both broken: say exactly what to delete
    with pytest.raises(CorruptError, match="delete it and .*final.pth, then rerun"):
        finetune(cfg)


# ----------------------------------------------------------------------------- signals, peers


@pytest.mark.skipif(not hasattr(signal, "SIGTERM"), reason="needs POSIX signals")
def test_sigterm_during_pretrain_keeps_a_checkpoint(data, tmp_path):
    out = tmp_path / "run"
    log = out / "pretrain" / "log.jsonl"
    args = [DIS, "pretrain", "--labelled", str(data["labelled"]), "--out", str(out),
            "--backbone", "tiny", "--batch-size", "2", "--crop-size", "24", "--device", "cpu",
            "--quiet", "--iters", "100000,1,1", "--set", "channels=8", "--set", "log_every=1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DIS_LOAD_PLUGINS": "pretrain"}
    proc = subprocess.Popen(args, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
                            env=env)
    deadline = time.monotonic() + 120
    while not (log.exists() and log.read_text().count("\n") >= 3):
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    err = proc.communicate(timeout=60)[1]
    assert proc.returncode == 143, err
    line = one_error_line(err, out / "pretrain" / "last.pth")
    assert line.startswith("dis: error: terminated (SIGTERM): kept "), line
    kept = load_checkpoint(out / "pretrain" / "last.pth")  # no ckpt_every came: the signal's
    assert f"pretrain step1 iteration {kept['iteration']} of 100000" in line
    assert kept["iteration"] >= 3 and not kept["done"]


def test_dead_peer_is_named_with_its_own_exit_code(capsys, monkeypatch):
    import typer

    import discli.cli.app as app

    failures = {
        "gloo": RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Read error "
                             "[127.0.0.1]:29500: Connection reset by peer"),
        "backend": torch.distributed.DistBackendError("NCCL communicator was aborted"),
        "bug": RuntimeError("shape mismatch"),
    }

    def build():
        group = typer.Typer()
        for name, exc in failures.items():
            group.command(name)(lambda exc=exc: (_ for _ in ()).throw(exc))
        return group

    monkeypatch.setattr(app, "build_app", build)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    for name in ("gloo", "backend"):
        code, err = cli(capsys, name)
        assert code == 8, err
        lines = err.strip().splitlines()
        assert len(lines) == 1 and "rank 1 of 2: a peer process" in lines[0], err
        assert "rerun the same command to resume" in lines[0]
    code, err = cli(capsys, "bug")
    assert code == 1 and "internal error" in err
    monkeypatch.setenv("WORLD_SIZE", "1")  # no peers: the same words are a bug
    assert peer_failure(failures["gloo"], 0, 1) is None


# ----------------------------------------------------------------------------- EXIF


def test_exif_rotated_images_with_labelmaps_are_named_once(tmp_path):
    from discli.data.dataset import SegDataset

    records = []
    for i in range(3):
        exif = Image.Exif()
        if i:
            exif[0x0112] = 6  # rotate 90 degrees when shown
        Image.new("RGB", (16, 16), (200, 30, 30)).save(tmp_path / f"im{i}.jpg", exif=exif)
        write_palette_png(tmp_path / f"im{i}.png", np.zeros((16, 16), np.uint8))
        records.append(Record(id=f"im{i}", image=f"im{i}.jpg", labelmap=f"im{i}.png", tags=[]))
    records.append(Record(id="tagged", image="im1.jpg", labelmap=None, tags=["cat"]))
    write_manifest(tmp_path / "m.jsonl", Manifest(CLASSES, records, tmp_path))
    from discli.data.manifest import read_manifest

    manifest = read_manifest(tmp_path / "m.jsonl")
    with pytest.warns(DisWarning) as caught:
        SegDataset(manifest)
    assert len(caught) == 1
    message = str(caught[0].message)
    assert "2 image(s) with a labelmap carry an EXIF orientation tag" in message
    assert f"(first: {tmp_path / 'im1.jpg'})" in message
    with _no_warning():
        SegDataset(manifest, use_labelmaps=False)


class _no_warning:
    def __enter__(self):
        import warnings

        self._catch = warnings.catch_warnings(record=True)
        self.caught = self._catch.__enter__()
        warnings.simplefilter("always")
        return self

    def __exit__(self, *exc):
        self._catch.__exit__(*exc)
        assert not [w for w in self.caught if issubclass(w.category, DisWarning)]


def _rank_pids(parent: int) -> dict[int, int]:
    """rank -> pid of the torchrun workers under ``parent`` (read from their environments)."""
    ranks = {}
    for child in Path("/proc").glob("[0-9]*"):
        try:
            stat = (child / "stat").read_text().rsplit(")", 1)[1].split()
            if int(stat[1]) != parent:
                continue
            env = dict(kv.split("=", 1) for kv in
                       (child / "environ").read_bytes().decode(errors="replace").split("\0")
                       if "=" in kv)
        except (OSError, ValueError, IndexError):
            continue
        if "RANK" in env:
            ranks[int(env["RANK"])] = int(child.name)
    return ranks


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="needs Linux /proc")
def test_killed_ddp_worker_ends_the_job_with_a_named_fault(tmp_path):
    """A real 2-process gloo pretrain whose rank 1 is SIGKILLed: the surviving rank ends with
    one documented `dis: error:` line (the broken process group, exit 8, or torchrun's SIGTERM,
    exit 143), never an internal error."""
    import socket

    labelled = make_split(tmp_path, "train", 4, 0, True)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    args = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
            "--master-addr", "127.0.0.1", "--master-port", str(port), "-m", "discli", "pretrain",
            "--labelled", str(labelled), "--out", str(tmp_path / "run"), "--backbone", "tiny",
            "--batch-size", "2", "--crop-size", "32", "--device", "cpu", "--quiet",
            "--set", "channels=8", "--set", "iters_step1=100000", "--set", "ckpt_every=5"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DIS_LOAD_PLUGINS": "pretrain"}
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, cwd=tmp_path)
    try:
        deadline = time.monotonic() + 120
        while not (tmp_path / "run" / "pretrain" / "last.pth").exists():  # training for real
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1]
            time.sleep(0.2)
        os.kill(_rank_pids(proc.pid)[1], signal.SIGKILL)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0
    assert "internal error" not in err, err[-3000:]
    ours = [line for line in err.splitlines() if line.startswith("dis: error:")]
    assert ours and ("peer process" in ours[0] or "terminated" in ours[0]), err[-3000:]
    print(ours[0])  # which of the two won the race, for the record (pytest -s)
