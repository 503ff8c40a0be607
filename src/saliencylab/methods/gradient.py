"""Plain gradients: the gradient of the target score and input x gradient."""

from __future__ import annotations

import torch

from ..core.targets import resolve_target, slice_target
from .base import Method, check_batch_size, register


def clean_gradients(method: Method, session, x: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Input gradients on the clean images; the same pass resolves the target (one pass per image)."""
    check_batch_size(batch_size)
    grads, outputs, classes = [], [], []
    for start in range(0, x.shape[0], batch_size):
        inputs = x[start : start + batch_size].detach().requires_grad_(True)
        out = session.forward(inputs)
        target = resolve_target(slice_target(method._target_spec, start, start + len(inputs), len(x)), out)
        grads.append(session.grad(target(out), inputs))
        outputs.append(out.detach())
        classes.append(target.classes)
    method.record(torch.cat(outputs), None if classes[0] is None else torch.cat(classes))
    return torch.cat(grads)


@register
class Gradient(Method):
    name = "gradient"
    description = "Gradient of the target score with respect to the input (vanilla saliency)."

    def __init__(self, model, *, absolute: bool = False, batch_size: int = 32):
        super().__init__(model, absolute=absolute, batch_size=batch_size)

    def _attribute(self, session, x, target):
        g = clean_gradients(self, session, x, self.batch_size)
        return g.abs() if self.absolute else g


@register
class InputXGradient(Method):
    name = "input_x_gradient"
    description = "Input times gradient: a first-order Taylor estimate of each input's contribution."

    def __init__(self, model, *, batch_size: int = 32):
        super().__init__(model, batch_size=batch_size)

    def _attribute(self, session, x, target):
        return x * clean_gradients(self, session, x, self.batch_size)
