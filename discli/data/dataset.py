"""Loading a manifest for training and evaluation: a torch Dataset, transforms and collation.

Every item is a dict::

    id            str
    index         int, position in the manifest
    image         float32 (3, H, W), normalised with the ImageNet mean and std
    labelmap      int64 (H, W), 255 = ignore; all 255 when the record has none
    tags          float32 (K,), multi-hot, background (index 0) = 1
    has_labelmap  bool
    size          (H, W) of the image file, before any transform

Files are opened in ``__getitem__`` only, so the dataset pickles cheaply into DataLoader workers.
Transforms are torchvision ``transforms.v2`` pipelines called as ``transform(image, mask)`` on a
``tv_tensors.Image`` (uint8) and a ``tv_tensors.Mask``, so geometric ops move both together
(the mask with nearest-neighbour interpolation) and padding fills the image with 0 (the mean,
after normalisation) and the mask with 255 (ignored by the loss).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from discli.data.images import header_orientation, read_image, size_mismatch
from discli.data.manifest import Manifest
from discli.data.labelmap import IGNORE, read_labelmap
from discli.errors import BadInputError, warn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

Transform = Callable[[tv_tensors.Image, tv_tensors.Mask], tuple[torch.Tensor, torch.Tensor]]


def _stats(like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    shape = (3, 1, 1) if like.dim() == 3 else (1, 3, 1, 1)
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32, device=like.device).view(shape)
    std = torch.tensor(IMAGENET_STD, dtype=torch.float32, device=like.device).view(shape)
    return mean, std


def normalize(img: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 (H, W, 3) array, or a (3, H, W) / (B, 3, H, W) tensor (uint8, or float in [0, 1])
    -> float32 tensor (…, 3, H, W) normalised with the ImageNet mean and std."""
    if isinstance(img, np.ndarray):
        if img.ndim != 3 or img.shape[2] != 3:
            raise ValueError(f"expected an (H, W, 3) array, got shape {img.shape}")
        img = torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1)
    x = img.float() / 255.0 if img.dtype == torch.uint8 else img.float()
    mean, std = _stats(x)
    return (x - mean) / std


