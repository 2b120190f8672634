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
import os
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

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


# Settings that do not change any result: a re-run may differ in these.
NEUTRAL_SETTINGS = ("out", "device", "figure_rows", "workers")


def check_settings(results: Path, demo: DemoConfig) -> None:
    """A demo folder resumes only the run it holds: finished stages are reused as they are, so a
    re-run with other settings (or one from an older version, which wrote no settings file)
    would mix two runs in one report. Refuse that; otherwise record the settings (once they
    are known to be valid, so that a typo does not lock the folder)."""
    from discli.synth import SynthConfig

    SynthConfig(seed=demo.seed, n_labelled=demo.n_labelled, n_tagged=demo.n_tagged,
                n_test=demo.n_test, min_size=demo.min_size, max_size=demo.max_size,
                difficulty=demo.difficulty).check()
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


def demo_workers(requested: int, device: str) -> int:
    """How many processes train the demo's independent runs: ``requested``, or with 0 one per
    CPU core available to this process, at most 2 (each trains with one thread; the tiny
    model's convolutions do not split over threads, so processes are what uses the cores).
    On a GPU the runs would share one device: 1."""
    if requested < 0:
        raise UsageError(f"{{opt:workers}} must be >= 0, got {requested}")
    if requested:
        return requested
    from discli.distributed import resolve_device

    if resolve_device(device).type != "cpu":
        return 1
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, min(2, cores))


def _describe(job: str) -> str:
    return ("the fully supervised upper bound (every labelmap)" if job == "bound"
            else job.replace("finetune", "fine-tuning with"))


def train_job(kind: str, cfg: TrainConfig, reporter: Reporter | None = None) -> float:
    """``dis pretrain`` or ``dis finetune`` with ``cfg``, one thread; returns its seconds. Runs
    in a worker process too (hence a module-level function)."""
    import torch

    from discli.train.finetune import finetune
    from discli.train.pretrain import pretrain

    torch.set_num_threads(1)
    tic = time.perf_counter()
    (pretrain if kind == "pretrain" else finetune)(cfg, reporter=reporter)
    return time.perf_counter() - tic


def run_jobs(jobs: dict[str, tuple[str, TrainConfig]],
             workers: int) -> Iterator[tuple[str, float]]:
    """Train ``jobs`` (name -> (kind, config)) in ``workers`` fresh processes, started in the
    order given; yields (name, seconds) as each finishes. A job that fails raises its error
    here, once the jobs already running have finished (the rest are not started); every run
    resumes from its own checkpoints when the demo is re-run."""
    import multiprocessing
    from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait

    # "spawn": a fork of a process that has run torch can deadlock in its thread pools.
    with ProcessPoolExecutor(max_workers=min(workers, len(jobs)),
                             mp_context=multiprocessing.get_context("spawn")) as pool:
        pending = {pool.submit(train_job, kind, cfg): name for name, (kind, cfg) in jobs.items()}
        while pending:
            done, _ = wait(pending, return_when=FIRST_EXCEPTION)
            for future in done:
                name = pending.pop(future)
                if future.exception() is not None:
                    for other in pending:
                        other.cancel()
                    raise future.exception()  # type: ignore[misc]
                yield name, future.result()


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


def _toml(value: Any) -> str:
    return ("true" if value else "false") if isinstance(value, bool) else str(value)


def train_command(command: str, cfg: TrainConfig, preset: str = "demo") -> str:
    """The `dis pretrain|finetune` command line that trains with ``cfg``: ``--config PRESET``,
    its manifests, run folders and t_tr as options where they differ from the preset's, and
    every other setting that differs as --set KEY=VALUE (derived from the config itself, so the listed commands cannot drift from
    what ran)."""
    from discli.train.config import load_config

    section = "pretrain" if command == "pretrain" else "finetune"
    defaults = asdict(load_config(preset, {}, section=section))
    options = ("labelled", "tagged", "init", "out", "t_tr")
    paths = [f"--{key.replace('_', '-')} {value}" for key, value in asdict(cfg).items()
             if key in options and value != defaults[key]]
    sets = [f"--set {key}={_toml(value)}" for key, value in asdict(cfg).items()
            if key not in options and value != defaults[key]]
    return " ".join([f"dis {command} --config {preset}", *paths, *sets])


