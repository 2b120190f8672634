"""The training keys: :class:`TrainConfig` (one flat dataclass, ``cfg.lr``), each key declared
once with its default, one line of help, its group (:data:`GROUPS`) and the stage that uses it;
:func:`config_keys` lists them (``dis config keys``), :func:`coerce` and :func:`validate` check
values. How keys are read from TOML files, presets and ``--set`` is :mod:`discli.train.config`.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import re
import types
import typing
from dataclasses import dataclass, fields
from typing import Any

from discli.entrypoints import backbone_names
from discli.errors import BadInputError
from discli.infer.settings import MAX_STEPS, InferenceConfig, inference_range
from discli.pseudo.tags import GATES, TAG_RULES, TagRule

# The largest count (iterations, batch size, ...) a config may hold.
MAX_COUNT = 10**9
# DataLoader worker processes: each is a Python process of its own, and a number far above the
# cores is a typo that exhausts the machine's memory before the first batch.
MAX_WORKERS = 128


# Every key is declared with `_key(default, help, ...)`: its one-line help (what `dis config keys`
# lists and the --help of `dis pretrain`/`dis finetune` shows), the stage that uses it ("pretrain"
# or "finetune"; None: both) and whether it changes no result (`neutral`: where and how a run
# executes, which a re-run on the same folder may change; see discli.train.settings).
def _key(default: Any, help: str, stage: str | None = None, neutral: bool = False,
         group: str = "run") -> Any:
    return dataclasses.field(default=default, metadata={"help": help, "stage": stage,
                                                        "neutral": neutral, "group": group})


# The groups of keys: the tables of a written config file (module docstring), in order.
GROUPS = ("data", "model", "optim", "pretrain", "finetune", "inference", "run")


def _in_group(group: str) -> Any:
    return functools.partial(_key, group=group)


_data, _model, _optim, _pretrain, _finetune, _inference, _run = (_in_group(g) for g in GROUPS)


@dataclass
class TrainConfig:
    # data
    labelled: str = _data("", "manifest of pixel-labelled images (required)")
    tagged: str = _data("", "manifest of tagged images (required by finetune)", "finetune")
    root: str = _data("", "folder the manifests' paths are relative to (default: their own root)",
                      neutral=True)
    out: str = _run("", "run folder: checkpoints, logs, caches (required)", neutral=True)
    # model
    backbone: str = _model("tiny", "backbone name (`dis plugins` lists them)")
    backbone_weights: str = _model("", "initial backbone weights: '' (none), 'imagenet', 'shapes' "
                                   "or a local state-dict path", "pretrain")
    channels: int = _model(64, "width of the tiny/small backbones (ignored by the ResNets and "
                           "MobileNetV3)",
                           "pretrain")
    output_stride: int = _model(8, "output stride of the tiny/small backbones, 4 or 8 (the "
                                "ResNets: 8, mobilenet_v3_large: 16)", "pretrain")
    freeze_bn: bool = _model(False, "keep BatchNorm statistics fixed (DeepLab practice for small "
                             "batches)")
    # optimisation (poly schedule; new layers get head_lr_mult x lr). The paper (and DeepLab)
    # use SGD with momentum on an ImageNet-initialised ResNet; a backbone trained from scratch
    # on a few images (the demo's) learns far faster with AdamW.
    optimizer: str = _optim("sgd", "'sgd' (with momentum) or 'adamw'")
    batch_size: int = _optim(8, "global batch size (images per iteration)")
    crop_size: int = _data(321, "training crop size in pixels")
    scale_min: float = _data(0.5, "smallest random rescale of a training image")
    scale_max: float = _data(2.0, "largest random rescale of a training image")
    lr: float = _optim(0.01, "backbone learning rate (new layers: x head_lr_mult)")
    head_lr_mult: float = _optim(10.0, "learning-rate multiplier of the new layers (subnets, image "
                                 "branch)")
    momentum: float = _optim(0.9, "SGD momentum")
    weight_decay: float = _optim(5e-4, "weight decay")
    poly_power: float = _optim(0.9, "power of the poly learning-rate decay")
    loss_map: float = _optim(1.0, "weight of the labelmap loss")
    loss_img: float = _optim(1.0, "weight of the image reconstruction loss")
    loss_tag: float = _optim(1.0, "weight of the tag loss")
    # pretrain: iterations of the three steps (section 3)
    iters_step1: int = _pretrain(1000, "pretrain step 1 iterations (backbone + subnets 1, 3)",
                                 "pretrain")
    iters_step2: int = _pretrain(300, "pretrain step 2 iterations (subnet 2 alone)", "pretrain")
    iters_step3: int = _pretrain(500, "pretrain step 3 iterations (everything)", "pretrain")
    # finetune (section 3.1)
    init: str = _finetune("", "checkpoint fine-tuning starts from (default: "
                          "<out>/pretrain/final.pth)", "finetune")
    rounds: int = _finetune(2, "E-step + M-step rounds (a finished run may be extended)",
                            "finetune")
    mstep_iters: int = _finetune(500, "iterations of each M-step", "finetune")
    t_tr: int = _inference(30, "inference iterations in training (E-step; 0 = none: the ablation)")
    tagged_ratio: float = _finetune(0.5, "share of every M-step batch drawn from the tagged images",
                                    "finetune")
    confidence: float = _finetune(0.0, "pseudo-label pixels below this probability are ignored",
                                  "finetune")
    class_keep: float = _finetune(0.0, "> 0: each class keeps at least this share of its most "
                                  "confident pseudo-label pixels", "finetune")
    # How the cleaned tags T̂^w are made (discli.pseudo.tags.TagRule): "threshold" keeps the classes
    # whose tag probability sigmoid(v3) is >= tag_threshold; "evidence" corrects the caption by
    # the model's evidence (tag probability and the class's share of the pseudo-labelmap): a
    # caption tag stays when its score is >= tag_keep, another class joins when >= tag_add.
    # the defaults are TagRule's own, so a cache read outside its run is cleaned the same way
    tag_rule: str = _finetune(TagRule.kind, "cleaned tags: 'threshold' (tag probability >= "
                              "tag_threshold) or 'evidence' (caption corrected by the model)",
                              "finetune")
    tag_threshold: float = _finetune(TagRule.threshold, "tag_rule 'threshold': cleaned tag = tag "
                                     "probability >= this", "finetune")
    tag_keep: float = _finetune(TagRule.keep, "tag_rule 'evidence': a caption tag is kept when "
                                "its score is >= this", "finetune")
    tag_add: float = _finetune(TagRule.add, "tag_rule 'evidence': a class the caption does not "
                               "name is added when its score is >= this", "finetune")
    # The M-step (Eq. 1). Tag target of a tagged image: its caption tags ("noisy"), its cleaned
    # tags ("cleaned") or their average ("mix"); tag_gate ignores pseudo-label pixels of classes
    # its caption ("noisy") or cleaned tags ("cleaned") call absent; drop_untagged leaves out
    # images whose caption names no class.
    mstep_tags: str = _finetune("noisy", "M-step tag target: 'noisy' (caption), 'cleaned' or 'mix'",
                                "finetune")
    tag_gate: str = _finetune("noisy", "ignore pseudo-label pixels of classes these tags call "
                              "absent: 'none', 'noisy' or 'cleaned'", "finetune")
    # Off by default: it used to be on, but under the presets' pseudo_map = "labelmap" it
    # compared softmax(u3) with itself and ignored nothing; the presets were measured so.
    ignore_suppressed: bool = _finetune(False, "ignore pseudo-label pixels whose class the tag "
                                        "re-weighting changed", "finetune")
    # E-step labelmap: the "final" map (u3 re-weighted by v3, the paper's) or the labelmap head's
    # softmax(u3) alone ("labelmap"), leaving the tags to tag_gate
    pseudo_map: str = _finetune("labelmap", "E-step labelmap: 'labelmap' (softmax u3) or 'final' "
                                "(re-weighted by the tags)", "finetune")
    drop_untagged: bool = _finetune(True, "leave out tagged images whose caption names no class",
                                    "finetune")
    estep_flip: bool = _finetune(False, "E-step: average each tagged image's probabilities with "
                                 "those of its mirror image (test-time flip for pseudo-labels)",
                                 "finetune")
    warmup_iters: int = _optim(0, "linear learning-rate warm-up iterations of every pretraining "
                               "step (robust starts from random weights)", "pretrain")
    clip_grad_norm: float = _optim(10.0, "clip the gradients' global L2 norm to this (0: off); "
                                   "kept a ResNet-101 from random weights from exploding")
    mstep_lr_mult: float = _finetune(1.0, "M-step learning rates = this x the pretraining ones",
                                     "finetune")
    mstep_warmup: int = _finetune(0, "linear learning-rate warm-up iterations of each M-step",
                                  "finetune")
    subnet2_refit_iters: int = _finetune(0, "after each M-step, refit subnet-2 alone on the "
                                         "reconstruction loss for this many iterations",
                                         "finetune")
    mstep_from: str = _finetune("previous", "each M-step starts from the 'previous' round's "
                                "model or 'init'", "finetune")
    strong_aug: bool = _finetune(False, "photometric strong view of the pseudo-labelled images",
                                 "finetune")
    cutmix: float = _finetune(0.0, "share of the pseudo-labelled M-step images that get a box "
                              "of another tagged image pasted in (CutMix)", "finetune")
    inf_lr: float = _inference(InferenceConfig.lr, "feature-space inference step size")
    inf_momentum: float = _inference(InferenceConfig.momentum, "feature-space inference momentum")
    inf_tag_weight: float = _inference(InferenceConfig.tag_weight, "weight of the tag loss in "
                                       "training-time inference")
    inf_proximity: float = _inference(InferenceConfig.proximity, "weight of a term keeping u1, "
                                      "v1 near their start in inference")
    t_ts: int = _inference(0, "test-time inference iterations that dis infer/evaluate default to")
    estep_batch_size: int = _finetune(8, "E-step images per batch (same result at any size)",
                                      "finetune", neutral=True)
    estep_part_images: int = _finetune(64, "E-step images per crash-safe cache part (a kill "
                                       "loses < this)", "finetune", neutral=True)
    # validation during training
    val: str = _data("", "manifest with labelmaps: log validation mIoU (t = 0) while training",
                     neutral=True)
    val_every: int = _run(0, "validate every N iterations (0: only at the end of each step)",
                          neutral=True)
    # run
    seed: int = _run(0, "random seed (initialisation, data order, augmentation)")
    device: str = _run("auto", "'auto', 'cpu', 'cuda' or 'cuda:N'", neutral=True)
    amp: bool = _run(True, "mixed precision on CUDA (ignored on CPU)")
    num_workers: int = _run(0, "DataLoader worker processes", neutral=True)
    decoded_mb: int = _run(512, "decoded training images kept in memory, MB per process "
                           "(0: decode every time)", neutral=True)
    ckpt_every: int = _run(100, "checkpoint every N iterations (the resume points)", neutral=True)
    log_every: int = _run(10, "log.jsonl record every N iterations", neutral=True)
    sync_bn: bool = _model(False, "synchronised BatchNorm under torchrun on CUDA")

    def inference(self) -> InferenceConfig:
        return InferenceConfig(steps=self.t_tr, lr=self.inf_lr, momentum=self.inf_momentum,
                               tag_weight=self.inf_tag_weight, proximity=self.inf_proximity)

    def tag_cleaning(self) -> TagRule:
        """The rule that makes the cleaned tags of the tagged images (:mod:`discli.pseudo.tags`)."""
        return TagRule(self.tag_rule, self.tag_threshold, self.tag_keep, self.tag_add)

    def inference_settings(self) -> dict[str, Any]:
        """The inference settings a checkpoint carries (read back by
        :func:`discli.infer.checkpoint.inference_settings`): what `dis infer`, `dis evaluate` and
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
    group: str  # the table it is written in (GROUPS)


