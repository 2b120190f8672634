"""The settings of feature-space inference (:mod:`discli.infer.loop`), importable without torch
(the CLI shows their defaults in ``--help`` before any command runs)."""

from __future__ import annotations

import os
from dataclasses import dataclass

from discli.errors import UsageError

METHODS = ("auto", "autograd", "lowrank")
COMPILE_ENV = "DIS_COMPILE"  # "1": start with compiled low-rank steps on (torchrun ranks too)


@dataclass
class InferenceConfig:
    steps: int = 0  # t
    lr: float = 0.003  # the only step measured to help (docs/studies.md, "Test-time inference")
    momentum: float = 0.9
    tag_weight: float = 1.0  # only used when noisy tags are given (training-time inference)
    proximity: float = 0.0
    method: str = "auto"  # "auto" | "autograd" | "lowrank" (same iterations, see module doc)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"inference method must be one of {', '.join(METHODS)}, "
                             f"got {self.method!r}")


def inference_range(key: str, value: float) -> str | None:
    """What inference setting ``key`` (lr, momentum, tag_weight, proximity) must be when
    ``value`` is not that, else None: the one rule for the options of ``dis infer`` /
    ``clean-tags run`` and the ``inf_*`` keys of a training config."""
    if key == "momentum":  # 1 or more never forgets a step: it diverges
        return None if 0 <= value < 1 else "at least 0 and below 1"
    if key in ("lr", "tag_weight", "proximity"):
        return None if value >= 0 else "at least 0"
    return None


# The most inference steps a setting may ask for: the paper uses up to 50, and a number beyond
# this is a typo that would run for days.
MAX_STEPS = 10_000


def parse_steps(text: str, option: str = "t_ts") -> list[int]:
    """"0,10,30" -> [0, 10, 30] (sorted, unique, each in 0..MAX_STEPS); ``option`` names the
    option in messages."""
    try:
        steps = sorted({int(part) for part in text.replace(" ", "").split(",") if part})
    except ValueError:
        raise UsageError(f"{{opt:{option}}}: expected comma-separated integers, got "
                         f"{text!r}") from None
    if not steps or steps[0] < 0 or steps[-1] > MAX_STEPS:
        raise UsageError(f"{{opt:{option}}}: expected integers from 0 to {MAX_STEPS}, got "
                         f"{text!r}")
    return steps


# Compiling the low-rank steps (:mod:`discli.infer.compiled`) is a process-wide switch, like
# torch.backends' flags, rather than an InferenceConfig field: the config's fields are written into
# checkpoints and E-step caches, and compiling changes neither the iterations nor the settings a
# result depends on (only the float rounding, within the tolerance the tests hold both paths to).
_compiled = [os.environ.get(COMPILE_ENV, "0").strip() not in ("", "0")]


def use_compiled(enabled: bool) -> bool:
    """Run the low-rank inference steps through ``torch.compile`` (True) or plainly (False, the
    default); returns the previous setting. Without a working compiler the plain path runs."""
    previous, _compiled[0] = _compiled[0], bool(enabled)
    return previous


def compiled_requested() -> bool:
    """Whether :func:`use_compiled` (or ``DIS_COMPILE=1`` at start) asked for compiled steps."""
    return _compiled[0]
