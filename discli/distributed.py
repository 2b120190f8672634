"""torchrun / DistributedDataParallel plumbing, read from the environment only.

``torchrun`` sets RANK, WORLD_SIZE and LOCAL_RANK; we never take a ``--local-rank`` argument
(it broke under torch 2). A plain ``dis pretrain`` without torchrun is world size 1 and never
touches torch.distributed.

Sharded work (``dis infer``, ``dis evaluate``, the E-step) deals whole units (same-size batches)
to the ranks with :func:`shard`: rank r takes units r, r+W, r+2W, ... of one list every rank
computes identically (or receives from rank 0 through :func:`on_main`), so every unit is done
exactly once, with no padding and no duplicates; a rank with nothing to do still joins every
collective. Steps that may fail on one rank before a collective (taking a lock, checking a
folder) go through :func:`together` or :func:`on_main`: a failure on any rank then stops every
rank (the others raise :class:`PeerError` with the failing rank's exit code) instead of leaving
them waiting for a collective that never comes.
"""

from __future__ import annotations

import atexit
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from discli.errors import EXIT_FAILURE, DisError, UsageError

T = TypeVar("T")


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def dist_info() -> DistInfo:
    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(),
                        int(os.environ.get("LOCAL_RANK", 0)))
    return DistInfo(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                    int(os.environ.get("LOCAL_RANK", 0)))


def init_distributed(device: torch.device) -> DistInfo:
    """Join the process group when launched by torchrun (nccl on CUDA, gloo on CPU). Commands
    call :func:`setup_distributed`, which also makes ``device`` this process's CUDA device."""
    info = dist_info()
    if info.enabled and not dist.is_initialized():
        if device.type == "cuda":
            # Bound to the rank's GPU, barrier() and NCCL's communicators use it; without
            # device_id they guess (rank mod GPU count, or the current device: cuda:0 on every
            # rank until set_device), which hangs or reports duplicate GPUs.
            dist.init_process_group(backend="nccl", device_id=device)
        else:
            dist.init_process_group(backend="gloo")
        atexit.register(_drain)
        info = dist_info()
    return info


EXIT_DRAIN_SECONDS = 0.1


def _drain() -> None:
    """At exit, give torch's collective worker threads the GIL for a moment.

    Gloo (torch 2.14) frees a finished collective's tensors on its worker thread, which takes
    the GIL to drop their Python objects. When the main thread returns right after a collective,
    that thread can still be waiting for the GIL when the interpreter finalizes; it is then
    killed inside a C++ destructor and the whole process aborts (SIGABRT, "terminate called
    without an active exception"; about one exit in five on 2 CPU cores). A barrier does not
    help (it holds the previous collectives and frees them the same way), and
    ``destroy_process_group`` does not join those threads. Sleeping here, before finalization,
    releases the GIL so the pending frees complete.
    """
    if dist.is_available() and dist.is_initialized():
        time.sleep(EXIT_DRAIN_SECONDS)


def setup_distributed(device: str | torch.device) -> tuple[torch.device, DistInfo]:
    """The one entry of every command (pretrain, finetune, infer, evaluate) into torchrun: joins
    the process group for a job on ``device`` and returns the device this rank uses and its
    :class:`DistInfo`. Under torchrun with CUDA the rank's GPU is ``cuda:LOCAL_RANK``: it becomes
    the current CUDA device (the object collectives and the CPU-tensor path of
    :func:`all_reduce_sum` allocate there) and the process group's ``device_id``; a device of
    another index is refused (every rank would otherwise share it). World size 1 changes
    nothing."""
    device = torch.device(device)
    info = dist_info()
    if info.enabled and device.type == "cuda":
        if device.index is None:
            device = torch.device("cuda", info.local_rank)
        if device.index != info.local_rank:
            raise UsageError(f"{{opt:device}}: this process (LOCAL_RANK {info.local_rank}) "
                             f"must use cuda:{info.local_rank}, not {device}")
        torch.cuda.set_device(device)
    return device, init_distributed(device)


def _initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def collective_device() -> torch.device:
    """Where this rank's collectives allocate their tensors: its GPU under NCCL (the one
    :func:`setup_distributed` made current), the CPU under gloo."""
    if _initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def barrier() -> None:
    if _initialized():
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over the ranks, in place (a CPU tensor under NCCL goes through this rank's
    GPU and back)."""
    if _initialized():
        if dist.get_backend() == "nccl" and tensor.device.type != "cuda":
            moved = tensor.to(collective_device())
            dist.all_reduce(moved, op=dist.ReduceOp.SUM)
            tensor.copy_(moved)
        else:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def shard(items: Sequence[T], info: DistInfo | None = None) -> list[T]:
    """This rank's share of ``items``: items r, r+W, r+2W, ... (rank r of W).

    Deterministic, disjoint and covering over the ranks, without padding: every item goes to
    exactly one rank, and ranks beyond ``len(items)`` get ``[]``. Every rank must pass the same
    list in the same order."""
    info = info or dist_info()
    if not 0 <= info.rank < info.world_size:
        raise ValueError(f"rank {info.rank} is not in 0..{info.world_size - 1}")
    return list(items[info.rank::info.world_size])


class PeerError(DisError):
    """Raised on the ranks whose own step succeeded when another rank's failed (same exit code
    as the failing rank's error, its message quoted)."""

    def __init__(self, rank: int, exit_code: int, message: str):
        super().__init__(f"rank {rank} stopped: {message}")
        self.rank = rank
        self.exit_code = exit_code


