"""Grad-CAM, Grad-CAM++ and LayerCAM: captum agreement, loop references, ViT tokens, NHWC, batching, targets."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from saliencylab.core.errors import ConfigError
from saliencylab.core.layers import find_default_layer
from saliencylab.methods import build
from saliencylab.core.session import ModelSession
from saliencylab.core.targets import resolve_target
from zoo import sequential_cnn


def small_cnn(seed=0):
    return sequential_cnn(seed, third_conv=True, dtype=torch.float64)


LAYER = "6"  # the last convolution: a (B, 8, 6, 6) map for 12x12 inputs


@pytest.fixture
def images():
    torch.manual_seed(0)
    return torch.randn(4, 3, 12, 12, dtype=torch.float64)


def acts_and_grads(model, layer, x, targets):
    """Reference activations and gradients, with plain autograd and no saliencylab code."""
    store = {}

    def hook(module, args, output):
        output.retain_grad()
        store["a"] = output

    handle = dict(model.named_modules())[layer].register_forward_hook(hook)
    try:
        out = model(x.clone().requires_grad_(True))
        out.gather(1, torch.as_tensor(targets)[:, None]).sum().backward()
    finally:
        handle.remove()
    return store["a"].detach(), store["a"].grad.detach()


def gradcam_pp_loops(A, G):
    B, C, h, w = A.shape
    cam = torch.zeros(B, h, w, dtype=A.dtype)
    for b in range(B):
        for c in range(C):
            s = A[b, c].sum()
            weight = 0.0
            for i in range(h):
                for j in range(w):
                    g = G[b, c, i, j]
                    denom = 2 * g**2 + s * g**3
                    alpha = g**2 / denom if denom != 0 else 0.0
                    weight = weight + alpha * max(float(g), 0.0)
            cam[b] += weight * A[b, c]
    return cam.clamp(min=0)


def layercam_loops(A, G):
    B, C, h, w = A.shape
    cam = torch.zeros(B, h, w, dtype=A.dtype)
    for b in range(B):
        for c in range(C):
            cam[b] += G[b, c].clamp(min=0) * A[b, c]
    return cam.clamp(min=0)


def positive_gradcam_loops(A, G):
    B, C, h, w = A.shape
    cam = torch.zeros(B, h, w, dtype=A.dtype)
    for b in range(B):
        for c in range(C):
            cam[b] += G[b, c].clamp(min=0).mean() * A[b, c]
    return cam.clamp(min=0)


@pytest.mark.parametrize("relu", [True, False])
def test_gradcam_matches_captum(images, relu):
    from captum.attr import LayerAttribution, LayerGradCam

    model = small_cnn()
    targets = [1, 0, 4, 2]
    e = build("gradcam", model, layer=LAYER, relu=relu).explain(images, targets)
    ours = e.maps
    captum = LayerGradCam(model, dict(model.named_modules())[LAYER])
    low = captum.attribute(images, target=targets, relu_attributions=relu).detach()
    up = LayerAttribution.interpolate(low, tuple(images.shape[-2:]), interpolate_mode="bilinear")
    assert ours.shape == (4, 12, 12) and e.lowres.shape == (4, 6, 6)
    assert torch.allclose(e.lowres, low[:, 0], atol=1e-5, rtol=0)
    assert torch.allclose(ours, up[:, 0], atol=1e-5, rtol=0)
    assert (ours < 0).any() != relu  # the signed map keeps negative evidence
    assert e.extras["layer"] == LAYER and e.to_dict()["layer"] == LAYER


def test_gradcam_plus_plus_and_layercam_match_loop_references(images):
    model = small_cnn()
    targets = [3, 3, 0, 1]
    A, G = acts_and_grads(model, LAYER, images, targets)
    for name, reference in (("gradcam_plus_plus", gradcam_pp_loops), ("layercam", layercam_loops)):
        e = build(name, model, layer=LAYER).explain(images, targets)
        expected = reference(A, G)
        assert expected.abs().max() > 0
        assert torch.allclose(e.lowres, expected, atol=1e-10), name
        assert torch.allclose(e.maps, F.interpolate(expected[:, None], size=(12, 12), mode="bilinear")[:, 0])


def test_positive_gradients_variant(images):
    model = small_cnn()
    A, G = acts_and_grads(model, LAYER, images, [2] * 4)
    positive = build("gradcam", model, layer=LAYER, positive_gradients=True).explain(images, 2)
    assert torch.allclose(positive.lowres, positive_gradcam_loops(A, G), atol=1e-10)
    plain = build("gradcam", model, layer=LAYER).explain(images, 2)
    assert not torch.allclose(plain.lowres, positive.lowres)


@pytest.mark.parametrize("name", ["gradcam", "gradcam_plus_plus", "layercam"])
def test_batch_size_and_targets(images, name):
    model = small_cnn()
    targets = [4, 1, 1, 0]
    full = build(name, model, layer=LAYER, batch_size=4).attribute(images, targets)
    one = build(name, model, layer=LAYER, batch_size=1).attribute(images, targets)
    three = build(name, model, layer=LAYER, batch_size=3).attribute(images, targets)
    assert torch.allclose(full, one, atol=1e-12) and torch.allclose(full, three, atol=1e-12)
    # A per-image target list explains each image's own class.
    for i, t in enumerate(targets):
        single = build(name, model, layer=LAYER).attribute(images[i : i + 1], t)
        assert torch.allclose(full[i], single[0], atol=1e-12)


def test_callable_target(images):
    model = small_cnn()
    by_class = build("gradcam", model, layer=LAYER).attribute(images, 3)
    e = build("gradcam", model, layer=LAYER, batch_size=3).explain(images, lambda out: out[:, 3])
    assert torch.allclose(by_class, e.maps, atol=1e-12)
    assert e.targets is None and e.outputs.shape == (4, 5)


def test_default_layer_on_a_cnn(images):
    model = small_cnn()
    method = build("gradcam", model)
    e = method.explain(images)
    assert e.extras["layer"] == "7"  # the ReLU after the last convolution
    explicit = build("gradcam", model, layer="7").attribute(images)
    assert torch.allclose(e.maps, explicit)
    assert torch.equal(e.targets, model(images).argmax(1))
    # found per call: one probe (1 forward + 1 backward image) on top of one pass per image, every call
    assert e.cost.forward_images == 4 + 1 and e.cost.backward_images == 4 + 1
    assert method.explain(images).cost.forward_images == 5


def test_layer_errors(images):
    model = small_cnn()
    with pytest.raises(ConfigError, match="no layer named"):
        build("gradcam", model, layer="blocks.99")
    with pytest.raises(ConfigError, match="channels"):
        build("layercam", model, layer=LAYER).attribute(images, channels=True)
    with pytest.raises(ConfigError, match="spatial"):
        build("gradcam", model, layer="10").attribute(images)  # the Linear head: (B, 5)
    with pytest.raises(ConfigError, match="one layer"):
        build("gradcam", model, layer=["6", "7"])
    with pytest.raises(ConfigError, match="not a submodule"):
        build("gradcam", model, layer=nn.Conv2d(8, 8, 3))
    # a module of the model is named by its dotted path
    by_module = build("gradcam", model, layer=model[6]).explain(images)
    assert by_module.extras["layer"] == LAYER
    assert torch.equal(by_module.maps, build("gradcam", model, layer=LAYER).attribute(images))


class ResidualInplace(nn.Module):
    """torchvision-style block: the BatchNorm output is modified in place by `+=` and ReLU(inplace)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(2)
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)
        self.relu = nn.ReLU(inplace=True)
        self.fc = nn.Linear(3, 4)

    def forward(self, x):
        out = self.bn(self.conv(x))
        out += x
        out = self.relu(out)
        return self.fc(out.mean((2, 3)))


