"""Baselines: what an image looks like with its information removed.

Used by integrated gradients, perturbation metrics and perturbation methods. All live in the
model's normalized input space. A baseline is given as a name ("zero", "blur", "uniform", "mean"),
a number (a constant image), a tensor broadcastable to the images, or one of the classes below.
Named baselines live in `registry` (a core Registry: `registry.register` adds one, unknown names get a
did-you-mean error).

A random baseline ("uniform") draws per image, keyed by the image (`core.randomness`): call it as
`baseline(x, rng)` with `rng = session.random(baseline.seed, "baseline")` (what `baseline_images`
does), so an image's baseline does not depend on the other images of its batch.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .core.errors import ConfigError, InputError
from .core.randomness import KeyedRandom
from .core.registry import Registry

class Baseline:
    """`baseline(x, rng=None) -> (B, C, H, W)`. Deterministic baselines ignore `rng`; random ones have a
    `seed` and draw from `rng` (a KeyedRandom over x's images; default: keyed by position)."""

    name = "baseline"
    stochastic = False

    def __call__(self, x: torch.Tensor, rng: KeyedRandom | None = None) -> torch.Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({args})"


registry: Registry = Registry("baseline", base=Baseline)


@registry.register
class Constant(Baseline):
    """A constant image (0 = zero in normalized space, i.e. the dataset mean colour)."""

    name = "zero"

    def __init__(self, value: float = 0.0):
        self.value = float(value)

    def __call__(self, x, rng=None):
        return torch.full_like(x, self.value)


@registry.register
class MeanColour(Baseline):
    """Each image's own mean colour, per channel."""

    name = "mean"

    def __call__(self, x, rng=None):
        return x.mean(dim=(2, 3), keepdim=True).expand_as(x).clone()


@registry.register
class Blur(Baseline):
    """Gaussian blur of each image (separable, reflect padding)."""

    name = "blur"

    def __init__(self, sigma: float = 10.0, kernel_size: int | None = None):
        self.sigma = float(sigma)
        self.kernel_size = kernel_size

    def __call__(self, x, rng=None):
        return gaussian_blur(x, self.sigma, self.kernel_size)


@registry.register
class UniformNoise(Baseline):
    """Uniform noise over each image's own value range per channel.

    Drawn per image from `rng` (keyed by the image: see the module docstring); without one, keyed by
    the image's position in `x`, with this baseline's seed."""

    name = "uniform"
    stochastic = True

    def __init__(self, seed: int = 0):
        self.seed = int(seed)

    def __call__(self, x, rng=None):
        if rng is None:
            rng = KeyedRandom(self.seed, "baseline")
        images = torch.arange(x.shape[0])
        noise = rng.uniform(images, torch.zeros_like(images), x.shape[1:], device=x.device, dtype=x.dtype)
        lo = x.amin(dim=(2, 3), keepdim=True)
        hi = x.amax(dim=(2, 3), keepdim=True)
        return lo + (hi - lo) * noise


class Tensor(Baseline):
    """A user-given tensor, broadcast to the batch: one image (C, H, W) / (1, C, H, W) for all, or one
    per image (B, C, H, W). A method that works on a subset of its images passes their indices
    (`baseline_images(..., images=)`), so a per-image baseline follows its image."""

    name = "tensor"

    def __init__(self, value: torch.Tensor):
        self.value = value

    @property
    def per_image(self) -> bool:
        return self.value.dim() == 4 and self.value.shape[0] > 1

    def rows(self, images: torch.Tensor) -> "Tensor":
        """The baseline of the call's images `images` (indices), for a subset of the batch."""
        if not self.per_image:
            return self
        if int(images.max()) >= self.value.shape[0]:
            raise InputError(f"a per-image baseline of {self.value.shape[0]} images cannot serve image "
                             f"{int(images.max())}: give one baseline per image")
        return Tensor(self.value[images.to(self.value.device)])

    def __call__(self, x, rng=None):
        try:
            return torch.broadcast_to(self.value.to(device=x.device, dtype=x.dtype), x.shape).clone()
        except RuntimeError as e:
            raise InputError(
                f"baseline of shape {tuple(self.value.shape)} cannot be broadcast to images of shape {tuple(x.shape)}"
            ) from e

    def __repr__(self) -> str:
        return f"Tensor(shape={tuple(self.value.shape)})"


def make_baseline(spec) -> Baseline:
    """Turn a user's baseline spec (a registered name, a number, a tensor, a Baseline) into a Baseline."""
    if isinstance(spec, Baseline):
        return spec
    if isinstance(spec, torch.Tensor):
        if not torch.isfinite(spec).all():
            raise InputError("baseline tensor contains NaN or infinite values")
        return Tensor(spec)
    if isinstance(spec, (int, float)) and not isinstance(spec, bool):
        return Constant(spec)
    if isinstance(spec, str):
        return registry.get(spec)()  # unknown names: did-you-mean
    raise ConfigError(
        f"unknown baseline {spec!r}; use a name ({', '.join(registry.available())}), a number, a tensor, "
        "or a saliencylab.baselines.Baseline"
    )


def baseline_images(baseline: Baseline, x: torch.Tensor, session=None, images=None) -> torch.Tensor:
    """`baseline(x)`, with a random baseline's draws keyed to the session's images.

    `images`: the indices, among the call's images, of the rows of `x` (default: x holds all of them,
    in order). Deterministic baselines (and user baselines without a `seed`) are called as `baseline(x)`."""
    if isinstance(baseline, Tensor) and images is not None:
        return baseline.rows(torch.as_tensor(images))(x)
    seed = getattr(baseline, "seed", None)
    if seed is None or session is None or not getattr(baseline, "stochastic", True):
        return baseline(x)
    rng = session.random(seed, "baseline")
    if images is not None:
        rng = rng.for_images(images)
    elif rng.keys is not None and len(rng.keys) != x.shape[0]:
        raise InputError(f"{len(rng.keys)} image ids for a baseline of {x.shape[0]} images: pass the images' "
                         "indices (images=) when drawing for a subset")
    return baseline(x, rng=rng)


def gaussian_kernel1d(sigma: float, kernel_size: int | None, device=None, dtype=torch.float32) -> torch.Tensor:
    if sigma <= 0:
        raise ConfigError(f"blur sigma must be positive, got {sigma}")
    if kernel_size is None:
        kernel_size = 2 * math.ceil(3 * sigma) + 1
    if kernel_size % 2 == 0 or kernel_size < 1:
        raise ConfigError(f"blur kernel_size must be a positive odd int, got {kernel_size}")
    r = torch.arange(kernel_size, device=device, dtype=dtype) - (kernel_size - 1) / 2
    k = torch.exp(-0.5 * (r / sigma) ** 2)
    return k / k.sum()


def gaussian_blur(x: torch.Tensor, sigma: float, kernel_size: int | None = None) -> torch.Tensor:
    """Separable Gaussian blur of (B, C, H, W) images; the kernel is clipped to fit the image."""
    B, C, H, W = x.shape
    if kernel_size is None:
        kernel_size = 2 * math.ceil(3 * sigma) + 1
    # reflect padding needs pad < size: clip the kernel to the image (odd size)
    limit = 2 * (min(H, W) - 1) - 1
    kernel_size = max(1, min(kernel_size, limit if limit % 2 else limit - 1))
    k = gaussian_kernel1d(sigma, kernel_size, x.device, x.dtype)
    pad = kernel_size // 2
    y = F.pad(x, (pad, pad, 0, 0), mode="reflect")
    y = F.conv2d(y.reshape(B * C, 1, H, W + 2 * pad), k.view(1, 1, 1, -1))
    y = F.pad(y, (0, 0, pad, pad), mode="reflect")
    y = F.conv2d(y, k.view(1, 1, -1, 1))
    return y.reshape(B, C, H, W)
