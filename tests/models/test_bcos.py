"""B-cos layers against the formula written out slowly, the input encoding, the small CNN, the colours."""

import math

import pytest
import torch
import torch.nn.functional as F

import saliencylab as sl
from saliencylab.models.bcos import AddInverse, BcosCNN, BcosConv2d, BcosLinear, gradient_to_image

pytestmark = pytest.mark.usefixtures("one_thread")


def slow_bcos_conv(layer, x):
    """out[o] = max over the MaxOut group of (w_hat . p), times |cos(p, w_hat_max)|^(b - 1), one output
    position at a time on the zero-padded input (unit-norm filters, no bias, no stabilisers)."""
    w = layer.linear.weight.detach()
    k, s, pad, M, b = layer.kernel_size, layer.stride, layer.padding, layer.max_out, layer.b
    xp = F.pad(x, (pad, pad, pad, pad))
    B, _, H, W = xp.shape
    Ho, Wo = (H - k) // s + 1, (W - k) // s + 1
    out = torch.zeros(B, layer.out_channels, Ho, Wo, dtype=x.dtype)
    for n in range(B):
        for i in range(Ho):
            for j in range(Wo):
                p = xp[n, :, i * s:i * s + k, j * s:j * s + k].reshape(-1)
                for o in range(layer.out_channels):
                    dots = []
                    for m in range(M):
                        v = w[o * M + m].reshape(-1)
                        dots.append(float(v @ p) / float(v.norm()))
                    d = max(dots)
                    cos = d / float(p.norm())
                    out[n, o, i, j] = abs(cos) ** (b - 1) * d
    return out


@pytest.mark.parametrize("b, max_out, stride, padding", [(2, 1, 1, 1), (2, 2, 2, 1), (1.5, 3, 1, 0), (1, 2, 1, 1)])
def test_conv_matches_the_formula(b, max_out, stride, padding):
    torch.manual_seed(0)
    layer = BcosConv2d(4, 3, 3, stride=stride, padding=padding, b=b, max_out=max_out).double()
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64)
    out = layer(x)
    expected = slow_bcos_conv(layer, x)
    assert out.shape == expected.shape
    scale = float(expected.abs().max())
    # the only differences: the authors' stabilisers (+1e-6 under the patch norm's root and on |cos|)
    assert torch.allclose(out, expected, rtol=1e-4, atol=1e-5 * scale), float((out - expected).abs().max())


def test_linear_matches_the_formula_and_maxout():
    torch.manual_seed(1)
    layer = BcosLinear(5, 3, b=2, max_out=2).double()
    x = torch.randn(4, 5, dtype=torch.float64)
    w = layer.linear.weight.detach()
    w_hat = w / w.norm(dim=1, keepdim=True)
    dots = (x @ w_hat.T).reshape(4, 3, 2).max(dim=2).values  # MaxOut: consecutive pairs
    expected = (dots / x.norm(dim=1, keepdim=True)).abs() * dots
    assert torch.allclose(layer(x), expected, rtol=1e-9, atol=1e-12)
    # weights are normalised in the forward: scaling a filter changes nothing
    with torch.no_grad():
        layer.linear.weight.mul_(7.0)
    assert torch.allclose(layer(x), expected, rtol=1e-9, atol=1e-12)


def test_explanation_mode_keeps_values_and_makes_the_layer_linear():
    torch.manual_seed(2)
    layer = BcosConv2d(3, 4, 3, padding=1, max_out=2).double()
    x = torch.rand(1, 3, 5, 5, dtype=torch.float64, requires_grad=True)
    plain = layer(x)
    layer.set_explanation_mode(True)
    out = layer(x)
    assert torch.equal(plain, out)
    # in explanation mode each output is W(x) . x exactly: input x gradient sums to it
    g = torch.autograd.grad(out[0, 1, 2, 3], x)[0]
    assert torch.allclose((g * x).sum(), out[0, 1, 2, 3], rtol=1e-12)
    # ...which the plain gradient (through the scale) does not give unit by unit
    layer.set_explanation_mode(False)
    g_plain = torch.autograd.grad(layer(x)[0, 1, 2, 3], x)[0]
    assert not torch.allclose(g_plain, g)
    # forward_linearised(z, x) is that linear map applied to any z
    z = torch.randn_like(x).requires_grad_(True)
    lin = layer.forward_linearised(z, x.detach())
    assert torch.allclose(torch.autograd.grad(lin[0, 1, 2, 3], z)[0], g, rtol=1e-12)
    assert torch.allclose(layer.forward_linearised(x, x), plain, rtol=1e-12)


