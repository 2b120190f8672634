"""CUDA checks (marker ``cuda``): skipped where no GPU is present, run by
``benchmarks/gpu_check.sh`` on a CUDA machine. CI never depends on them."""

import os
import subprocess
import sys

import pytest
import torch

from discli.infer.checkpoint import load_checkpoint
from discli.infer.loop import InferenceConfig, infer
from discli.model.net import ModelConfig, build_model
from discli.train.finetune import finetune
from discli.train.pretrain import pretrain
from test_distributed import _free_port
from test_train import config, data  # noqa: F401

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def _config(data, out, **kw):
    return config(data, out, device="cuda", amp=True, **kw)  # test_train's tiny run, on CUDA


def _changed(a, b, prefix):
    return any(not torch.equal(a[k].float().cpu(), b[k].float().cpu())
               for k in a if k.startswith(prefix) and a[k].is_floating_point())


def test_amp_pretrain_and_finetune_on_cuda(data, tmp_path):
    """The gradient scaler skips every step whose gradients overflow, and a run that skipped
    them all would still end finite: each phase must also have moved the weights it trains."""
    from discli.data.manifest import read_manifest
    from discli.train.pretrain import new_model

    cfg = _config(data, tmp_path)
    pretrain(cfg)
    finetune(cfg)
    state = load_checkpoint(tmp_path / "finetune/final.pth")
    assert all(torch.isfinite(v.float()).all() for v in state["model"].values())
    start = new_model(cfg, read_manifest(cfg.labelled).classes).state_dict()
    step1, step2, step3 = (load_checkpoint(tmp_path / f"pretrain/{name}.pth")["model"]
                           for name in ("step1", "step2", "final"))
    assert _changed(start, step1, "backbone")
    assert _changed(step1, step2, "subnet2")
    assert _changed(step2, step3, "backbone")
    assert _changed(step3, state["model"], "backbone")
    print(f"AMP: every phase moved its weights; final gradient scale "
          f"{(state.get('scaler') or {}).get('scale')}")


@pytest.mark.parametrize("method", ["lowrank", "autograd"])
def test_inference_under_autocast_is_finite_and_close(method):
    torch.manual_seed(0)
    model = build_model(ModelConfig(backbone="tiny", num_classes=6,
                                    backbone_kwargs={"channels": 32})).cuda().eval()
    images = torch.randn(4, 3, 64, 64, device="cuda")
    cfg = InferenceConfig(lr=0.003, method=method)
    full = infer(model, images, 30, cfg)
    with torch.autocast("cuda", dtype=torch.float16):
        half = infer(model, images, 30, cfg)
    assert torch.isfinite(half.probs).all()
    assert (half.probs.float().argmax(1) == full.probs.argmax(1)).float().mean() > 0.98


def test_lowrank_equals_autograd_on_cuda():
    torch.manual_seed(0)
    model = build_model(ModelConfig(backbone="tiny", num_classes=6,
                                    backbone_kwargs={"channels": 24})).double().cuda().eval()
    images = torch.randn(2, 3, 40, 56, dtype=torch.float64, device="cuda")
    tags = (torch.rand(2, 6, device="cuda") > 0.5).double()
    a = infer(model, images, 30, InferenceConfig(lr=0.5, method="autograd"), tags=tags)
    b = infer(model, images, 30, InferenceConfig(lr=0.5, method="lowrank"), tags=tags)
    assert ((a.u3 - b.u3).norm() / a.u3.norm()) < 1e-9


def test_nccl_torchrun_pretrain_one_process(data, tmp_path):
    port = _free_port()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "1",
           "--master-addr", "127.0.0.1", "--master-port", str(port), "-m", "discli",
           "pretrain", "--labelled", str(data["labelled"]), "--out", str(tmp_path / "ddp"),
           "--backbone", "tiny", "--batch-size", "4", "--crop-size", "32", "--device", "cuda",
           "--quiet", "--set", "channels=16", "--set", "iters_step1=3", "--set",
           "iters_step2=2", "--set", "iters_step3=3"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    assert (tmp_path / "ddp/pretrain/final.pth").exists()
