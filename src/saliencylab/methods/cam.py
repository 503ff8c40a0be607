"""Class activation maps from a layer's activations and gradients: Grad-CAM, Grad-CAM++, LayerCAM.

All three take one forward and one backward pass per image. The layer's output is captured as a
graph leaf, so the backward pass stops there instead of running down to the input. Feature maps may
be (B, C, h, w), channels-last (B, h, w, C) or transformer tokens (B, N, D); `layers.to_grid` turns
them into a (B, C, h, w) grid (dropping class/register tokens), so no reshape function is needed.

The layer is a dotted name or a module (`layer=`); without one, the default layer is found per call
by a probe of the call's first image (`core.layers.find_default_layer`, policy `default_layer`). A
layer's layout is declared by `layout=` or the module's `saliency_layout` attribute, else inferred.
The explanation's `extras["layer"]` is the layer's name (also when chosen automatically) and
`lowres` the map at the layer's resolution; `maps` are upsampled bilinearly to the input's size.

Differentiable: with `create_graph=True` the activations are not detached and the layer gradient
keeps its graph, so maps at any layer carry gradient to the parameters (through the upsampling).
"""

from __future__ import annotations

from typing import Callable

import torch

from ..core.errors import ConfigError
from ..core.explanation import Explanation
from ..core.layers import DEFAULT_LAYER_POLICIES, check_layout, declared_layout, find_default_layer, \
    resolve_layers, to_grid
from ..core.targets import resolve_target, slice_target
from .base import Method, Param, check_batch_size, register


def gradcam_combine(acts: torch.Tensor, grads: torch.Tensor, positive_gradients: bool = False) -> torch.Tensor:
    """Grad-CAM (Selvaraju et al. 2017): channels weighted by their spatially averaged gradient.

    `positive_gradients` averages relu(gradient) instead (the positive aggregation of Khakzar et al.).
    """
    g = grads.clamp(min=0) if positive_gradients else grads
    weights = g.mean(dim=(2, 3), keepdim=True)
    return (weights * acts).sum(dim=1)


def gradcam_plus_plus_combine(acts: torch.Tensor, grads: torch.Tensor, positive_gradients: bool = True) -> torch.Tensor:
    """Grad-CAM++ (Chattopadhay et al. 2018) in the closed form used by pytorch-grad-cam.

    alpha = g^2 / (2 g^2 + sum_ij(A) g^3), weights = sum_ij alpha * relu(g). The paper derives alpha
    for an exponentiated score; like pytorch-grad-cam we use the raw score's gradients. Where the
    denominator is zero alpha is set to 0 (pytorch-grad-cam adds an epsilon instead).
    `positive_gradients=False` sums alpha * gradient instead (no positive aggregation; Khakzar et al.).
    """
    g2 = grads * grads
    g3 = g2 * grads
    denom = 2 * g2 + acts.sum(dim=(2, 3), keepdim=True) * g3
    nonzero = denom != 0
    alpha = torch.where(nonzero, g2 / torch.where(nonzero, denom, torch.ones_like(denom)), torch.zeros_like(g2))
    weights = (alpha * (grads.clamp(min=0) if positive_gradients else grads)).sum(dim=(2, 3), keepdim=True)
    return (weights * acts).sum(dim=1)


def layercam_combine(acts: torch.Tensor, grads: torch.Tensor, positive_gradients: bool = True) -> torch.Tensor:
    """LayerCAM (Jiang et al. 2021): every activation weighted by its own positive gradient
    (`positive_gradients=False`: by its signed gradient)."""
    return ((grads.clamp(min=0) if positive_gradients else grads) * acts).sum(dim=1)