def test_add_inverse():
    x = torch.rand(2, 3, 4, 4)
    y = AddInverse()(x)
    assert y.shape == (2, 6, 4, 4)
    assert torch.equal(y[:, :3], x) and torch.equal(y[:, 3:], 1 - x)
    assert AddInverse()(x[0]).shape == (6, 4, 4)  # a single (C, H, W) image too


@pytest.mark.parametrize("size", [32, 64])
def test_cnn_shapes_and_named_layers(size):
    model = BcosCNN(num_classes=3, width=8)
    x = torch.rand(2, 3, size, size)
    assert model(x).shape == (2, 3)
    assert isinstance(model.features, BcosConv2d)
    assert not any(getattr(m, "bias", None) is not None and isinstance(getattr(m, "bias"), torch.Tensor)
                   for m in model.modules())  # no biases anywhere
    assert model.logit.bias == pytest.approx(-math.log(2))  # the authors' -log(K - 1)
    e = sl.explain(model, x, "gradcam", layer="features")  # a layer for Grad-CAM
    assert e.maps.shape == (2, size, size) and e.lowres.shape == (2, size // 4, size // 4)


def test_cnn_trains_on_a_toy_task():
    """Bright square top-left (class 1) or bottom-right (class 0): the loss drops within 40 steps."""
    torch.manual_seed(0)
    n, S = 128, 32
    y = torch.randint(0, 2, (n,))
    x = torch.rand(n, 3, S, S) * 0.3
    x[y == 1, :, 4:12, 4:12] += 0.6
    x[y == 0, :, 20:28, 20:28] += 0.6
    model = BcosCNN(2, width=8)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for step in range(40):
        idx = torch.arange(step * 32, step * 32 + 32) % n
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss))
    assert losses[0] == pytest.approx(math.log(2), abs=0.01)  # tiny logits at initialisation
    assert sum(losses[-5:]) / 5 < 0.3, losses
    with torch.no_grad():
        assert (model(x).argmax(1) == y).float().mean() > 0.9


def test_gradient_to_image():
    torch.manual_seed(3)
    image = AddInverse()(torch.rand(2, 3, 8, 8))
    weights = torch.randn(2, 6, 8, 8)
    weights[0, :, 0, 0] = torch.tensor([1.0, 0, 0, 0, 1, 1])  # red: r weighted, g and b inverted
    image[0, :, 0, 0] = torch.tensor([1.0, 0, 0, 0, 1, 1])  # a red pixel: contribution 3 > 0
    rgba = gradient_to_image(image, weights, smooth=0, alpha_percentile=100)
    assert rgba.shape == (2, 4, 8, 8) and rgba.min() >= 0 and rgba.max() <= 1
    assert torch.allclose(rgba[0, :3, 0, 0], torch.tensor([1.0, 0, 0]), atol=1e-6)
    negative = (image * weights).sum(1) < 0
    assert (rgba[:, 3][negative] < 1e-6).all()  # only positive contributions are shown
    alpha = weights.norm(dim=1) * ~negative
    assert torch.allclose(rgba[1, 3], alpha[1] / alpha[1].max(), atol=1e-6)
    # batched equals one image at a time, and the smoothing keeps the size
    one = gradient_to_image(image[1], weights[1])
    assert one.shape == (4, 8, 8) and torch.allclose(gradient_to_image(image, weights)[1], one)
    with pytest.raises(ValueError, match="6, H, W"):
        gradient_to_image(image[:, :3], weights[:, :3])
