"""Multi-GPU training and GPU precision on real GPUs (issue 31; marker ``cuda``, skipped without
CUDA, the two-process test below 2 GPUs). ``benchmarks/gpu_check.sh`` runs them with ``-rP``:
each test prints what it measured. The same paths simulated on CPU: test_multigpu.py."""

import os
import subprocess
import sys
import time

import pytest
import torch

from factories import make_split
from discli.infer.checkpoint import load_checkpoint, save_checkpoint
from discli.infer.loop import InferenceConfig, infer
from discli.model.net import ModelConfig, build_model
from discli.train.keys import TrainConfig
from discli.train.pretrain import pretrain
from test_distributed import _free_port

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("multigpu-cuda-data")
    return {"labelled": make_split(root, "train", 8, 0, True),
            "tagged": make_split(root, "web", 6, 1, False, tag_source="caption")}


SETTINGS = {"channels": 16, "iters_step1": 4, "iters_step2": 2, "iters_step3": 4,
            "estep_batch_size": 2, "t_tr": 2, "mstep_iters": 4, "rounds": 1}


def _torchrun(nproc, args, cwd):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
           "--master-addr", "127.0.0.1", "--master-port", str(_free_port()), "-m", "discli",
           *args]
    start = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=cwd,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-4000:]
    return time.perf_counter() - start


def _changed(a, b, prefix=""):
    """Whether any float tensor under ``prefix`` differs between two state dicts."""
    return any(not torch.equal(a[k].float().cpu(), b[k].float().cpu())
               for k in a if k.startswith(prefix) and a[k].is_floating_point())


@two_gpus
def test_nccl_two_ranks_pretrain_and_finetune_round_with_sync_bn(data, tmp_path):
    """Two ranks, one GPU each (NCCL, DDP, SyncBatchNorm, the sharded E-step): the job finishes,
    and sync BN gives rank 0 the BatchNorm statistics of the global batch, as one process with
    the same global batch has them (per-rank statistics over 2 of the 4 images would not)."""
    common = ["--labelled", str(data["labelled"]), "--backbone", "tiny", "--batch-size", "4",
              "--crop-size", "32", "--device", "cuda", "--quiet",
              *[x for k, v in SETTINGS.items() for x in ("--set", f"{k}={v}")]]
    ddp = tmp_path / "ddp"
    seconds = _torchrun(2, ["pretrain", *common, "--out", str(ddp), "--set", "sync_bn=true"],
                        tmp_path)
    seconds += _torchrun(2, ["finetune", *common, "--tagged", str(data["tagged"]), "--out",
                             str(ddp), "--set", "sync_bn=true"], tmp_path)
    pre = load_checkpoint(ddp / "pretrain/final.pth")["model"]
    fine = load_checkpoint(ddp / "finetune/final.pth")["model"]
    assert all(torch.isfinite(v.float()).all() for v in fine.values())
    assert _changed(pre, fine)  # the M-step trained

    single = TrainConfig(labelled=str(data["labelled"]), out=str(tmp_path / "single"),
                         backbone="tiny", batch_size=4, crop_size=32, device="cuda",
                         **{k: v for k, v in SETTINGS.items()})
    pretrain(single, steps=[1])
    one = load_checkpoint(tmp_path / "single/pretrain/step1.pth")["model"]
    two = load_checkpoint(ddp / "pretrain/step1.pth")["model"]
    stats = [k for k in one if k.endswith("running_mean")]
    worst = max(float((one[k] - two[k]).abs().max() / one[k].abs().max().clamp_min(1e-6))
                for k in stats)
    print(f"2-rank NCCL pretrain + 1 finetune round, sync BN: {seconds:.1f} s; BatchNorm "
          f"running means after step 1 vs one process: worst relative difference {worst:.2e}")
    assert worst < 1e-2


def _train_config(data, out, **kw):
    return TrainConfig(labelled=str(data["labelled"]), tagged=str(data["tagged"]), out=str(out),
                       backbone="tiny", batch_size=4, crop_size=32, device="cuda",
                       ckpt_every=2, **{**SETTINGS, **kw})


def test_resume_on_cuda_restores_this_gpu_generator(data, tmp_path):
    cfg = _train_config(data, tmp_path)
    pretrain(cfg, steps=[1])
    last = tmp_path / "pretrain/last.pth"
    state = load_checkpoint(last)
    assert isinstance(state["rng"]["cuda"], torch.Tensor)  # this GPU's generator alone
    for held in (state["rng"]["cuda"], [state["rng"]["cuda"]] * 8):  # 8: an older 8-GPU file
        save_checkpoint(last, {**state, "iteration": 2, "done": False,
                               "rng": {**state["rng"], "cuda": held}})
        assert pretrain(cfg, steps=[1])["steps"][1] == "trained"
        assert load_checkpoint(last)["iteration"] == 4


@pytest.fixture
def tf32_on():
    """TF32 on for CUDA matmuls and convolutions, as a user who asked for speed has it."""
    flags = [(torch.backends.cuda.matmul, "fp32_precision"),
             (torch.backends.cudnn.conv, "fp32_precision")]
    saved = [getattr(obj, name) for obj, name in flags]
    for obj, name in flags:
        setattr(obj, name, "tf32")
    yield
    for (obj, name), value in zip(flags, saved):
        setattr(obj, name, value)


def test_lowrank_equals_autograd_in_float32_with_tf32_on(tf32_on, monkeypatch):
    """The refinement runs without TF32 (discli.infer.loop.ieee_float32), so the two methods agree
    to the same 1e-4 in float32 as on CPU, whatever the process's TF32 settings."""
    import contextlib

    import discli.infer.loop as inference

    torch.manual_seed(0)
    model = build_model(ModelConfig(backbone="tiny", num_classes=6,
                                    backbone_kwargs={"channels": 64})).cuda().eval()
    with torch.no_grad():
        model.subnet1.weight.normal_(std=0.2)
        model.subnet3.weight.normal_(std=0.2)
    images = torch.randn(2, 3, 64, 64, device="cuda")

    def rel(method_a, method_b):
        a = infer(model, images, 10, InferenceConfig(lr=0.5, method=method_a))
        b = infer(model, images, 10, InferenceConfig(lr=0.5, method=method_b))
        return float((a.u3 - b.u3).norm() / a.u3.norm())

    decided = rel("autograd", "lowrank")
    assert torch.backends.cudnn.conv.fp32_precision == "tf32"  # restored after the refinement
    with monkeypatch.context() as m:  # what the same comparison gives with TF32 left on
        m.setattr(inference, "ieee_float32", contextlib.nullcontext)
        with_tf32 = rel("autograd", "lowrank")
    print(f"{torch.cuda.get_device_name()}: low-rank vs autograd, float32, 10 steps, relative "
          f"difference of u3: {decided:.2e} (TF32 off in the refinement), {with_tf32:.2e} "
          f"(TF32 left on)")
    assert decided < 1e-4
