"""Localization: does the map put its attribution on the object? No model needed.

The object region is given as data: `boxes=` (B, 4) as (x0, y0, x1, y1) in pixels, x0/y0 inclusive
and x1/y1 exclusive (a pixel (row i, column j) is inside when x0 <= j < x1 and y0 <= i < y1), or
(B, K, 4), or a list with one entry per image that is a box or a list of boxes (union; an empty list
is an empty region); or `masks=` (B, H, W) booleans (0/1 numbers accepted). Images whose region is
empty score NaN (with a warning), as in Quantus.

Metrics (maps keep their sign; each metric says which part of the map it uses):
- `pointing_game` (Zhang et al. 2016/2018): 1 if the map's maximum (first one in row-major order on
  ties, as np.argmax) lies in the region, or within `tolerance` pixels (Euclidean) of it when
  tolerance > 0; the original protocol uses 15 px on full-size images.
- `energy_pointing_game` (Score-CAM's "energy-based pointing game", as in sukrutrao/Model-Guidance
  metrics.py): positive attribution inside / positive attribution overall; a map without
  positive attribution scores 0.
- `iou`: positive part / its max per image, pixels strictly above `threshold` (0.5), IoU with the
  region (as Model-Guidance's BoundingBoxIoU, which min-max normalizes the positive part: the same
  whenever some pixel is <= 0).
- `relevance_mass` (Arras et al. 2022, CLEVR-XAI): relevance inside / relevance overall, with
  `relevance="positive"` (default: the paper's and Quantus's docstring definition), "absolute" (the
  CLEVR-XAI evaluation code), or "signed" (Quantus RelevanceMassAccuracy's code with its defaults,
  raw sums, unbounded for signed maps). All three agree on non-negative maps. Zero total scores 0.
- `relevance_rank` (Arras et al.; Quantus RelevanceRankAccuracy): with k = |region|, the fraction of
  the k highest-attributed pixels (signed map) that fall in the region. Ties at the k-th value share
  the remaining slots fractionally, so the score does not depend on an arbitrary tie order (for
  maps without ties it is Quantus's value exactly).
- `effective_heat_ratio` (Zhang et al. 2021, InputIBA; the authors' iba/evaluation/
  effective_heat_ratios.py): see `EffectiveHeatRatio`.
"""

from __future__ import annotations

import warnings

import torch

from ..core.errors import ConfigError, InputError
from ..core.registry import Param
from .base import Measurement, Metric, register


# -- regions -----------------------------------------------------------------------------------
def _box_tensor(boxes, B: int) -> torch.Tensor:
    """Boxes as a (B, K, 4) float tensor (zero-area padding for images with fewer boxes)."""
    if isinstance(boxes, torch.Tensor) or type(boxes).__module__.startswith("numpy"):
        t = torch.as_tensor(boxes).detach().cpu()
        if t.dim() == 2 and t.shape == (B, 4):
            t = t[:, None]
        if t.dim() != 3 or t.shape[0] != B or t.shape[2] != 4:
            raise InputError(f"boxes must have shape ({B}, 4) as (x0, y0, x1, y1) pixels, or ({B}, K, 4); "
                             f"got {tuple(t.shape)}")
        return t.to(torch.float64)
    if not isinstance(boxes, (list, tuple)):
        raise InputError(f"boxes must be a tensor ({B}, 4) or a list of boxes per image, got {type(boxes).__name__}")
    if len(boxes) != B:
        raise InputError(f"got boxes for {len(boxes)} images, but there are {B} images; give one entry per image")
    per_image = []
    for i, entry in enumerate(boxes):
        try:
            t = torch.as_tensor(entry if not isinstance(entry, torch.Tensor) else entry.detach().cpu(),
                                dtype=torch.float64)
        except (TypeError, ValueError) as e:
            raise InputError(f"boxes for image {i} must be (x0, y0, x1, y1) or a list of such boxes, "
                             f"got {entry!r}") from e
        if t.numel() == 0:
            t = t.reshape(0, 4)
        elif t.dim() == 1:
            t = t[None]
        if t.dim() != 2 or t.shape[1] != 4:
            raise InputError(f"boxes for image {i} must be (x0, y0, x1, y1) or a list of such boxes, "
                             f"got shape {tuple(t.shape)}")
        per_image.append(t)
    k = max(1, max(t.shape[0] for t in per_image))
    out = torch.zeros(B, k, 4, dtype=torch.float64)
    for i, t in enumerate(per_image):
        out[i, : t.shape[0]] = t
    return out


