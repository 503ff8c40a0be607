"""Guided backprop: agreement with captum, ReLU6, reused and in-place ReLUs, refusal without ReLU modules."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from saliencylab.core.errors import ConfigError
from saliencylab.methods import build
from zoo import sequential_cnn


def small_cnn(act=nn.ReLU, inplace=False, seed=0):
    return sequential_cnn(seed, third_conv=True, act=act, inplace=inplace, dtype=torch.float64)


class ReusedReLU(nn.Module):
    """One nn.ReLU module called twice per forward pass."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.c1 = nn.Conv2d(3, 6, 3, padding=1)
        self.c2 = nn.Conv2d(6, 6, 3, padding=1)
        self.fc = nn.Linear(6, 4)
        self.act = nn.ReLU()

    def forward(self, x):
        x = self.act(self.c2(self.act(self.c1(x))))
        return self.fc(x.mean((2, 3)))


class SeparateReLU(ReusedReLU):
    def __init__(self):
        super().__init__()
        self.act2 = nn.ReLU()

    def forward(self, x):
        x = self.act2(self.c2(self.act(self.c1(x))))
        return self.fc(x.mean((2, 3)))


@pytest.fixture
def images():
    torch.manual_seed(0)
    return torch.randn(4, 3, 8, 8, dtype=torch.float64)


@pytest.mark.filterwarnings("ignore:Setting backward hooks")
def test_matches_captum_guided_backprop(images):
    from captum.attr import GuidedBackprop as CaptumGB

    model = small_cnn()
    targets = [0, 3, 1, 4]
    ours = build("guided_backprop", model).attribute(images, targets, channels=True)
    theirs = CaptumGB(model).attribute(images.clone().requires_grad_(True), target=targets)
    assert ours.shape == images.shape
    assert torch.allclose(ours, theirs.detach(), atol=1e-5, rtol=0)
    # Guided backprop differs from the plain gradient on this network.
    plain = build("gradient", model).attribute(images, targets, channels=True)
    assert (ours - plain).abs().max() > 1e-3


def test_summed_channels_and_batches(images):
    model = small_cnn()
    method = build("guided_backprop", model)
    e = method.explain(images, channels=True)
    full = e.maps
    assert torch.allclose(method.attribute(images), full.sum(1))
    one = build("guided_backprop", model, batch_size=1).attribute(images)
    assert torch.allclose(one, full.sum(1), atol=1e-12)
    assert torch.equal(e.targets, model(images).argmax(1))
    assert not any(m._forward_hooks for m in model.modules())  # the scope removed the guided hooks


def test_relu6_clamps_gradients_by_hand():
    # One hidden ReLU6 layer: guided gradient = W1^T (1[0 < h < 6] * relu(w2)), computed by hand.
    torch.manual_seed(3)
    lin1, lin2 = nn.Linear(12, 7), nn.Linear(7, 1)
    with torch.no_grad():
        lin1.weight.mul_(12)
    model = nn.Sequential(nn.Flatten(), lin1, nn.ReLU6(), lin2).double()
    x = torch.randn(3, 3, 2, 2, dtype=torch.float64)
    ours = build("guided_backprop", model).attribute(x, 0, channels=True)
    h = lin1(x.flatten(1))
    assert ((h > 6).any() and (h < 0).any()), "the test needs both saturation regions"
    mask = ((h > 0) & (h < 6)).double()
    expected = (mask * lin2.weight[0].clamp(min=0)) @ lin1.weight
    assert torch.allclose(ours.flatten(1), expected.detach(), atol=1e-12)


def test_reused_relu_module_is_guided_on_every_call(images):
    reused, separate = ReusedReLU().double(), SeparateReLU().double()
    a = build("guided_backprop", reused).attribute(images, 2, channels=True)
    b = build("guided_backprop", separate).attribute(images, 2, channels=True)
    assert torch.allclose(a, b, atol=1e-12)


def test_inplace_relu_gives_the_same_maps(images):
    a = build("guided_backprop", small_cnn()).attribute(images, 1)
    b = build("guided_backprop", small_cnn(inplace=True)).attribute(images, 1)
    assert torch.allclose(a, b, atol=1e-12)


def test_model_without_relu_modules_is_refused(images):
    class Functional(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.fc = nn.Conv2d(3, 4, 3), nn.Linear(4, 2)

        def forward(self, x):
            return self.fc(F.relu(self.conv(x)).mean((2, 3)))

    model = Functional().double()
    with pytest.raises(ConfigError, match="nn.ReLU"):
        build("guided_backprop", model).attribute(images)
    assert not model.conv._forward_hooks  # the session cleaned up
