"""Transformer attribution, AttnLRP and CP-LRP on torchvision's VisionTransformer layout (nn.MultiheadAttention).

The strong check: the torchvision copy's weights mapped into our timm-layout ViT (in_proj -> qkv, out_proj ->
proj, ln_1/ln_2 -> norm1/norm2, mlp[0]/mlp[3] -> fc1/fc2, encoder.ln -> norm, heads.head -> head) give the same
logits and, for every method, the same maps; and the maps equal the loop-based references of
test_transformer_attribution.py / test_attnlrp.py computed on the mapped model. Also: batch invariance, the
model untouched (forward attributes, parameters, mode, the torch.backends.mha flag) also when a call raises,
one-line refusals; and rollout's refusal of a model whose head does not read the class token."""

import pytest
import torch
from torch import nn

import saliencylab as sl
from saliencylab import methods
from saliencylab.models.vit import VisionTransformer, small_vit
from test_attnlrp import hand_relevance
from test_torchvision_vit import make_tv_vit
from test_transformer_attribution import reference

METHODS = ["transformer_attribution", "attnlrp", "cp_lrp"]


def tv_vit(seed=0, bias_free=False, dtype=torch.float64):
    model = make_tv_vit(seed=seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if bias_free and (name.endswith("bias") or name in ("class_token", "encoder.pos_embedding")):
                p.zero_()
            elif name.endswith("bias"):
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(len(name)))
    return model.to(dtype)


def to_timm(tv):
    """The same weights in our timm-layout VisionTransformer."""
    layers = list(tv.encoder.layers)
    dim, mlp_dim = tv.hidden_dim, layers[0].mlp[0].out_features
    model = VisionTransformer(tv.heads.head.out_features, img_size=tv.image_size, patch_size=tv.patch_size, dim=dim,
                              depth=len(layers), heads=layers[0].self_attention.num_heads, mlp_ratio=mlp_dim / dim)
    state = {"patch_embed.proj.weight": tv.conv_proj.weight, "patch_embed.proj.bias": tv.conv_proj.bias,
             "cls_token": tv.class_token, "pos_embed": tv.encoder.pos_embedding,
             "norm.weight": tv.encoder.ln.weight, "norm.bias": tv.encoder.ln.bias,
             "head.weight": tv.heads.head.weight, "head.bias": tv.heads.head.bias}
    for i, layer in enumerate(layers):
        mha = layer.self_attention
        parts = {"norm1": layer.ln_1, "attn.proj": mha.out_proj, "norm2": layer.ln_2, "mlp.fc1": layer.mlp[0],
                 "mlp.fc2": layer.mlp[3]}
        for name, module in parts.items():
            state[f"blocks.{i}.{name}.weight"], state[f"blocks.{i}.{name}.bias"] = module.weight, module.bias
        state[f"blocks.{i}.attn.qkv.weight"], state[f"blocks.{i}.attn.qkv.bias"] = mha.in_proj_weight, mha.in_proj_bias
    model.load_state_dict({k: v.detach().clone() for k, v in state.items()})
    return model.to(tv.conv_proj.weight.dtype).eval()


@pytest.fixture
def images():
    return torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(5), dtype=torch.float64)


def test_the_mapped_model_computes_the_same(images):
    tv = tv_vit()
    timm = to_timm(tv)
    with torch.no_grad():
        assert torch.allclose(tv(images), timm(images), rtol=1e-10, atol=1e-12)
        assert tv(images).std(0).max() > 1e-2  # the images are told apart: the cross-check can fail


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("average", [True, False])
def test_the_rewritten_attention_equals_the_module(batch_first, average):
    from saliencylab.methods.transformer import _AttnLRPOps, _CheferOps, mha_attention_forward

    torch.manual_seed(1)
    mha = nn.MultiheadAttention(16, 4, batch_first=batch_first).double().eval()
    with torch.no_grad():
        for p in mha.parameters():
            p.normal_(0, 0.5)
    x = torch.randn(2, 7, 16, dtype=torch.float64)
    x = x if batch_first else x.transpose(0, 1)
    with torch.no_grad():
        ref, ref_w = mha(x, x, x, need_weights=True, average_attn_weights=average)
    for ops in (_AttnLRPOps(0.05), _CheferOps({"relevance": False, "attentions": []})):
        out, w = mha_attention_forward(mha, ops, x, x, x, need_weights=True, average_attn_weights=average)
        assert torch.allclose(out, ref, atol=1e-12) and torch.allclose(w, ref_w, atol=1e-12)
        assert mha_attention_forward(mha, ops, x, x, x, need_weights=False)[1] is None
    with pytest.raises(sl.ConfigError, match="self-attention"):
        mha_attention_forward(mha, _AttnLRPOps(), x, x.clone(), x)  # cross-attention (key is another tensor)


