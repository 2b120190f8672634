"""The demo's training jobs: one ``dis pretrain`` or ``dis finetune`` run, and several of them
side by side in worker processes (the fine-tuning runs and the bound are independent once the
baseline exists)."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator

from discli.errors import UsageError
from discli.progress import Reporter
from discli.train.keys import TrainConfig


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
