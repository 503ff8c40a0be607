"""Random-perturbation faithfulness: sensitivity-N, faithfulness correlation and infidelity.

All three compare, over random perturbations of each image, how much attribution the perturbation
touches with how much the target's score changes; all run on the perturbation engine (`Perturber`):

- `sensitivity_n` (Ancona et al. 2018): for each subset size n, `samples` random subsets of n
  pixels (or tiles) are set to the baseline; the score is the Pearson correlation between the
  summed attribution of the removed units and the drop of the target's logit, averaged over the
  sizes (`n` in units, or `fraction` of the units). A map whose sums track the drops (completeness
  for every subset, as input x gradient on a linear model with a zero baseline) scores 1.
- `faithfulness_correlation` (Bhatt et al. 2020, as quantus.FaithfulnessCorrelation 0.6,
  quantus/metrics/faithfulness/faithfulness_correlation.py `evaluate_batch`): `samples` (Quantus's
  nr_runs, 100) random subsets of `subset_size` (224) values of the flattened (C, H, W) image
  (np.random.choice(C*H*W, 224, replace=False) per image and run) are set to the image's minimum
  over all its values (perturb_baseline="black", batch_baseline_replacement_by_indices); the score
  is the Pearson correlation between the logit drops (softmax=False) and the attribution summed
  over the chosen values, the pixel map broadcast over the channels (so a pixel counts once per
  chosen channel). Quantus's normalise=True (the map divided by its maximum |value|) and abs=False
  do not change a correlation. `units="pixels"` (whole pixels, or `tile` x `tile` tiles, with all
  their channels) and `baseline="zero"` give our former metric. Where Quantus's correlation is NaN
  (constant attribution sums or drops: scipy's pearsonr) ours is 0; its check requires
  subset_size < H * W, ours subset_size < the number of units.
- `infidelity` (Yeh et al. 2019, as captum.metrics.infidelity): the mean over perturbations I of
  (I . map - (f(x) - f(x - I)))^2, lower is better. `perturbation="noise"` (default): I ~ N(0, sigma^2)
  per pixel, shared by the channels (maps are per pixel), for local maps (gradients);
  `perturbation="subset"`: a random `fraction` of the units is replaced by the baseline and I is
  the binary indicator of the removed units (captum's `multiply_by_inputs=True` convention), for
  maps that already multiply by the input (input x gradient, integrated gradients). With
  `normalize=True` the map is first rescaled by captum's beta = E[I.map * drop] / E[(I.map)^2],
  which makes the score invariant to the map's scale.

Subsets and noise are drawn per (image, sample) from `seed` through `session.random(seed, purpose)`
(`draw_subsets`, `draw_noise`; purposes SUBSETS and INFIDELITY_NOISE), so an image's score depends
neither on `batch_size` nor, with `image_ids=`, on the other images of its batch; the numbers are
generated on the CPU, so they do not depend on the device either.
The clean score f(x) also goes through the engine (one all-kept mask per image), which takes it from
the metric's own clean forward (perturbation.resolve_remembered). The subsets do not depend on the
map, so inside `perturbation.shared_passes()` the score drops of a (model, images, settings) are
computed once and reused for every map measured on them (a leaderboard's methods), bit for bit.
Where the attribution sums or the drops do not vary (a constant map), the correlation is 0.
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..core.errors import ConfigError
from ..core.randomness import KeyedRandom
from ..core.registry import Param
from ..core.targets import SCORES
from ..baselines import Baseline
from .. import perturbation as _perturbation
from ..perturbation import Perturber, resolve_remembered, tile_sums
from .base import Measurement, Metric, register

# Purposes of the random streams (core.randomness): one per kind of draw.
SUBSETS = "random subsets"
INFIDELITY_NOISE = "infidelity noise"


def pearson(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pearson correlation along the last dimension (in float64); 0 where either side is constant."""
    a = a.double() - a.double().mean(-1, keepdim=True)
    b = b.double() - b.double().mean(-1, keepdim=True)
    den = (a.pow(2).sum(-1) * b.pow(2).sum(-1)).sqrt()
    return torch.where(den > 0, (a * b).sum(-1) / den.clamp_min(1e-300), torch.zeros_like(den))


