#!/usr/bin/env bash
# GPU checks for a CUDA machine (never part of CI). Run from the repository root after
# `pip install -e '.[test]'`:
#
#     bash benchmarks/gpu_check.sh            # about 3-5 minutes on an H100-class GPU
#
# 1. The CUDA-marked tests, each printing what it measured (pytest -rP):
#    tests/test_multigpu_cuda.py - a 2-process NCCL pretrain + one finetune round with SyncBatchNorm
#      (each rank on its own GPU; skipped below 2 GPUs), its BatchNorm statistics against one
#      process with the same global batch; resume on CUDA from a checkpoint with this GPU's
#      generator and from an older one holding 8 GPUs' generators; low-rank == autograd in float32
#      with TF32 on in the process (off inside the refinement), and the difference TF32 would give;
#    tests/test_cuda.py - an AMP pretrain + finetune whose every phase moves its weights,
#      inference under autocast, low-rank against autograd in float64, a one-process torchrun.
# 2. DIS-ResNet101 inference throughput at batch 32, 321x321, with AMP, at t_ts = 0 and 30. The
#    project's target (issue 17): >= 250 images/s at t_ts = 30, batch 32, 321x321.
set -euo pipefail
cd "$(dirname "$0")/.."
python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device')"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python -c "import torch; print(f'torch {torch.__version__}, CUDA {torch.version.cuda}, '
                               f'{torch.cuda.device_count()} visible GPU(s)')"
python -m pytest -q -m cuda tests/test_multigpu_cuda.py tests/test_cuda.py -rsP -p no:cacheprovider
cd benchmarks
python inference.py --device cuda --batch 32 --amp --reps ${REPS:-5} --warmup 2
