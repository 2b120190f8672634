"""The compiled low-rank steps (discli.infer.compiled) against the plain ones and autograd.

The quick tests run the step that would be compiled without compiling it (or make the compiler
fail), so that nothing here needs a C++ compiler; the one test that compiles is marked slow and
skips where torch.compile cannot work."""

import shutil
import warnings

import pytest
import torch

import discli.infer.compiled as compiled
from discli.errors import DisWarning
from discli.infer.loop import InferenceConfig, refine_features
from discli.infer.settings import compiled_requested, use_compiled
import factories

K = 6


@pytest.fixture(autouse=True)
def fresh_state(monkeypatch):
    """Compiling off after each test, and no buckets, wrappers or warnings left from others."""
    for name in ("_compiled", "_buckets"):
        monkeypatch.setattr(compiled, name, {})
    monkeypatch.setattr(compiled, "_warned", set())
    previous = use_compiled(False)
    yield
    use_compiled(previous)


def _problem(dtype=torch.float64, batch=2, h=5, w=7):
    model = factories.tiny_model(K, 16, seed=1).to(dtype)
    with torch.no_grad():
        model.subnet1.weight.normal_(std=0.2)
        model.subnet3.weight.normal_(std=0.2)
    u1 = torch.randn(batch, 16, h, w, dtype=dtype)
    v1 = torch.rand(batch, 16, dtype=dtype)
    images = torch.randn(batch, 3, 8 * h, 8 * w, dtype=dtype)
    tags = (torch.rand(batch, K) > 0.5).to(dtype)
    return model, u1, v1, images, tags


def _run(problem, compile_steps, method="lowrank", with_tags=True, proximity=0.0, steps=(0, 4, 12)):
    model, u1, v1, images, tags = problem
    use_compiled(compile_steps)
    cfg = InferenceConfig(lr=0.5, momentum=0.9, proximity=proximity, tag_weight=2.0, method=method)
    return refine_features(model, u1, v1, images, cfg, tags=tags if with_tags else None,
                           snapshots=steps)


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def _assert_close(got, ref, tol):
    assert sorted(got) == sorted(ref)
    for step in ref:
        for name in ("u3", "v3", "z3", "losses"):
            assert _rel(getattr(got[step], name), getattr(ref[step], name)) < tol, (step, name)
        assert got[step].losses.shape == ref[step].losses.shape


def test_switch():
    assert not compiled_requested()
    assert use_compiled(True) is False and compiled_requested()
    assert use_compiled(False) is True and not compiled_requested()


@pytest.mark.parametrize("with_tags,proximity", [(False, 0.0), (True, 0.0), (True, 50.0)])
def test_compilable_step_equals_autograd_in_float64(monkeypatch, with_tags, proximity):
    """The pure step (torch.func.grad, functional updates), run uncompiled, against autograd."""
    monkeypatch.setattr(compiled, "_wrapper", lambda device: compiled.step)
    problem = _problem()
    ref = _run(problem, False, "autograd", with_tags, proximity)
    got = _run(problem, True, "lowrank", with_tags, proximity)
    _assert_close(got, ref, 1e-9)
    assert len(compiled.compile_seconds()) == 1


def test_failing_compiler_falls_back_to_the_plain_path(monkeypatch):
    calls = []

    def broken(*args):
        calls.append(1)
        if len(calls) > 3:  # fails mid-way: the plain steps go on from the state reached
            raise RuntimeError("no C++ compiler\nmore")
        return compiled.step(*args)

    monkeypatch.setattr(compiled, "_wrapper", lambda device: broken)
    problem = _problem()
    plain = _run(problem, False)
    with pytest.warns(DisWarning, match="compiling inference steps failed .RuntimeError: no C"):
        got = _run(problem, True)
    _assert_close(got, plain, 1e-12)
    assert len(calls) == 4
    with warnings.catch_warnings():
        warnings.simplefilter("error", DisWarning)  # warned once; the bucket now runs plainly
        again = _run(problem, True)
    assert len(calls) == 4
    assert all(torch.equal(again[s].u3, plain[s].u3) for s in plain)


def test_too_many_buckets_run_plainly(monkeypatch):
    monkeypatch.setattr(compiled, "_recompile_limit", lambda: 0)
    monkeypatch.setattr(compiled, "_wrapper", lambda device: pytest.fail("compiled"))
    problem = _problem()
    with pytest.warns(DisWarning, match="uncompiled"):
        got = _run(problem, True)
    plain = _run(problem, False)
    assert all(torch.equal(got[s].u3, plain[s].u3) for s in plain)


@pytest.mark.slow
def test_inductor_compiled_steps_match():
    """Really compiled (Inductor, C++ on CPU; 10-60 s to compile): float64 against autograd,
    float32 against the plain path; one compile serves a second batch of the same shape."""
    if not hasattr(torch, "compile") or not (shutil.which("c++") or shutil.which("g++")):
        pytest.skip("no torch.compile or no C++ compiler")
    problem = _problem(batch=1, h=3, w=4)
    ref = _run(problem, False, "autograd")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", DisWarning)
        got = _run(problem, True)
    if any("compiling inference steps failed" in str(w.message) for w in caught):
        pytest.skip(f"torch.compile does not work here: {caught[0].message}")
    _assert_close(got, ref, 1e-9)
    assert len(compiled.compile_seconds()) == 1
    model, u1, v1, images, tags = problem
    other = (model, torch.randn_like(u1), torch.rand_like(v1), torch.randn_like(images), tags)
    _assert_close(_run(other, True), _run(other, False), 1e-12)
    assert len(compiled.compile_seconds()) == 1  # the same bucket: no second compile


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_compiled_steps_on_cuda():
    """Triton kernels and CUDA graphs (mode "reduce-overhead"): float64 against autograd, float32
    against the plain path, with and without tags and the proximity term, a second batch of the
    same shape without a new compile. Run by benchmarks/gpu_check.sh."""
    for dtype, method, tol in ((torch.float64, "autograd", 1e-9), (torch.float32, "lowrank", 1e-4)):
        model, *tensors = _problem(dtype, batch=2, h=9, w=11)
        problem = (model.cuda(), *(t.cuda() for t in tensors))
        for with_tags, proximity in ((False, 0.0), (True, 50.0)):
            ref = _run(problem, False, method, with_tags, proximity, steps=(0, 10, 30))
            got = _run(problem, True, "lowrank", with_tags, proximity, steps=(0, 10, 30))
            assert compiled.compile_seconds(), "the compiled path fell back to the plain one"
            _assert_close(got, ref, tol)
    count = len(compiled.compile_seconds())
    again = _run(problem, True, "lowrank", True, 50.0, steps=(30,))
    assert len(compiled.compile_seconds()) == count
    assert torch.equal(again[30].labelmap, got[30].labelmap)
