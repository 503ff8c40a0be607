"""Layers by dotted name, feature maps as spatial grids, and the default layer for CAM methods."""

from __future__ import annotations

import difflib
import math

import torch
from torch import nn

from .errors import ConfigError


def get_layer(model: nn.Module, name: str | nn.Module) -> nn.Module:
    """The submodule at a dotted path such as "blocks.15" (or the module itself if given one)."""
    if isinstance(name, nn.Module):
        return name
    modules = dict(model.named_modules())
    if name in modules and name != "":
        return modules[name]
    close = difflib.get_close_matches(name, [n for n in modules if n], n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    raise ConfigError(f"model has no layer named '{name}'{hint}")


def _grid_for(n: int, aspect: float, tolerance: float) -> tuple[int, int] | None:
    """Factor n tokens into an (h, w) grid with h / w within `tolerance` (relative) of the input's aspect."""
    h = round(math.sqrt(n * aspect))
    for dh in (0, -1, 1, -2, 2):
        hh = h + dh
        if hh > 0 and n % hh == 0:
            ww = n // hh
            if abs(hh / ww - aspect) <= tolerance * aspect:
                return hh, ww
    return None


def to_grid(t: torch.Tensor, input_hw: tuple[int, int], layout: str = "auto") -> torch.Tensor:
    """Return a layer output as a (B, C, h, w) feature map.

    Handles convolutional maps (B, C, h, w), channels-last maps (B, h, w, C) such as Swin stages,
    and token sequences (B, N, D) from vision transformers, where leading class/register tokens
    are dropped so that the remaining tokens form a grid with the input's aspect ratio.
    """
    H, W = input_hw
    aspect = H / W
    if layout == "nchw" or (layout == "auto" and t.dim() == 4 and not _looks_nhwc(t, aspect)):
        if t.dim() != 4:
            raise ConfigError(f"layer output of shape {tuple(t.shape)} is not a (B, C, h, w) feature map")
        return t
    if layout == "nhwc" or (layout == "auto" and t.dim() == 4):
        return t.permute(0, 3, 1, 2)
    if t.dim() == 3 and layout in ("auto", "tokens"):
        B, N, D = t.shape
        # Prefer an exact aspect match (patches tile the input), then allow rounding at the borders.
        for tolerance in (1e-6, 0.25):
            for prefix in range(0, min(N - 1, 9)):
                grid = _grid_for(N - prefix, aspect, tolerance)
                if grid is not None:
                    h, w = grid
                    return t[:, prefix:, :].transpose(1, 2).reshape(B, D, h, w)
        raise ConfigError(f"cannot arrange {N} tokens of layer output {tuple(t.shape)} into a spatial grid")
    raise ConfigError(
        f"layer output of shape {tuple(t.shape)} is not a spatial feature map; choose a convolutional or token layer"
    )


def _looks_nhwc(t: torch.Tensor, aspect: float) -> bool:
    _, a, b, c = t.shape
    spatial_nhwc = abs(a / b - aspect) < 1e-6 and c > a and c > b
    spatial_nchw = abs(b / c - aspect) < 1e-6
    return spatial_nhwc and not (spatial_nchw and a > b)


def is_spatial(t, input_hw) -> bool:
    if not isinstance(t, torch.Tensor) or t.dim() not in (3, 4):
        return False
    try:
        g = to_grid(t, input_hw)
    except ConfigError:
        return False
    return g.shape[-1] * g.shape[-2] > 1


def find_default_layer(session, x: torch.Tensor, target) -> str:
    # `target` is a resolved Target for the batch `x`; only the first image is probed.
    """The last layer, in execution order, whose output is a spatial map the target depends on.

    One probing forward/backward pass: a transformer's last block output, for instance, is spatial
    but only its class token reaches the head, so its patch tokens carry no gradient; the previous
    layer is the right choice there, and this finds it without a per-architecture table.
    """
    model = session.model
    order: list[tuple[str, torch.Tensor]] = []
    names = {m: n for n, m in model.named_modules() if n}
    hw = tuple(x.shape[-2:])

    def hook(module, args, output):
        if module in names and is_spatial(output, hw):
            if not output.requires_grad:
                leaf = output.detach().requires_grad_(True)
                order.append((names[module], leaf))
                # A copy goes on: an in-place op downstream (VGG's ReLU(inplace=True)) may not modify a leaf.
                return leaf.clone()
            order.append((names[module], output))
        return None

    handles = [session.add_forward_hook(m, hook) for m in names]
    try:
        out = session.forward(x[:1])
        score = target.for_images(torch.tensor([0]))(out)
        tensors = [o for _, o in order]
        grads = torch.autograd.grad(score.sum(), tensors, allow_unused=True) if tensors else []
        session.cost.backward_images += 1
        session.cost.backward_calls += 1
    finally:
        for h in handles:
            h.remove()
    for (name, _), g in reversed(list(zip(order, grads))):
        # Only the grid counts: after a transformer's last block the class token alone has gradient.
        if g is not None and bool(to_grid(g, hw).abs().sum() > 0):
            return name
    raise ConfigError("found no spatial layer the target depends on; pass layer='dotted.name'")
