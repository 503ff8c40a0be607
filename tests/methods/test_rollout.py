"""Attention rollout and gradient rollout on timm-style ViTs against loop-based one-image references.

The references recompute every block's attention from the weights (softmax(q k^T * scale), no hooks) and
apply the published formulas with explicit loops over blocks, rows and heads, one image at a time."""

import math

import pytest
import torch

import saliencylab as sl
from saliencylab import methods
from saliencylab.models.vit import Attention, small_vit

FUSE = {"mean": lambda a: a.mean(0), "max": lambda a: a.max(0).values, "min": lambda a: a.min(0).values}


def make_vit(reg_tokens=0, seed=0):
    torch.manual_seed(seed)
    model = small_vit(num_classes=5, img_size=16, patch_size=4, dim=16, depth=3, heads=2, reg_tokens=reg_tokens).eval()
    with torch.no_grad():  # sharper attention than the default init gives
        for block in model.blocks:
            block.attn.qkv.weight.normal_(0, 0.5)
    return model


def manual_forward(model, image):
    """One image (3, H, W) -> (logits (K,), [attention (heads, T, T)] per block), in one autograd graph."""
    x = model.patch_embed(image[None])
    prefix = [model.cls_token] + ([model.reg_token] if model.reg_token is not None else [])
    x = torch.cat(prefix + [x], dim=1) + model.pos_embed
    attentions = []
    for block in model.blocks:
        attn = block.attn
        h = block.norm1(x)[0]  # (T, C)
        qkv = attn.qkv(h).reshape(h.shape[0], 3, attn.num_heads, attn.head_dim)
        heads = []
        for j in range(attn.num_heads):
            q, k = qkv[:, 0, j], qkv[:, 1, j]
            heads.append(torch.softmax(q @ k.T * attn.scale, dim=-1))
        a = torch.stack(heads)
        attentions.append(a)
        mixed = torch.cat([a[j] @ qkv[:, 2, j] for j in range(attn.num_heads)], dim=-1)
        x = x + attn.proj(mixed)[None]
        x = x + block.mlp(block.norm2(x))
    return model.head(model.norm(x)[:, 0])[0], attentions


def reference_rollout(model, image, head_fusion="mean", discard_ratio=0.0):
    with torch.no_grad():
        _, attentions = manual_forward(model, image)
    T = attentions[0].shape[-1]
    result = torch.eye(T)
    for a in attentions:
        fused = FUSE[head_fusion](a).clone()
        flat = fused.flatten()
        k = int(T * T * discard_ratio)
        for index in torch.argsort(flat)[:k].tolist():
            if index != 0:  # the class token's attention to itself is kept (vit-explain)
                flat[index] = 0.0
        fused = flat.reshape(T, T) + torch.eye(T)
        fused = fused / 2
        for i in range(T):
            fused[i] = fused[i] / fused[i].sum()
        result = fused @ result
    return to_grid(model, result[0])


def reference_gradient_rollout(model, image, target):
    logits, attentions = manual_forward(model, image)
    grads = torch.autograd.grad(logits[target], attentions)
    T = attentions[0].shape[-1]
    R = torch.eye(T)
    for a, g in zip(attentions, grads):
        cam = sum((g[j] * a[j]).clamp(min=0) for j in range(a.shape[0])) / a.shape[0]
        R = R + cam.detach() @ R
    return to_grid(model, R[0])


def to_grid(model, row):
    patches = row[model.num_prefix_tokens:]
    side = math.isqrt(patches.numel())
    return patches.reshape(side, side)


@pytest.fixture
def images():
    return torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(5))


def assert_close(a, b):
    assert torch.allclose(a, b, rtol=1e-4, atol=1e-6), float((a - b).abs().max())


@pytest.mark.parametrize("head_fusion", ["mean", "max", "min"])
@pytest.mark.parametrize("discard_ratio", [0.0, 0.9])
def test_rollout_equals_the_one_image_reference(head_fusion, discard_ratio, images):
    model = make_vit()
    e = sl.explain(model, images, "attention_rollout", head_fusion=head_fusion, discard_ratio=discard_ratio,
                   batch_size=2)
    assert e.maps.shape == (3, 16, 16) and e.lowres.shape == (3, 4, 4)
    for i in range(3):
        assert_close(e.lowres[i], reference_rollout(model, images[i], head_fusion, discard_ratio))


