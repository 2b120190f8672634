"""E-step throughput and memory: training-time inference (t_tr steps, with tags) per batch.

    python benchmarks/estep.py                       # ResNet-101, 321x321, batch 4, t_tr = 30
    python benchmarks/estep.py --backbone tiny --size 129 --reps 2   # smoke run

The E-step's work per batch is what ``discli.train.estep.run_estep`` does inside its loop: one
``infer(model, images, t_tr, cfg, tags)`` and, when ``discli.train.estep`` is installed, its
``pseudo_entries`` (upsampling to image size, argmax, confidence, tags to numpy). Data loading and
the HDF5 writes are left out (they do not depend on the inference). It is timed against a plain
backbone forward of the same batch (``torch.inference_mode``), interleaved round by round; the
target of issue 7 is a throughput ratio >= 0.9. Memory: the peak resident set size after every
round must stay flat (no growth with the number of batches processed).
"""

from __future__ import annotations

import argparse
import resource
import sys

import torch
from _common import add_common_args, describe_machine, interleaved, load_note, median, setup

from discli.infer.loop import InferenceConfig, infer


def peak_rss_mb() -> float:
    scale = 1024 if sys.platform != "darwin" else 1024 * 1024  # kB on Linux, bytes on macOS
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / scale


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(parser, reps=4)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--t-tr", type=int, default=30)
    parser.add_argument("--method", default="auto", help="inference method: auto|lowrank|autograd")
    args = parser.parse_args()
    try:
        from discli.train.estep import pseudo_entries
    except ImportError:
        pseudo_entries = None
    device, model = setup(args)
    images = torch.randn(args.batch, 3, args.size, args.size, device=device)
    tags = (torch.rand(args.batch, args.classes, device=device) > 0.7).float()
    tags[:, 0] = 1
    batch = {"id": [f"img{i}" for i in range(args.batch)], "image": images.cpu(),
             "tags": tags.cpu()}
    cfg = InferenceConfig(steps=args.t_tr, method=args.method)
    rss: list[float] = []

    def estep() -> None:
        result = infer(model, images, args.t_tr, cfg, tags=tags)
        if pseudo_entries is not None:
            pseudo_entries(result.probs.float(), result.v3, batch)
        rss.append(peak_rss_mb())

    def forward() -> None:
        with torch.inference_mode():
            model.features(images)

    print(describe_machine(device))
    print(f"DIS {args.backbone}, K={args.classes}, batch {args.batch}x3x{args.size}x{args.size}, "
          f"t_tr={args.t_tr}, method {args.method}, random weights, {args.reps} rounds (median); "
          f"post-processing: {'discli.train.estep.pseudo_entries' if pseudo_entries else 'none'}")
    times = interleaved({"backbone forward": forward, "E-step": estep}, args.reps, 1, device)
    per = {name: median(values) for name, values in times.items()}
    for name, seconds in per.items():
        print(f"  {name:<17} {seconds:7.3f} s/batch   {args.batch / seconds:6.3f} images/s")
    print(f"  throughput ratio E-step / backbone forward: "
          f"{per['backbone forward'] / per['E-step']:.3f}")
    print("  peak RSS after each E-step batch (MB): " + ", ".join(f"{x:.0f}" for x in rss))
    print(f"  growth after the first measured batch: {rss[-1] - rss[1]:+.0f} MB")
    print(load_note())


if __name__ == "__main__":
    main()