class _CAM(Method):
    """Shared loop: capture the layer, one forward and backward per image, combine per chunk."""

    input_space = False
    differentiable = True

    layer = Param(None, "dotted module name or module; None: found per call (default_layer policy)")
    relu = Param(True, "clamp the map at zero")
    layout = Param(None, "the layer output's layout: 'nchw', 'nhwc', 'tokens'; None: declared or inferred")
    default_layer = Param("last_spatial_with_gradient", "policy choosing the layer when none is given")
    batch_size = Param(32, "images per forward+backward pass")

    def check(self):
        check_batch_size(self.batch_size)
        check_layout(self.layout)
        if self.layer is not None:
            if isinstance(self.layer, (list, tuple)):
                raise ConfigError(f"{self.name} explains one layer; got {len(self.layer)}")
            resolve_layers(self.model, self.layer)  # fail now on a misspelt name, with suggestions
        if self.default_layer not in DEFAULT_LAYER_POLICIES:
            from ..core.errors import unknown_name

            raise unknown_name("default-layer policy", self.default_layer, DEFAULT_LAYER_POLICIES)

    def combine(self, acts: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def compute(self, session, x, target):
        if self.layer is not None:
            spec = self.layer
        else:  # per call, on the call's first image and target: nothing is cached across calls
            spec = find_default_layer(session, x[:1], slice_target(target, 0, 1, len(x)), self.default_layer)
        ((name, module),) = resolve_layers(session.model, spec)
        maps, outputs, classes = cam_maps(session, x, target, name, module, self.combine, self.relu,
                                          self.batch_size, declared_layout(module, self.layout))
        lowres = maps if session.differentiable else maps.detach()
        return Explanation(maps=maps, targets=classes, outputs=outputs, lowres=lowres, extras={"layer": name})


def cam_maps(session, x: torch.Tensor, target, name: str, module, combine: Callable, relu: bool,
             batch_size: int, layout: str | None = None):
    """(B, h, w) maps at the layer's resolution, the outputs and the target classes.

    `target` is the user's TargetSpec for the B images, resolved chunk by chunk in the same pass."""
    check_batch_size(batch_size)
    hw = tuple(x.shape[-2:])
    maps, outputs, classes = [], [], []
    prefix = getattr(session.model, "num_prefix_tokens", None)  # class + register tokens of a ViT
    with session.scope():
        store = session.capture({name: module})
        for start in range(0, x.shape[0], batch_size):
            inputs = x[start : start + batch_size]
            store.clear()
            out = session.forward(inputs)
            if name not in store:
                raise ConfigError(f"layer '{name}' did not produce a tensor during the forward pass; "
                                  "choose another layer")
            resolved = resolve_target(slice_target(target, start, start + len(inputs), len(x)), out)
            acts = store[name]
            grads = session.grad(resolved(out), acts, rows=len(inputs))
            # In a differentiable session the activations stay in the graph (maps depend on them twice).
            acts = acts if session.differentiable else acts.detach()
            cam = combine(to_grid(acts, hw, layout, prefix_tokens=prefix),
                          to_grid(grads, hw, layout, prefix_tokens=prefix))
            maps.append(cam.clamp(min=0) if relu else cam)
            outputs.append(out.detach())
            classes.append(resolved.classes)
    return torch.cat(maps), torch.cat(outputs), None if classes[0] is None else torch.cat(classes)


@register
class GradCAM(_CAM):
    name = "gradcam"
    description = "Grad-CAM: layer activations weighted by spatially averaged gradients, then ReLU."
    positive_gradients = Param(False, "average relu(gradient) instead (Khakzar et al.'s positive aggregation)")

    def combine(self, acts, grads):
        return gradcam_combine(acts, grads, self.positive_gradients)


@register
class GradCAMPlusPlus(_CAM):
    name = "gradcam_plus_plus"
    description = "Grad-CAM++: channel weights from higher-order gradient terms (pytorch-grad-cam form)."
    positive_gradients = Param(True, "weights from relu(gradient) as the paper; False: signed gradients")

    def combine(self, acts, grads):
        return gradcam_plus_plus_combine(acts, grads, self.positive_gradients)


@register
class LayerCAM(_CAM):
    name = "layercam"
    description = "LayerCAM: activations weighted element-wise by their positive gradients, then ReLU."
    positive_gradients = Param(True, "weight by relu(gradient) as the paper; False: signed gradients")

    def combine(self, acts, grads):
        return layercam_combine(acts, grads, self.positive_gradients)


@register
class ScoreCAM(_CAM):
    """Score-CAM (Wang et al. 2020; authors' code haofanwang/Score-CAM, cam/scorecam.py): each channel
    k of the layer's activations, upsampled bilinearly to the image and min-max scaled to [0, 1], masks
    the image (x * mask); its weight is the target's softmax probability on that masked image, and
    the map is relu(sum_k weight_k * upsampled A_k). Channels that are constant are skipped (weight 0),
    as the authors. All channels of all images are scored in shared forward passes (the perturbation
    engine), one row per (image, channel): C + 1 forward passes per image, no backward pass (a probe
    finds the default layer when none is given). `top_channels=k` scores only the k channels of largest
    spatial variance per image (the others weigh 0), as Faster Score-CAM: k + 1 passes. Where we differ: the authors rescale the final map
    to [0, 1]; we keep its scale (weights are probabilities, so the map is in the activations' units).
    `lowres` is relu(sum_k weight_k A_k) at the layer's resolution."""

    name = "score_cam"
    description = "Score-CAM: channels weighted by the target's probability on the image masked by each channel."
    differentiable = False
    uses_gradients = False
    batch_size = Param(64, "masked images per forward pass")
    top_channels = Param(None, "score only this many channels per image, those of largest spatial variance "
                     "(Faster Score-CAM); None: every channel, as the authors")

    def check(self):
        super().check()
        if self.top_channels is not None and (not isinstance(self.top_channels, int) or self.top_channels < 1):
            raise ConfigError(f"top_channels must be a positive int or None, got {self.top_channels!r}")

    def compute(self, session, x, target):
        from ..perturbation import Perturber
        from .base import clean_outputs

        if self.layer is not None:
            spec = self.layer
        else:
            spec = find_default_layer(session, x[:1], slice_target(target, 0, 1, len(x)), self.default_layer)
        ((name, module),) = resolve_layers(session.model, spec)
        hw = tuple(x.shape[-2:])
        with session.scope():
            store = session.capture({name: module}, make_differentiable=False)
            resolved, outputs = clean_outputs(session, x, target)
            if name not in store:
                raise ConfigError(f"layer '{name}' did not produce a tensor during the forward pass; choose another layer")
            acts = to_grid(store[name].detach(), hw, declared_layout(module, self.layout),
                           prefix_tokens=getattr(session.model, "num_prefix_tokens", None))
        B, C = acts.shape[:2]
        lo = acts.amin(dim=(2, 3))
        hi = acts.amax(dim=(2, 3))
        varying = hi > lo  # constant channels: skipped, as the authors
        K = C if self.top_channels is None else min(int(self.top_channels), C)
        if K < C:  # per image, the channels of largest spatial variance
            chosen = acts.flatten(2).var(dim=2).topk(K, dim=1).indices
        else:
            chosen = torch.arange(C, device=acts.device).expand(B, C)

        def make_masks(image, k):
            channel = chosen[image, k]
            up = torch.nn.functional.interpolate(acts[image, channel][:, None], size=hw, mode="bilinear",
                                                 align_corners=False)
            lo_up = up.amin(dim=(2, 3), keepdim=True)
            span = (up.amax(dim=(2, 3), keepdim=True) - lo_up).clamp(min=torch.finfo(up.dtype).tiny)
            return (up - lo_up) / span

        scored = Perturber("zero", "softmax", self.batch_size).scores(session, x, resolved, K, make_masks,
                                                                       desc=self.name)
        scores = torch.zeros(B, C, dtype=scored.dtype, device=scored.device).scatter(1, chosen, scored)
        weights = torch.where(varying, scores, torch.zeros_like(scores))
        lowres = (weights[:, :, None, None] * acts).sum(1)
        maps = torch.nn.functional.interpolate(lowres[:, None], size=hw, mode="bilinear", align_corners=False)[:, 0]
        if self.relu:
            lowres, maps = lowres.clamp(min=0), maps.clamp(min=0)
        return Explanation(maps=maps, targets=resolved.classes, outputs=outputs, lowres=lowres,
                           extras={"layer": name, "weights": weights})
