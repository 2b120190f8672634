"""Shared helpers of the benchmark scripts: machine description and interleaved timing."""

from __future__ import annotations

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


def pick_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def gflops(fn: Callable[[], object]) -> float:
    """Floating-point operations of one call (matmuls and convolutions, as torch counts them)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops() / 1e9
