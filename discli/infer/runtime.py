"""The one batched-inference runtime behind ``dis infer``, ``dis evaluate``, the E-step and the
demo's figure.

Data path: image -> backbone -> model (:mod:`discli.model.net`) -> feature inference
(:mod:`discli.infer.loop`) -> this runtime -> {:mod:`discli.infer.predict`,
:mod:`discli.evaluation.evaluate`, :mod:`discli.train.estep` -> :mod:`discli.pseudo.cache` ->
M-step, :mod:`discli.demo.report`}.

Batching. Images are batched only with images of the *same size* (never padded: padding would
change avgpool(u1) and the borders, so an image's result would depend on its batch mates). The
plan comes from the image headers (:func:`image_sizes`) and is made by rank 0 alone; under
torchrun the ranks take its batches round-robin (:func:`discli.distributed.shard`), so every
image is computed exactly once, in the batch it would have had in one process
(:func:`shared_plan`). Two orders (:func:`plan_batches`): the *stream* order a single process
forms while decoding (:func:`size_batches`: roughly input order, at most a few batches waiting
for mates), and the *resumable* order of the E-step (sizes sorted, each size's images in
consecutive slices, so that removing finished batches leaves the others exactly as planned).

Inference of a batch (:func:`infer_views`): normalised images, the backbone forward under
autocast (AMP on CUDA only, :func:`autocast`), ``infer_steps`` snapshotted at every requested t
(with noisy tags: training-time inference), and each view's probabilities upsampled bilinearly
(align_corners=False) to the image size. Views (the paper's Table 4, column "multi."): every scale
(the normalised image resized bilinearly, as in DeepLab and mmsegmentation) and, with ``flip``,
its mirror image get their own forward and inference; the upsampled probabilities (mirrored back)
and the tag probabilities are averaged. The single view (scale 1.0, no flip) is exactly the plain
path: one forward, the probabilities upsampled.

Settings of a run, each travelling as one object: :class:`Views` (the views of every image),
:class:`RunOptions` (batch size, device, autocast, views, loader workers: how `dis infer` and
`dis evaluate` run their batches) and :class:`InferenceOverrides` (the inference settings given
on the command line over the checkpoint's).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from discli.distributed import DistInfo, on_main, shard
from discli.errors import UsageError
from discli.infer.loop import InferenceConfig, InferenceResult, infer_steps
from discli.model.net import DISNet

if TYPE_CHECKING:
    from discli.infer.checkpoint import LoadedModel

MIN_SIDE = 8  # one feature cell at output stride 8

# ------------------------------------------------------------------------------------ batching


def image_sizes(paths: Iterable[str | Path]) -> list[tuple[int, int]]:
    """(H, W) of every image as it will be decoded (EXIF rotation applied), from the headers;
    a missing, empty or unreadable file is a BadInputError naming it."""
    from discli.data.images import probe_image

    return [probe_image(path) for path in paths]


def size_batches(items: Iterable[Any], size_of: Callable[[Any], tuple[int, ...]],
                 batch_size: int, max_pending: int | None = None) -> Iterator[list[Any]]:
    """Group a stream into batches of items of equal size, in roughly input order.

    At most ``max_pending`` items (default 4 batches) wait for mates: past that, the fullest
    bucket goes out even if short, so memory stays bounded on sets with many sizes.
    """
    max_pending = max_pending or 4 * batch_size
    buckets: dict[tuple[int, ...], list[Any]] = {}
    pending = 0
    for item in items:
        bucket = buckets.setdefault(tuple(size_of(item)), [])
        bucket.append(item)
        pending += 1
        if len(bucket) >= batch_size:
            pending -= len(bucket)
            yield buckets.pop(tuple(size_of(item)))
        elif pending > max_pending:
            key = max(buckets, key=lambda k: len(buckets[k]))
            pending -= len(buckets[key])
            yield buckets.pop(key)
    yield from buckets.values()


def plan_batches(sizes: Sequence[Sequence[int]], batch_size: int,
                 indices: Iterable[int] | None = None, *, resumable: bool = False
                 ) -> list[list[int]]:
    """Batches of indices into ``sizes`` (of ``indices`` only, when given) whose images share
    one size. Stream order (default): the batches :func:`size_batches` forms over a stream of
    items of these sizes, i.e. what one process streaming the decoded images would do.
    ``resumable``: sizes sorted, each size's indices in consecutive slices (the E-step)."""
    indices = range(len(sizes)) if indices is None else list(indices)
    if not resumable:
        return list(size_batches(indices, lambda i: tuple(sizes[i]), batch_size))
    by_size: dict[tuple[int, ...], list[int]] = {}
    for i in indices:
        by_size.setdefault(tuple(sizes[i]), []).append(i)
    batches = []
    for size in sorted(by_size):
        members = by_size[size]
        batches += [members[k:k + batch_size] for k in range(0, len(members), batch_size)]
    return batches


