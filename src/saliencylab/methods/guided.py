"""Guided backpropagation (Springenberg et al. 2015, "Striving for simplicity").

The backward pass through every ReLU-family activation module lets only positive gradients through:
the ordinary ReLU derivative (gradient where the input was positive) is combined with the "deconvnet"
rule (gradient where the incoming gradient is positive). The families handled are `nn.ReLU` and
`nn.ReLU6`, both piecewise linear with a zero region, matching captum's GuidedBackprop for nn.ReLU.
Smooth activations (LeakyReLU, GELU, SiLU, ...) are left untouched, and ReLUs called as functions
(`F.relu`, `torch.relu`) cannot be hooked: a model with no ReLU modules is refused.
"""

from __future__ import annotations

import torch
from torch import nn

from ..core.errors import ConfigError
from ..core.explanation import Explanation
from .base import Method, Param, check_batch_size, register
from .gradient import clean_gradients

GUIDED_ACTIVATIONS = (nn.ReLU, nn.ReLU6)


class _ClampGrad(torch.autograd.Function):
    """Identity in the forward pass; lets only non-negative gradients through in the backward pass."""

    @staticmethod
    def forward(ctx, x):
        # A copy, not x itself: returning an input (or a view of it) from a custom Function forbids
        # later in-place ops such as the next ReLU(inplace=True).
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad.clamp(min=0)


def _clamp_output(module, args, output):
    # Applied on every call, so a ReLU module reused several times in one forward is guided each time.
    if isinstance(output, torch.Tensor) and output.requires_grad:
        return _ClampGrad.apply(output)
    return None


def add_guided_hooks(session) -> int:
    """Hook every ReLU/ReLU6 module of the session's model; returns how many were hooked.

    The hooks are session edits: they go at the session's exit, or at the end of an enclosing
    `session.scope()`."""
    modules = [m for m in session.model.modules() if isinstance(m, GUIDED_ACTIVATIONS)]
    if not modules:
        raise ConfigError(
            "guided backprop needs nn.ReLU or nn.ReLU6 modules to modify, and this model has none; "
            "functional relu calls (F.relu, torch.relu) cannot be hooked"
        )
    for module in modules:
        session.add_forward_hook(module, _clamp_output)
    return len(modules)


@register
class GuidedBackprop(Method):
    name = "guided_backprop"
    description = "Guided backprop: gradients with negative values zeroed at every ReLU/ReLU6 module."
    batch_size = Param(32, "images per forward+backward pass")

    def check(self):
        check_batch_size(self.batch_size)

    def compute(self, session, x, target):
        with session.scope():
            add_guided_hooks(session)
            grads, outputs, classes = clean_gradients(session, x, target, self.batch_size)
        return Explanation(maps=grads, targets=classes, outputs=outputs)