def test_options_change_the_maps(images):
    model = make_vit()
    maps = {(f, d): sl.explain(model, images, "attention_rollout", head_fusion=f, discard_ratio=d).lowres
            for f in ("mean", "max") for d in (0.0, 0.9)}
    assert not torch.allclose(maps["mean", 0.0], maps["max", 0.0])
    assert not torch.allclose(maps["mean", 0.0], maps["mean", 0.9])


def test_register_tokens_give_maps_of_the_right_size(images):
    model = make_vit(reg_tokens=2)
    e = sl.explain(model, images, "attention_rollout", discard_ratio=0.5)
    assert e.maps.shape == (3, 16, 16) and e.lowres.shape == (3, 4, 4)
    for i in range(3):
        assert_close(e.lowres[i], reference_rollout(model, images[i], "mean", 0.5))
    g = sl.explain(model, images, "gradient_rollout")
    assert g.lowres.shape == (3, 4, 4)


def test_gradient_rollout_equals_the_one_image_reference(images):
    model = make_vit()
    targets = torch.tensor([0, 3, 1])
    e = sl.explain(model, images, "gradient_rollout", target=targets, batch_size=2)
    assert torch.equal(e.targets, targets)
    for i in range(3):
        assert_close(e.lowres[i], reference_gradient_rollout(model, images[i], int(targets[i])))
    # class-specific, unlike attention rollout
    other = sl.explain(model, images, "gradient_rollout", target=torch.tensor([1, 0, 3])).lowres
    assert not torch.allclose(e.lowres, other)


@pytest.mark.parametrize("name", ["attention_rollout", "gradient_rollout"])
def test_fused_flag_restored_and_weights_read(name, images):
    model = make_vit()
    model.blocks[1].attn.fused_attn = False  # the user's own choice is kept too
    flags = [b.attn.fused_attn for b in model.blocks]
    logits = model(images)
    sl.explain(model, images, name)
    assert [b.attn.fused_attn for b in model.blocks] == flags == [True, False, True]
    assert torch.equal(model(images), logits)


class AlwaysFused(Attention):
    """An attention that ignores the flag: no weights can be read, which must be said, not hidden."""

    def forward(self, x):
        self.__dict__["fused_attn"] = True
        return super().forward(x)


def test_errors(images):
    from conftest import make_small_cnn

    with pytest.raises(sl.ConfigError, match="vision transformer"):
        methods.build("attention_rollout", make_small_cnn())
    with pytest.raises(sl.ConfigError, match="head_fusion"):
        methods.build("attention_rollout", make_vit(), head_fusion="median")
    with pytest.raises(sl.ConfigError, match="discard_ratio"):
        methods.build("attention_rollout", make_vit(), discard_ratio=1.0)
    model = make_vit()
    broken = AlwaysFused(16, 2)
    broken.load_state_dict(model.blocks[0].attn.state_dict())
    model.blocks[0].attn = broken
    with pytest.raises(sl.ConfigError, match="no attention weights recorded"):
        sl.explain(model, images, "attention_rollout")


@pytest.mark.parametrize("name", ["attention_rollout", "gradient_rollout"])
def test_flags_and_hooks_restored_when_the_call_raises(name, images):
    model = make_vit()
    seen = []
    handle = model.blocks[0].attn.register_forward_pre_hook(lambda m, a: seen.append(m.fused_attn))
    try:
        with pytest.raises(Exception):
            sl.explain(model, images, name, target=torch.tensor([99, 0, 0]))  # fails after the forward pass
    finally:
        handle.remove()
    assert seen == [False]  # explicit attention during the call
    assert all(b.attn.fused_attn for b in model.blocks)
    assert not any(b.attn.attn_drop._forward_hooks for b in model.blocks)


def test_a_model_without_class_token_is_refused():
    model = make_vit()
    model.num_prefix_tokens = 0  # timm's class_token=False (global pooling): no class-token row to read
    with pytest.raises(sl.ConfigError, match="no class token"):
        methods.build("gradient_rollout", model)
