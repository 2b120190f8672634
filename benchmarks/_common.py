"""Shared helpers of the benchmark scripts: machine description and interleaved timing."""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable

import torch


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe_machine(device: torch.device) -> str:
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    lines = [
        f"cpu: {cpu_model()}, {os.cpu_count()} logical cores ({usable} usable)",
        (f"torch {torch.__version__}, {torch.get_num_threads()} intra-op threads, "
         f"oneDNN {'on' if torch.backends.mkldnn.is_available() else 'off'}; "
         f"python {platform.python_version()}, {platform.system()} {platform.machine()}"),
    ]
    if device.type == "cuda":
        lines.append(f"gpu: {torch.cuda.get_device_name(device)}")
    if hasattr(os, "getloadavg"):
        lines.append("load average at start: " + " ".join(f"{x:.2f}" for x in os.getloadavg()))
    return "\n".join(lines)


def load_note() -> str:
    return ("load average at end: " + " ".join(f"{x:.2f}" for x in os.getloadavg())
            if hasattr(os, "getloadavg") else "")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved(variants: dict[str, Callable[[], object]], reps: int, warmup: int,
                device: torch.device, log: bool = True) -> dict[str, list[float]]:
    """Wall time of every variant, ``reps`` rounds; each round runs all variants, in an order
    rotated by one every round, so that a slow spell of the machine hits them all alike."""
    names = list(variants)
    for _ in range(warmup):
        for name in names:
            variants[name]()
    sync(device)
    times: dict[str, list[float]] = {name: [] for name in names}
    for rep in range(reps):
        order = names[rep % len(names):] + names[:rep % len(names)]
        for name in order:
            sync(device)
            start = time.perf_counter()
            variants[name]()
            sync(device)
            times[name].append(time.perf_counter() - start)
        if log:
            print(f"  round {rep + 1}/{reps}: " + ", ".join(
                f"{n} {times[n][-1]:.3f}s" for n in names), file=sys.stderr, flush=True)
    return times


def median(values: list[float]) -> float:
    return statistics.median(values)


def add_common_args(parser: argparse.ArgumentParser, reps: int) -> None:
    """The options every benchmark takes (model, input, rounds, device, threads)."""
    parser.add_argument("--backbone", default="resnet101")
    parser.add_argument("--size", type=int, default=321)
    parser.add_argument("--classes", type=int, default=21)
    parser.add_argument("--reps", type=int, default=reps)
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: keep)")


def setup(args: argparse.Namespace) -> tuple[torch.device, torch.nn.Module]:
    """Apply --threads, resolve --device, and build the DIS model with random weights (seed 0)
    in eval mode on it."""
    from discli.distributed import resolve_device
    from discli.model.net import ModelConfig, build_model

    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    torch.manual_seed(0)
    model = build_model(ModelConfig(backbone=args.backbone, num_classes=args.classes)).to(device)
    return device, model.eval()


def gflops(fn: Callable[[], object]) -> float:
    """Floating-point operations of one call (matmuls and convolutions, as torch counts them)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops() / 1e9
