"""The random generators a training checkpoint holds, so that a resumed run continues them."""

from __future__ import annotations

import random
from typing import Any

import torch


def _cuda_index(device: torch.device | None) -> int | None:
    """The CUDA device whose generator a checkpoint holds: the one this process trains on
    (None: the current one when CUDA is available); None on CPU."""
    if device is None:
        return torch.cuda.current_device() if torch.cuda.is_available() else None
    if device.type != "cuda":
        return None
    return torch.cuda.current_device() if device.index is None else device.index


def rng_state(device: torch.device | None = None) -> dict[str, Any]:
    """The generators a resumed run must continue: CPU, Python, and the CUDA generator of
    ``device`` alone (not every visible GPU's: a job resumed on a machine, or with a
    CUDA_VISIBLE_DEVICES, that shows fewer GPUs must still be able to restore it)."""
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1])}
    index = _cuda_index(device)
    if index is not None:
        state["cuda"] = torch.cuda.get_rng_state(index)
    return state


def set_rng_state(state: dict[str, Any], device: torch.device | None = None) -> None:
    """Restore :func:`rng_state`'s generators, the CUDA one onto ``device``. Older checkpoints
    hold a list (one state per GPU the writer saw): this device's entry is taken when there is
    one, else the CUDA generator stays as it is (a resume then differs only in CUDA-side
    randomness, rather than failing)."""
    torch.set_rng_state(state["torch"])
    random.setstate((3, tuple(state["python"]), None))
    index = _cuda_index(device)
    saved = state.get("cuda")
    if index is None or saved is None:
        return
    if isinstance(saved, (list, tuple)):
        if index >= len(saved):
            return
        saved = saved[index]
    torch.cuda.set_rng_state(saved, index)
