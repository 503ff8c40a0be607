"""Regression closures for the IBA family (CheXplain-IBA), passed as callable targets, and the per-row
model loss the bottleneck minimises."""

from __future__ import annotations

from typing import Callable

import torch

from ...core.errors import InputError


def _select(outputs: torch.Tensor, index) -> torch.Tensor:
    if outputs.dim() == 1:
        return outputs[:, None]
    y = outputs.flatten(1)
    return y if index is None else y[:, index].reshape(len(y), -1)


def mse_target(value, index=None) -> Callable[[torch.Tensor], torch.Tensor]:
    """Regression IBA's "MSE to a target": score = -mean((y - value)^2), y = outputs[:, index] (all
    outputs when index is None). Maximising the score minimises the MSE (CheXplain-IBA
    mse_loss_with_target); `mse_target(0.0)` negated is their "maximize score" closure."""

    def score(outputs: torch.Tensor) -> torch.Tensor:
        y = _select(outputs, index)
        v = torch.as_tensor(value, dtype=y.dtype, device=y.device)
        return -((y - v) ** 2).mean(1)

    score.__name__ = f"mse_target({value!r})"
    return score


class MinimalDeviation:
    """Regression IBA's "minimal deviation": score = -mean((y - y_clean)^2), y_clean the model's output on
    the clean image (CheXplain-IBA mse_loss_minimal_deviation).

    IBA methods bind the clean outputs and pass each row's image index. Unbound (other methods), the
    reference is the rows' own output, so the score and its gradient are zero, which is the exact value
    at the clean image.
    """

    wants_image_index = True

    def __init__(self, index=None, reference: torch.Tensor | None = None):
        self.index, self.reference = index, reference

    def bind(self, clean_outputs: torch.Tensor) -> "MinimalDeviation":
        return MinimalDeviation(self.index, clean_outputs.detach())

    def __call__(self, outputs: torch.Tensor, image_index: torch.Tensor | None = None) -> torch.Tensor:
        y = _select(outputs, self.index)
        if self.reference is None:
            ref = y.detach()
        else:
            ref = _select(self.reference, self.index).to(y)
            ref = ref if image_index is None else ref[image_index.to(ref.device)]
        return -((y - ref) ** 2).mean(1)

    def __repr__(self):
        return f"minimal_deviation(index={self.index!r})"


def minimal_deviation(index=None) -> MinimalDeviation:
    """See MinimalDeviation."""
    return MinimalDeviation(index)


def model_loss_fn(spec, target, clean_outputs: torch.Tensor) -> Callable:
    """Per-row model loss for the bottleneck: CE of the class (-log softmax), or -score of a callable target.

    `spec` is the user's target as given (a callable keeps its own score; a `MinimalDeviation` is bound
    to `clean_outputs`), `target` the resolved Target. The loss takes (outputs, image_index)."""
    if callable(spec) and not isinstance(spec, torch.Tensor):
        fn = spec.bind(clean_outputs) if hasattr(spec, "bind") else spec
        with_index = getattr(fn, "wants_image_index", False)

        def loss(out, image):
            s = fn(out, image) if with_index else fn(out)
            if not isinstance(s, torch.Tensor) or s.shape != (out.shape[0],):
                raise InputError(f"target callable must return one score per row, shape ({out.shape[0]},)")
            return -s

        return loss
    classes = target.classes

    def ce(out, image):
        return -out.log_softmax(dim=1).gather(1, classes.to(out.device)[image][:, None]).squeeze(1)

    return ce
