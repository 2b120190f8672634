"""The low-rank inference path against the autograd reference, in float64."""

import importlib

import pytest
import torch

import discli.infer.loop
from discli.infer.loop import InferenceConfig, infer, infer_steps, refine_features, resolve_method
from discli.infer.lowrank import apply_gram_u, apply_gram_v, gram_operators, supports_lowrank
from discli.model.net import DISNet
import factories

K = 6
METHODS = ["autograd", "lowrank"]


def _model(channels: int = 24, bias: bool = True) -> DISNet:
    model = factories.tiny_model(K, channels, seed=1).double()
    with torch.no_grad():
        model.subnet1.weight.normal_(std=0.2)
        model.subnet3.weight.normal_(std=0.2)
        if bias:
            model.subnet1.bias.normal_()
            model.subnet3.bias.normal_()
    return model


def _inputs(model: DISNet, batch: int = 3, h: int = 5, w: int = 7):
    c = model.backbone.out_channels
    u1 = torch.randn(batch, c, h, w, dtype=torch.float64)
    v1 = torch.rand(batch, c, dtype=torch.float64)
    images = torch.randn(batch, 3, 8 * h, 8 * w, dtype=torch.float64)
    tags = (torch.rand(batch, K) > 0.5).double()
    return u1, v1, images, tags


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def _both(model, u1, v1, images, cfg, tags=None, snapshots=None):
    out = {}
    for method in METHODS:
        cfg.method = method
        out[method] = refine_features(model, u1, v1, images, cfg, tags=tags, snapshots=snapshots)
    return out["autograd"], out["lowrank"]


def _assert_same(ref, low, tol=1e-9):
    assert _rel(low.u3, ref.u3) < tol
    assert _rel(low.v3, ref.v3) < tol
    assert _rel(low.z3, ref.z3) < tol
    assert _rel(low.losses, ref.losses) < tol
    assert low.losses.shape == ref.losses.shape


@pytest.mark.parametrize("with_tags", [False, True])
@pytest.mark.parametrize("channels,bias", [(16, False), (24, True), (64, True)])
def test_lowrank_equals_autograd_after_30_momentum_steps(with_tags, channels, bias):
    model = _model(channels, bias)
    u1, v1, images, tags = _inputs(model)
    cfg = InferenceConfig(steps=30, lr=0.5, momentum=0.9, tag_weight=2.0)
    ref, low = _both(model, u1, v1, images, cfg, tags=tags if with_tags else None)
    ref, low = ref[30], low[30]
    assert _rel(ref.u3, model.labelmap_logits(u1, v1).detach()) > 1e-3  # inference moved u3
    _assert_same(ref, low)
    assert torch.equal(low.labelmap, ref.labelmap)


@pytest.mark.parametrize("h,w", [(1, 1), (1, 4), (4, 1), (2, 2), (2, 3), (3, 2), (6, 5)])
def test_border_sizes(h, w):
    model = _model(16)
    u1, v1, images, tags = _inputs(model, batch=2, h=h, w=w)
    cfg = InferenceConfig(lr=0.3, momentum=0.9)
    ref, low = _both(model, u1, v1, images, cfg, tags=tags, snapshots=[12])
    _assert_same(ref[12], low[12])


def test_proximity_term_is_exact():
    model = _model(24)
    u1, v1, images, tags = _inputs(model)
    cfg = InferenceConfig(lr=0.5, momentum=0.9, proximity=50.0)
    ref, low = _both(model, u1, v1, images, cfg, tags=tags, snapshots=[0, 30])
    _assert_same(ref[30], low[30])
    plain = refine_features(model, u1, v1, images, InferenceConfig(lr=0.5, method="lowrank"),
                            tags=tags, snapshots=[30])[30]
    assert _rel(plain.u3, low[30].u3) > 1e-6  # the term did change the trajectory


@pytest.mark.parametrize("momentum", [0.0, 0.5])
def test_other_momenta(momentum):
    model = _model(16)
    u1, v1, images, _ = _inputs(model)
    cfg = InferenceConfig(lr=0.5, momentum=momentum)
    ref, low = _both(model, u1, v1, images, cfg, snapshots=[20])
    _assert_same(ref[20], low[20])


def test_snapshots_equal():
    model = _model(24)
    u1, v1, images, tags = _inputs(model)
    cfg = InferenceConfig(lr=0.5)
    ref, low = _both(model, u1, v1, images, cfg, tags=tags, snapshots=[0, 3, 10, 30])
    assert sorted(low) == [0, 3, 10, 30]
    for step in (0, 3, 10, 30):
        _assert_same(ref[step], low[step])
        assert low[step].losses.shape == (3, step + 1)
        assert low[step].steps == step
    assert torch.equal(low[0].u3, ref[0].u3) and torch.equal(low[0].v3, ref[0].v3)
    single = refine_features(model, u1, v1, images, cfg, tags=tags, snapshots=[10])[10]
    assert torch.equal(single.u3, low[10].u3)


