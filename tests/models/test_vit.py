"""The shipped small ViT: timm layout and names, fused and explicit attention agree, register tokens."""

import pytest
import torch

from saliencylab.models.vit import small_vit


def test_shapes_and_timm_names():
    torch.manual_seed(0)
    model = small_vit(num_classes=5).eval()
    x = torch.randn(2, 3, 32, 32)
    assert model(x).shape == (2, 5)
    assert model.num_prefix_tokens == 1
    assert model.forward_features(x).shape == (2, 1 + 64, 64)
    keys = set(model.state_dict())
    for key in ("patch_embed.proj.weight", "cls_token", "pos_embed", "blocks.3.norm1.weight",
                "blocks.0.attn.qkv.weight", "blocks.0.attn.proj.weight", "blocks.0.norm2.weight",
                "blocks.0.mlp.fc1.weight", "blocks.0.mlp.fc2.weight", "norm.weight", "head.weight"):
        assert key in keys, key
    assert isinstance(model.patch_embed.proj, torch.nn.Conv2d)
    attn = model.blocks[0].attn
    assert attn.fused_attn is True and attn.num_heads == 4 and attn.scale == pytest.approx(16 ** -0.5)


def test_fused_and_explicit_attention_give_the_same_logits():
    torch.manual_seed(1)
    model = small_vit(num_classes=3, img_size=16, dim=32, depth=2, heads=4).eval()
    with torch.no_grad():  # larger random weights, so that attention is far from uniform
        for p in model.parameters():
            p.normal_(0, 0.3)
    x = torch.randn(3, 3, 16, 16)
    fused = model(x)
    for block in model.blocks:
        block.attn.fused_attn = False
    explicit = model(x)
    assert torch.allclose(fused, explicit, atol=1e-5), float((fused - explicit).abs().max())
    assert fused.std() > 0.1  # the check compares non-trivial logits


def test_register_tokens():
    torch.manual_seed(2)
    model = small_vit(num_classes=4, img_size=16, dim=16, depth=1, heads=2, reg_tokens=3).eval()
    x = torch.randn(2, 3, 16, 16)
    assert model.num_prefix_tokens == 4 and model.reg_token.shape == (1, 3, 16)
    assert model.pos_embed.shape == (1, 4 + 16, 16)
    assert model.forward_features(x).shape == (2, 4 + 16, 16)
    assert model(x).shape == (2, 4)
    # the registers take part: changing them changes the logits
    before = model(x)
    with torch.no_grad():
        model.reg_token.normal_(0, 1.0)
    assert not torch.allclose(before, model(x))


def test_patch_size_must_divide_the_image():
    with pytest.raises(ValueError, match="multiple"):
        small_vit(num_classes=2, img_size=30, patch_size=4)
