"""`dis demo`: the paper's ablation (Table 3) reproduced on the synthetic benchmark.

Stages, each the library function behind the subcommand a user would run (the report lists the
equivalent command lines), each resuming by itself when the demo is interrupted and re-run:

1. ``dis synth``: the benchmark (VOC-format labelled/test parts, IDW-style captions) and, through
   the real ``prepare-voc`` / ``prepare-idw`` code, its manifests;
2. ``dis pretrain`` on the few pixel-labelled images: the *baseline*;
3. ``dis finetune --t-tr T`` from the baseline for every T (T = 0 is the no-inference ablation);
4. the *upper bound*: ``dis pretrain`` on the labelled images plus every tagged image with its
   true labelmap, for as many iterations as baseline + finetune together;
5. ``dis evaluate --t-ts 0,10,30`` of every model (+ the ensemble of the t_ts);
6. ``dis clean-tags stats``: precision/recall/F1 of the caption tags and of the cleaned tags.

Results go to ``report.json``, ``report.md`` and ``figure.png`` (the layout of the paper's
Fig. 5: input, reconstruction target, ground truth, baseline, t_tr = 0, DIS at growing t_ts).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from discli.demo.jobs import demo_workers, run_jobs, train_job
from discli.storage import atomic_write
from discli.errors import UsageError
from discli.progress import NullReporter, Reporter
from discli.train.keys import TrainConfig


@dataclass
class DemoConfig:
    out: str = "dis-demo"
    seed: int = 0
    quick: bool = False
    t_tr: list[int] = field(default_factory=lambda: [0, 10, 30])
    t_ts: list[int] = field(default_factory=lambda: [0, 10, 30])
    # benchmark
    n_labelled: int = 20
    n_tagged: int = 400
    n_test: int = 100
    difficulty: str = "bold"  # see discli.synth.DIFFICULTIES
    min_size: int = 72  # image sides, pixels
    max_size: int = 120
    # Training: the shipped preset (discli/configs/<preset>.toml, the same `--config NAME` a
    # user passes to `dis pretrain` / `dis finetune`), "" = "quick" with --quick, else "demo";
    # `train` overrides any of its keys.
    preset: str = ""
    train: dict[str, Any] = field(default_factory=dict)
    device: str = "auto"
    # Processes that train the fine-tuning runs and the bound side by side (they are
    # independent once the baseline exists); each uses one thread. 0: one per CPU core, at
    # most 2 on a CPU (more would share cores), 1: in this process, with progress bars.
    workers: int = 0
    figure_rows: int = 4

    @property
    def preset_name(self) -> str:
        return self.preset or ("quick" if self.quick else "demo")

    @classmethod
    def quick_config(cls, **overrides: Any) -> DemoConfig:
        # The default's labelled images (the same files: images are seeded per index), half
        # the tagged images and the "quick" preset (shorter schedules, one round): a smoke run.
        base = cls(quick=True, n_tagged=200, n_test=60, figure_rows=3)
        return replace(base, **overrides)


def _train_config(demo: DemoConfig, out: Path, section: str = "finetune",
                  **extra: Any) -> TrainConfig:
    """The preset's configuration for ``section`` ("pretrain" or "finetune"), with the demo's
    run folder, seed, device and ``extra`` keys over it."""
    from discli.train.config import load_config

    overrides = {"out": str(out), "seed": demo.seed, "device": demo.device, **demo.train,
                 **extra}
    return load_config(demo.preset_name, overrides, section=section)


def _cached_json(path: Path, compute: Any) -> Any:
    """Results of a finished stage are kept, so a re-run demo skips it."""
    if path.exists():
        return json.loads(path.read_text())
    value = compute()
    atomic_write(path, lambda f: f.write(json.dumps(value, indent=1).encode()))
    return value


def _synth_config(demo: DemoConfig) -> Any:
    """The settings of the demo's benchmark (a :class:`discli.synth.SynthConfig`)."""
    from discli.synth import SynthConfig

    return SynthConfig(seed=demo.seed, n_labelled=demo.n_labelled, n_tagged=demo.n_tagged,
                       n_test=demo.n_test, min_size=demo.min_size, max_size=demo.max_size,
                       difficulty=demo.difficulty)


