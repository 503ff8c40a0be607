"""Ground truth: does the map agree with pixels known to matter? No model needed.

The truth is given as data `truth=` (B, H, W): a signed float map for the explained logit, > 0 where
a pixel raises it, < 0 where it lowers it, 0 where it contributes nothing (as `saliencylab.envs`
batches provide in `batch.truth`). Maps keep their sign; channels are summed.

- `gt_precision`: the share of the k highest-attributed pixels (signed map) that have positive
  truth. `k` = None (default): the number of positive-truth pixels (R-precision: then precision and
  recall at k coincide); an int: k pixels; a float in (0, 1]: that fraction of the pixels (rounded,
  at least 1). Ties at the k-th value share the remaining slots fractionally, as `relevance_rank`.
- `gt_recall`: the share of positive-truth pixels the map selects. `k` = None (default): the
  pixels with positive attribution (does the map give every relevant pixel a positive score? an
  all-positive map reaches 1, which `gt_precision` penalizes); int / float: the top-k pixels as in
  `gt_precision`.
- `gt_mass_positive`: positive attribution on positive-truth pixels / all positive attribution; 0
  for a map without positive attribution.
- `gt_mass_negative`: |negative attribution| on negative-truth pixels / all |negative attribution|;
  0 for a map without negative attribution; NaN when the truth has no negative pixels (nothing to
  find; bootstrap intervals drop NaNs).
- `gt_rank_correlation`: Spearman rank correlation between the map and the signed truth over all
  pixels, ties by average rank (`metrics.similarity.spearman`, as scipy.stats.spearmanr); 0 for a
  constant map, NaN for a constant truth (undefined).

The first three score NaN (with a warning) for images whose truth has no positive pixel.
"""

from __future__ import annotations

import math
import warnings

import torch

from ..core.errors import ConfigError, InputError
from ..core.registry import Param
from .base import Measurement, Metric, register
from .similarity import spearman


def check_truth(truth, shape) -> torch.Tensor:
    """The truth as a float tensor of the maps' shape (B, H, W)."""
    B, H, W = shape
    if truth is None:
        raise InputError(f"ground-truth metrics need truth=({B}, {H}, {W}): the signed relevance of each pixel "
                         "(e.g. an environment batch's batch.truth)")
    if not (isinstance(truth, torch.Tensor) or type(truth).__module__.startswith("numpy")):
        raise InputError(f"truth must be a tensor of shape ({B}, {H}, {W}), got {type(truth).__name__}")
    t = torch.as_tensor(truth).detach()
    if t.dim() == 4 and t.shape[1] == 1:
        t = t[:, 0]
    if tuple(t.shape) != (B, H, W):
        raise InputError(f"truth must have shape ({B}, {H}, {W}) to match the maps, got {tuple(t.shape)}")
    if t.is_complex():
        raise InputError("truth must be real numbers")
    t = t.to(torch.float64 if t.device.type != "mps" else torch.float32)
    if not bool(torch.isfinite(t).all()):
        raise InputError("truth contains NaN or infinite values")
    return t


