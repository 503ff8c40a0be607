"""SmoothGrad and its variants (Smilkov et al. 2017; Adebayo et al. 2018): gradients of noisy copies.

The noise of sample s of an image is drawn from `session.random(seed, "smoothgrad")` keyed by
(image, s), so an image's result does not depend on the other images of its batch, on `batch_size`
or on how a data set is split (pass `image_ids` to key it by a stable id instead of the position).
Unlike Captum's NoiseTunnel, which draws one noise tensor for the whole batch from torch's global
generator, the same seed therefore gives other numbers than Captum.
"""

from __future__ import annotations

import torch

from ..core.errors import ConfigError
from ..core.explanation import Explanation
from .base import Method, Param, accumulate_input_gradients, check_batch_size, clean_outputs, register

AGGREGATES = ("mean", "square", "variance")


def noisy_gradient_moments(session, x, target, samples, stdev, seed, batch_size, desc, moments=(1,)):
    """Mean of grad and/or grad**2 over `samples` Gaussian-noised copies of each image.

    `stdev` is (B,) per image. Row (image, sample)'s noise is keyed by the image and the sample
    (`session.random(seed, "smoothgrad")`), so the result depends on batch_size only through
    floating-point summation order.
    """
    rng = session.random(seed, "smoothgrad")
    sums = {m: torch.zeros_like(x) for m in moments}
    std = stdev.to(x.device, x.dtype).view(-1, 1, 1, 1)

    def make_inputs(image, sample):
        noise = rng.normal(image.cpu(), sample.cpu(), x.shape[1:], device=x.device, dtype=x.dtype)
        return x[image] + noise * std[image]

    def reduce(grads, image, sample, inputs):
        for m in moments:
            sums[m].index_add_(0, image, grads if m == 1 else grads**m)

    accumulate_input_gradients(session, target, x.shape[0], samples, make_inputs, reduce, batch_size, desc,
                               pixels=x.shape[-2] * x.shape[-1])
    return {m: s / samples for m, s in sums.items()}


@register
class SmoothGrad(Method):
    name = "smoothgrad"
    description = "SmoothGrad: gradients averaged over Gaussian-noised copies (also squaregrad, vargrad)."
    stochastic = True

    samples = Param(32, "noisy copies per image")
    noise_level = Param(0.15, "noise standard deviation as a fraction of each image's value range")
    stdev = Param(None, "absolute noise standard deviation (overrides noise_level)")
    aggregate = Param("mean", f"how gradients are combined: {', '.join(AGGREGATES)}")
    multiply_by_inputs = Param(False, "multiply the aggregate by the input")
    seed = Param(0, "seed of the noise (keyed by image and sample)")
    batch_size = Param(None, "rows (image x sample) per pass; None: automatic for the device")

    def check(self):
        if self.aggregate not in AGGREGATES:
            raise ConfigError(f"unknown aggregate '{self.aggregate}'; choose one of {', '.join(AGGREGATES)}")
        default = type(self).aggregate.default
        if type(self) is not SmoothGrad and self.aggregate != default:
            raise ConfigError(f"{self.name} is smoothgrad with aggregate='{default}'; use smoothgrad for others")
        if not isinstance(self.samples, int) or isinstance(self.samples, bool) or self.samples < 1:
            raise ConfigError(f"samples must be a positive int, got {self.samples!r}")
        if self.batch_size is not None:
            check_batch_size(self.batch_size)

    def compute(self, session, x, target):
        target, outputs = clean_outputs(session, x, target)
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
        maps = x * maps if self.multiply_by_inputs else maps
        return Explanation(maps=maps, targets=target.classes, outputs=outputs)


@register
class SquareGrad(SmoothGrad):
    name = "squaregrad"
    description = "SquareGrad: mean of squared gradients over Gaussian-noised copies."
    aggregate = Param("square", "fixed: 'square'")


@register
class VarGrad(SmoothGrad):
    name = "vargrad"
    description = "VarGrad: variance of gradients over Gaussian-noised copies."
    aggregate = Param("variance", "fixed: 'variance'")
