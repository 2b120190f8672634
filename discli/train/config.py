"""One flat training configuration, read from a TOML file (or a shipped preset,
:mod:`discli.configs`) and overridden by the command line.

The effective configuration is stored in every checkpoint and written beside it
(``config.toml``), so a run can be rebuilt and resumed from its folder alone.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import tomllib
import types
import typing
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from discli.data.fileio import read_text
from discli.errors import BadInputError
from discli.inference_config import InferenceConfig


# Every key is declared with `_key(default, help, ...)`: its one-line help (what `dis config keys`
# lists and the --help of `dis pretrain`/`dis finetune` shows), the stage that uses it ("pretrain"
# or "finetune"; None: both) and whether it changes no result (`neutral`: where and how a run
# executes, which a re-run on the same folder may change; see discli.train.settings).
def _key(default: Any, help: str, stage: str | None = None, neutral: bool = False) -> Any:
    return dataclasses.field(default=default,
                             metadata={"help": help, "stage": stage, "neutral": neutral})


@dataclass
class TrainConfig:
    # data
    labelled: str = _key("", "manifest of pixel-labelled images (required)")
    tagged: str = _key("", "manifest of tagged images (required by finetune)", "finetune")
    root: str = _key("", "folder the manifests' paths are relative to (default: their own root)",
                     neutral=True)
    out: str = _key("", "run folder: checkpoints, logs, caches (required)", neutral=True)
    # model
    backbone: str = _key("tiny", "backbone name (`dis plugins` lists them)")
    backbone_weights: str = _key("", "initial backbone weights: '' (none), 'imagenet', 'shapes' "
                                 "or a local state-dict path", "pretrain")
    channels: int = _key(64, "width of the tiny/small backbones (ignored by the ResNets)",
                         "pretrain")
    freeze_bn: bool = _key(False, "keep BatchNorm statistics fixed (DeepLab practice for small "
                           "batches)")
    # optimisation (poly schedule; new layers get head_lr_mult x lr). The paper (and DeepLab)
    # use SGD with momentum on an ImageNet-initialised ResNet; a backbone trained from scratch
    # on a few images (the demo's) learns far faster with AdamW.
    optimizer: str = _key("sgd", "'sgd' (with momentum) or 'adamw'")
    batch_size: int = _key(8, "global batch size (images per iteration)")
    crop_size: int = _key(321, "training crop size in pixels")
    scale_min: float = _key(0.5, "smallest random rescale of a training image")
    scale_max: float = _key(2.0, "largest random rescale of a training image")
    lr: float = _key(0.01, "backbone learning rate (new layers: x head_lr_mult)")
    head_lr_mult: float = _key(10.0, "learning-rate multiplier of the new layers (subnets, image "
                               "branch)")
    momentum: float = _key(0.9, "SGD momentum")
    weight_decay: float = _key(5e-4, "weight decay")
    poly_power: float = _key(0.9, "power of the poly learning-rate decay")
    loss_map: float = _key(1.0, "weight of the labelmap loss")
    loss_img: float = _key(1.0, "weight of the image reconstruction loss")
    loss_tag: float = _key(1.0, "weight of the tag loss")
    # pretrain: iterations of the three steps (section 3)
    iters_step1: int = _key(1000, "pretrain step 1 iterations (backbone + subnets 1, 3)",
                            "pretrain")
    iters_step2: int = _key(300, "pretrain step 2 iterations (subnet 2 alone)", "pretrain")
    iters_step3: int = _key(500, "pretrain step 3 iterations (everything)", "pretrain")
    # finetune (section 3.1)
    init: str = _key("", "checkpoint fine-tuning starts from (default: <out>/pretrain/final.pth)",
                     "finetune")
    rounds: int = _key(2, "E-step + M-step rounds (a finished run may be extended)", "finetune")
    mstep_iters: int = _key(500, "iterations of each M-step", "finetune")
    t_tr: int = _key(30, "inference iterations in training (E-step; 0 = none: the ablation)")
    tagged_ratio: float = _key(0.5, "share of every M-step batch drawn from the tagged images",
                               "finetune")
    confidence: float = _key(0.0, "pseudo-label pixels below this probability are ignored",
                             "finetune")
    class_keep: float = _key(0.0, "> 0: each class keeps at least this share of its most "
                             "confident pseudo-label pixels", "finetune")
    tag_threshold: float = _key(0.5, "cleaned tag = tag probability >= this", "finetune")
    # The M-step (Eq. 1). Tag target of a tagged image: its caption tags ("noisy"), its cleaned
    # tags ("cleaned") or their average ("mix"); tag_gate ignores pseudo-label pixels of classes
    # its caption ("noisy") or cleaned tags ("cleaned") call absent; drop_untagged leaves out
    # images whose caption names no class.
    mstep_tags: str = _key("noisy", "M-step tag target: 'noisy' (caption), 'cleaned' or 'mix'",
                           "finetune")
    tag_gate: str = _key("noisy", "ignore pseudo-label pixels of classes these tags call absent: "
                         "'none', 'noisy' or 'cleaned'", "finetune")
    ignore_suppressed: bool = _key(True, "ignore pseudo-label pixels whose class the tag "
                                   "re-weighting changed", "finetune")
    # E-step labelmap: the "final" map (u3 re-weighted by v3, the paper's) or the labelmap head's
    # softmax(u3) alone ("labelmap"), leaving the tags to tag_gate
    pseudo_map: str = _key("labelmap", "E-step labelmap: 'labelmap' (softmax u3) or 'final' "
                           "(re-weighted by the tags)", "finetune")
    drop_untagged: bool = _key(True, "leave out tagged images whose caption names no class",
                               "finetune")
    warmup_iters: int = _key(0, "linear learning-rate warm-up iterations of every pretraining "
                             "step (robust starts from random weights)", "pretrain")
    clip_grad_norm: float = _key(10.0, "clip the gradients' global L2 norm to this (0: off); "
                                 "kept a ResNet-101 from random weights from exploding")
    mstep_lr_mult: float = _key(1.0, "M-step learning rates = this x the pretraining ones",
                                "finetune")
    mstep_warmup: int = _key(0, "linear learning-rate warm-up iterations of each M-step",
                             "finetune")
    mstep_from: str = _key("previous", "each M-step starts from the 'previous' round's model or "
                           "'init'", "finetune")
    strong_aug: bool = _key(False, "photometric strong view of the pseudo-labelled images",
                            "finetune")
    inf_lr: float = _key(InferenceConfig.lr, "feature-space inference step size")
    inf_momentum: float = _key(InferenceConfig.momentum, "feature-space inference momentum")
    inf_tag_weight: float = _key(InferenceConfig.tag_weight, "weight of the tag loss in "
                                 "training-time inference")
    inf_proximity: float = _key(InferenceConfig.proximity, "weight of a term keeping u1, v1 near "
                                "their start in inference")
    t_ts: int = _key(0, "test-time inference iterations that dis infer/evaluate default to")
    estep_batch_size: int = _key(8, "E-step images per batch (same result at any size)",
                                 "finetune", neutral=True)
    estep_part_images: int = _key(64, "E-step images per crash-safe cache part (a kill loses < "
                                  "this)", "finetune", neutral=True)
    # validation during training
    val: str = _key("", "manifest with labelmaps: log validation mIoU (t = 0) while training",
                    neutral=True)
    val_every: int = _key(0, "validate every N iterations (0: only at the end of each step)",
                          neutral=True)
    # run
    seed: int = _key(0, "random seed (initialisation, data order, augmentation)")
    device: str = _key("auto", "'auto', 'cpu', 'cuda' or 'cuda:N'", neutral=True)
    amp: bool = _key(True, "mixed precision on CUDA (ignored on CPU)")
    num_workers: int = _key(0, "DataLoader worker processes", neutral=True)
    ckpt_every: int = _key(100, "checkpoint every N iterations (the resume points)", neutral=True)
    log_every: int = _key(10, "log.jsonl record every N iterations", neutral=True)
    sync_bn: bool = _key(False, "synchronised BatchNorm under torchrun on CUDA")

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


@dataclass(frozen=True)
class KeyInfo:
    """One configuration key, as `dis config keys` lists it."""

    name: str
    type: str
    default: Any
    stage: str | None  # "pretrain", "finetune" or None (both)
    neutral: bool  # changes no result: a re-run on the same folder may change it
    help: str


def config_keys() -> list[KeyInfo]:
    """Every key of :class:`TrainConfig` (``--set``, ``--config``), in declaration order."""
    types_ = _field_types()
    return [KeyInfo(f.name, types_[f.name].__name__, f.default, f.metadata["stage"],
                    f.metadata["neutral"], f.metadata["help"]) for f in fields(TrainConfig)]


def unknown_key_message(name: str) -> str:
    """"unknown key 'bach_size' (did you mean 'batch_size'?)"."""
    close = difflib.get_close_matches(name, list(_field_types()), n=2)
    hint = (f"did you mean {' or '.join(repr(k) for k in close)}?" if close
            else "`dis config keys` lists them")
    return f"unknown key {name!r} ({hint})"


def coerce(name: str, value: Any, source: str = "config") -> Any:
    """Check (and widen int -> float) one value against the field's type."""
    types_ = _field_types()
    if name not in types_:
        raise BadInputError(unknown_key_message(name), source)
    want = types_[name]
    if isinstance(want, types.UnionType):
        want = next(t for t in typing.get_args(want) if t is not type(None))
    if want is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, want) or (want is int and isinstance(value, bool)):
        raise BadInputError(f"key {name!r} must be {want.__name__}, got {type(value).__name__} "
                            f"{value!r}", source)
    return value


