"""AttnLRP and CP-LRP (Achtibat et al. ICML 2024) against gradient x input of a hand-detached forward.

The reference forward is written out from the weights with the rules as detaches (rachtibat/
LRP-eXplains-Transformers, lxt/efficient/patches.py): LayerNorm's std detached, GELU as x * (gelu(x) / x)
detached, the products' factors with halved gradients (0.5 t + 0.5 t.detach()), the attention weights
detached for CP-LRP, and the epsilon rule as a detached rescaling of each linear output's gradient."""

import pytest
import torch
import torch.nn.functional as F

import saliencylab as sl
from saliencylab import methods
from saliencylab.models.vit import small_vit


def make_vit(reg_tokens=0, seed=0, bias_free=False, dtype=torch.float64):
    torch.manual_seed(seed)
    model = small_vit(num_classes=5, img_size=16, patch_size=4, dim=16, depth=3, heads=2, reg_tokens=reg_tokens)
    with torch.no_grad():
        for block in model.blocks:
            block.attn.qkv.weight.normal_(0, 0.5)  # sharper attention
        for name, p in model.named_parameters():
            if name.endswith("bias") or name in ("pos_embed", "cls_token", "reg_token"):
                p.zero_() if bias_free else p.normal_(0, 0.1)
    return model.eval().to(dtype)


@pytest.fixture
def images():
    return torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(5), dtype=torch.float64)


def hand_forward(model, x, cp, eps):
    """The modified forward, written out; returns logits and the (softmax input, output) pairs."""
    def linear(z):
        if eps:
            stab = z + eps * (z.sign() + (z == 0).to(z.dtype))
            z = z.detach() + (z - z.detach()) * (z / stab).detach()
        return z

    def half(t):
        return 0.5 * t + 0.5 * t.detach()

    def norm(layer, h):
        c = h - h.mean(-1, keepdim=True)
        std = ((c * c).mean(-1, keepdim=True) + layer.eps).sqrt()
        return c / std.detach() * layer.weight + layer.bias

    def gelu(h):
        ratio = torch.where(h != 0, F.gelu(h) / h, torch.zeros_like(h))
        return h * ratio.detach()

    pe = model.patch_embed.proj
    h = linear(F.conv2d(x, pe.weight, pe.bias, stride=pe.stride)).flatten(2).transpose(1, 2)
    B = h.shape[0]
    prefix = [model.cls_token] + ([model.reg_token] if model.reg_token is not None else [])
    h = torch.cat([t.expand(B, -1, -1) for t in prefix] + [h], dim=1) + model.pos_embed
    softmaxes = []
    for block in model.blocks:
        a = block.attn
        T, C = h.shape[1], h.shape[2]
        qkv = linear(F.linear(norm(block.norm1, h), a.qkv.weight, a.qkv.bias))
        q, k, v = qkv.reshape(B, T, 3, a.num_heads, a.head_dim).permute(2, 0, 3, 1, 4)
        if cp:
            A = torch.softmax(q @ k.transpose(-2, -1) * a.scale, dim=-1).detach()
            o = A @ v
        else:
            logits = (half(q) * a.scale) @ half(k).transpose(-2, -1)
            A = torch.softmax(logits, dim=-1)
            logits.retain_grad()
            A.retain_grad()
            softmaxes.append((logits, A))
            o = half(A) @ half(v)
        o = o.transpose(1, 2).reshape(B, T, C)
        h = h + linear(F.linear(o, a.proj.weight, a.proj.bias))
        m = block.mlp
        f = gelu(linear(F.linear(norm(block.norm2, h), m.fc1.weight, m.fc1.bias)))
        h = h + linear(F.linear(f, m.fc2.weight, m.fc2.bias))
    cls = norm(model.norm, h)[:, 0]
    return linear(F.linear(cls, model.head.weight, model.head.bias)), softmaxes


def hand_relevance(model, x, target, cp, eps):
    x = x.detach().requires_grad_(True)
    logits, softmaxes = hand_forward(model, x, cp, eps)
    score = logits.gather(1, target[:, None]).sum()
    score.backward()
    absorbed = sum((A * A.grad).sum((1, 2, 3)) - (L * L.grad).sum((1, 2, 3)) for L, A in softmaxes) if softmaxes else 0
    return x * x.grad, logits.detach(), absorbed


