"""Attention rollout (Abnar & Zuidema, ACL 2020) and gradient-weighted rollout (Chefer et al., ICCV 2021)
on vision transformers, batched over images, without hand-written reshapes.

Attention weights are read by `methods.attention.capture_attention` (session edits, undone at exit):
on timm-style modules (`qkv` Linear, `num_heads`, `attn_drop`; e.g. `blocks[i].attn`, ours in
saliencylab.models.vit) `fused_attn` is set to False (fused attention, timm's default, never
materialises the weights; hooking `attn_drop` then silently collects nothing) and a hook on `attn_drop`
records the (B, heads, T, T) softmax output; on `nn.MultiheadAttention` (torchvision's
VisionTransformer, `encoder.layers.encoder_layer_i.self_attention`) the module's `forward` is swapped
for the same math written out, which exposes the per-head weights in the graph. A model with neither
is refused in one line, and so is an attention module that recorded nothing. Both methods (and the
transformer attribution) read the class token's row, so a model whose head does not read the class token
(timm's `global_pool` other than "token", e.g. "avg"; `has_class_token` False; `num_prefix_tokens` 0) is
refused in one line (`class_token_feeds_head`): that row would not explain its prediction.

`attention_rollout` follows jacobgil/vit-explain (MIT) `vit_rollout.py`, function `rollout`: per block,
heads fused (mean | max | min), the lowest `discard_ratio` of the fused (T x T) matrix's entries set to
zero except entry (0, 0) (the class token's attention to itself), A' = (A + I) / 2 (the residual),
rows re-normalised, R = A'_L ... A'_1; the map is the class token's row of R over the patch tokens.
Token layout (`attention.token_grid`): the model's `num_prefix_tokens` (timm: class + register tokens;
absent, as in torchvision: 1, the class token first) are dropped; the grid is `patch_embed.grid_size`
(timm), the input size over `patch_size` (torchvision), or the input's aspect ratio.

`gradient_rollout` follows hila-chefer/Transformer-MM-Explainability (MIT), `lxmert/lxmert/src/
ExplanationGenerator.py` `avg_heads` + `apply_self_attention_rules` (and the ViT notebook): per block
Abar = mean over heads of (dA/dy * A).clamp(min=0), R <- R + Abar @ R from R = I; the map is the class
token's row of R over the patch tokens. Gradients of the target logit w.r.t. every block's attention
come from one forward and one backward (the true gradients: nothing is detached in between).

Deliberate differences from the authors:
- Batched; vit-explain discards only on the first image of a batch (`flat[0, indices] = 0`).
- Rows are re-normalised with `a / a.sum(-1, keepdim=True)`; vit-explain's `a / a.sum(dim=-1)`
  broadcasts the row sums over columns (divides column j by row j's sum). They agree when
  discard_ratio=0 (rows already sum to 1).
- Maps are the raw rollout values (rollout mass, no division by the maximum as vit-explain's
  `mask / np.max(mask)`); `lowres` is the token grid, `maps` its bilinear upsampling to the input size.
- Chefer et al.'s ViT code runs one image on CUDA; here any device, any batch.
"""

from __future__ import annotations

import torch

from ..core.errors import ConfigError
from ..core.explanation import Explanation
from ..core.targets import resolve_target, slice_target
from .attention import attention_modules, capture_attention, is_vit, not_a_vit, recorded, token_grid
from .base import Method, Param, check_batch_size, register, upsample

__all__ = ["AttentionRollout", "GradientRollout", "attention_modules", "is_vit", "rollout", "token_grid"]

FUSIONS = ("mean", "max", "min")


def discard_lowest(fused: torch.Tensor, ratio: float) -> torch.Tensor:
    """Zero the lowest `ratio` of each (T, T) matrix's entries, except entry (0, 0) (vit-explain)."""
    B, T, _ = fused.shape
    k = int(T * T * ratio)
    if k <= 0:
        return fused
    flat = fused.reshape(B, T * T)
    drop = torch.zeros_like(flat, dtype=torch.bool).scatter_(1, flat.topk(k, -1, largest=False).indices, True)
    drop[:, 0] = False
    return flat.masked_fill(drop, 0.0).reshape(B, T, T)


def class_token_feeds_head(method: str, model) -> None:
    """The maps are the class token's row: refuse (one line) a model whose head does not read the class token
    (timm's `global_pool` other than "token", e.g. "avg"; `has_class_token` False; no prefix token)."""
    prefix = int(getattr(model, "num_prefix_tokens", 1))
    pool = getattr(model, "global_pool", "token")
    if prefix < 1 or not getattr(model, "has_class_token", True):
        reason = f"has no class token (num_prefix_tokens {prefix})"
    elif pool != "token":
        reason = f"pools the tokens for its head (global_pool {pool!r}), not reading the class token"
    else:
        return
    raise ConfigError(f"method '{method}' reads the class token's row, but {type(model).__name__} {reason}: "
                      f"that row would not explain its prediction")