def _failure(exc: BaseException) -> tuple[int, str]:
    message = exc.marked() if isinstance(exc, DisError) else str(exc)
    return int(getattr(exc, "exit_code", EXIT_FAILURE)), message or type(exc).__name__


def together(fn: Callable[[], T]) -> T:
    """Run ``fn()`` on every rank; if it raises on any rank it fails on all of them.

    The rank(s) where it raised re-raise their own error; the others raise :class:`PeerError`.
    A collective (one ``all_gather_object``), so every rank must call it; without a process
    group it is just ``fn()``."""
    if not _initialized():
        return fn()
    error: Exception | None = None
    result: Any = None
    try:
        result = fn()
    except Exception as exc:  # noqa: BLE001 - handed to every rank, then re-raised
        error = exc
    failures: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(failures, None if error is None else _failure(error))
    if error is not None:
        raise error
    for rank, failure in enumerate(failures):
        if failure is not None:
            raise PeerError(rank, *failure)
    return result


def on_main(fn: Callable[[], T]) -> T:
    """Run ``fn()`` on rank 0 only and return its result on every rank (pickled through a
    broadcast); an error on rank 0 is raised there and as :class:`PeerError` on the others.
    A collective; without a process group it is just ``fn()``."""
    if not _initialized():
        return fn()
    payload: list[Any] = [None]
    error: Exception | None = None
    if dist.get_rank() == 0:
        try:
            payload[0] = ("ok", fn())
        except Exception as exc:  # noqa: BLE001 - handed to every rank, then re-raised
            error = exc
            payload[0] = ("error", *_failure(exc))
    dist.broadcast_object_list(payload, src=0)
    if error is not None:
        raise error
    if payload[0][0] == "error":
        raise PeerError(0, payload[0][1], payload[0][2])
    return payload[0][1]


def gather_to_main(obj: T) -> list[T] | None:
    """Every rank's ``obj``, in rank order, on rank 0 (``None`` on the others). A collective;
    without a process group: ``[obj]``."""
    if not _initialized():
        return [obj]
    rank = dist.get_rank()
    out: list[Any] | None = [None] * dist.get_world_size() if rank == 0 else None
    dist.gather_object(obj, out, dst=0)
    return out


def resolve_device(name: str | None = "auto") -> torch.device:
    """The device behind a ``--device`` value: ``None``/"" /"auto" is cuda when available, else
    cpu; an unindexed cuda is this rank's GPU (``cuda:LOCAL_RANK``; ``cuda:0`` without
    torchrun). UsageError for an unknown name, an absent cuda, an index beyond the visible GPUs,
    and any ``cuda:N`` under torchrun (world size > 1): the same command line runs on every
    rank, so one index would put every rank on one GPU; ``cuda`` gives each its own."""
    if name in (None, "", "auto"):
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"{{opt:device}}: unknown device {name!r} (use cpu or cuda)") from None
    if device.type == "cpu":
        return device
    if device.type != "cuda":  # mps, xpu, meta...: neither the training nor the AMP code knows them
        raise UsageError(f"{{opt:device}}: device {name!r} is not supported (use cpu or cuda)")
    if not torch.cuda.is_available():
        raise UsageError("{opt:device=cuda}: CUDA is not available on this machine (use "
                         "{opt:device=cpu})")
    info = dist_info()
    if device.index is not None and info.enabled:
        raise UsageError(f"{{opt:device}}: {device} under torchrun ({info.world_size} "
                         f"processes) would put every process on one GPU; use "
                         f"{{opt:device=cuda}} (each process takes cuda:LOCAL_RANK)")
    if device.index is None:
        device = torch.device("cuda", info.local_rank)
    count = torch.cuda.device_count()
    if device.index >= count:
        why = (f" (LOCAL_RANK {info.local_rank}: start at most {count} processes per node)"
               if info.enabled else "")
        raise UsageError(f"{{opt:device}}: {device} is not a visible GPU: this machine shows "
                         f"{count} CUDA device{'s' if count != 1 else ''}{why}")
    return device


def check_batch_split(batch_size: int, world_size: int) -> None:
    """``batch_size`` is the global batch: every process takes ``batch_size / world_size``
    images of each batch, which must be a whole number of at least one (a process with an empty
    share cannot form a batch, and a remainder would be dropped silently)."""
    if world_size <= 1:
        return
    if batch_size < world_size:
        raise UsageError(f"{{opt:batch_size}} {batch_size} is smaller than the {world_size} "
                         f"processes: each needs at least one image of every batch (use "
                         f"{world_size} or a multiple of it, or fewer processes)")
    if batch_size % world_size:
        raise UsageError(f"{{opt:batch_size}} {batch_size} is not divisible by the "
                         f"{world_size} processes (use a multiple of {world_size}, e.g. "
                         f"{batch_size - batch_size % world_size} or "
                         f"{batch_size - batch_size % world_size + world_size})")
