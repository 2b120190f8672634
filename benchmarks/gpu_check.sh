#!/usr/bin/env bash
# GPU checks for a CUDA machine (never part of CI). Run from the repository root after
# `pip install -e '.[test]'`:
#
#     bash benchmarks/gpu_check.sh            # about 5-10 minutes on an H100-class GPU
#
# 1. The CUDA-marked tests, each printing what it measured (pytest -rP):
#    tests/test_multigpu_cuda.py - a 2-process NCCL pretrain + one finetune round with SyncBatchNorm
#      (each rank on its own GPU; skipped below 2 GPUs), its BatchNorm statistics against one
#      process with the same global batch; resume on CUDA from a checkpoint with this GPU's
#      generator and from an older one holding 8 GPUs' generators; low-rank == autograd in float32
#      with TF32 on in the process (off inside the refinement), and the difference TF32 would give;
#    tests/test_cuda.py - an AMP pretrain + finetune whose every phase moves its weights,
#      inference under autocast, low-rank against autograd in float64, a one-process torchrun;
#    tests/test_inference_compiled.py - the compiled low-rank steps (Triton, CUDA graphs) against
#      autograd in float64 and the plain steps in float32, one compile per shape.
# 2. DIS-ResNet101 test-time inference at batch 32, 321x321, with AMP, at t_ts = 0 and 30, with
#    the plain and the compiled low-rank steps (compile time printed apart; predictions compared).
#    The project's target (issue 17): >= 250 images/s at t_ts = 30, batch 32, 321x321.
# 3. The training steps at DIS-ResNet101 321x321 with AMP (issue 30): the E-step (t_tr = 30 with
#    tags, plain and compiled steps) and the M-step (forward, backward, SGD), images/s and peak
#    GPU memory (torch.cuda.max_memory_allocated); then, with 2 GPUs or more, one M-step per rank
#    in a 2-process NCCL torchrun (DDP + SyncBatchNorm), images/s of the global batch, and the
#    ranks' weights compared after the steps.
#
# Knobs (environment): REPS (5), EBATCH (16, E-step images), MBATCH (10, M-step images per
# process, the voc-resnet101 preset's batch), BACKBONE (resnet101), SIZE (321). A CPU smoke run of
# part 3 alone (gloo instead of NCCL, float32): DEVICE=cpu BACKBONE=tiny SIZE=65 EBATCH=2 MBATCH=2
# REPS=1 bash benchmarks/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export DEVICE="${DEVICE:-cuda}" REPS="${REPS:-5}" EBATCH="${EBATCH:-16}" MBATCH="${MBATCH:-10}"
export BACKBONE="${BACKBONE:-resnet101}" SIZE="${SIZE:-321}" REPO="$PWD"
if [[ "$DEVICE" == cuda* ]]; then
    python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device')"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
    python -c "import torch; print(f'torch {torch.__version__}, CUDA {torch.version.cuda}, '
                                   f'{torch.cuda.device_count()} visible GPU(s)')"
    python -m pytest -q -m cuda tests/test_multigpu_cuda.py tests/test_cuda.py \
        tests/test_inference_compiled.py -rsP -p no:cacheprovider
    (cd benchmarks && python inference.py --device cuda --batch 32 --amp --compiled \
        --reps "$REPS" --warmup 2)
fi
WORK="$(mktemp -d "${TMPDIR:-/tmp}/dis-gpu-check.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
cat > "$WORK/steps.py" <<'EOF'
"""E-step and M-step throughput and peak memory; `torchrun ... steps.py ddp`: the M-step in DDP."""
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.environ["REPO"], "benchmarks"))
from _common import median  # noqa: E402

from discli.distributed import all_reduce_sum, setup_distributed  # noqa: E402
from discli.infer.loop import InferenceConfig  # noqa: E402
from discli.infer.runtime import run_inference  # noqa: E402
from discli.infer.settings import use_compiled  # noqa: E402
from discli.model.net import ModelConfig, build_model  # noqa: E402
from discli.train.keys import TrainConfig  # noqa: E402
from discli.train.phases import PHASES, compute_losses, param_groups, set_train_modes  # noqa

