"""The three losses of DIS, each returned per image (shape (B,)).

Per-image values let feature-space inference sum them over a batch, so that an image's update does
not depend on which other images share its batch; training takes their mean.

Resolution choices:
- labelmap: the logits u3 (stride 8) are upsampled bilinearly to the labelmap's size and scored
  with cross-entropy, ignore index 255 (torchvision's references do the same).
- reconstruction: the target is the normalised input image average-pooled to the feature size
  (h, w) of u3; the loss is the squared error averaged over pixels and the 3 channels.
- tags: multi-label, one sigmoid cross-entropy per class, averaged over the K classes; background
  is a tag that is always present.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from discli.data.labelmap import IGNORE as IGNORE_INDEX  # void: no loss


def recon_target(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    return F.adaptive_avg_pool2d(images, size)


def recon_loss(z3: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (z3 - target).pow(2).mean(dim=(1, 2, 3))


def tag_loss(v3: torch.Tensor, tags: torch.Tensor) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(v3, tags.to(v3.dtype), reduction="none").mean(dim=1)


def map_loss(u3: torch.Tensor, labelmap: torch.Tensor,
             weight: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy per image; ``weight`` (B,H,W) optionally weights pixels (e.g. confidence)."""
    logits = F.interpolate(u3, size=labelmap.shape[-2:], mode="bilinear", align_corners=False)
    pixel = F.cross_entropy(logits, labelmap.long(), ignore_index=IGNORE_INDEX, reduction="none")
    valid = (labelmap != IGNORE_INDEX).to(pixel.dtype)
    if weight is not None:
        valid = valid * weight.to(pixel.dtype)
    return (pixel * valid).sum(dim=(1, 2)) / valid.sum(dim=(1, 2)).clamp_min(1.0)
