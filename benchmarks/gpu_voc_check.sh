#!/usr/bin/env bash
# The paper's preset (`--config voc-resnet101`) at full size on a CUDA device: DIS-ResNet101,
# batch 10, 321 px crops, SGD, AMP (the preset's default on CUDA), through the installed CLI.
# Never part of CI. Run from anywhere after `pip install -e '.[test]'`:
#
#     bash benchmarks/gpu_voc_check.sh        # a few minutes on an H100-class GPU (not yet run)
#
# Pretrain (ITERS step-1 iterations, ITERS/6 step 2, ITERS/3 step 3) -> one E-step at
# t_tr = 30 -> one M-step of MSTEP iterations -> evaluate at t_ts = 0 and 30, on crops and
# mirrors of the real VOC photo in tests/data/voc2012-sample (full size, 500x366 and smaller)
# with a few captions. Prints, per phase, images/s (training: from log.jsonl's times, first
# logged iteration excluded so cuDNN's autotuning is not counted; E-step and evaluation: wall
# time of the command) and the peak GPU memory (torch.cuda.max_memory_allocated and _reserved),
# then one JSON line with every number.
#
# Offline by default, as most GPU machines are: the backbone starts from random ResNet-101
# weights saved in torchvision's key layout and passed with --backbone-weights PATH (the route
# the README gives for machines that cannot download). WEIGHTS=imagenet uses torchvision's
# ImageNet file from the torch hub cache ($TORCH_HOME/hub/checkpoints/resnet101-cd907fc2.pth)
# instead, downloading it if it can. The numbers measure speed and memory only; the mIoU of a
# few hundred iterations on one photo means nothing.
#
# Knobs (environment): DEVICE (cuda), ITERS (300), MSTEP (200), BATCH (10), CROP (321),
# WEIGHTS (random | imagenet), KEEP (1: keep the work folder and print it). A CPU smoke test
# of this script itself: DEVICE=cpu ITERS=6 MSTEP=2 BATCH=2 CROP=65 bash benchmarks/gpu_voc_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export DEVICE="${DEVICE:-cuda}" ITERS="${ITERS:-300}" MSTEP="${MSTEP:-200}" BATCH="${BATCH:-10}"
export CROP="${CROP:-321}" WEIGHTS="${WEIGHTS:-random}" REPO="$PWD"
if [[ "$DEVICE" == cuda* ]]; then
    python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device')"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
fi
WORK="$(mktemp -d "${TMPDIR:-/tmp}/dis-gpu-voc.XXXXXX")"
if [[ "${KEEP:-0}" != 1 ]]; then trap 'rm -rf "$WORK"' EXIT; fi
export WORK
python - <<'EOF'
import json
import math
import os
import time
from pathlib import Path

import torch
import torchvision
from PIL import Image, ImageOps

from discli.cli.app import main
from discli.data.voc import VOC_CLASSES

env = os.environ
work, device = Path(env["WORK"]), env["DEVICE"]
iters, mstep, batch, crop = (int(env[k]) for k in ("ITERS", "MSTEP", "BATCH", "CROP"))
cuda = device.startswith("cuda")
print(f"torch {torch.__version__}, device {device}"
      + (f" ({torch.cuda.get_device_name()})" if cuda else ""), flush=True)

# data: crops and mirrors of the real VOC photo at full resolution, and captioned ones
sample = Path(env["REPO"]) / "tests" / "data" / "voc2012-sample"
photo = Image.open(sample / "2007_000033.jpg").convert("RGB")
truth = Image.open(sample / "2007_000033.png")
boxes = [(0, 0, 500, 366), (0, 0, 400, 340), (100, 26, 500, 366), (40, 0, 460, 330)]
for folder in ("photos", "masks", "web"):
    (work / folder).mkdir()
for i, box in enumerate(boxes):
    for mirror in (False, True):
        image, labels = photo.crop(box), truth.crop(box)
        if mirror:
            image, labels = ImageOps.mirror(image), ImageOps.mirror(labels)
        image.save(work / "photos" / f"p{i}{'m' * mirror}.jpg", quality=95)
        labels.save(work / "masks" / f"p{i}{'m' * mirror}.png")
        image.save(work / "web" / f"w{i}{'m' * mirror}.jpg", quality=95)
