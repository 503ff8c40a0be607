"""SmoothGrad and its variants (Smilkov et al. 2017; Adebayo et al. 2018): gradients of noisy copies."""

from __future__ import annotations

import torch

from ..core.errors import ConfigError
from .base import Method, accumulate_input_gradients, register

AGGREGATES = ("mean", "square", "variance")


def noisy_gradient_moments(session, x, target, samples, stdev, seed, batch_size, desc, moments=(1,)):
    """Mean of grad and/or grad**2 over `samples` Gaussian-noised copies of each image.

    `stdev` is (B,) per image. Noise is drawn per chunk from one seeded generator, so the result
    depends on the seed and on batch_size only through floating-point summation order.
    """
    g = torch.Generator(device=x.device).manual_seed(int(seed))
    sums = {m: torch.zeros_like(x) for m in moments}
    std = stdev.to(x.device, x.dtype).view(-1, 1, 1, 1)

    def make_inputs(image, sample):
        noise = torch.randn((len(image),) + tuple(x.shape[1:]), generator=g, device=x.device, dtype=x.dtype)
        return x[image] + noise * std[image]

    def reduce(grads, image, sample, inputs):
        for m in moments:
            sums[m].index_add_(0, image, grads if m == 1 else grads**m)

    accumulate_input_gradients(session, target, x.shape[0], samples, make_inputs, reduce, batch_size, desc)
    return {m: s / samples for m, s in sums.items()}


@register
class SmoothGrad(Method):
    name = "smoothgrad"
    description = "SmoothGrad: gradients averaged over Gaussian-noised copies (also squaregrad, vargrad)."

    def __init__(self, model, *, samples: int = 32, noise_level: float = 0.15, stdev: float | None = None,
                 aggregate: str = "mean", multiply_by_inputs: bool = False, seed: int = 0, batch_size: int | None = None):
        super().__init__(model, samples=samples, noise_level=noise_level, stdev=stdev, aggregate=aggregate,
                         multiply_by_inputs=multiply_by_inputs, seed=seed, batch_size=batch_size)
        if aggregate not in AGGREGATES:
            raise ConfigError(f"unknown aggregate '{aggregate}'; choose one of {', '.join(AGGREGATES)}")
        if not isinstance(samples, int) or samples < 1:
            raise ConfigError(f"samples must be a positive int, got {samples!r}")

    def _attribute(self, session, x, target):
        target = self.resolve(session, x)
        if self.stdev is not None:
            stdev = torch.full((x.shape[0],), float(self.stdev))
        else:  # the paper's noise level: a fraction of each image's value range
            stdev = self.noise_level * (x.flatten(1).amax(1) - x.flatten(1).amin(1))
        moments = {"mean": (1,), "square": (2,), "variance": (1, 2)}[self.aggregate]
        m = noisy_gradient_moments(session, x, target, self.samples, stdev, self.seed, self.batch_size,
                                   self.name, moments)
        if self.aggregate == "mean":
            maps = m[1]
        elif self.aggregate == "square":
            maps = m[2]
        else:
            maps = m[2] - m[1] ** 2
        return x * maps if self.multiply_by_inputs else maps


@register
class SquareGrad(SmoothGrad):
    name = "squaregrad"
    description = "SquareGrad: mean of squared gradients over Gaussian-noised copies."

    def __init__(self, model, *, samples: int = 32, noise_level: float = 0.15, stdev: float | None = None,
                 seed: int = 0, batch_size: int | None = None):
        super().__init__(model, samples=samples, noise_level=noise_level, stdev=stdev, aggregate="square",
                         seed=seed, batch_size=batch_size)


@register
class VarGrad(SmoothGrad):
    name = "vargrad"
    description = "VarGrad: variance of gradients over Gaussian-noised copies."

    def __init__(self, model, *, samples: int = 32, noise_level: float = 0.15, stdev: float | None = None,
                 seed: int = 0, batch_size: int | None = None):
        super().__init__(model, samples=samples, noise_level=noise_level, stdev=stdev, aggregate="variance",
                         seed=seed, batch_size=batch_size)
