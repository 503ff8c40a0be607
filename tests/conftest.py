import os

import pytest
import torch

os.environ.setdefault("SALIENCYLAB_PROGRESS", "0")

from zoo import ColourNet, PatchMeanModel, PatchModel, RegionModel, SmallCNN, make_small_cnn  # noqa: F401  (the shared zoo)


@pytest.fixture
def one_thread():
    """Tiny double-precision models run far faster on one thread, above all on a busy machine
    (use with `pytestmark = pytest.mark.usefixtures("one_thread")`)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def small_cnn():
    return make_small_cnn()


@pytest.fixture
def images():
    torch.manual_seed(1)
    return torch.randn(3, 3, 12, 12)


@pytest.fixture
def model64():
    """The zoo's small CNN in float64: oracle comparisons (Captum, slow references) to 1e-10."""
    return make_small_cnn(dtype=torch.float64)


@pytest.fixture
def x64():
    torch.manual_seed(1)
    return torch.randn(3, 3, 12, 12, dtype=torch.float64)
