"""A small vision transformer we ship, written timm-style so that ViT methods work on it and on timm models.

Module names and the attention's flags follow timm's `VisionTransformer` (timm/models/vision_transformer.py,
Apache-2.0; no timm import here): `patch_embed.proj` (Conv2d), `cls_token`, optional `reg_token`,
`pos_embed`, `blocks[i]` (pre-norm: `norm1`, `attn`, `norm2`, `mlp` with `fc1`, GELU, `fc2`), `norm`,
`head`; `num_prefix_tokens` = 1 class token + `reg_tokens` register tokens (Darcet et al. 2024), placed
before the patch tokens as timm does. `Attention.fused_attn` True (timm's default) calls
F.scaled_dot_product_attention, which never materialises the attention weights; False runs the explicit
softmax(q k^T * scale) whose output passes through `attn_drop`, where explanation methods read it.

Differences from timm: no drop-path, layer scale, q/k norm or pre-logits. As timm's `_pos_embed` with
`no_embed_class=False`, the positional embedding covers every prefix token and the patches; the class
token's final state is the head's input (timm's `global_pool="token"`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["Attention", "Mlp", "Block", "PatchEmbed", "VisionTransformer", "small_vit"]


class PatchEmbed(nn.Module):
    def __init__(self, img_size: int, patch_size: int, in_chans: int, dim: int):
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f"img_size {img_size} is not a multiple of patch_size {patch_size}")
        self.grid_size = (img_size // patch_size, img_size // patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, N, dim), row-major over the grid


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, fused_attn: bool = True):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.fused_attn = fused_attn
        self.qkv = nn.Linear(dim, dim * 3)
        self.attn_drop = nn.Dropout(0.0)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(0.0)

    def forward(self, x):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        if self.fused_attn:
            x = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop.p if self.training else 0.0)
        else:
            attn = (q * self.scale) @ k.transpose(-2, -1)
            attn = attn.softmax(dim=-1)
            attn = self.attn_drop(attn)  # (B, heads, N, N): where rollout reads the weights
            x = attn @ v
        x = x.transpose(1, 2).reshape(B, N, C)
        return self.proj_drop(self.proj(x))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class VisionTransformer(nn.Module):
    def __init__(self, num_classes: int, img_size: int = 32, patch_size: int = 4, in_chans: int = 3,
                 dim: int = 64, depth: int = 4, heads: int = 4, reg_tokens: int = 0, mlp_ratio: float = 4.0):
        super().__init__()
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, dim)
        self.num_reg_tokens = reg_tokens
        self.num_prefix_tokens = 1 + reg_tokens
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.reg_token = nn.Parameter(torch.zeros(1, reg_tokens, dim)) if reg_tokens else None
        self.pos_embed = nn.Parameter(torch.randn(1, self.num_prefix_tokens + self.patch_embed.num_patches, dim) * 0.02)
        self.blocks = nn.Sequential(*[Block(dim, heads, mlp_ratio) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Linear(dim, num_classes)
        nn.init.normal_(self.cls_token, std=1e-6)
        if self.reg_token is not None:
            nn.init.normal_(self.reg_token, std=1e-6)

    def forward_features(self, x):
        x = self.patch_embed(x)
        prefix = [self.cls_token] + ([self.reg_token] if self.reg_token is not None else [])
        x = torch.cat([t.expand(x.shape[0], -1, -1) for t in prefix] + [x], dim=1) + self.pos_embed
        return self.norm(self.blocks(x))

    def forward(self, x):
        return self.head(self.forward_features(x)[:, 0])


def small_vit(num_classes: int, img_size: int = 32, patch_size: int = 4, dim: int = 64, depth: int = 4,
              heads: int = 4, reg_tokens: int = 0) -> VisionTransformer:
    """A small timm-style ViT (random weights), e.g. for the ground-truth environments' 32x32 images."""
    return VisionTransformer(num_classes, img_size=img_size, patch_size=patch_size, dim=dim, depth=depth,
                             heads=heads, reg_tokens=reg_tokens)
