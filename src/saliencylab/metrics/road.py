"""ROAD: RemOve And Debias (Rong et al. 2022), on the perturbation engine.

Pixels (or square tiles) are ranked by attribution; at each checkpoint a fraction of them is
removed, most relevant first (MoRF) or least relevant first (LeRF), and filled by ROAD's noisy
linear imputation (`perturbation.LinearImputer`: each removed pixel is the weighted mean of its 8
neighbours, 1/6 direct and 1/12 diagonal, plus Gaussian noise of std `noise`), which leaks far less
of the mask's shape to the model than a constant baseline. The curves reuse `ranked_curves`.

Per image we record the target's score (softmax probability by default, `score=`; the paper
reports accuracy over a data set) and summarize each curve by its mean height, i.e. the trapezoid
area divided by the span of the fractions (so a constant curve at p scores p):

- `road_morf`: MoRF curve, lower is better;
- `road_lerf`: LeRF curve, higher is better;
- `road`: LeRF minus MoRF (the gap between the curves), higher is better.

Against the authors' code (tleemann/road_evaluation: road/imputations.py `NoisyLinearImputer`,
road/imputed_dataset.py `ImputedDataset.__getitem__`, road/road.py `run_road`):

- Noise units. The authors impute images in [0, 1] pixel units and normalize afterwards (run_road's
  `transform_test` is applied after the imputation), so their noise 0.01 is 0.01 / std per channel in
  the model's input space (2-4.4x more than 0.01 there for ImageNet or EfficientNet-Lite statistics).
  `normalization=` gives the model's (mean, std) (or a `models.LoadedModel` bundle): the imputation
  then runs in pixel units, as theirs. The default "auto" knows the embedded EfficientNet-Lite0 (an
  instance of `models.efficientnet_lite.EfficientNetLite` gets the bundle's (x - 127/255) / (128/255))
  and takes any other model's inputs to be pixel units already (noise 0.01 in input units): pass
  `normalization=(mean, std)` for a normalized model of your own. "none" forces pixel units.
- Counts: checkpoint p acts on int(units * p) pixels (rounded down), as theirs.
- LeRF fraction: the authors' LeRF at p keeps the p most relevant pixels and removes the other
  1 - p; ours (`lerf_fraction="removed"`, the default) removes the p least relevant, so that MoRF and
  LeRF share one axis (fraction removed) and `road` is the gap between the curves at equal removal.
  `lerf_fraction="kept"` gives theirs (the curve's "fraction" is then the fraction kept; 0 keeps
  nothing, an image the authors' solver cannot impute, filled with black in pixel units here).
- Fractions: ours 0, 0.1, ..., 0.9 (`fractions`); the authors' demo and experiments use
  0.1, 0.2, 0.3, 0.4, 0.5, 0.7, 0.9 (RoadBenchmarkDemo.ipynb, experiments/cifar10/*_params.json).
- Ties: ours are broken by a seeded permutation (`seed`); the authors add 1e-4 N(0, 1) noise to the
  map rescaled to [0, 1], which also reorders near-ties.
- The linear system is solved by multigrid-preconditioned conjugate gradients on all images at once,
  not by spsolve per image (agreement to 1e-8 is tested).

The curves (`return_curves=True`) are {"fraction", "scores"} (or {"fraction", "morf", "lerf"} for
`road`). The imputation noise is drawn per (image, checkpoint) from `seed` through
`session.random(seed, ROAD_NOISE)` (`KeyedImputer`), so an image's score depends neither on
`batch_size` nor, with `image_ids=`, on the other images of its batch. MoRF and LeRF rows of the same
checkpoint share their noise (as `road_morf`'s curve is `road`'s MoRF curve). The checkpoint at 0
(nothing removed: the clean image, for MoRF and LeRF alike) is scored from the metric's clean forward
(perturbation.resolve_remembered), not imputed and forwarded again.
"""

from __future__ import annotations


import torch

from ..core.errors import ConfigError
from ..core.randomness import KeyedRandom
from ..core.registry import Param
from ..core.targets import SCORES
from ..perturbation import Imputer, LinearImputer, check_normalization, resolve_remembered
from .base import Measurement, Metric, register
from .faithfulness import AUC_RULES, area, ranked_curves