def config_keys() -> list[KeyInfo]:
    """Every key of :class:`TrainConfig` (``--set``, ``--config``), in declaration order."""
    types_ = _field_types()
    return [KeyInfo(f.name, types_[f.name].__name__, f.default, f.metadata["stage"],
                    f.metadata["neutral"], f.metadata["help"], f.metadata["group"])
            for f in fields(TrainConfig)]


def key_group(name: str) -> str:
    """The group of a key (:data:`GROUPS`); KeyError for an unknown key."""
    return {f.name: f.metadata["group"] for f in fields(TrainConfig)}[name]


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
              ("num_workers", cfg.num_workers >= 0),
              ("decoded_mb", cfg.decoded_mb >= 0), ("channels", cfg.channels >= 1),
              ("output_stride", cfg.output_stride in (4, 8)),
              ("scale_min", 0 < cfg.scale_min <= cfg.scale_max),
              ("optimizer", cfg.optimizer in ("sgd", "adamw")),
              ("mstep_tags", cfg.mstep_tags in ("noisy", "cleaned", "mix")),
              ("tag_gate", cfg.tag_gate in GATES),
              ("mstep_lr_mult", cfg.mstep_lr_mult > 0), ("mstep_warmup", cfg.mstep_warmup >= 0),
              ("warmup_iters", cfg.warmup_iters >= 0),
              ("clip_grad_norm", cfg.clip_grad_norm >= 0),
              ("val_every", cfg.val_every >= 0), ("class_keep", 0.0 <= cfg.class_keep <= 1.0),
              ("cutmix", 0.0 <= cfg.cutmix <= 1.0),
              ("mstep_from", cfg.mstep_from in ("previous", "init")),
              ("pseudo_map", cfg.pseudo_map in ("final", "labelmap")),
              ("tag_threshold", 0.0 < cfg.tag_threshold < 1.0),
              ("tag_rule", cfg.tag_rule in TAG_RULES),
              ("tag_keep", 0.0 <= cfg.tag_keep <= 1.0), ("tag_add", 0.0 <= cfg.tag_add <= 1.0),
              # torch refuses these mid-run, or they make no sense (a negative loss weight
              # maximises that loss; a momentum of 1 or more never forgets and diverges)
              ("weight_decay", cfg.weight_decay >= 0), ("momentum", 0 <= cfg.momentum < 1),
              ("poly_power", cfg.poly_power >= 0), ("head_lr_mult", cfg.head_lr_mult >= 0),
              ("loss_map", cfg.loss_map >= 0), ("loss_img", cfg.loss_img >= 0),
              ("loss_tag", cfg.loss_tag >= 0),
              *((f"inf_{key}", inference_range(key, getattr(cfg, f"inf_{key}")) is None)
                for key in ("lr", "momentum", "tag_weight", "proximity")),
              ("num_workers", cfg.num_workers <= MAX_WORKERS),
              ("device", re.fullmatch(r"auto|cpu|cuda(:\d+)?", cfg.device) is not None)]
    known = backbone_names()
    if cfg.backbone not in known:  # here, where the file that set it is known
        raise BadInputError(f"unknown backbone {cfg.backbone!r} (known: "
                            f"{', '.join(sorted(known))})", where("backbone"))
    for name, ok in checks:
        if not ok:
            raise BadInputError(f"invalid value {getattr(cfg, name)!r} for {name!r}",
                                where(name))
    for name in ("iters_step1", "iters_step2", "iters_step3", "mstep_iters",
                 "subnet2_refit_iters"):
        if getattr(cfg, name) < 0:
            raise BadInputError(f"invalid value {getattr(cfg, name)!r} for {name!r}",
                                where(name))
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        # nan and inf pass every comparison above the wrong way: refuse them
        if isinstance(value, float) and not math.isfinite(value):
            raise BadInputError(f"invalid value {value!r} for {f.name!r} (not a finite number)",
                                where(f.name))
        # a count no run reaches is a typo that would run for days
        limit = {"t_tr": MAX_STEPS, "t_ts": MAX_STEPS, "seed": 2**64 - 1}.get(f.name, MAX_COUNT)
        if isinstance(value, int) and not isinstance(value, bool) and value > limit:
            raise BadInputError(f"invalid value {value!r} for {f.name!r} (at most {limit})",
                                where(f.name))
    return cfg