def denormalize(x: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`normalize`: float in [0, 1] (clamped), same shape."""
    mean, std = _stats(x)
    return (x.float() * std + mean).clamp(0.0, 1.0)


class RandomScale:
    """Resize image and mask together by a factor drawn uniformly from ``scale``.

    (v2.RandomResize draws a target *size*; DeepLab-style training draws a *factor* of the
    image's own size, which keeps small and large images in proportion.)
    """

    def __init__(self, scale: tuple[float, float] = (0.5, 2.0)):
        self.scale = scale

    def __call__(self, image: tv_tensors.Image, mask: tv_tensors.Mask
                 ) -> tuple[tv_tensors.Image, tv_tensors.Mask]:
        lo, hi = self.scale
        s = lo + (hi - lo) * float(torch.rand(()))  # torch RNG: seeded per DataLoader worker
        h, w = image.shape[-2:]
        size = [max(1, round(h * s)), max(1, round(w * s))]
        return (TF.resize(image, size, antialias=True),
                TF.resize(mask, size, interpolation=v2.InterpolationMode.NEAREST))


def _normalise_steps() -> list[Any]:
    return [v2.ToDtype({tv_tensors.Image: torch.float32, "others": None}, scale=True),
            v2.Normalize(mean=list(IMAGENET_MEAN), std=list(IMAGENET_STD))]


def train_transform(crop_size: int, scale: tuple[float, float] = (0.5, 2.0),
                    hflip: bool = True, strong: bool = False) -> v2.Compose:
    """Random scale, horizontal flip, normalisation, then a random ``crop_size`` square crop;
    images smaller than the crop are padded (image 0 = the mean after normalisation, labelmap
    255) so every item of a batch has the same size. ``strong`` adds photometric perturbations
    of the image alone (brightness, contrast, saturation, grey, blur; no hue change, which
    would change what colour a class has), the "strong view" of consistency-based
    semi-supervised segmentation (FixMatch, UniMatch): the student must reproduce on it the
    pseudo-label inferred from the clean image."""
    steps: list[Any] = [RandomScale(scale)]
    if hflip:
        steps.append(v2.RandomHorizontalFlip(p=0.5))
    if strong:
        steps += [v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.4)], p=0.8),
                  v2.RandomGrayscale(p=0.1),
                  v2.RandomApply([v2.GaussianBlur(5, sigma=(0.1, 1.5))], p=0.3)]
    steps += _normalise_steps()
    steps.append(v2.RandomCrop(crop_size, pad_if_needed=True,
                               fill={tv_tensors.Image: 0.0, tv_tensors.Mask: IGNORE}))
    return v2.Compose(steps)


def eval_transform() -> v2.Compose:
    """Normalisation only: evaluation sees every image at its own size."""
    return v2.Compose(_normalise_steps())


class DataItemError(BadInputError):
    """A :class:`BadInputError` that stays one line when raised inside a DataLoader worker.

    torch re-raises a worker's exception in the main process as ``type(exc)(text)``, where the
    text is "Caught ... in DataLoader worker process N. Original Traceback ..." ending with the
    line ``<module>.DataItemError: <message>``. This constructor recovers that message, so the
    CLI still prints ``dis: error: <file>: <problem>`` and exits 3.
    """

    def __init__(self, message: str, path: object | None = None):
        if path is None and "Original Traceback" in message:
            last = message.rstrip().splitlines()[-1]
            message = last.split(": ", 1)[1] if ": " in last else last
        super().__init__(message, path)


def warn_exif_rotation(manifest: Manifest) -> int:
    """Warn once when images with labelmaps carry an EXIF orientation tag; returns how many.

    dis reads images rotated as a viewer shows them (:func:`discli.data.images.read_image`), so
    a labelmap must be drawn on the rotated image. One drawn on the stored pixels is refused
    when the sizes disagree, but a square image's do not: it would train misaligned without a
    word. Only the headers are read (a fraction of a millisecond per image)."""
    tagged = [path for path in (manifest.image_path(rec) for rec in manifest.records
                                if rec.labelmap)
              if header_orientation(path) != 1]
    if tagged:
        warn(f"{len(tagged)} image(s) with a labelmap carry an EXIF orientation tag (first: "
             f"{tagged[0]}); dis reads them rotated, as a viewer shows them, so their labelmaps "
             f"must be drawn on the rotated image: rotate the labelmaps, or remove the tags "
             f"(exiftool -Orientation= FILE)", manifest.path)
    return len(tagged)


class DecodedMemo:
    """Decoded inputs by index, kept up to ``limit_bytes`` (then the rest is decoded each time).

    Training draws the same few hundred or thousand images thousands of times: decoding their
    JPEGs and PNGs again every time was a sixth of a training step of the demo. The held arrays
    are read only (every transform makes new tensors), so an item is the same with or without
    the memo. Each DataLoader worker holds its own."""

    def __init__(self, limit_bytes: int):
        self.limit = limit_bytes
        self.used = 0
        self.held: dict[int, tuple[Any, ...]] = {}

    def get(self, index: int, decode: Callable[[int], tuple[Any, ...]]) -> tuple[Any, ...]:
        found = self.held.get(index)
        if found is not None:
            return found
        found = decode(index)
        size = sum(a.nbytes for a in found if isinstance(a, (np.ndarray, torch.Tensor)))
        if self.used + size <= self.limit:
            self.held[index] = found
            self.used += size
        return found


class SegDataset(torch.utils.data.Dataset):
    def __init__(self, manifest: Manifest, transform: Transform | None = None,
                 use_labelmaps: bool = True):
        self.manifest = manifest
        self.transform = transform if transform is not None else eval_transform()
        self.use_labelmaps = use_labelmaps
        self.memo: DecodedMemo | None = None  # keep_decoded() turns it on (training)
        if use_labelmaps:
            warn_exif_rotation(manifest)

    def keep_decoded(self, limit_mb: int) -> None:
        """Keep up to ``limit_mb`` MB of decoded inputs in memory (0: none). A memo of that size
        stays as it is, so a dataset that trains several phases decodes its files once."""
        limit = limit_mb * 2**20
        if self.memo is None or self.memo.limit != limit:
            self.memo = DecodedMemo(limit) if limit > 0 else None

    def __len__(self) -> int:
        return len(self.manifest.records)

    def __getitem__(self, index: int) -> dict[str, Any]:
        try:
            return self._load(index)
        except BadInputError as exc:
            raise DataItemError(str(exc)) from None

    def decoded(self, index: int, decode: Callable[[int], tuple[Any, ...]]) -> tuple[Any, ...]:
        """``decode(index)``, through the memo when :meth:`keep_decoded` turned it on."""
        return self.memo.get(index, decode) if self.memo else decode(index)

    def _load(self, index: int) -> dict[str, Any]:
        image_id, image, labelmap, tags, has_labelmap = self.decoded(index, self._decode)
        return self.make_item(image_id, index, image, labelmap, tags.clone(), has_labelmap)

    def _decode(self, index: int) -> tuple[str, np.ndarray, np.ndarray, torch.Tensor, bool]:
        rec = self.manifest.records[index]
        image = read_image(self.manifest.image_path(rec))
        h, w = image.shape[:2]
        lm_path = self.manifest.labelmap_path(rec) if self.use_labelmaps else None
        if lm_path is not None:
            labelmap = read_labelmap(lm_path, len(self.manifest.classes))
            if labelmap.shape != (h, w):
                raise BadInputError(size_mismatch(labelmap.shape, self.manifest.image_path(rec),
                                                  (h, w), name_image=False), lm_path)
        else:
            labelmap = np.full((h, w), IGNORE, dtype=np.uint8)
        return rec.id, image, labelmap, self.manifest.tag_vector(rec), lm_path is not None

    def make_item(self, image_id: str, index: int, image: np.ndarray, labelmap: np.ndarray,
                  tags: torch.Tensor, has_labelmap: bool) -> dict[str, Any]:
        """Apply the joint transform to an (image, labelmap) pair and build the item dict
        (subclasses with other label sources, e.g. pseudo-labels, reuse it)."""
        img_t, mask_t = self.transform(
            tv_tensors.Image(torch.from_numpy(image).permute(2, 0, 1)),
            tv_tensors.Mask(torch.from_numpy(labelmap)))
        return {"id": image_id, "index": index,
                "image": img_t.as_subclass(torch.Tensor).float().contiguous(),
                "labelmap": mask_t.as_subclass(torch.Tensor).long().contiguous(),
                "tags": tags, "has_labelmap": has_labelmap, "size": image.shape[:2]}


def collate(batch: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack items, padding images with 0 and labelmaps with 255 at the bottom and right up to
    the largest height and width in the batch (no resizing: evaluation keeps native sizes)."""
    H = max(item["image"].shape[-2] for item in batch)
    W = max(item["image"].shape[-1] for item in batch)
    images = torch.zeros(len(batch), 3, H, W, dtype=torch.float32)
    labelmaps = torch.full((len(batch), H, W), IGNORE, dtype=torch.int64)
    for i, item in enumerate(batch):
        h, w = item["image"].shape[-2:]
        images[i, :, :h, :w] = item["image"]
        labelmaps[i, :h, :w] = item["labelmap"]
    return {"id": [item["id"] for item in batch],
            "index": torch.tensor([item["index"] for item in batch], dtype=torch.int64),
            "image": images, "labelmap": labelmaps,
            "tags": torch.stack([item["tags"] for item in batch]),
            "has_labelmap": torch.tensor([item["has_labelmap"] for item in batch]),
            "size": [tuple(item["size"]) for item in batch]}
