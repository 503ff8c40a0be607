"""Relevance propagation through vision transformers: Chefer et al.'s transformer attribution (CVPR 2021)
and AttnLRP / CP-LRP (Achtibat et al. ICML 2024), batched, on two layouts (`vit_blocks`):
- timm-style ViTs (`blocks[i]` with `norm1`, `attn` (`qkv` Linear, `num_heads`, `proj`), `norm2`, `mlp`;
  e.g. saliencylab.models.vit);
- torchvision's VisionTransformer (torchvision/models/vision_transformer.py, `EncoderBlock`: `ln_1`,
  `self_attention` = nn.MultiheadAttention(batch_first=True) called with query = key = value, `dropout`,
  residual, `ln_2`, `mlp` = MLPBlock(Linear, GELU, Dropout, Linear, Dropout); `encoder.ln`; `heads.head`
  reading the class token x[:, 0]). The rules are the timm path's, unchanged: the packed `in_proj_weight` /
  `in_proj_bias` is timm's `qkv` (same row layout: q | k | v, heads contiguous), given the Linear rule
  explicitly (`ops.linear`; it is a parameter, not a module a hook reaches), `out_proj` is timm's `proj`
  (called as its module, so hooked as every Linear), scale 1 / sqrt(head_dim) as both. The same weights in
  either layout give the same maps (tests/methods/test_transformer_torchvision.py).
  nn.MultiheadAttention with bias_k / bias_v / add_zero_attn or its own kdim / vdim, a mask
  (attn_mask, key_padding_mask, is_causal), cross-attention, or a parent other than a block holding it as
  `self_attention` with `ln_1`, `ln_2`, `mlp` (e.g. nn.TransformerEncoderLayer) is refused in one line.

The model is never rewritten: for the call every attention module's `forward` (and, for the transformer
attribution, every block's `forward`; for AttnLRP / CP-LRP every LayerNorm's `forward`) is replaced by a
session edit with an equivalent forward that routes relevance, and linear layers, LayerNorms and
activations are hooked (session edits); all are undone at exit. A block must compute
`x + attn(norm1(x))`, then `x + mlp(norm2(x))` (timm's `Block`, with its `ls1/ls2` and `drop_path1/2`
where present; timm >= 1.0's `attn_mask` / `is_causal` keywords are accepted, a mask or causal attention
refused; torchvision's `EncoderBlock`: the same with ln_1 / ln_2 and its dropout after the attention); an
attention module with a q/k norm or a norm after the mixing (timm's `qk_norm`, `scale_norm`) is refused
with a ConfigError.

Before the first batch, one forward pass of the unmodified model (no graph, counted in `cost`) gives the
outputs the rewritten forward must reproduce; a model it does not reproduce is refused (ConfigError), not
explained with the wrong graph.

Licences: hila-chefer/Transformer-Explainability is MIT (Copyright (c) 2020 Hila Chefer); rachtibat/
LRP-eXplains-Transformers is the Clear BSD License (SPDX BSD-3-Clause-Clear; Copyright (c) 2024
Fraunhofer-Gesellschaft & the authors, R. Achtibat et al.): both allow adapting with this attribution;
`safe_divide` and `layer_norm_constant_std` are adapted from them, the rest is written from their semantics.

`transformer_attribution` follows hila-chefer/Transformer-Explainability (MIT), baselines/ViT/
ViT_explanation_generator.py `LRP.generate_LRP` (method "transformer_attribution"), baselines/ViT/ViT_LRP.py
(`VisionTransformer.relprop`, `Block.relprop`, `Attention.relprop`) and modules/layers_ours.py (the relprop
of each layer type). Their relevance starts from the one-hot vector of the target class at the logits
(not the logit's value; here the gradient of the target's score with respect to the outputs, which is
that one-hot vector for a class target) and travels with these rules, as their code implements them:
- `Linear`: alpha-beta with alpha=1 (beta=0), biases ignored: Z = W+ x+ + W- x-,
  R_in = x+ (W+^T S) + x- (W-^T S), S = safe_divide(R, Z) (their `safe_divide`: a / (b + 1e-9), 0 where b = 0);
- `LayerNorm`, `GELU`, `Softmax`, `Dropout`: the base `RelProp.relprop`, which returns R unchanged (identity);
- the products `einsum('bhid,bhjd->bhij')` (q k^T; the `* scale` is not a module and passes R unchanged)
  and `einsum('bhij,bhjd->bhid')` (A v): gradient x input of the product with S = safe_divide(R, Z), i.e.
  each factor receives the whole relevance, then halved (`cam1 /= 2`, `cam_v /= 2`, `cam_q /= 2`, `cam_k /= 2`);
- `Add` (the residuals): a = x1 S, b = x2 S (S = safe_divide(R, x1 + x2)), then each part rescaled so that
  its total is |sum a| / (|sum a| + |sum b|) * sum R (and likewise b);
- `Clone` (the residual fork) sums the branches' relevance; `IndexSelect` (the class token) routes R to it.
The relevance of every block's attention weights (the A-part of A v, after halving) times the gradient of
the target logit with respect to those weights, positive part, mean over heads, is rolled out
R <- R + cam @ R from R = I (their `compute_rollout_attention`: prod (I + cam), no row normalisation);
the map is the class token's row over the patch tokens.
How it runs here: one forward pass in which every rule sits in a switch node (the value is the layer's
own output, with its own graph), then two backward passes through the same graph: the ordinary gradient
(the switches pass the gradient to their output's own graph) and the relevance (the switches apply the
rule and bypass it), each to the attention weights of all blocks at once.

Differences from their code (deliberate):
- Batched and any device; theirs is one image on CUDA (`cam[0]`, `one_hot.cuda()`). The Add rule's sums
  are per image (their sums run over the whole tensor, which is one image).
- `Clone` and `IndexSelect` divide by the value and multiply back (x * safe_divide(R, x)), which zeroes
  relevance where a value is exactly 0; here the branches' relevance is summed (and routed) as it is.
- Relevance below the first block's attention (its qkv, the embedding, the patch convolution) is never
  needed for the map and is not computed (their `relprop` runs the whole network down to the pixels).
- A register token (Darcet et al.) is a prefix token: the map drops all `num_prefix_tokens` (theirs: 1).
  A model whose head does not read the class token (timm's `global_pool` other than "token", or no
  prefix token) is refused: the class token's row would not explain its prediction.
- timm's LayerScale (`ls1`, `ls2`; absent from their ViT) gets the identity rule, as their LayerNorm does.
- torchvision's ViT (no code of theirs covers it) gets their ViT's rules: in_proj as their `qkv` Linear,
  out_proj as their `proj`, ln_1 / ln_2 / encoder.ln identity, the residuals their Add rule.
- Rules are applied to modules: every nn.Linear (alpha=1), nn.LayerNorm, nn.Softmax and activation module
  (identity); an activation called as a function inside an MLP would get its ordinary gradient instead.

`attnlrp` and `cp_lrp` follow rachtibat/LRP-eXplains-Transformers (LXT, Clear BSD), lxt/efficient/rules.py
and lxt/efficient/patches.py (`layer_norm_forward`, `non_linear_forward`, `wrap_attention_forward`,
`cp_multi_head_attention_forward`) and lxt/efficient/models/vit_torch.py: LRP as gradient x input of a
modified forward pass, the rules of AttnLRP (Achtibat et al. 2024) implemented by what is detached or
rescaled in that forward:
- element-wise non-linearities (GELU and the other activation modules): the identity rule, y = x * (f(x) / x)
  with the ratio constant (their `identity_rule_implicit`);
- LayerNorm (nn.LayerNorm modules; other norms keep their gradient): the 1/std constant
  (`layer_norm_forward`), the centring kept (a linear map);
- the softmax: its ordinary gradient, which in gradient x input is AttnLRP's rule (Proposition 3.1,
  R_x = x (R_s - s sum R_s); not conservative: the softmax's bias absorbs the rest);
- the products q k^T and A v: the uniform rule, each factor's gradient halved (LXT divides q and k by 4,
  v by 2 at the attention function's inputs: the same factors);
- linear and convolution layers: the epsilon rule (the output gradient times z / (z + eps sign(z))),
  biases absorb their share;
- CP-LRP (Ali et al. 2022, as LXT's `cp_LRP` map for ViTs): the same, except that the attention weights are
  constant (q and k detached), so relevance flows only through the values, undivided.
The relevance at the output is the target logit itself (gradient 1); the map is gradient x input at the
pixels, summed over channels by `explain` (`channels=True` keeps them).
Differences from LXT: LXT's efficient ViT example uses zennit's Gamma rule for Linear and Conv2d layers
(ours: epsilon everywhere, as the AttnLRP paper's epsilon-LRP for linear layers; `epsilon=0` is plain
gradient x input, LXT's default for language models); LXT's explicit `linear_epsilon` stabilises with
z + eps for every z (ours: z + eps sign(z), as the project's LRP rules); the identity rule's ratio is
f(x) / x with 0 where x = 0 (LXT: f(x) / (x + 1e-10)).
On torchvision's ViT LXT (lxt/efficient/models/vit_torch.py, `cp_LRP`; it has no AttnLRP map for it) keeps
nn.MultiheadAttention's own forward and detaches query and key (`cp_multi_head_attention_forward`), so its
in_proj and out_proj, which that forward uses as parameters and never calls as modules, get the plain gradient
(no Linear rule); here they get the epsilon rule as timm's qkv / proj do (`epsilon=0`: plain gradient there as
everywhere). The values' relevance (CP-LRP) is the same: only the q / k paths are cut in both.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from ..core.errors import ConfigError
from ..core.explanation import Explanation
from ..core.session import Cost
from ..core.targets import resolve_target, slice_target
from .base import ACTIVATIONS, Param, out_of_place, register, upsample
from .propagation.composites import CONVOLUTIONS
from .propagation.lrp import _pass_hook
from .attention import attention_kind, attention_modules, mha_adds_keys, not_a_vit, token_grid
from .rollout import _VitMethod, _cat

__all__ = ["TransformerAttribution", "AttnLRP", "CPLRP", "vit_blocks", "safe_divide", "attention_forward",
           "mha_attention_forward", "check_rewrite"]


# -- the model's layout ----------------------------------------------------------------------------------
def _identity_or_absent(module, attr):
    part = getattr(module, attr, None)
    return part is None or isinstance(part, nn.Identity)


def _torch_attention_problem(attn: nn.MultiheadAttention) -> str | None:
    if mha_adds_keys(attn):
        return "it adds keys that are not tokens (bias_k / bias_v / add_zero_attn)"
    if not attn._qkv_same_embed_dim or attn.in_proj_weight is None:
        return "its keys / values have their own sizes (kdim / vdim): not self-attention over the tokens"
    return None


def _timm_attention_problem(attn: nn.Module) -> str | None:
    if not isinstance(getattr(attn, "proj", None), nn.Module):
        return "it has no `proj` output layer"
    if attn.qkv.out_features % (3 * attn.num_heads):
        return f"qkv's {attn.qkv.out_features} outputs are not 3 x {attn.num_heads} heads"
    if not all(_identity_or_absent(attn, a) for a in ("q_norm", "k_norm", "norm")):
        return "it normalises q, k or the mixed values (q_norm / k_norm / norm)"
    return None


# where a block holds its attention, and the parts its forward uses: timm's Block, torchvision's EncoderBlock
BLOCK_LAYOUTS = {"timm": ("attn", ("norm1", "norm2", "mlp")),
                 "torch": ("self_attention", ("ln_1", "ln_2", "mlp"))}


def vit_blocks(model: nn.Module, method: str) -> list[tuple[nn.Module, nn.Module, str]]:
    """(block, attention, layout) triples in forward order, layout "timm" (timm's `Block`: `norm1`, `attn` with
    a `qkv` Linear and `proj`, `norm2`, `mlp`) or "torch" (torchvision's `EncoderBlock`: `ln_1`,
    `self_attention` = nn.MultiheadAttention, `ln_2`, `mlp`); or one ConfigError line naming what cannot be
    rewritten."""
    attentions = attention_modules(model)
    if not attentions:
        raise not_a_vit(method, model)
    parents = {}
    for n, m in model.named_modules():
        for kind, (attr, _) in BLOCK_LAYOUTS.items():
            child = getattr(m, attr, None)
            if isinstance(child, nn.Module):
                parents[id(child)] = (n, m, kind)
    triples = []
    for name, attn in attentions:
        kind = attention_kind(attn)
        problem = _torch_attention_problem(attn) if kind == "torch" else _timm_attention_problem(attn)
        attr, parts = BLOCK_LAYOUTS[kind]
        if problem is None:
            if id(attn) not in parents or parents[id(attn)][2] != kind:
                problem = f"no parent block holds it as `{attr}`"
            else:
                block_name, block, _ = parents[id(attn)]
                missing = [a for a in parts if not isinstance(getattr(block, a, None), nn.Module)]
                if missing:
                    problem = f"its block '{block_name}' has no {', '.join(missing)}"
        if problem:
            raise ConfigError(f"method '{method}' cannot rewrite attention module '{name}': {problem}")
        triples.append((parents[id(attn)][1], attn, kind))
    return triples


def _mix_heads(ops, qkv: torch.Tensor, heads: int, scale: float, drop=None) -> torch.Tensor:
    """(B, N, 3 heads d) packed q | k | v (timm's qkv output, nn.MultiheadAttention's in_proj output: the same
    layout) -> (B, N, heads d) = softmax(q k^T * scale) v per head, with `ops` carrying the relevance."""
    B, N, _ = qkv.shape
    head_dim = qkv.shape[-1] // (3 * heads)
    q, k, v = qkv.reshape(B, N, 3, heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    attn = ops.softmax(ops.scores(q, k, scale))
    if drop is not None:
        attn = drop(attn)
    return ops.mix(attn, v).transpose(1, 2).reshape(B, N, heads * head_dim)


def _refuse_masks(attn_mask, is_causal, key_padding_mask=None):
    if attn_mask is not None or is_causal or key_padding_mask is not None:
        raise ConfigError("the relevance rules here cover unmasked self-attention; got an attention mask "
                          "(attn_mask, key_padding_mask or is_causal)")


def attention_forward(module: nn.Module, ops, x: torch.Tensor, attn_mask=None, is_causal: bool = False) -> torch.Tensor:
    """timm's `Attention.forward` (explicit attention), with `ops` choosing how the products and the softmax
    carry relevance. Same values as the module's own forward (up to rounding for a fused one). timm >= 1.0
    blocks pass `attn_mask` / `is_causal`; a mask or causal attention is refused (the rules assume none)."""
    _refuse_masks(attn_mask, is_causal)
    heads = module.num_heads
    scale = getattr(module, "scale", (module.qkv.out_features // (3 * heads)) ** -0.5)
    drop = getattr(module, "attn_drop", None)
    out = _mix_heads(ops, module.qkv(x), heads, scale, drop if isinstance(drop, nn.Module) else None)
    out = module.proj(out)
    drop = getattr(module, "proj_drop", None)
    return drop(out) if isinstance(drop, nn.Module) else out


def mha_attention_forward(module: nn.MultiheadAttention, ops, query, key, value, key_padding_mask=None,
                          need_weights=True, attn_mask=None, average_attn_weights=True, is_causal=False):
    """nn.MultiheadAttention's forward for self-attention (torchvision's `EncoderBlock` calls it with
    query = key = value = x), as the timm attention above: the packed `in_proj_weight` / `in_proj_bias` is
    timm's `qkv` (rows [0:E] q, [E:2E] k, [2E:3E] v, heads contiguous in each: the same layout), through
    `ops.linear` (it is not a module a hook could reach); `out_proj` is called as the module it is. Scale
    1 / sqrt(head_dim), as torch's. Returns (output, weights or None) as the module does."""
    _refuse_masks(attn_mask, is_causal, key_padding_mask)
    if key is not query or value is not query or query.dim() != 3:
        raise ConfigError("the relevance rules here cover batched self-attention: nn.MultiheadAttention must be "
                          "called with query, key and value the same (B, T, E) tensor")
    x = query if module.batch_first else query.transpose(0, 1)
    qkv = ops.linear(x, module.in_proj_weight, module.in_proj_bias)
    seen = []
    drop = None
    if module.training and module.dropout > 0:  # methods run the model in eval mode; kept for equivalence
        def drop(a):
            return F.dropout(a, p=module.dropout)

    def keep(a):
        a = a if drop is None else drop(a)
        seen.append(a)
        return a
    out = module.out_proj(_mix_heads(ops, qkv, module.num_heads, module.head_dim ** -0.5, keep))
    if not module.batch_first:
        out = out.transpose(0, 1)
    if not need_weights:
        return out, None
    return out, seen[0].mean(1) if average_attn_weights else seen[0]


