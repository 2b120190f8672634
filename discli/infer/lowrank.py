"""Feature inference in the K-dimensional head space (the fast path of :mod:`discli.infer.loop`).

Why it works. With the weights frozen, the maps from the optimised features to the heads,

    u3 = conv3x3(u1 + broadcast(v1)) + b1        (B,K,h,w)   subnet-1, zero padding
    v3 = W3 (mean_hw(u1) + v1) + b3              (B,K)       subnet-3

are affine in ``(u1, v1)``, and the objective reaches ``u1, v1`` only through ``u3, v3`` (plus the
optional proximity term). Write ``J_u`` and ``J_v`` for the linear parts as functions of ``u1`` and
of ``v1`` alone, mapping into the head space ``H = R^{K×h×w} × R^K``. Every gradient step then has
the form ``grad_u1 = J_u^T g + ρ_u (u1 - u1⁰)`` and ``grad_v1 = J_v^T g + ρ_v (v1 - v1⁰)`` with
``g = (dL/du3, dL/dv3) ∈ H``, ``ρ_u = proximity/(C·h·w)`` and ``ρ_v = proximity/C``. By induction
the momentum buffers and the displacements stay in the ranges of ``J_u^T`` and ``J_v^T``:

    buf_u = J_u^T B_u,   u1 - u1⁰ = J_u^T X_u,      buf_v = J_v^T B_v,   v1 - v1⁰ = J_v^T X_v,

with coefficients ``B_u, X_u, B_v, X_v ∈ H`` updated exactly like the features themselves,

    B_u ← m·B_u + g + ρ_u·X_u;   X_u ← X_u - s_u·B_u        (s_u = lr·h·w)
    B_v ← m·B_v + g + ρ_v·X_v;   X_v ← X_v - s_v·B_v        (s_v = lr)

and the heads and the proximity term follow from the two Gram operators ``G_u = J_u J_u^T`` and
``G_v = J_v J_v^T`` (linear maps H -> H):

    (u3, v3) = (u3⁰, v3⁰) + G_u X_u + G_v X_v
    |u1 - u1⁰|² = <X_u, G_u X_u>,    |v1 - v1⁰|² = <X_v, G_v X_v>

So each step evaluates subnet-2 (tiny) and the losses on ``u3, v3``, takes their gradient with
respect to ``u3, v3`` only, and applies ``G_u`` and ``G_v`` to K-channel tensors; the C-channel
features and gradients are never formed.

The Gram operators. Let ``W_d`` (K×C) be the subnet-1 kernel at offset ``d ∈ {-1,0,1}²`` and
``Wcat = [W_d for the 9 offsets; W3]`` (10K×C); everything below is read from the 10K×10K matrix
``Γ = Wcat Wcat^T`` (blocks ``M[d,d'] = W_d W_d'^T``, ``P_d = W_d W3^T``, ``N = W3 W3^T``). With
``mask_d(p) = [p + d inside the map]`` and ``S_d(a) = Σ_p mask_d(p) a[:, p]``:

    G_v (a_u, a_v):  t = Γ (S_1..S_9, a_v);   out_u[:, p] = Σ_d mask_d(p) t_d;   out_v = t_10
    G_u (a_u, a_v):  out_u = conv(conv^T(a_u)) + (1/hw) Σ_d mask_d (P_d a_v)
                     out_v = (1/hw) (Σ_d P_d^T S_d + N a_v)

``conv(conv^T(a_u))`` at an output pixel p is ``Σ_{d,d'} mask_d(p) M[d,d'] a_u[p+d-d']`` (a_u zero
outside the map): the 3x3 transposed conv writes C channels at ``r = p+d``, which the zero padding
of the forward conv drops when r falls outside the map. Without that drop it is one 5x5 K->K conv
with kernel ``Q[e] = Σ_{d-d'=e} M[d,d']``. The dropped positions r form the one-pixel ring around
the map; a ring row (r_y = -1, r_x = -1..w) only links the map's first row to itself through the
``d_y = d'_y = -1`` blocks, which is a 5-tap K->K conv along that row (likewise the last row and
the two columns), and each of the four ring corners is counted by both its row and its column, so
a single K×K block at each corner pixel adds it back. All of it is exact, for any h, w >= 1.

Cost: Γ takes one (10K×C)·(C×10K) product per call (≈0.1 GFLOP at C = 2048, K = 21); a step costs
subnet-2 forward and backward plus one 5x5 K->K conv and a few K-sized reductions.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from discli.infer.compiled import step_runner
from discli.infer.settings import InferenceConfig

Pair = tuple[torch.Tensor, torch.Tensor]  # an element of the head space: (field (B,K,h,w), (B,K))
OFFSETS = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)]  # index d = 3*(dy+1) + (dx+1)


def supports_lowrank(model: nn.Module) -> bool:
    """True when the model's subnet-1 and subnet-3 are exactly the affine maps derived above."""
    from discli.model.net import DISNet

    conv, linear = getattr(model, "subnet1", None), getattr(model, "subnet3", None)
    if not (isinstance(model, DISNet) and type(conv) is nn.Conv2d and type(linear) is nn.Linear):
        return False
    overridden = any(getattr(type(model), name) is not getattr(DISNet, name)
                     for name in ("heads", "labelmap_logits", "tag_logits"))
    hooked = any(m._forward_hooks or m._forward_pre_hooks for m in (conv, linear))
    return (not overridden and not hooked and conv.kernel_size == (3, 3) and conv.stride == (1, 1)
            and conv.padding == (1, 1) and conv.dilation == (1, 1) and conv.groups == 1
            and conv.padding_mode == "zeros")


