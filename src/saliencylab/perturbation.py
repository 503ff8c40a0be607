"""The perturbation engine: the one place that turns (images, masks, baseline) into scored batches.

A keep-mask is 1 where the image is kept and 0 where it is replaced by the baseline (soft values
blend): perturbed = x * m + baseline * (1 - m). Masks are never materialized for all rows at once:
the caller gives a function that builds the masks of one chunk of rows (row = image * n + k), and
the engine chunks by `batch_size`, so memory stays flat however many images or masks there are.

Deletion/insertion, MoRF/LeRF, ROAD, sensitivity-N, infidelity, occlusion and RISE all run here.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

from ._progress import progress
from .baselines import Baseline, make_baseline
from .errors import ConfigError
from .targets import Target

MaskFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def apply_masks(x_rows: torch.Tensor, masks: torch.Tensor, baseline_rows: torch.Tensor) -> torch.Tensor:
    """x * m + b * (1 - m), with masks of shape (N, 1 or C, H, W)."""
    return torch.lerp(baseline_rows, x_rows, masks)


class Perturber:
    """Scores perturbed copies of a batch of images; see the module docstring.

    baseline: a Baseline spec (see saliencylab.baselines) or an Imputer, whose replacement values
    depend on the mask (ROAD's noisy linear imputation).
    score: "softmax" (probability of the target class, the I-GOS/insertion convention), "logit",
    "log_softmax"; callable targets score themselves.
    """

    def __init__(self, baseline="zero", score: str = "softmax", batch_size: int = 64):
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(f"batch_size must be a positive int, got {batch_size!r}")
        self.baseline = make_perturbation_baseline(baseline)
        self.score = score
        self.batch_size = batch_size

    def scores(self, session, x: torch.Tensor, target: Target, n: int, make_masks: MaskFn, *,
               reduce: Callable | None = None, desc: str = "") -> torch.Tensor:
        """Score n perturbations of each image: returns (B, n).

        `make_masks(image_index, k)` returns keep-masks (N, 1 or C, H', W') for a chunk of rows;
        masks smaller than the image are upsampled (nearest). `reduce(scores, image, k, masks)`, if
        given, is called on every chunk (RISE accumulates mask-weighted scores this way).
        """
        B = x.shape[0]
        target = target.with_score(self.score)
        imputing = isinstance(self.baseline, Imputer)
        base = None if imputing else self.baseline(x)
        out = torch.empty(B, n, device=x.device, dtype=x.dtype)
        total = B * n
        starts = range(0, total, self.batch_size)
        with torch.no_grad():
            for start in progress(starts, desc=desc, total=len(starts)):
                rows = torch.arange(start, min(start + self.batch_size, total), device=x.device)
                image, k = rows // n, rows % n
                masks = fit_masks(make_masks(image, k), x.shape[-2:]).to(x.dtype)
                xr = x[image]
                if imputing:
                    inputs = self.baseline.impute(xr, masks, seed_rows=rows)
                else:
                    inputs = apply_masks(xr, masks, base[image])
                s = target(session.forward(inputs), image)
                out[image, k] = s.to(out.dtype)
                if reduce is not None:
                    reduce(s, image, k, masks)
        return out


def fit_masks(masks: torch.Tensor, size) -> torch.Tensor:
    """Bring (N, c, h, w) masks to the image size: nearest upsampling of tiles, then crop."""
    if masks.dim() == 3:
        masks = masks[:, None]
    H, W = size
    h, w = masks.shape[-2:]
    if (h, w) == (H, W):
        return masks
    th, tw = math.ceil(H / h), math.ceil(W / w)
    if h * th < H or w * tw < W:
        raise ConfigError(f"masks of size {h}x{w} cannot tile images of size {H}x{W}")
    return masks.repeat_interleave(th, dim=-2).repeat_interleave(tw, dim=-1)[..., :H, :W]


# -- rankings ----------------------------------------------------------------------------------
def tile_sums(maps: torch.Tensor, tile: int) -> torch.Tensor:
    """Sum (B, H, W) maps over square tiles (edge tiles may be smaller): (B, ceil(H/t), ceil(W/t))."""
    if tile == 1:
        return maps
    H, W = maps.shape[-2:]
    ph, pw = (-H) % tile, (-W) % tile
    padded = F.pad(maps[:, None], (0, pw, 0, ph))
    return F.avg_pool2d(padded, tile, stride=tile, divisor_override=1)[:, 0]


def rank_positions(values: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """Position of each unit when units are sorted by decreasing value (0 = most important).

    values: (B, U). Ties are broken by a seeded random permutation, so a constant map gives a
    random order rather than a raster scan.
    """
    B, U = values.shape
    g = torch.Generator(device="cpu").manual_seed(seed)
    perm = torch.randperm(U, generator=g).to(values.device)
    order = perm[torch.argsort(-values[:, perm], dim=1, stable=True)]
    pos = torch.empty_like(order)
    pos.scatter_(1, order, torch.arange(U, device=values.device).expand(B, U))
    return pos


def ranked_masks(positions: torch.Tensor, counts: torch.Tensor, shape: tuple[int, int], *,
                 insertion: bool) -> MaskFn:
    """Masks that remove (deletion) or reveal (insertion) the `counts[k]` top-ranked units.

    positions: (B, U) from rank_positions; counts: (K,) number of units acted on at step k;
    shape: the unit grid (h, w) with h * w = U.
    """
    h, w = shape

    def make(image, k):
        acted = positions[image] < counts[k][:, None]
        keep = acted if insertion else ~acted
        return keep.view(-1, 1, h, w)

    return make


def step_counts(units: int, steps: int | None = None, per_step: int | None = None) -> torch.Tensor:
    """How many units are acted on at each checkpoint, from 0 to all units inclusive."""
    if per_step is not None:
        counts = torch.arange(0, units + per_step, per_step).clamp(max=units)
        return torch.unique_consecutive(counts)
    if steps is None or steps < 1:
        raise ConfigError(f"steps must be a positive int, got {steps!r}")
    return torch.round(torch.linspace(0, units, steps + 1)).long()


# -- ROAD: noisy linear imputation ---------------------------------------------------------------
class Imputer:
    """A mask-dependent baseline: replacement values computed from the kept pixels."""

    def impute(self, x: torch.Tensor, masks: torch.Tensor, seed_rows: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError


# ROAD's neighbour weights: 1/6 for the four direct neighbours, 1/12 for the four diagonal ones.
_ROAD_KERNEL = torch.tensor([[1 / 12, 1 / 6, 1 / 12], [1 / 6, 0.0, 1 / 6], [1 / 12, 1 / 6, 1 / 12]])


class LinearImputer(Imputer):
    """ROAD's noisy linear imputation (Rong et al. 2022), batched in torch.

    Each removed pixel takes the weighted mean of its 8 neighbours (removed or kept), kept pixels
    stay fixed: the solution of a sparse linear system. Instead of a per-image sparse solve, we fill
    holes coarse-to-fine from a pyramid of mask-weighted averages and then relax with batched
    Jacobi sweeps (one 3x3 convolution each), which converges to the same solution. Gaussian
    noise (std `noise`) is added to the imputed pixels, as in ROAD, to hide the mask's shape.
    """

    name = "road"

    def __init__(self, noise: float = 0.01, iterations: int = 100, seed: int = 0):
        self.noise = float(noise)
        self.iterations = int(iterations)
        self.seed = int(seed)

    def __repr__(self) -> str:
        return f"LinearImputer(noise={self.noise}, iterations={self.iterations}, seed={self.seed})"

    def impute(self, x, masks, seed_rows=None):
        keep = (masks >= 0.5).to(x.dtype).expand(-1, 1, -1, -1)[:, :1]
        filled = solve_linear_imputation(x, keep, self.iterations)
        if self.noise > 0:
            g = torch.Generator(device=x.device).manual_seed(self.seed + int(seed_rows[0]) if seed_rows is not None
                                                             else self.seed)
            filled = filled + (1 - keep) * self.noise * torch.randn(x.shape, generator=g, device=x.device,
                                                                   dtype=x.dtype)
        return filled


def _pyramid_fill(x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Initial guess: each hole gets the mask-weighted average of the nearest coarser level."""
    levels = [(x * keep, keep)]
    while min(levels[-1][1].shape[-2:]) > 1:
        v, w = levels[-1]
        levels.append((F.avg_pool2d(v, 2, ceil_mode=True), F.avg_pool2d(w, 2, ceil_mode=True)))
    v, w = levels[-1]
    guess = torch.where(w > 0, v / w.clamp_min(1e-12), (x * keep).sum((2, 3), keepdim=True)
                        / keep.sum((2, 3), keepdim=True).clamp_min(1e-12))
    for v, w in reversed(levels[:-1]):
        up = F.interpolate(guess, size=v.shape[-2:], mode="nearest")
        guess = torch.where(w > 0, v / w.clamp_min(1e-12), up)
    return guess


def solve_linear_imputation(x: torch.Tensor, keep: torch.Tensor, iterations: int = 100) -> torch.Tensor:
    """Removed pixels (keep = 0) = weighted mean of their neighbours; kept pixels fixed."""
    C = x.shape[1]
    kernel = _ROAD_KERNEL.to(x.device, x.dtype).expand(C, 1, 3, 3)
    # weights at the border: normalize by the weight of the neighbours that exist
    ones = torch.ones_like(x[:1, :1])
    norm = F.conv2d(F.pad(ones, (1, 1, 1, 1)), kernel[:1])
    y = torch.where(keep > 0, x, _pyramid_fill(x, keep))
    for _ in range(iterations):
        avg = F.conv2d(F.pad(y, (1, 1, 1, 1)), kernel, groups=C) / norm
        y = torch.where(keep > 0, x, avg)
    return y


def make_perturbation_baseline(spec):
    """Like baselines.make_baseline, plus 'road' for ROAD's linear imputation."""
    if isinstance(spec, (Imputer, Baseline)):
        return spec
    if spec == "road":
        return LinearImputer()
    return make_baseline(spec)