def _ratio(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """num / den, 0 where den == 0."""
    safe = torch.where(den != 0, den, torch.ones_like(den))
    return torch.where(den != 0, num / safe, torch.zeros_like(num))


def _check_k(k):
    if k is None:
        return
    if isinstance(k, bool) or not isinstance(k, (int, float)):
        raise ConfigError(f"k must be None, a number of pixels (int >= 1) or a fraction in (0, 1], got {k!r}")
    if isinstance(k, int) and k < 1:
        raise ConfigError(f"k must be at least 1 pixel, got {k}")
    if isinstance(k, float) and not 0 < k <= 1:
        raise ConfigError(f"a fractional k must be in (0, 1], got {k}")


def _resolve_k(k, n: int, default: torch.Tensor) -> torch.Tensor:
    """k per image (B,) long: `default` for None, else the int, or the fraction of n pixels."""
    if k is None:
        return default.long()
    if isinstance(k, float):
        count = max(1, int(round(k * n)))
    else:
        if k > n:
            raise InputError(f"k={k} exceeds the {n} pixels of a map")
        count = k
    return torch.full_like(default, count, dtype=torch.long)


def top_k_weights(values: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """(B, N) membership of each pixel in the top-k (per-image k, (B,)): 1 above the k-th value,
    a shared fraction of the remaining slots for pixels tied with it, 0 below; rows sum to k."""
    n = values.shape[1]
    kth = values.sort(1, descending=True).values.gather(1, (k - 1).clamp(0, n - 1)[:, None])
    above = values > kth
    tied = values == kth
    slots = (k - above.sum(1)).to(values.dtype)[:, None]
    share = _ratio(slots, tied.sum(1, keepdim=True).to(values.dtype))
    weight = above.to(values.dtype) + tied.to(values.dtype) * share
    return torch.where((k > 0)[:, None], weight, torch.zeros_like(weight))


class GroundTruthMetric(Metric):
    """Base class: `_compare(maps (B, N) float64, truth (B, N) float64) -> (B,)`."""

    category = "groundtruth"
    needs_model = False
    requires = ("truth",)
    needs_positive: bool = True   # NaN (with a warning) where the truth has no positive pixel

    def compute(self, session, x, maps, target, truth=None, **data):
        t = check_truth(truth, tuple(maps.shape)).to(maps.device)
        m = maps.to(t.dtype).flatten(1)
        t = t.flatten(1)
        scores = self._compare(m, t)
        if self.needs_positive:
            empty = ~(t > 0).any(1)
            if bool(empty.any()):
                warnings.warn(f"{self.name}: the truth of image(s) {empty.nonzero().flatten().tolist()[:10]} has no "
                              "positive pixel; they score NaN", stacklevel=4)
                scores = torch.where(empty, torch.full_like(scores, math.nan), scores)
        return Measurement(scores.to(maps.dtype))

    def _compare(self, maps: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


@register
class GroundTruthPrecision(GroundTruthMetric):
    name = "gt_precision"
    description = "Share of the top-k attributed pixels with positive truth (k = number of truth pixels)."

    k = Param(None, "pixels selected: None (the number of positive-truth pixels), an int, or a fraction")

    def check(self):
        _check_k(self.k)

    def _compare(self, maps, truth):
        relevant = truth > 0
        k = _resolve_k(self.k, maps.shape[1], relevant.sum(1))
        chosen = top_k_weights(maps, k)
        return _ratio((chosen * relevant).sum(1), k.to(maps.dtype))


@register
class GroundTruthRecall(GroundTruthMetric):
    name = "gt_recall"
    description = "Share of positive-truth pixels the map selects (positive attribution, or the top-k)."

    k = Param(None, "pixels selected: None (those with positive attribution), an int, or a fraction")

    def check(self):
        _check_k(self.k)

    def _compare(self, maps, truth):
        relevant = truth > 0
        if self.k is None:
            chosen = (maps > 0).to(maps.dtype)
        else:
            chosen = top_k_weights(maps, _resolve_k(self.k, maps.shape[1], relevant.sum(1)))
        return _ratio((chosen * relevant).sum(1), relevant.sum(1).to(maps.dtype))


@register
class GroundTruthMassPositive(GroundTruthMetric):
    name = "gt_mass_positive"
    description = "Share of the positive attribution mass on positive-truth pixels."

    def _compare(self, maps, truth):
        positive = maps.clamp(min=0)
        return _ratio((positive * (truth > 0)).sum(1), positive.sum(1))


@register
class GroundTruthMassNegative(GroundTruthMetric):
    name = "gt_mass_negative"
    description = "Share of the negative attribution mass on negative-truth pixels (NaN without any)."
    needs_positive = False

    def _compare(self, maps, truth):
        negative = (-maps).clamp(min=0)
        has = (truth < 0).any(1)
        share = _ratio((negative * (truth < 0)).sum(1), negative.sum(1))
        return torch.where(has, share, torch.full_like(share, math.nan))


@register
class GroundTruthRankCorrelation(GroundTruthMetric):
    name = "gt_rank_correlation"
    description = "Spearman rank correlation between the map and the signed truth over all pixels."
    needs_positive = False

    def _compare(self, maps, truth):
        rho = spearman(maps, truth)
        constant = (truth == truth[:, :1]).all(1)
        return torch.where(constant, torch.full_like(rho, math.nan), rho)