# Settings that do not change any result: a re-run may differ in these.
NEUTRAL_SETTINGS = ("out", "device", "figure_rows", "workers")


def check_settings(results: Path, demo: DemoConfig) -> None:
    """A demo folder resumes only the run it holds: finished stages are reused as they are, so a
    re-run with other settings (or one from an older version, which wrote no settings file)
    would mix two runs in one report. Refuse that; otherwise record the settings (once they
    are known to be valid, so that a typo does not lock the folder)."""
    _synth_config(demo).check()
    path = results / "settings.json"
    settings = {k: v for k, v in json.loads(json.dumps(asdict(demo))).items()
                if k not in NEUTRAL_SETTINGS}
    # The preset's contents too: an edited preset file is another run.
    for section in ("pretrain", "finetune"):
        preset = asdict(_train_config(demo, Path("."), section))
        settings[f"{section}_preset"] = {k: v for k, v in preset.items()
                                         if k not in ("out", "device", "seed")}
    if path.exists():
        held = json.loads(path.read_text())
        changed = sorted(k for k in set(held) | set(settings) if held.get(k) != settings.get(k))
        if changed:
            raise UsageError(f"{results.parent} holds a demo run with other settings "
                             f"({', '.join(changed)}): choose another {{opt:out}} or delete it")
        return
    if any(results.iterdir()):
        raise UsageError(f"{results.parent} holds a demo run from an older version of dis: "
                         "choose another {opt:out} or delete it")
    atomic_write(path, lambda f: f.write(json.dumps(settings, indent=1).encode()))


def _describe(job: str) -> str:
    return ("the fully supervised upper bound (every labelmap)" if job == "bound"
            else job.replace("finetune", "fine-tuning with"))


def _union_manifest(bench: Path, manifests: dict[str, str]) -> Path:
    """Labelled images plus every tagged image with its true labelmap (for the upper bound)."""
    from discli.data.manifest import Manifest, read_manifest, write_manifest
    from discli.data.prepare import rebase

    path = bench / "manifests" / "bound.jsonl"
    if not path.exists():
        train = read_manifest(manifests["train"])
        oracle = read_manifest(manifests["tagged_oracle"])
        records = (rebase(train.records, train.root, bench)
                   + rebase(oracle.records, oracle.root, bench))
        write_manifest(path, Manifest(train.classes, records, bench))
    return path


class StageTimes:
    """Seconds spent on each stage, summed over the runs that worked on it (kept in
    ``results/timings.json``): a resumed demo reports what its stages cost, not the near-zero
    time of finding them finished. ``timings`` holds this run's stages, in the report's
    order."""

    def __init__(self, path: Path):
        self.path = path
        self.spent: dict[str, float] = json.loads(path.read_text()) if path.exists() else {}
        self.timings: dict[str, float] = {}

    def record(self, name: str, seconds: float, redone: bool = False) -> None:
        """``redone``: a stage that every run does in full (the figures): its own time."""
        before = 0.0 if redone else self.spent.get(name, 0.0)
        self.timings[name] = self.spent[name] = round(before + seconds, 1)
        atomic_write(self.path, lambda f: f.write(json.dumps(self.spent, indent=1).encode()))

    def timed(self, name: str, fn: Callable[[], Any], redone: bool = False) -> Any:
        tic = time.perf_counter()
        value = fn()
        self.record(name, time.perf_counter() - tic, redone)
        return value

    def reorder(self, names: list[str]) -> None:
        """List ``names`` last, in the order given (not as the runs finished)."""
        for name in names:
            self.timings[name] = self.timings.pop(name)


@dataclass
class DemoRuns:
    """The demo's training runs by name ("baseline", "t_tr=T", "bound"), in the report's
    order: their (kind, config) and final checkpoints; ``jobs`` are those trained once the
    baseline exists (name -> (kind, config))."""

    configs: dict[str, tuple[str, TrainConfig]] = field(default_factory=dict)
    checkpoints: dict[str, Path] = field(default_factory=dict)
    finetune: dict[int, TrainConfig] = field(default_factory=dict)  # t_tr -> its config
    jobs: dict[str, tuple[str, TrainConfig]] = field(default_factory=dict)


