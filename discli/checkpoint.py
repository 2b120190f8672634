"""Checkpoints: one file that rebuilds the model and resumes training.

A checkpoint is a dict saved with ``torch.save`` and loaded with ``weights_only=True`` only (no
pickle code ever runs). Keys: ``format`` ("dis-checkpoint"), ``format_version``, ``model`` (state
dict), ``model_config`` (:class:`discli.model.ModelConfig` as a dict), ``classes`` (names, index
order, background first), and for training ``optimizer``, ``scheduler``, ``stage``, ``step``,
``iteration``, ``rng`` and ``config``. Writes are atomic: a temporary file in the same folder,
flushed to disk, then ``os.replace`` onto the final name, so a kill never leaves a torn file.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch

from discli.data.fileio import atomic_write as atomic_write_bytes  # one home for atomic writes
from discli.errors import BadInputError, DisError, IncompatibleError
from discli.model import DISNet, ModelConfig

FORMAT = "dis-checkpoint"
FORMAT_VERSION = 1


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    state = {"format": FORMAT, "format_version": FORMAT_VERSION, **state}
    atomic_write_bytes(path, lambda f: torch.save(state, f))


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    path = Path(path)
    if path.is_dir():
        raise BadInputError("expected a checkpoint file, found a folder", path)
    if not path.is_file():
        raise BadInputError("checkpoint not found", path)
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else ""
        if "weights_only" in str(exc) or "Unsupported global" in str(exc):
            raise IncompatibleError("refusing to load: the file needs arbitrary pickle code "
                                    "(only weights_only checkpoints are accepted)", path) from None
        raise IncompatibleError(f"not a readable checkpoint (truncated or corrupt?): "
                                f"{type(exc).__name__} {first}", path) from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise IncompatibleError("not a dis checkpoint (no 'format: dis-checkpoint' key)", path)
    if state.get("format_version") != FORMAT_VERSION:
        raise IncompatibleError(f"checkpoint format version {state.get('format_version')} is not "
                                f"supported (this dis reads version {FORMAT_VERSION})", path)
    return state


def model_from_checkpoint(state: dict[str, Any], path: str | Path = "checkpoint") -> DISNet:
    try:
        config = ModelConfig.from_dict(state["model_config"])
        weights = state["model"]
    except (KeyError, TypeError, ValueError) as exc:
        raise IncompatibleError(f"checkpoint has no usable model_config/model entries "
                                f"({type(exc).__name__}: {exc})", path) from None
    config.backbone_weights = None  # the checkpoint holds the weights: never re-download
    try:
        model = DISNet(config)
    except DisError as exc:  # e.g. a backbone plugin that is not installed here
        raise IncompatibleError(f"cannot rebuild its model: {exc}", path) from None
    except (TypeError, ValueError) as exc:
        raise IncompatibleError(f"cannot rebuild its model from model_config {config}: "
                                f"{type(exc).__name__}: {exc}", path) from None
    try:
        model.load_state_dict(weights)
    except (RuntimeError, TypeError, AttributeError) as exc:
        raise IncompatibleError(f"weights do not fit {config.backbone} with "
                                f"{config.num_classes} classes: {str(exc).splitlines()[0]}",
                                path) from None
    return model


def load_model(path: str | Path, device: str | torch.device = "cpu"
               ) -> tuple[DISNet, dict[str, Any]]:
    """Rebuild the model of a checkpoint (eval mode) and return it with the checkpoint dict."""
    state = load_checkpoint(path)
    model = model_from_checkpoint(state, path).to(device).eval()
    return model, state


def file_hash(path: str | Path, length: int = 16) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:length]