@dataclass(frozen=True)
class GramOperators:
    """Γ = Wcat Wcat^T of subnet-1's kernel offsets and subnet-3's weight, and its K×K blocks.

    Rows and columns of ``joint`` are indexed ``10*k + d`` (class k, offset d = 0..8 in
    :data:`OFFSETS` order, d = 9 for W3), so that per-class vectors of 10 entries reshape into it
    without copies.
    """

    joint: torch.Tensor  # (10K,10K) Γ
    full: torch.Tensor  # (K,K,5,5) interior kernel Q of conv(conv^T(.))
    rows: torch.Tensor  # (2,K,K,5) 1-D corrections along the first and the last row
    cols: torch.Tensor  # (2,K,K,5) 1-D corrections along the first and the last column
    corners: torch.Tensor  # (4,K,K) add-backs at (0,0), (0,w-1), (h-1,0), (h-1,w-1)

    @property
    def num_classes(self) -> int:
        return self.full.shape[0]

    def at(self, h: int, w: int, coef_u: float, coef_v: float) -> HeadOperator:
        """The linear map ``coef_u·G_u + coef_v·G_v`` on the head space of an h×w map."""
        k = self.num_classes
        conv = rows = cols = None
        if coef_u != 0:
            conv = coef_u * self.full
            rows = (-coef_u * self.rows).reshape(2 * k, k, 1, 5)
            cols = (-coef_u * self.cols).reshape(2 * k, k, 5, 1)
        # G_u's terms through the averages (P_d, N) are those of G_v scaled by 1/hw; G_v also
        # has the M[d,d'] blocks, which G_u replaces by the convolutions above.
        through_v = self.joint.reshape(k, 10, k, 10).clone()
        through_v[:, :9, :, :9] = 0
        mixing = coef_v * self.joint + (coef_u / (h * w)) * through_v.reshape(10 * k, 10 * k)
        masks = border_masks(h, w, self.joint)
        masks = torch.cat([masks.reshape(9, h * w), masks.new_zeros(1, h * w)])  # d = 9: none
        hh, ww = torch.tensor([0, h - 1]), torch.tensor([0, w - 1])
        return HeadOperator(h, w, conv, rows, cols, coef_u * self.corners, mixing, masks,
                            masks.T.contiguous(), hh.to(masks.device), ww.to(masks.device),
                            (hh[:, None] * w + ww).flatten().to(masks.device))


