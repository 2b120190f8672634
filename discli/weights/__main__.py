"""``python -m discli.weights --backbone tiny --channels 64``: (re)make shipped weights."""

from __future__ import annotations

import argparse
import json

import torch

from discli.weights.make import make_weights


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m discli.weights", description=__doc__)
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