def draw_subsets(rng: KeyedRandom, images, draws, units: int, sizes, device="cpu") -> torch.Tensor:
    """(N, units) bool: row r is True on `sizes[r]` units drawn uniformly without replacement, keyed by
    (images[r], draws[r]) (the smallest of `units` keyed uniform numbers)."""
    keys = rng.uniform(images, draws, (units,), device=device, dtype=torch.float64)
    sizes = torch.as_tensor(sizes, device=keys.device)
    if _perturbation.FAST and keys.device.type == "cpu":
        return _smallest(keys, sizes)
    return _smallest_by_sort(keys, sizes)


def _smallest_by_sort(keys: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor:
    """True on the sizes[r] smallest keys of row r, in the order of argsort (the reference)."""
    order = keys.argsort(dim=1)
    positions = torch.empty_like(order)
    positions.scatter_(1, order, torch.arange(keys.shape[1], device=order.device).expand_as(order))
    return positions < sizes[:, None]


def _smallest(keys: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor:
    """`_smallest_by_sort` without the sort: below each row's sizes[r]-th smallest key (kthvalue, linear
    time; 3-4x faster than a full argsort of 50,176 keys). The keys are float32 draws, so equal keys
    happen (~75 pairs per 224x224 row); where they straddle the cut, which of them argsort puts first
    is its own business, so those rows (rare) go through the sort: the result is the same bit for bit."""
    out = torch.empty(keys.shape, dtype=torch.bool, device=keys.device)
    for size in sizes.unique().tolist():
        rows = (sizes == size).nonzero()[:, 0]
        if size <= 0 or size >= keys.shape[1]:
            out[rows] = size > 0
            continue
        k = keys[rows]
        cut = k.kthvalue(int(size), dim=1, keepdim=True).values
        below = k <= cut
        tied = below.sum(1) != size  # more than `size` keys at or below the cut: a tie at the cut
        if bool(tied.any()):
            below[tied] = _smallest_by_sort(k[tied], sizes[rows[tied]])
        out[rows] = below
    return out


def draw_noise(rng: KeyedRandom, images, draws, shape, device="cpu", dtype=torch.float32) -> torch.Tensor:
    """(N, *shape) standard normal numbers, row r keyed by (images[r], draws[r])."""
    return rng.normal(images, draws, shape, device=device, dtype=dtype)


def clean_scores(perturber: Perturber, session, x: torch.Tensor, target) -> torch.Tensor:
    """f(x) for each image (B,), through the engine (one all-kept mask per image)."""
    def keep_all(image, k):
        return torch.ones(len(image), 1, 1, 1, device=x.device, dtype=x.dtype)

    return perturber.scores(session, x, target, 1, keep_all)[:, 0]


def subset_drops(session, x, maps, target, *, sizes: Sequence[int], samples: int, tile: int, baseline, score: str,
                 batch_size: int, seed: int, desc: str = "", elements: bool = False):
    """Remove `samples` random subsets of each size (in units of `tile` x `tile` pixels); subset
    k = size index * samples + sample of image i is drawn by (i, k) from `session.random(seed, SUBSETS)`.

    `elements=True`: the units are the values of the (C, h, w) grid, channel by channel (Quantus's
    indices into the flattened (C, H, W) image), each carrying its pixel's attribution (the map
    broadcast over the channels); else a unit is a pixel (or tile) with all its channels.

    Returns the summed attribution of the removed units and the drop of the score, both
    (B, len(sizes), samples).
    """
    units = tile_sums(maps, tile)
    B, h, w = units.shape
    c = x.shape[1] if elements else 1
    values = units[:, None].expand(B, c, h, w).flatten(1)
    S, n = len(sizes), len(sizes) * samples
    size_of = torch.as_tensor(list(sizes)).repeat_interleave(samples)  # (n,) size of sample k
    attribution = torch.empty(B, n, device=x.device, dtype=x.dtype)
    rng = session.random(seed, SUBSETS)

    def make_masks(image, k):
        removed = draw_subsets(rng, image, k, c * h * w, size_of[k.cpu()], device=x.device)
        attribution[image, k] = (values[image] * removed).sum(1)
        return (~removed).view(-1, c, h, w)

    perturber = Perturber(subset_baseline(baseline), score, batch_size)
    # The subsets, and so the score drops, do not depend on the map: a leaderboard that measures
    # several methods' maps on the same images runs these passes once (perturbation.SHARED); the
    # attribution sums are then computed for this map over the same rows and chunks.
    key = _drops_key(session, x, target, sizes, samples, tile, baseline, score, batch_size, seed, rng, elements)
    drops = _perturbation.SHARED.get(key)
    if drops is None:
        clean = clean_scores(perturber, session, x, target)
        scores = perturber.scores(session, x, target, n, make_masks, desc=desc)
        drops = (clean[:, None] - scores).view(B, S, samples)
        _perturbation.SHARED.put(key, drops)
    else:
        size = batch_size or _perturbation.auto_batch_size(x.device, pixels=x.shape[-2] * x.shape[-1])
        for start in range(0, B * n, size):
            rows = torch.arange(start, min(start + size, B * n), device=x.device)
            make_masks(rows // n, rows % n)
    return attribution.view(B, S, samples), drops


def _drops_key(session, x, target, sizes, samples, tile, baseline, score, batch_size, seed, rng, elements):
    """The `perturbation.SHARED` key of `subset_drops`' score drops, or None where they are not shared
    (a callable target, a baseline given as an object or tensor)."""
    if getattr(target, "fn", None) is not None or getattr(target, "classes", None) is None:
        return None
    if not (baseline is None or isinstance(baseline, (str, int, float))):
        return None
    keys = None if rng.keys is None else tuple(str(k) for k in rng.keys)
    return _perturbation.shared_key(session, x, "subset drops", _perturbation._digest(target.classes),
                                    tuple(int(v) for v in sizes), int(samples), int(tile), baseline, score,
                                    batch_size, int(seed), rng.purpose, keys, bool(elements))


class ImageMinimum(Baseline):
    """Quantus's perturb_baseline="black": each image's minimum over all its values (channels
    included), `get_baseline_dict(...)["black"] = arr.min()` in quantus/helpers/utils.py."""

    name = "black"

    def __call__(self, x, rng=None):
        return x.flatten(1).amin(1).view(-1, *([1] * (x.dim() - 1))).expand_as(x)


def subset_baseline(spec):
    """A baseline spec, plus "black" (`ImageMinimum`, Quantus's name) for the random-subset metrics."""
    return ImageMinimum() if isinstance(spec, str) and spec == "black" else spec


def _check_int(value, name: str, low: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(f"{name} must be an int >= {low}, got {value!r}")
    return value


def _check_score(score) -> str:
    if score not in SCORES:
        raise ConfigError(f"unknown score '{score}'; choose one of {', '.join(SCORES)}")
    return score


def _units(x: torch.Tensor, tile: int, elements: bool = False) -> int:
    H, W = x.shape[-2:]
    return -(-H // tile) * -(-W // tile) * (x.shape[1] if elements else 1)


class _RandomSubsets(Metric):
    """What sensitivity-N and faithfulness correlation share: random subsets of units removed to a baseline."""

    category = "faithfulness"
    higher_is_better = True
    stochastic = True

    tile = Param(1, "units are square tiles of this many pixels per side")
    baseline = Param("zero", "what removed units become (see saliencylab.baselines)")
    score = Param("logit", "the target's score: logit, softmax or log_softmax")
    batch_size = Param(None, "rows per forward pass (None: automatic)")
    seed = Param(0, "the random subsets")

    def check(self):
        _check_int(self.tile, "tile")
        _check_score(self.score)


@register
class SensitivityN(_RandomSubsets):
    name = "sensitivity_n"
    description = ("Sensitivity-N (Ancona et al.): correlation between the attribution of random pixel subsets of "
                   "size n and the logit drop when they are removed, averaged over n (higher is better).")
    category = "faithfulness"
    higher_is_better = True
    stochastic = True

    n = Param(None, "subset size(s) in units (overrides fraction)")
    fraction = Param((0.01, 0.1, 0.5), "subset size(s) as fractions of the units")
    samples = Param(64, "random subsets per size")

    def check(self):
        super().check()
        _check_int(self.samples, "samples", 2)
        n, fraction = self.n, self.fraction
        if n is not None:
            sizes = [n] if isinstance(n, int) else list(n)
            if not sizes or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in sizes):
                raise ConfigError(f"n must be a positive int or a sequence of them, got {n!r}")
        else:
            fracs = [fraction] if isinstance(fraction, (int, float)) else list(fraction)
            if not fracs or any(isinstance(f, bool) or not isinstance(f, (int, float)) or not 0 < f < 1
                                for f in fracs):
                raise ConfigError(f"fraction must be a number in (0, 1) or a sequence of them, got {fraction!r}")

    def sizes(self, units: int) -> list[int]:
        if self.n is not None:
            sizes = [self.n] if isinstance(self.n, int) else list(self.n)
        else:
            fracs = [self.fraction] if isinstance(self.fraction, (int, float)) else list(self.fraction)
            sizes = [max(1, round(f * units)) for f in fracs]
        if any(s >= units for s in sizes):
            raise ConfigError(f"subset sizes {sizes} must be smaller than the number of units ({units})")
        return sizes

    def compute(self, session, x, maps, target, **data):
        target = resolve_remembered(self, session, x, target)
        units = _units(x, self.tile)
        sizes = self.sizes(units)
        attribution, drops = subset_drops(session, x, maps, target, sizes=sizes, samples=self.samples,
                                          tile=self.tile, baseline=self.baseline, score=self.score,
                                          batch_size=self.batch_size, seed=self.seed, desc=self.name)
        corr = pearson(attribution, drops).to(x.dtype)  # (B, S)
        sizes_t = torch.tensor(sizes, device=x.device)
        return Measurement(corr.mean(1), {"n": sizes_t, "fraction": sizes_t.to(x.dtype) / units, "correlation": corr})


UNITS = ("elements", "pixels")


@register
class FaithfulnessCorrelation(_RandomSubsets):
    name = "faithfulness_correlation"
    description = ("Faithfulness correlation (Bhatt et al., as Quantus): correlation between the attribution of "
                   "random subsets of 224 image values and the logit drop when they are set to the image's "
                   "minimum (higher is better).")
    category = "faithfulness"
    higher_is_better = True
    stochastic = True

    subset_size = Param(224, "units per random subset")
    samples = Param(100, "random subsets per image")
    units = Param("elements", "what a subset draws: elements (values of the (C, H, W) image, Quantus) or pixels")
    baseline = Param("black", "what removed units become: black (each image's minimum, Quantus) or a "
                              "saliencylab.baselines spec")

    def check(self):
        super().check()
        _check_int(self.subset_size, "subset_size")
        _check_int(self.samples, "samples", 2)
        if self.units not in UNITS:
            raise ConfigError(f"units must be one of {', '.join(UNITS)}, got {self.units!r}")

    def compute(self, session, x, maps, target, **data):
        target = resolve_remembered(self, session, x, target)
        elements = self.units == "elements"
        units = _units(x, self.tile, elements)
        if self.subset_size >= units:
            raise ConfigError(f"subset_size ({self.subset_size}) must be smaller than the number of units ({units})")
        attribution, drops = subset_drops(session, x, maps, target, sizes=[self.subset_size], samples=self.samples,
                                          tile=self.tile, baseline=self.baseline, score=self.score,
                                          batch_size=self.batch_size, seed=self.seed, desc=self.name,
                                          elements=elements)
        return Measurement(pearson(attribution[:, 0], drops[:, 0]).to(x.dtype),
                           {"attribution_sum": attribution[:, 0], "score_drop": drops[:, 0]})


PERTURBATIONS = ("noise", "subset")


@register
class Infidelity(Metric):
    name = "infidelity"
    description = ("Infidelity (Yeh et al.): mean squared error between map . perturbation and the logit change "
                   "under Gaussian noise (or random removals); lower is better.")
    category = "faithfulness"
    higher_is_better = False
    stochastic = True

    perturbation = Param("noise", "noise (Gaussian, subtracted) or subset (random removals)")
    sigma = Param(0.1, "std of the Gaussian noise, in the model's input units")
    fraction = Param(0.1, "share of the units removed (perturbation='subset')")
    samples = Param(32, "perturbations per image")
    normalize = Param(False, "rescale the map by captum's beta first (scale-invariant score)")
    tile = Param(1, "units are square tiles of this many pixels per side (perturbation='subset')")
    baseline = Param("zero", "what removed units become (perturbation='subset')")
    score = Param("logit", "the target's score: logit, softmax or log_softmax")
    batch_size = Param(None, "rows per forward pass (None: automatic)")
    seed = Param(0, "the noise or subsets")

    def check(self):
        perturbation, sigma, fraction, normalize = self.perturbation, self.sigma, self.fraction, self.normalize
        samples, tile, score = self.samples, self.tile, self.score
        if perturbation not in PERTURBATIONS:
            raise ConfigError(f"unknown perturbation '{perturbation}'; choose one of {', '.join(PERTURBATIONS)}")
        if isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or sigma <= 0:
            raise ConfigError(f"sigma must be a positive number, got {sigma!r}")
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction < 1:
            raise ConfigError(f"fraction must be a number in (0, 1), got {fraction!r}")
        if not isinstance(normalize, bool):
            raise ConfigError(f"normalize must be a bool, got {normalize!r}")
        _check_int(samples, "samples")
        _check_int(tile, "tile")
        _check_score(score)

    def dots_and_drops(self, session, x, maps, target):
        """I . map and f(x) - f(x - I) for every perturbation: both (B, samples)."""
        if self.perturbation == "subset":
            units = _units(x, self.tile)
            size = max(1, round(self.fraction * units))
            dots, drops = subset_drops(session, x, maps, target, sizes=[size], samples=self.samples, tile=self.tile,
                                       baseline=self.baseline, score=self.score, batch_size=self.batch_size,
                                       seed=self.seed, desc=self.name)
            return dots[:, 0], drops[:, 0]
        B, _, H, W = x.shape
        n = self.samples
        dots = torch.empty(B, n, device=x.device, dtype=x.dtype)

        def keep_all(image, k):
            return torch.ones(len(image), 1, 1, 1, device=x.device, dtype=x.dtype)

        rng = session.random(self.seed, INFIDELITY_NOISE)

        def subtract_noise(inputs, image, k):
            noise = float(self.sigma) * draw_noise(rng, image, k, (1, H, W), device=x.device, dtype=x.dtype)
            dots[image, k] = (noise[:, 0] * maps[image]).sum((1, 2))
            return inputs - noise

        perturber = Perturber(self.baseline, self.score, self.batch_size)
        clean = clean_scores(perturber, session, x, target)
        scores = perturber.scores(session, x, target, n, keep_all, perturb=subtract_noise, desc=self.name)
        return dots, clean[:, None] - scores

    def compute(self, session, x, maps, target, **data):
        target = resolve_remembered(self, session, x, target)
        dots, drops = self.dots_and_drops(session, x, maps, target)
        d, f = dots.double(), drops.double()
        if self.normalize:  # captum: beta = E[I.map * drop] / E[(I.map)^2], safe_div with default 1
            den = d.pow(2).sum(1, keepdim=True)
            beta = (d * f).sum(1, keepdim=True) / torch.where(den != 0, den, torch.ones_like(den))
            d = beta * d
        return Measurement((d - f).pow(2).mean(1).to(x.dtype), {"dot": dots, "score_drop": drops})
