"""Choosing bottleneck layers: probing the model's execution order and output shapes, default picks."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...core.errors import ConfigError
from .bottleneck import is_nchw


@dataclass
class LayerInfo:
    name: str
    shape: tuple | None  # output shape without batch, None when not a tensor
    calls: int
    nchw: bool

    @property
    def depth(self) -> int:
        return self.name.count(".")


def probe_layers(session, x: torch.Tensor) -> list[LayerInfo]:
    """Every named module in execution order with its output shape and calls, from one forward of x[:1]."""
    names = {m: n for n, m in session.model.named_modules() if n}
    infos: dict[str, LayerInfo] = {}
    hw = tuple(x.shape[-2:])

    def hook(module, args, out):
        name = names.get(module)
        if name is None:
            return
        if name in infos:
            infos[name].calls += 1
            return
        shape = tuple(out.shape[1:]) if isinstance(out, torch.Tensor) else None
        nchw = shape is not None and is_nchw(shape, hw) and shape[1] * shape[2] > 1
        infos[name] = LayerInfo(name, shape, 1, nchw)

    with session.scope(), torch.no_grad():
        for m in names:
            session.hook(m, hook, "forward")
        session.forward(x[:1])
    return list(infos.values())


def _candidate_group(infos: list[LayerInfo]) -> list[LayerInfo]:
    cands = [i for i in infos if i.nchw and i.calls == 1]
    if not cands:
        raise ConfigError("found no layer with a spatial (C, h, w) output that runs once; pass layer='dotted.name'")
    for depth in sorted({c.depth for c in cands}):
        group = [c for c in cands if c.depth == depth]
        if len(group) >= 4:
            return group
    return cands


def default_layers(infos: list[LayerInfo], k: int = 1) -> list[str]:
    """The default bottleneck layer(s): among modules with a (C, h, w) output that run once, take those
    at the shallowest module depth that has at least four of them (top-level layers of a flat CNN,
    blocks.N of the embedded model), in execution order, and pick the middle one (k=1) or k evenly
    spaced inner ones (k=3: at 1/4, 1/2, 3/4)."""
    group = _candidate_group(infos)
    if k == 1:
        return [group[len(group) // 2].name]
    picks = sorted({min(len(group) - 1, len(group) * (i + 1) // (k + 1)) for i in range(k)})
    return [group[p].name for p in picks]


def layer_list(layer) -> list[str] | None:
    """None, a name, a module, a comma-separated string or a sequence of names -> list of names or None."""
    if layer is None:
        return None
    if isinstance(layer, str):
        names = [n.strip() for n in layer.split(",") if n.strip()]
        if not names:
            raise ConfigError("layer is an empty string; pass a dotted module name such as 'blocks.4'")
        return names
    if isinstance(layer, torch.nn.Module):
        return [layer]
    if isinstance(layer, (list, tuple)):
        return [n for item in layer for n in (layer_list(item) or [])]
    raise ConfigError(f"layer must be a dotted module name such as 'blocks.4' (or a list of them), got {layer!r}")


def module_name(model, layer) -> str:
    if isinstance(layer, torch.nn.Module):
        for n, m in model.named_modules():
            if m is layer and n:
                return n
        raise ConfigError("the layer module given is not part of this model")
    return layer


