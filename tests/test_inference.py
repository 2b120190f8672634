import torch

from discli.infer.loop import InferenceConfig, infer, infer_steps


def _trained_ish(model):
    # Larger subnet weights than the N(0, 0.01) init so that inference has something to move.
    with torch.no_grad():
        model.subnet1.weight.normal_(std=0.2)
        model.subnet3.weight.normal_(std=0.2)
    return model


def test_t0_is_plain_forward(tiny_model):
    images = torch.randn(2, 3, 64, 64)
    result = infer(tiny_model, images, 0)
    with torch.no_grad():
        out = tiny_model(images)
    assert torch.allclose(result.u3, out["u3"]) and torch.allclose(result.v3, out["v3"])
    assert result.losses.shape == (2, 1)
    assert result.labelmap.shape == (2, 8, 8)


def test_reconstruction_loss_decreases(tiny_model):
    model = _trained_ish(tiny_model)
    images = torch.randn(2, 3, 64, 64)
    result = infer(model, images, 30, InferenceConfig(lr=0.5))
    assert result.losses.shape == (2, 31)
    assert (result.losses[:, -1] < result.losses[:, 0] * 0.99).all()


def test_training_time_inference_uses_tags(tiny_model):
    model = _trained_ish(tiny_model)
    images = torch.randn(1, 3, 64, 64)
    tags = torch.tensor([[1.0, 0, 1, 0, 0, 1]])
    plain = infer(model, images, 10, InferenceConfig(lr=0.5))
    tagged = infer(model, images, 10, InferenceConfig(lr=0.5), tags=tags)
    agree = lambda r: -torch.nn.functional.binary_cross_entropy_with_logits(r.v3, tags)  # noqa
    assert agree(tagged) > agree(plain)


def test_parameters_untouched(tiny_model):
    model = _trained_ish(tiny_model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    infer(model, torch.randn(2, 3, 64, 64), 30, InferenceConfig(lr=0.5),
          tags=torch.ones(2, 6))
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None for p in model.parameters())


def test_batch_equals_one_by_one(tiny_model):
    model = _trained_ish(tiny_model)
    images = torch.randn(3, 3, 64, 64)
    tags = (torch.rand(3, 6) > 0.5).float()
    cfg = InferenceConfig(lr=0.5, momentum=0.9)
    batch = infer(model, images, 30, cfg, tags=tags)
    for i in range(3):
        alone = infer(model, images[i:i + 1], 30, cfg, tags=tags[i:i + 1])
        assert torch.allclose(batch.u3[i], alone.u3[0], atol=1e-5)
        assert torch.allclose(batch.v3[i], alone.v3[0], atol=1e-5)


def test_snapshots_match_separate_runs(tiny_model):
    model = _trained_ish(tiny_model)
    images = torch.randn(2, 3, 64, 64)
    cfg = InferenceConfig(lr=0.5)
    snaps = infer_steps(model, images, [0, 5, 10], cfg)
    assert sorted(snaps) == [0, 5, 10]
    assert torch.allclose(snaps[5].u3, infer(model, images, 5, cfg).u3, atol=1e-6)


def test_training_mode_restored(tiny_model):
    tiny_model.train()
    infer(tiny_model, torch.randn(1, 3, 32, 32), 2)
    assert tiny_model.training