def check_rewrite(method: str, out: torch.Tensor, reference: torch.Tensor) -> None:
    """The rewritten forward must give the model's own outputs (a block or attention that computes something
    else than the layout assumed here is refused, not explained wrongly)."""
    out, reference = out.detach(), reference.detach()
    scale = float(reference.abs().max()) if reference.numel() else 0.0
    tol = 1e-4 if reference.dtype == torch.float64 else 1e-3
    if out.shape != reference.shape or not torch.allclose(out, reference, rtol=tol, atol=tol * max(scale, 1e-6)):
        diff = float((out - reference).abs().max()) if out.shape == reference.shape else float("nan")
        raise ConfigError(f"method '{method}': the rewritten forward does not reproduce the model's outputs (max "
                          f"difference {diff:.3g}); its blocks must compute x + attn(norm1(x)), x + mlp(norm2(x)) "
                          "(torchvision: ln_1, self_attention, ln_2) and its attention softmax(q k^T * scale) v")


def _branch(block, index, h, identity):
    """timm's `drop_path(ls(h))` on a residual branch; LayerScale (element-wise) with the identity rule."""
    ls = getattr(block, f"ls{index}", None)
    if isinstance(ls, nn.Module) and not isinstance(ls, nn.Identity):
        h = identity(ls(h), h)
    drop = getattr(block, f"drop_path{index}", None)
    return drop(h) if isinstance(drop, nn.Module) else h


