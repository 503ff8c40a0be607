import os

import pytest
import torch

os.environ.setdefault("SALIENCYLAB_PROGRESS", "0")

from zoo import ColourNet, PatchMeanModel, PatchModel, RegionModel, SmallCNN, make_small_cnn  # noqa: F401  (the shared zoo)


@pytest.fixture
def small_cnn():
    return make_small_cnn()


@pytest.fixture
def images():
    torch.manual_seed(1)
    return torch.randn(3, 3, 12, 12)
