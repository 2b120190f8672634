"""Make the shipped backbone weights: DIS step 1 on the synthetic source set (see
:mod:`discli.model.weights`, which only names and finds them).

``python -m discli.train.ship_weights --backbone tiny --channels 64`` (re)makes a file.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from discli.storage import atomic_write
from discli.synth import SOURCE_CLASSES, SynthConfig, generate_benchmark
from discli.train.keys import TrainConfig
from discli.train.pretrain import pretrain
from discli.model.weights import weights_file


@dataclass(frozen=True)
class WeightsRecipe:
    """What a shipped weights file is trained from: the backbone, ``n_images`` images of the
    source set, ``iters`` iterations of step 1 at ``batch_size`` and ``lr`` (written beside the
    file, as JSON)."""

    backbone: str = "tiny"
    channels: int = 64
    seed: int = 0
    n_images: int = 2000
    iters: int = 6000
    batch_size: int = 16
    lr: float = 0.002

    def config(self, labelled: str, out: str) -> TrainConfig:
        """Step 1's settings on the source set's manifest ``labelled``, into ``out``."""
        return TrainConfig(labelled=labelled, out=out, backbone=self.backbone,
                           channels=self.channels, optimizer="adamw", lr=self.lr,
                           head_lr_mult=1.0, weight_decay=1e-4, batch_size=self.batch_size,
                           crop_size=64, scale_min=0.75, scale_max=1.5, iters_step1=self.iters,
                           seed=self.seed, device="cpu", ckpt_every=1000, log_every=100)

    def meta(self) -> dict[str, Any]:
        """What the JSON beside the weights file says."""
        return {"backbone": self.backbone, "channels": self.channels,
                "source_classes": SOURCE_CLASSES[1:], "seed": self.seed,
                "images": self.n_images, "iters": self.iters, "batch_size": self.batch_size,
                "lr": self.lr}


def make_weights(recipe: WeightsRecipe = WeightsRecipe(), *, out: str | Path | None = None,
                 workdir: str | Path | None = None, reporter: Any = None) -> dict[str, Any]:
    """Generate the source set, train DIS step 1 (labelmaps + tags) on it, and save the
    backbone's state dict (image branch included) to ``out``; returns what was done."""
    out = Path(out) if out else weights_file(recipe.backbone, recipe.channels)
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        info = generate_benchmark(Path(tmp) / "source", SynthConfig(
            seed=recipe.seed, n_labelled=recipe.n_images, n_tagged=0, n_test=0,
            classes=SOURCE_CLASSES, difficulty="medium"))
        cfg = recipe.config(info["manifests"]["train"], str(Path(tmp) / "run"))
        pretrain(cfg, steps=(1,), reporter=reporter)
        state = torch.load(Path(cfg.out) / "pretrain" / "step1.pth", weights_only=True)
    backbone_state = {k.removeprefix("backbone."): v for k, v in state["model"].items()
                      if k.startswith("backbone.")}
    atomic_write(out, lambda f: torch.save(backbone_state, f))
    meta = recipe.meta()
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
    recipe = WeightsRecipe(args.backbone, args.channels, seed=args.seed, n_images=args.images,
                           iters=args.iters)
    print(json.dumps(make_weights(recipe, out=args.out), indent=1))


if __name__ == "__main__":
    main()
