import os

import pytest
import torch

# Under pytest-xdist (the README's test command runs two workers on two cores) every worker, and
# every `dis` process a test starts, computes on one thread: two workers of two threads each
# would oversubscribe the cores, which slows torch down many times.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)

import factories


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def tiny_model():
    return factories.tiny_model(num_classes=6, channels=32)
