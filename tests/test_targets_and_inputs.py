"""Bad input gets one clear error naming the problem."""

import numpy as np
import pytest
import torch

import saliencylab as sl
from saliencylab.baselines import gaussian_blur, make_baseline
from saliencylab.core.layers import get_layer, to_grid


def test_target_out_of_range(small_cnn, images):
    with pytest.raises(sl.InputError, match="target 7 is out of range for a model with 5 outputs"):
        sl.explain(small_cnn, images, "gradient", target=7)
    with pytest.raises(sl.InputError, match="out of range"):
        sl.explain(small_cnn, images, "integrated_gradients", target=[0, 1, -1], steps=2)


def test_target_count_and_type(small_cnn, images):
    with pytest.raises(sl.InputError, match="got 2 targets for 3 images"):
        sl.explain(small_cnn, images, "gradient", target=[0, 1])
    with pytest.raises(sl.InputError, match="integers"):
        sl.explain(small_cnn, images, "gradient", target=torch.tensor([0.5, 1.0, 2.0]))
    with pytest.raises(sl.InputError, match="one score per image"):
        sl.explain(small_cnn, images, "gradient", target=lambda out: out)


@pytest.mark.parametrize("bad,message", [
    (np.zeros((1, 3, 8, 8), dtype=np.float32), "torch.Tensor.*torch.from_numpy"),
    (torch.zeros(3, 8, 8), "add a batch dimension"),
    (torch.zeros(1, 1, 3, 8, 8), r"shape \(B, C, H, W\)"),
    (torch.zeros(1, 3, 8, 8, dtype=torch.uint8), "floating point"),
    (torch.zeros(0, 3, 8, 8), "empty"),
])
def test_bad_images(small_cnn, bad, message):
    with pytest.raises(sl.InputError, match=message):
        sl.explain(small_cnn, bad, "gradient")


def test_nan_images_named_by_index(small_cnn, images):
    images[2, 0, 1, 1] = float("nan")
    with pytest.raises(sl.InputError, match=r"NaN.*image index 2"):
        sl.explain(small_cnn, images, "gradient")


def test_unknown_method_parameter_and_layer(small_cnn, images):
    with pytest.raises(sl.ConfigError, match="unknown method 'integrated_gradient'.*integrated_gradients"):
        sl.explain(small_cnn, images, "integrated_gradient")
    with pytest.raises(sl.ConfigError, match="unknown parameter 'stepz'.*steps"):
        sl.explain(small_cnn, images, "integrated_gradients", stepz=3)
    with pytest.raises(sl.ConfigError, match="no layer named 'conv3'.*conv1|conv2"):
        get_layer(small_cnn, "conv3")
    with pytest.raises(sl.ConfigError, match="integration rule"):
        sl.explain(small_cnn, images, "integrated_gradients", rule="simpson")
    with pytest.raises(sl.ConfigError, match="batch_size"):
        sl.explain(small_cnn, images, "gradient", batch_size=0)
    with pytest.raises(sl.ConfigError, match="unknown baseline"):
        sl.explain(small_cnn, images, "integrated_gradients", baseline="grey")


def test_baseline_shapes_and_blur():
    x = torch.randn(2, 3, 16, 16)
    for spec in ["zero", "mean", "blur", "uniform", 1.0, torch.zeros(3, 1, 1)]:
        b = make_baseline(spec)(x)
        assert b.shape == x.shape and torch.isfinite(b).all()
    with pytest.raises(sl.InputError, match="cannot be broadcast"):
        make_baseline(torch.zeros(4, 1, 1))(x)
    # blur keeps a constant image constant and conserves the mean of a smooth image's interior
    const = torch.full((1, 1, 9, 9), 2.0)
    torch.testing.assert_close(gaussian_blur(const, 3.0), const)
    # a blurred impulse is the (normalized) 2D Gaussian: symmetric, peaked at the centre
    imp = torch.zeros(1, 1, 21, 21)
    imp[0, 0, 10, 10] = 1
    out = gaussian_blur(imp, 2.0)[0, 0]
    assert out.argmax() == 10 * 21 + 10 and torch.allclose(out, out.T) and torch.allclose(out, out.flip(0))
    r = torch.arange(21.0) - 10
    g = torch.exp(-0.5 * (r / 2.0) ** 2) * (r.abs() <= 6)  # kernel truncated at ceil(3 sigma)
    expected = torch.outer(g, g) / (g.sum() ** 2)
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)


def test_to_grid_layouts():
    nchw = torch.randn(2, 8, 7, 7)
    assert to_grid(nchw, (224, 224)).shape == (2, 8, 7, 7)
    nhwc = torch.randn(2, 7, 7, 96)
    torch.testing.assert_close(to_grid(nhwc, (224, 224)), nhwc.permute(0, 3, 1, 2))
    tokens = torch.randn(2, 1 + 196, 64)  # class token + 14x14 patches
    g = to_grid(tokens, (224, 224))
    assert g.shape == (2, 64, 14, 14)
    torch.testing.assert_close(g[:, :, 0, 1], tokens[:, 2])
    assert to_grid(torch.randn(1, 4 + 6 * 8, 5), (60, 80)).shape == (1, 5, 6, 8)  # 4 register tokens