# -- Chefer et al.'s relprop as switch nodes ------------------------------------------------------------
def safe_divide(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Chefer et al.'s `safe_divide` (modules/layers_ours.py, MIT): a / (b + 1e-9), 0 where b == 0."""
    # theirs: den = b.clamp(min=1e-9) + b.clamp(max=1e-9), which is b + 1e-9 for every b; +1e-9 where that is 0
    den = (b + 1e-9).masked_fill_(b == -1e-9, 1e-9)
    return (a / den).masked_fill_(b == 0, 0.0)


class _Switch(torch.autograd.Function):
    """Returns y (a layer's output, with its own graph) as it is. Backward: in gradient mode the gradient
    goes on into y's own graph; in relevance mode `rule(R, *inputs)` gives the inputs' relevance and y's
    graph is bypassed. One forward thus serves both backward passes (the graph is retained between them)."""

    @staticmethod
    def forward(ctx, state, rule, y, *inputs):
        ctx.state, ctx.rule = state, rule
        ctx.save_for_backward(y, *inputs)
        return y

    @staticmethod
    def backward(ctx, grad):
        y, *inputs = ctx.saved_tensors
        if not ctx.state["relevance"]:
            return (None, None, grad) + (None,) * len(inputs)
        return (None, None, None) + tuple(ctx.rule(grad, y, *inputs))


def _identity_rule(R, y, x):
    return (R,)


def _linear_alpha1(weight):
    """Chefer's `Linear.relprop` with alpha=1 (beta=0): only the x+ W+ and x- W- contributions, no bias."""
    pw, nw = weight.clamp(min=0), weight.clamp(max=0)

    def rule(R, y, x):
        px, nx = x.clamp(min=0), x.clamp(max=0)
        S = safe_divide(R, F.linear(px, pw) + F.linear(nx, nw))
        return (px * (S @ pw) + nx * (S @ nw),)
    return rule


def _scores_rule(scale):
    """einsum('bhid,bhjd->bhij') relprop, halved (`cam_q /= 2`, `cam_k /= 2`); Z = q k^T without the scale."""
    return functools.partial(_scores_relevance, scale)


def _scores_relevance(scale, R, y, q, k):
    S = safe_divide(R, y / scale)
    return q * (S @ k) / 2, k * (S.transpose(-2, -1) @ q) / 2


def _mix_rule(R, y, attn, v):
    """einsum('bhij,bhjd->bhid') relprop, halved (`cam1 /= 2`, `cam_v /= 2`); Z = y, the product itself."""
    S = safe_divide(R, y)
    return attn * (S @ v.transpose(-2, -1)) / 2, v * (attn.transpose(-2, -1) @ S) / 2


def _add_rule(R, y, a, b):
    """Chefer's `Add.relprop`: proportional parts, each rescaled to its share |sum| / (|sum a| + |sum b|)
    of sum R; sums per image (dims after the batch)."""
    S = safe_divide(R, y)
    ra, rb = a * S, b * S
    dims = tuple(range(1, R.dim()))
    sa, sb, total = ra.sum(dims, keepdim=True), rb.sum(dims, keepdim=True), R.sum(dims, keepdim=True)
    fa = safe_divide(sa.abs(), sa.abs() + sb.abs()) * total
    fb = safe_divide(sb.abs(), sa.abs() + sb.abs()) * total
    return ra * safe_divide(fa, sa), rb * safe_divide(fb, sb)


class _CheferOps:
    def __init__(self, state):
        self.state = state

    def switch(self, rule, y, *inputs):
        return _Switch.apply(self.state, rule, y, *inputs)

    def scores(self, q, k, scale):
        return self.switch(_scores_rule(scale), (q * scale) @ k.transpose(-2, -1), q, k)

    def softmax(self, logits):
        return self.switch(_identity_rule, logits.softmax(dim=-1), logits)

    def mix(self, attn, v):
        self.state["attentions"].append(attn)  # the weights whose relevance and gradient the map uses
        return self.switch(_mix_rule, attn @ v, attn, v)

    def identity(self, y, x):
        return self.switch(_identity_rule, y, x)

    def linear(self, x, weight, bias):  # nn.MultiheadAttention's in_proj: the Linear rule, as on timm's qkv
        return self.switch(_linear_alpha1(weight), F.linear(x, weight, bias), x)

    def add(self, a, b):
        return self.switch(_add_rule, a + b, a, b)


def _chefer_block_forward(block, ops, x, **attention_keywords):  # timm >= 1.0: attn_mask, is_causal
    x = ops.add(x, _branch(block, 1, block.attn(block.norm1(x), **attention_keywords), ops.identity))
    return ops.add(x, _branch(block, 2, block.mlp(block.norm2(x)), ops.identity))


def _chefer_encoder_block_forward(block, ops, input):
    """torchvision's `EncoderBlock.forward` (torchvision/models/vision_transformer.py): ln_1, self_attention,
    dropout, + input; ln_2, mlp, + x; the residuals through the Add rule (symmetric in its two parts)."""
    x = block.ln_1(input)
    x, _ = block.self_attention(query=x, key=x, value=x, need_weights=False)
    drop = getattr(block, "dropout", None)
    if isinstance(drop, nn.Module):
        x = drop(x)
    x = ops.add(input, x)
    return ops.add(x, block.mlp(block.ln_2(x)))


BLOCK_FORWARDS = {"timm": _chefer_block_forward, "torch": _chefer_encoder_block_forward}


def _attention_forward(attn, kind, ops):
    return functools.partial(attention_forward if kind == "timm" else mha_attention_forward, attn, ops)


@register
class TransformerAttribution(_VitMethod):
    name = "transformer_attribution"
    description = ("Transformer attribution (Chefer et al. CVPR 2021): LRP relevance of every block's attention "
                   "times its gradient, positive part, head mean, rolled out R += A R; the class token's row "
                   "over the patches. ViTs only.")

    def check(self):
        super().check()  # also: a class token that feeds the head (the map is its row)
        vit_blocks(self.model, self.name)

    def _install(self, session, state):
        ops = _CheferOps(state)
        for block, attn, kind in vit_blocks(self.model, self.name):
            session.set_attr(attn, "forward", _attention_forward(attn, kind, ops))
            session.set_attr(block, "forward", functools.partial(BLOCK_FORWARDS[kind], block, ops))

        def hook(rule_for):
            def fn(module, args, output):
                x = args[0] if args else None
                if not (isinstance(x, torch.Tensor) and isinstance(output, torch.Tensor) and x.requires_grad):
                    return None
                return ops.switch(rule_for(module), output, x)
            return fn

        for module in self.model.modules():
            if isinstance(module, nn.Linear):
                session.hook(module, hook(lambda m: _linear_alpha1(m.weight)))
            elif isinstance(module, (nn.LayerNorm, nn.Softmax) + ACTIVATIONS):
                out_of_place(session, module)
                session.hook(module, hook(lambda m: _identity_rule))

    def compute(self, session, x, target):
        maps, outputs, classes = [], [], []
        state = {"relevance": False, "attentions": []}
        with torch.no_grad():  # the model's own outputs on the first batch, to check the rewrite against
            reference = session.forward(x[:self.batch_size])
        self._install(session, state)
        with torch.enable_grad():
            for start in range(0, x.shape[0], self.batch_size):
                inputs = x[start:start + self.batch_size].detach().requires_grad_(True)
                state["relevance"], state["attentions"] = False, []
                out = session.forward(inputs)
                attentions, state["attentions"] = state["attentions"], []
                if start == 0:
                    check_rewrite(self.name, out, reference)
                if not attentions:
                    raise ConfigError(f"method '{self.name}': the forward pass ran no rewritten attention module")
                resolved = resolve_target(slice_target(target, start, start + len(inputs), len(x)), out)
                score = resolved(out).sum()
                grads = torch.autograd.grad(score, attentions, retain_graph=True, allow_unused=True)
                state["relevance"] = True  # the same graph, now the rules: relevance from the one-hot target
                relevances = torch.autograd.grad(score, attentions, allow_unused=True)
                state["relevance"] = False
                session.charge(Cost(backward_images=2 * len(inputs), backward_calls=2))
                r = None
                for g, rel in zip(grads, relevances):
                    g = torch.zeros_like(rel) if g is None else g
                    rel = torch.zeros_like(g) if rel is None else rel
                    cam = (g * rel).clamp(min=0).mean(1)  # (B, T, T)
                    if r is None:
                        r = torch.eye(cam.shape[-1], dtype=cam.dtype, device=cam.device).expand_as(cam)
                    r = r + cam @ r
                maps.append(token_grid(self.model, r[:, 0], x.shape[-2:]).detach())
                outputs.append(out.detach())
                classes.append(resolved.classes)
        lowres = torch.cat(maps)
        return Explanation(maps=upsample(lowres, x.shape[-2:]), targets=_cat(classes), outputs=torch.cat(outputs),
                           lowres=lowres)


# -- AttnLRP / CP-LRP as gradient x input of a modified forward -------------------------------------------
class _ScaleGrad(torch.autograd.Function):
    """Identity forward; the gradient times `factor` (LXT's `divide_gradient` with factor 1 / `factor`)."""

    @staticmethod
    def forward(ctx, x, factor):
        ctx.factor = factor
        return x

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.factor, None


class _EpsilonGrad(torch.autograd.Function):
    """Identity forward on a linear layer's output z; the gradient times z / (z + eps sign(z)) (epsilon rule
    in gradient x input; a zero z gets +eps)."""

    @staticmethod
    def forward(ctx, z, eps):
        ctx.save_for_backward(z)
        ctx.eps = eps
        return z

    @staticmethod
    def backward(ctx, grad):
        z, = ctx.saved_tensors
        stab = z + ctx.eps * (z.sign() + (z == 0).to(z.dtype))
        return grad * (z / stab), None


def half(x):
    return _ScaleGrad.apply(x, 0.5)


class _AttnLRPOps:
    """The uniform rule on both products; the softmax's own gradient (AttnLRP's softmax rule); the epsilon
    rule on nn.MultiheadAttention's in_proj (as the hooks give it on every Linear module)."""

    def __init__(self, eps: float = 0.0):
        self.eps = eps

    def linear(self, x, weight, bias):
        z = F.linear(x, weight, bias)
        return _EpsilonGrad.apply(z, self.eps) if self.eps > 0 and z.requires_grad else z

    def scores(self, q, k, scale):
        return (half(q) * scale) @ half(k).transpose(-2, -1)

    def softmax(self, logits):
        return logits.softmax(dim=-1)

    def mix(self, attn, v):
        return half(attn) @ half(v)


class _CPLRPOps(_AttnLRPOps):
    """CP-LRP: attention weights constant; relevance only through the values (undivided)."""

    def softmax(self, logits):
        return logits.detach().softmax(dim=-1)

    def mix(self, attn, v):
        return attn @ v


def layer_norm_constant_std(module: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    """LXT's `layer_norm_forward`: (x - mean) / std with std constant, then the affine part."""
    dims = tuple(range(-len(module.normalized_shape), 0))
    centred = x - x.mean(dims, keepdim=True)
    std = (centred.pow(2).mean(dims, keepdim=True) + module.eps).sqrt()
    y = centred / std.detach()
    if module.weight is not None:
        y = y * module.weight
    if module.bias is not None:
        y = y + module.bias
    return y


class _GradientTimesInput(_VitMethod):
    input_space = True
    reads_class_token = False  # gradient x input at the pixels: any head (class token or pooled) is explained
    ops = _AttnLRPOps

    epsilon = Param(1e-6, "epsilon of the epsilon rule on linear and convolution layers (0: plain gradient x input)")

    def check(self):
        super().check()
        if not isinstance(self.epsilon, (int, float)) or isinstance(self.epsilon, bool) or self.epsilon < 0:
            raise ConfigError(f"epsilon must be a number >= 0, got {self.epsilon!r}")
        vit_blocks(self.model, self.name)

    def _install(self, session):
        eps = float(self.epsilon)
        ops = self.ops(eps)
        for _, attn, kind in vit_blocks(self.model, self.name):
            session.set_attr(attn, "forward", _attention_forward(attn, kind, ops))

        def epsilon_hook(module, args, output):
            if isinstance(output, torch.Tensor) and output.requires_grad:
                return _EpsilonGrad.apply(output, eps)
            return None

        for module in self.model.modules():
            if isinstance(module, nn.LayerNorm):
                session.set_attr(module, "forward", functools.partial(layer_norm_constant_std, module))
            elif isinstance(module, ACTIVATIONS):
                out_of_place(session, module)
                session.hook(module, _pass_hook)  # identity rule: c_x = c_y f(x) / x
            elif eps > 0 and isinstance(module, (nn.Linear,) + CONVOLUTIONS):
                session.hook(module, epsilon_hook)

    def compute(self, session, x, target):
        maps, outputs, classes = [], [], []
        with torch.no_grad():  # the model's own outputs on the first batch, to check the rewrite against
            reference = session.forward(x[:self.batch_size])
        self._install(session)
        with torch.enable_grad():
            for start in range(0, x.shape[0], self.batch_size):
                inputs = x[start:start + self.batch_size].detach().requires_grad_(True)
                out = session.forward(inputs)
                if start == 0:
                    check_rewrite(self.name, out, reference)
                resolved = resolve_target(slice_target(target, start, start + len(inputs), len(x)), out)
                grads = session.grad(resolved(out), inputs, create_graph=False)
                maps.append(inputs.detach() * grads)
                outputs.append(out.detach())
                classes.append(resolved.classes)
        return Explanation(maps=torch.cat(maps), targets=_cat(classes), outputs=torch.cat(outputs))


@register
class AttnLRP(_GradientTimesInput):
    name = "attnlrp"
    description = ("AttnLRP (Achtibat et al. ICML 2024): LRP through attention as gradient x input of a modified "
                   "forward (identity rule for GELU, LayerNorm's 1/std constant, softmax rule, uniform split of "
                   "q k^T and A v, epsilon rule). ViTs only.")


@register
class CPLRP(_GradientTimesInput):
    name = "cp_lrp"
    description = ("CP-LRP (Ali et al. 2022, as in AttnLRP's code): attention weights and LayerNorm's 1/std constant, "
                   "identity rule for GELU, epsilon rule; relevance through the values only. ViTs only.")
    ops = _CPLRPOps
