"""Multi-scale and flip testing (the paper's Table 4, column "multi."), combined with t_ts.

Every *view* of a batch (each scale, and each mirrored when ``flip``) gets its own backbone
forward and its own feature inference, snapshotted at every requested t; each view's final
probabilities are upsampled to the image size (mirrored back where flipped) and the views are
averaged, per t. The tag probabilities are averaged the same way. With the single view
(scale 1.0, no flip) this is exactly the plain path: one forward, the probabilities upsampled.

As in DeepLab and mmsegmentation, a scale resizes the normalised image bilinearly
(align_corners=False), so that the network sees objects larger or smaller than in the image.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from discli.inference import InferenceConfig
from discli.model import DISNet

MIN_SIDE = 8  # one feature cell at output stride 8


@dataclass
class FullResult:
    probs: torch.Tensor  # (B,K,H,W) final class probabilities at the image size, views averaged
    tag_probs: torch.Tensor  # (B,K) sigmoid(v3), views averaged
    loss: torch.Tensor  # (B,) the inference objective after the last step, views averaged


def check_scales(scales: Sequence[float]) -> tuple[float, ...]:
    """Scales must be finite, positive and at most 4 (a 4x image already costs 16 forwards)."""
    if not scales:
        raise ValueError("scales: give at least one scale, e.g. 1.0")
    for s in scales:
        if not (isinstance(s, (int, float)) and 0 < float(s) <= 4.0):  # NaN fails this too
            raise ValueError(f"scales: {s!r} is not a number in (0, 4]")
    return tuple(float(s) for s in scales)


def parse_scales(text: str) -> tuple[float, ...]:
    """"0.5,0.75,1.0" -> (0.5, 0.75, 1.0), checked."""
    try:
        values = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"scales: expected comma-separated numbers, got {text[:80]!r}") from None
    return check_scales(values)


def views(scales: Sequence[float], flip: bool) -> list[tuple[float, bool]]:
    return [(s, f) for s in scales for f in ((False, True) if flip else (False,))]


def _resize(images: torch.Tensor, scale: float) -> torch.Tensor:
    if scale == 1.0:
        return images
    h, w = images.shape[-2:]
    size = (max(MIN_SIDE, round(h * scale)), max(MIN_SIDE, round(w * scale)))
    return F.interpolate(images, size=size, mode="bilinear", align_corners=False)


def infer_views(model: DISNet, images: torch.Tensor, steps: Sequence[int], cfg: InferenceConfig,
                scales: Sequence[float] = (1.0,), flip: bool = False, amp: bool = False
                ) -> dict[int, FullResult]:
    """Full-resolution probabilities of a batch of same-size normalised images, for every t."""
    from discli.predict import run_inference, upsample_probs

    size = tuple(images.shape[-2:])
    acc: dict[int, FullResult] = {}
    all_views = views(check_scales(scales), flip)
    for scale, mirrored in all_views:
        view = _resize(images, scale)
        if mirrored:
            view = view.flip(-1)
        results = run_inference(model, view, list(steps), cfg, amp)
        for t in steps:
            probs = upsample_probs(results[t].probs, size)  # type: ignore[arg-type]
            if mirrored:
                probs = probs.flip(-1)
            tags = results[t].tag_probs.float()
            loss = results[t].losses[:, -1].float()
            if t in acc:
                acc[t].probs += probs
                acc[t].tag_probs += tags
                acc[t].loss += loss
            else:
                acc[t] = FullResult(probs, tags, loss)
    if len(all_views) > 1:
        for result in acc.values():
            result.probs /= len(all_views)
            result.tag_probs /= len(all_views)
            result.loss /= len(all_views)
    return acc
