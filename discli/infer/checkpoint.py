"""Checkpoints: one file that rebuilds the model and resumes training.

A checkpoint is a dict saved with ``torch.save`` and loaded with ``weights_only=True`` only (no
pickle code ever runs). Keys: ``format`` ("dis-checkpoint"), ``format_version``, ``model`` (state
dict), ``model_config`` (:class:`discli.model.net.ModelConfig` as a dict), ``classes`` (names, index
order, background first), and for training ``optimizer``, ``scheduler``, ``stage``, ``step``,
``iteration``, ``rng`` and ``config``, and ``inference`` (the run's inference settings, which
the inference commands default to: :func:`inference_settings`; older checkpoints lack it).
Writes are atomic (:func:`discli.storage.atomic_write`: a temporary file in the same folder,
flushed to disk, then renamed onto the final name), so a kill never leaves a torn file.

A checkpoint carries ``digest``, the SHA-256 of its content (:func:`content_digest`: every
tensor's dtype, shape and bytes, every other value's repr, in the order saved), computed when
it is written and checked when it is loaded: torch does not check the CRCs of its zip archive,
so without it one flipped bit in a weight loads silently and changes every prediction. The digest
is of the content, not of the file's bytes, so it is checked on the tensors already in memory,
without reading the file twice (SHA-256 at about 1 GB/s on one core: 0.17 s for ResNet-101's
172 MiB, benchmarks/checkpoint_digest.py). A file without the key (written by an earlier dis)
loads unverified.

A checkpoint is untrusted input: before anything is allocated, :func:`check_model_config` checks
its ``model_config`` (types and bounds) and :func:`model_from_checkpoint` builds the network on
PyTorch's ``meta`` device (shapes only, no memory) and compares every tensor shape the
configuration implies with the tensors the file holds. A file claiming ``channels: 300000``
while holding a small model is refused instead of allocating terabytes; the real network is
built only when its tensors are exactly those the file already holds in memory.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from discli.storage import atomic_write

atomic_write_bytes = atomic_write  # the name earlier releases exported (CHANGELOG 0.x)
from discli.errors import (BadInputError, CorruptError, DisError, IncompatibleError, UsageError,
                           first_line, quote)
from discli.infer.loop import MAX_STEPS, METHODS, InferenceConfig
from discli.infer.settings import inference_range
from discli.model.net import DISNet, ModelConfig

FORMAT = "dis-checkpoint"
FORMAT_VERSION = 1
DIGEST_KEY = "digest"
# Names the walk of content_digest as well as the hash: a later change of either must not read
# old files as corrupt.
DIGEST_SCHEME = "dis-content-sha256-v1"
# Labelmaps are 8-bit and 255 means void: at most 255 classes (discli.data.manifest).
MAX_CLASSES = 255


def _feed(digest: Any, value: Any) -> None:
    if isinstance(value, torch.Tensor):
        tensor = value.detach()
        if tensor.device.type != "cpu":
            tensor = tensor.cpu()
        tensor = tensor.contiguous()
        digest.update(f"T{tensor.dtype}{tuple(tensor.shape)};".encode())
        if tensor.numel():
            digest.update(memoryview(tensor.reshape(-1).view(torch.uint8).numpy()))
    elif isinstance(value, dict):
        digest.update(b"D%d;" % len(value))
        for key, item in value.items():
            _feed(digest, key)
            _feed(digest, item)
    elif isinstance(value, (list, tuple)):  # a tuple may come back from torch.load as a list
        digest.update(b"L%d;" % len(value))
        for item in value:
            _feed(digest, item)
    else:
        text = repr(value)
        digest.update(f"{type(value).__name__}:{len(text)}:{text};".encode())


def content_digest(state: dict[str, Any]) -> str:
    """The digest of a checkpoint's content (every entry but ``digest`` itself)."""
    digest = hashlib.sha256()
    _feed(digest, {k: v for k, v in state.items() if k != DIGEST_KEY})
    return f"{DIGEST_SCHEME}:{digest.hexdigest()}"


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    """Write ``state`` atomically, with its format and its :func:`content_digest`."""
    state = {"format": FORMAT, "format_version": FORMAT_VERSION,
             **{k: v for k, v in state.items() if k != DIGEST_KEY}}
    state[DIGEST_KEY] = content_digest(state)
    atomic_write(path, lambda f: torch.save(state, f))