@pytest.mark.parametrize("h,w", [(1, 1), (1, 3), (2, 1), (3, 3), (5, 7)])
def test_gram_operators_match_jacobian(h, w):
    """G_u = J_u J_u^T and G_v = J_v J_v^T against the explicit Jacobian of the heads."""
    model = _model(8)
    c = 8
    u1 = torch.randn(1, c, h, w, dtype=torch.float64)
    v1 = torch.randn(1, c, dtype=torch.float64)

    def heads(u, v):
        return torch.cat([model.labelmap_logits(u, v).flatten(), model.tag_logits(u, v).flatten()])

    ju, jv = torch.autograd.functional.jacobian(heads, (u1, v1))
    ju, jv = ju.reshape(ju.shape[0], -1), jv.reshape(jv.shape[0], -1)
    ops = gram_operators(model.subnet1.weight, model.subnet3.weight)
    basis = torch.eye(K * h * w + K, dtype=torch.float64)
    a_u, a_v = basis[:, :K * h * w].reshape(-1, K, h, w), basis[:, K * h * w:]
    for apply, jac in ((apply_gram_u, ju), (apply_gram_v, jv)):
        out_u, out_v = apply(ops, a_u, a_v)
        gram = torch.cat([out_u.flatten(1), out_v], dim=1)
        assert _rel(gram, jac @ jac.T) < 1e-12


@pytest.mark.parametrize("method", METHODS)
def test_infer_batch_and_parameters_untouched(method):
    model = _model(24)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    images = torch.randn(3, 3, 40, 56, dtype=torch.float64)  # 5x7 feature maps
    tags = (torch.rand(3, K) > 0.5).double()
    cfg = InferenceConfig(lr=0.5, method=method)
    batch = infer(model, images, 30, cfg, tags=tags)
    assert batch.u3.shape == (3, K, 5, 7)
    for i in range(3):
        alone = infer(model, images[i:i + 1], 30, cfg, tags=tags[i:i + 1])
        assert _rel(alone.u3[0], batch.u3[i]) < 1e-12
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None for p in model.parameters())


def test_infer_float64_methods_agree():
    model = _model(24)
    images = torch.randn(3, 3, 40, 56, dtype=torch.float64)
    snaps = {m: infer_steps(model, images, [0, 30], InferenceConfig(lr=0.5, method=m))
             for m in METHODS}
    _assert_same(snaps["autograd"][30], snaps["lowrank"][30])


def test_float32_close(tiny_model):
    with torch.no_grad():
        tiny_model.subnet1.weight.normal_(std=0.2)
        tiny_model.subnet3.weight.normal_(std=0.2)
    images = torch.randn(2, 3, 64, 64)
    ref = infer(tiny_model, images, 10, InferenceConfig(lr=0.5, method="autograd"))
    low = infer(tiny_model, images, 10, InferenceConfig(lr=0.5, method="lowrank"))
    assert low.u3.dtype == torch.float32
    assert _rel(low.u3, ref.u3) < 1e-4 and _rel(low.losses, ref.losses) < 1e-4


def test_auto_dispatch_and_fallback():
    model = _model(16)
    assert supports_lowrank(model)
    assert resolve_method(model, InferenceConfig()) == "lowrank"
    assert resolve_method(model, InferenceConfig(method="autograd")) == "autograd"

    class Custom(DISNet):
        def tag_logits(self, u1, v1):
            return super().tag_logits(u1.relu(), v1)

    custom = Custom(model.config)
    assert not supports_lowrank(custom)
    assert resolve_method(custom, InferenceConfig()) == "autograd"
    with pytest.raises(ValueError, match="lowrank"):
        resolve_method(custom, InferenceConfig(method="lowrank"))
    model.subnet1 = torch.nn.Conv2d(16, K, 3, padding=2, dilation=2).double()
    assert resolve_method(model, InferenceConfig()) == "autograd"
    with pytest.raises(ValueError, match="method"):
        InferenceConfig(method="adam")


_REFERENCE_SUITE = importlib.import_module("test_inference")  # tests/test_inference.py


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name", sorted(n for n in dir(_REFERENCE_SUITE) if n.startswith("test_")))
def test_reference_suite_with_each_method(name, method, monkeypatch, tiny_model):
    """Every test of tests/test_inference.py, forced onto one implementation."""
    monkeypatch.setattr(discli.infer.loop, "resolve_method", lambda model, cfg: method)
    calls = []
    real = discli.infer.loop._refine_lowrank if method == "lowrank" else \
        discli.infer.loop._refine_autograd
    monkeypatch.setattr(discli.infer.loop, f"_refine_{method}",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    getattr(_REFERENCE_SUITE, name)(tiny_model)
    assert calls