@dataclass(frozen=True)
class HeadOperator:
    """A linear map on (B,K,h,w) × (B,K) built by :meth:`GramOperators.at`; see :meth:`apply`."""

    h: int
    w: int
    conv: torch.Tensor | None  # (K,K,5,5), None when coef_u = 0
    rows: torch.Tensor | None  # (2K,K,1,5) negated row corrections, grouped by row
    cols: torch.Tensor | None  # (2K,K,5,1) negated column corrections, grouped by column
    corners: torch.Tensor  # (4,K,K)
    mixing: torch.Tensor  # (10K,10K)
    masks: torch.Tensor  # (10,hw) mask_d, row 9 zero
    masks_t: torch.Tensor  # (hw,10)
    row_index: torch.Tensor  # [0, h-1]
    col_index: torch.Tensor  # [0, w-1]
    corner_index: torch.Tensor  # flat indices of the four corner pixels

    def apply(self, a_u: torch.Tensor, a_v: torch.Tensor) -> Pair:
        b, k, h, w = a_u.shape
        a_u = a_u.contiguous()
        sums = a_u.reshape(b, k, h * w) @ self.masks_t  # (B,K,10): S_d, then a_v at d = 9
        sums[:, :, 9] = a_v
        t = (sums.reshape(b, 10 * k) @ self.mixing).reshape(b, k, 10)
        out_v = t[:, :, 9]
        if self.conv is None:
            return (t @ self.masks).reshape(b, k, h, w), out_v
        out_u = F.conv2d(a_u, self.conv, padding=2)
        flat = out_u.view(b, k, h * w)
        flat.baddbmm_(t, self.masks.expand(b, 10, h * w))
        rows = a_u.index_select(2, self.row_index).transpose(1, 2).reshape(b, 2 * k, 1, w)
        rows = F.conv2d(rows, self.rows, padding=(0, 2), groups=2)
        out_u.index_add_(2, self.row_index, rows.view(b, 2, k, w).transpose(1, 2))
        cols = a_u.index_select(3, self.col_index).permute(0, 3, 1, 2).reshape(b, 2 * k, h, 1)
        cols = F.conv2d(cols, self.cols, padding=(2, 0), groups=2)
        out_u.index_add_(3, self.col_index, cols.view(b, 2, k, h).permute(0, 2, 3, 1))
        corners = a_u.reshape(b, k, h * w).index_select(2, self.corner_index)  # (B,K,4)
        flat.index_add_(2, self.corner_index, torch.einsum("ckj,bjc->bkc", self.corners, corners))
        return out_u, out_v


def gram_operators(conv_weight: torch.Tensor, linear_weight: torch.Tensor,
                   dtype: torch.dtype | None = None) -> GramOperators:
    """Build the operators from subnet-1's (K,C,3,3) and subnet-3's (K,C) weights.

    Computed in float64 and returned in ``dtype`` (default: the weights' dtype).
    """
    dtype = dtype or conv_weight.dtype
    k, c = conv_weight.shape[:2]
    with torch.no_grad():
        w = conv_weight.detach().to(torch.float64).reshape(k, c, 9)
        w3 = linear_weight.detach().to(torch.float64)
        wcat = torch.cat([w.permute(0, 2, 1), w3[:, None, :]], dim=1).reshape(10 * k, c)
        joint = wcat @ wcat.T
        m = joint.reshape(k, 10, k, 10).permute(1, 3, 0, 2)[:9, :9]  # m[d, d'] = W_d W_d'^T
        # Sum the 81 blocks m[d, d'] into taps e = d - d' by one-hot matrices (pairs x taps).
        d = torch.tensor(OFFSETS)
        e = (d[:, None] - d[None, :] + 2).reshape(81, 2)  # tap (0..4, 0..4) of every pair
        pairs = F.one_hot(5 * e[:, 0] + e[:, 1], 25).to(w)  # (81,25)
        blocks = m.reshape(81, k * k)
        full = (pairs.T @ blocks).reshape(5, 5, k, k)
        rows, cols = [], []
        for edge in (-1, 1):  # ring row dy = d'y = edge, ring column dx = d'x = edge
            for axis, out in ((0, rows), (1, cols)):
                on = ((d[:, None, axis] == edge) & (d[None, :, axis] == edge)).reshape(81)
                taps = F.one_hot(e[:, 1 - axis], 5).to(w) * on[:, None].to(w)  # (81,5)
                out.append((taps.T @ blocks).reshape(5, k, k))
        rows, cols = torch.stack(rows), torch.stack(cols)
        corners = torch.stack([m[i, i] for i in (0, 2, 6, 8)])  # d = (-1,-1), (-1,1), (1,-1), (1,1)
        full = full.reshape(5, 5, k, k).permute(2, 3, 0, 1)
        rows, cols = rows.permute(0, 2, 3, 1), cols.permute(0, 2, 3, 1)
    return GramOperators(*(t.to(dtype).contiguous() for t in (joint, full, rows, cols, corners)))


def border_masks(h: int, w: int, like: torch.Tensor) -> torch.Tensor:
    """(9,h,w): mask_d(p) = 1 where p + d lies inside the h×w map."""
    ys = torch.arange(h, device=like.device)
    xs = torch.arange(w, device=like.device)
    masks = [((ys + dy >= 0) & (ys + dy < h))[:, None] & ((xs + dx >= 0) & (xs + dx < w))[None]
             for dy, dx in OFFSETS]
    return torch.stack(masks).to(like.dtype)


