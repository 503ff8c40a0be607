"""Baselines: what an image looks like with its information removed.

Used by integrated gradients, perturbation metrics and perturbation methods. All live in the
model's normalized input space. A baseline is given as a name ("zero", "blur", "uniform", "mean"),
a number (a constant image), a tensor broadcastable to the images, or one of the classes below.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .core.errors import ConfigError, InputError


class Baseline:
    name = "baseline"

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({args})"


class Constant(Baseline):
    """A constant image (0 = zero in normalized space, i.e. the dataset mean colour)."""

    name = "zero"

    def __init__(self, value: float = 0.0):
        self.value = float(value)

    def __call__(self, x):
        return torch.full_like(x, self.value)


class MeanColour(Baseline):
    """Each image's own mean colour, per channel."""

    name = "mean"

    def __call__(self, x):
        return x.mean(dim=(2, 3), keepdim=True).expand_as(x).clone()


class Blur(Baseline):
    """Gaussian blur of each image (separable, reflect padding)."""

    name = "blur"

    def __init__(self, sigma: float = 10.0, kernel_size: int | None = None):
        self.sigma = float(sigma)
        self.kernel_size = kernel_size

    def __call__(self, x):
        return gaussian_blur(x, self.sigma, self.kernel_size)


class UniformNoise(Baseline):
    """Uniform noise over each image's own value range per channel; seeded."""

    name = "uniform"

    def __init__(self, seed: int = 0):
        self.seed = int(seed)

    def __call__(self, x):
        g = torch.Generator(device=x.device).manual_seed(self.seed)
        lo = x.amin(dim=(2, 3), keepdim=True)
        hi = x.amax(dim=(2, 3), keepdim=True)
        return lo + (hi - lo) * torch.rand(x.shape, generator=g, device=x.device, dtype=x.dtype)


class Tensor(Baseline):
    """A user-given tensor, broadcast to the batch."""

    name = "tensor"

    def __init__(self, value: torch.Tensor):
        self.value = value

    def __call__(self, x):
        try:
            return torch.broadcast_to(self.value.to(device=x.device, dtype=x.dtype), x.shape).clone()
        except RuntimeError as e:
            raise InputError(
                f"baseline of shape {tuple(self.value.shape)} cannot be broadcast to images of shape {tuple(x.shape)}"
            ) from e

    def __repr__(self) -> str:
        return f"Tensor(shape={tuple(self.value.shape)})"


_NAMED = {"zero": Constant, "mean": MeanColour, "blur": Blur, "uniform": UniformNoise}


def make_baseline(spec) -> Baseline:
    """Turn a user's baseline spec into a Baseline object."""
    if isinstance(spec, Baseline):
        return spec
    if isinstance(spec, torch.Tensor):
        if not torch.isfinite(spec).all():
            raise InputError("baseline tensor contains NaN or infinite values")
        return Tensor(spec)
    if isinstance(spec, (int, float)) and not isinstance(spec, bool):
        return Constant(spec)
    if isinstance(spec, str) and _NAMED.get(spec) is not None:
        return _NAMED[spec]()
    raise ConfigError(
        f"unknown baseline {spec!r}; use 'zero', 'mean', 'blur', 'uniform', a number, a tensor, "
        "or a saliencylab.baselines.Baseline"
    )


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
