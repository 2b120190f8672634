"""One flat training configuration, read from a TOML file (or a shipped preset,
:mod:`discli.configs`) and overridden by the command line.

The effective configuration is stored in every checkpoint and written beside it
(``config.toml``), so a run can be rebuilt and resumed from its folder alone.
"""

from __future__ import annotations

import dataclasses
import math
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
    # > 0: class-balanced thresholds: each class keeps at least this share of its most confident
    # pseudo-label pixels (its threshold is lowered below `confidence` when needed)
    class_keep: float = 0.0
    tag_threshold: float = 0.5  # cleaned tag = tag probability >= this
    # The M-step (Eq. 1). Tag target of a tagged image: its caption tags ("noisy"), its cleaned
    # tags ("cleaned") or their average ("mix"); tag_gate ignores pseudo-label pixels of classes
    # its caption ("noisy") or cleaned tags ("cleaned") call absent; drop_untagged leaves out
    # images whose caption names no class.
    mstep_tags: str = "noisy"
    tag_gate: str = "noisy"  # "none" | "noisy" | "cleaned"
    # E-step: pseudo-label pixels whose class the tag re-weighting changed are ignored (255)
    ignore_suppressed: bool = True
    # E-step labelmap: the "final" map (u3 re-weighted by v3, the paper's) or the labelmap head's
    # softmax(u3) alone ("labelmap"), leaving the tags to tag_gate
    pseudo_map: str = "labelmap"
    drop_untagged: bool = True
    mstep_lr_mult: float = 1.0  # M-step learning rates = this x the pretraining ones
    mstep_warmup: int = 0  # linear learning-rate warm-up iterations at the start of each M-step
    mstep_from: str = "previous"  # each M-step starts from the "previous" round's model or "init"
    strong_aug: bool = False  # photometric strong view of the pseudo-labelled images
    inf_lr: float = InferenceConfig.lr
    inf_momentum: float = InferenceConfig.momentum
    inf_tag_weight: float = InferenceConfig.tag_weight
    inf_proximity: float = InferenceConfig.proximity
    t_ts: int = 0  # test-time inference iterations that dis infer/evaluate default to
    estep_batch_size: int = 8
    estep_part_images: int = 64  # E-step images per crash-safe cache part (a kill loses < this)
    # validation during training: mIoU (t = 0) on this manifest every val_every iterations and
    # at the end of every step (val_every = 0: only there)
    val: str = ""
    val_every: int = 0
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

    def inference_settings(self) -> dict[str, Any]:
        """The inference settings a checkpoint carries (read back by
        :func:`discli.checkpoint.inference_settings`): what `dis infer`, `dis evaluate` and
        `dis clean-tags run` default to."""
        return {"t_tr": self.t_tr, "t_ts": self.t_ts, "lr": self.inf_lr,
                "momentum": self.inf_momentum, "tag_weight": self.inf_tag_weight,
                "proximity": self.inf_proximity, "method": "auto"}

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
              ("t_tr", cfg.t_tr >= 0), ("t_ts", cfg.t_ts >= 0), ("rounds", cfg.rounds >= 0),
              ("tagged_ratio", 0.0 <= cfg.tagged_ratio <= 1.0),
              ("confidence", 0.0 <= cfg.confidence < 1.0), ("lr", cfg.lr > 0),
              ("estep_batch_size", cfg.estep_batch_size >= 1),
              ("estep_part_images", cfg.estep_part_images >= 1),
              ("ckpt_every", cfg.ckpt_every >= 1), ("log_every", cfg.log_every >= 1),
              ("num_workers", cfg.num_workers >= 0), ("channels", cfg.channels >= 1),
              ("scale_min", 0 < cfg.scale_min <= cfg.scale_max),
              ("optimizer", cfg.optimizer in ("sgd", "adamw")),
              ("mstep_tags", cfg.mstep_tags in ("noisy", "cleaned", "mix")),
              ("tag_gate", cfg.tag_gate in ("none", "noisy", "cleaned")),
              ("mstep_lr_mult", cfg.mstep_lr_mult > 0), ("mstep_warmup", cfg.mstep_warmup >= 0),
              ("val_every", cfg.val_every >= 0), ("class_keep", 0.0 <= cfg.class_keep <= 1.0),
              ("mstep_from", cfg.mstep_from in ("previous", "init")),
              ("pseudo_map", cfg.pseudo_map in ("final", "labelmap")),
              ("tag_threshold", 0.0 < cfg.tag_threshold < 1.0)]
    for name, ok in checks:
        if not ok:
            raise BadInputError(f"invalid value {getattr(cfg, name)!r} for {name!r}", source)
    for f in fields(cfg):  # nan and inf pass every comparison above the wrong way: refuse them
        value = getattr(cfg, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise BadInputError(f"invalid value {value!r} for {f.name!r} (not a finite number)",
                                source)
    for name in ("iters_step1", "iters_step2", "iters_step3", "mstep_iters"):
        if getattr(cfg, name) < 0:
            raise BadInputError(f"invalid value {getattr(cfg, name)!r} for {name!r}", source)
    return cfg


SECTIONS = ("pretrain", "finetune")


def resolve_config_path(path: str | Path) -> Path:
    """``path`` itself when it is a file, else the shipped preset of that name
    (:mod:`discli.configs`, e.g. "demo"); neither: a one-line error listing the presets."""
    from discli.configs import PRESETS, preset_path

    path = Path(path)
    if path.is_file():
        return path
    preset = preset_path(str(path))
    if preset is not None:
        return preset
    if path.is_dir():
        raise BadInputError("expected a TOML config file, found a folder", path)
    raise BadInputError(f"config file not found (presets: {', '.join(PRESETS)})", path)


def _config_tables(data: dict[str, Any], section: str | None, source: str
                   ) -> list[tuple[str, dict[str, Any]]]:
    """The tables of a config file that apply to ``section``, in order: top-level keys, then
    [train], then [pretrain] or [finetune]. A flat file is one table of top-level keys."""
    flat = {k: v for k, v in data.items() if k not in ("train", *SECTIONS)}
    tables: list[tuple[str, dict[str, Any]]] = [(source, flat)]
    for name in ("train", *SECTIONS):
        if name not in data:
            continue
        table = data[name]
        where = f"{source} [{name}]"
        if not isinstance(table, dict):
            raise BadInputError(f"{name!r} must be a table ([{name}]) of training options",
                                source)
        for key, value in table.items():
            coerce(key, value, where)  # a typo in the other section is caught too
        if name == "train" or name == section:
            tables.append((where, table))
    if section is None and any(name in data for name in SECTIONS):
        raise BadInputError("the file has [pretrain]/[finetune] tables: say which one applies "
                            "(load_config(..., section=...))", source)
    return tables


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None,
                base: TrainConfig | None = None, section: str | None = None) -> TrainConfig:
    """Defaults (or ``base``) < TOML file < command-line overrides (None = not given).

    ``path`` is a TOML file or the name of a shipped preset (:mod:`discli.configs`, used when no
    file of that name exists). The file holds flat keys, or tables: the keys of an optional
    shared [train] table apply first, then those of the ``section`` table ("pretrain" or
    "finetune": the command being configured); the other section's table is checked, not used.
    """
    if section is not None and section not in SECTIONS:
        raise ValueError(f"section must be one of {', '.join(SECTIONS)} or None, got {section!r}")
    values: dict[str, Any] = dataclasses.asdict(base or TrainConfig())
    if path:
        path = resolve_config_path(path)
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise BadInputError("config file not found", path) from None
        except OSError as exc:
            raise BadInputError(f"cannot read the config file: {exc.strerror or exc}",
                                path) from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise BadInputError(f"not valid TOML: {exc}", path) from None
        for source, table in _config_tables(data, section, str(path)):
            for key, value in table.items():
                values[key] = coerce(key, value, source)
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
