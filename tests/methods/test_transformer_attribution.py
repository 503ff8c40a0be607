"""Transformer attribution (Chefer et al. CVPR 2021) against a loop-based one-image reference.

The reference recomputes the ViT's forward from the weights for one image in float64 and applies the
relprop of hila-chefer/Transformer-Explainability (modules/layers_ours.py, baselines/ViT/ViT_LRP.py) written
out plainly: alpha=1 for every Linear (one token at a time), identity for LayerNorm / GELU / softmax, the
einsum products split by gradient x input and halved, the Add rule with its rescaling, the residual fork
summed; then per block (grad * relevance of A)+ averaged over heads, R <- R + cam R, class-token row."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import saliencylab as sl
from saliencylab import methods
from saliencylab.models.vit import Attention, small_vit


def make_vit(reg_tokens=0, seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    model = small_vit(num_classes=5, img_size=16, patch_size=4, dim=16, depth=3, heads=2, reg_tokens=reg_tokens)
    with torch.no_grad():  # sharper attention and non-trivial biases
        for block in model.blocks:
            block.attn.qkv.weight.normal_(0, 0.5)
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)
    return model.eval().to(dtype)


@pytest.fixture
def images():
    return torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(5), dtype=torch.float64)


def safe_div(a, b):
    return torch.where(b != 0, a / (b + 1e-9), torch.zeros_like(a))


def alpha1(layer, x, R):
    """Linear relprop, alpha=1, beta=0, no bias; x (T, in), R (T, out): one token at a time."""
    W = layer.weight
    pw, nw = W.clamp(min=0), W.clamp(max=0)
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        px, nx = x[t].clamp(min=0), x[t].clamp(max=0)
        S = safe_div(R[t], pw @ px + nw @ nx)
        out[t] = px * (pw.T @ S) + nx * (nw.T @ S)
    return out


def add_rule(R, a, b):
    S = safe_div(R, a + b)
    ra, rb = a * S, b * S
    sa, sb = ra.sum(), rb.sum()
    fa = safe_div(sa.abs(), sa.abs() + sb.abs()) * R.sum()
    fb = safe_div(sb.abs(), sa.abs() + sb.abs()) * R.sum()
    return ra * safe_div(fa, sa), rb * safe_div(fb, sb)


def forward_one(model, image):
    """One image: the activations every rule needs, and the logits (autograd graph kept for the gradients)."""
    x = model.patch_embed(image[None])
    prefix = [model.cls_token] + ([model.reg_token] if model.reg_token is not None else [])
    x = (torch.cat(prefix + [x], dim=1) + model.pos_embed)[0]  # (T, C)
    saved = []
    for block in model.blocks:
        attn = block.attn
        T, C = x.shape
        h1 = block.norm1(x)
        qkv = attn.qkv(h1).reshape(T, 3, attn.num_heads, attn.head_dim)
        q, k, v = (qkv[:, i].permute(1, 0, 2) for i in range(3))  # (heads, T, D)
        A = torch.softmax(q @ k.transpose(1, 2) * attn.scale, dim=-1)
        o = (A @ v).permute(1, 0, 2).reshape(T, C)
        p = attn.proj(o)
        x1 = x + p
        h2 = block.norm2(x1)
        f1 = block.mlp.fc1(h2)
        g = block.mlp.act(f1)
        f2 = block.mlp.fc2(g)
        saved.append(dict(x=x, h1=h1, q=q, k=k, v=v, A=A, o=o, p=p, x1=x1, h2=h2, g=g, f2=f2))
        x = x1 + f2
    final = model.norm(x)
    return model.head(final[0]), final, saved


def reference(model, image, target):
    logits, final, saved = forward_one(model, image)
    grads = torch.autograd.grad(logits[target], [s["A"] for s in saved])
    with torch.no_grad():
        one_hot = torch.zeros_like(logits)
        one_hot[target] = 1.0
        R = torch.zeros_like(final)
        R[0] = alpha1(model.head, final[:1], one_hot[None])[0]  # index select: the class token only
        relevance_of_A = [None] * len(saved)
        for i in reversed(range(len(saved))):
            block, s = model.blocks[i], saved[i]
            heads = block.attn.num_heads
            r_res, r_mlp = add_rule(R, s["x1"], s["f2"])
            r_mlp = alpha1(block.mlp.fc1, s["h2"], alpha1(block.mlp.fc2, s["g"], r_mlp))  # GELU, norm2: identity
            R = r_res + r_mlp
            r_res, r_attn = add_rule(R, s["x"], s["p"])
            r_o = alpha1(block.attn.proj, s["o"], r_attn)
            T, C = r_o.shape
            r_o = r_o.reshape(T, heads, C // heads).permute(1, 0, 2)
            r_A, r_q, r_k, r_v = [], [], [], []
            for j in range(heads):
                A, q, k, v = s["A"][j], s["q"][j], s["k"][j], s["v"][j]
                S = safe_div(r_o[j], A @ v)
                ra = A * (S @ v.T) / 2
                r_A.append(ra)
                r_v.append(v * (A.T @ S) / 2)
                S2 = safe_div(ra, q @ k.T)  # softmax: identity; the scale is not a module
                r_q.append(q * (S2 @ k) / 2)
                r_k.append(k * (S2.T @ q) / 2)
            relevance_of_A[i] = torch.stack(r_A)
            r_qkv = torch.cat([torch.stack(r).permute(1, 0, 2).reshape(T, C) for r in (r_q, r_k, r_v)], dim=1)
            R = r_res + alpha1(block.attn.qkv, s["h1"], r_qkv)  # norm1: identity
        T = final.shape[0]
        rollout = torch.eye(T, dtype=final.dtype)
        for g, r in zip(grads, relevance_of_A):
            cam = sum((g[j] * r[j]).clamp(min=0) for j in range(g.shape[0])) / g.shape[0]
            rollout = rollout + cam @ rollout
    patches = rollout[0, model.num_prefix_tokens:]
    side = math.isqrt(patches.numel())
    return patches.reshape(side, side)


@pytest.mark.parametrize("reg_tokens", [0, 1])
def test_equals_the_one_image_reference(reg_tokens, images):
    model = make_vit(reg_tokens)
    targets = torch.tensor([0, 3, 1])
    e = sl.explain(model, images, "transformer_attribution", target=targets, batch_size=2)
    assert e.maps.shape == (3, 16, 16) and e.lowres.shape == (3, 4, 4)
    assert torch.equal(e.targets, targets)
    for i in range(3):
        ref = reference(model, images[i], int(targets[i]))
        assert ref.abs().max() > 1e-3  # not a trivially empty map
        assert torch.allclose(e.lowres[i], ref, rtol=1e-7, atol=1e-10), float((e.lowres[i] - ref).abs().max())
    # class-specific
    other = sl.explain(model, images, "transformer_attribution", target=torch.tensor([1, 0, 3])).lowres
    assert not torch.allclose(e.lowres, other)


def test_batch_invariance():
    model = make_vit(dtype=torch.float32)
    x = torch.randn(5, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    whole = sl.explain(model, x, "transformer_attribution", batch_size=5).lowres
    for i in (0, 3):
        one = sl.explain(model, x[i:i + 1], "transformer_attribution").lowres
        assert torch.allclose(whole[i:i + 1], one, rtol=1e-4, atol=1e-6 * float(one.abs().max()))


def test_differs_from_gradient_rollout(images):
    model = make_vit()
    ta = sl.explain(model, images, "transformer_attribution").lowres
    gr = sl.explain(model, images, "gradient_rollout").lowres
    assert not torch.allclose(ta, gr.to(ta.dtype), rtol=1e-2)


def test_cost_and_model_outputs_kept(images):
    model = make_vit()
    logits = model(images)
    e = sl.explain(model, images, "transformer_attribution", batch_size=2)
    assert torch.allclose(e.outputs, logits)
    assert e.cost.forward_images == 3 + 2  # one forward per image, the first batch checked once without rules
    assert e.cost.backward_images == 6  # gradient and relevance passes
    assert torch.equal(model(images), logits)


def test_errors():
    from conftest import make_small_cnn

    with pytest.raises(sl.ConfigError, match="vision transformer"):
        methods.build("transformer_attribution", make_small_cnn())
    for attr, value in (("global_pool", "avg"), ("num_prefix_tokens", 0)):  # the class token's row means nothing
        model = make_vit()
        setattr(model, attr, value)
        with pytest.raises(sl.ConfigError, match="class token"):
            methods.build("transformer_attribution", model)
    model = make_vit()
    model.blocks[1].attn.q_norm = nn.LayerNorm(8)
    with pytest.raises(sl.ConfigError, match="cannot rewrite attention module 'blocks.1.attn'"):
        methods.build("transformer_attribution", model)


class Scaled(nn.Module):
    """A block whose forward is not x + attn(norm1(x)), x + mlp(norm2(x)): the check must say so."""

    def __init__(self, block):
        super().__init__()
        self.norm1, self.attn, self.norm2, self.mlp = block.norm1, block.attn, block.norm2, block.mlp

    def forward(self, x):
        x = x + 2 * self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ScaledAttention(Attention):
    def forward(self, x):
        return 2 * super().forward(x)


@pytest.mark.parametrize("name", ["transformer_attribution", "attnlrp", "cp_lrp"])
@pytest.mark.parametrize("where", ["block", "attention"])
def test_a_forward_that_is_not_the_rewritten_one_is_refused(name, where, images):
    model = make_vit()
    if where == "block":
        model.blocks[1] = Scaled(model.blocks[1])
    else:
        odd = ScaledAttention(16, 2).to(torch.float64)
        odd.load_state_dict(model.blocks[1].attn.state_dict())
        model.blocks[1].attn = odd
    logits = model(images)
    if where == "block" and name != "transformer_attribution":
        sl.explain(model, images, name)  # the block's own forward runs: nothing is rewritten there
    else:
        with pytest.raises(sl.ConfigError, match="rewritten forward"):
            sl.explain(model, images, name)
    assert torch.equal(model(images), logits)


class TimmBlock(nn.Module):
    """timm >= 1.0's Block.forward: the attention is called with attn_mask= and is_causal= keywords."""

    def __init__(self, block):
        super().__init__()
        self.norm1, self.attn, self.norm2, self.mlp = block.norm1, block.attn, block.norm2, block.mlp

    def forward(self, x, attn_mask=None, is_causal=False):
        x = x + self.attn(self.norm1(x), attn_mask=attn_mask, is_causal=is_causal)
        return x + self.mlp(self.norm2(x))