def boxes_to_masks(boxes, shape) -> torch.Tensor:
    """(B, H, W) boolean masks, the union of each image's boxes; see the module docstring."""
    B, H, W = shape
    t = _box_tensor(boxes, B)
    if not torch.isfinite(t).all():
        raise InputError("boxes contain NaN or infinite coordinates")
    x0, y0, x1, y1 = t.unbind(-1)                                              # (B, K)
    if bool((x1 < x0).any() or (y1 < y0).any()):
        raise InputError("boxes must be (x0, y0, x1, y1) with x1 >= x0 and y1 >= y0 (pixels, x1/y1 exclusive)")
    cols = torch.arange(W, dtype=torch.float64)
    rows = torch.arange(H, dtype=torch.float64)
    in_x = (cols >= x0[..., None]) & (cols < x1[..., None])                    # (B, K, W)
    in_y = (rows >= y0[..., None]) & (rows < y1[..., None])                    # (B, K, H)
    return (in_y[..., :, None] & in_x[..., None, :]).any(1)


def region_masks(shape, boxes=None, masks=None, *, metric: str = "") -> torch.Tensor:
    """The object region of each image as (B, H, W) booleans, from `boxes=` or `masks=`."""
    B, H, W = shape
    who = f"metric '{metric}'" if metric else "localization metrics"
    if boxes is None and masks is None:
        raise InputError(f"{who} needs the object region: pass boxes=({B}, 4) as (x0, y0, x1, y1) pixels, "
                         f"or masks=({B}, {H}, {W}) booleans")
    if boxes is not None and masks is not None:
        raise InputError(f"{who} takes boxes= or masks=, not both")
    if boxes is not None:
        return boxes_to_masks(boxes, shape)
    if not (isinstance(masks, torch.Tensor) or type(masks).__module__.startswith("numpy")):
        raise InputError(f"masks must be a tensor of shape ({B}, {H}, {W}), got {type(masks).__name__}")
    m = torch.as_tensor(masks).detach()
    if m.dim() == 4 and m.shape[1] == 1:
        m = m[:, 0]
    if tuple(m.shape) != (B, H, W):
        raise InputError(f"masks must have shape ({B}, {H}, {W}) to match the maps, got {tuple(m.shape)}")
    if m.dtype != torch.bool:
        if m.is_complex() or not bool(((m == 0) | (m == 1)).all()):
            raise InputError("masks must be booleans (or 0/1 values)")
        m = m != 0
    return m