def verify_digest(state: dict[str, Any], path: str | Path) -> None:
    """Refuse (:class:`CorruptError`) a checkpoint whose content differs from its digest; a
    checkpoint without one (an older dis wrote it) passes unverified."""
    if DIGEST_KEY not in state:
        return
    stored = state[DIGEST_KEY]
    scheme = stored.split(":", 1)[0] if isinstance(stored, str) else None
    if scheme != DIGEST_SCHEME:
        raise CorruptError(f"its digest entry {quote(stored)} is not a {DIGEST_SCHEME} digest "
                           f"(corrupt, or written by a newer dis)", path)
    if content_digest(state) != stored:
        raise CorruptError("corrupt: its content does not match the digest written with it (the "
                           "file changed after dis wrote it: a damaged disk, copy or transfer); "
                           "restore it from a good copy, or delete it and rerun the command "
                           "that made it", path)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu",
                    verify: bool = True) -> dict[str, Any]:
    """The state a :func:`save_checkpoint` wrote (without its ``digest``), loaded with
    ``weights_only`` and, with ``verify``, checked against its digest."""
    path = Path(path)
    if path.is_dir():
        raise BadInputError("expected a checkpoint file, found a folder", path)
    if not path.exists():
        raise BadInputError("checkpoint not found", path)
    if not path.is_file():  # /dev/zero, a FIFO: torch.load would read forever
        raise BadInputError("expected a checkpoint file, found a device, pipe or socket", path)
    kind = _not_torch_file(path)
    if kind is not None:
        raise IncompatibleError(f"not a checkpoint: {kind} (a checkpoint is a torch.save "
                                f"file, such as final.pth)", path)
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:
        first = first_line(exc, 160)
        if "weights_only" in str(exc) or "Unsupported global" in str(exc):
            raise IncompatibleError("refusing to load: the file needs arbitrary pickle code "
                                    "(only weights_only checkpoints are accepted)", path) from None
        raise CorruptError(f"not a readable checkpoint (truncated or corrupt?): "
                           f"{type(exc).__name__}: {first}", path) from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise IncompatibleError("not a dis checkpoint (no 'format: dis-checkpoint' key)", path)
    if state.get("format_version") != FORMAT_VERSION:
        raise IncompatibleError(f"checkpoint format version {state.get('format_version')} is not "
                                f"supported (this dis reads version {FORMAT_VERSION})", path)
    if verify:
        verify_digest(state, path)
    state.pop(DIGEST_KEY, None)
    return state


# What a file given as a checkpoint by mistake usually is, by its first bytes.
_MAGIC = [(b"\x89PNG", "a PNG image"), (b"\xff\xd8\xff", "a JPEG image"),
          (b"\x89HDF", "an HDF5 file (a cache?)"), (b"{", "JSON text"), (b"\x1f\x8b", "gzip data")]