def test_layer_followed_by_inplace_ops(images):
    model = ResidualInplace().double().eval()
    # Capturing `bn` must not hand the model a leaf it then modifies in place; the map equals a hand
    # computation from the bn output and its gradient.
    with torch.no_grad():
        A = model.bn(model.conv(images))
    A.requires_grad_(True)
    score = model.fc(torch.relu(A + images).mean((2, 3)))[:, 1].sum()
    (G,) = torch.autograd.grad(score, A)
    expected = (G.mean((2, 3), keepdim=True) * A).sum(1).clamp(min=0).detach()
    e = build("gradcam", model, layer="bn").explain(images, 1)
    assert torch.allclose(e.lowres, expected, atol=1e-12)


class ChannelsLast(nn.Module):
    """Conv stem, then a channels-last stage (B, h, w, C) as in Swin or ConvNeXt."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(4)
        self.stem = nn.Conv2d(3, 8, 3, stride=3)
        self.to_nhwc = Permute()
        self.mix = nn.Linear(8, 8)
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        t = self.mix(self.to_nhwc(self.stem(x)))  # (B, 4, 4, 8)
        return self.head(torch.relu(t).mean((1, 2)))


class Permute(nn.Module):
    def forward(self, x):
        return x.permute(0, 2, 3, 1)


def test_channels_last_layer(images):
    model = ChannelsLast().double()
    nhwc = build("gradcam", model, layer="to_nhwc").explain(images, 2)
    b = build("gradcam", model, layer="stem").attribute(images, 2)
    assert nhwc.lowres.shape == (4, 4, 4)
    assert torch.allclose(nhwc.maps, b, atol=1e-12) and b.abs().max() > 0
    A, G = acts_and_grads(model, "mix", images, [2] * 4)
    A, G = A.permute(0, 3, 1, 2), G.permute(0, 3, 1, 2)
    e = build("layercam", model, layer="mix").explain(images, 2)
    assert torch.allclose(e.lowres, layercam_loops(A, G), atol=1e-12)


class Block(nn.Module):
    def __init__(self, d, heads=2):
        super().__init__()
        self.norm1 = nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))

    def forward(self, x):
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class TinyViT(nn.Module):
    """16x16 input, 4x4 patches: 16 patch tokens plus a class token; the head reads the class token."""

    def __init__(self, d=16, classes=5):
        super().__init__()
        torch.manual_seed(5)
        self.patch = nn.Conv2d(3, d, 4, stride=4)
        self.cls = nn.Parameter(torch.randn(1, 1, d) * 0.1)
        self.pos = nn.Parameter(torch.randn(1, 17, d) * 0.1)
        self.blocks = nn.Sequential(Block(d), Block(d))
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, classes)

    def forward(self, x):
        t = self.patch(x).flatten(2).transpose(1, 2)
        t = torch.cat([self.cls.expand(len(t), -1, -1), t], 1) + self.pos
        t = self.norm(self.blocks(t))
        return self.head(t[:, 0])


def test_vit_tokens():
    model = TinyViT().double()
    torch.manual_seed(6)
    x = torch.randn(3, 3, 16, 16, dtype=torch.float64)
    with ModelSession(model) as session:
        probe = resolve_target(None, model(x[:1]))
        default = find_default_layer(session, x[:1], probe)
    assert default not in ("norm", "blocks.1", "blocks")  # their patch tokens get no gradient
    e = build("gradcam", model).explain(x)
    assert e.extras["layer"] == default == "blocks.1.norm1"
    assert e.maps.shape == (3, 16, 16) and e.lowres.shape == (3, 4, 4)
    assert (e.lowres.flatten(1).abs().amax(1) > 0).all()
    # An explicit token layer, checked against the formula on the patch tokens (class token dropped).
    e = build("gradcam", model, layer="blocks.0", relu=False).explain(x, [0, 1, 2])
    A, G = acts_and_grads(model, "blocks.0", x, [0, 1, 2])
    A, G = [t[:, 1:].transpose(1, 2).reshape(3, 16, 4, 4) for t in (A, G)]
    expected = (G.mean((2, 3), keepdim=True) * A).sum(1)
    assert torch.allclose(e.lowres, expected, atol=1e-12)
    # The final norm's map is all zeros: the reason it must not be the default.
    final = build("gradcam", model, layer="norm", relu=False).explain(x)
    assert final.lowres.abs().max() == 0


def test_default_layer_with_inplace_relu_after_the_first_conv(images):
    # VGG-style: the first convolution's output is modified in place by ReLU(inplace=True).
    torch.manual_seed(7)
    model = nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(inplace=True),
        nn.Conv2d(6, 6, 3, padding=1), nn.ReLU(inplace=True),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 3),
    ).double()
    e = build("gradcam", model).explain(images)
    assert e.extras["layer"] in ("2", "3") and e.maps.shape == (4, 12, 12)
