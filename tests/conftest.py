import pytest
import torch

import factories


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def tiny_model():
    return factories.tiny_model(num_classes=6, channels=32)