def apply_gram_u(ops: GramOperators, a_u: torch.Tensor, a_v: torch.Tensor) -> Pair:
    """``J_u J_u^T (a_u, a_v)``: the head-space image of the u1-gradient of ``<(u3,v3), a>``."""
    return ops.at(*a_u.shape[-2:], 1.0, 0.0).apply(a_u, a_v)


def apply_gram_v(ops: GramOperators, a_u: torch.Tensor, a_v: torch.Tensor) -> Pair:
    """``J_v J_v^T (a_u, a_v)``: the head-space image of the v1-gradient of ``<(u3,v3), a>``."""
    return ops.at(*a_u.shape[-2:], 0.0, 1.0).apply(a_u, a_v)


def _inner(x: Pair, y: Pair) -> torch.Tensor:
    return (x[0] * y[0]).sum(dim=(1, 2, 3)) + (x[1] * y[1]).sum(dim=1)


HeadLoss = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
Snapshots = dict[int, tuple[dict[str, torch.Tensor], list[torch.Tensor]]]


@dataclass(frozen=True)
class Accumulated:
    """The iterations without the proximity term: then ``B_u = B_v = B`` and
    ``X_u/s_u = X_v/s_v = -ΣB``, so one momentum buffer and its running sum make the state
    ``(B, ΣB)``, and the heads are ``(u3⁰, v3⁰) + (-s_u·G_u - s_v·G_v) ΣB``."""

    start: Pair  # (u3⁰, v3⁰)
    step_op: HeadOperator
    momentum: float

    def initial(self) -> tuple[Pair, Pair]:  # B, ΣB
        return tuple((torch.zeros_like(self.start[0]), torch.zeros_like(self.start[1]))
                     for _ in range(2))

    def penalty(self, state: tuple[Pair, Pair]) -> torch.Tensor | None:
        return None

    def advance(self, state: tuple[Pair, Pair], grads: tuple[torch.Tensor, torch.Tensor | None]
                ) -> tuple[tuple[Pair, Pair], Pair]:
        """The next state and heads, from the head gradients (no v3 gradient: it is zero). New
        tensors rather than in-place updates (the same values): a pure function compiles."""
        (buf_u, buf_v), (total_u, total_v) = state
        buf_u = buf_u * self.momentum + grads[0]
        buf_v = buf_v if grads[1] is None else buf_v * self.momentum + grads[1]
        total = (total_u + buf_u, total_v + buf_v)
        y_u, y_v = self.step_op.apply(*total)
        return ((buf_u, buf_v), total), (self.start[0] + y_u, self.start[1] + y_v)


@dataclass(frozen=True)
class Proximal:
    """The iterations with the proximity term: the state is ``X_u, X_v, B_u, B_v`` and the
    images ``Y_u = G_u X_u``, ``Y_v = G_v X_v`` (the displacements of the heads)."""

    start: Pair  # (u3⁰, v3⁰)
    op_u: HeadOperator  # G_u
    op_v: HeadOperator  # G_v
    momentum: float
    steps: tuple[float, float]  # (s_u, s_v) = lr·h·w, lr
    proximity: float
    sizes: tuple[int, int]  # (C·h·w, C): ρ_u = proximity / (C·h·w), ρ_v = proximity / C

    def initial(self) -> tuple[Pair, ...]:  # X_u, X_v, B_u, B_v, Y_u, Y_v
        return tuple((torch.zeros_like(self.start[0]), torch.zeros_like(self.start[1]))
                     for _ in range(6))

    def penalty(self, state: tuple[Pair, ...]) -> torch.Tensor:
        """``proximity/2 · (|u1 - u1⁰|²/(C·h·w) + |v1 - v1⁰|²/C)`` per image."""
        x_u, x_v, _, _, y_u, y_v = state
        chw, c = self.sizes
        return 0.5 * self.proximity * (_inner(x_u, y_u) / chw + _inner(x_v, y_v) / c)

    def advance(self, state: tuple[Pair, ...], grads: tuple[torch.Tensor, torch.Tensor | None]
                ) -> tuple[tuple[Pair, ...], Pair]:
        x_u, x_v, b_u, b_v, _, _ = state
        g = (grads[0], torch.zeros_like(self.start[1]) if grads[1] is None else grads[1])
        m, (s_u, s_v) = self.momentum, self.steps
        rho_u, rho_v = self.proximity / self.sizes[0], self.proximity / self.sizes[1]
        b_u = tuple(m * bu + gi + rho_u * xu for bu, gi, xu in zip(b_u, g, x_u))
        b_v = tuple(m * bv + gi + rho_v * xv for bv, gi, xv in zip(b_v, g, x_v))
        x_u = tuple(xu - s_u * bu for xu, bu in zip(x_u, b_u))
        x_v = tuple(xv - s_v * bv for xv, bv in zip(x_v, b_v))
        y_u, y_v = self.op_u.apply(*x_u), self.op_v.apply(*x_v)
        heads = (self.start[0] + y_u[0] + y_v[0], self.start[1] + y_u[1] + y_v[1])
        return (x_u, x_v, b_u, b_v, y_u, y_v), heads


