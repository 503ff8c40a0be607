"""Batched similarities between two batches of maps: one score per image, higher = more similar.

Every function takes two tensors of the same shape (B, H, W) (rank correlations accept any
(B, ...)) and returns (B,). They are used by the sanity metrics (model randomization, random
logit) and are reusable on their own:

- `spearman`: Spearman rank correlation per image, ties get their average rank (as
  scipy.stats.spearmanr); `spearman_abs` ranks absolute values (Adebayo et al. report both).
- `ssim`: structural similarity (Wang et al. 2004) with an 11x11 Gaussian window (sigma 1.5) on
  maps min-max normalized per image, data range 1; equal to
  `skimage.metrics.structural_similarity(a, b, gaussian_weights=True, sigma=1.5,
  use_sample_covariance=False, data_range=1)` on the normalized maps.
- `hog`: Pearson correlation of HOG feature vectors (see `hog_features`), as Adebayo et al.'s
  "HOG similarity".

Undefined correlations (a constant map has no ranks or gradients to correlate) score 0.
Computations run in float64 (float32 on devices without it) and return the maps' dtype.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

from ..core.errors import ConfigError, InputError


def _acc(t: torch.Tensor) -> torch.dtype:
    return torch.float32 if t.device.type == "mps" else torch.float64


def _pair(a: torch.Tensor, b: torch.Tensor, dims: int | None = None):
    if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor):
        raise InputError("similarities compare two torch.Tensor batches of maps")
    if a.shape != b.shape or a.dim() < 2:
        raise InputError(f"similarities need two batches of the same shape (B, ...), got {tuple(a.shape)} "
                         f"and {tuple(b.shape)}")
    if dims is not None and a.dim() != dims:
        raise InputError(f"expected maps of shape (B, H, W), got {tuple(a.shape)}")
    dtype = _acc(a)
    return a.detach().to(dtype), b.detach().to(b.device, dtype)


def minmax(maps: torch.Tensor) -> torch.Tensor:
    """Min-max normalize each image's map to [0, 1]; a constant map becomes all zeros."""
    flat = maps.flatten(1)
    lo = flat.amin(1).view(-1, *[1] * (maps.dim() - 1))
    hi = flat.amax(1).view(-1, *[1] * (maps.dim() - 1))
    span = hi - lo
    return torch.where(span > 0, (maps - lo) / torch.where(span > 0, span, torch.ones_like(span)),
                       torch.zeros_like(maps))