def _benchmark(demo: DemoConfig, bench: Path, results: Path, times: StageTimes) -> Any:
    """Stage 1: the benchmark and its manifests (``dis synth``)."""
    from discli.synth import generate_benchmark

    return times.timed("benchmark", lambda: _cached_json(results / "benchmark.json", lambda: (
        generate_benchmark(bench, _synth_config(demo)))))


def _baseline(demo: DemoConfig, runs: Path, manifests: dict[str, str], times: StageTimes,
              reporter: Reporter) -> TrainConfig:
    """Stage 2: ``dis pretrain`` on the pixel-labelled images; returns its config."""
    from discli.train.pretrain import pretrain

    reporter.log("demo: pretraining the baseline on the pixel-labelled images")
    cfg = _train_config(demo, runs / "baseline", "pretrain", labelled=manifests["train"])
    times.timed("pretrain", lambda: pretrain(cfg, reporter=reporter))
    return cfg


def _plan_runs(demo: DemoConfig, bench: Path, runs: Path, manifests: dict[str, str],
               baseline_cfg: TrainConfig) -> DemoRuns:
    """The runs from the baseline: fine-tuning for every t_tr, and the upper bound."""
    baseline = runs / "baseline" / "pretrain" / "final.pth"
    plan = DemoRuns({"baseline": ("pretrain", baseline_cfg)}, {"baseline": baseline})
    common = dict(labelled=manifests["train"], tagged=manifests["tagged"])
    for t in demo.t_tr:
        cfg = _train_config(demo, runs / f"dis-t{t}", "finetune", init=str(baseline), t_tr=t,
                            **common)
        plan.configs[f"t_tr={t}"] = plan.jobs[f"finetune t_tr={t}"] = ("finetune", cfg)
        plan.finetune[t] = cfg
        plan.checkpoints[f"t_tr={t}"] = runs / f"dis-t{t}" / "finetune" / "final.pth"
    # The fully supervised upper bound: as many iterations as the baseline and the longest
    # fine-tuning together.
    extra_iters = max((c.rounds * c.mstep_iters for c in plan.finetune.values()), default=0)
    bound_cfg = _train_config(demo, runs / "bound", "pretrain", labelled=str(_union_manifest(
        bench, manifests)), iters_step3=baseline_cfg.iters_step3 + extra_iters)
    plan.configs["bound"] = plan.jobs["bound"] = ("pretrain", bound_cfg)
    plan.checkpoints["bound"] = runs / "bound" / "pretrain" / "final.pth"
    return plan


def _train_runs(demo: DemoConfig, jobs: dict[str, tuple[str, TrainConfig]],
                times: StageTimes, reporter: Reporter) -> None:
    """Stages 3 and 4: the fine-tuning runs and the bound, side by side where cores allow."""
    workers = demo_workers(demo.workers, jobs["bound"][1].device)
    if workers <= 1:
        for name, (kind, cfg) in jobs.items():
            reporter.log(f"demo: {_describe(name)}")
            times.record(name, train_job(kind, cfg, reporter))
        return
    # Longest first (the bound, then t_tr downwards), so the last job to start is short.
    order = ["bound", *(f"finetune t_tr={t}" for t in sorted(demo.t_tr, reverse=True))]
    reporter.log(f"demo: {len(jobs)} training runs in {workers} processes "
                 f"(the fine-tuning for every t_tr and the bound)")
    for name, seconds in run_jobs({n: jobs[n] for n in order}, workers):
        reporter.log(f"demo: finished {_describe(name)} ({seconds:.0f} s)")
        times.record(name, seconds)
    times.reorder(list(jobs))  # the report lists them in the usual order


def _evaluate_runs(demo: DemoConfig, checkpoints: dict[str, Path], val: Any, results: Path,
                   times: StageTimes, reporter: Reporter) -> dict[str, Any]:
    """Stage 5: ``dis evaluate --t-ts ...`` of every model."""
    from discli.infer.checkpoint import load_for_inference
    from discli.evaluation.evaluate import Scoring, evaluate

    scores: dict[str, Any] = {}
    for name, ckpt in checkpoints.items():
        reporter.log(f"demo: evaluating {name}")
        loaded = load_for_inference(ckpt)
        # test-time inference as the model was trained to run it (its checkpoint's settings)
        model, inference = loaded.model, loaded.inference_config()
        scores[name] = times.timed(f"evaluate {name}", lambda model=model, inference=inference:
                                   _cached_json(results / f"eval-{name.replace('=', '')}.json",
                                                lambda: evaluate(model, val, Scoring(demo.t_ts),
                                                                 inference, reporter=reporter)))
    return scores