def _not_torch_file(path: Path) -> str | None:
    """None when the file starts as torch.save writes (a zip archive; a legacy pickle), else
    what it looks like: torch would otherwise report any other file as needing pickle code."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError:
        return None  # torch.load reports it
    if head.startswith(b"PK\x03\x04") or head.startswith(b"\x80"):
        return None
    if not head:
        return "the file is empty (0 bytes)"
    return next((what for magic, what in _MAGIC if head.startswith(magic)),
                "neither a zip archive nor a pickle")


def _scalar_ok(value: object) -> bool:
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, int) and not isinstance(value, bool):
        return 0 <= value <= 1 << 16  # larger than any real width, depth or size
    return value is None or isinstance(value, bool) or (isinstance(value, str)
                                                         and len(value) <= 1000)


def check_model_config(raw: object, path: str | Path = "checkpoint") -> ModelConfig:
    """The checkpoint's ``model_config`` as a :class:`ModelConfig`, or a one-line
    :class:`IncompatibleError`: types, 2..255 classes, backbone kwargs plain bounded scalars."""
    if not isinstance(raw, dict):
        raise IncompatibleError("checkpoint has no usable model_config entry (not a dict)", path)
    backbone, k = raw.get("backbone", "tiny"), raw.get("num_classes", 21)
    kwargs, weights = raw.get("backbone_kwargs", {}), raw.get("backbone_weights")
    problem = None
    if not isinstance(backbone, str) or not 0 < len(backbone) <= 100:
        problem = f"backbone {quote(backbone)} is not a backbone name"
    elif not isinstance(k, int) or isinstance(k, bool) or not 2 <= k <= MAX_CLASSES:
        problem = (f"num_classes {quote(k)} is not an integer from 2 to {MAX_CLASSES} "
                   f"(labelmaps are 8-bit and 255 means void)")
    elif weights is not None and not isinstance(weights, str):
        problem = f"backbone_weights {quote(weights)} is not a path or name"
    elif not isinstance(kwargs, dict) or not all(isinstance(key, str) for key in kwargs):
        problem = f"backbone_kwargs {quote(kwargs)} is not a dict of options"
    else:
        bad = [key for key, value in kwargs.items() if not _scalar_ok(value)]
        if bad:
            problem = (f"backbone_kwargs {quote(bad[0])} = {quote(kwargs[bad[0]])} is out of "
                       f"bounds (integers 0..65536, finite numbers, short strings)")
    if problem:
        raise IncompatibleError(f"model_config: {problem}; refusing to build it", path)
    return ModelConfig(backbone=backbone, num_classes=k, backbone_weights=weights,
                       backbone_kwargs=dict(kwargs))


def _check_shapes(config: ModelConfig, weights: dict[str, Any], path: str | Path) -> None:
    """Build ``config`` on the meta device (no memory) and refuse a state dict whose names or
    shapes differ, before the real network (whose size the config alone decides) exists."""
    try:
        with torch.device("meta"):
            expected = DISNet(config).state_dict()
    except DisError:
        raise
    except Exception:  # noqa: BLE001 - a plugin backbone that cannot be built on meta: the
        return  # real build below still checks every name and shape, after allocating
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    wrong = sorted(key for key in set(expected) & set(weights)
                   if tuple(expected[key].shape) != tuple(weights[key].shape))
    if missing or unexpected or wrong:
        if wrong:
            key = wrong[0]
            detail = (f"{key} is {tuple(weights[key].shape)} in the file but "
                      f"{tuple(expected[key].shape)} in its model_config")
        else:
            detail = (f"missing {quote(missing[:3])}" if missing
                      else f"unexpected {quote(unexpected[:3])}")
        raise IncompatibleError(f"weights do not fit {config.backbone} with "
                                f"{config.num_classes} classes and {config.backbone_kwargs}: "
                                f"{detail}", path)


def model_from_checkpoint(state: dict[str, Any], path: str | Path = "checkpoint") -> DISNet:
    if "model_config" not in state or not isinstance(state.get("model"), dict):
        raise IncompatibleError("checkpoint has no usable model_config/model entries", path)
    config = check_model_config(state["model_config"], path)
    weights = state["model"]
    if not all(isinstance(key, str) and isinstance(value, torch.Tensor)
               for key, value in weights.items()):
        raise IncompatibleError("checkpoint's 'model' entry is not a state dict of tensors", path)
    config.backbone_weights = None  # the checkpoint holds the weights: never re-download
    try:
        _check_shapes(config, weights, path)
        model = DISNet(config)
    except IncompatibleError:
        raise
    except DisError as exc:  # e.g. a backbone plugin that is not installed here
        raise IncompatibleError(f"cannot rebuild its model: {exc}", path) from None
    except (TypeError, ValueError) as exc:
        raise IncompatibleError(f"cannot rebuild its model from model_config {config}: "
                                f"{type(exc).__name__}: {exc}", path) from None
    try:
        model.load_state_dict(weights)
    except (RuntimeError, TypeError, AttributeError) as exc:
        raise IncompatibleError(f"weights do not fit {config.backbone} with "
                                f"{config.num_classes} classes: {first_line(exc)}",
                                path) from None
    return model


def load_model(path: str | Path, device: str | torch.device = "cpu"
               ) -> tuple[DISNet, dict[str, Any]]:
    """Rebuild the model of a checkpoint (eval mode) and return it with the checkpoint dict."""
    state = load_checkpoint(path)
    model = model_from_checkpoint(state, path).to(device).eval()
    return model, state


def default_inference_settings() -> dict[str, Any]:
    """The settings of a checkpoint that carries none: t_tr = t_ts = 0 and the library's
    :class:`discli.infer.loop.InferenceConfig` defaults."""
    defaults = {f.name: getattr(InferenceConfig(), f.name)
                for f in dataclasses.fields(InferenceConfig) if f.name != "steps"}
    return {"t_tr": 0, "t_ts": 0, **defaults}


def inference_settings(state: dict[str, Any], path: str | Path = "checkpoint") -> dict[str, Any]:
    """The inference settings a checkpoint carries (its ``inference`` entry, written by
    training: t_tr, t_ts, lr, momentum, tag_weight, proximity, method) over the defaults of
    :func:`default_inference_settings`; a checkpoint without the entry (an older one) gives the
    defaults. Unknown keys are ignored; a value of the wrong type or not finite is refused."""
    settings = default_inference_settings()
    given = state.get("inference")
    if given is None:
        return settings
    if not isinstance(given, dict):
        raise IncompatibleError(f"its 'inference' entry is a {type(given).__name__}, not a "
                                f"dict of settings", path)
    for key, value in given.items():
        if key not in settings:
            continue
        if key in ("t_tr", "t_ts"):
            ok = (isinstance(value, int) and not isinstance(value, bool)
                  and 0 <= value <= MAX_STEPS)
            want = f"an integer from 0 to {MAX_STEPS}"
        elif key == "method":
            ok = isinstance(value, str) and value in METHODS
            want = f"one of {', '.join(METHODS)}"
        else:
            ok = (isinstance(value, (int, float)) and not isinstance(value, bool)
                  and math.isfinite(value))
            want = "a finite number"
            value = float(value) if ok else value
        if not ok:
            raise IncompatibleError(f"inference setting {key!r} must be {want}, got "
                                    f"{value!r}", path)
        settings[key] = value
    return settings


def inference_config(settings: dict[str, Any], steps: int | None = None,
                     **overrides: Any) -> InferenceConfig:
    """An :class:`discli.infer.loop.InferenceConfig` from checkpoint settings, with every
    override that is not None taking the place of the checkpoint's value."""
    values = {k: settings[k] for k in ("lr", "momentum", "tag_weight", "proximity", "method")}
    for key, value in overrides.items():
        flag = f"--{key.replace('_', '-')}"
        # nan passes every range check the wrong way and yields an all-background labelmap
        if isinstance(value, float) and not math.isfinite(value):
            raise UsageError(f"{flag} must be a finite number, got {value}")
        need = None if value is None else inference_range(key, value)
        if need is not None:
            raise UsageError(f"{flag} must be {need}, got {value}")
    values.update({k: v for k, v in overrides.items() if v is not None})
    return InferenceConfig(steps=steps or 0, **values)