@pytest.mark.parametrize("name", METHODS)
def test_same_maps_as_the_timm_layout_and_the_references(name, images):
    tv = tv_vit()
    timm = to_timm(tv)
    targets = torch.tensor([0, 3, 1])
    kwargs = {} if name == "transformer_attribution" else dict(epsilon=0.05, channels=True)
    e = sl.explain(tv, images, name, target=targets, batch_size=2, **kwargs)
    same = sl.explain(timm, images, name, target=targets, batch_size=2, **kwargs)
    got, expected = (e.lowres, same.lowres) if name == "transformer_attribution" else (e.maps, same.maps)
    assert expected.abs().max() > 1e-3
    assert torch.allclose(got, expected, rtol=1e-8, atol=1e-12 * float(expected.abs().max())), \
        float((got - expected).abs().max())
    assert torch.equal(e.targets, targets) and torch.allclose(e.outputs, same.outputs)
    if name == "transformer_attribution":
        assert e.maps.shape == (3, 16, 16) and e.lowres.shape == (3, 4, 4)
        ref = reference(timm, images[1], int(targets[1]))  # one image: the loops are slow; the rest is equal above
        assert torch.allclose(e.lowres[1], ref, rtol=1e-7, atol=1e-10), float((e.lowres[1] - ref).abs().max())
    else:
        ref, _, _ = hand_relevance(timm, images, targets, name == "cp_lrp", 0.05)
        assert torch.allclose(e.maps, ref, rtol=1e-8, atol=1e-12), float((e.maps - ref).abs().max())
    other = sl.explain(tv, images, name, target=torch.tensor([1, 0, 3]), **kwargs).maps
    assert not torch.allclose(e.maps, other)  # class-specific


def test_cp_lrp_is_conservative_on_a_bias_free_torchvision_vit(images):
    tv = tv_vit(bias_free=True)
    e = sl.explain(tv, images, "cp_lrp", epsilon=0.0)
    logit = e.outputs.gather(1, e.targets[:, None])[:, 0]
    assert logit.abs().min() > 1e-2
    assert torch.allclose(e.maps.sum((1, 2)), logit, rtol=0, atol=1e-5), (e.maps.sum((1, 2)), logit)


@pytest.mark.parametrize("name", METHODS)
def test_batch_invariance(name):
    tv = tv_vit(dtype=torch.float32)
    x = torch.randn(5, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    whole = sl.explain(tv, x, name, batch_size=5).maps
    for i in (0, 3):
        one = sl.explain(tv, x[i:i + 1], name).maps
        assert torch.allclose(whole[i:i + 1], one, rtol=1e-4, atol=1e-5 * float(one.abs().max()))


@pytest.mark.parametrize("name", METHODS)
def test_model_untouched_also_when_the_call_raises(name, images):
    tv = tv_vit(dtype=torch.float32)
    tv.train()  # the user's mode is kept
    x = images.float()
    forwards = {n: type(m).forward for n, m in tv.named_modules()}
    params = {n: p.detach().clone() for n, p in tv.named_parameters()}
    flag = torch.backends.mha.get_fastpath_enabled()
    e = sl.explain(tv, x, name)
    with pytest.raises(Exception):
        sl.explain(tv, x, name, target=torch.tensor([99, 0, 0]))  # fails after the rewritten forward ran
    with pytest.raises(Exception):
        sl.explain(tv, x[:, :, :12, :12], name)  # fails inside the model
    assert torch.backends.mha.get_fastpath_enabled() == flag
    assert all("forward" not in vars(m) for m in tv.modules())
    assert forwards == {n: type(m).forward for n, m in tv.named_modules()}
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in tv.modules())
    assert all(m.training for m in tv.modules())
    assert all(torch.equal(p, params[n]) and p.requires_grad for n, p in tv.named_parameters())
    tv.eval()
    assert torch.allclose(sl.explain(tv, x, name).maps, e.maps)  # eval mode during the first call too


