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

   stages 2 to 5 are jobs that run side by side in worker processes, each once the models it
   needs exist (:mod:`discli.demo.jobs`);
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

from discli.demo.jobs import (Job, cached_json, demo_workers, evaluate_job, run_graph,
                              schedule, stage_name, train_job)
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
    names = {"bound": "the fully supervised upper bound (every labelmap)",
             "pretrain": "the baseline (pretraining on the pixel-labelled images)"}
    return names.get(job, job.replace("finetune", "fine-tuning with"))


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
    order: their (kind, config) and final checkpoints."""

    configs: dict[str, tuple[str, TrainConfig]] = field(default_factory=dict)
    checkpoints: dict[str, Path] = field(default_factory=dict)
    finetune: dict[int, TrainConfig] = field(default_factory=dict)  # t_tr -> its config


def _benchmark(demo: DemoConfig, bench: Path, results: Path, times: StageTimes) -> Any:
    """Stage 1: the benchmark and its manifests (``dis synth``)."""
    from discli.synth import generate_benchmark

    return times.timed("benchmark", lambda: cached_json(results / "benchmark.json", lambda: (
        generate_benchmark(bench, _synth_config(demo)))))


def _plan_runs(demo: DemoConfig, bench: Path, runs: Path,
               manifests: dict[str, str]) -> DemoRuns:
    """The runs: the baseline, fine-tuning from it for every t_tr, and the upper bound."""
    from discli.synth import bound_manifest

    baseline_cfg = _train_config(demo, runs / "baseline", "pretrain",
                                 labelled=manifests["train"])
    baseline = runs / "baseline" / "pretrain" / "final.pth"
    plan = DemoRuns({"baseline": ("pretrain", baseline_cfg)}, {"baseline": baseline})
    common = dict(labelled=manifests["train"], tagged=manifests["tagged"])
    for t in demo.t_tr:
        cfg = _train_config(demo, runs / f"dis-t{t}", "finetune", init=str(baseline), t_tr=t,
                            **common)
        plan.configs[f"t_tr={t}"] = ("finetune", cfg)
        plan.finetune[t] = cfg
        plan.checkpoints[f"t_tr={t}"] = runs / f"dis-t{t}" / "finetune" / "final.pth"
    # The fully supervised upper bound: as many iterations as the baseline and the longest
    # fine-tuning together.
    extra_iters = max((c.rounds * c.mstep_iters for c in plan.finetune.values()), default=0)
    bound_cfg = _train_config(demo, runs / "bound", "pretrain", labelled=str(bound_manifest(
        bench)), iters_step3=baseline_cfg.iters_step3 + extra_iters)
    plan.configs["bound"] = ("pretrain", bound_cfg)
    plan.checkpoints["bound"] = runs / "bound" / "pretrain" / "final.pth"
    return plan


def _cost(kind: str, cfg: TrainConfig, n_tagged: int) -> float:
    """A job's time in M-step iterations, fitted to the demo's measured stages (a pretraining
    iteration ~0.6 of one, a subnet-2 iteration ~0.4, a refit one ~0.5, an E-step image
    0.18 + 0.026 per inference step): enough to order the jobs, nothing is decided by it."""
    if kind == "pretrain":
        return 0.6 * (cfg.iters_step1 + cfg.iters_step3) + 0.4 * cfg.iters_step2
    return cfg.rounds * (cfg.mstep_iters + 0.5 * cfg.subnet2_refit_iters
                         + n_tagged * (0.18 + 0.026 * cfg.t_tr))


def _jobs(demo: DemoConfig, plan: DemoRuns, val: str, results: Path, workers: int) -> list[Job]:
    """Every training run and evaluation as a job (stages 2 to 5), in the order they start:
    the baseline and the bound, the fine-tuning runs in the order that finishes soonest, then
    the evaluations (each once its model exists)."""
    def train(run: str, after: tuple[str, ...] = ()) -> Job:
        kind, cfg = plan.configs[run]
        return Job(stage_name(run), train_job, (kind, cfg), after,
                   _cost(kind, cfg, demo.n_tagged))

    first = [train("baseline"), train("bound")]
    tuned = [train(f"t_tr={t}", (stage_name("baseline"),)) for t in demo.t_tr]
    evaluations = [Job(f"evaluate {name}", evaluate_job,
                       (ckpt, val, demo.t_ts, _eval_result(results, name)),
                       (stage_name(name),), float(demo.n_test))
                   for name, ckpt in plan.checkpoints.items()]
    if workers <= 1:  # one after the other, in the report's order
        return [first[0], *tuned, first[1], *evaluations]
    return schedule(first, tuned, evaluations, workers)


def _eval_result(results: Path, run: str) -> Path:
    return results / f"eval-{run.replace('=', '')}.json"


def _run_jobs(jobs: list[Job], report_order: list[str], workers: int, times: StageTimes,
              reporter: Reporter) -> None:
    """Stages 2 to 5: train and evaluate every model, side by side where cores allow; their
    timings in ``report_order`` (not as they finished)."""
    if workers > 1:
        reporter.log(f"demo: {len(jobs)} jobs (baseline, fine-tuning for every t_tr, bound, "
                     f"evaluations) in {workers} processes")
    else:
        reporter.log(f"demo: {_describe(jobs[0].name)}")
    for name, seconds in run_graph(jobs, workers, reporter):
        reporter.log(f"demo: finished {_describe(name)} ({seconds:.0f} s)")
        times.record(name, seconds)
    times.reorder(report_order)


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


def _profile(plan: DemoRuns) -> dict[str, dict[str, float]]:
    """Seconds of every phase of every training run (``step1``, ``estep 1``, ``mstep 1``,
    ``refit 1``, ...), as its ``log.jsonl`` records them (each phase's last ``time``)."""
    profile: dict[str, dict[str, float]] = {}
    for name, (kind, cfg) in plan.configs.items():
        phases: dict[str, float] = {}
        log = Path(cfg.out) / kind / "log.jsonl"
        for line in log.read_text().splitlines() if log.exists() else []:
            record = json.loads(line)
            if "time" in record and "phase" in record:
                phase = f"{record['phase']} {record['round']}" if "round" in record else \
                    record["phase"]
                phases[phase] = record["time"]
        profile[name] = phases
    return profile


def run_demo(demo: DemoConfig, reporter: Reporter | None = None) -> dict[str, Any]:
    """Every stage of the demo in ``demo.out`` (module docstring), each resuming where an
    interrupted run left it; returns the report (``report.json``)."""
    import torch

    from discli.data.manifest import read_manifest
    from discli.demo.report import demo_commands, write_figure, write_report
    from discli.evaluation.plots import write_curves
    from discli.pseudo.tags import read_truth

    tic = time.perf_counter()
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
    plan = _plan_runs(demo, bench, runs, manifests)
    workers = demo_workers(demo.workers, plan.configs["bound"][1].device)
    order = [*map(stage_name, plan.configs), *(f"evaluate {run}" for run in plan.checkpoints)]
    _run_jobs(_jobs(demo, plan, manifests["val"], results, workers), order, workers, times,
              reporter)
    scores = {run: json.loads(_eval_result(results, run).read_text())
              for run in plan.checkpoints}
    val = read_manifest(manifests["val"])
    tags, pseudo = _pseudo_label_scores(plan.finetune, runs,
                                        read_truth(info["true_tags"], val.classes),
                                        read_manifest(manifests["tagged_oracle"]))
    report = {"config": asdict(demo), "benchmark": info.get("stats"), "classes": val.classes,
              "scores": scores, "tags": tags, "pseudo_labels": pseudo,
              "timings_s": times.timings, "profile_s": _profile(plan),
              "commands": demo_commands(demo, bench, runs, plan.configs)}
    times.timed("figure", lambda: write_figure(out / "figure.png", plan.checkpoints, val, demo),
                True)
    times.timed("curves", lambda: write_curves(out / "curves.png", report), True)
    report["timings_s"] = times.timings
    report["wall_s"] = round(time.perf_counter() - tic, 1)  # this run, stages side by side
    write_report(out, report)
    return report
