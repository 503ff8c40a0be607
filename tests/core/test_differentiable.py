"""create_graph=True: maps whose gradient with respect to the parameters is the true one.

On a tiny float64 CNN with smooth activations (no kinks for finite differences to straddle), the
autograd gradient of a loss on the maps with respect to a convolution's weight must equal central
finite differences, for every differentiable method of this family and for CAMs at a layer of the
input's resolution and at a coarser one (upsampled). The call keeps the caller's train mode and
requires_grad flags and leaves no hook behind; non-differentiable methods refuse.
"""

import pytest
import torch
from torch import nn

import saliencylab as sl
from zoo import SmoothToy as Toy, central_differences

TARGETS = [0, 2]


CASES = [
    ("gradient", {}),
    ("input_x_gradient", {"batch_size": 1}),
    ("integrated_gradients", {"steps": 4}),
    ("integrated_gradients", {"steps": 3, "baseline": "blur", "batch_size": 5}),
    ("gradcam", {"layer": "conv2"}),  # a 3x3 layer map, upsampled to 6x6
    ("gradcam", {"layer": "act1", "relu": False}),  # at the input's resolution
    ("gradcam", {}),  # the default layer, found per call
    ("gradcam_plus_plus", {"layer": "conv2", "relu": False}),
    ("gradcam_plus_plus", {"layer": "act1"}),
    ("layercam", {"layer": "conv2"}),
    ("layercam", {"layer": "act1", "batch_size": 1}),
]


@pytest.fixture
def images():
    g = torch.Generator().manual_seed(1)
    return torch.randn(2, 2, 6, 6, generator=g, dtype=torch.float64)


def maps_of(model, x, name, params, create_graph):
    return sl.explain(model, x, name, target=TARGETS, create_graph=create_graph, **params).maps


@pytest.mark.parametrize("name,params", CASES, ids=[f"{n}-{'-'.join(map(str, p.values()))}" for n, p in CASES])
def test_parameter_gradient_matches_finite_differences(images, name, params):
    model = Toy().double().train()
    weight = model.conv1.weight
    w = torch.randn(images.shape[0], *images.shape[-2:], generator=torch.Generator().manual_seed(2),
                    dtype=torch.float64)
    maps = maps_of(model, images, name, params, create_graph=True)
    assert maps.requires_grad and maps.shape == (2, 6, 6)
    (grad,) = torch.autograd.grad((maps * w).sum(), weight)
    assert grad.abs().max() > 0

    # Central differences on 18 of the 54 weights (fixed at random: every output and input channel).
    entries, fd = central_differences(lambda: (maps_of(model, images, name, params, False) * w).sum(), weight, 18)
    torch.testing.assert_close(grad.reshape(-1)[entries], fd, rtol=1e-4, atol=1e-7 * float(fd.abs().max()))


def hooks(model):
    return sum(len(getattr(m, d)) for m in model.modules()
               for d in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks"))


@pytest.mark.parametrize("name", ["gradient", "integrated_gradients", "gradcam", "layercam"])
def test_caller_mode_and_flags_are_kept(images, name):
    model = Toy().double().train()
    model.conv2.bias.requires_grad_(False)  # the caller froze one parameter: it stays frozen
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    e = sl.explain(model, images, name, target=TARGETS, create_graph=True, steps=3) if name == "integrated_gradients" \
        else sl.explain(model, images, name, target=TARGETS, create_graph=True)
    assert model.training and all(m.training for m in model.modules())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert hooks(model) == 0
    (e.maps ** 2).sum().backward()
    assert model.conv1.weight.grad is not None and model.conv2.bias.grad is None
    # An eval-mode caller stays in eval mode.
    model.eval()
    sl.explain(model, images, name, target=TARGETS, create_graph=True)
    assert not model.training and hooks(model) == 0


def test_lowres_keeps_the_graph_and_plain_calls_detach(images):
    model = Toy().double()
    e = sl.explain(model, images, "gradcam", layer="conv2", create_graph=True)
    assert e.lowres.shape == (2, 3, 3) and e.lowres.requires_grad
    plain = sl.explain(model, images, "gradcam", layer="conv2")
    assert not plain.maps.requires_grad and not plain.lowres.requires_grad
    torch.testing.assert_close(plain.lowres, e.lowres.detach())
    torch.testing.assert_close(plain.maps, e.maps.detach())


@pytest.mark.parametrize("name", ["occlusion", "smoothgrad", "guided_backprop", "fullgrad", "rise"])
def test_non_differentiable_methods_refuse(images, name):
    with pytest.raises(sl.ConfigError, match="not differentiable"):
        sl.explain(Toy().double(), images, name, create_graph=True)
