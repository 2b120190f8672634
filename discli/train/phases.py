"""What each training phase trains (section 3): its parts, their learning rates and modes, and
the losses it takes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from discli.model.losses import map_loss, recon_loss, recon_target, tag_loss
from discli.model.net import DISNet
from discli.train.keys import TrainConfig


@dataclass(frozen=True)
class Phase:
    name: str
    trainable: tuple[str, ...]  # top-level submodules of DISNet that learn in this phase
    losses: tuple[str, ...]  # subset of ("map", "img", "tag")
    # A phase that trains one part on one loss for that part's sake takes the loss at weight 1,
    # whatever the configured weight (which is about the features, e.g. loss_img = 0 in the M-step).
    unit_weights: bool = False


ALL = ("backbone", "subnet1", "subnet2", "subnet3")
PHASES = {
    # Section 3, fully-supervised stage: (1) backbone + subnets 1 and 3 on labelmaps and tags,
    # (2) subnet-2 alone on reconstruction, (3) everything jointly on all three losses.
    "step1": Phase("step1", ("backbone", "subnet1", "subnet3"), ("map", "tag")),
    "step2": Phase("step2", ("subnet2",), ("img",)),
    "step3": Phase("step3", ALL, ("map", "img", "tag")),
    "mstep": Phase("mstep", ALL, ("map", "img", "tag")),
    # Not in the paper (a departure of the presets, whose M-step has loss_img = 0): subnet-2,
    # untouched by such an M-step, is refitted alone to the new model's labelmaps, as step 2 of
    # pretraining does, or inference would reconstruct through a stale decoder.
    "refit": Phase("refit", ("subnet2",), ("img",), unit_weights=True),
}


def param_groups(model: DISNet, phase: Phase, cfg: TrainConfig) -> list[dict[str, Any]]:
    """Pretrained backbone layers at lr, new layers (image branch, subnets) at head_lr_mult*lr."""
    backbone, head = [], []
    for name, param in model.named_parameters():
        top = name.split(".")[0]
        param.requires_grad_(top in phase.trainable)
        if not param.requires_grad:
            continue
        is_new = top != "backbone" or name.startswith("backbone.image_branch")
        (head if is_new else backbone).append(param)
    groups = []
    if backbone:
        groups.append({"params": backbone, "lr": cfg.lr, "base_lr": cfg.lr})
    if head:
        lr = cfg.lr * cfg.head_lr_mult
        groups.append({"params": head, "lr": lr, "base_lr": lr})
    return groups


def set_train_modes(model: DISNet, phase: Phase, freeze_bn: bool) -> None:
    model.train()
    for name in ALL:
        if name not in phase.trainable:
            getattr(model, name).eval()  # frozen parts: no BatchNorm statistics updates
    if freeze_bn:
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()


def compute_losses(model: nn.Module, batch: dict[str, Any], phase: Phase, cfg: TrainConfig,
                   device: torch.device) -> dict[str, torch.Tensor]:
    images = batch["image"].to(device, non_blocking=True)
    out = model(images)
    losses: dict[str, torch.Tensor] = {}
    if "map" in phase.losses:
        labelmap = batch["labelmap"].to(device, non_blocking=True)
        weight = batch.get("pixel_weight")
        per_image = map_loss(out["u3"].float(), labelmap,
                             None if weight is None else weight.to(device))
        losses["map"] = per_image.mean()
    if "img" in phase.losses:
        target = recon_target(images, out["z3"].shape[-2:])
        losses["img"] = recon_loss(out["z3"].float(), target.float()).mean()
    if "tag" in phase.losses:
        losses["tag"] = tag_loss(out["v3"].float(), batch["tags"].to(device)).mean()
    weights = ({k: 1.0 for k in losses} if phase.unit_weights
               else {"map": cfg.loss_map, "img": cfg.loss_img, "tag": cfg.loss_tag})
    losses["loss"] = sum(weights[k] * v for k, v in losses.items())
    return losses