def _commands(demo: DemoConfig, bench: Path, runs: Path,
              configs: dict[str, tuple[str, TrainConfig]]) -> list[str]:
    m = bench / "manifests"
    last = configs[f"t_tr={demo.t_tr[-1]}"][1] if demo.t_tr else None
    lines = [f"dis synth {bench} --seed {demo.seed} --n-labelled {demo.n_labelled} "
             f"--n-tagged {demo.n_tagged} --n-test {demo.n_test} "
             f"--difficulty {demo.difficulty} --min-size {demo.min_size} "
             f"--max-size {demo.max_size}"]
    lines += [train_command(command, cfg, demo.preset_name) for command, cfg in configs.values()]
    ts = ",".join(str(t) for t in demo.t_ts)
    if last is not None:
        lines.append(f"dis evaluate --checkpoint {runs}/dis-t{demo.t_tr[-1]}/finetune/final.pth "
                     f"--manifest {m}/val.jsonl --t-ts {ts}")
        lines.append(f"dis clean-tags stats {runs}/dis-t{demo.t_tr[-1]}/finetune/round-"
                     f"{last.rounds}/cache.h5 --truth {bench}/idw/true_tags.jsonl")
    return lines


def run_demo(demo: DemoConfig, reporter: Reporter | None = None) -> dict[str, Any]:
    from discli.pseudo.cache import PseudoCache
    from discli.infer.checkpoint import load_for_inference
    from discli.data.manifest import read_manifest
    from discli.synth import generate_benchmark
    from discli.evaluation.evaluate import evaluate
    from discli.pseudo.stats import score_cache
    from discli.pseudo.tags import read_truth, tag_stats
    from discli.train.pretrain import pretrain

    reporter = reporter or NullReporter()
    import torch

    # The tiny model's convolutions are too small to split over threads: on a 2-core CPU two
    # intra-op threads made a training step many times slower than one (measured in the demo).
    torch.set_num_threads(1)
    out = Path(demo.out)
    bench, runs, results = out / "bench", out / "runs", out / "results"
    results.mkdir(parents=True, exist_ok=True)
    check_settings(results, demo)
    # Seconds spent on each stage, summed over the runs that worked on it: a resumed demo
    # reports what its stages cost, not the near-zero time of finding them finished.
    timings_path = results / "timings.json"
    spent: dict[str, float] = (json.loads(timings_path.read_text())
                               if timings_path.exists() else {})
    timings: dict[str, float] = {}

    def record(name: str, seconds: float, redone: bool = False) -> None:
        """``redone``: a stage that every run does in full (the figures): its own time."""
        before = 0.0 if redone else spent.get(name, 0.0)
        timings[name] = spent[name] = round(before + seconds, 1)
        atomic_write(timings_path, lambda f: f.write(json.dumps(spent, indent=1).encode()))

    def timed(name: str, fn: Any, redone: bool = False) -> Any:
        tic = time.perf_counter()
        value = fn()
        record(name, time.perf_counter() - tic, redone)
        return value

    reporter.log(f"demo: benchmark in {bench}")
    info = timed("benchmark", lambda: _cached_json(results / "benchmark.json", lambda: (
        generate_benchmark(bench, seed=demo.seed, n_labelled=demo.n_labelled,
                           n_tagged=demo.n_tagged, n_test=demo.n_test,
                           min_size=demo.min_size, max_size=demo.max_size,
                           difficulty=demo.difficulty))))
    manifests = info["manifests"]
    common = dict(labelled=manifests["train"], tagged=manifests["tagged"])

    reporter.log("demo: pretraining the baseline on the pixel-labelled images")
    baseline_cfg = _train_config(demo, runs / "baseline", "pretrain",
                                 labelled=manifests["train"])
    configs = {"baseline": ("pretrain", baseline_cfg)}
    timed("pretrain", lambda: pretrain(baseline_cfg, reporter=reporter))
    baseline = runs / "baseline" / "pretrain" / "final.pth"

    checkpoints = {"baseline": baseline}
    jobs: dict[str, tuple[str, TrainConfig]] = {}
    finetune_cfgs = {}
    for t in demo.t_tr:
        cfg = _train_config(demo, runs / f"dis-t{t}", "finetune", init=str(baseline), t_tr=t,
                            **common)
        configs[f"t_tr={t}"] = jobs[f"finetune t_tr={t}"] = ("finetune", cfg)
        finetune_cfgs[t] = cfg
        checkpoints[f"t_tr={t}"] = runs / f"dis-t{t}" / "finetune" / "final.pth"
    # The fully supervised upper bound: as many iterations as the baseline and the longest
    # fine-tuning together.
    extra_iters = max((c.rounds * c.mstep_iters for c in finetune_cfgs.values()), default=0)
    bound_cfg = _train_config(demo, runs / "bound", "pretrain", labelled=str(_union_manifest(
        bench, manifests)), iters_step3=baseline_cfg.iters_step3 + extra_iters)
    configs["bound"] = jobs["bound"] = ("pretrain", bound_cfg)
    checkpoints["bound"] = runs / "bound" / "pretrain" / "final.pth"
    workers = demo_workers(demo.workers, bound_cfg.device)
    if workers <= 1:
        for name, (kind, cfg) in jobs.items():
            reporter.log(f"demo: {_describe(name)}")
            record(name, train_job(kind, cfg, reporter))
    else:
        # Longest first (the bound, then t_tr downwards), so the last job to start is short.
        order = ["bound", *(f"finetune t_tr={t}" for t in sorted(demo.t_tr, reverse=True))]
        reporter.log(f"demo: {len(jobs)} training runs in {workers} processes "
                     f"(the fine-tuning for every t_tr and the bound)")
        for name, seconds in run_jobs({n: jobs[n] for n in order}, workers):
            reporter.log(f"demo: finished {_describe(name)} ({seconds:.0f} s)")
            record(name, seconds)
        for name in jobs:  # the report lists them in the usual order, not as they finished
            timings[name] = timings.pop(name)

    val = read_manifest(manifests["val"])
    scores: dict[str, Any] = {}
    for name, ckpt in checkpoints.items():
        reporter.log(f"demo: evaluating {name}")
        loaded = load_for_inference(ckpt)
        # test-time inference as the model was trained to run it (its checkpoint's settings)
        model, inference = loaded.model, loaded.inference_config()
        scores[name] = timed(f"evaluate {name}", lambda model=model, inference=inference:
                             _cached_json(results / f"eval-{name.replace('=', '')}.json",
                                          lambda: evaluate(model, val, steps=demo.t_ts,
                                                           cfg=inference, reporter=reporter)))

    truth = read_truth(info["true_tags"], val.classes)
    oracle = read_manifest(manifests["tagged_oracle"])
    tags, pseudo = {}, {}
    for t, cfg in finetune_cfgs.items():
        rounds = []
        for r in range(1, cfg.rounds + 1):
            cache = PseudoCache(runs / f"dis-t{t}" / "finetune" / f"round-{r}" / "cache.h5")
            score = score_cache(cache, oracle, cfg.confidence)
            # the tags as the run's M-step saw them (its cleaning rule)
            round_tags = tag_stats(cache, truth, cfg.tag_cleaning())
            rounds.append({"round": r, "miou": score["all"]["miou"],
                           "kept_miou": score["kept"]["miou"], "kept_share": score["kept_share"],
                           "iou": score["all"]["iou"],
                           "caption_f1": round_tags["noisy"]["micro"]["f1"],
                           "cleaned_f1": round_tags["cleaned"]["micro"]["f1"]})
            if r == cfg.rounds:
                tags[f"t_tr={t}"] = round_tags
            cache.close()
        pseudo[f"t_tr={t}"] = rounds

    report = {"config": asdict(demo), "benchmark": info.get("stats"), "classes": val.classes,
              "scores": scores, "tags": tags, "pseudo_labels": pseudo, "timings_s": timings,
              "commands": _commands(demo, bench, runs, configs)}
    from discli.demo.report import write_figure, write_report
    from discli.evaluation.plots import write_curves

    timed("figure", lambda: write_figure(out / "figure.png", checkpoints, val, demo), True)
    timed("curves", lambda: write_curves(out / "curves.png", report), True)
    report["timings_s"] = timings
    write_report(out, report)
    return report
