import pytest
import torch
import torchvision

from discli.model.backbones import BACKBONES, build_backbone
from discli.errors import IncompatibleError, UsageError
from discli.model.losses import IGNORE_INDEX, map_loss, recon_loss, recon_target, tag_loss
from discli.model.net import ModelConfig, build_model, final_probs


@pytest.mark.parametrize("size,feat", [(321, 41), (353, 45)])
def test_resnet101_output_stride_8(size, feat):
    model = build_model(ModelConfig(backbone="resnet101", num_classes=21)).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, size, size))
        u1, v1 = model.features(torch.randn(1, 3, size, size))
    assert u1.shape == (1, 2048, feat, feat) and v1.shape == (1, 2048)
    assert out["u3"].shape == (1, 21, feat, feat)
    assert out["z3"].shape == (1, 3, feat, feat)
    assert out["v3"].shape == (1, 21)


@pytest.mark.parametrize("name", ["tiny", "resnet50"])
def test_registered_backbones_shapes(name):
    backbone = build_backbone(name).eval()
    with torch.no_grad():
        u1, v1 = backbone(torch.randn(2, 3, 65, 97))
    assert u1.shape == (2, backbone.out_channels, 9, 13)
    assert v1.shape == (2, backbone.out_channels)


@pytest.mark.parametrize("name", ["tiny", "small"])
def test_small_backbones_at_output_stride_4_keep_their_parameters(name):
    # Stride 4 replaces the third stride by dilation: the same state dict (the shipped
    # weights fit), features at twice the resolution.
    at8 = build_backbone(name, channels=16).eval()
    at4 = build_backbone(name, channels=16, output_stride=4).eval()
    assert at4.output_stride == 4 and at8.output_stride == 8
    assert {k: v.shape for k, v in at8.state_dict().items()} == \
        {k: v.shape for k, v in at4.state_dict().items()}
    at4.load_state_dict(at8.state_dict())
    images = torch.randn(2, 3, 65, 97)
    with torch.no_grad():
        u8, v8 = at8(images)
        u4, v4 = at4(images)
    assert u8.shape == (2, 16, 9, 13) and u4.shape == (2, 16, 17, 25)
    assert v4.shape == v8.shape == (2, 16)
    with pytest.raises(UsageError, match="output_stride must be 4 or 8, got 16"):
        build_backbone(name, output_stride=16)


def test_tiny_model_shapes(tiny_model):
    out = tiny_model(torch.randn(2, 3, 64, 48))
    assert out["u3"].shape == (2, 6, 8, 6)
    assert out["z3"].shape == (2, 3, 8, 6)
    assert out["v3"].shape == (2, 6)


def test_image_vector_is_not_avgpool_of_pixel_features():
    backbone = build_backbone("tiny").eval()
    u1, v1 = backbone(torch.rand(1, 3, 64, 64))
    assert not torch.allclose(u1.mean(dim=(2, 3)), v1)
    assert any(name.startswith("image_branch") for name, _ in backbone.named_parameters())


def test_registry_is_strict_and_lists_builtins():
    assert {"resnet101", "resnet50", "tiny"} <= set(BACKBONES.names())
    with pytest.raises(ValueError, match="already registered"):
        BACKBONES.add("tiny", lambda **kw: None)
    with pytest.raises(UsageError, match="unknown backbone 'nope'"):
        build_backbone("nope")


def test_resnet_weights_from_local_state_dict(tmp_path):
    reference = torchvision.models.resnet50()
    path = tmp_path / "r50.pth"
    torch.save(reference.state_dict(), path)
    backbone = build_backbone("resnet50", weights=str(path))
    assert torch.equal(backbone.layer4[2].conv3.weight, reference.layer4[2].conv3.weight)
    assert torch.equal(backbone.stem[0].weight, reference.conv1.weight)


def test_local_weights_of_wrong_architecture_refused(tmp_path):
    path = tmp_path / "tiny.pth"
    torch.save(build_backbone("tiny", channels=16).state_dict(), path)
    with pytest.raises(IncompatibleError, match="tiny.pth: weights do not fit"):
        build_backbone("tiny", weights=str(path), channels=32)
    assert build_backbone("tiny", weights=str(path), channels=16) is not None


def test_final_probs_reweights_by_tags_and_keeps_background():
    u3 = torch.zeros(1, 3, 2, 2)
    v3 = torch.tensor([[-20.0, 20.0, -20.0]])  # background logit ignored, class 2 absent
    probs = final_probs(u3, v3)
    assert torch.allclose(probs.sum(1), torch.ones(1, 2, 2))
    assert torch.allclose(probs[0, :, 0, 0], torch.tensor([0.5, 0.5, 0.0]), atol=1e-6)


def test_losses_per_image():
    images = torch.rand(2, 3, 16, 16)
    target = recon_target(images, (2, 2))
    assert torch.allclose(target[0, 0, 0, 0], images[0, 0, :8, :8].mean())
    assert torch.allclose(recon_loss(target, target), torch.zeros(2))
    labels = torch.full((2, 16, 16), IGNORE_INDEX)
    labels[0, :8] = 1
    u3 = torch.zeros(2, 3, 2, 2)
    u3[:, 1] = 10.0
    per_image = map_loss(u3, labels)
    assert per_image.shape == (2,) and per_image[0] < 1e-3 and per_image[1] == 0
    tags = torch.tensor([[1.0, 1.0, 0.0]])
    assert tag_loss(torch.tensor([[20.0, 20.0, -20.0]]), tags) < 1e-6
