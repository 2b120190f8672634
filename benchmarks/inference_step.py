"""One step of low-rank feature inference, taken apart: where its milliseconds go.

    python benchmarks/inference_step.py                 # K = 21, 41x41 (ResNet-101 at 321x321)
    python benchmarks/inference_step.py --threads 1
    python benchmarks/inference_step.py --compiled      # + the whole step, torch.compile'd

A low-rank step (discli.infer.lowrank) runs subnet-2 forward, the reconstruction loss and
its gradient with respect to u3, then applies the Gram operator to the accumulated momentum.
This script times those parts on random tensors of the given size, with autograd and with the
backward written out by hand, with channels_last tensors and with oneDNN off, and the largest
convolution alone; it checks that the hand-written gradient equals autograd's. With
``--compiled`` it also times the whole step as inference runs it, plainly and compiled
(:mod:`discli.infer.compiled`), in ms and GFLOP/s, with the compile time apart. CPU only.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from _common import describe_machine, gflops, load_note

from discli.infer.compiled import compile_seconds, step_runner
from discli.infer.lowrank import Accumulated, GramOperators, gram_operators, plain_step
from discli.infer.settings import InferenceConfig, use_compiled
from discli.model.net import Subnet2


def per_call_ms(fn: Callable[[], object], reps: int) -> float:
    for _ in range(max(reps // 10, 3)):
        fn()
    tic = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - tic) / reps * 1000


def whole_step(subnet2: Subnet2, target: torch.Tensor, ops: GramOperators, reps: int) -> None:
    """One step as refine_lowrank takes it (no tags, no proximity), plainly and compiled."""
    b, n, k = target.shape[0], target.shape[-1], ops.num_classes
    cfg = InferenceConfig(lr=0.003)
    start = (torch.randn(b, k, n, n), torch.randn(b, k))
    rule = Accumulated(start, ops.at(n, n, -cfg.lr * n * n, -cfg.lr), cfg.momentum)
    state = rule.initial()

    def head_loss(u3: torch.Tensor, v3: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z3 = subnet2(u3.softmax(dim=1))
        return (z3 - target).pow(2).mean(dim=(1, 2, 3)), z3

    def plain() -> object:
        return plain_step(head_loss, rule, False, start, state)

    flop = gflops(plain) * 1e9
    previous = use_compiled(True)
    run = step_runner(rule, cfg, head_loss, False)
    use_compiled(previous)
    tic = time.perf_counter()
    if run is None or run(start, state) is None:
        print("  the compiled step is not available here (see the warning)")
        return
    first = time.perf_counter() - tic
    print(f"  compile: {first:.1f} s for the first call ({sum(compile_seconds().values()):.1f} s "
          f"recorded), once per shape and settings")
    rows = {"whole step, plain": plain, "whole step, compiled": lambda: run(start, state)}
    times = {name: per_call_ms(fn, reps) for name, fn in rows.items()}
    for name, ms in times.items():
        print(f"  {name:<52} {ms:7.3f} ms  ({flop / ms / 1e6:5.1f} GFLOP/s of {flop / 1e6:.0f} "
              f"MFLOP)")
    print(f"  {'speed-up of the step, compiled':<52} "
          f"{times['whole step, plain'] / times['whole step, compiled']:7.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--classes", type=int, default=21)
    parser.add_argument("--size", type=int, default=41, help="feature map side (321 px / 8)")
    parser.add_argument("--channels", type=int, default=2048, help="backbone channels C")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--reps", type=int, default=200)
    parser.add_argument("--threads", type=int, default=0, help="0: torch's default")
    parser.add_argument("--compiled", action="store_true", help="also time the whole step, "
                        "plain and torch.compile'd (compiling takes 10-60 s)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(describe_machine(torch.device("cpu")))
    k, n, b = args.classes, args.size, args.batch
    subnet2 = Subnet2(k).eval().requires_grad_(False)
    u3 = torch.randn(b, k, n, n)
    target = torch.randn(b, 3, n, n)
    ops = gram_operators(torch.randn(k, args.channels, 3, 3) * 0.01,
                         torch.randn(k, args.channels) * 0.01)
    step_op = ops.at(n, n, -0.1, -0.01)
    c1, c2, c3 = subnet2.conv1, subnet2.conv2, subnet2.conv3
    pixels = target[0].numel()

    def loss_grad_autograd(x: torch.Tensor) -> torch.Tensor:
        x = x.detach().requires_grad_(True)
        with torch.enable_grad():
            z = subnet2(torch.softmax(x, 1))
            loss = ((z - target) ** 2).mean(dim=(1, 2, 3))
            (grad,) = torch.autograd.grad(loss.sum(), (x,))
        return grad

    def loss_grad_by_hand(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            p = torch.softmax(x, 1)
            a1 = F.conv2d(p, c1.weight, c1.bias, padding=2)
            a2 = F.conv2d(a1.relu(), c2.weight, c2.bias, padding=1)
            diff = F.conv2d(a2.relu(), c3.weight, c3.bias, padding=1) - target
            g = F.conv_transpose2d(diff * (2.0 / pixels), c3.weight, padding=1) * (a2 > 0)
            g = F.conv_transpose2d(g, c2.weight, padding=1) * (a1 > 0)
            g = F.conv_transpose2d(g, c1.weight, padding=2)
            return p * (g - (p * g).sum(1, keepdim=True))

    gap = (loss_grad_autograd(u3) - loss_grad_by_hand(u3)).abs().max().item()
    print(f"hand-written gradient vs autograd: max |difference| {gap:.2e}")
    u3_cl = u3.contiguous(memory_format=torch.channels_last)
    zero_v = torch.zeros(b, k)
    flop = 2 * b * k * k * 25 * n * n
    rows = {
        "subnet-2 + loss + gradient to u3, autograd": lambda: loss_grad_autograd(u3),
        "the same, backward written out": lambda: loss_grad_by_hand(u3),
        "the same (autograd), channels_last": lambda: loss_grad_autograd(u3_cl),
        "the Gram operator": lambda: step_op.apply(u3, zero_v),
        f"the 5x5 {k}->{k} convolution alone ({flop / 1e6:.0f} MFLOP)":
            lambda: F.conv2d(u3, c1.weight, c1.bias, padding=2),
    }
    print(f"\nB={b}, K={k}, {n}x{n}, {torch.get_num_threads()} threads, {args.reps} calls each")
    for name, fn in rows.items():
        ms = per_call_ms(fn, args.reps)
        extra = f"  ({flop / ms / 1e6:.0f} GFLOP/s)" if name.startswith("the 5x5") else ""
        print(f"  {name:<52} {ms:7.3f} ms{extra}")
    with torch.backends.mkldnn.flags(enabled=False):
        print(f"  {'oneDNN off: autograd step / Gram operator':<52} "
              f"{per_call_ms(lambda: loss_grad_autograd(u3), args.reps):7.3f} ms / "
              f"{per_call_ms(lambda: step_op.apply(u3, zero_v), args.reps):.3f} ms")
    if args.compiled:
        whole_step(subnet2, target, ops, args.reps)
    print(load_note())


if __name__ == "__main__":
    main()
