"""Backbones: image -> (pixel features u1, image-level vector v1).

Every backbone is a module with ``out_channels`` (C) and ``output_stride`` attributes whose
forward returns ``u1`` of shape (B, C, H/s, W/s), s its output stride (8; 16 for
MobileNetV3-Large), and ``v1`` of shape (B, C).

The image-level vector ``v1`` comes from a branch of its own (:class:`ImageBranch`): global *max*
pooling of an earlier stage, projected to C channels by a learned linear layer and a ReLU. It is
deliberately not ``avgpool(u1)``: subnet-3 already adds ``avgpool(u1)`` to it (``v2 = avgpool(u1)
+ v1``), and max pooling of mid-level features answers "is there evidence of class X anywhere",
which complements the average. For the ResNets the branch reads ``layer3`` (1024 channels),
for MobileNetV3-Large the stage before its last (112 channels).

Factories are registered by name in :data:`BACKBONES`; third-party packages add their own
through the ``dis.backbones`` entry-point group.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from discli.errors import (BadInputError, DisError, IncompatibleError, PluginError, UsageError,
                           first_line)
from discli.registry import Registry

BackboneFactory = Callable[..., nn.Module]
BACKBONES: Registry[BackboneFactory] = Registry("backbone", group="dis.backbones")


class ImageBranch(nn.Module):
    """v1 = relu(W · globalmaxpool(features) + b)."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.proj = nn.Linear(in_channels, out_channels)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return F.relu(self.proj(features.amax(dim=(2, 3))))


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict saved by torch.save, refusing anything that needs pickle to run code."""
    path = Path(path)
    if not path.is_file():
        raise BadInputError("weights file not found" if not path.exists() else
                            "expected a weights file, found a folder, device, pipe or socket", path)
    if path.stat().st_size == 0:
        raise IncompatibleError("weights file is empty (0 bytes)", path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated file, foreign pickle, not a torch file
        raise IncompatibleError(f"cannot load weights safely ({type(exc).__name__}: "
                                f"{first_line(exc)})", path) from None
    for key in ("state_dict", "model"):  # common wrappers around a bare state dict
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise IncompatibleError("not a state dict of tensors", path)
    return obj


def _load_into(module: nn.Module, path: str | Path, ignore_prefixes: tuple[str, ...] = ()) -> None:
    state = {k.removeprefix("module."): v for k, v in load_state_dict_file(path).items()}
    state = {k: v for k, v in state.items() if not k.startswith(ignore_prefixes)}
    own = {k: v for k, v in module.state_dict().items() if not k.startswith(ignore_prefixes)}
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or wrong:
        detail = (missing and f"missing {missing[:3]}") or (unexpected and f"unexpected "
                  f"{unexpected[:3]}") or f"shape mismatch in {wrong[:3]}"
        raise IncompatibleError(f"weights do not fit this backbone: {detail}", path)
    module.load_state_dict(state, strict=not ignore_prefixes)


def _load_own(module: nn.Module, weights: str | None, name: str) -> None:
    """A small backbone's ``weights``: none, or a local state dict (:func:`shipped_weights` has
    turned a shipped name into its file); torchvision has no imagenet weights for it."""
    if weights in (None, "", "none"):
        return
    if weights == "imagenet":
        raise UsageError(f"the {name} backbone has no imagenet weights")
    _load_into(module, weights)


def _init_torchvision(net: nn.Module, weights: str | None, imagenet: object, name: str,
                      head: str) -> None:
    """Initialise a torchvision classifier ``net`` in place: ``"imagenet"`` from the torch hub
    cache (downloaded when missing, see :mod:`discli.model.imagenet`), a path from a local
    state dict in torchvision's key layout (its classifier ``head`` may be missing or of any
    size), None/""/"none" left random."""
    if weights in (None, "", "none"):
        return
    if weights == "imagenet":
        from discli.model.imagenet import imagenet_state_dict

        net.load_state_dict(imagenet_state_dict(imagenet, name))
    else:
        _load_into(net, weights, ignore_prefixes=(head,))


class ResNetBackbone(nn.Module):
    """A torchvision ResNet with layer3/4 dilated (output stride 8), as in DeepLab."""

    output_stride = 8

    def __init__(self, depth: int, weights: str | None = None):
        super().__init__()
        import torchvision

        builders = {50: torchvision.models.resnet50, 101: torchvision.models.resnet101}
        enums = {50: torchvision.models.ResNet50_Weights, 101: torchvision.models.ResNet101_Weights}
        net = builders[depth](weights=None, replace_stride_with_dilation=[False, True, True])
        _init_torchvision(net, weights, enums[depth].IMAGENET1K_V2, f"resnet{depth}", "fc.")
        self.stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
        self.layer1, self.layer2, self.layer3, self.layer4 = (
            net.layer1, net.layer2, net.layer3, net.layer4)
        self.out_channels = 2048
        self.image_branch = ImageBranch(1024, self.out_channels)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.layer2(self.layer1(self.stem(images)))
        mid = self.layer3(x)
        return self.layer4(mid), self.image_branch(mid)


class MobileNetV3Backbone(nn.Module):
    """torchvision's MobileNetV3-Large as its ``deeplabv3_mobilenet_v3_large`` builds it: the
    last stage (C5) dilated instead of strided, u1 the final 960-channel features at output
    stride 16. The image branch reads the stage before C5 (112 channels, stride 16), as the
    ResNets' reads layer3. About 3 M backbone parameters against ResNet-101's 43 M: the
    backbone for real photos on a CPU or a small GPU.

    Stride 16, not 8, because that is what its ImageNet weights are used at by torchvision's
    own segmentation models; a 321 px crop gives 21x21 cells (the ResNets: 41x41)."""

    output_stride = 16

    def __init__(self, weights: str | None = None):
        super().__init__()
        import torchvision

        net = torchvision.models.mobilenet_v3_large(weights=None, dilated=True)
        _init_torchvision(net, weights, torchvision.models.MobileNet_V3_Large_Weights
                          .IMAGENET1K_V1, "mobilenet_v3_large", "classifier.")
        features = net.features
        c5 = [i for i, block in enumerate(features) if getattr(block, "_is_cn", False)][-1]
        self.early, self.late = features[:c5], features[c5:]
        self.out_channels = features[-1].out_channels
        self.image_branch = ImageBranch(features[c5 - 1].out_channels, self.out_channels)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mid = self.early(images)
        return self.late(mid), self.image_branch(mid)


def _conv_bn_relu(cin: int, cout: int, stride: int = 1, dilation: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=stride, padding=dilation, dilation=dilation, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


def _check_stride(output_stride: int) -> None:
    if output_stride not in (4, 8):
        raise UsageError(f"{{opt:output_stride}} must be 4 or 8, got {output_stride}")


class TinyBackbone(nn.Module):
    """Four 3x3 conv layers (three strided, one dilated): output stride 8, trains in seconds.

    ``output_stride=4`` replaces the third stride by dilation, as DeepLab does in the ResNet's
    last stages: the same parameters (shipped weights fit either way), features at twice the
    resolution. On images of about 100 px, stride 8 leaves feature maps of 9-15 cells, coarser
    than the paper's ResNet on 321 px crops (41 cells)."""

    def __init__(self, channels: int = 64, weights: str | None = None, output_stride: int = 8):
        super().__init__()
        _check_stride(output_stride)
        dilation = 8 // output_stride  # 1 at stride 8, 2 at stride 4
        self.output_stride = output_stride
        self.stage1 = _conv_bn_relu(3, 32, stride=2)
        self.stage2 = _conv_bn_relu(32, 48, stride=2)
        self.stage3 = _conv_bn_relu(48, channels, stride=2 // dilation, dilation=dilation)
        self.stage4 = _conv_bn_relu(channels, channels, dilation=2 * dilation)
        self.out_channels = channels
        self.image_branch = ImageBranch(channels, channels)
        _load_own(self, weights, "tiny")

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mid = self.stage3(self.stage2(self.stage1(images)))
        return self.stage4(mid), self.image_branch(mid)


class SmallBackbone(nn.Module):
    """Eight 3x3 conv layers in four stages (output stride 8, the last stage dilated 2 and 4):
    a receptive field of about 100 px, enough to tell objects apart by shape on small images;
    a few seconds per hundred iterations on a CPU. ``output_stride=4``: as for the tiny one."""

    def __init__(self, channels: int = 128, weights: str | None = None, output_stride: int = 8):
        super().__init__()
        _check_stride(output_stride)
        dilation = 8 // output_stride
        self.output_stride = output_stride
        self.stage1 = nn.Sequential(_conv_bn_relu(3, 32, stride=2), _conv_bn_relu(32, 32))
        self.stage2 = nn.Sequential(_conv_bn_relu(32, 64, stride=2), _conv_bn_relu(64, 64))
        self.stage3 = nn.Sequential(
            _conv_bn_relu(64, 96, stride=2 // dilation, dilation=dilation),
            _conv_bn_relu(96, 96, dilation=dilation))
        self.stage4 = nn.Sequential(_conv_bn_relu(96, channels, dilation=2 * dilation),
                                    _conv_bn_relu(channels, channels, dilation=4 * dilation))
        self.out_channels = channels
        self.image_branch = ImageBranch(96, channels)
        _load_own(self, weights, "small")

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mid = self.stage3(self.stage2(self.stage1(images)))
        return self.stage4(mid), self.image_branch(mid)


@BACKBONES.register("resnet101")
def resnet101(weights: str | None = None, **_: object) -> nn.Module:
    return ResNetBackbone(101, weights)


@BACKBONES.register("resnet50")
def resnet50(weights: str | None = None, **_: object) -> nn.Module:
    return ResNetBackbone(50, weights)


@BACKBONES.register("mobilenet_v3_large")
def mobilenet_v3_large(weights: str | None = None, **_: object) -> nn.Module:
    return MobileNetV3Backbone(weights)


def shipped_weights(backbone: str, channels: int, weights: str | None) -> str | None:
    """A shipped weights name (``"shapes"``, see :mod:`discli.model.weights`) -> its file in the
    package; anything else (a path, None) is returned as it is."""
    from discli.model.weights import NAMES, resolve, weights_file

    path = resolve(backbone, channels, weights) if weights else None
    if path is None:
        return weights
    if not path.is_file():
        have = sorted(p.stem for p in weights_file(backbone, channels).parent.glob("*.pth"))
        raise UsageError(f"no shipped {weights!r} weights for the {backbone} backbone with "
                         f"{channels} channels (shipped: {', '.join(have) or 'none'}; names: "
                         f"{', '.join(NAMES)}); make them with "
                         f"`python -m discli.train.ship_weights --backbone {backbone} "
                         f"--channels {channels}`")
    return str(path)


@BACKBONES.register("tiny")
def tiny(weights: str | None = None, channels: int = 64, output_stride: int = 8,
         **_: object) -> nn.Module:
    return TinyBackbone(channels, shipped_weights("tiny", channels, weights), output_stride)


@BACKBONES.register("small")
def small(weights: str | None = None, channels: int = 128, output_stride: int = 8,
          **_: object) -> nn.Module:
    return SmallBackbone(channels, shipped_weights("small", channels, weights), output_stride)


def backbone_options(name: str) -> tuple[str, ...]:
    """The keyword options the backbone ``name`` takes besides ``weights`` (``("channels",)``
    for tiny and small, ``()`` for the ResNets), from its factory's signature: what a training
    configuration passes it (:func:`discli.train.pretrain.new_model`)."""
    import inspect

    params = inspect.signature(BACKBONES.get(name)).parameters.values()
    return tuple(p.name for p in params if p.name != "weights" and p.kind in (
        inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY))


def build_backbone(name: str, weights: str | None = None, **kwargs: object) -> nn.Module:
    factory, package = BACKBONES.get(name), BACKBONES.package(name)
    if package is None:  # built in
        return factory(weights=weights, **kwargs)
    plugin = f"backbone {name!r} of the plugin package {package}"
    try:
        backbone = factory(weights=weights, **kwargs)
    except DisError:
        raise
    except Exception as exc:  # noqa: BLE001 - the plugin's bug, named as such
        raise PluginError(f"{plugin} failed to build: {type(exc).__name__}: "
                          f"{first_line(exc)}") from exc
    if not isinstance(backbone, nn.Module) or not isinstance(
            getattr(backbone, "out_channels", None), int):
        raise PluginError(f"{plugin} returned {type(backbone).__name__}, not a backbone (an "
                          f"nn.Module with an integer out_channels)")
    return backbone
