"""Attention weights of vision transformers, read through session edits (shared by the ViT methods).

Two module layouts are recognised, in forward (module-tree) order by `attention_modules`:

- "timm": a module with a `qkv` Linear and `num_heads` (timm's `Attention`, ours in
  saliencylab.models.vit). Its `fused_attn` flag is set to False for the call (timm's default fused
  path, F.scaled_dot_product_attention, never materialises the weights) and a forward hook on its
  `attn_drop` records the (B, heads, T, T) softmax output that then multiplies the values.
- "torch": `nn.MultiheadAttention`, as torchvision's VisionTransformer uses it
  (`encoder.layers.encoder_layer_i.self_attention`, called with `need_weights=False`; torchvision/models/
  vision_transformer.py, `EncoderBlock.forward`). Its `forward` is swapped, as a session edit, for
  `mha_forward`: the math of torch.nn.functional.multi_head_attention_forward written out (packed
  `in_proj_weight`/`in_proj_bias` or separate q/k/v weights, `out_proj`, `batch_first`, masks, dropout
  only in training) that records the per-head (B, heads, T, S) weights, the very tensor that
  multiplies the values, so gradients with respect to it are the true ones. The module is otherwise
  untouched: its parameters are used as they are, and the original `forward` is back at the
  session's (or scope's) exit, also when the call raises. nn.TransformerEncoderLayer's fast path
  (eval mode without gradients) bypasses the attention's `forward`; the global
  `torch.backends.mha` fast-path flag is switched off for the call and restored. `bias_k`/`bias_v`
  and `add_zero_attn` add key positions that are not tokens and are refused.

`capture_attention(session)` applies the edits and returns a dict filled by the next forward pass;
`recorded(model, store)` lists the weights in module order, refusing silently empty captures.
`token_grid(model, row, input_hw)` turns per-token values into the patch grid: the model's
`num_prefix_tokens` leading tokens (timm: class + register tokens; absent, as in torchvision: 1, the
class token) are dropped and the patches arranged as `patch_embed.grid_size` (timm), the input's size
over `patch_size` (torchvision), or the grid of the input's aspect ratio.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..core.errors import ConfigError

__all__ = ["attention_kind", "attention_modules", "capture_attention", "is_vit", "mha_forward", "prefix_tokens",
           "recorded", "token_grid", "VIT_LAYOUTS"]

VIT_LAYOUTS = ("timm-style attention modules (`qkv` Linear, `num_heads`, `attn_drop`)",
               "torch nn.MultiheadAttention (torchvision's VisionTransformer)")


def attention_kind(module: nn.Module) -> str | None:
    """"timm", "torch" or None (not an attention module we can read)."""
    if isinstance(module, nn.MultiheadAttention):
        return "torch"
    if isinstance(getattr(module, "qkv", None), nn.Linear) and hasattr(module, "num_heads"):
        return "timm"
    return None


def attention_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The attention modules of either layout, in forward (module-tree) order."""
    return [(n, m) for n, m in model.named_modules() if attention_kind(m) is not None]


def is_vit(model: nn.Module) -> bool:
    return bool(attention_modules(model))


def not_a_vit(method: str, model: nn.Module) -> ConfigError:
    """The one-line refusal for a model with neither layout."""
    return ConfigError(f"method '{method}' needs a vision transformer with {VIT_LAYOUTS[0]} or {VIT_LAYOUTS[1]}; "
                       f"{type(model).__name__} has neither")