class LocalizationMetric(Metric):
    """Base class: `_localize(maps (B, H, W), region (B, H, W) bool) -> (B,)` (or `localize` for
    scores and curves)."""

    category = "localization"
    needs_model = False
    requires = ("boxes_or_masks",)

    def compute(self, session, x, maps, target, boxes=None, masks=None, **data):
        region = region_masks(tuple(maps.shape), boxes, masks, metric=self.name).to(maps.device)
        scores, curves = self.localize(maps, region)
        empty = ~region.flatten(1).any(1)
        if bool(empty.any()):
            warnings.warn(f"{self.name}: the region of image(s) {empty.nonzero().flatten().tolist()[:10]} is "
                          "empty; they score NaN", stacklevel=4)
            scores = torch.where(empty, torch.full_like(scores, float("nan")), scores)
        return Measurement(scores, curves)

    def localize(self, maps: torch.Tensor, region: torch.Tensor):
        """(scores (B,), curves or None)."""
        return self._localize(maps, region), None

    def _localize(self, maps: torch.Tensor, region: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


def _ratio(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """num / den, 0 where den == 0."""
    return torch.where(den != 0, num / torch.where(den != 0, den, torch.ones_like(den)), torch.zeros_like(num))


@register
class PointingGame(LocalizationMetric):
    name = "pointing_game"
    description = "1 if the map's maximum falls in the object region (within `tolerance` pixels), else 0."

    tolerance = Param(0, "pixels (Euclidean) around the region that still count as a hit")

    def check(self):
        t = self.tolerance
        if not isinstance(t, (int, float)) or isinstance(t, bool) or t < 0:
            raise ConfigError(f"tolerance must be a number of pixels >= 0, got {t!r}")

    def _localize(self, maps, region):
        B, H, W = maps.shape
        index = maps.flatten(1).argmax(1)
        if self.tolerance <= 0:
            return region.flatten(1).gather(1, index[:, None])[:, 0].to(maps.dtype)
        py, px = (index // W).to(maps.dtype), (index % W).to(maps.dtype)
        rows = torch.arange(H, device=maps.device, dtype=maps.dtype)
        cols = torch.arange(W, device=maps.device, dtype=maps.dtype)
        d2 = (rows[None, :, None] - py[:, None, None]) ** 2 + (cols[None, None, :] - px[:, None, None]) ** 2
        return (region & (d2 <= float(self.tolerance) ** 2)).flatten(1).any(1).to(maps.dtype)


@register
class EnergyPointingGame(LocalizationMetric):
    name = "energy_pointing_game"
    description = "Positive attribution inside the region / positive attribution overall (0 without any)."

    def _localize(self, maps, region):
        positive = maps.clamp(min=0)
        return _ratio((positive * region).flatten(1).sum(1), positive.flatten(1).sum(1))


@register
class IoU(LocalizationMetric):
    name = "iou"
    description = "IoU of the region with the pixels above `threshold` of the positive map scaled to max 1."

    threshold = Param(0.5, "pixels strictly above this share of the positive map's max are on")

    def check(self):
        t = self.threshold
        if not isinstance(t, (int, float)) or isinstance(t, bool) or not 0 <= t < 1:
            raise ConfigError(f"threshold must be in [0, 1), got {t!r}")

    def _localize(self, maps, region):
        positive = maps.clamp(min=0)
        peak = positive.flatten(1).amax(1)[:, None, None]
        scaled = _ratio(positive, peak.expand_as(positive))
        on = scaled > self.threshold
        inter = (on & region).flatten(1).sum(1).to(maps.dtype)
        union = (on | region).flatten(1).sum(1).to(maps.dtype)
        return _ratio(inter, union)


RELEVANCE = ("positive", "absolute", "signed")


@register
class RelevanceMass(LocalizationMetric):
    name = "relevance_mass"
    description = "Relevance mass accuracy (Arras et al.): relevance inside the region / relevance overall."

    relevance = Param("positive", "which part of the map counts: positive, absolute or signed")

    def check(self):
        if self.relevance not in RELEVANCE:
            raise ConfigError(f"unknown relevance {self.relevance!r}; choose one of {', '.join(RELEVANCE)}")

    def _localize(self, maps, region):
        r = {"positive": lambda m: m.clamp(min=0), "absolute": torch.abs, "signed": lambda m: m}[self.relevance](maps)
        return _ratio((r * region).flatten(1).sum(1), r.flatten(1).sum(1))


@register
class RelevanceRank(LocalizationMetric):
    name = "relevance_rank"
    description = "Relevance rank accuracy (Arras et al.): share of the top-|region| pixels inside the region."

    def _localize(self, maps, region):
        values = maps.flatten(1)
        inside = region.flatten(1)
        n = values.shape[1]
        k = inside.sum(1)                                                      # (B,)
        kth = values.sort(1, descending=True).values.gather(1, (k - 1).clamp(0, n - 1)[:, None])
        above = values > kth
        tied = values == kth
        slots = (k - above.sum(1)).to(maps.dtype)[:, None]
        weight = above.to(maps.dtype) + tied.to(maps.dtype) * _ratio(slots, tied.sum(1, keepdim=True).to(maps.dtype))
        return _ratio((weight * inside).sum(1), k.to(maps.dtype))


@register
class EffectiveHeatRatio(LocalizationMetric):
    """Effective heat ratio (Zhang et al., "Fine-grained neural network explanation by identifying
    input features with predictive information", NeurIPS 2021), as the authors' code computes it:

    1. heat: the map scaled to [0, 1] (divided by its max if it has no negative values, min-max
       normalized otherwise; `normalize=False` takes the map as already in [0, 1], as InputIBA's masks);
    2. pixels below `base_threshold` (0.1) are set to 0; the others are the "pixels of interest";
    3. for each q of `quantiles` evenly spaced levels in [0, 1] (11: 0, 0.1, ..., 1), the threshold
       t = min(q-quantile of the pixels of interest (linear interpolation, as np.quantile), 0.99 * max heat);
    4. ratio(q) = heat summed over region pixels with heat >= t, divided by the *number* of pixels with
       heat >= t (+1e-8) (with `weight_by_heat=False`: the number of region pixels instead of their heat);
    5. the score is the trapezoid area under ratio(q) over q in [0, 1].

    A map without heat >= base_threshold (an all-zero map) scores 0. Higher is better. Curves:
    {"quantile": (Q,), "ratio": (B, Q)}.
    """

    name = "effective_heat_ratio"
    description = "InputIBA's effective heat ratio: area under heat-in-region over heat quantile thresholds."

    base_threshold = Param(0.1, "heat below this is set to 0 (not a pixel of interest)")
    quantiles = Param(11, "evenly spaced quantile levels in [0, 1]")
    weight_by_heat = Param(True, "sum the heat of region pixels (False: count them)")
    normalize = Param(True, "scale the map to [0, 1] first (False: it already is)")

    def check(self):
        q, b = self.quantiles, self.base_threshold
        if isinstance(q, bool) or not isinstance(q, int) or q < 2:
            raise ConfigError(f"quantiles must be an int >= 2, got {q!r}")
        if isinstance(b, bool) or not isinstance(b, (int, float)) or not 0 < b <= 1:
            raise ConfigError(f"base_threshold must be in (0, 1], got {b!r}")

    def localize(self, maps, region):
        heat = maps.flatten(1)
        if self.normalize:
            lo = heat.amin(1, keepdim=True)
            hi = heat.amax(1, keepdim=True)
            shift = torch.where(lo < 0, lo, torch.zeros_like(lo))
            heat = _ratio(heat - shift, (hi - shift).expand_as(heat))
        roi = region.flatten(1)
        B, N = heat.shape
        poi = heat >= self.base_threshold
        heat = heat * poi
        count = poi.sum(1)                                                     # (B,)
        peak = heat.amax(1)
        ordered = torch.where(poi, heat, torch.full_like(heat, -float("inf"))).sort(1).values  # poi last
        q = torch.linspace(0, 1, self.quantiles, device=heat.device, dtype=heat.dtype)
        last = (count - 1).clamp(min=0)
        virtual = q[None, :] * last[:, None].to(heat.dtype)                    # (B, Q)
        lo_i = virtual.floor().long().clamp(max=N - 1)
        hi_i = torch.minimum(lo_i + 1, last[:, None])
        frac = virtual - lo_i.to(heat.dtype)
        offset = (N - count).clamp(max=N - 1)[:, None]
        v_lo = ordered.gather(1, (offset + lo_i).clamp(max=N - 1))
        v_hi = ordered.gather(1, (offset + hi_i).clamp(max=N - 1))
        t = torch.minimum(v_lo + (v_hi - v_lo) * frac, 0.99 * peak[:, None])  # (B, Q)
        above = heat[:, None, :] >= t[:, :, None]                              # (B, Q, N)
        total = above.sum(-1).to(heat.dtype)
        hits = above & roi[:, None, :]
        inside = (hits * heat[:, None, :]).sum(-1) if self.weight_by_heat else hits.sum(-1).to(heat.dtype)
        ratio = inside / (total + 1e-8)
        ratio = torch.where((count > 0)[:, None], ratio, torch.zeros_like(ratio))
        return torch.trapezoid(ratio, q, dim=1), {"quantile": q, "ratio": ratio}
