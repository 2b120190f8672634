"""Locks, leftovers of killed writes, and resumable outputs, in one process (fast).

The end-to-end versions (real processes, SIGKILL, SIGSTOP) are in test_reliability_kill.py.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from discli.errors import BusyError, IncompatibleError, UsageError
from discli.storage.lock import file_lock_path, folder_lock_path, lock_file, lock_folder
from discli.storage import make_folder, remove_stale_temps

HOLD = ("import sys, time\nfrom discli.storage.lock import lock_folder\n"
        "with lock_folder(sys.argv[1]):\n    print('held', flush=True)\n    time.sleep(120)\n")


def holder(folder: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_second_process_is_refused_and_a_killed_holder_leaves_no_lock(tmp_path):
    proc = holder(tmp_path / "out")
    try:
        with pytest.raises(BusyError, match=rf"another dis process \(pid {proc.pid}\) is "
                                            r"writing here") as info:
            with lock_folder(tmp_path / "out"):
                pass
        assert info.value.exit_code == 5 and str(tmp_path / "out") in str(info.value)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    with lock_folder(tmp_path / "out"):  # SIGKILL released it: no stale lock, no waiting
        assert (tmp_path / "out" / ".dis.lock").read_text() == str(os.getpid())


def test_lock_is_reentrant_in_one_process_and_released(tmp_path):
    with lock_folder(tmp_path):
        with lock_folder(tmp_path):  # a library function calling another one
            pass
        proc = subprocess.run([sys.executable, "-c", HOLD.replace("time.sleep(120)", "pass"),
                               str(tmp_path)], capture_output=True, text=True)
        assert proc.returncode != 0 and "BusyError" in proc.stderr  # still held here
    proc = subprocess.run([sys.executable, "-c", HOLD.replace("time.sleep(120)", "pass"),
                           str(tmp_path)], capture_output=True, text=True)
    assert proc.returncode == 0 and "held" in proc.stdout


def test_lock_names(tmp_path, monkeypatch):
    assert folder_lock_path(tmp_path) == tmp_path / ".dis.lock"
    assert file_lock_path(tmp_path / "cache.h5") == tmp_path / ".cache.h5.lock"
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    # torchrun ranks of one job lock different names: they never refuse each other
    assert folder_lock_path(tmp_path) == tmp_path / ".dis.lock.rank1"
    with lock_file(tmp_path / "cache.h5"):
        assert (tmp_path / ".cache.h5.lock.rank1").exists()


def test_output_folder_in_the_way(tmp_path):
    (tmp_path / "file").write_text("x")
    for bad in (tmp_path / "file", tmp_path / "file" / "sub"):
        with pytest.raises(UsageError, match="exists and is not a folder"):
            make_folder(bad)
    assert make_folder(tmp_path / "a" / "b").is_dir()


def test_stale_temporary_files_are_removed(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    torn = tmp_path / f".last.pth.tmp{dead.pid}"
    mine = tmp_path / f".x.png.tmp{os.getpid()}"
    other = tmp_path / ".notes.tmp"  # not ours: no pid
    for p in (torn, mine, other, tmp_path / "last.pth"):
        p.write_bytes(b"x")
    assert remove_stale_temps(tmp_path) == 1
    assert not torn.exists() and mine.exists() and other.exists()


def test_train_log_trim_keeps_other_rounds(tmp_path):
    from discli.train.engine import PhaseRun, _trim_log

    log = tmp_path / "log.jsonl"
    lines = [{"stage": "finetune", "phase": "mstep", "round": r, "iter": i}
             for r in (1, 2) for i in (1, 2, 3)]
    log.write_text("".join(json.dumps(x) + "\n" for x in lines) + '{"torn')
    run = PhaseRun(log, log, "finetune", {"round": 2, "source_hash": "h"}, [])
    _trim_log(log, run, "mstep", 1)  # round 2 resumes after iteration 1
    kept = [(x["round"], x["iter"]) for x in map(json.loads, log.read_text().splitlines())]
    assert kept == [(1, 1), (1, 2), (1, 3), (2, 1)]


# ----------------------------------------------------------------------------- infer outputs


def test_probs_parts_survive_a_kill(tmp_path):
    from discli.infer.probs import ProbsWriter

    attrs = {"format": "dis-probs", "format_version": 1, "classes": '["bg", "a"]', "steps": 0,
             "checkpoint_hash": "h", "inference": "{}"}
    path = tmp_path / "p.h5"
    w = ProbsWriter(path, attrs, part_images=2)
    for i in range(5):
        w.add(f"d/im{i}", np.full((2, 4, 4), i, np.float32), np.zeros(2, np.float32))
    # "killed" here: two complete parts, a torn third one, no p.h5
    w._h5.close()
    parts = sorted(p.name for p in w.parts())
    assert parts == ["part-000000.h5", "part-000001.h5"] and not path.exists()
    again = ProbsWriter(path, attrs)
    assert again.done == {f"d/im{i}" for i in range(4)}  # im4 was in the torn part
    again.add("d/im4", np.full((2, 4, 4), 4, np.float32), np.zeros(2, np.float32))
    again.close()
    import h5py

    with h5py.File(path, "r") as h5:
        assert sorted(h5["entries"]) == [f"d%2Fim{i}" for i in range(5)]
        assert h5["entries"]["d%2Fim3"]["probs"][0, 0, 0] == 3
    assert not (tmp_path / ".p.h5.parts").exists()
    with pytest.raises(IncompatibleError, match="made with another steps"):
        ProbsWriter(path, {**attrs, "steps": 3})


def test_interrupted_overwrite_is_finished_only_by_overwrite(tmp_path):
    from discli.model.net import ModelConfig, build_model
    from discli.infer.inputs import InferOutputs, InputImage
    from discli.infer.predict import predict
    from discli.infer.runtime import RunOptions
    from discli.infer.settings import InferenceConfig

    torch.manual_seed(0)
    model = build_model(ModelConfig(backbone="tiny", num_classes=3,
                                    backbone_kwargs={"channels": 8})).eval()
    from PIL import Image

    inputs = []
    for i in range(3):
        Image.fromarray(np.full((16, 16, 3), 40 * i, np.uint8)).save(tmp_path / f"{i}.png")
        inputs.append(InputImage(str(i), tmp_path / f"{i}.png"))
    out = tmp_path / "out"
    kw = dict(classes=["bg", "a", "b"], run=RunOptions(device="cpu"))
    write, rewrite = InferOutputs(out_dir=out), InferOutputs(out_dir=out, overwrite=True)
    t0, t2 = InferenceConfig(steps=0), InferenceConfig(steps=2)
    assert len(list(predict(model, inputs, cfg=t0, outputs=write, **kw))) == 3
    run = predict(model, inputs, cfg=t2, outputs=rewrite, **kw)
    next(run)
    run.close()  # stopped after one image: the folder now mixes t=0 and t=2 outputs
    with pytest.raises(IncompatibleError, match="a run with overwrite=True into this folder did "
                                                "not finish") as caught:
        list(predict(model, inputs, cfg=t2, outputs=write, **kw))
    assert "pass --overwrite to finish replacing them" in caught.value.cli_message()
    assert all(not s["skipped"] for s in predict(model, inputs, cfg=t2, outputs=rewrite, **kw))
    assert all(s["skipped"] for s in predict(model, inputs, cfg=t2, outputs=write, **kw))
