"""Layers in one place: resolving names, probing a forward pass, feature maps as grids, default layers.

- `resolve_layers(model, spec)`: a dotted name ("blocks.15"), a module, or a list of either ->
  [(name, module)], with did-you-mean on misspelt names; `get_layer` is its one-layer form.
- `probe_layers(session, x, target)`: one forward (and, with a target, one backward) pass that lists
  every named module's outputs in call order with their shape and spatial layout, and whether the
  target's gradient reaches their spatial grid.
- `to_grid(t, input_hw, layout)`: a layer output as a (B, C, h, w) map. A *declared* layout wins over
  the shape heuristic: the caller's `layout=`, else the module's `saliency_layout` attribute
  ("nchw", "nhwc" or "tokens"); the heuristic is the fallback for undeclared modules.
- `find_default_layer(session, x, target, policy)`: the layer CAM methods use when none is given,
  chosen by a named policy from `DEFAULT_LAYER_POLICIES`.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass
from typing import Callable, Sequence, Union

import torch
from torch import nn

from .errors import ConfigError

LAYOUTS = ("nchw", "nhwc", "tokens")
LayerSpec = Union[str, nn.Module, Sequence[Union[str, nn.Module]]]


# -- names -------------------------------------------------------------------------------------
def resolve_layers(model: nn.Module, spec: LayerSpec) -> list[tuple[str, nn.Module]]:
    """[(dotted name, module)] for a dotted name, a module of `model`, or a list of either."""
    items = list(spec) if isinstance(spec, (list, tuple)) else [spec]
    if not items:
        raise ConfigError("no layer given; pass a dotted module name such as 'blocks.15', a module, or a list")
    modules = dict(model.named_modules())
    names = {m: n for n, m in modules.items()}
    out = []
    for item in items:
        if isinstance(item, nn.Module):
            if item not in names or names[item] == "":
                raise ConfigError(f"the layer module given ({type(item).__name__}) is not a submodule of this model")
            out.append((names[item], item))
        elif isinstance(item, str):
            if item == "" or item not in modules:
                close = difflib.get_close_matches(item, [n for n in modules if n], n=3, cutoff=0.5)
                hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
                raise ConfigError(f"model has no layer named '{item}'{hint}")
            out.append((item, modules[item]))
        else:
            raise ConfigError(f"a layer must be a dotted module name such as 'blocks.15' or a module, got {item!r}")
    return out


def get_layer(model: nn.Module, name: str | nn.Module) -> nn.Module:
    """The submodule at a dotted path such as "blocks.15" (a module of `model` is returned as is)."""
    if isinstance(name, (list, tuple)):
        raise ConfigError(f"expected one layer, got {len(name)}")
    return resolve_layers(model, name)[0][1]


def layer_name(model: nn.Module, layer: str | nn.Module) -> str:
    return resolve_layers(model, layer)[0][0]


# -- layouts -----------------------------------------------------------------------------------
def check_layout(layout) -> str | None:
    if layout is not None and layout not in LAYOUTS:
        raise ConfigError(f"unknown layout {layout!r}; choose one of {', '.join(LAYOUTS)} (or None to infer it)")
    return layout


def declared_layout(module: nn.Module | None, layout: str | None = None) -> str | None:
    """The caller's `layout`, else the module's `saliency_layout` attribute, else None (infer)."""
    if layout is not None:
        return check_layout(layout)
    return check_layout(getattr(module, "saliency_layout", None)) if module is not None else None


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


def guess_layout(t: torch.Tensor, input_hw) -> str | None:
    """The shape heuristic: "nchw", "nhwc", "tokens", or None when `t` is not a spatial map."""
    if not isinstance(t, torch.Tensor) or t.dim() not in (3, 4):
        return None
    if t.dim() == 4:
        return "nhwc" if _looks_nhwc(t, input_hw[0] / input_hw[1]) else "nchw"
    return "tokens"


def to_grid(t: torch.Tensor, input_hw: tuple[int, int], layout: str | None = "auto",
            module: nn.Module | None = None, prefix_tokens: int | None = None) -> torch.Tensor:
    """Return a layer output as a (B, C, h, w) feature map (`t` itself when it already is one).

    Handles convolutional maps (B, C, h, w), channels-last maps (B, h, w, C) such as Swin stages,
    and token sequences (B, N, D) from vision transformers, where leading class/register tokens
    are dropped so that the remaining tokens form a grid with the input's aspect ratio. The layout
    is `layout` if given, else `module.saliency_layout` if declared, else guessed from the shape.
    `prefix_tokens` (a ViT's `num_prefix_tokens`: class + register tokens) is tried first for how many
    leading tokens to drop (1 class + 4 registers on a 2x2 grid would otherwise look like 3x3); the
    shape-based guess remains the fallback (a patch embedding's output has no prefix tokens).
    """
    layout = declared_layout(module, None if layout == "auto" else layout)
    if layout is None:
        layout = guess_layout(t, input_hw)
    H, W = input_hw
    aspect = H / W
    if layout == "nchw" and t.dim() == 4:
        return t
    if layout == "nhwc" and t.dim() == 4:
        return t.permute(0, 3, 1, 2)
    if layout == "tokens" and t.dim() == 3:
        B, N, D = t.shape
        # Prefer an exact aspect match (patches tile the input), then allow rounding at the borders.
        known = [int(prefix_tokens)] if prefix_tokens and prefix_tokens < N else []
        for tolerance in (1e-6, 0.25):
            for prefix in [*known, *range(0, min(N - 1, 9))]:
                grid = _grid_for(N - prefix, aspect, tolerance)
                if grid is not None:
                    h, w = grid
                    return t[:, prefix:, :].transpose(1, 2).reshape(B, D, h, w)
        raise ConfigError(f"cannot arrange {N} tokens of layer output {tuple(t.shape)} into a spatial grid")
    if layout is not None and isinstance(t, torch.Tensor) and t.dim() in (3, 4):
        raise ConfigError(f"layer output of shape {tuple(t.shape)} does not have the declared layout '{layout}'")
    shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
    raise ConfigError(
        f"layer output of shape {shape} is not a spatial feature map; choose a convolutional or token layer"
    )


def _looks_nhwc(t: torch.Tensor, aspect: float) -> bool:
    _, a, b, c = t.shape
    spatial_nhwc = abs(a / b - aspect) < 1e-6 and c > a and c > b
    spatial_nchw = abs(b / c - aspect) < 1e-6
    return spatial_nhwc and not (spatial_nchw and a > b)


def spatial_layout(t, input_hw, module: nn.Module | None = None, layout: str | None = None) -> str | None:
    """The layout `to_grid` would use for `t`, or None if `t` is not a spatial map of more than one cell."""
    if not isinstance(t, torch.Tensor) or t.dim() not in (3, 4):
        return None
    chosen = declared_layout(module, layout) or guess_layout(t, input_hw)
    try:
        g = to_grid(t, input_hw, chosen)
    except ConfigError:
        return None
    return chosen if g.shape[-1] * g.shape[-2] > 1 else None


def is_spatial(t, input_hw, module: nn.Module | None = None) -> bool:
    return spatial_layout(t, input_hw, module) is not None


# -- the probe ---------------------------------------------------------------------------------
@dataclass
class LayerInfo:
    """One module call seen by `probe_layers`.

    shape: the output's shape; layout: "nchw" / "nhwc" / "tokens", or None when it is not a spatial map;
    has_gradient: whether the target's gradient reaches the output's spatial grid (None without a target)."""

    name: str
    module: nn.Module
    shape: tuple
    layout: str | None
    has_gradient: bool | None = None


def probe_layers(session, x: torch.Tensor, target=None, *, gradient: bool | None = None) -> list[LayerInfo]:
    """Every named module's tensor outputs on `x`, in call order (a module called twice appears twice).

    Without a target: one no-grad forward pass. With a target (a TargetSpec for the images of `x`, or
    a resolved `core.targets.Target`), or with `gradient=True` (then target None is the predicted
    class): one forward and one backward pass, and `has_gradient` tells whether the target depends on
    each spatial output's grid. The hooks live in a session scope.
    """
    from .targets import Target, resolve_target

    model = session.model
    names = {m: n for n, m in model.named_modules() if n}
    hw = tuple(x.shape[-2:])
    seen: list[tuple[LayerInfo, torch.Tensor | None]] = []
    want_grad = target is not None if gradient is None else bool(gradient)

    def hook(module, args, output):
        if not isinstance(output, torch.Tensor):
            return None
        info = LayerInfo(names[module], module, tuple(output.shape), spatial_layout(output, hw, module))
        if not (want_grad and info.layout is not None):
            seen.append((info, None))
            return None
        # The first spatial output becomes a graph leaf (frozen parameters and an input without
        # gradient put it in no graph); later ones descend from it. The model continues with a copy,
        # so an in-place op downstream (VGG's ReLU(inplace=True)) cannot change the tensor we keep.
        kept = output if output.requires_grad else output.detach().requires_grad_(True)
        seen.append((info, kept))
        return kept.clone()

    with session.scope(), torch.enable_grad() if want_grad else torch.no_grad():
        for module in names:
            session.hook(module, hook)
        out = session.forward(x)
    if want_grad:
        resolved = target if isinstance(target, Target) else resolve_target(target, out.detach())
        tensors = [t for _, t in seen if t is not None]
        grads = session.grad(resolved(out), tensors, create_graph=False) if tensors else []
        grads = iter(grads)
        for info, t in seen:
            if t is not None:
                g = next(grads)
                info.has_gradient = bool(to_grid(g, hw, info.layout).abs().sum() > 0)
    return [info for info, _ in seen]


# -- default layers ----------------------------------------------------------------------------
def last_spatial_with_gradient(layers: list[LayerInfo]) -> LayerInfo | None:
    """The last layer, in call order, whose output is a spatial map the target depends on.

    A transformer's last block output, for instance, is spatial but only its class token reaches
    the head, so its patch tokens carry no gradient; the layer before it is the right choice there,
    and this finds it without a per-architecture table. A fused query/key/value projection (a Linear
    with 3x as many outputs as inputs, timm's `attn.qkv`) is skipped: its channels mix queries, keys and
    values, so the block's input norm before it (pytorch-grad-cam's `blocks[-1].norm1`) is taken."""
    for info in reversed(layers):
        if info.layout is not None and info.has_gradient and not _fused_qkv(info.module):
            return info
    return None


def _fused_qkv(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) and module.out_features == 3 * module.in_features


def last_spatial(layers: list[LayerInfo]) -> LayerInfo | None:
    """The last spatial output in call order, gradient or not (no backward pass needed)."""
    for info in reversed(layers):
        if info.layout is not None:
            return info
    return None


# name -> (policy, whether it needs the target's gradient)
DEFAULT_LAYER_POLICIES: dict[str, tuple[Callable[[list[LayerInfo]], LayerInfo | None], bool]] = {
    "last_spatial_with_gradient": (last_spatial_with_gradient, True),
    "last_spatial": (last_spatial, False),
}


def find_default_layer(session, x: torch.Tensor, target=None, policy: str = "last_spatial_with_gradient") -> str:
    """The default layer's dotted name, chosen by `policy` from a probe of `x` (pass one image: x[:1]).

    `target` is a TargetSpec for the images of `x` or a resolved Target."""
    if policy not in DEFAULT_LAYER_POLICIES:
        from .errors import unknown_name

        raise unknown_name("default-layer policy", policy, DEFAULT_LAYER_POLICIES)
    choose, needs_gradient = DEFAULT_LAYER_POLICIES[policy]
    info = choose(probe_layers(session, x, target if needs_gradient else None, gradient=needs_gradient))
    if info is None:
        raise ConfigError("found no spatial layer the target depends on; pass layer='dotted.name'")
    return info.name
