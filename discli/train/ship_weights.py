"""Make the shipped backbone weights: DIS step 1 on the synthetic source set (see
:mod:`discli.model.weights`, which only names and finds them).

``python -m discli.train.ship_weights --backbone tiny --channels 64`` (re)makes a file.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

import torch

from discli.storage import atomic_write
from discli.synth import SOURCE_CLASSES, generate_benchmark
from discli.train.keys import TrainConfig
from discli.train.pretrain import pretrain
from discli.model.weights import weights_file


def make_weights(backbone: str = "tiny", channels: int = 64, *, out: str | Path | None = None,
                 seed: int = 0, n_images: int = 2000, iters: int = 6000, batch_size: int = 16,
                 lr: float = 0.002, workdir: str | Path | None = None,
                 reporter: Any = None) -> dict[str, Any]:
    """Generate the source set, train DIS step 1 (labelmaps + tags) on it, and save the
    backbone's state dict (image branch included) to ``out``; returns what was done."""
    out = Path(out) if out else weights_file(backbone, channels)
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        info = generate_benchmark(Path(tmp) / "source", seed=seed, n_labelled=n_images,
                                  n_tagged=0, n_test=0, classes=SOURCE_CLASSES,
                                  difficulty="medium")
        cfg = TrainConfig(labelled=info["manifests"]["train"], out=str(Path(tmp) / "run"),
                          backbone=backbone, channels=channels, optimizer="adamw", lr=lr,
                          head_lr_mult=1.0, weight_decay=1e-4, batch_size=batch_size,
                          crop_size=64, scale_min=0.75, scale_max=1.5, iters_step1=iters,
                          seed=seed, device="cpu", ckpt_every=1000, log_every=100)
        pretrain(cfg, steps=(1,), reporter=reporter)
        state = torch.load(Path(cfg.out) / "pretrain" / "step1.pth", weights_only=True)
    backbone_state = {k.removeprefix("backbone."): v for k, v in state["model"].items()
                      if k.startswith("backbone.")}
    atomic_write(out, lambda f: torch.save(backbone_state, f))
    meta = {"backbone": backbone, "channels": channels, "source_classes": SOURCE_CLASSES[1:],
            "seed": seed, "images": n_images, "iters": iters, "batch_size": batch_size, "lr": lr}
    atomic_write(out.with_suffix(".json"),
                 lambda f: f.write((json.dumps(meta, indent=1) + "\n").encode()))
    return {"out": str(out), **meta}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m discli.train.ship_weights",
                                     description=__doc__)
    parser.add_argument("--backbone", default="tiny", choices=["tiny", "small"])
    parser.add_argument("--channels", type=int, default=64)
    parser.add_argument("--out", default=None, help="default: the package's weights folder")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--iters", type=int, default=6000)
    args = parser.parse_args()
    torch.set_num_threads(1)  # the small backbones' convolutions do not split over threads
    print(json.dumps(make_weights(args.backbone, args.channels, out=args.out, seed=args.seed,
                                  n_images=args.images, iters=args.iters), indent=1))


if __name__ == "__main__":
    main()