# -- nn.MultiheadAttention written out -----------------------------------------------------------
def _float_mask(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """As torch's `_canonical_mask`: a bool mask (True = not allowed) becomes 0 / -inf, a float mask is added."""
    if mask is None or torch.is_floating_point(mask):
        return mask
    if mask.dtype != torch.bool:
        raise ConfigError(f"only bool and floating attention masks are supported, got {mask.dtype}")
    return torch.zeros_like(mask, dtype=dtype).masked_fill_(mask, float("-inf"))


def mha_adds_keys(module: nn.MultiheadAttention) -> bool:
    """bias_k / bias_v / add_zero_attn append keys that are not tokens: no token-to-token attention to read."""
    return module.bias_k is not None or module.bias_v is not None or module.add_zero_attn


def mha_forward(module: nn.MultiheadAttention, query, key, value, key_padding_mask=None, need_weights=True,
                attn_mask=None, average_attn_weights=True, is_causal=False, *, record=None):
    """`module(query, key, value, ...)` computed explicitly; `record(weights)` gets the (B, heads, L, S)
    attention weights that multiply the values (after dropout, which only acts in training).

    Same math as torch.nn.functional.multi_head_attention_forward's `need_weights=True` branch:
    q = x W_q + b_q (packed `in_proj_weight` rows [0:E], [E:2E], [2E:3E], or `q/k/v_proj_weight`),
    weights = softmax(q k^T / sqrt(head_dim) + masks), out = (weights v) W_o + b_o. `is_causal` is
    only a hint there (the mask must be given), so it is ignored here too. Returns (output, weights or
    None) as `nn.MultiheadAttention.forward` does."""
    if mha_adds_keys(module):
        raise ConfigError("nn.MultiheadAttention with bias_k/bias_v or add_zero_attn adds keys that are not tokens; "
                          "its attention weights cannot be read as token-to-token attention")
    batched = query.dim() == 3
    if not batched:  # (L, E): one sequence
        query, key, value = query[None], key[None], value[None]
        if key_padding_mask is not None:
            key_padding_mask = key_padding_mask[None]
    elif not module.batch_first:  # (L, B, E) -> (B, L, E)
        query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
    B, L, E = query.shape
    S = key.shape[1]
    H, d = module.num_heads, module.head_dim
    if module._qkv_same_embed_dim:
        wq, wk, wv = module.in_proj_weight.chunk(3)
    else:
        wq, wk, wv = module.q_proj_weight, module.k_proj_weight, module.v_proj_weight
    bq = bk = bv = None
    if module.in_proj_bias is not None:
        bq, bk, bv = module.in_proj_bias.chunk(3)
    q = F.linear(query, wq, bq).reshape(B, L, H, d).transpose(1, 2)  # (B, H, L, d)
    k = F.linear(key, wk, bk).reshape(B, S, H, d).transpose(1, 2)
    v = F.linear(value, wv, bv).reshape(B, S, H, d).transpose(1, 2)
    scores = (q * math.sqrt(1.0 / d)) @ k.transpose(-2, -1)  # (B, H, L, S)
    attn_mask = _float_mask(attn_mask, q.dtype)
    if attn_mask is not None:
        scores = scores + (attn_mask if attn_mask.dim() == 2 else attn_mask.reshape(B, H, L, S))
    key_padding_mask = _float_mask(key_padding_mask, q.dtype)
    if key_padding_mask is not None:
        scores = scores + key_padding_mask.reshape(B, 1, 1, S)
    weights = scores.softmax(dim=-1)
    if module.training and module.dropout > 0:
        weights = F.dropout(weights, p=module.dropout)
    if record is not None:
        record(weights)
    out = (weights @ v).transpose(1, 2).reshape(B, L, E)
    out = F.linear(out, module.out_proj.weight, module.out_proj.bias)
    if not batched:
        out = out[0]
    elif not module.batch_first:
        out = out.transpose(0, 1)
    if not need_weights:
        return out, None
    returned = weights.mean(dim=1) if average_attn_weights else weights
    return out, returned if batched else returned[0]


# -- capture ---------------------------------------------------------------------------------------
def capture_attention(session, modules: list[tuple[str, nn.Module]] | None = None) -> dict:
    """Session edits that record every attention module's (B, heads, T, S) weights on the next forward.

    Returns {module name: weights}, filled during the forward pass (the last call wins when a module
    is called twice). The edits are undone at the session's or the enclosing scope's exit."""
    store: dict[str, torch.Tensor] = {}
    modules = attention_modules(session.model) if modules is None else modules
    if any(attention_kind(m) == "torch" for _, m in modules) and torch.backends.mha.get_fastpath_enabled():
        # nn.TransformerEncoderLayer's fast path (eval, no grad) runs the attention's weights without
        # calling its forward; switched off for the call (a global flag, restored at exit).
        torch.backends.mha.set_fastpath_enabled(False)
        session.edit(lambda: torch.backends.mha.set_fastpath_enabled(True), "torch.backends.mha fast path")
    for name, module in modules:
        if attention_kind(module) == "torch":
            def record(weights, name=name):
                store[name] = weights

            def forward(*args, _module=module, _record=record, **kwargs):
                return mha_forward(_module, *args, record=_record, **kwargs)

            session.set_attr(module, "forward", forward)
            continue
        drop = getattr(module, "attn_drop", None)
        if not isinstance(drop, nn.Module):
            raise ConfigError(f"attention module '{name}' has no `attn_drop` submodule to read the weights from")
        if hasattr(module, "fused_attn"):
            session.set_attr(module, "fused_attn", False)

        def hook(_module, _args, output, name=name):
            if isinstance(output, torch.Tensor):
                store[name] = output

        session.hook(drop, hook)
    return store


def recorded(model: nn.Module, store: dict, *, square: bool = True) -> list[torch.Tensor]:
    """The captured weights in module order; a module that recorded nothing is an error, not a gap."""
    names = [n for n, _ in attention_modules(model)]
    missing = [n for n in names if n not in store]
    if missing:
        raise ConfigError(f"no attention weights recorded for {missing} (the module did not run its forward, "
                          f"or did not call attn_drop)")
    weights = [store[n] for n in names]
    if square:
        for n, w in zip(names, weights):
            if w.dim() != 4 or w.shape[-1] != w.shape[-2]:
                raise ConfigError(f"attention module '{n}' is not self-attention over the tokens: "
                                  f"weights of shape {tuple(w.shape)}")
    return weights


# -- token layout ----------------------------------------------------------------------------------
def prefix_tokens(model: nn.Module) -> int:
    """Leading non-patch tokens: timm's `num_prefix_tokens` (class + registers), else 1 (torchvision's class token)."""
    prefix = int(getattr(model, "num_prefix_tokens", 1))
    if prefix < 1:
        raise ConfigError(f"{type(model).__name__} has no class token (num_prefix_tokens={prefix}); "
                          f"rollout reads the class token's row")
    return prefix


def _patch_grid(model: nn.Module, n: int, input_hw) -> tuple[int, int] | None:
    grid = getattr(getattr(model, "patch_embed", None), "grid_size", None)
    if grid is not None and int(grid[0]) * int(grid[1]) == n:  # timm
        return int(grid[0]), int(grid[1])
    patch = getattr(model, "patch_size", None)  # torchvision: an int; timm: patch_embed.patch_size, a pair
    if patch is None:
        patch = getattr(getattr(model, "patch_embed", None), "patch_size", None)
    if isinstance(patch, (tuple, list)):
        patch = patch[0] if len(set(patch)) == 1 else None
    if input_hw is not None:
        H, W = int(input_hw[0]), int(input_hw[1])
        if isinstance(patch, int) and patch > 0 and (H // patch) * (W // patch) == n:
            return H // patch, W // patch
        h = round(math.sqrt(n * H / W))
        if h > 0 and n % h == 0 and h * W == (n // h) * H:  # the input's aspect, exactly
            return h, n // h
    side = math.isqrt(n)
    return (side, side) if side * side == n else None


def token_grid(model: nn.Module, tokens: torch.Tensor, input_hw=None) -> torch.Tensor:
    """(B, T) values of all tokens -> (B, h, w) over the patch tokens (prefix tokens dropped)."""
    prefix = prefix_tokens(model)
    patches = tokens[:, prefix:]
    n = patches.shape[1]
    grid = _patch_grid(model, n, input_hw)
    if grid is None:
        raise ConfigError(f"{n} patch tokens (after {prefix} prefix tokens) do not form a grid of the input's "
                          f"shape; give the model a patch_embed.grid_size")
    return patches.reshape(-1, *grid)