@pytest.mark.parametrize("name", ["attnlrp", "cp_lrp"])
@pytest.mark.parametrize("eps", [0.0, 0.05])
def test_equals_gradient_x_input_of_the_hand_detached_forward(name, eps, images):
    model = make_vit(reg_tokens=1)
    targets = torch.tensor([0, 3, 1])
    e = sl.explain(model, images, name, target=targets, epsilon=eps, batch_size=2, channels=True)
    ref, logits, _ = hand_relevance(model, images, targets, name == "cp_lrp", eps)
    assert e.maps.shape == (3, 3, 16, 16)
    assert torch.allclose(e.outputs, logits)
    assert torch.allclose(e.maps, ref, rtol=1e-8, atol=1e-12), float((e.maps - ref).abs().max())
    summed = sl.explain(model, images, name, target=targets, epsilon=eps).maps
    assert summed.shape == (3, 16, 16) and torch.allclose(summed, ref.sum(1))


def test_rules_matter(images):
    model = make_vit()
    maps = {n: sl.explain(model, images, n, epsilon=0.0).maps for n in ("attnlrp", "cp_lrp")}
    plain = sl.explain(model, images, "input_x_gradient").maps
    assert not torch.allclose(maps["attnlrp"], maps["cp_lrp"], rtol=1e-2)
    assert not torch.allclose(maps["attnlrp"], plain, rtol=1e-2)
    eps = sl.explain(model, images, "attnlrp", epsilon=0.05).maps
    assert not torch.allclose(eps, maps["attnlrp"], rtol=1e-3)


def test_cp_lrp_is_conservative_on_a_bias_free_transformer(images):
    model = make_vit(bias_free=True)
    e = sl.explain(model, images, "cp_lrp", epsilon=0.0)
    logit = e.outputs.gather(1, e.targets[:, None])[:, 0]
    assert logit.abs().min() > 1e-2
    assert torch.allclose(e.maps.sum((1, 2)), logit, rtol=0, atol=1e-5), (e.maps.sum((1, 2)), logit)


def test_attnlrp_loses_relevance_only_at_the_softmax(images):
    """AttnLRP's softmax rule (Proposition 3.1) has a bias term; every other layer conserves: the input
    relevance plus what the softmaxes absorb is the logit, on a bias-free transformer."""
    model = make_vit(bias_free=True)
    e = sl.explain(model, images, "attnlrp", epsilon=0.0)
    logit = e.outputs.gather(1, e.targets[:, None])[:, 0]
    _, _, absorbed = hand_relevance(model, images, e.targets, cp=False, eps=0.0)
    total = e.maps.sum((1, 2))
    assert torch.allclose(total + absorbed, logit, rtol=0, atol=1e-5), (total + absorbed, logit)
    assert (total - logit).abs().max() > 1e-3  # the softmax really absorbs relevance here


@pytest.mark.parametrize("name", ["attnlrp", "cp_lrp"])
def test_batch_invariance(name):
    model = make_vit(dtype=torch.float32)
    x = torch.randn(5, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    whole = sl.explain(model, x, name, batch_size=5).maps
    for i in (0, 3):
        one = sl.explain(model, x[i:i + 1], name).maps
        assert torch.allclose(whole[i:i + 1], one, rtol=1e-4, atol=1e-5 * float(one.abs().max()))


def test_model_untouched_and_errors(images):
    from conftest import make_small_cnn

    model = make_vit()
    logits = model(images)
    forwards = {n: type(m).forward for n, m in model.named_modules()}
    sl.explain(model, images, "attnlrp")
    assert torch.equal(model(images), logits)
    assert all("forward" not in vars(m) for m in model.modules())
    assert forwards == {n: type(m).forward for n, m in model.named_modules()}
    with pytest.raises(sl.ConfigError, match="vision transformer"):
        methods.build("attnlrp", make_small_cnn())
    with pytest.raises(sl.ConfigError, match="epsilon"):
        methods.build("cp_lrp", model, epsilon=-1.0)
