"""Test-time inference cost: t = 30 steps of feature inference against a plain forward (t = 0).

    python benchmarks/inference.py                       # ResNet-101, 321x321, batch 1 and 2
    python benchmarks/inference.py --batch 1 --reps 3    # quicker
    python benchmarks/inference.py --backbone tiny --size 129 --reps 2   # smoke run, seconds

Random weights (inference cost does not depend on their values). For every batch size it times,
interleaved round by round, ``infer(model, images, 0)`` and ``infer(model, images, 30)`` with the
low-rank and the autograd method, and prints per-image medians and the t=30 / t=0 ratios (target
of issue 7: <= 1.15 with the default method), plus the backbone forward alone with NCHW and with
channels_last input. It then times the inference iterations alone on
precomputed features (``refine_features``), per step, and the Gram precomputation.
"""

from __future__ import annotations

import argparse

import torch
from _common import add_common_args, describe_machine, gflops, interleaved, load_note, median, setup

from discli.infer.loop import InferenceConfig, infer, refine_features
from discli.infer.lowrank import gram_operators


def bench_batch(model: torch.nn.Module, batch: int, args: argparse.Namespace,
                device: torch.device) -> None:
    t = args.steps
    images = torch.randn(batch, 3, args.size, args.size, device=device)
    images_cl = images.contiguous(memory_format=torch.channels_last)
    tags = (torch.rand(batch, args.classes, device=device) > 0.5).float() if args.tags else None
    cfg = {m: InferenceConfig(method=m) for m in ("lowrank", "autograd")}

    def backbone(x: torch.Tensor) -> None:
        with torch.inference_mode():
            model.features(x)

    def run(steps: int, method: str) -> None:
        with torch.autocast(device.type, dtype=torch.float16,
                            enabled=args.amp and device.type == "cuda"):
            infer(model, images, steps, cfg[method], tags=tags)

    variants = {
        "t=0": lambda: run(0, "lowrank"),
        f"t={t} lowrank": lambda: run(t, "lowrank"),
        f"t={t} autograd": lambda: run(t, "autograd"),
        "backbone NCHW": lambda: backbone(images),
        "backbone NHWC": lambda: backbone(images_cl),
    }
    print(f"\nbatch {batch}: end to end (backbone + inference), seconds per image")
    times = interleaved(variants, args.reps, args.warmup, device)
    per_image = {name: median(v) / batch for name, v in times.items()}
    for name, value in per_image.items():
        print(f"  {name:<16} {value:8.4f} s/image  {1 / value:9.1f} images/s")
    base = per_image["t=0"]
    for method in ("lowrank", "autograd"):
        print(f"  ratio t={t} {method} / t=0: {per_image[f't={t} {method}'] / base:.3f}")
    print(f"  backbone forward alone, channels_last / NCHW input: "
          f"{per_image['backbone NHWC'] / per_image['backbone NCHW']:.3f} "
          f"(infer() feeds channels_last on CPU)")

    with torch.inference_mode():
        u1, v1 = model.features(images)

    def refine(method: str, steps: int) -> None:
        refine_features(model, u1, v1, images, cfg[method], tags=tags, snapshots=[steps])

    parts = {
        "lowrank": lambda: refine("lowrank", t),
        "autograd": lambda: refine("autograd", t),
        "t=0 heads": lambda: refine("lowrank", 0),
        "gram": lambda: gram_operators(model.subnet1.weight, model.subnet3.weight),
    }
    inner = {n: median(v) for n, v in
             interleaved(parts, max(args.reps, 3), 1, device, log=False).items()}
    work = {n: gflops(parts[n]) for n in ("lowrank", "autograd", "t=0 heads")}
    work["backbone"] = gflops(lambda: backbone(images))
    print(f"batch {batch}: inference alone on precomputed features (C={u1.shape[1]}, "
          f"{u1.shape[-2]}x{u1.shape[-1]})")
    print(f"  heads at t=0 (subnet-1,2,3 forward): {inner['t=0 heads'] * 1e3:8.1f} ms/batch")
    steps_only = {}
    for m in ("lowrank", "autograd"):
        steps_only[m] = inner[m] - inner["t=0 heads"]
        step_flops = (work[m] - work["t=0 heads"]) / t
        print(f"  {m:<9} {t} steps: {inner[m] * 1e3:8.1f} ms/batch, "
              f"{steps_only[m] / t * 1e3:6.2f} ms/step/batch, "
              f"{step_flops * 1e3:7.1f} MFLOP/step/batch "
              f"({step_flops / work['backbone'] * 100:.3f}% of a backbone forward)")
    print(f"  speed-up of the steps, autograd / lowrank: "
          f"{steps_only['autograd'] / steps_only['lowrank']:.1f}x")
    print(f"  Gram operators (once per call): {inner['gram'] * 1e3:.1f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(parser, reps=5)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--tags", action="store_true", help="training-time inference (with tags)")
    parser.add_argument("--amp", action="store_true", help="float16 autocast (CUDA only)")
    args = parser.parse_args()
    device, model = setup(args)
    print(describe_machine(device))
    print(f"model: DIS {args.backbone}, K={args.classes}, input {args.size}x{args.size}, "
          f"t={args.steps}, {'with' if args.tags else 'without'} tags, random weights, "
          f"{args.reps} rounds (median), device {device.type}")
    for batch in args.batch:
        bench_batch(model, batch, args, device)
    print(load_note())


if __name__ == "__main__":
    main()
