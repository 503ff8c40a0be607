"""The bottleneck itself: Z from R, lambda and noise; its capacity (KL to the prior); the forward hook
that inserts it into a model; capacity maps in bits."""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

from ...core.errors import ConfigError
from ...core.layers import to_grid

LN2 = math.log(2.0)


def gaussian_kernel(sigma: float, dtype=torch.float32, device=None) -> torch.Tensor:
    """The authors' smoothing kernel: size int(round(2 sigma)) * 2 + 1 (5 for sigma 1), normalised."""
    size = int(round(2 * sigma)) * 2 + 1
    coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(coords[:, None] ** 2 + coords[None, :] ** 2) / (2 * sigma**2))
    return (g / g.sum()).to(dtype=dtype, device=device)


def smooth(lam: torch.Tensor, sigma: float | None) -> torch.Tensor:
    """Depthwise Gaussian smoothing of (N, C, h, w) maps with reflection padding (as the authors)."""
    if not sigma or sigma <= 0:
        return lam
    k = gaussian_kernel(sigma, lam.dtype, lam.device)
    pad = k.shape[-1] // 2
    C = lam.shape[1]
    mode = "reflect" if min(lam.shape[-2:]) > pad else "replicate"
    padded = F.pad(lam, (pad, pad, pad, pad), mode=mode)
    return F.conv2d(padded, k.expand(C, 1, -1, -1), groups=C)


def capacity(r_norm: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """KL(N(lam r, (1-lam)^2) || N(0, 1)) per element, in nats:
    -1/2 [1 + log (1-lam)^2 - (lam r)^2 - (1-lam)^2]. (1-lam)^2 is floored at the dtype's smallest
    normal number so that lam == 1 gives a large finite value instead of inf."""
    var = (1 - lam) ** 2
    log_var = torch.log(var.clamp_min(torch.finfo(var.dtype).tiny))
    return -0.5 * (1 + log_var - (lam * r_norm) ** 2 - var)


def restrict(R, lam, mean, std, active, noise, *, inverse: bool = False, relu: bool = False):
    """Z and the capacity C for features R (rows, ...), lambda, statistics and standard-normal noise."""
    cap = capacity((R - mean) / std, lam) * active
    eps = std * noise + mean
    z = lam * eps + (1 - lam) * R if inverse else lam * R + (1 - lam) * eps
    z = z * active
    if relu:
        z = z.clamp_min(0)
    return z, cap


class BottleneckHook:
    """Forward hook replacing a layer's output R by the bottleneck's Z while armed.

    `arm(lam, noise, expand=None)` sets lambda and standard-normal noise per row; with `expand` (an index
    tensor) the layer's output rows are first gathered, R[expand], so that each image's features are
    computed once and shared by its noisy copies. The capacity of the last call is in `capacity`.
    """

    def __init__(self, mean, std, active, *, inverse: bool = False, relu: bool = False):
        self.mean, self.std, self.active = mean, std, active
        self.inverse, self.relu = inverse, relu
        self.lam = self.noise = self.expand = self.capacity = None
        self.calls = 0

    def arm(self, lam, noise, expand=None):
        self.lam, self.noise, self.expand = lam, noise, expand
        self.calls = 0
        self.capacity = None

    def disarm(self):
        self.lam = self.noise = self.expand = None

    def __call__(self, module, args, output):
        if self.lam is None:
            return None
        self.calls += 1
        if self.calls > 1:
            raise ConfigError("the bottleneck layer runs more than once per forward pass; choose a layer that "
                              "runs once (a module reused in several places cannot hold a bottleneck)")
        if not isinstance(output, torch.Tensor):
            raise ConfigError(f"the bottleneck layer returns a {type(output).__name__}, not a tensor")
        R = output if self.expand is None else output[self.expand]
        if tuple(R.shape[1:]) != tuple(self.mean.shape):
            raise ConfigError(
                f"the layer's output has shape {tuple(R.shape[1:])} but its feature statistics have shape "
                f"{tuple(self.mean.shape)}; estimate them on images of the size you explain")
        z, self.capacity = restrict(R, self.lam, self.mean, self.std, self.active, self.noise,
                                    inverse=self.inverse, relu=self.relu)
        return z


def capacity_map(cap: torch.Tensor, hw) -> torch.Tensor:
    """(B, ...) capacities in nats -> (B, h, w) maps in bits, scaled by (h w) / (H W) (the authors')."""
    grid = to_grid(cap, tuple(hw))
    h, w = grid.shape[-2:]
    return grid.sum(1) / LN2 * (h * w) / (hw[0] * hw[1])


def is_nchw(shape: Sequence[int], hw) -> bool:
    """Whether a feature shape (without batch) is a (C, h, w) map, which is smoothed spatially."""
    if len(shape) != 3:
        return False
    t = torch.zeros((1, *shape))
    try:
        return to_grid(t, tuple(hw)) is t
    except ConfigError:
        return False


