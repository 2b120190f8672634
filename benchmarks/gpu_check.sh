#!/usr/bin/env bash
# GPU checks for a CUDA machine (never part of CI): the CUDA-marked tests (an AMP pretrain +
# fine-tune, inference under autocast, low-rank against autograd on CUDA, a one-process NCCL
# torchrun pretrain), then DIS-ResNet101 inference throughput at batch 32, 321x321, with AMP, at
# t_ts = 0 and 30. Run from the repository root after `pip install -e '.[test]'`:
#
#     bash benchmarks/gpu_check.sh            # about 3-5 minutes on an H100-class GPU
#
# The project's target (issue 17): >= 250 images/s at t_ts = 30, batch 32, 321x321.
set -euo pipefail
cd "$(dirname "$0")/.."
python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device')"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python -m pytest -q -m cuda tests/test_cuda.py -rs
cd benchmarks
python inference.py --device cuda --batch 32 --amp --reps ${REPS:-5} --warmup 2
