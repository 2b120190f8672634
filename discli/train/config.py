"""One flat training configuration, read from a TOML file and overridden by the command line.

The effective configuration is stored in every checkpoint and written beside it
(``config.toml``), so a run can be rebuilt and resumed from its folder alone.
"""

from __future__ import annotations

import dataclasses
import tomllib
import types
import typing
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from discli.errors import BadInputError
from discli.inference import InferenceConfig


@dataclass
class TrainConfig:
    # data
    labelled: str = ""  # manifest of pixel-labelled images
    tagged: str = ""  # manifest of tagged images (finetune)
    root: str = ""  # overrides the manifests' root when set
    out: str = "runs/dis"
    # model
    backbone: str = "tiny"
    backbone_weights: str = ""  # "", "imagenet" or a local state-dict path
    channels: int = 64  # width of the tiny/small backbones (ignored by the ResNets)
    freeze_bn: bool = False  # keep BatchNorm statistics fixed (DeepLab practice for small batches)
    # optimisation (poly schedule; new layers get head_lr_mult x lr). The paper (and DeepLab)
    # use SGD with momentum on an ImageNet-initialised ResNet; a backbone trained from scratch
    # on a few images (the demo's) learns far faster with AdamW.
    optimizer: str = "sgd"  # "sgd" | "adamw"
    batch_size: int = 8
    crop_size: int = 321
    scale_min: float = 0.5
    scale_max: float = 2.0
    lr: float = 0.01
    head_lr_mult: float = 10.0
    momentum: float = 0.9
    weight_decay: float = 5e-4
    poly_power: float = 0.9
    loss_map: float = 1.0
    loss_img: float = 1.0
    loss_tag: float = 1.0
    # pretrain: iterations of the three steps (section 3)
    iters_step1: int = 1000
    iters_step2: int = 300
    iters_step3: int = 500
    # finetune (section 3.1)
    init: str = ""  # checkpoint to start from (default: <out>/pretrain/final.pth)
    rounds: int = 2
    mstep_iters: int = 500
    t_tr: int = 30
    tagged_ratio: float = 0.5  # share of every M-step batch drawn from the tagged set
    confidence: float = 0.0  # pseudo-label pixels below this probability are ignored (255)
    tag_threshold: float = 0.5  # cleaned tag = tag probability >= this
    inf_lr: float = InferenceConfig.lr
    inf_momentum: float = InferenceConfig.momentum
    inf_tag_weight: float = InferenceConfig.tag_weight
    inf_proximity: float = InferenceConfig.proximity
    estep_batch_size: int = 8
    estep_part_images: int = 64  # E-step images per crash-safe cache part (a kill loses < this)
    # run
    seed: int = 0
    device: str = "auto"
    amp: bool = True  # mixed precision on CUDA (ignored on CPU)
    num_workers: int = 0
    ckpt_every: int = 100
    log_every: int = 10
    sync_bn: bool = False  # under torchrun on CUDA

    def inference(self) -> InferenceConfig:
        return InferenceConfig(steps=self.t_tr, lr=self.inf_lr, momentum=self.inf_momentum,
                               tag_weight=self.inf_tag_weight, proximity=self.inf_proximity)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _field_types() -> dict[str, type]:
    hints = typing.get_type_hints(TrainConfig)
    return {f.name: hints[f.name] for f in fields(TrainConfig)}


def coerce(name: str, value: Any, source: str = "config") -> Any:
    """Check (and widen int -> float) one value against the field's type."""
    types_ = _field_types()
    if name not in types_:
        known = ", ".join(sorted(types_))
        raise BadInputError(f"unknown key {name!r} (known keys: {known})", source)
    want = types_[name]
    if isinstance(want, types.UnionType):
        want = next(t for t in typing.get_args(want) if t is not type(None))
    if want is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, want) or (want is int and isinstance(value, bool)):
        raise BadInputError(f"key {name!r} must be {want.__name__}, got {type(value).__name__} "
                            f"{value!r}", source)
    return value


def validate(cfg: TrainConfig, source: str = "config") -> TrainConfig:
    checks = [("batch_size", cfg.batch_size >= 1), ("crop_size", cfg.crop_size >= 8),
              ("t_tr", cfg.t_tr >= 0), ("rounds", cfg.rounds >= 0),
              ("tagged_ratio", 0.0 <= cfg.tagged_ratio <= 1.0),
              ("confidence", 0.0 <= cfg.confidence < 1.0), ("lr", cfg.lr > 0),
              ("estep_batch_size", cfg.estep_batch_size >= 1),
              ("estep_part_images", cfg.estep_part_images >= 1),
              ("ckpt_every", cfg.ckpt_every >= 1), ("log_every", cfg.log_every >= 1),
              ("num_workers", cfg.num_workers >= 0), ("channels", cfg.channels >= 1),
              ("scale_min", 0 < cfg.scale_min <= cfg.scale_max),
              ("optimizer", cfg.optimizer in ("sgd", "adamw"))]
    for name, ok in checks:
        if not ok:
            raise BadInputError(f"invalid value {getattr(cfg, name)!r} for {name!r}", source)
    for name in ("iters_step1", "iters_step2", "iters_step3", "mstep_iters"):
        if getattr(cfg, name) < 0:
            raise BadInputError(f"invalid value {getattr(cfg, name)!r} for {name!r}", source)
    return cfg


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None,
                base: TrainConfig | None = None) -> TrainConfig:
    """TOML file (flat keys, or a [train] table) < command-line overrides (None = not given)."""
    values: dict[str, Any] = dataclasses.asdict(base or TrainConfig())
    if path:
        path = Path(path)
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise BadInputError("config file not found", path) from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise BadInputError(f"not valid TOML: {exc}", path) from None
        data = data.get("train", data)
        for key, value in data.items():
            values[key] = coerce(key, value, str(path))
    for key, value in (overrides or {}).items():
        if value is not None:
            values[key] = coerce(key, value, f"--{key.replace('_', '-')}")
    return validate(TrainConfig(**values), str(path or "command line"))


def dump_toml(cfg: TrainConfig) -> str:
    lines = ["[train]"]
    for key, value in cfg.to_dict().items():
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, str):
            text = '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
        else:
            text = repr(value)
        lines.append(f"{key} = {text}")
    return "\n".join(lines) + "\n"