class TimmAttention(Attention):
    def forward(self, x, attn_mask=None, is_causal=False):
        if attn_mask is None and not is_causal:
            return super().forward(x)
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal)
        return self.proj(out.transpose(1, 2).reshape(B, N, C))


@pytest.mark.parametrize("name", ["transformer_attribution", "attnlrp", "cp_lrp"])
def test_timm_blocks_that_pass_attention_keywords(name, images):
    model = make_vit()
    plain = sl.explain(model, images, name).maps
    for i, block in enumerate(model.blocks):
        attn = TimmAttention(16, 2).to(torch.float64)
        attn.load_state_dict(block.attn.state_dict())
        block.attn = attn
        model.blocks[i] = TimmBlock(block)
    logits = model(images)
    assert torch.allclose(sl.explain(model, images, name).maps, plain)
    assert torch.equal(model(images), logits)

    class Masked(nn.Module):  # a mask (or is_causal) is refused in one line, not computed without it
        def __init__(self, blocks):
            super().__init__()
            self.blocks = blocks

        def forward(self, x):
            for block in self.blocks:
                x = block(x, is_causal=True)
            return x

    model.blocks = Masked(model.blocks)
    with pytest.raises(sl.ConfigError, match="attention mask"):
        sl.explain(model, images, name)