def file_hash(path: str | Path, length: int = 16) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:length]


# ------------------------------------------------------------------- models for inference


def checkpoint_classes(state: dict[str, Any], num_classes: int) -> list[str]:
    classes = state.get("classes")
    if isinstance(classes, (list, tuple)) and len(classes) == num_classes:
        return [str(c) for c in classes]
    return ["background"] + [f"class{k}" for k in range(1, num_classes)]


@dataclass
class LoadedModel:
    model: DISNet
    classes: list[str]
    checkpoint_hash: str
    path: Path
    # the checkpoint's inference settings (t_tr, t_ts, lr, momentum, tag_weight, proximity,
    # method): :func:`inference_settings`
    inference: dict[str, Any] = field(default_factory=default_inference_settings)

    def inference_config(self, steps: int | None = None, **overrides: Any) -> InferenceConfig:
        """The checkpoint's inference settings, with every override that is not None."""
        return inference_config(self.inference, steps, **overrides)


def load_for_inference(checkpoint: str | Path, device: torch.device | str = "cpu"
                       ) -> LoadedModel:
    """The model of a checkpoint (eval mode, on ``device``) with its classes, hash and
    inference settings."""
    model, state = load_model(checkpoint, device)
    return LoadedModel(model, checkpoint_classes(state, model.num_classes), file_hash(checkpoint),
                       Path(checkpoint), inference_settings(state, checkpoint))


def check_classes(model_classes: Sequence[str], other: Sequence[str], what: str,
                  path: str | Path | None, checkpoint: str | Path | None = None) -> None:
    """Refuse data or a cache whose classes differ from the checkpoint's: in number, or in
    name or order (the same count would otherwise score one class's pixels as another's)."""
    model = f"checkpoint {checkpoint}" if checkpoint is not None else "the model"
    if len(model_classes) != len(other):
        raise IncompatibleError(f"{what} has {len(other)} classes but {model} has "
                                f"{len(model_classes)}; use a checkpoint trained on these "
                                f"classes", path)
    named = list(model_classes) != checkpoint_classes({}, len(model_classes))  # not placeholders
    if named and [str(c) for c in model_classes] != [str(c) for c in other]:
        raise IncompatibleError(f"{what} classes {list(other)} differ from {model}'s "
                                f"{list(model_classes)} (names or order); use a "
                                f"checkpoint trained on these classes", path)
