"""torchrun with 2 CPU processes (gloo) against one process with the same global batch."""

import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch

from datagen import make_split
from discli.cache import PseudoCache
from discli.checkpoint import load_checkpoint


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _run(args, nproc, tmp_path):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
                "--master-addr", "127.0.0.1", "--master-port", str(_free_port()), "-m", "discli"]
    cmd = (launcher if nproc > 1 else [sys.executable, "-m", "discli"]) + args
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env,
                         cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp-data")
    return {"labelled": make_split(root, "train", 8, 0, True),
            "tagged": make_split(root, "web", 7, 1, False, tag_source="caption")}


def _common(data, out):
    return ["--labelled", str(data["labelled"]), "--tagged", str(data["tagged"]),
            "--out", str(out), "--backbone", "tiny", "--batch-size", "4", "--crop-size", "32",
            "--device", "cpu", "--quiet", "--set", "channels=16", "--set", "freeze_bn=true",
            "--set", "iters_step1=3", "--set", "iters_step2=2", "--set", "iters_step3=3",
            "--set", "estep_batch_size=2", "--set", "t_tr=2", "--set", "mstep_iters=2",
            "--set", "rounds=1"]


def test_ddp_pretrain_matches_single_process_and_sharded_estep(data, tmp_path):
    for nproc, name in ((1, "single"), (2, "ddp")):
        args = _common(data, tmp_path / name)
        _run(["pretrain", *[a for a in args if a != "--tagged" and a != str(data["tagged"])]],
             nproc, tmp_path)
        # Both E-steps start from the single-process model: the caches must then agree.
        _run(["finetune", *args, "--only", "estep", "--init",
              str(tmp_path / "single/pretrain/final.pth")], nproc, tmp_path)
    single = load_checkpoint(tmp_path / "single/pretrain/final.pth")["model"]
    ddp = load_checkpoint(tmp_path / "ddp/pretrain/final.pth")["model"]
    for key in single:
        assert torch.allclose(single[key].float(), ddp[key].float(), atol=1e-5), key
    a = PseudoCache(tmp_path / "single/finetune/round-1/cache.h5")
    b = PseudoCache(tmp_path / "ddp/finetune/round-1/cache.h5")
    assert sorted(a.ids()) == sorted(b.ids()) and len(a) == 7
    assert not (tmp_path / "ddp/finetune/round-1/cache.parts").exists()
    for image_id in a.ids():
        ea, eb = a.get(image_id), b.get(image_id)
        assert np.array_equal(ea.labelmap, eb.labelmap)
        assert np.allclose(ea.tag_probs, eb.tag_probs, atol=1e-5)
        assert np.allclose(ea.confidence.astype(np.float32), eb.confidence.astype(np.float32),
                           atol=1e-3)
