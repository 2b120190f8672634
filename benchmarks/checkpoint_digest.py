"""What verifying a checkpoint's content digest costs, beside the load itself (docs/running.md,
safety).

A ResNet-101 DISNet (21 classes, random weights) is saved with :func:`save_checkpoint`, then
loaded ``--reps`` times without and with verification (the file is in the page cache after the
first read, so the figures are the CPU's, not the disk's). One thread, as docs/running.md states.

    OMP_NUM_THREADS=1 python benchmarks/checkpoint_digest.py [--reps 3] [--optimizer]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from discli.infer.checkpoint import (content_digest, load_checkpoint, model_from_checkpoint,
                                     save_checkpoint)
from discli.model.net import ModelConfig, build_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--optimizer", action="store_true",
                        help="also store SGD momentum buffers, as a training checkpoint does")
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = build_model(ModelConfig(backbone="resnet101", num_classes=21))
    state = {"model": model.state_dict(), "model_config": model.config.to_dict()}
    if args.optimizer:
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        opt.step()
        state["optimizer"] = opt.state_dict()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "r101.pth"
        tic = time.perf_counter()
        save_checkpoint(path, state)
        save_s = time.perf_counter() - tic
        tic = time.perf_counter()
        content_digest(state)
        digest_s = time.perf_counter() - tic
        size = path.stat().st_size
        load_checkpoint(path, verify=False)  # warm the page cache
        plain, verified = [], []
        for _ in range(args.reps):
            tic = time.perf_counter()
            load_checkpoint(path, verify=False)
            plain.append(time.perf_counter() - tic)
            tic = time.perf_counter()
            load_checkpoint(path, verify=True)
            verified.append(time.perf_counter() - tic)
        loaded = load_checkpoint(path, verify=False)
        tic = time.perf_counter()
        model_from_checkpoint(loaded, path)  # what `dis infer` / training add to the load
        build_s = time.perf_counter() - tic
    print(f"file {size / 2**20:.0f} MiB; save (digest included) {save_s:.3f} s, of which the "
          f"digest {digest_s:.3f} s")
    print("load without verification: " + ", ".join(f"{t:.3f}" for t in plain) + " s")
    print("load with verification:    " + ", ".join(f"{t:.3f}" for t in verified) + " s")
    best_plain, best_verified = min(plain), min(verified)
    extra = best_verified - best_plain
    print(f"best: {best_plain:.3f} s -> {best_verified:.3f} s (+{extra:.3f} s, "
          f"{100 * (best_verified / best_plain - 1):.0f}%)")
    print(f"building the network from it (load_model's other part): {build_s:.3f} s; "
          f"verification adds {100 * (best_verified - best_plain) / (best_plain + build_s):.0f}% "
          f"to load + build")


if __name__ == "__main__":
    main()