class MaskedBlock(nn.Module):
    """An EncoderBlock whose attention gets a (causal) mask: refused, not computed without it."""

    def __init__(self, block):
        super().__init__()
        self.ln_1, self.self_attention, self.ln_2, self.mlp = block.ln_1, block.self_attention, block.ln_2, block.mlp

    def forward(self, input):
        x = self.ln_1(input)
        mask = torch.triu(torch.ones(x.shape[1], x.shape[1], dtype=torch.bool), 1)  # causal
        x = self.self_attention(x, x, x, attn_mask=mask, need_weights=False)[0] + input
        return x + self.mlp(self.ln_2(x))


class ScaledBlock(MaskedBlock):
    def forward(self, input):
        x = self.ln_1(input)
        x = 2 * self.self_attention(x, x, x, need_weights=False)[0] + input
        return x + self.mlp(self.ln_2(x))


class Wrapped(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, *args, **kwargs):
        return self.inner(*args, **kwargs)


@pytest.mark.parametrize("name", METHODS)
def test_refusals(name, images):
    tv = tv_vit()
    tv.encoder.layers[1].self_attention = nn.MultiheadAttention(16, 2, batch_first=True, add_bias_kv=True).double()
    with pytest.raises(sl.ConfigError, match="cannot rewrite attention module 'encoder.layers.encoder_layer_1.self_"
                                             "attention': it adds keys") as info:
        methods.build(name, tv)
    assert "\n" not in str(info.value)

    tv = tv_vit()
    tv.encoder.layers[0].self_attention = Wrapped(tv.encoder.layers[0].self_attention)  # held under another name
    with pytest.raises(sl.ConfigError, match="no parent block holds it as `self_attention`"):
        methods.build(name, tv)

    tv = tv_vit()
    tv.encoder.layers[2] = MaskedBlock(tv.encoder.layers[2])
    logits = tv(images)
    # transformer attribution rewrites the block too (no mask): the output check refuses it
    with pytest.raises(sl.ConfigError, match="rewritten forward" if name == "transformer_attribution" else
                       "attention mask"):
        sl.explain(tv, images, name)
    assert torch.equal(tv(images), logits)

    tv = tv_vit()
    tv.encoder.layers[2] = ScaledBlock(tv.encoder.layers[2])
    if name == "transformer_attribution":  # its block rewrite would not be the model's forward
        with pytest.raises(sl.ConfigError, match="rewritten forward"):
            sl.explain(tv, images, name)
    else:
        sl.explain(tv, images, name)  # the block's own forward runs: only the attention is rewritten


# -- heads that do not read the class token (review of session 7) ------------------------------------------
class PooledViT(VisionTransformer):
    """timm's `global_pool="avg"`: the head reads the mean of the patch tokens, not the class token."""
    global_pool = "avg"

    def forward(self, x):
        return self.head(self.forward_features(x)[:, self.num_prefix_tokens:].mean(1))


@pytest.mark.parametrize("name", ["attention_rollout", "gradient_rollout", "transformer_attribution"])
def test_a_head_that_does_not_read_the_class_token_is_refused(name):
    model = PooledViT(5, img_size=16, patch_size=4, dim=16, depth=2, heads=2).eval()
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with pytest.raises(sl.ConfigError, match="global_pool 'avg'") as info:
        sl.explain(model, x, name)
    assert "\n" not in str(info.value) and "class token" in str(info.value)
    timm_like = small_vit(5, img_size=16, patch_size=4, dim=16, depth=2, heads=2).eval()
    timm_like.has_class_token = False  # timm's class_token=False (with register tokens as prefix)
    with pytest.raises(sl.ConfigError, match="has no class token"):
        sl.explain(timm_like, x, name)
    timm_like.has_class_token, timm_like.global_pool = True, "token"
    assert sl.explain(timm_like, x, name).maps.shape == (2, 16, 16)  # a head reading the class token is explained


@pytest.mark.parametrize("name", ["attnlrp", "cp_lrp"])
def test_gradient_x_input_methods_explain_a_pooled_head(name):
    """AttnLRP / CP-LRP are gradient x input at the pixels: the head's pooling is part of the forward."""
    model = PooledViT(5, img_size=16, patch_size=4, dim=16, depth=2, heads=2).eval()
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    e = sl.explain(model, x, name, epsilon=0.0)
    plain = sl.explain(model, x, "input_x_gradient").maps
    assert e.maps.shape == (2, 16, 16) and e.maps.abs().max() > 0 and not torch.allclose(e.maps, plain, rtol=1e-2)
