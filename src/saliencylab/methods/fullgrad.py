"""FullGrad (Srinivas & Fleuret 2019, "Full-gradient representation for neural network visualization").

For a network built from linear layers with biases and piecewise-linear activations (ReLU, max and
average pooling, BatchNorm in eval mode), the output decomposes exactly into

    f(x) = sum(grad_x f * x) + sum over layers of sum(grad_z f * b)

where z is a layer's output and b its bias: the bias-gradients. `full_gradients` returns these
terms. Biases come from Conv/Linear layers with a bias, and from BatchNorm in eval mode, which is
y = s * x + b_eff with b_eff = beta - running_mean * gamma / sqrt(running_var + eps). Other
biased modules (LayerNorm, GroupNorm, attention) are not decomposed, so completeness only holds
for networks made of the layers above.

The saliency map follows the authors' reference implementation (idiap/fullgrad-saliency):
psi(input_grad * x) summed over channels, plus, for every spatial (4-D) bias-gradient, psi of it
upsampled bilinearly (align_corners=True) and summed over channels, where psi takes the absolute
value and rescales each image's tensor to [0, 1]. That rescaling is part of the method's
definition, which is why FullGrad maps are non-negative and not in the units of the score.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..core.errors import ConfigError
from ..core.explanation import Explanation
from ..core.session import ModelSession
from ..core.targets import Target, TargetSpec, resolve_target, slice_target
from ..core.validation import check_images
from .base import Method, Param, check_batch_size, register

_LINEAR = (nn.modules.conv._ConvNd, nn.Linear)
_BATCHNORM = nn.modules.batchnorm._BatchNorm


class FullGradients(NamedTuple):
    """The terms of the full-gradient decomposition for one batch."""

    input_gradient: torch.Tensor  # (B, C, H, W): d score / d x
    bias_gradients: list  # per module call: d score / d z * bias, shaped like the module's output z
    layers: list  # the module name of each bias-gradient
    outputs: torch.Tensor  # the model's outputs on x
    target: Target  # the resolved target


def layer_bias(module: nn.Module) -> torch.Tensor | None:
    """The bias a module adds to its output, or None if it has none we can decompose."""
    if isinstance(module, _LINEAR):
        return module.bias
    if isinstance(module, _BATCHNORM) and not module.training and module.running_mean is not None:
        scale = torch.rsqrt(module.running_var + module.eps)
        if module.weight is not None:
            scale = scale * module.weight
        bias = -module.running_mean * scale
        return bias + module.bias if module.bias is not None else bias
    return None


def _broadcast_bias(module: nn.Module, bias: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    if isinstance(module, nn.Linear):  # features on the last dimension, e.g. (B, K) or tokens (B, N, D)
        return bias
    shape = [1] * out.dim()  # convolutions and batch norm: channels on dimension 1
    shape[1] = -1
    return bias.view(shape)


def full_gradients(model_or_session, x: torch.Tensor, target: TargetSpec | Target = None) -> FullGradients:
    """Input-gradient and bias-gradients of the target score, from one forward and one backward pass.

    `model_or_session` is a model (a session is opened and closed around the call) or an open
    ModelSession; `target` is a target spec (None = predicted class) or an already resolved Target.
    """
    if not isinstance(model_or_session, ModelSession):
        x = check_images(x)
        with ModelSession(model_or_session) as session:
            return full_gradients(session, x, target)
    session = model_or_session
    names = {m: n for n, m in session.model.named_modules()}
    calls: list[tuple[nn.Module, torch.Tensor]] = []

    def hook(module, args, output):
        if not isinstance(output, torch.Tensor) or layer_bias(module) is None:
            return None
        if not output.requires_grad:  # a branch that does not depend on x still adds its bias
            output = output.detach().requires_grad_(True)
        calls.append((module, output))
        # The model continues with a copy, so an in-place op downstream (x += skip, ReLU(inplace=True))
        # cannot change the tensor whose gradient we take.
        return output.clone()

    with session.scope():  # the hooks go at the end of the block, also on an error
        for m in names:
            if layer_bias(m) is not None:
                session.hook(m, hook)
        inputs = x.detach().requires_grad_(True)
        out = session.forward(inputs)
    resolved = target if isinstance(target, Target) else resolve_target(target, out)
    grads = session.grad(resolved(out), [inputs] + [z for _, z in calls], rows=len(inputs))
    bias_grads = [g * _broadcast_bias(m, layer_bias(m), g) for (m, _), g in zip(calls, grads[1:])]
    return FullGradients(grads[0], bias_grads, [names[m] for m, _ in calls], out.detach(), resolved)


POSTPROCESS = ("abs", "relu", "signed")


def postprocess(t: torch.Tensor, eps: float = 1e-6, mode: str = "abs") -> torch.Tensor:
    """psi: absolute value, then each image's tensor min-max rescaled to [0, 1] (as in the reference code).

    `mode="relu"` keeps the positive part instead of the magnitude (then the same rescaling);
    `mode="signed"` keeps the sign: the tensor divided by its largest magnitude, in [-1, 1]. The two
    are the toggles of Khakzar et al.'s positive-aggregation study."""
    if mode == "signed":
        return t / (t.flatten(1).abs().amax(dim=1).view((-1,) + (1,) * (t.dim() - 1)) + eps)
    t = t.abs() if mode == "abs" else t.clamp(min=0)
    flat = t.flatten(1)
    shape = (-1,) + (1,) * (t.dim() - 1)
    t = t - flat.amin(dim=1).view(shape)
    return t / (t.flatten(1).amax(dim=1).view(shape) + eps)


def fullgrad_map(terms: FullGradients, x: torch.Tensor, mode: str = "abs") -> torch.Tensor:
    """(B, H, W) FullGrad saliency from the decomposition terms (see the module docstring)."""
    size = tuple(x.shape[-2:])
    saliency = postprocess(terms.input_gradient * x, mode=mode).sum(dim=1)
    for bias_grad in terms.bias_gradients:
        if bias_grad.dim() == 4:  # spatial layers only, as in the paper
            # Upsampling is linear, so summing channels first gives the same map far more cheaply.
            summed = postprocess(bias_grad, mode=mode).sum(dim=1, keepdim=True)
            saliency = saliency + F.interpolate(summed, size=size, mode="bilinear", align_corners=True)[:, 0]
    return saliency


@register
class FullGrad(Method):
    name = "fullgrad"
    description = "FullGrad: input-gradient plus every layer's bias-gradient, each rescaled to [0, 1]."
    input_space = False
    batch_size = Param(32, "images per forward+backward pass")
    postprocess = Param("abs", "psi's first step: 'abs' (the authors'), 'relu' or 'signed' (see postprocess)")

    def check(self):
        check_batch_size(self.batch_size)
        if self.postprocess not in POSTPROCESS:
            raise ConfigError(f"unknown postprocess {self.postprocess!r}; choose one of {', '.join(POSTPROCESS)}")

    def compute(self, session, x, target):
        maps, outputs, classes = [], [], []
        for start in range(0, x.shape[0], self.batch_size):
            chunk = x[start : start + self.batch_size]
            terms = full_gradients(session, chunk, slice_target(target, start, start + len(chunk), len(x)))
            maps.append(fullgrad_map(terms, chunk, self.postprocess))
            outputs.append(terms.outputs)
            classes.append(terms.target.classes)
        return Explanation(maps=torch.cat(maps), targets=None if classes[0] is None else torch.cat(classes),
                           outputs=torch.cat(outputs))