def _round_scores(cache: Any, oracle: Any, truth: Any, cfg: TrainConfig,
                  r: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """One E-step's pseudo-labels scored against the true labelmaps, and its tags (as the
    run's M-step saw them: its cleaning rule) against the true tags."""
    from discli.pseudo.stats import score_cache
    from discli.pseudo.tags import tag_stats

    score = score_cache(cache, oracle, cfg.confidence)
    round_tags = tag_stats(cache, truth, cfg.tag_cleaning())
    return ({"round": r, "miou": score["all"]["miou"], "kept_miou": score["kept"]["miou"],
             "kept_share": score["kept_share"], "iou": score["all"]["iou"],
             "caption_f1": round_tags["noisy"]["micro"]["f1"],
             "cleaned_f1": round_tags["cleaned"]["micro"]["f1"]}, round_tags)


def _pseudo_label_scores(finetune_cfgs: dict[int, TrainConfig], runs: Path, truth: Any,
                         oracle: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """Stage 6: every round's pseudo-labels of each fine-tuning run (``pseudo_labels``) and
    the tags of its last round (``tags``, ``dis clean-tags stats``)."""
    from discli.pseudo.cache import PseudoCache

    tags, pseudo = {}, {}
    for t, cfg in finetune_cfgs.items():
        rounds = []
        for r in range(1, cfg.rounds + 1):
            cache = PseudoCache(runs / f"dis-t{t}" / "finetune" / f"round-{r}" / "cache.h5")
            row, round_tags = _round_scores(cache, oracle, truth, cfg, r)
            rounds.append(row)
            if r == cfg.rounds:
                tags[f"t_tr={t}"] = round_tags
            cache.close()
        pseudo[f"t_tr={t}"] = rounds
    return tags, pseudo


def run_demo(demo: DemoConfig, reporter: Reporter | None = None) -> dict[str, Any]:
    """Every stage of the demo in ``demo.out`` (module docstring), each resuming where an
    interrupted run left it; returns the report (``report.json``)."""
    import torch

    from discli.data.manifest import read_manifest
    from discli.demo.report import demo_commands, write_figure, write_report
    from discli.evaluation.plots import write_curves
    from discli.pseudo.tags import read_truth

    reporter = reporter or NullReporter()
    # The tiny model's convolutions are too small to split over threads: on a 2-core CPU two
    # intra-op threads made a training step many times slower than one (measured in the demo).
    torch.set_num_threads(1)
    out = Path(demo.out)
    bench, runs, results = out / "bench", out / "runs", out / "results"
    results.mkdir(parents=True, exist_ok=True)
    check_settings(results, demo)
    times = StageTimes(results / "timings.json")
    reporter.log(f"demo: benchmark in {bench}")
    info = _benchmark(demo, bench, results, times)
    manifests = info["manifests"]
    plan = _plan_runs(demo, bench, runs, manifests,
                      _baseline(demo, runs, manifests, times, reporter))
    _train_runs(demo, plan.jobs, times, reporter)
    val = read_manifest(manifests["val"])
    scores = _evaluate_runs(demo, plan.checkpoints, val, results, times, reporter)
    tags, pseudo = _pseudo_label_scores(plan.finetune, runs,
                                        read_truth(info["true_tags"], val.classes),
                                        read_manifest(manifests["tagged_oracle"]))
    report = {"config": asdict(demo), "benchmark": info.get("stats"), "classes": val.classes,
              "scores": scores, "tags": tags, "pseudo_labels": pseudo,
              "timings_s": times.timings,
              "commands": demo_commands(demo, bench, runs, plan.configs)}
    times.timed("figure", lambda: write_figure(out / "figure.png", plan.checkpoints, val, demo),
                True)
    times.timed("curves", lambda: write_curves(out / "curves.png", report), True)
    report["timings_s"] = times.timings
    write_report(out, report)
    return report