def rollout(attentions, head_fusion: str = "mean", discard_ratio: float = 0.0) -> torch.Tensor:
    """Rollout of per-block (B, heads, T, T) attentions -> (B, T, T)."""
    result = None
    for attn in attentions:
        fused = {"mean": lambda a: a.mean(1), "max": lambda a: a.amax(1), "min": lambda a: a.amin(1)}[head_fusion](attn)
        fused = discard_lowest(fused, discard_ratio)
        eye = torch.eye(fused.shape[-1], dtype=fused.dtype, device=fused.device)
        a = (fused + eye) / 2
        a = a / a.sum(-1, keepdim=True)
        result = a if result is None else a @ result
    return result


class _VitMethod(Method):
    requires = "vit"
    input_space = False  # maps live on the token grid, upsampled

    batch_size = Param(32, "images per pass")
    reads_class_token = True  # the map is the class token's row (AttnLRP / CP-LRP: False, maps at the pixels)

    def check(self):
        check_batch_size(self.batch_size)
        if not is_vit(self.model):
            raise not_a_vit(self.name, self.model)
        if self.reads_class_token:
            class_token_feeds_head(self.name, self.model)


@register
class AttentionRollout(_VitMethod):
    name = "attention_rollout"
    description = ("Attention rollout (Abnar & Zuidema 2020): attention matrices with the residual identity, "
                   "multiplied over blocks; the class token's row over the patches. ViTs only; class-agnostic.")
    uses_gradients = False

    head_fusion = Param("mean", "how heads are fused: mean, max or min")
    discard_ratio = Param(0.0, "fraction of each fused attention matrix's lowest entries set to zero (vit-explain uses 0.9)")

    def check(self):
        super().check()
        if self.head_fusion not in FUSIONS:
            raise ConfigError(f"head_fusion must be one of {FUSIONS}, got {self.head_fusion!r}")
        if not isinstance(self.discard_ratio, (int, float)) or not 0 <= self.discard_ratio < 1:
            raise ConfigError(f"discard_ratio must be a number in [0, 1), got {self.discard_ratio!r}")

    def compute(self, session, x, target):
        maps, outputs, classes = [], [], []
        with torch.no_grad():
            for start in range(0, x.shape[0], self.batch_size):
                inputs = x[start:start + self.batch_size]
                with session.scope():
                    store = capture_attention(session)
                    out = session.forward(inputs)
                attentions = recorded(self.model, store)
                resolved = resolve_target(slice_target(target, start, start + len(inputs), len(x)), out)
                r = rollout([a.float() for a in attentions], self.head_fusion, float(self.discard_ratio))
                maps.append(token_grid(self.model, r[:, 0], x.shape[-2:]))
                outputs.append(out)
                classes.append(resolved.classes)
        lowres = torch.cat(maps)
        return Explanation(maps=upsample(lowres, x.shape[-2:]), targets=_cat(classes), outputs=torch.cat(outputs),
                           lowres=lowres)


@register
class GradientRollout(_VitMethod):
    name = "gradient_rollout"
    description = ("Gradient-weighted attention rollout (Chefer et al. ICCV 2021): per block the head mean of "
                   "(gradient x attention)+, R += A R; the class token's row over the patches. ViTs only.")

    def compute(self, session, x, target):
        maps, outputs, classes = [], [], []
        with torch.enable_grad():
            for start in range(0, x.shape[0], self.batch_size):
                inputs = x[start:start + self.batch_size].detach().requires_grad_(True)  # keeps the graph whole
                with session.scope():
                    store = capture_attention(session)
                    out = session.forward(inputs)
                attentions = recorded(self.model, store)
                resolved = resolve_target(slice_target(target, start, start + len(inputs), len(x)), out)
                grads = session.grad(resolved(out), attentions, create_graph=False)
                r = None
                for a, g in zip(attentions, grads):
                    cam = (g.detach() * a.detach()).clamp(min=0).mean(1).float()  # (B, T, T)
                    if r is None:
                        r = torch.eye(cam.shape[-1], dtype=cam.dtype, device=cam.device).expand_as(cam)
                    r = r + cam @ r
                maps.append(token_grid(self.model, r[:, 0], x.shape[-2:]))
                outputs.append(out.detach())
                classes.append(resolved.classes)
        lowres = torch.cat(maps)
        return Explanation(maps=upsample(lowres, x.shape[-2:]), targets=_cat(classes), outputs=torch.cat(outputs),
                           lowres=lowres)


def _cat(classes):
    return None if any(c is None for c in classes) else torch.cat([c.cpu() for c in classes])