ROAD_FRACTIONS = tuple(round(0.1 * i, 1) for i in range(10))  # 0.0, 0.1, ..., 0.9
ROAD_NOISE = "road imputation noise"  # the purpose of the imputation noise's draws (core.randomness)


class KeyedImputer(Imputer):
    """ROAD's noisy linear imputation (`perturbation.LinearImputer.fill`) with its noise drawn from
    `rng` per (image, draw): the engine's row r = image * n + k draws (image, k), so the noise belongs
    to the image and the checkpoint, not to the batch. `mean`, `std`: the model's normalization, to
    impute and add the noise in pixel units as the authors do (None: the inputs are pixel units).

    `impute_rows(x, masks, images, draws)` is the same for explicit (image, draw) pairs (the one-image
    reference loops in the tests use it)."""

    def __init__(self, noise: float, iterations: int, tol: float, rng: KeyedRandom, n: int, mean=None, std=None):
        self.noise = float(noise)
        self.solver = LinearImputer(noise=noise, iterations=iterations, tol=tol, mean=mean, std=std)
        self.rng = rng
        self.n = int(n)

    def impute(self, x, masks, seed_rows=None):
        if seed_rows is None:
            raise ValueError("KeyedImputer needs the engine's row numbers (seed_rows)")
        rows = torch.as_tensor(seed_rows).cpu()
        return self.impute_rows(x, masks, rows // self.n, rows % self.n)

    def impute_rows(self, x, masks, images, draws):
        return self.solver.fill(x, masks, lambda: self.rng.normal(images, draws, x.shape[1:], device=x.device,
                                                                  dtype=x.dtype))


def embedded_normalization(model) -> tuple | None:
    """(mean, std) of the embedded EfficientNet-Lite0 when `model` is that network (its weights only
    work with that preprocessing), else None."""
    from ..models import LITE_MEAN, LITE_STD
    from ..models.efficientnet_lite import EfficientNetLite

    return (LITE_MEAN, LITE_STD) if isinstance(model, EfficientNetLite) else None


def resolve_normalization(spec, model=None) -> tuple:
    """`normalization=` as (mean, std) tuples, or (None, None) for inputs already in pixel units.

    "auto": the embedded model's normalization when the model is the embedded EfficientNet-Lite0,
    else none; "none"/None: none; a (mean, std) pair; or an object with `mean` and `std` (a
    `models.LoadedModel` bundle)."""
    if spec is None or spec == "none":
        return None, None
    if isinstance(spec, str):
        if spec != "auto":
            raise ConfigError(f"normalization must be 'auto', 'none', (mean, std) or a model bundle, got {spec!r}")
        found = embedded_normalization(model) if model is not None else None
        return (None, None) if found is None else check_normalization(*found)
    if hasattr(spec, "mean") and hasattr(spec, "std") and not isinstance(spec, (tuple, list, torch.Tensor)):
        return check_normalization(spec.mean, spec.std)
    if not isinstance(spec, (tuple, list)) or len(spec) != 2:
        raise ConfigError(f"normalization must be 'auto', 'none', (mean, std) or a model bundle, got {spec!r}")
    return check_normalization(*spec)


def check_noise(noise) -> None:
    if isinstance(noise, bool) or not isinstance(noise, (int, float)) or noise < 0:
        raise ConfigError(f"noise must be a non-negative number, got {noise!r}")


def _check_fractions(fractions) -> tuple[float, ...]:
    try:
        values = tuple(float(f) for f in fractions)
    except TypeError as e:
        raise ConfigError(f"fractions must be a sequence of numbers in [0, 1], got {fractions!r}") from e
    if len(values) < 2 or any(not 0 <= f <= 1 for f in values) or any(b <= a for a, b in zip(values, values[1:])):
        raise ConfigError(f"fractions must be at least two increasing numbers in [0, 1], got {fractions!r}")
    return values


LERF_FRACTIONS = ("removed", "kept")


class ROADMetric(Metric):
    revision = 1  # 1: checkpoints act on int(units * p) pixels and noise is in pixel units (issue 13)
    category = "faithfulness"
    stochastic = True
    least_first = False

    fractions = Param(None, "removal fractions (None: 0, 0.1, ..., 0.9)")
    tile = Param(1, "rank square tiles of this many pixels per side")
    noise = Param(0.01, "std of the imputation noise, in pixel units (see normalization)")
    normalization = Param("auto", "the model's input normalization: auto, none, (mean, std) or a model bundle")
    lerf_fraction = Param("removed", "what a LeRF fraction counts: removed pixels, or kept ones (the authors')")
    score = Param("softmax", "the target's score: softmax, logit or log_softmax")
    auc = Param("trapezoid", "area rule: trapezoid, right or left")
    iterations = Param(50, "imputation solver iterations")
    tol = Param(1e-6, "imputation solver tolerance")
    batch_size = Param(None, "rows per forward pass (None: automatic)")
    seed = Param(0, "imputation noise and tie-break of equal attributions")

    def check(self):
        self.checked_fractions()
        if self.auc not in AUC_RULES:
            raise ConfigError(f"unknown auc rule '{self.auc}'; choose one of {', '.join(AUC_RULES)}")
        if self.score not in SCORES:
            raise ConfigError(f"unknown score '{self.score}'; choose one of {', '.join(SCORES)}")
        if self.lerf_fraction not in LERF_FRACTIONS:
            raise ConfigError(f"lerf_fraction must be one of {', '.join(LERF_FRACTIONS)}, got {self.lerf_fraction!r}")
        check_noise(self.noise)
        resolve_normalization(self.normalization)

    def checked_fractions(self) -> tuple[float, ...]:
        return _check_fractions(ROAD_FRACTIONS if self.fractions is None else self.fractions)

    def curves(self, session, x, maps, target, least_first: bool):
        fractions = self.checked_fractions()
        mean, std = resolve_normalization(self.normalization, session.model)
        imputer = KeyedImputer(self.noise, self.iterations, self.tol, session.random(self.seed, ROAD_NOISE),
                               len(fractions), mean=mean, std=std)
        # the authors' counts: int(units * p), i.e. rounded down (ImputedDataset.__getitem__)
        t, (H, W) = self.tile, maps.shape[-2:]
        units = -(-H // t) * -(-W // t) if isinstance(t, int) and t >= 1 else 1  # else ranked_curves refuses it
        exact = tuple(int(units * p) / units for p in fractions)
        # the authors' LeRF at p keeps the p most relevant pixels (removes the rest): top-first insertion
        kept = least_first and self.lerf_fraction == "kept"
        return ranked_curves(session, x, maps, target, insertion=kept, least_first=least_first and not kept,
                             steps=None, per_step=None, tile=self.tile, baseline=imputer, score=self.score,
                             batch_size=self.batch_size, seed=self.seed, desc=self.name, fractions=exact)

    def summary(self, curves, fractions):
        return area(curves, fractions, self.auc) / float(fractions[-1] - fractions[0])

    def compute(self, session, x, maps, target, **data):
        target = resolve_remembered(self, session, x, target)
        fractions, curves = self.curves(session, x, maps, target, self.least_first)
        return Measurement(self.summary(curves, fractions), {"fraction": fractions, "scores": curves})


@register
class ROADMoRF(ROADMetric):
    name = "road_morf"
    description = ("ROAD, most relevant pixels first: mean score as 0-90% of pixels are removed by noisy linear "
                   "imputation (lower is better).")
    higher_is_better = False


@register
class ROADLeRF(ROADMetric):
    name = "road_lerf"
    description = ("ROAD, least relevant pixels first: mean score as 0-90% of pixels are removed by noisy linear "
                   "imputation (higher is better).")
    least_first = True


@register
class ROAD(ROADMetric):
    name = "road"
    description = "ROAD: LeRF minus MoRF mean score under noisy linear imputation (higher is better)."

    def compute(self, session, x, maps, target, **data):
        target = resolve_remembered(self, session, x, target)
        fractions, morf = self.curves(session, x, maps, target, False)
        _, lerf = self.curves(session, x, maps, target, True)
        return Measurement(self.summary(lerf, fractions) - self.summary(morf, fractions),
                           {"fraction": fractions, "morf": morf, "lerf": lerf})


__all__ = ["ROAD", "ROADLeRF", "ROADMoRF", "ROAD_FRACTIONS", "ROAD_NOISE", "KeyedImputer", "resolve_normalization"]
