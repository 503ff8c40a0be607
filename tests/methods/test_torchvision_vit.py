"""ViT methods on torchvision's VisionTransformer layout (nn.MultiheadAttention), without importing torchvision.

`TorchvisionViT` copies the module structure of torchvision/models/vision_transformer.py (BSD-3-Clause,
(c) Soumith Chintala 2016 and the PyTorch contributors): `conv_proj`, `class_token`, `encoder`
(`pos_embedding`, `dropout`, `layers.encoder_layer_i`, `ln`), `heads.head`; `EncoderBlock` (`ln_1`,
`self_attention` = nn.MultiheadAttention(batch_first=True), called with keywords query=x, key=x, value=x,
need_weights=False, `dropout`, `ln_2`, `mlp` = torchvision.ops.MLP: Linear, GELU, Dropout, Linear,
Dropout). Left out: the conv stem option, `representation_size` (pre-logits) and the legacy state-dict
loader. The references recompute every block from the weights with loops over heads, one image at a time."""

import math
from collections import OrderedDict
from functools import partial

import pytest
import torch
from torch import nn

import saliencylab as sl
from saliencylab.core.session import ModelSession
from saliencylab.methods.attention import attention_modules, capture_attention, mha_forward, recorded


# -- torchvision's structure ---------------------------------------------------------------------
class MLPBlock(nn.Sequential):
    def __init__(self, in_dim, mlp_dim, dropout):
        super().__init__(nn.Linear(in_dim, mlp_dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(mlp_dim, in_dim),
                         nn.Dropout(dropout))


class EncoderBlock(nn.Module):
    def __init__(self, num_heads, hidden_dim, mlp_dim, dropout, attention_dropout,
                 norm_layer=partial(nn.LayerNorm, eps=1e-6)):
        super().__init__()
        self.num_heads = num_heads
        self.ln_1 = norm_layer(hidden_dim)
        self.self_attention = nn.MultiheadAttention(hidden_dim, num_heads, dropout=attention_dropout, batch_first=True)
        self.dropout = nn.Dropout(dropout)
        self.ln_2 = norm_layer(hidden_dim)
        self.mlp = MLPBlock(hidden_dim, mlp_dim, dropout)

    def forward(self, input):
        torch._assert(input.dim() == 3, f"Expected (batch_size, seq_length, hidden_dim) got {input.shape}")
        x = self.ln_1(input)
        x, _ = self.self_attention(query=x, key=x, value=x, need_weights=False)  # keywords, as torchvision
        x = self.dropout(x)
        x = x + input
        y = self.ln_2(x)
        y = self.mlp(y)
        return x + y


class Encoder(nn.Module):
    def __init__(self, seq_length, num_layers, num_heads, hidden_dim, mlp_dim, dropout, attention_dropout,
                 norm_layer=partial(nn.LayerNorm, eps=1e-6)):
        super().__init__()
        self.pos_embedding = nn.Parameter(torch.empty(1, seq_length, hidden_dim).normal_(std=0.02))
        self.dropout = nn.Dropout(dropout)
        layers = OrderedDict()
        for i in range(num_layers):
            layers[f"encoder_layer_{i}"] = EncoderBlock(num_heads, hidden_dim, mlp_dim, dropout, attention_dropout,
                                                        norm_layer)
        self.layers = nn.Sequential(layers)
        self.ln = norm_layer(hidden_dim)

    def forward(self, input):
        torch._assert(input.dim() == 3, f"Expected (batch_size, seq_length, hidden_dim) got {input.shape}")
        input = input + self.pos_embedding
        return self.ln(self.layers(self.dropout(input)))


class TorchvisionViT(nn.Module):
    def __init__(self, image_size, patch_size, num_layers, num_heads, hidden_dim, mlp_dim, dropout=0.0,
                 attention_dropout=0.0, num_classes=1000):
        super().__init__()
        self.image_size = image_size
        self.patch_size = patch_size
        self.hidden_dim = hidden_dim
        self.conv_proj = nn.Conv2d(3, hidden_dim, kernel_size=patch_size, stride=patch_size)
        seq_length = (image_size // patch_size) ** 2 + 1
        self.class_token = nn.Parameter(torch.zeros(1, 1, hidden_dim))
        self.encoder = Encoder(seq_length, num_layers, num_heads, hidden_dim, mlp_dim, dropout, attention_dropout)
        self.seq_length = seq_length
        self.heads = nn.Sequential(OrderedDict(head=nn.Linear(hidden_dim, num_classes)))
        nn.init.zeros_(self.heads.head.weight)  # torchvision's init (the tests re-draw it)
        nn.init.zeros_(self.heads.head.bias)

    def _process_input(self, x):
        n, c, h, w = x.shape
        p = self.patch_size
        torch._assert(h == self.image_size, f"Wrong image height! Expected {self.image_size} but got {h}!")
        torch._assert(w == self.image_size, f"Wrong image width! Expected {self.image_size} but got {w}!")
        x = self.conv_proj(x)
        x = x.reshape(n, self.hidden_dim, (h // p) * (w // p))
        return x.permute(0, 2, 1)

    def forward(self, x):
        x = self._process_input(x)
        x = torch.cat([self.class_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = self.encoder(x)
        return self.heads(x[:, 0])


def make_tv_vit(seed=0, depth=3, attention_dropout=0.0):
    """A 16x16-input, 4x4-patch torchvision-style ViT with sharper attention and a non-zero head."""
    torch.manual_seed(seed)
    model = TorchvisionViT(image_size=16, patch_size=4, num_layers=depth, num_heads=2, hidden_dim=16, mlp_dim=32,
                           attention_dropout=attention_dropout, num_classes=5).eval()
    with torch.no_grad():
        for block in model.encoder.layers:
            block.self_attention.in_proj_weight.normal_(0, 0.5)
            block.self_attention.in_proj_bias.normal_(0, 0.1)
        model.class_token.normal_(0, 0.5)
        model.heads.head.weight.normal_(0, 0.5)
    return model


@pytest.fixture
def images():
    return torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(5))


# -- one-image references --------------------------------------------------------------------------
def manual_forward(model, image):
    """(3, H, W) -> (logits (K,), [attention (heads, T, T)] per block), one graph, loops over heads."""
    x = model.conv_proj(image[None]).flatten(2).transpose(1, 2)
    x = torch.cat([model.class_token, x], dim=1) + model.encoder.pos_embedding
    attentions = []
    for block in model.encoder.layers:
        mha = block.self_attention
        h = block.ln_1(x)[0]  # (T, E)
        E, H = h.shape[-1], mha.num_heads
        d = E // H
        W, b = mha.in_proj_weight, mha.in_proj_bias
        q, k, v = h @ W[:E].T + b[:E], h @ W[E:2 * E].T + b[E:2 * E], h @ W[2 * E:].T + b[2 * E:]
        heads = [torch.softmax(q[:, j * d:(j + 1) * d] @ k[:, j * d:(j + 1) * d].T / math.sqrt(d), dim=-1)
                 for j in range(H)]
        a = torch.stack(heads)
        attentions.append(a)
        mixed = torch.cat([a[j] @ v[:, j * d:(j + 1) * d] for j in range(H)], dim=-1)
        x = x + (mixed @ mha.out_proj.weight.T + mha.out_proj.bias)[None]
        x = x + block.mlp(block.ln_2(x))
    return model.heads(model.encoder.ln(x)[:, 0])[0], attentions


def patch_grid(row):
    side = math.isqrt(row.numel() - 1)
    return row[1:].reshape(side, side)  # the class token is first


def reference_rollout(model, image, head_fusion, discard_ratio):
    with torch.no_grad():
        _, attentions = manual_forward(model, image)
    T = attentions[0].shape[-1]
    result = torch.eye(T)
    for a in attentions:
        fused = {"mean": a.mean(0), "max": a.max(0).values}[head_fusion].flatten()
        for index in torch.argsort(fused)[:int(T * T * discard_ratio)].tolist():
            if index != 0:
                fused[index] = 0.0
        fused = (fused.reshape(T, T) + torch.eye(T)) / 2
        fused = torch.stack([fused[i] / fused[i].sum() for i in range(T)])
        result = fused @ result
    return patch_grid(result[0])


def reference_gradient_rollout(model, image, target):
    logits, attentions = manual_forward(model, image)
    grads = torch.autograd.grad(logits[target], attentions)
    R = torch.eye(attentions[0].shape[-1])
    for a, g in zip(attentions, grads):
        cam = sum((g[j] * a[j]).clamp(min=0) for j in range(a.shape[0])) / a.shape[0]
        R = R + cam.detach() @ R
    return patch_grid(R[0])


def assert_close(a, b, atol=1e-6):
    assert torch.allclose(a, b, rtol=1e-4, atol=atol), float((a - b).abs().max())


# -- the explicit nn.MultiheadAttention ------------------------------------------------------------
MHA_CASES = {
    "torchvision": dict(kw=dict(batch_first=True), x=(2, 7, 16)),
    "sequence_first": dict(kw=dict(batch_first=False), x=(7, 2, 16)),
    "unbatched": dict(kw=dict(batch_first=True), x=(7, 16)),
    "separate_kv_dims": dict(kw=dict(batch_first=True, kdim=12, vdim=10), x=(2, 7, 16)),
    "no_bias": dict(kw=dict(batch_first=True, bias=False), x=(2, 7, 16)),
}


@pytest.mark.parametrize("case", sorted(MHA_CASES))
@pytest.mark.parametrize("average", [True, False])
def test_explicit_attention_equals_the_module(case, average):
    torch.manual_seed(1)
    spec = MHA_CASES[case]
    mha = nn.MultiheadAttention(16, 4, **spec["kw"]).eval()
    with torch.no_grad():
        for p in mha.parameters():
            p.normal_(0, 0.5)
    q = torch.randn(*spec["x"])
    kv_shape = list(spec["x"])
    kv_shape[-1] = spec["kw"].get("kdim", 16)
    k = torch.randn(*kv_shape) if "kdim" in spec["kw"] else q
    v = torch.randn(*kv_shape[:-1], spec["kw"]["vdim"]) if "vdim" in spec["kw"] else k
    seen = []
    with torch.no_grad():
        out, w = mha_forward(mha, q, k, v, need_weights=True, average_attn_weights=average, record=seen.append)
        ref_out, ref_w = mha(q, k, v, need_weights=True, average_attn_weights=average)
        out_nw, none = mha_forward(mha, q, k, v, need_weights=False)
    assert out.shape == ref_out.shape and w.shape == ref_w.shape and none is None
    assert_close(out, ref_out, 1e-5)
    assert_close(w, ref_w, 1e-5)
    assert_close(out_nw, ref_out, 1e-5)
    per_head = seen[0]
    assert per_head.dim() == 4 and per_head.shape[1] == 4  # (B, heads, L, S) even for unbatched input
    assert_close(per_head.mean(1).reshape(w.shape) if average else per_head.reshape(w.shape), w)


def test_explicit_attention_masks_and_training_dropout():
    torch.manual_seed(2)
    mha = nn.MultiheadAttention(16, 2, batch_first=True, dropout=0.5).eval()
    x = torch.randn(2, 5, 16)
    causal = torch.triu(torch.ones(5, 5, dtype=torch.bool), 1)
    padding = torch.tensor([[False] * 5, [False, False, False, True, True]])
    float_mask = torch.randn(2 * 2, 5, 5)
    with torch.no_grad():
        for kwargs in (dict(attn_mask=causal), dict(key_padding_mask=padding), dict(attn_mask=float_mask),
                       dict(attn_mask=causal, key_padding_mask=padding)):
            out, w = mha_forward(mha, x, x, x, average_attn_weights=False, **kwargs)
            ref_out, ref_w = mha(x, x, x, average_attn_weights=False, **kwargs)
            assert_close(out, ref_out, 1e-5)
            assert_close(w, ref_w, 1e-5)
    mha.train()  # dropout acts on the weights in training, as torch's
    torch.manual_seed(3)
    _, w = mha_forward(mha, x, x, x, average_attn_weights=False)
    assert (w == 0).any() and torch.allclose(w.sum(-1).mean(), torch.tensor(1.0), atol=0.3)


def test_capture_keeps_outputs_and_records_the_true_weights(images):
    model = make_tv_vit()
    with torch.no_grad():
        logits = model(images)
    with ModelSession(model) as session:
        with session.scope():
            store = capture_attention(session)
            out = session.forward(images.clone().requires_grad_(True))
            weights = recorded(model, store)
            swapped = ["forward" in m.__dict__ for _, m in attention_modules(model)]
        assert swapped == [True] * 3
        assert all("forward" not in m.__dict__ for _, m in attention_modules(model))  # undone at scope exit
    assert_close(out, logits, 1e-5)
    assert [tuple(w.shape) for w in weights] == [(3, 2, 17, 17)] * 3
    for i in range(3):
        ref_logits, ref_attentions = manual_forward(model, images[i])
        for w, ref in zip(weights, ref_attentions):
            assert_close(w[i], ref, 1e-5)
    # the recorded tensors are in the graph: gradients w.r.t. them are the reference's
    g = torch.autograd.grad(out[:, 2].sum(), weights)
    ref_logits, ref_attentions = manual_forward(model, images[1])
    ref_g = torch.autograd.grad(ref_logits[2], ref_attentions)
    for a, b in zip(g, ref_g):
        assert_close(a[1], b, 1e-5)


# -- rollout on the torchvision layout -------------------------------------------------------------
@pytest.mark.parametrize("head_fusion", ["mean", "max"])
@pytest.mark.parametrize("discard_ratio", [0.0, 0.9])
def test_attention_rollout_equals_the_reference(head_fusion, discard_ratio, images):
    model = make_tv_vit()
    e = sl.explain(model, images, "attention_rollout", head_fusion=head_fusion, discard_ratio=discard_ratio,
                   batch_size=2)
    assert e.maps.shape == (3, 16, 16) and e.lowres.shape == (3, 4, 4)
    for i in range(3):
        assert_close(e.lowres[i], reference_rollout(model, images[i], head_fusion, discard_ratio))


def test_gradient_rollout_equals_the_reference(images):
    model = make_tv_vit()
    targets = torch.tensor([0, 3, 1])
    e = sl.explain(model, images, "gradient_rollout", target=targets, batch_size=2)
    assert torch.equal(e.targets, targets) and e.lowres.shape == (3, 4, 4)
    for i in range(3):
        assert_close(e.lowres[i], reference_gradient_rollout(model, images[i], int(targets[i])))
    other = sl.explain(model, images, "gradient_rollout", target=torch.tensor([1, 0, 3])).lowres
    assert not torch.allclose(e.lowres, other)


@pytest.mark.parametrize("name", ["attention_rollout", "gradient_rollout"])
def test_everything_restored_also_when_the_call_raises(name, images):
    model = make_tv_vit(attention_dropout=0.3)
    model.train()  # the user's mode is kept; explain runs in eval mode (dropout off)
    mhas = [m for _, m in attention_modules(model)]
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    during = []
    handle = mhas[0].register_forward_hook(lambda m, a, o: during.append(("forward" in m.__dict__, m.training)))
    try:
        e = sl.explain(model, images, name)
        with pytest.raises(Exception):
            sl.explain(model, images, name, target=torch.tensor([99, 0, 0]))  # fails after the forward pass
        with pytest.raises(Exception):
            sl.explain(model, images[:, :, :12, :12], name)  # fails inside the model
    finally:
        handle.remove()
    assert during[:2] == [(True, False), (True, False)]  # swapped and in eval mode during the calls
    for m in mhas:
        assert "forward" not in m.__dict__ and m.training
        assert not m._forward_hooks and not m._forward_pre_hooks
    assert all(torch.equal(p, params[n]) and p.requires_grad for n, p in model.named_parameters())
    model.eval()
    with torch.no_grad():
        again = sl.explain(model, images, name)
    assert_close(again.lowres, e.lowres)  # eval mode during the first call too: dropout was off


def test_refusals(images):
    from conftest import make_small_cnn

    with pytest.raises(sl.ConfigError, match="neither") as info:
        sl.explain(make_small_cnn(), images, "attention_rollout")
    assert "\n" not in str(info.value) and "MultiheadAttention" in str(info.value) and "qkv" in str(info.value)
    model = make_tv_vit()
    block = model.encoder.layers.encoder_layer_0
    block.self_attention = nn.MultiheadAttention(16, 2, batch_first=True, add_bias_kv=True)
    with pytest.raises(sl.ConfigError, match="bias_k"):
        sl.explain(model, images, "attention_rollout")
    assert "forward" not in block.self_attention.__dict__


class EncoderViT(nn.Module):
    """A ViT on nn.TransformerEncoder, whose eval-mode fast path runs the attention without its forward."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(4)
        self.patch = nn.Conv2d(3, 16, 4, 4)
        self.cls = nn.Parameter(torch.randn(1, 1, 16))
        self.pos = nn.Parameter(torch.randn(1, 17, 16) * 0.1)
        layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(16, 5)
        with torch.no_grad():
            for block in self.encoder.layers:
                block.self_attn.in_proj_weight.normal_(0, 0.5)

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(len(x), -1, -1), x], dim=1) + self.pos
        return self.head(self.encoder(x)[:, 0])


def test_transformer_encoder_fast_path_switched_off_and_restored(images):
    model = EncoderViT().eval()
    assert torch.backends.mha.get_fastpath_enabled()
    with torch.no_grad():
        logits = model(images)
        # the weights each layer's attention computes, from the module itself
        x = model.patch(images).flatten(2).transpose(1, 2)
        x = torch.cat([model.cls.expand(3, -1, -1), x], dim=1) + model.pos
        expected = []
        for layer in model.encoder.layers:
            h = layer.norm1(x)
            out, w = layer.self_attn(h, h, h, need_weights=True, average_attn_weights=False)
            expected.append(w)
            x = x + out
            x = x + layer._ff_block(layer.norm2(x))
    with ModelSession(model) as session, torch.no_grad():
        store = capture_attention(session)
        out = session.forward(images)
        assert not torch.backends.mha.get_fastpath_enabled()
        weights = recorded(model, store)
    assert torch.backends.mha.get_fastpath_enabled()
    assert_close(out, logits, 1e-5)
    for w, ref in zip(weights, expected):
        assert_close(w, ref, 1e-5)
    e = sl.explain(model, images, "gradient_rollout")
    assert e.lowres.shape == (3, 4, 4) and torch.backends.mha.get_fastpath_enabled()
    with pytest.raises(Exception):
        sl.explain(model, images, "attention_rollout", target=torch.tensor([9, 9, 9]))
    assert torch.backends.mha.get_fastpath_enabled()
    assert all("forward" not in layer.self_attn.__dict__ for layer in model.encoder.layers)
