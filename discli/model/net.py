"""The DIS network (section 2.1, Fig. 3): a backbone and three subnets.

    u1, v1 = backbone(image)                      pixel features (B,C,h,w), image vector (B,C)
    subnet-1  u2 = u1 + broadcast(v1);  u3 = conv3x3(u2)            labelmap logits (B,K,h,w)
    subnet-2  z3 = conv3x3(relu(conv3x3(relu(conv5x5(softmax(u3))))))   image recon (B,3,h,w)
    subnet-3  v2 = avgpool(u1) + v1;    v3 = W3 v2 + b3                 tag logits (B,K)

Subnet-2 reads the class *probabilities* softmax(u3), not raw logits: the paper says each entry of
u3 "indicates the probability of a category", and reconstructing from probabilities is what makes
minimising the reconstruction error move the labelmap toward segments that explain the image.

Final prediction ("v3 is treated as a convolutional kernel and convolved on u3"): a 1x1
channel-wise kernel ``w = sigmoid(v3)`` with the background weight fixed at 1 multiplies the class
probabilities, ``p_final[k] ∝ softmax(u3)[k] * w[k]``, renormalised over k. A class the tag head
thinks absent is suppressed everywhere; background is never suppressed.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from discli.model.backbones import build_backbone

BACKGROUND = 0


@dataclass
class ModelConfig:
    """Everything needed to rebuild the network; stored in every checkpoint."""

    backbone: str = "tiny"
    num_classes: int = 21  # K, background included
    backbone_weights: str | None = None
    backbone_kwargs: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        return cls(**{k: data[k] for k in ("backbone", "num_classes", "backbone_weights",
                                           "backbone_kwargs") if k in data})


class Subnet2(nn.Module):
    """Reconstructs the downsampled image from the class probabilities."""

    def __init__(self, num_classes: int):
        super().__init__()
        self.conv1 = nn.Conv2d(num_classes, num_classes, 5, padding=2)
        self.conv2 = nn.Conv2d(num_classes, 16, 3, padding=1)
        self.conv3 = nn.Conv2d(16, 3, 3, padding=1)

    def forward(self, probs: torch.Tensor) -> torch.Tensor:
        return self.conv3(F.relu(self.conv2(F.relu(self.conv1(probs)))))


class DISNet(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.backbone = build_backbone(config.backbone, config.backbone_weights,
                                       **config.backbone_kwargs)
        channels, k = self.backbone.out_channels, config.num_classes
        self.subnet1 = nn.Conv2d(channels, k, 3, padding=1)
        self.subnet2 = Subnet2(k)
        self.subnet3 = nn.Linear(channels, k)
        # The paper initialises the subnets from a normal distribution.
        for layer in (self.subnet1, self.subnet3):
            nn.init.normal_(layer.weight, std=0.01)
            nn.init.zeros_(layer.bias)

    @property
    def num_classes(self) -> int:
        return self.config.num_classes

    def features(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.backbone(images)

    def labelmap_logits(self, u1: torch.Tensor, v1: torch.Tensor) -> torch.Tensor:
        return self.subnet1(u1 + v1[:, :, None, None])

    def reconstruct(self, u3: torch.Tensor) -> torch.Tensor:
        return self.subnet2(u3.softmax(dim=1))

    def tag_logits(self, u1: torch.Tensor, v1: torch.Tensor) -> torch.Tensor:
        return self.subnet3(u1.mean(dim=(2, 3)) + v1)

    def heads(self, u1: torch.Tensor, v1: torch.Tensor) -> dict[str, torch.Tensor]:
        u3 = self.labelmap_logits(u1, v1)
        return {"u3": u3, "z3": self.reconstruct(u3), "v3": self.tag_logits(u1, v1)}

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.heads(*self.features(images))


def final_probs(u3: torch.Tensor, v3: torch.Tensor) -> torch.Tensor:
    """Class probabilities of the final labelmap: softmax(u3) re-weighted by sigmoid(v3)."""
    weights = torch.sigmoid(v3).clone()
    weights[:, BACKGROUND] = 1.0
    probs = u3.softmax(dim=1) * weights[:, :, None, None]
    return probs / probs.sum(dim=1, keepdim=True).clamp_min(1e-12)


def build_model(config: ModelConfig | None = None, **overrides: Any) -> DISNet:
    config = config or ModelConfig()
    for key, value in overrides.items():
        setattr(config, key, value)
    return DISNet(config)