Rule = Accumulated | Proximal


def momentum_rule(model: nn.Module, u1: torch.Tensor, v1: torch.Tensor, cfg: InferenceConfig
                  ) -> Rule:
    """The heads at t = 0 and the iterations of ``cfg`` on them (see the module docstring)."""
    c, h, w = u1.shape[1:]
    with torch.no_grad():
        u3_0 = model.labelmap_logits(u1, v1).contiguous()
        v3_0 = model.tag_logits(u1, v1)
        ops = gram_operators(model.subnet1.weight, model.subnet3.weight, u3_0.dtype)
    s_u, s_v = cfg.lr * h * w, cfg.lr
    if cfg.proximity == 0:
        return Accumulated((u3_0, v3_0), ops.at(h, w, -s_u, -s_v), cfg.momentum)
    return Proximal((u3_0, v3_0), ops.at(h, w, 1.0, 0.0), ops.at(h, w, 0.0, 1.0), cfg.momentum,
                    (s_u, s_v), cfg.proximity, (c * h * w, c))


def plain_step(head_loss: HeadLoss, rule: Rule, needs_v3_grad: bool, heads: Pair,
               state: tuple[Pair, ...], last: bool = False) -> tuple[Any, ...]:
    """One step: (objective with the proximity term, reconstruction, next state, next heads);
    the last step only evaluates the objective (None for the state and heads)."""
    u3 = heads[0].detach().requires_grad_(not last)
    v3 = heads[1].detach().requires_grad_(needs_v3_grad and not last)
    with torch.enable_grad():
        loss, z3 = head_loss(u3, v3)
        grads = None if last else torch.autograd.grad(
            loss.sum(), (u3, v3) if needs_v3_grad else (u3,))
    with torch.no_grad():
        penalty = rule.penalty(state)
        loss = loss.detach() if penalty is None else loss.detach() + penalty
        if grads is None:
            return loss, z3.detach(), None, None
        state, heads = rule.advance(state, (grads[0], grads[1] if needs_v3_grad else None))
    return loss, z3.detach(), state, heads


def refine_lowrank(model: nn.Module, u1: torch.Tensor, v1: torch.Tensor, wanted: list[int],
                   cfg: InferenceConfig, head_loss: HeadLoss, needs_v3_grad: bool) -> Snapshots:
    """SGD with momentum on (u1, v1), carried out on the heads; see the module docstring.

    ``head_loss(u3, v3) -> (per-image loss (B,), z3)`` is the objective without the proximity
    term; ``cfg`` gives lr, momentum and proximity. Returns, for every step in ``wanted``
    (sorted, non-empty), the heads at that step and the per-image losses of steps 0..step, as
    :func:`discli.infer.loop.refine_features` needs them. The steps run compiled when
    :func:`discli.infer.settings.use_compiled` asks for it (:mod:`discli.infer.compiled`).
    """
    rule = momentum_rule(model, u1, v1, cfg)
    compiled = step_runner(rule, cfg, head_loss, needs_v3_grad)
    # distinct tensors: a compiled graph is specialised to which of its inputs alias
    heads = rule.start if compiled is None else (rule.start[0].clone(), rule.start[1].clone())
    state = rule.initial()
    out: Snapshots = {}
    losses: list[torch.Tensor] = []
    for step in range(wanted[-1] + 1):
        last = step == wanted[-1]
        result = None if compiled is None or last else compiled(heads, state)
        if result is None:  # plain steps; after a failed compiled one, from the state reached
            compiled = None
            result = plain_step(head_loss, rule, needs_v3_grad, heads, state, last)
        loss, z3, next_state, next_heads = result
        losses.append(loss)
        if step in wanted:
            out[step] = ({"u3": heads[0].detach(), "v3": heads[1].detach(), "z3": z3},
                         list(losses))
        heads, state = next_heads, next_state
    return out

