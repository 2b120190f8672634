"""Tag cleaning and pseudo-label caches as a fine-tuning run makes them.

- :func:`run_clean`: ``dis clean-tags run``, the cleaned tags of a tagged manifest without a
  finetune (one E-step with a checkpoint);
- :func:`run_settings` / :func:`run_rule`: the ``confidence``, ``tag_gate`` and tag rule of the
  run a cache belongs to (``<run>/finetune/round-N/cache.h5`` beside ``config.toml``), the
  defaults of ``dis clean-tags`` and ``dis score-cache``;
- :func:`export_run_cache`: ``dis clean-tags export`` with those defaults, so the PNGs show
  what the run's M-step trained on.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from discli.data.manifest import read_manifest
from discli.distributed import resolve_device
from discli.errors import BadInputError, IncompatibleError, UsageError
from discli.infer.checkpoint import check_classes, load_for_inference
from discli.pseudo.cache import PseudoCache
from discli.pseudo.export import export_cache
from discli.pseudo.tags import DEFAULT_THRESHOLD, TagRule, check_threshold, diff, threshold_rule
from discli.storage.safety import refuse_overlap
from discli.train.config import load_config_origins
from discli.train.estep import Execution, PseudoLabelling, run_estep

RUN_KEYS = ("confidence", "tag_gate", "tag_rule", "tag_threshold", "tag_keep", "tag_add")


def run_settings(cache_path: Path) -> dict[str, Any]:
    """``confidence``, ``tag_gate`` and the tag cleaning keys of the fine-tuning run a cache
    belongs to (``{}`` if the cache is not in a run folder)."""
    config = Path(cache_path).absolute().parent.parent / "config.toml"
    if not config.exists():
        return {}
    # read as the run read it: every value type- and range-checked, errors naming the file
    cfg, origins = load_config_origins(config, section="finetune")
    return {k: getattr(cfg, k) for k in RUN_KEYS if k in origins}


def run_rule(cache_path: str | Path, threshold: float | None = None,
             settings: dict[str, Any] | None = None) -> Any:
    """The :class:`discli.pseudo.tags.TagRule` that made a cache's cleaned tags as its run's M-step
    saw them: a given probability ``threshold`` (the ``--threshold`` of ``dis clean-tags``)
    wins; else the run's ``tag_rule`` and its keys (``settings``: :func:`run_settings` of the
    cache, when the caller has read them already); a cache outside a run folder, or of a run
    that predates the rules, is cleaned at probability 0.5."""
    if threshold is not None:
        return threshold_rule(threshold)
    found = run_settings(Path(cache_path)) if settings is None else settings
    default = TagRule()
    return TagRule(str(found.get("tag_rule", default.kind)),
                   float(found.get("tag_threshold", default.threshold)),
                   float(found.get("tag_keep", default.keep)),
                   float(found.get("tag_add", default.add)))


def export_run_cache(cache_path: str | Path, out_dir: str | Path,
                     threshold: float | None = None, confidence: float | None = None,
                     gate: str | None = None) -> dict[str, Any]:
    """:func:`discli.pseudo.export.export_cache` with the run's rule, ``confidence`` and
    ``tag_gate`` wherever an argument is None (0 and ``none`` outside a run folder)."""
    defaults = run_settings(Path(cache_path))
    confidence = float(defaults.get("confidence", 0.0) if confidence is None else confidence)
    gate = str(defaults.get("tag_gate", "none") if gate is None else gate)
    return export_cache(cache_path, out_dir, run_rule(cache_path, threshold, defaults),
                        confidence, gate)


@dataclass(frozen=True)
class CleanSettings:
    """The E-step of ``dis clean-tags run`` and its summary: ``t_tr`` (None: the checkpoint's),
    the inference settings (an :class:`discli.infer.loop.InferenceConfig`; None: the
    checkpoint's, :func:`discli.infer.checkpoint.inference_settings`, with the ``overrides``
    that are not None: ``lr``, ``momentum``, ``tag_weight``, ...) and the probability
    ``threshold`` of the cleaned tags that the summary counts."""

    t_tr: int | None = None
    inference: Any = None
    overrides: dict[str, Any] | None = None
    threshold: float = DEFAULT_THRESHOLD


def run_clean(checkpoint: str | Path, manifest_path: str | Path, cache_path: str | Path,
              settings: CleanSettings = CleanSettings(), execution: Execution = Execution(), *,
              split: str | None = None, overwrite: bool = False,
              reporter: Any = None) -> dict[str, Any]:
    """Cleaned tags of a tagged manifest without a finetune: one E-step with ``checkpoint``.

    ``execution.device``: a device or a name for :func:`discli.distributed.resolve_device`
    (None or "auto": cuda when there is one). ``cache_path`` may not be the manifest or the
    checkpoint (refused first).

    Writes the cache at ``cache_path`` (:func:`discli.train.estep.run_estep`) and returns the
    :func:`diff` summary (per-class counts, no per-image list) with ``cache`` and ``reused``. An
    existing cache is reused when it was made by the same checkpoint and t_tr and holds every
    image; one of another class count, checkpoint or t_tr is refused unless ``overwrite``.
    """
    refuse_overlap([(cache_path, "cache")], [(manifest_path, "manifest"),
                                             (checkpoint, "checkpoint")],
                   advice="choose another {opt:out}")
    execution = dataclasses.replace(execution, device=resolve_device(execution.device))
    check_threshold(settings.threshold)
    t_tr = settings.t_tr
    if t_tr is not None and t_tr < 0:
        raise UsageError(f"{{opt:t_tr}} must be >= 0, got {t_tr}")
    loaded = load_for_inference(checkpoint, execution.device)
    if t_tr is None:
        t_tr = int(loaded.inference["t_tr"])
    cfg = settings.inference
    if cfg is None:
        cfg = loaded.inference_config(**(settings.overrides or {}))
    manifest = read_manifest(manifest_path).select(split)
    check_classes(loaded.classes, manifest.classes, "manifest", manifest_path, checkpoint)
    if not manifest.records:
        raise BadInputError(f"no records{f' in split {split!r}' if split else ''}",
                            manifest_path)
    cache_path = Path(cache_path)
    reused = False
    if cache_path.exists() and not overwrite:
        reused = _reusable(cache_path, loaded, t_tr, manifest, checkpoint)
    if not reused:
        run_estep(loaded.model, manifest, cache_path,
                  PseudoLabelling(loaded.checkpoint_hash, t_tr, cfg), execution,
                  reporter=reporter)
    cache = PseudoCache(cache_path)
    try:
        summary = diff(cache, settings.threshold)
    finally:
        cache.close()
    summary.pop("images")
    return {"cache": str(cache_path), "reused": reused, "t_tr": t_tr, **summary}


def _reusable(cache_path: Path, loaded: Any, t_tr: int, manifest: Any,
              checkpoint: str | Path) -> bool:
    """Whether the cache at ``cache_path`` holds every image of ``manifest``; one made by
    another checkpoint or t_tr (or of other classes) is refused."""
    old = PseudoCache(cache_path)
    try:
        check_classes(loaded.classes, old.classes, "existing cache", cache_path, checkpoint)
        made = {"checkpoint": old.attrs.get("checkpoint_hash"), "t_tr": old.attrs.get("t_tr")}
        ids = set(old.ids())
    finally:
        old.close()  # before a refusal too, and before run_estep rewrites the file
    wanted = {"checkpoint": loaded.checkpoint_hash, "t_tr": t_tr}
    for key in made:
        if str(made[key]) != str(wanted[key]):
            raise IncompatibleError(f"existing cache was made with {key} {made[key]}, not "
                                    f"{wanted[key]}; pass {{opt:overwrite=True}} or another "
                                    f"{{opt:out}}",
                                    cache_path)
    return ids >= {rec.id for rec in manifest.records}
