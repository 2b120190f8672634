import pytest
import torch

from discli.model import ModelConfig, build_model


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def tiny_model():
    torch.manual_seed(0)
    return build_model(ModelConfig(backbone="tiny", num_classes=6,
                                   backbone_kwargs={"channels": 32})).eval()
