"""The MobileNetV3-Large backbone (preset "photos") and the offline-aware lookup of torchvision's
ImageNet weights that it shares with the ResNets. Nothing is downloaded: the downloader is
replaced in every test that could reach it."""

import errno
import tomllib
from importlib.metadata import EntryPoint
from pathlib import Path
from urllib.error import URLError

import pytest
import torch
import torchvision

from discli.model.backbones import BACKBONES, build_backbone
from discli.errors import (EXIT_BAD_INPUT, EXIT_SYSTEM, BadInputError, IncompatibleError,
                           SystemRefusedError)
from discli.model.net import ModelConfig, build_model
from discli.train.config import load_config
from discli.model.imagenet import cache_file

ROOT = Path(__file__).resolve().parents[1]
MNV3_FILE = "mobilenet_v3_large-8738ca79.pth"


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """An empty torch hub cache and a network that cannot be reached; the downloads tried."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    tried = []

    def unreachable(url, dst, hash_prefix=None, progress=True):
        tried.append((url, dst, hash_prefix))
        raise URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(torch.hub, "download_url_to_file", unreachable)
    return tried


def test_shapes_at_output_stride_16():
    backbone = build_backbone("mobilenet_v3_large").eval()
    assert backbone.output_stride == 16 and backbone.out_channels == 960
    with torch.no_grad():
        u1, v1 = backbone(torch.randn(2, 3, 321, 321))
        small_u1, _ = backbone(torch.randn(1, 3, 65, 97))
    assert u1.shape == (2, 960, 21, 21) and v1.shape == (2, 960)
    assert small_u1.shape == (1, 960, 5, 7)
    # v1 is the image branch's (the stage before the last), not a pooling of u1
    assert not torch.allclose(u1.amax(dim=(2, 3)), v1)
    model = build_model(ModelConfig(backbone="mobilenet_v3_large", num_classes=5)).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 129, 129))
    assert out["u3"].shape == (1, 5, 9, 9) and out["v3"].shape == (1, 5)


def test_dilation_is_torchvisions_deeplabv3_one():
    # deeplabv3_mobilenet_v3_large dilates the last stage (C5) and keeps the strides before it
    ours = build_backbone("mobilenet_v3_large")
    theirs = torchvision.models.segmentation.deeplabv3_mobilenet_v3_large(
        weights=None, weights_backbone=None, aux_loss=False).backbone
    ours_convs = [(m.stride, m.dilation) for m in [*ours.early.modules(), *ours.late.modules()]
                  if isinstance(m, torch.nn.Conv2d)]
    theirs_convs = [(m.stride, m.dilation) for m in theirs.modules()
                    if isinstance(m, torch.nn.Conv2d)]
    assert ours_convs == theirs_convs and any(d == (2, 2) for _, d in ours_convs)


def test_local_torchvision_state_dict_loads(tmp_path, offline):
    reference = torchvision.models.mobilenet_v3_large()
    path = tmp_path / "mnv3.pth"
    torch.save(reference.state_dict(), path)
    backbone = build_backbone("mobilenet_v3_large", weights=str(path))
    assert torch.equal(backbone.late[-1][0].weight, reference.features[16][0].weight)
    assert torch.equal(backbone.early[0][0].weight, reference.features[0][0].weight)
    # the classifier may be missing or of another size (a fine-tuned torchvision model)
    torch.save({k: v for k, v in reference.state_dict().items()
                if not k.startswith("classifier.")}, path)
    assert build_backbone("mobilenet_v3_large", weights=str(path)) is not None
    torch.save(torchvision.models.resnet50().state_dict(), path)
    with pytest.raises(IncompatibleError, match="mnv3.pth: weights do not fit"):
        build_backbone("mobilenet_v3_large", weights=str(path))
    assert offline == []


@pytest.mark.parametrize("name,file", [("mobilenet_v3_large", MNV3_FILE),
                                       ("resnet50", "resnet50-11ad3fa6.pth")])
def test_imagenet_weights_offline_say_where_to_put_them(name, file, offline, tmp_path):
    expected = tmp_path / "torch" / "hub" / "checkpoints" / file
    with pytest.raises(BadInputError) as info:
        build_backbone(name, weights="imagenet")
    exc = info.value
    assert exc.exit_code == EXIT_BAD_INPUT == 3 and exc.path == str(expected)
    message = exc.cli_message()
    assert message.startswith(f"{expected}: ImageNet weights of the {name} backbone not found")
    assert "URLError" in message and "$TORCH_HOME/hub/checkpoints" in message
    assert message.endswith("pass a local torchvision state dict with --backbone-weights PATH")
    assert str(exc).endswith("with backbone_weights=PATH")  # the library's own spelling
    assert "\n" not in message
    # tried once, at torchvision's URL, into torchvision's cache file, with its hash check
    assert [(Path(dst), prefix) for _, dst, prefix in offline] == [(expected, file[-12:-4])]
    assert offline[0][0] == f"https://download.pytorch.org/models/{file}"
    assert not expected.exists()


def test_imagenet_weights_come_from_the_cache_without_network(offline):
    weights = torchvision.models.MobileNet_V3_Large_Weights.IMAGENET1K_V1
    path = cache_file(weights.url)
    assert path.name == MNV3_FILE and path.parent == Path(torch.hub.get_dir()) / "checkpoints"
    reference = torchvision.models.mobilenet_v3_large()
    path.parent.mkdir(parents=True)
    torch.save(reference.state_dict(), path)
    backbone = build_backbone("mobilenet_v3_large", weights="imagenet")
    assert torch.equal(backbone.early[5].block[0][0].weight,
                       reference.features[5].block[0][0].weight)
    assert offline == []
    path.write_bytes(b"not a torch file")  # a download cut short by hand
    with pytest.raises(IncompatibleError, match=r"cached ImageNet weights of "
                       r"mobilenet_v3_large are damaged .*delete the file"):
        build_backbone("mobilenet_v3_large", weights="imagenet")


def test_cache_folder_that_cannot_be_written_is_the_systems_refusal(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))

    def disk_full(url, dst, hash_prefix=None, progress=True):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch.hub, "download_url_to_file", disk_full)
    with pytest.raises(SystemRefusedError, match=f"{MNV3_FILE}: no space left") as info:
        build_backbone("mobilenet_v3_large", weights="imagenet")
    assert info.value.exit_code == EXIT_SYSTEM


def test_registered_through_the_entry_point_group():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    group = project["project"]["entry-points"]["dis.backbones"]
    assert group["mobilenet_v3_large"] == "discli.model.backbones:mobilenet_v3_large"
    loaded = EntryPoint("mobilenet_v3_large", group["mobilenet_v3_large"], "dis.backbones").load()
    assert loaded is BACKBONES.get("mobilenet_v3_large")
    assert "mobilenet_v3_large" in BACKBONES.names()


@pytest.mark.parametrize("section", ["pretrain", "finetune"])
def test_photos_preset_loads(section):
    cfg = load_config("photos", section=section)
    assert (cfg.backbone, cfg.backbone_weights, cfg.optimizer) == \
        ("mobilenet_v3_large", "imagenet", "adamw")
    assert 257 <= cfg.crop_size <= 321 and cfg.batch_size >= 4
    assert cfg.loss_img == (1.0 if section == "pretrain" else 0.0)
    demo = load_config("demo", section=section)  # inference settings: the demo's, untested here
    assert (cfg.inf_lr, cfg.inf_momentum, cfg.inf_tag_weight) == \
        (demo.inf_lr, demo.inf_momentum, demo.inf_tag_weight)
