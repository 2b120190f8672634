"""Ctrl-C and SIGTERM during training: stop at the next iteration boundary, with a checkpoint.

A signal that lands inside an optimiser step cannot be turned into a checkpoint there: the
weights may be half updated. So while the training loop runs, SIGINT and SIGTERM only record
that they came (:class:`DeferredInterrupts`); the loop asks :meth:`DeferredInterrupts.stop` after
each finished iteration, saves the state of that iteration (a consistent one, from which a
resumed run is bit-identical on CPU) and raises :class:`discli.errors.Interrupted`. A second
signal does not wait: it raises at once (the checkpoint of the last ``ckpt_every`` is kept).
Under torchrun the ranks agree through one all-reduce per iteration, so that they all stop at
the same iteration and no rank waits in a collective for one that has left.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType, TracebackType
from typing import Any

import torch

from discli.distributed import DistInfo, all_reduce_sum
from discli.errors import Interrupted

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class DeferredInterrupts:
    """Within ``with``, SIGINT and SIGTERM set :attr:`signum` instead of stopping the process.

    Installed only in the main thread (Python delivers signals there) and not for a signal the
    process ignores (a job started in the background ignores SIGINT: it must stay ignored)."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def _handler(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is not None:  # the second signal: the user does not want to wait
            raise Interrupted(signum, "stopped at once by a second signal; the last regular "
                                      "checkpoint is kept")
        self.signum = signum

    def __enter__(self) -> DeferredInterrupts:
        if threading.current_thread() is threading.main_thread():
            for signum in SIGNALS:
                previous = signal.getsignal(signum)
                if previous is signal.SIG_IGN or previous is None:
                    continue
                self._previous[signum] = previous
                signal.signal(signum, self._handler)
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous.clear()

    def stop(self, dist: DistInfo = DistInfo()) -> bool:
        """Whether to stop after this iteration: a signal came to this rank or to any other.
        A collective under torchrun: every rank must call it at every iteration."""
        asked = self.signum is not None
        if dist.enabled:
            asked = bool(all_reduce_sum(torch.tensor([float(asked)])).item())
        return asked
