"""FullGrad: completeness of the decomposition, the reference saliency, batching and in-place safety."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from saliencylab.methods import build
from saliencylab.methods.fullgrad import FullGradients, full_gradients
from saliencylab.core.session import ModelSession


def bias_net(seed=0, inplace=False):
    """Piecewise linear with biases everywhere: conv+bias, BN (eval, non-trivial stats), ReLU, avg pool, linear."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(inplace=inplace),
        nn.Conv2d(6, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8, affine=False), nn.ReLU(inplace=inplace),
        nn.AvgPool2d(2),
        nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(inplace=inplace),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 4),
    ).double()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
            if m.affine:
                with torch.no_grad():
                    m.weight.uniform_(0.5, 1.5)
                    m.bias.uniform_(-0.5, 0.5)
    return model.eval()


@pytest.fixture
def images():
    torch.manual_seed(1)
    return torch.randn(3, 3, 8, 8, dtype=torch.float64)


def test_completeness(images):
    model = bias_net()
    targets = torch.tensor([0, 3, 2])
    terms = full_gradients(model, images, targets)
    assert isinstance(terms, FullGradients)
    # conv, bn, (conv without bias: none), bn, conv, linear, linear
    assert terms.layers == ["0", "1", "4", "7", "11", "13"]
    per_image = (terms.input_gradient * images).flatten(1).sum(1)
    for bias_grad in terms.bias_gradients:
        per_image = per_image + bias_grad.flatten(1).sum(1)
    logits = model(images).gather(1, targets[:, None])[:, 0]
    assert torch.allclose(per_image, logits, atol=1e-4, rtol=0)
    assert torch.allclose(terms.outputs, model(images))
    # Biases matter here: the input-gradient term alone is far from the logit.
    assert ((terms.input_gradient * images).flatten(1).sum(1) - logits).abs().max() > 1e-2
    assert all(p.requires_grad for p in model.parameters())  # the session restored the model


def test_completeness_with_inplace_ops(images):
    a = full_gradients(bias_net(inplace=True), images, 1)
    b = full_gradients(bias_net(inplace=False), images, 1)
    assert torch.allclose(a.input_gradient, b.input_gradient, atol=1e-12)
    for x, y in zip(a.bias_gradients, b.bias_gradients):
        assert torch.allclose(x, y, atol=1e-12)


def reference_saliency(model, x, targets):
    """The authors' FullGrad saliency, transcribed with retain_grad hooks instead of saliencylab code."""
    outs, biases = [], []

    def hook(module, args, output):
        if isinstance(module, nn.BatchNorm2d):
            gamma = module.weight if module.affine else torch.ones_like(module.running_mean)
            beta = module.bias if module.affine else torch.zeros_like(module.running_mean)
            biases.append(beta - module.running_mean * gamma / torch.sqrt(module.running_var + module.eps))
        elif module.bias is not None:
            biases.append(module.bias)
        else:
            return
        output.retain_grad()
        outs.append(output)

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.BatchNorm2d))]
    try:
        x = x.clone().requires_grad_(True)
        model(x).gather(1, targets[:, None]).sum().backward()
    finally:
        for h in handles:
            h.remove()

    def post(t, eps=1e-6):
        t = t.abs()
        t = t - t.flatten(1).min(1)[0].view(-1, 1, 1, 1)
        return t / (t.flatten(1).max(1)[0].view(-1, 1, 1, 1) + eps)

    cam = post(x.grad * x).sum(1)
    for out, b in zip(outs, biases):
        bias_grad = out.grad * b.view(1, -1, 1, 1)
        cam = cam + F.interpolate(post(bias_grad), size=x.shape[-2:], mode="bilinear", align_corners=True).sum(1)
    return cam.detach()


def test_saliency_matches_reference(images):
    model = bias_net()
    targets = torch.tensor([2, 2, 0])
    e = build("fullgrad", model).explain(images, targets)
    maps = e.maps
    expected = reference_saliency(model, images, targets)
    assert maps.shape == (3, 8, 8)
    assert torch.allclose(maps, expected, atol=1e-10)
    assert (maps >= 0).all()
    assert torch.equal(e.targets, targets)


def test_batch_size_and_targets(images):
    model = bias_net()
    full = build("fullgrad", model, batch_size=3).attribute(images, [1, 0, 3])
    one = build("fullgrad", model, batch_size=1).attribute(images, [1, 0, 3])
    assert torch.allclose(full, one, atol=1e-12)
    single = build("fullgrad", model).attribute(images[1:2], 0)
    assert torch.allclose(full[1], single[0], atol=1e-12)
    e = build("fullgrad", model, batch_size=2).explain(images, lambda out: out[:, 3])
    assert torch.allclose(e.maps, build("fullgrad", model).attribute(images, 3), atol=1e-12)
    assert e.targets is None and e.outputs.shape == (3, 4)


def test_full_gradients_in_an_open_session(images):
    model = bias_net()
    with ModelSession(model) as session:
        terms = full_gradients(session, images, None)
        assert session.cost.forward_images == 3 and session.cost.backward_images == 3
    assert torch.equal(terms.target.classes, model(images).argmax(1))
    assert not any(m._forward_hooks for m in model.modules())
