"""Targets: what scalar per image an explanation explains.

`target` may be None (the predicted class), an int (same class for every image), a sequence or
tensor of B ints (one class per image), or a callable `f(outputs) -> (N,)` returning any scalar score
per row (multi-label, regression, a detector's box score). A resolved `Target` scores any batch of
rows derived from the B images (noisy copies, path points, perturbations), given each row's image index.
"""

from __future__ import annotations

from typing import Callable, Sequence, Union

import torch

from .errors import InputError

TargetSpec = Union[None, int, Sequence[int], torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]

SCORES = ("logit", "softmax", "log_softmax")


class Target:
    """A target resolved against the model's outputs on the clean images."""

    def __init__(self, classes: torch.Tensor | None = None, fn: Callable | None = None, score: str = "logit"):
        if score not in SCORES:
            raise InputError(f"unknown score '{score}'; choose one of {', '.join(SCORES)}")
        self.classes = classes
        self.fn = fn
        self.kind = score

    def __call__(self, outputs: torch.Tensor, image_index: torch.Tensor | None = None) -> torch.Tensor:
        """One score per row of `outputs`; row r belongs to image `image_index[r]` (default: r)."""
        if self.fn is not None:
            scores = self.fn(outputs)
            if not isinstance(scores, torch.Tensor) or scores.shape != (outputs.shape[0],):
                got = tuple(scores.shape) if isinstance(scores, torch.Tensor) else type(scores).__name__
                raise InputError(
                    f"target callable must return one score per image, shape ({outputs.shape[0]},), got {got}"
                )
            return scores
        if self.kind == "softmax":
            outputs = outputs.softmax(dim=1)
        elif self.kind == "log_softmax":
            outputs = outputs.log_softmax(dim=1)
        classes = self.classes.to(outputs.device)
        if image_index is not None:
            classes = classes[image_index.to(outputs.device)]
        return outputs.gather(1, classes[:, None]).squeeze(1)

    def with_score(self, score: str) -> "Target":
        return Target(self.classes, self.fn, score)

    def for_images(self, index: torch.Tensor) -> "Target":
        """The same target restricted to a subset of images (classes re-indexed)."""
        if self.classes is None:
            return self
        return Target(self.classes[index.to(self.classes.device)], self.fn, self.kind)


def resolve_target(target: TargetSpec, outputs: torch.Tensor, *, score: str = "logit") -> Target:
    """Resolve a user's target against the outputs of the clean batch (B, K)."""
    B = outputs.shape[0]
    if callable(target) and not isinstance(target, torch.Tensor):
        resolved = Target(fn=target)
        resolved(outputs.detach())  # validates the callable's output shape once, up front
        return resolved
    if outputs.dim() != 2:
        raise InputError(
            f"class targets need model outputs of shape (B, classes), got {tuple(outputs.shape)}; "
            "pass a callable target f(outputs) -> (B,) for other outputs"
        )
    K = outputs.shape[1]
    if target is None:
        classes = outputs.detach().argmax(dim=1)
    else:
        if isinstance(target, bool):
            raise InputError(f"target must be an int class index, got {target!r}")
        if isinstance(target, int) or (isinstance(target, torch.Tensor) and target.dim() == 0):
            classes = torch.full((B,), int(target), dtype=torch.long)
        else:
            try:
                classes = torch.as_tensor(list(target) if not isinstance(target, torch.Tensor) else target)
            except (TypeError, ValueError) as e:
                raise InputError(f"target must be None, an int, B ints or a callable, got {target!r}") from e
            if classes.is_floating_point() or classes.dtype == torch.bool:
                raise InputError(f"target class indices must be integers, got dtype {classes.dtype}")
            classes = classes.long().reshape(-1)
            if classes.numel() != B:
                raise InputError(f"got {classes.numel()} targets for {B} images; give one per image or a single int")
        bad = (classes < 0) | (classes >= K)
        if bad.any():
            i = int(bad.nonzero()[0])
            raise InputError(f"target {int(classes[i])} is out of range for a model with {K} outputs (image {i})")
    return Target(classes=classes.to(outputs.device), score=score)


def slice_target(target: TargetSpec, start: int, stop: int, n_images: int) -> TargetSpec:
    """The part of a target spec that applies to images [start, stop) of a batch of `n_images`."""
    if target is None or isinstance(target, int) or callable(target) and not isinstance(target, torch.Tensor):
        return target
    if isinstance(target, torch.Tensor) and target.dim() == 0:
        return target
    seq = target if isinstance(target, torch.Tensor) else torch.as_tensor(list(target))
    if seq.numel() != n_images:
        raise InputError(f"got {seq.numel()} targets for {n_images} images; give one per image or a single int")
    return seq.reshape(-1)[start:stop]
