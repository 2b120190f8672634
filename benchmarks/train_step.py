"""One training step of DIS against torchvision's DeepLabv3-ResNet101, same input and batch.

    python benchmarks/train_step.py                    # 321x321, batch 2, 5 rounds after 2 warm-up
    python benchmarks/train_step.py --channels-last    # both models and inputs in channels_last
    python benchmarks/train_step.py --backbone tiny --size 129 --reps 2   # smoke run

Both models have random weights (no download). A step is forward, backward and an SGD update
(momentum 0.9, weight decay 5e-4), with every parameter trainable:

- DIS: the fully-supervised joint step (section 3, step 3; also the M-step): labelmap
  cross-entropy on u3 + image reconstruction on z3 + tag loss on v3. When ``discli.train.engine``
  is installed its own ``compute_losses`` / ``param_groups`` / ``set_train_modes`` run the step,
  otherwise an equivalent inline version does.
- DeepLabv3: ``torchvision.models.segmentation.deeplabv3_resnet101(weights=None,
  weights_backbone=None, num_classes=21)``, cross-entropy (ignore 255) on its full-size output.

Prints seconds per step (median of interleaved rounds), images per second and the throughput ratio
DIS / DeepLabv3 (target of issue 7: >= 1), then a forward-only breakdown of where each model's
time goes (backbone vs head).
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from _common import add_common_args, describe_machine, gflops, interleaved, load_note, median, setup

from discli.model.losses import map_loss, recon_loss, recon_target, tag_loss


def dis_step_fn(model, images, labelmap, tags, device):
    """A closure running one DIS training step; uses discli.train.engine when present."""
    try:
        from discli.train.keys import TrainConfig
        from discli.train.phases import PHASES, compute_losses, param_groups, set_train_modes
    except ImportError:
        engine = None
    else:
        engine = (TrainConfig, PHASES, compute_losses, param_groups, set_train_modes)
    if engine is not None:
        TrainConfig, PHASES, compute_losses, param_groups, set_train_modes = engine
        cfg = TrainConfig()
        phase = PHASES["step3"]
        optimizer = torch.optim.SGD(param_groups(model, phase, cfg), lr=cfg.lr,
                                    momentum=cfg.momentum, weight_decay=cfg.weight_decay)
        set_train_modes(model, phase, cfg.freeze_bn)
        batch = {"image": images, "labelmap": labelmap, "tags": tags}

        def step() -> float:
            optimizer.zero_grad(set_to_none=True)
            loss = compute_losses(model, batch, phase, cfg, device)["loss"]
            loss.backward()
            optimizer.step()
            return float(loss.detach())

        return step, "discli.train.engine (step3: map + img + tag)"

    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    model.train()

    def step() -> float:
        optimizer.zero_grad(set_to_none=True)
        out = model(images)
        loss = (map_loss(out["u3"], labelmap).mean()
                + recon_loss(out["z3"], recon_target(images, out["z3"].shape[-2:])).mean()
                + tag_loss(out["v3"], tags).mean())
        loss.backward()
        optimizer.step()
        return float(loss.detach())

    return step, "inline (map + img + tag)"


def deeplab_step_fn(model, images, labelmap):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    model.train()

    def step() -> float:
        optimizer.zero_grad(set_to_none=True)
        out = model(images)["out"]
        loss = F.cross_entropy(out, labelmap, ignore_index=255)
        loss.backward()
        optimizer.step()
        return float(loss.detach())

    return step


def forward_breakdown(dis, deeplab, images, reps: int, device) -> None:
    """Forward-only (inference mode) time of each model's backbone and head."""
    was = dis.training, deeplab.training
    dis.eval()
    deeplab.eval()
    with torch.inference_mode():
        u1, v1 = dis.features(images)
        feats = deeplab.backbone(images)["out"]
        parts = {
            "DIS backbone": lambda: dis.features(images),
            "DIS subnets 1-3": lambda: dis.heads(u1, v1),
            "DeepLab backbone": lambda: deeplab.backbone(images),
            "DeepLab head (ASPP)": lambda: F.interpolate(deeplab.classifier(feats),
                                                         size=images.shape[-2:],
                                                         mode="bilinear", align_corners=False),
        }
        times = interleaved(parts, reps, 1, device, log=False)
    dis.train(was[0])
    deeplab.train(was[1])
    print("forward only (inference mode), seconds per batch:")
    for name, values in times.items():
        print(f"  {name:<22} {median(values):7.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(parser, reps=5)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--no-breakdown", action="store_true")
    args = parser.parse_args()
    from torchvision.models.segmentation import deeplabv3_resnet101

    device, dis = setup(args)
    dis.train()  # timed as a training step, like deeplab below
    deeplab = deeplabv3_resnet101(weights=None, weights_backbone=None,
                                  num_classes=args.classes).to(device)
    images = torch.randn(args.batch, 3, args.size, args.size, device=device)
    labelmap = torch.randint(0, args.classes, (args.batch, args.size, args.size), device=device)
    labelmap[:, :8] = 255  # some ignored pixels, as in padded crops
    tags = (torch.rand(args.batch, args.classes, device=device) > 0.7).float()
    tags[:, 0] = 1
    if args.channels_last:
        dis = dis.to(memory_format=torch.channels_last)
        deeplab = deeplab.to(memory_format=torch.channels_last)
        images = images.contiguous(memory_format=torch.channels_last)

    print(describe_machine(device))
    dis_step, how = dis_step_fn(dis, images, labelmap, tags, device)
    print(f"input {args.batch}x3x{args.size}x{args.size}, K={args.classes}, random weights, "
          f"{'channels_last' if args.channels_last else 'contiguous (NCHW)'}, "
          f"{args.warmup} warm-up + {args.reps} rounds (median), device {device.type}")
    print(f"DIS {args.backbone} step: {how}; DeepLabv3-ResNet101 step: torchvision")
    steps = {"DIS": dis_step, "DeepLabv3": deeplab_step_fn(deeplab, images, labelmap)}
    flops = {name: gflops(fn) for name, fn in steps.items()}
    start = time.perf_counter()
    times = interleaved(steps, args.reps, args.warmup, device)
    step = {name: median(values) for name, values in times.items()}
    for name, seconds in step.items():
        print(f"  {name:<10} {seconds:7.3f} s/step   {args.batch / seconds:6.3f} images/s   "
              f"{flops[name]:7.1f} GFLOP/step   {flops[name] / seconds:6.1f} GFLOP/s")
    print(f"  throughput ratio DIS / DeepLabv3: {step['DeepLabv3'] / step['DIS']:.3f}")
    print(f"  (measured in {time.perf_counter() - start:.0f} s)")
    if not args.no_breakdown:
        forward_breakdown(dis, deeplab, images, max(2, args.reps // 2), device)
    print(load_note())


if __name__ == "__main__":
    main()
