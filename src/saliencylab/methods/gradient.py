"""Plain gradients: the gradient of the target score and input x gradient.

Both are differentiable: with `create_graph=True` the input gradient keeps its graph (double
backpropagation), so a loss on the maps trains the model.
"""

from __future__ import annotations

import torch

from ..core.explanation import Explanation
from ..core.targets import resolve_target, slice_target
from .base import Method, Param, check_batch_size, register


def clean_gradients(session, x: torch.Tensor, target, batch_size: int):
    """Input gradients on the clean images; the same pass resolves the target (one pass per image).

    `target` is the user's TargetSpec for the B images. Returns (grads, outputs, classes), classes
    None for a callable target."""
    check_batch_size(batch_size)
    grads, outputs, classes = [], [], []
    for start in range(0, x.shape[0], batch_size):
        inputs = x[start : start + batch_size].detach().requires_grad_(True)
        out = session.forward(inputs)
        resolved = resolve_target(slice_target(target, start, start + len(inputs), len(x)), out)
        grads.append(session.grad(resolved(out), inputs))
        outputs.append(out.detach())
        classes.append(resolved.classes)
    return torch.cat(grads), torch.cat(outputs), None if classes[0] is None else torch.cat(classes)


class _Gradient(Method):
    batch_size = Param(32, "images per forward+backward pass")
    differentiable = True

    def check(self):
        check_batch_size(self.batch_size)


@register
class Gradient(_Gradient):
    name = "gradient"
    description = "Gradient of the target score with respect to the input (vanilla saliency)."
    absolute = Param(False, "absolute value of the gradient")

    def compute(self, session, x, target):
        g, outputs, classes = clean_gradients(session, x, target, self.batch_size)
        return Explanation(maps=g.abs() if self.absolute else g, targets=classes, outputs=outputs)


@register
class InputXGradient(_Gradient):
    name = "input_x_gradient"
    description = "Input times gradient: a first-order Taylor estimate of each input's contribution."

    def compute(self, session, x, target):
        g, outputs, classes = clean_gradients(session, x, target, self.batch_size)
        return Explanation(maps=x * g, targets=classes, outputs=outputs)