K, SIZE, REPS = 21, int(os.environ["SIZE"]), int(os.environ["REPS"])


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(fn, device, warmup=2):
    """Median seconds of REPS calls after the warm-up, and the peak memory (MiB) of one call."""
    for _ in range(warmup):
        fn()
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(REPS):
        tic = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - tic)
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else 0.0
    return median(times), peak


def batch_of(n, device):
    gen = torch.Generator().manual_seed(0)
    labelmap = torch.randint(0, K, (n, SIZE, SIZE), generator=gen)
    labelmap[:, :8] = 255  # some void pixels
    tags = (torch.rand(n, K, generator=gen) > 0.7).float()
    tags[:, 0] = 1
    return {"image": torch.randn(n, 3, SIZE, SIZE, generator=gen).to(device),
            "labelmap": labelmap.to(device), "tags": tags.to(device)}


def mstep_fn(model, net, batch, device):
    """One M-step iteration as discli.train.engine.train_step runs it (AMP, gradient scaler)."""
    cfg, phase = TrainConfig(), PHASES["mstep"]
    optimizer = torch.optim.SGD(param_groups(model, phase, cfg), lr=cfg.lr,
                                momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    set_train_modes(model, phase, cfg.freeze_bn)
    amp = device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=amp)

    def step():
        with torch.autocast(device.type, dtype=torch.float16, enabled=amp):
            loss = compute_losses(net, batch, phase, cfg, device)["loss"]
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    return step


def single(device):
    torch.manual_seed(0)
    model = build_model(ModelConfig(backbone=os.environ["BACKBONE"], num_classes=K)).to(device)
    n = int(os.environ["EBATCH"])
    batch = batch_of(n, device)
    cfg = InferenceConfig(steps=30)
    print(f"DIS {os.environ['BACKBONE']} {SIZE}x{SIZE}, AMP {device.type == 'cuda'}, "
          f"median of {REPS}")
    for compiled in (False, True):
        use_compiled(compiled)
        model.eval()
        run = lambda: run_inference(model, batch["image"], [30], cfg, amp=True,  # noqa: E731
                                    tags=batch["tags"])
        seconds, peak = measure(run, device)
        print(f"  E-step t_tr=30, batch {n}, {'compiled' if compiled else 'plain'} steps: "
              f"{n / seconds:8.1f} images/s, peak {peak:8.0f} MiB")
    use_compiled(False)
    n = int(os.environ["MBATCH"])
    seconds, peak = measure(mstep_fn(model, model, batch_of(n, device), device), device)
    print(f"  M-step, batch {n}: {n / seconds:8.1f} images/s, peak {peak:8.0f} MiB")


def ddp(device):
    device, info = setup_distributed(device)
    torch.manual_seed(0)  # the same initial weights on every rank
    model = build_model(ModelConfig(backbone=os.environ["BACKBONE"], num_classes=K)).to(device)
    if device.type == "cuda":
        torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    net = torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None)
    n = int(os.environ["MBATCH"])
    seconds, peak = measure(mstep_fn(model, net, batch_of(n, device), device), device)
    weights = torch.cat([p.detach().flatten().double() for p in model.parameters()])
    spread = (all_reduce_sum(weights.clone()) / info.world_size - weights).abs().max()
    spread = all_reduce_sum(spread.reshape(1)).item()
    if info.is_main:
        print(f"  M-step, DDP over {info.world_size} processes ({device.type}), {n} images "
              f"each: {info.world_size * n / seconds:8.1f} images/s of the global batch, peak "
              f"{peak:8.0f} MiB on rank 0; ranks' weights differ by {spread:.1e} after the steps")
        assert spread == 0, "the ranks' weights diverged"


if __name__ == "__main__":
    (ddp if sys.argv[1:] == ["ddp"] else single)(torch.device(os.environ["DEVICE"]))
EOF
python "$WORK/steps.py"
GPUS=$(python -c "import torch; print(torch.cuda.device_count())")
if [[ "$DEVICE" == cpu ]] || (( GPUS >= 2 )); then
    torchrun --standalone --nproc_per_node 2 "$WORK/steps.py" ddp
else
    echo "DDP M-step: skipped (needs 2 GPUs, $GPUS visible)"
fi