captions = ["an aeroplane on the runway", "a plane at the airport", "jet airplane on the tarmac",
            "a white airliner"]
(work / "captions.jsonl").write_text("".join(
    json.dumps({"image": f"w{i}{'m' * m}.jpg", "caption": captions[i]}) + "\n"
    for i in range(len(boxes)) for m in (0, 1)))
(work / "classes.txt").write_text("\n".join(VOC_CLASSES) + "\n")

weights = env["WEIGHTS"]
if weights == "random":
    weights = str(work / "resnet101-random.pth")
    torch.save(torchvision.models.resnet101(weights=None).state_dict(), weights)

results = {"device": torch.cuda.get_device_name() if cuda else device, "iters": iters,
           "mstep_iters": mstep, "batch_size": batch, "crop_size": crop,
           "weights": env["WEIGHTS"]}


def dis(name, *args):
    """`dis ARGS` in this process, so that the peak GPU memory is this command's."""
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    code = main([str(a) for a in args])
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    if code != 0:
        raise SystemExit(f"{name}: `dis {' '.join(map(str, args))}` exited {code}")
    peak = {}
    if cuda:
        peak = {"peak_allocated_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
                "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / 2**30, 2)}
    results[name] = {"seconds": round(seconds, 1), **peak}
    return results[name]


def train_speed(log, phase, images_per_iter):
    records = [r for r in log if r.get("phase") == phase and "time" in r]
    assert records and all(math.isfinite(r["loss"]) for r in records), f"{phase}: bad losses"
    first, last = records[0], records[-1]
    if last["iter"] == first["iter"]:
        return None
    return round(images_per_iter * (last["iter"] - first["iter"]) / (last["time"] - first["time"]), 1)


run, common = work / "run", ["--device", device, "-q", "--set", "log_every=10"]
dis("prepare", "prepare-folder", work / "photos", work / "masks", "--classes",
    work / "classes.txt", "-o", work / "train.jsonl", "-q")
dis("prepare-idw", "prepare-idw", work / "captions.jsonl", "--root", work / "web", "-o",
    work / "idw.jsonl", "-q")
labelled, tagged = work / "train.jsonl", work / "idw.jsonl"
shape = ["--batch-size", batch, "--crop-size", crop]
dis("pretrain", "pretrain", "--config", "voc-resnet101", "--labelled", labelled, "--out", run,
    "--backbone-weights", weights, *shape, *common, "--set", f"iters_step1={iters}",
    "--set", f"iters_step2={max(iters // 6, 1)}", "--set", f"iters_step3={max(iters // 3, 1)}")
log = [json.loads(line) for line in (run / "pretrain" / "log.jsonl").read_text().splitlines()]
for phase in ("step1", "step2", "step3"):
    results["pretrain"][f"{phase}_images_per_s"] = train_speed(log, phase, batch)
finetune = ["finetune", "--config", "voc-resnet101", "--labelled", labelled, "--tagged", tagged,
            "--out", run, *shape, *common, "--t-tr", 30, "--set", "rounds=1",
            "--set", f"mstep_iters={mstep}"]
estep = dis("estep", *finetune, "--only", "estep", "--round", 1)
estep["images_per_s"] = round(2 * len(boxes) / estep["seconds"], 1)  # includes model loading
dis("mstep", *finetune)
log = [json.loads(line) for line in (run / "finetune" / "log.jsonl").read_text().splitlines()]
results["mstep"]["images_per_s"] = train_speed(log, "mstep", batch)
evaluate = dis("evaluate", "evaluate", labelled, "-c", run / "finetune" / "final.pth",
               "--device", device, "--t-ts", "0,30", "-q")
evaluate["images_per_s"] = round(len(boxes) * 2 * 2 / evaluate["seconds"], 1)  # two settings

for name in ("pretrain", "estep", "mstep", "evaluate"):
    print(f"{name:9s} " + "  ".join(f"{k}={v}" for k, v in results[name].items()), flush=True)
print(json.dumps(results))
EOF
if [[ "${KEEP:-0}" == 1 ]]; then echo "work folder: $WORK"; fi