def validate(cfg: TrainConfig, source: str = "config",
             origins: dict[str, str] | None = None) -> TrainConfig:
    """Refuse out-of-range values; the error names ``origins[key]`` (where that key was set)
    or ``source``."""
    def where(name: str) -> str:
        return (origins or {}).get(name, source)

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
              ("warmup_iters", cfg.warmup_iters >= 0),
              ("clip_grad_norm", cfg.clip_grad_norm >= 0),
              ("val_every", cfg.val_every >= 0), ("class_keep", 0.0 <= cfg.class_keep <= 1.0),
              ("mstep_from", cfg.mstep_from in ("previous", "init")),
              ("pseudo_map", cfg.pseudo_map in ("final", "labelmap")),
              ("tag_threshold", 0.0 < cfg.tag_threshold < 1.0)]
    for name, ok in checks:
        if not ok:
            raise BadInputError(f"invalid value {getattr(cfg, name)!r} for {name!r}",
                                where(name))
    for f in fields(cfg):  # nan and inf pass every comparison above the wrong way: refuse them
        value = getattr(cfg, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise BadInputError(f"invalid value {value!r} for {f.name!r} (not a finite number)",
                                where(f.name))
    for name in ("iters_step1", "iters_step2", "iters_step3", "mstep_iters"):
        if getattr(cfg, name) < 0:
            raise BadInputError(f"invalid value {getattr(cfg, name)!r} for {name!r}",
                                where(name))
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
    origins: dict[str, str] = {}
    if path:
        path = resolve_config_path(path)
        try:
            # bounded and regular-file-only, as every text input (a FIFO would never end)
            data = tomllib.loads(read_text(path, "config file"))
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
                origins[key] = source
    for key, value in (overrides or {}).items():
        if value is not None:
            values[key] = coerce(key, value, "overrides")
            origins[key] = "command line"
    return validate(TrainConfig(**values), str(path or "command line"), origins)


def dump_toml(cfg: TrainConfig, table: str = "train") -> str:
    """Every key of ``cfg`` as a TOML table (``[train]``: what a run folder's config.toml
    holds, read back by :func:`load_config` for either stage)."""
    lines = [f"[{table}]"]
    for key, value in cfg.to_dict().items():
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, str):
            text = '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
        else:
            text = repr(value)
        lines.append(f"{key} = {text}")
    return "\n".join(lines) + "\n"
