"""The demo's jobs and how they share the cores: each training run (``dis pretrain`` or
``dis finetune``) and each evaluation is a job; jobs run in worker processes, each once the
jobs it needs are done, in an order chosen to finish soonest.

The bound needs nothing but the benchmark, so it trains beside the baseline; the fine-tuning
runs need the baseline; an evaluation needs its model. Which fine-tuning run starts first
decides how well the two cores stay busy: :func:`schedule` simulates the orders with a cost
estimate per job and keeps the one that finishes first. The order changes no result: every
job is seeded by its own configuration and runs with one thread, as in one process.
"""

from __future__ import annotations

import itertools
import json
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from discli.errors import UsageError
from discli.progress import Reporter
from discli.storage import atomic_write
from discli.train.keys import TrainConfig


def demo_workers(requested: int, device: str) -> int:
    """How many processes run the demo's jobs: ``requested``, or with 0 one per CPU core
    available to this process, at most 2 (each trains with one thread; the tiny model's
    convolutions do not split over threads, so processes are what uses the cores). On a GPU
    the runs would share one device: 1."""
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


def stage_name(run: str) -> str:
    """The Timings stage (and job name) of a demo run: "baseline" -> "pretrain", "bound" ->
    "bound", "t_tr=T" -> "finetune t_tr=T"."""
    return {"baseline": "pretrain", "bound": "bound"}.get(run, f"finetune {run}")


def cached_json(path: Path, compute: Callable[[], Any]) -> Any:
    """Results of a finished stage are kept, so a re-run demo skips it."""
    if path.exists():
        return json.loads(path.read_text())
    value = compute()
    atomic_write(path, lambda f: f.write(json.dumps(value, indent=1).encode()))
    return value


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


def evaluate_job(checkpoint: Path, manifest: str, t_ts: list[int], result: Path,
                 reporter: Reporter | None = None) -> float:
    """``dis evaluate --t-ts ...`` of one model with its checkpoint's inference settings (test
    time as the model was trained to run it), kept in ``result``; returns its seconds."""
    import torch

    from discli.data.manifest import read_manifest
    from discli.evaluation.evaluate import Scoring, evaluate
    from discli.infer.checkpoint import load_for_inference

    torch.set_num_threads(1)
    tic = time.perf_counter()

    def scores() -> Any:
        loaded = load_for_inference(checkpoint)
        return evaluate(loaded.model, read_manifest(manifest), Scoring(t_ts),
                        loaded.inference_config(), reporter=reporter)

    cached_json(result, scores)
    return time.perf_counter() - tic


@dataclass(frozen=True)
class Job:
    """``fn(*args)`` returns its seconds; it starts once the jobs named in ``after`` are done.
    ``cost`` is the estimate :func:`schedule` orders by (any unit, the same for all jobs)."""

    name: str
    fn: Callable[..., float]
    args: tuple[Any, ...]
    after: tuple[str, ...] = ()
    cost: float = 1.0


def _pick(pending: Sequence[Job], done: set[str]) -> Job | None:
    """The first job of ``pending`` whose dependencies are done."""
    return next((job for job in pending if set(job.after) <= done), None)


def makespan(order: Sequence[Job], workers: int) -> float:
    """When the jobs would all be done, started in ``order`` priority on ``workers`` lanes
    with their ``cost`` as duration (list scheduling, as :func:`run_graph` runs them)."""
    pending, running = list(order), []  # running: (end, name)
    done: set[str] = set()
    now = 0.0
    while pending or running:
        job = _pick(pending, done) if len(running) < workers else None
        if job is None:
            now, name = min(running)
            running.remove((now, name))
            done.add(name)
            continue
        pending.remove(job)
        running.append((now + job.cost, job.name))
    return now


def schedule(first: Sequence[Job], free: Sequence[Job], last: Sequence[Job],
             workers: int) -> list[Job]:
    """``first``, then the permutation of ``free`` that :func:`makespan` finishes soonest
    (the first such; up to 6 jobs, more are taken longest first), then ``last``."""
    if len(free) > 6:
        return [*first, *sorted(free, key=lambda job: -job.cost), *last]
    orders = ([*first, *p, *last] for p in itertools.permutations(free))
    return min(orders, key=lambda order: makespan(order, workers))


def run_graph(order: Sequence[Job], workers: int,
              reporter: Reporter | None = None) -> Iterator[tuple[str, float]]:
    """Run the jobs, each once its dependencies are done, the earliest of ``order`` first:
    in this process (with ``reporter``) when ``workers`` <= 1, else in ``workers`` fresh
    processes. Yields (name, seconds) as each finishes. A job that fails raises its error here
    once the running jobs have finished (no other starts); every job resumes from its own
    files when the demo is re-run."""
    if workers <= 1:
        for job in order:
            yield job.name, job.fn(*job.args, reporter=reporter)
        return
    import multiprocessing
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    pending, done, running = list(order), set(), {}
    # "spawn": a fork of a process that has run torch can deadlock in its thread pools.
    with ProcessPoolExecutor(max_workers=min(workers, len(order)),
                             mp_context=multiprocessing.get_context("spawn")) as pool:
        while pending or running:
            while len(running) < workers and (job := _pick(pending, done)) is not None:
                pending.remove(job)
                running[pool.submit(job.fn, *job.args)] = job.name
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in finished:
                name = running.pop(future)
                if future.exception() is not None:
                    pending.clear()
                    wait(running)
                    raise future.exception()  # type: ignore[misc]
                done.add(name)
                yield name, future.result()
