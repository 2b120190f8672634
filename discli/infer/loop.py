"""Feature-space inference, the heart of DIS (section 2.1 "Inference in Test", section 3.1).

With every weight frozen, the backbone runs once; then ``t`` steps of gradient descent move the
features ``u1, v1`` to minimise

    test time:      L_img(z3, I)
    training time:  L_img(z3, I) + tag_weight * L_tag(v3, noisy tags)

(+ an optional proximity term ``proximity/2 * mean((u1-u1⁰)²) + mean((v1-v1⁰)²)`` that keeps
the features near the backbone's output). The refined ``u3, v3`` give the final labelmap
(:func:`discli.model.net.final_probs`).

Step sizes. The per-image loss averages over the h·w feature pixels, so the gradient reaching one
pixel's feature ``u1[:, y, x]`` is ~1/(h·w) of what that pixel's own error would give. The update
of ``u1`` is therefore scaled by h·w (a fixed diagonal preconditioner): ``lr`` then means the same
per-pixel step whatever the image size. ``v1`` is shared by every pixel and takes the plain step.
Updates are SGD with (PyTorch-convention) momentum: ``buf = m·buf + g;  x -= step·buf``.

Each image's objective is summed (not averaged) over the batch, so an image's trajectory does not
depend on its batch mates: a batch gives the same result as one-by-one. Weights are never
modified and never receive ``.grad``: gradients are taken with ``torch.autograd.grad`` with respect
to the features (or the heads) only.

Two implementations of the same iterations (``InferenceConfig.method``):

- ``"lowrank"``: subnet-1 and subnet-3 are affine in ``(u1, v1)``, so the steps can be run on the
  K-channel heads ``u3, v3`` through precomputed Gram operators, never forming a C-channel
  gradient (:mod:`discli.infer.lowrank`). Exact, proximity term included; a step costs about
  as much as subnet-2. This is what ``"auto"`` (the default) picks. Its steps can also run
  compiled (``torch.compile``; off by default: :func:`discli.infer.settings.use_compiled`,
  :mod:`discli.infer.compiled`): the same iterations, up to float rounding.
- ``"autograd"``: back-propagation to ``u1, v1`` every step, the reference. ``"auto"`` falls back
  to it when the model's subnet-1/subnet-3 are not the plain 3x3 conv / linear layer the
  reduction assumes (a subclass overriding the heads, hooks on them, another conv geometry).

Features are refined in float32 (float64 when they come in float64), outside autocast and
without TF32 (:func:`ieee_float32`): on Ampere and later GPUs cuDNN runs float32 convolutions in
TF32 by default (about 1e-3 relative error), and that error compounds over the refinement's
steps (the low-rank and autograd methods would no longer agree to 1e-4). The backbone's forward
pass keeps the process's settings.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from discli.errors import TrainingDivergedError
from discli.infer.lowrank import refine_lowrank, supports_lowrank
from discli.model.losses import recon_loss, recon_target, tag_loss
from discli.model.net import DISNet, final_probs

# The settings live in a module without torch, so that the CLI can show them in --help fast.
from discli.infer.settings import MAX_STEPS, METHODS, InferenceConfig  # noqa: E402,F401


@dataclass
class InferenceResult:
    u3: torch.Tensor  # (B,K,h,w) labelmap logits after inference
    v3: torch.Tensor  # (B,K) tag logits after inference
    z3: torch.Tensor  # (B,3,h,w) reconstruction after inference
    probs: torch.Tensor  # (B,K,h,w) final class probabilities (u3 re-weighted by v3)
    losses: torch.Tensor  # (B,t+1) objective per image before each step and after the last
    steps: int = 0
    extra: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def labelmap(self) -> torch.Tensor:
        return self.probs.argmax(dim=1)

    @property
    def tag_probs(self) -> torch.Tensor:
        return torch.sigmoid(self.v3)


def _objective(model: DISNet, u1: torch.Tensor, v1: torch.Tensor, target: torch.Tensor,
               tags: torch.Tensor | None, cfg: InferenceConfig, u1_0: torch.Tensor,
               v1_0: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    heads = model.heads(u1, v1)
    loss = recon_loss(heads["z3"], target)
    if tags is not None:
        loss = loss + cfg.tag_weight * tag_loss(heads["v3"], tags)
    if cfg.proximity > 0:
        loss = loss + 0.5 * cfg.proximity * ((u1 - u1_0).pow(2).mean(dim=(1, 2, 3))
                                             + (v1 - v1_0).pow(2).mean(dim=1))
    return loss, heads


def _result(heads: dict[str, torch.Tensor], losses: list[torch.Tensor], steps: int
            ) -> InferenceResult:
    u3, v3 = heads["u3"].detach(), heads["v3"].detach()
    if not (torch.isfinite(u3).all() and torch.isfinite(v3).all()):
        # an all-NaN map argmaxes to background: a silent wrong answer, never a result
        raise TrainingDivergedError(
            "the model's labelmap or tag outputs are not finite numbers (NaN weights?)"
            if steps == 0 else
            f"feature inference diverged by step {steps} (the labelmap or tags are not finite "
            f"numbers): lower its step size (dis infer --lr; inf_lr in training)")
    return InferenceResult(u3=u3, v3=v3, z3=heads["z3"].detach(), probs=final_probs(u3, v3),
                           losses=torch.stack(losses, dim=1), steps=steps)


def _tf32_switches() -> list[tuple[object, str]]:
    """The (object, attribute) pairs that let CUDA float32 matmuls and convolutions use TF32.
    Newer torch (2.14 included) has per-operation ``fp32_precision`` strings and refuses to
    read the older ``allow_tf32`` booleans once the two have been mixed, so the newer ones are
    used where they exist."""
    cudnn = torch.backends.cudnn
    if hasattr(cudnn, "conv") and hasattr(cudnn.conv, "fp32_precision"):
        return [(torch.backends.cuda.matmul, "fp32_precision"), (cudnn.conv, "fp32_precision"),
                (cudnn.rnn, "fp32_precision")]
    return [(torch.backends.cuda.matmul, "allow_tf32"), (cudnn, "allow_tf32")]


@contextmanager
def ieee_float32() -> Iterator[None]:
    """Full float32 precision (no TF32) for CUDA matmuls and convolutions while it is open; the
    previous settings come back after, also on an error. The settings are process-wide."""
    switches = _tf32_switches()
    saved = [getattr(obj, name) for obj, name in switches]
    for obj, name in switches:
        setattr(obj, name, "ieee" if name == "fp32_precision" else False)
    try:
        yield
    finally:
        for (obj, name), value in zip(switches, saved):
            setattr(obj, name, value)


def _work_dtype(u1: torch.Tensor) -> torch.dtype:
    return torch.float64 if u1.dtype == torch.float64 else torch.float32


def resolve_method(model: DISNet, cfg: InferenceConfig) -> str:
    """The implementation ``cfg.method`` selects for this model: "lowrank" or "autograd"."""
    if cfg.method == "autograd":
        return "autograd"
    if supports_lowrank(model):
        return "lowrank"
    if cfg.method == "lowrank":
        raise ValueError("method 'lowrank' needs subnet-1 to be a plain 3x3 conv (stride 1, zero "
                         "padding 1) and subnet-3 a plain linear layer; use 'auto' or 'autograd'")
    return "autograd"


def refine_features(model: DISNet, u1: torch.Tensor, v1: torch.Tensor, images: torch.Tensor,
                    cfg: InferenceConfig, tags: torch.Tensor | None = None,
                    snapshots: Iterable[int] | None = None) -> dict[int, InferenceResult]:
    """Gradient descent on (u1, v1); returns a result for every step in snapshots."""
    wanted = sorted(set(snapshots) if snapshots is not None else {cfg.steps})
    if wanted and not 0 <= wanted[0] <= wanted[-1] <= MAX_STEPS:
        raise ValueError(f"inference steps must be in 0..{MAX_STEPS}, got {wanted}")
    if not wanted:
        return {}
    dtype = _work_dtype(u1)
    u1_0, v1_0 = u1.detach().to(dtype), v1.detach().to(dtype)
    target = recon_target(images.to(dtype), u1.shape[-2:])
    tags = None if tags is None else tags.to(dtype)
    with torch.autocast(u1.device.type, enabled=False), ieee_float32():
        if resolve_method(model, cfg) == "lowrank":
            return _refine_lowrank(model, u1_0, v1_0, target, tags, cfg, wanted)
        return _refine_autograd(model, u1_0, v1_0, target, tags, cfg, wanted)


def _refine_lowrank(model: DISNet, u1_0: torch.Tensor, v1_0: torch.Tensor, target: torch.Tensor,
                    tags: torch.Tensor | None, cfg: InferenceConfig, wanted: list[int]
                    ) -> dict[int, InferenceResult]:
    def head_loss(u3: torch.Tensor, v3: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z3 = model.reconstruct(u3)
        loss = recon_loss(z3, target)
        if tags is not None:
            loss = loss + cfg.tag_weight * tag_loss(v3, tags)
        return loss, z3

    snaps = refine_lowrank(model, u1_0, v1_0, wanted, cfg, head_loss,
                           needs_v3_grad=tags is not None)
    return {step: _result(heads, losses, step) for step, (heads, losses) in snaps.items()}


def _refine_autograd(model: DISNet, u1_0: torch.Tensor, v1_0: torch.Tensor, target: torch.Tensor,
                     tags: torch.Tensor | None, cfg: InferenceConfig, wanted: list[int]
                     ) -> dict[int, InferenceResult]:
    u_step = cfg.lr * u1_0.shape[-2] * u1_0.shape[-1]
    u1, v1 = u1_0.clone(), v1_0.clone()
    buf_u, buf_v = torch.zeros_like(u1), torch.zeros_like(v1)
    results: dict[int, InferenceResult] = {}
    losses: list[torch.Tensor] = []
    with torch.enable_grad():
        for step in range(wanted[-1] + 1):
            u1.requires_grad_(True)
            v1.requires_grad_(True)
            loss, heads = _objective(model, u1, v1, target, tags, cfg, u1_0, v1_0)
            losses.append(loss.detach())
            if step in wanted:
                results[step] = _result(heads, losses, step)
            if step == wanted[-1]:
                break
            grad_u, grad_v = torch.autograd.grad(loss.sum(), (u1, v1))
            with torch.no_grad():
                buf_u.mul_(cfg.momentum).add_(grad_u)
                buf_v.mul_(cfg.momentum).add_(grad_v)
                u1 = u1.detach() - u_step * buf_u
                v1 = v1.detach() - cfg.lr * buf_v
    return results


class _EvalMode:
    """Puts the model in eval mode for the duration, restoring the previous mode after."""

    def __init__(self, model: torch.nn.Module):
        self.model, self.was_training = model, model.training

    def __enter__(self) -> None:
        self.model.eval()

    def __exit__(self, *exc: object) -> None:
        self.model.train(self.was_training)


def _fast_layout(images: torch.Tensor) -> torch.Tensor:
    """channels_last on CPU, where oneDNN runs the ResNet convolutions faster in it (~5%)."""
    if images.device.type == "cpu" and images.dim() == 4:
        return images.contiguous(memory_format=torch.channels_last)
    return images


def infer_steps(model: DISNet, images: torch.Tensor, steps: Iterable[int],
                cfg: InferenceConfig | None = None, tags: torch.Tensor | None = None
                ) -> dict[int, InferenceResult]:
    """One backbone forward, then inference snapshotted at every requested t (e.g. 0, 10, 30)."""
    cfg = cfg or InferenceConfig()
    with _EvalMode(model):
        with torch.inference_mode():
            u1, v1 = model.features(_fast_layout(images))
        return refine_features(model, u1, v1, images, cfg, tags=tags, snapshots=steps)


def infer(model: DISNet, images: torch.Tensor, steps: int | None = None,
          cfg: InferenceConfig | None = None, tags: torch.Tensor | None = None) -> InferenceResult:
    """Run DIS inference on a batch of normalised images (B,3,H,W).

    ``tags`` (B,K) of 0/1 selects training-time inference (reconstruction + tag loss); without it
    the objective is the reconstruction loss alone. ``steps=0`` is a plain forward.
    """
    cfg = cfg or InferenceConfig()
    t = cfg.steps if steps is None else steps
    return infer_steps(model, images, [t], cfg, tags=tags)[t]
