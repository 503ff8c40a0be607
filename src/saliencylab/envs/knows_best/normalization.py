"""Normalization: maps [0, 1] patch pixels to a model's input space (and names it for the cache key)."""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from ...core.errors import ConfigError


class Normalize:
    """(x - mean) / std per channel: maps [0, 1] pixels to a model's input space."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        self.mean = tuple(float(v) for v in mean)
        self.std = tuple(float(v) for v in std)
        if len(self.mean) != len(self.std) or any(s <= 0 for s in self.std):
            raise ConfigError(f"normalize needs equal-length mean and positive std, got {mean}, {std}")

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        shape = (1, -1, 1, 1)
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(shape)
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(shape)
        return (x - mean) / std

    @property
    def cache_key(self) -> str:
        return f"Normalize(mean={self.mean}, std={self.std})"

    def __repr__(self) -> str:
        return self.cache_key


IMAGENET_NORMALIZE = Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def normalize_for(loaded) -> Normalize:
    """The normalization of a `saliencylab.models.LoadedModel` (its `.mean` / `.std`)."""
    return Normalize(loaded.mean, loaded.std)


def _as_normalize(normalize) -> tuple[Callable[[torch.Tensor], torch.Tensor], str]:
    if normalize is None:
        return (lambda x: x), "identity"
    if isinstance(normalize, Normalize):
        return normalize, normalize.cache_key
    if isinstance(normalize, (tuple, list)) and len(normalize) == 2 and not callable(normalize[0]):
        n = Normalize(*normalize)
        return n, n.cache_key
    if callable(normalize):
        qualname = getattr(normalize, "__qualname__", type(normalize).__qualname__)
        key = getattr(normalize, "cache_key", None) or f"{getattr(normalize, '__module__', '')}.{qualname}"
        return normalize, str(key)
    raise ConfigError(
        f"normalize must be None, a callable or a (mean, std) pair, got {type(normalize).__name__}")