def shared_plan(paths: Callable[[], Sequence[str | Path]], batch_size: int, info: DistInfo,
                indices: Callable[[], Iterable[int]] | None = None, resumable: bool = False
                ) -> list[list[int]]:
    """This rank's batches of :func:`plan_batches` over the images at ``paths()``: rank 0 probes
    the headers and plans, every rank takes its share round-robin (a collective under
    torchrun; every rank gets ``[]`` or more, never padding)."""
    planned = on_main(lambda: plan_batches(image_sizes(paths()), batch_size,
                                           None if indices is None else indices(),
                                           resumable=resumable))
    return shard(planned, info)


# ------------------------------------------------------------------------------------- views


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


@dataclass(frozen=True)
class Views:
    """The views of every image whose probabilities are averaged (``--scales``, ``--flip``);
    the default is the single plain view."""

    scales: Sequence[float] = (1.0,)
    flip: bool = False

    def checked(self) -> Views:
        """The scales checked (:func:`check_scales`; a :class:`UsageError` naming the option)
        and made floats."""
        try:
            return Views(check_scales(self.scales), bool(self.flip))
        except ValueError as exc:
            raise UsageError(str(exc)) from None

    def pairs(self) -> list[tuple[float, bool]]:
        """(scale, mirrored) of every view, in the order they run; scales checked
        (ValueError)."""
        mirrored = (False, True) if self.flip else (False,)
        return [(s, f) for s in check_scales(self.scales) for f in mirrored]

    def record(self) -> dict[str, Any]:
        """As a run records them: ``{"scales": [...], "flip": ...}``."""
        return {"scales": list(self.scales), "flip": self.flip}


def _resize(images: torch.Tensor, scale: float) -> torch.Tensor:
    if scale == 1.0:
        return images
    h, w = images.shape[-2:]
    size = (max(MIN_SIDE, round(h * scale)), max(MIN_SIDE, round(w * scale)))
    return F.interpolate(images, size=size, mode="bilinear", align_corners=False)


# ------------------------------------------------------------------------------- run settings


@dataclass(frozen=True)
class RunOptions:
    """How a command runs its batches: images per batch, the device ("cpu", "cuda", a
    torch.device; the checkpoint entry points also take None or "auto":
    :func:`discli.distributed.resolve_device`), the backbone's autocast (:func:`autocast`), the
    views of every image, and the DataLoader's workers (`dis evaluate`; `dis infer` decodes
    its images as it goes)."""

    batch_size: int = 8
    device: str | torch.device | None = "cpu"
    amp: bool = False
    views: Views = field(default_factory=Views)
    num_workers: int = 0


@dataclass(frozen=True)
class InferenceOverrides:
    """The inference settings given on the command line (``--lr``, ``--momentum``); each one
    left None is the checkpoint's (what the model was trained with)."""

    lr: float | None = None
    momentum: float | None = None

    def config(self, loaded: LoadedModel, steps: int | None = None) -> InferenceConfig:
        """The checkpoint's inference settings with these over them, at ``steps`` (t)."""
        return loaded.inference_config(steps, lr=self.lr, momentum=self.momentum)