def pearson(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pearson correlation per image over all remaining dimensions; 0 where either is constant."""
    out_dtype = a.dtype
    a, b = _pair(a, b)
    a, b = a.flatten(1), b.flatten(1)
    a = a - a.mean(1, keepdim=True)
    b = b - b.mean(1, keepdim=True)
    den = (a.square().sum(1) * b.square().sum(1)).sqrt()
    r = torch.where(den > 0, (a * b).sum(1) / torch.where(den > 0, den, torch.ones_like(den)),
                    torch.zeros_like(den))
    return r.clamp(-1, 1).to(out_dtype)


def rank(values: torch.Tensor) -> torch.Tensor:
    """Ranks 1..N along dim 1 of a (B, N) tensor, ties sharing their average rank (scipy 'average')."""
    B, N = values.shape
    dtype = _acc(values)
    sorted_vals, order = values.sort(dim=1, stable=True)
    starts = torch.ones_like(sorted_vals, dtype=torch.bool)
    starts[:, 1:] = sorted_vals[:, 1:] != sorted_vals[:, :-1]
    group = starts.long().cumsum(1) - 1 + torch.arange(B, device=values.device)[:, None] * N
    position = torch.arange(1, N + 1, device=values.device, dtype=dtype).expand(B, N).reshape(-1)
    sums = torch.zeros(B * N, device=values.device, dtype=dtype).scatter_add_(0, group.reshape(-1), position)
    counts = torch.zeros(B * N, device=values.device, dtype=dtype).scatter_add_(
        0, group.reshape(-1), torch.ones_like(position))
    average = (sums / counts.clamp(min=1))[group]
    return torch.empty_like(average).scatter_(1, order, average)


def spearman(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Spearman rank correlation per image (ties by average rank); 0 where a map is constant."""
    out_dtype = a.dtype
    a, b = _pair(a, b)
    return pearson(rank(a.flatten(1)), rank(b.flatten(1))).to(out_dtype)


def spearman_abs(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Spearman rank correlation of the absolute values."""
    return spearman(a.abs(), b.abs())


def _gaussian_window(sigma: float, radius: int, dtype, device) -> torch.Tensor:
    x = torch.arange(-radius, radius + 1, dtype=dtype, device=device)
    w = torch.exp(-0.5 * (x / sigma) ** 2)
    return w / w.sum()


def _reflect_index(n: int, pad: int, device) -> torch.Tensor:
    """Indices of scipy.ndimage's 'reflect' (half-sample symmetric) padding: d c b a | a b c d | d c b a."""
    i = torch.arange(-pad, n + pad, device=device) % (2 * n)
    return torch.where(i >= n, 2 * n - 1 - i, i)


def gaussian_filter(maps: torch.Tensor, sigma: float = 1.5, truncate: float = 3.5) -> torch.Tensor:
    """Separable Gaussian filter of (B, H, W) maps with scipy.ndimage.gaussian_filter's defaults
    (mode 'reflect', radius int(truncate * sigma + 0.5))."""
    radius = int(truncate * sigma + 0.5)
    w = _gaussian_window(sigma, radius, maps.dtype, maps.device)
    B, H, W = maps.shape
    rows = maps[:, _reflect_index(H, radius, maps.device)]                    # (B, H + 2r, W)
    out = F.conv2d(rows.transpose(1, 2).reshape(B * W, 1, -1)[:, :, None], w.view(1, 1, 1, -1))
    out = out.reshape(B, W, H).transpose(1, 2)                                 # filtered along H
    cols = out[:, :, _reflect_index(W, radius, maps.device)]                   # (B, H, W + 2r)
    out = F.conv2d(cols.reshape(B * H, 1, 1, -1), w.view(1, 1, 1, -1))
    return out.reshape(B, H, W)


def ssim(a: torch.Tensor, b: torch.Tensor, *, sigma: float = 1.5, data_range: float = 1.0,
         normalize: bool = True, k1: float = 0.01, k2: float = 0.03) -> torch.Tensor:
    """Mean SSIM per image (Wang et al. 2004), Gaussian-weighted (window 11 for sigma 1.5).

    With `normalize` (default) each map is min-max normalized to [0, 1] first. As in
    skimage.metrics.structural_similarity, population covariances are used, borders are
    reflect-padded, and the mean excludes a (window - 1) / 2 border; maps smaller than the
    window average over every pixel instead (skimage refuses them).
    """
    out_dtype = a.dtype
    a, b = _pair(a, b, dims=3)
    if normalize:
        a, b = minmax(a), minmax(b)
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    filt = lambda t: gaussian_filter(t, sigma)  # noqa: E731
    ua, ub = filt(a), filt(b)
    va = filt(a * a) - ua * ua
    vb = filt(b * b) - ub * ub
    cov = filt(a * b) - ua * ub
    s = ((2 * ua * ub + c1) * (2 * cov + c2)) / ((ua * ua + ub * ub + c1) * (va + vb + c2))
    pad = int(3.5 * sigma + 0.5)
    H, W = s.shape[-2:]
    if H > 2 * pad and W > 2 * pad:
        s = s[:, pad:H - pad, pad:W - pad]
    return s.flatten(1).mean(1).to(out_dtype)


def hog_features(maps: torch.Tensor, *, cell: int = 8, bins: int = 9, block: int = 2) -> torch.Tensor:
    """Histogram-of-oriented-gradients features of (B, H, W) maps: (B, F).

    A simple HOG in the spirit of Dalal & Triggs / skimage.feature.hog: the map is min-max
    normalized; gradients are central differences (zero on the border rows/columns); each pixel
    votes its gradient magnitude into one of `bins` unsigned orientation bins over [0, 180) degrees
    (hard binning); votes are averaged over `cell` x `cell` cells (maps smaller than two cells use
    cells of min(H, W) // 2 pixels); and cells are grouped into overlapping `block` x `block` blocks,
    each L2-Hys normalized (L2, clip at 0.2, L2 again).
    """
    m = minmax(maps.to(_acc(maps)))
    B, H, W = m.shape
    gy = torch.zeros_like(m)
    gx = torch.zeros_like(m)
    gy[:, 1:-1, :] = m[:, 2:, :] - m[:, :-2, :]
    gx[:, :, 1:-1] = m[:, :, 2:] - m[:, :, :-2]
    magnitude = torch.hypot(gx, gy)
    angle = torch.remainder(torch.atan2(gy, gx), math.pi)
    index = (angle / (math.pi / bins)).floor().long().clamp(0, bins - 1)
    votes = torch.zeros(B, bins, H, W, dtype=m.dtype, device=m.device)
    votes.scatter_(1, index[:, None], magnitude[:, None])
    size = max(1, min(cell, min(H, W) // 2))
    cells = F.avg_pool2d(votes, size)                                          # (B, bins, Hc, Wc)
    if cells.shape[-2] >= block and cells.shape[-1] >= block:
        groups = F.unfold(cells, block)                                        # (B, bins*block^2, L)
    else:
        groups = cells.flatten(2).flatten(1)[:, :, None]
    eps = 1e-5
    groups = groups / (groups.square().sum(1, keepdim=True) + eps ** 2).sqrt()
    groups = groups.clamp(max=0.2)
    groups = groups / (groups.square().sum(1, keepdim=True) + eps ** 2).sqrt()
    return groups.transpose(1, 2).flatten(1)


def hog(a: torch.Tensor, b: torch.Tensor, *, cell: int = 8, bins: int = 9) -> torch.Tensor:
    """Pearson correlation of the HOG features of two batches of maps (Adebayo et al.'s HOG similarity)."""
    out_dtype = a.dtype
    a, b = _pair(a, b, dims=3)
    return pearson(hog_features(a, cell=cell, bins=bins), hog_features(b, cell=cell, bins=bins)).to(out_dtype)


SIMILARITIES: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "spearman": spearman,
    "spearman_abs": spearman_abs,
    "ssim": ssim,
    "hog": hog,
}


def get_similarity(name) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """A similarity by name, or a callable f(a, b) -> (B,) passed through."""
    if callable(name):
        return name
    if name not in SIMILARITIES:
        raise ConfigError(f"unknown similarity {name!r}; choose one of {', '.join(SIMILARITIES)}")
    return SIMILARITIES[name]
