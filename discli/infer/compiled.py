"""Compiled low-rank inference steps: ``torch.compile`` of one step, opt-in.

What is compiled. One step of :func:`discli.infer.lowrank.refine_lowrank` (subnet-2 forward, the
loss, its gradient with respect to the heads, the momentum update and the Gram operator) as a pure
function of the heads and the momentum state. The gradient is taken with ``torch.func.grad`` so
that the whole step is one graph (``fullgraph``). Inductor fuses the pointwise work between the
convolutions into C++/OpenMP kernels on CPU and Triton kernels on CUDA, where CUDA graphs (mode
``"reduce-overhead"``) also remove the launch overhead of the small kernels a step is made of.

Buckets. ``torch.compile(dynamic=False)`` specialises the graph to the shapes, dtype and device
of the heads and to the constants of the step (step size, momentum, proximity, tag weight). One
compile serves every later batch of the same bucket, whatever its number of steps (the loop over
the steps stays in Python). The first call of a bucket includes the compile; it is timed apart
(:func:`compile_seconds`) so that benchmarks can report it separately. Dynamo keeps at most
``recompile_limit`` graphs of one function (8 by default); past that many buckets, the plain path
runs, as it does for inputs of varying sizes.

Fallback. When compiling or running a compiled step raises (no C++ compiler, an operation the
compiler does not support), a :class:`discli.errors.DisWarning` says so once per process and the
plain path takes over from the state reached: a compiled step never modifies its inputs, so
nothing is lost. The switch is :func:`discli.infer.settings.use_compiled` (off by default).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable
from typing import TYPE_CHECKING, Any

import torch

from discli.errors import warn
from discli.infer.settings import InferenceConfig, compiled_requested

if TYPE_CHECKING:  # lowrank imports this module
    from discli.infer.lowrank import HeadLoss, Pair, Rule

_compiled: dict[str, Callable[..., Any]] = {}  # device type -> the one torch.compile wrapper
_buckets: dict[Hashable, float | None] = {}  # bucket -> seconds of its first call; None: failed
_warned: set[str] = set()


def compile_seconds() -> dict[Hashable, float]:
    """Wall time of the first (compiling) call of every bucket compiled so far."""
    return {bucket: s for bucket, s in _buckets.items() if s is not None}


def _warn_once(kind: str, message: str) -> None:
    if kind not in _warned:
        _warned.add(kind)
        warn(message)


def _recompile_limit() -> int:
    config = torch._dynamo.config
    return int(getattr(config, "recompile_limit", getattr(config, "cache_size_limit", 8)))


def step(head_loss: HeadLoss, rule: Rule, needs_v3_grad: bool, heads: Pair,
         state: tuple[Pair, ...]) -> tuple[Any, ...]:
    """:func:`discli.infer.lowrank.plain_step` as a pure function of tensors: (objective with
    the proximity term, reconstruction, next state, next heads). The gradient comes from
    ``torch.func.grad``, which keeps the whole step in one graph."""
    def summed(u3: torch.Tensor, v3: torch.Tensor) -> tuple[torch.Tensor, Any]:
        loss, z3 = head_loss(u3, v3)
        return loss.sum(), (loss, z3)

    grads, (loss, z3) = torch.func.grad(summed, argnums=(0, 1) if needs_v3_grad else 0,
                                        has_aux=True)(*heads)
    penalty = rule.penalty(state)
    state, heads = rule.advance(state, grads if needs_v3_grad else (grads, None))
    return (loss if penalty is None else loss + penalty), z3, state, heads


def _wrapper(device: torch.device) -> Callable[..., Any]:
    """``torch.compile(step)`` for this device type, made once: Dynamo caches one graph per
    bucket on the function itself."""
    if device.type not in _compiled:
        mode = "reduce-overhead" if device.type == "cuda" else None  # CUDA graphs
        _compiled[device.type] = torch.compile(step, dynamic=False, fullgraph=True, mode=mode)
    return _compiled[device.type]


def step_runner(rule: Rule, cfg: InferenceConfig, head_loss: HeadLoss, needs_v3_grad: bool
                ) -> Callable[[Pair, tuple[Pair, ...]], tuple[Any, ...] | None] | None:
    """``run(heads, state)``: the compiled :func:`step` of this problem's bucket; or None for
    the plain path (compiling not requested, unavailable, failed before for this bucket, or too
    many buckets).

    ``run`` returns what :func:`step` returns (cloned out of the CUDA graphs' memory), or None
    when the compiled call failed: the caller then runs the plain step itself."""
    if not compiled_requested():
        return None
    u3_0, v3_0 = rule.start
    device = u3_0.device
    bucket = (tuple(u3_0.shape), tuple(v3_0.shape), u3_0.dtype, device, type(rule).__name__,
              cfg.lr, cfg.momentum, cfg.proximity, cfg.tag_weight, needs_v3_grad,
              getattr(head_loss, "__qualname__", None))
    if _buckets.get(bucket, 0.0) is None:
        return None
    if not hasattr(torch, "compile"):
        _warn_once("missing", "torch.compile is not available: inference runs uncompiled")
        return None
    if bucket not in _buckets and len(_buckets) >= _recompile_limit():
        _warn_once("limit", f"more than {_recompile_limit()} input shapes or settings to compile "
                            f"inference steps for: the others run uncompiled")
        return None
    tic = time.perf_counter()
    try:
        compiled = _wrapper(device)  # the first one imports the compiler: a few seconds
    except Exception as exc:  # noqa: BLE001 - any failure of the compiler means: run plainly
        return _failed(bucket, exc)
    setup = time.perf_counter() - tic

    def run(heads: Pair, state: tuple[Pair, ...]) -> tuple[Any, ...] | None:
        first = bucket not in _buckets
        tic = time.perf_counter() - setup  # the first call's time includes the setup
        try:
            if device.type == "cuda":
                torch.compiler.cudagraph_mark_step_begin()
            with torch.no_grad():
                out = compiled(head_loss, rule, needs_v3_grad, heads, state)
            if device.type == "cuda":  # the next replay reuses the graph's output memory
                out = torch.utils._pytree.tree_map(_clone, out)
        except Exception as exc:  # noqa: BLE001
            return _failed(bucket, exc)
        if first:
            _buckets[bucket] = time.perf_counter() - tic
        return out

    return run


def _clone(x: Any) -> Any:
    return x.clone() if isinstance(x, torch.Tensor) else x


def _failed(bucket: Hashable, exc: Exception) -> None:
    _buckets[bucket] = None
    first_line = (str(exc).strip().splitlines() or [""])[0]
    _warn_once("failed", f"compiling inference steps failed ({type(exc).__name__}: "
                         f"{first_line[:200]}): inference runs uncompiled")
    return None