# --------------------------------------------------------------------------------- inference


def normalize_batch(images: Sequence[np.ndarray], device: str | torch.device = "cpu"
                    ) -> torch.Tensor:
    """Decoded RGB images (H, W, 3) uint8 of one size -> a normalised batch (B, 3, H, W)."""
    from discli.data.dataset import normalize

    return torch.stack([torch.as_tensor(normalize(image)) for image in images]).to(device)


def autocast(device: torch.device, amp: bool) -> torch.autocast:
    """The backbone forward's autocast: float16 when ``amp`` on CUDA, else off."""
    return torch.autocast("cuda", dtype=torch.float16, enabled=amp and device.type == "cuda")


def run_inference(model: DISNet, images: torch.Tensor, steps: Sequence[int],
                  cfg: InferenceConfig, amp: bool = False, tags: torch.Tensor | None = None
                  ) -> dict[int, InferenceResult]:
    """:func:`infer_steps` with the backbone forward under :func:`autocast`."""
    with autocast(images.device, amp):
        return infer_steps(model, images, steps, cfg, tags=tags)


def upsample_probs(probs: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Probabilities (B,K,h,w) -> (B,K,H,W), bilinear, align_corners=False."""
    return F.interpolate(probs.float(), size=size, mode="bilinear", align_corners=False)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class FullResult:
    probs: torch.Tensor  # (B,K,H,W) final class probabilities at the image size, views averaged
    tag_probs: torch.Tensor  # (B,K) sigmoid(v3), views averaged
    loss: torch.Tensor  # (B,) the inference objective after the last step, views averaged
    # (B,K,H,W) softmax(u3), the labelmap head's probabilities (``labelmap_probs=True``)
    labelmap_probs: torch.Tensor | None = None

    def _add(self, other: FullResult) -> None:
        self.probs += other.probs
        self.tag_probs += other.tag_probs
        self.loss += other.loss
        if self.labelmap_probs is not None and other.labelmap_probs is not None:
            self.labelmap_probs += other.labelmap_probs

    def _scale(self, factor: float) -> None:
        for tensor in (self.probs, self.tag_probs, self.loss, self.labelmap_probs):
            if tensor is not None:
                tensor /= factor


def infer_views(model: DISNet, images: torch.Tensor, steps: Sequence[int], cfg: InferenceConfig,
                views: Views = Views(), amp: bool = False, tags: torch.Tensor | None = None,
                labelmap_probs: bool = False) -> dict[int, FullResult]:
    """Full-resolution probabilities of a batch of same-size normalised images, for every t
    of ``steps``, averaged over ``views`` (see the module docstring). ``tags`` (B,K) of
    0/1: training-time inference against them; ``labelmap_probs``: also the upsampled
    softmax(u3) of every t."""
    size = tuple(images.shape[-2:])
    acc: dict[int, FullResult] = {}
    all_views = views.pairs()
    for scale, mirrored in all_views:
        view = _resize(images, scale)
        if mirrored:
            view = view.flip(-1)
        results = run_inference(model, view, list(steps), cfg, amp, tags)
        for t in steps:
            maps = [results[t].probs]
            if labelmap_probs:
                maps.append(results[t].u3.float().softmax(dim=1))
            full = [upsample_probs(m, size) for m in maps]  # type: ignore[arg-type]
            if mirrored:
                full = [m.flip(-1) for m in full]
            result = FullResult(full[0], results[t].tag_probs.float(),
                                results[t].losses[:, -1].float(),
                                full[1] if labelmap_probs else None)
            if t in acc:
                acc[t]._add(result)
            else:
                acc[t] = result
    if len(all_views) > 1:
        for result in acc.values():
            result._scale(len(all_views))
    return acc
