"""Class activation maps from a layer's activations and gradients: Grad-CAM, Grad-CAM++, LayerCAM.

All three take one forward and one backward pass per image. The layer's output is captured as a
graph leaf, so the backward pass stops there instead of running down to the input. Feature maps may
be (B, C, h, w), channels-last (B, h, w, C) or transformer tokens (B, N, D); `layers.to_grid` turns
them into a (B, C, h, w) grid (dropping class/register tokens), so no reshape function is needed.

Maps are returned at the layer's resolution (also kept as `last_lowres`) and upsampled bilinearly
to the input's size by the base class.
"""

from __future__ import annotations

from typing import Callable

import torch

from ..core.errors import ConfigError
from ..core.layers import find_default_layer, get_layer, to_grid
from ..core.targets import resolve_target, slice_target
from .base import Method, check_batch_size, register


def gradcam_combine(acts: torch.Tensor, grads: torch.Tensor, positive_gradients: bool = False) -> torch.Tensor:
    """Grad-CAM (Selvaraju et al. 2017): channels weighted by their spatially averaged gradient.

    `positive_gradients` averages relu(gradient) instead (the positive aggregation of Khakzar et al.).
    """
    g = grads.clamp(min=0) if positive_gradients else grads
    weights = g.mean(dim=(2, 3), keepdim=True)
    return (weights * acts).sum(dim=1)


def gradcam_plus_plus_combine(acts: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
    """Grad-CAM++ (Chattopadhay et al. 2018) in the closed form used by pytorch-grad-cam.

    alpha = g^2 / (2 g^2 + sum_ij(A) g^3), weights = sum_ij alpha * relu(g). The paper derives alpha
    for an exponentiated score; like pytorch-grad-cam we use the raw score's gradients. Where the
    denominator is zero alpha is set to 0 (pytorch-grad-cam adds an epsilon instead).
    """
    g2 = grads * grads
    g3 = g2 * grads
    denom = 2 * g2 + acts.sum(dim=(2, 3), keepdim=True) * g3
    nonzero = denom != 0
    alpha = torch.where(nonzero, g2 / torch.where(nonzero, denom, torch.ones_like(denom)), torch.zeros_like(g2))
    weights = (alpha * grads.clamp(min=0)).sum(dim=(2, 3), keepdim=True)
    return (weights * acts).sum(dim=1)


def layercam_combine(acts: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
    """LayerCAM (Jiang et al. 2021): every activation weighted by its own positive gradient."""
    return (grads.clamp(min=0) * acts).sum(dim=1)


class _CAM(Method):
    """Shared loop: capture the layer, one forward and backward per image, combine per chunk."""

    input_space = False

    def __init__(self, model, **params):
        super().__init__(model, **params)
        check_batch_size(self.batch_size)
        if self.layer is not None and not isinstance(self.layer, (str, torch.nn.Module)):
            raise ConfigError(f"layer must be a dotted module name such as 'blocks.15', got {self.layer!r}")
        if self.layer is not None:
            get_layer(model, self.layer)  # fail now on a misspelt name, with suggestions
        self._default_layer: str | None = None
        self.last_lowres: torch.Tensor | None = None
        self.last_layer: str | None = None

    def combine(self, acts: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def layer_name(self, session, x: torch.Tensor) -> str:
        """The user's layer, or the default layer found once (on the first image) and cached."""
        if self.layer is not None:
            if isinstance(self.layer, torch.nn.Module):
                names = {m: n for n, m in session.model.named_modules()}
                if self.layer not in names:
                    raise ConfigError("the layer module given is not part of this model")
                return names[self.layer]
            return self.layer
        if self._default_layer is None:
            with torch.no_grad():
                out = session.forward(x[:1])
            probe = resolve_target(slice_target(self._target_spec, 0, 1, len(x)), out)
            self._default_layer = find_default_layer(session, x[:1], probe)
        return self._default_layer

    def _attribute(self, session, x, target):
        return cam_maps(self, session, x, self.combine, self.relu, self.batch_size)


def cam_maps(method: _CAM, session, x: torch.Tensor, combine: Callable, relu: bool, batch_size: int) -> torch.Tensor:
    """(B, h, w) maps at the layer's resolution; records targets and outputs on `method`."""
    check_batch_size(batch_size)
    name = method.layer_name(session, x)
    store = session.capture({name: get_layer(session.model, name)})
    hw = tuple(x.shape[-2:])
    maps, outputs, classes = [], [], []
    for start in range(0, x.shape[0], batch_size):
        inputs = x[start : start + batch_size]
        store.clear()
        out = session.forward(inputs)
        if name not in store:
            raise ConfigError(f"layer '{name}' did not produce a tensor during the forward pass; choose another layer")
        target = resolve_target(slice_target(method._target_spec, start, start + len(inputs), len(x)), out)
        acts = store[name]
        grads = session.grad(target(out), acts, rows=len(inputs))
        cam = combine(to_grid(acts.detach(), hw), to_grid(grads, hw))
        maps.append(cam.clamp(min=0) if relu else cam)
        outputs.append(out.detach())
        classes.append(target.classes)
    method.record(torch.cat(outputs), None if classes[0] is None else torch.cat(classes))
    method.last_layer = name
    method.last_lowres = torch.cat(maps).detach()
    return method.last_lowres


@register
class GradCAM(_CAM):
    name = "gradcam"
    description = "Grad-CAM: layer activations weighted by spatially averaged gradients, then ReLU."

    def __init__(self, model, *, layer=None, relu: bool = True, positive_gradients: bool = False,
                 batch_size: int = 32):
        super().__init__(model, layer=layer, relu=relu, positive_gradients=positive_gradients,
                         batch_size=batch_size)

    def combine(self, acts, grads):
        return gradcam_combine(acts, grads, self.positive_gradients)


@register
class GradCAMPlusPlus(_CAM):
    name = "gradcam_plus_plus"
    description = "Grad-CAM++: channel weights from higher-order gradient terms (pytorch-grad-cam form)."

    def __init__(self, model, *, layer=None, relu: bool = True, batch_size: int = 32):
        super().__init__(model, layer=layer, relu=relu, batch_size=batch_size)

    def combine(self, acts, grads):
        return gradcam_plus_plus_combine(acts, grads)


@register
class LayerCAM(_CAM):
    name = "layercam"
    description = "LayerCAM: activations weighted element-wise by their positive gradients, then ReLU."

    def __init__(self, model, *, layer=None, relu: bool = True, batch_size: int = 32):
        super().__init__(model, layer=layer, relu=relu, batch_size=batch_size)

    def combine(self, acts, grads):
        return layercam_combine(acts, grads)
