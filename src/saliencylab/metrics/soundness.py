"""Completeness and soundness (Li, Zhang, Kawaguchi et al., "A Dual-Perspective Approach to
Evaluating Feature Attribution Methods", 2023; TMLR 2024), on the perturbation engine.

Both remove pixels with ROAD's noisy linear imputation (`perturbation.LinearImputer`, noise 0.01,
as in road.py) and ask the model again. Completeness asks whether the map covers all the predictive
pixels: removing the pixels whose attribution is above a fraction of the map's maximum (by value,
most relevant first) should destroy the prediction. Soundness asks whether the attributed pixels
are truly predictive: revealing pixels by area in order of attribution (least relevant are the ones
still masked, LeRF), attribution added at a step where the model's score does not improve is
counted as "false attribution", and the share of the revealed attribution that is not false is
tracked.

What the authors' code does (github.com/sandylaker/soco, commit 4ac26f4)
------------------------------------------------------------------------
Maps: stored as uint8 PNGs, min-max normalized to [0, 255] per image (tools/get_ig_ds_gb_smaps.py
takes |attribution| averaged over channels first), read back as /255 in the soundness accounting.

Completeness (soco/metrics/vision_completeness.py; configs/_base_/metrics/vision_completeness.yaml;
mask by soco/imputations/road_utils.py::get_road_mask_by_value with smap_mask_mode='morf',
by_area=False): for each mask ratio r in np.arange(0.1, 1.0, 0.1) = 0.1, ..., 0.9, the pixels with
smap > max(smap) * (1 - r) are removed (keep-mask `smap <= threshold`, so the number of removed
pixels depends on the map's values, not on r alone), the image is ROAD-imputed
(soco/imputations/road.py, noise 0.01), and the data set's top-1 accuracy drop
acc(clean) - acc(imputed) is recorded per r (`acc_diffs`). The code dumps this curve to JSON; it
forms no scalar.

Soundness (soco/metrics/vision_soundness.py; configs/_base_/metrics/vision_soundness.yaml;
mask by road_utils.get_road_mask_by_area with smap_mask_mode='lerf', by_area=True): mask ratios
r_t = np.arange(0.98, 0.02, -0.01) = 0.98, 0.97, ..., 0.03 (96 steps, decreasing). At step t the
int(HW * r_t) least-attributed pixels are removed and imputed, i.e. the top n_t = HW - int(HW * r_t)
pixels are revealed (random tie-break: a fresh torch.randperm before a stable sort, drawn separately
for the mask and for the accounting). With A_t the summed normalized attribution of the revealed
pixels, N_t = A_t - A_{t-1} (A_0 = 0, the previous ratio starting at 1.0) the newly revealed
attribution, c_t the classification result on the imputed images (c_0 = 0) and F the accumulated
false attribution (F_0 = 0), each step does, in this order (`compute_attr_ratio`, then
`_update_false_attr`):
  attr_ratio_t = (A_t - F_{t-1}) / (A_t + 1e-6)
  F_t = F_{t-1} + N_t  if  c_t > cls_result_start (0.04)  and  c_t - c_{t-1} <= cls_threshold (0.01)
        F_{t-1}        otherwise.
With the default `cls_metric: Accuracy` c_t is the data set's accuracy and the test is made once
for all images; with `PredScore` c_t is each image's raw classifier output for its label (a
per-image test, though the cls_result_start gate still uses the batch mean). The code dumps the
curves (`attr_ratios`, the mean over images, and `cls_results`) per ratio; it forms no scalar.

What we do
----------
Per image, with the target's score (the authors score a data set's accuracy):
- Maps are min-max normalized per image (float64 on CPU/CUDA) to [0, 1], as the authors' stored
  maps are (a constant map becomes all zeros). Pass |attribution| for signed methods to mirror the
  authors' preprocessing of IG/DeepSHAP maps.
- `completeness`: curve drop_r = s(x) - s(x_r) for each ratio r, where x_r has the pixels with
  normalized attribution > 1 - r imputed (the authors' threshold rule). Scalar: mean height of the
  curve (trapezoid area / span of the ratios, as road.py). Higher is better.
- `soundness`: the authors' recurrence above, per image, with c_t the image's score. The ratios,
  the floor of HW * r_t (their int()), the order of attr_ratio and update, and the 1e-6 are theirs.
  Scalar: mean height of the attr_ratio curve over the ratios. Higher is better (1: no attribution
  was ever declared false).

Parameters (defaults): both take `ratios` (None: the authors' 0.1, ..., 0.9 for completeness,
increasing; 0.98, 0.97, ..., 0.03 for soundness, decreasing), `score="softmax"` ("logit",
"log_softmax", or "accuracy": 1 if the target class is the top class), `noise=0.01` (ROAD's
imputation noise), `iterations=50` and `tol=1e-6` (the imputation solver), `batch_size=None` (automatic: `perturbation.auto_batch_size`),
`seed=0` (imputation noise and tie-breaking). Soundness adds `threshold=0.01` (the authors'
cls_threshold) and `min_score=0.04` (their cls_result_start; None disables the gate).

Deviations from the authors' code, and why:
- Per-image scores with the softmax probability by default instead of the data set's accuracy
  (a per-image 0/1 accuracy barely discriminates maps); on [0, 1] the 0.01 / 0.04 thresholds keep
  their meaning. With `score="accuracy"` and the labels as target, the batch mean of the
  completeness curves is the authors' acc_diffs (up to the draw of the imputation noise); for
  soundness, accuracy is applied per image (their PredScore path), not to the data set at once.
- The soundness gate (min_score) is per image, not on the batch mean.
- One seeded ranking (`seed`, perturbation.rank_positions) serves both the soundness masks and the
  attribution accounting; the authors draw two independent random tie-breaks, so with tied
  (uint8) values their accounted pixels can differ from the imputed ones.
- No uint8 quantization of the maps; the imputation is our batched solver of ROAD's system
  (perturbation.LinearImputer, tested against the exact sparse solve in tests/metrics/test_road.py)
  instead of scipy's spsolve per image, and the noise comes from a per-(image, step) seeded stream.
- The scalars (mean heights) are ours: the authors' code only writes the curves.

The clean score (completeness) and every masked image go through the Perturber, in one call per
metric; imputation noise is drawn per (image, step) from `seed` (`road.KeyedImputer`, purpose
`road.ROAD_NOISE`), so results depend neither on `batch_size` nor, with `image_ids=`, on the other
images of the batch.
Curves (`return_curves=True`): completeness {"ratio" (K,), "clean" (B,), "scores" (B, K),
"drop" (B, K)}; soundness {"ratio" (K,), "revealed" (K,) fraction of pixels revealed, "scores"
(B, K), "attribution" (B, K) = A_t, "false_attribution" (B, K) = F_t, "attr_ratio" (B, K)}.
"""

from __future__ import annotations

import torch

from ..core.errors import ConfigError
from ..core.registry import Param
from ..core.targets import SCORES, Target
from ..perturbation import Perturber, rank_positions, ranked_masks
from .base import Measurement, Metric, register
from .road import ROAD_NOISE, KeyedImputer, check_noise

COMPLETENESS_RATIOS = tuple(round(0.1 * i, 5) for i in range(1, 10))  # np.arange(0.1, 1.0, 0.1).round(5)
SOUNDNESS_RATIOS = tuple(round(0.98 - 0.01 * i, 5) for i in range(96))  # np.arange(0.98, 0.02, -0.01).round(5)
SOCO_SCORES = SCORES + ("accuracy",)
EPS = 1e-6  # the authors' denominator guard in attr_ratio


class _Correct(Target):
    """1 where the model's top class is the target class, else 0 (the authors' Accuracy, per image)."""

    def __init__(self, target: Target):
        if target.classes is None:
            raise ConfigError("score='accuracy' needs class targets (None, an int or B ints), not a callable")
        super().__init__(classes=target.classes, score="logit")

    def __call__(self, outputs, image_index=None):
        classes = self.classes.to(outputs.device)
        if image_index is not None:
            classes = classes[image_index.to(outputs.device)]
        return (outputs.argmax(dim=1) == classes).to(outputs.dtype)

    def with_score(self, score):
        return self


def _work_dtype(device: torch.device) -> torch.dtype:
    """float64 for the accounting where the device has it (as perturbation.solve_linear_imputation)."""
    return torch.float64 if device.type in ("cpu", "cuda") else torch.float32


def normalize_maps(maps: torch.Tensor) -> torch.Tensor:
    """(B, H, W) -> (B, H*W) min-max normalized per image to [0, 1] (float64 on CPU/CUDA); constant maps -> 0."""
    dtype = _work_dtype(maps.device)
    m = maps.detach().to(dtype).flatten(1)
    lo = m.min(1, keepdim=True).values
    span = m.max(1, keepdim=True).values - lo
    return torch.where(span > 0, (m - lo) / span.clamp_min(torch.finfo(dtype).tiny), torch.zeros_like(m))


def false_attribution(scores: torch.Tensor, attribution: torch.Tensor, threshold: float, min_score: float | None):
    """The authors' soundness recurrence, vectorized over steps.

    scores: (B, K) c_t; attribution: (B, K) A_t (revealed attribution, nondecreasing). Returns
    (accumulated false attribution F_t, attr_ratio_t = (A_t - F_{t-1}) / (A_t + 1e-6)), both (B, K).
    """
    scores = scores.to(attribution.dtype)
    prev = torch.cat([torch.zeros_like(scores[:, :1]), scores[:, :-1]], 1)  # c_0 = 0
    is_false = (scores - prev) <= threshold
    if min_score is not None:
        is_false &= scores > min_score
    added = attribution.diff(dim=1, prepend=torch.zeros_like(attribution[:, :1]))  # N_t, A_0 = 0
    accumulated = torch.cumsum(added * is_false, dim=1)
    before = torch.cat([torch.zeros_like(accumulated[:, :1]), accumulated[:, :-1]], 1)
    return accumulated, (attribution - before) / (attribution + EPS)


def _check_ratios(ratios, decreasing: bool) -> tuple[float, ...]:
    order = "decreasing" if decreasing else "increasing"
    try:
        values = tuple(float(r) for r in ratios)
    except TypeError as e:
        raise ConfigError(f"ratios must be a sequence of numbers in [0, 1], got {ratios!r}") from e
    pairs = zip(values, values[1:]) if not decreasing else zip(values[1:], values)
    if len(values) < 2 or any(not 0 <= r <= 1 for r in values) or any(b <= a for a, b in pairs):
        raise ConfigError(f"ratios must be at least two strictly {order} numbers in [0, 1], got {ratios!r}")
    return values


def _check_number(value, name: str, allow_none: bool = False):
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{name} must be a number{' or None' if allow_none else ''}, got {value!r}")


class _SoCoMetric(Metric):
    category = "faithfulness"
    higher_is_better = True
    stochastic = True
    default_ratios: tuple[float, ...] = ()
    decreasing = False

    ratios = Param(None, "mask ratios (None: the authors')")
    score = Param("softmax", "the target's score: softmax, logit, log_softmax or accuracy")
    noise = Param(0.01, "std of ROAD's imputation noise, in the model's input units")
    iterations = Param(50, "imputation solver iterations")
    tol = Param(1e-6, "imputation solver tolerance")
    batch_size = Param(None, "rows per forward pass (None: automatic)")
    seed = Param(0, "imputation noise and tie-break of equal attributions")

    def check(self):
        self.checked_ratios()
        if self.score not in SOCO_SCORES:
            raise ConfigError(f"unknown score '{self.score}'; choose one of {', '.join(SOCO_SCORES)}")
        check_noise(self.noise)

    def checked_ratios(self) -> tuple[float, ...]:
        return _check_ratios(self.default_ratios if self.ratios is None else self.ratios, self.decreasing)

    def perturber_and_target(self, session, target: Target, n: int):
        """The engine (ROAD imputation with noise keyed to (image, step), n steps per image) and the
        scored target."""
        imputer = KeyedImputer(self.noise, self.iterations, self.tol, session.random(self.seed, ROAD_NOISE), n)
        if self.score == "accuracy":
            return Perturber(imputer, "logit", self.batch_size), _Correct(target)
        return Perturber(imputer, self.score, self.batch_size), target

    @staticmethod
    def mean_height(curves: torch.Tensor, ratios: torch.Tensor) -> torch.Tensor:
        """Trapezoid area over the ratios divided by their span (a constant curve at p gives p)."""
        return torch.trapezoid(curves, ratios, dim=1) / (ratios[-1] - ratios[0])


@register
class Completeness(_SoCoMetric):
    name = "completeness"
    description = ("Completeness (Li et al. 2023): mean drop of the target's score as the pixels above 90%, 80%, "
                   "..., 10% of the min-max normalized map are removed by ROAD imputation (higher is better).")
    default_ratios = COMPLETENESS_RATIOS

    def compute(self, session, x, maps, target, **data):
        target = self.resolve(session, x, target)
        given = self.checked_ratios()
        perturber, target = self.perturber_and_target(session, target, len(given) + 1)
        values = normalize_maps(maps)
        H, W = x.shape[-2:]
        work = _work_dtype(x.device)
        ratios = torch.tensor(given, dtype=work, device=x.device)
        # row k = 0 is the clean image (threshold +inf keeps everything), row k >= 1 uses ratio k - 1
        thresholds = torch.tensor([float("inf")] + [1.0 - r for r in given], dtype=work, device=x.device)

        def make_masks(image, k):
            return (values[image] <= thresholds[k][:, None]).view(-1, 1, H, W)

        scores = perturber.scores(session, x, target, len(given) + 1, make_masks, desc=self.name)
        clean, scores = scores[:, 0], scores[:, 1:]
        drop = clean[:, None] - scores
        return Measurement(self.mean_height(drop.to(work), ratios).to(x.dtype),
                           {"ratio": ratios.to(x.dtype), "clean": clean, "scores": scores, "drop": drop})


@register
class Soundness(_SoCoMetric):
    name = "soundness"
    description = ("Soundness (Li et al. 2023): share of the revealed attribution not declared false (revealed "
                   "while the score did not rise), pixels revealed by area from 2% to 97% (higher is better).")
    default_ratios = SOUNDNESS_RATIOS
    decreasing = True

    threshold = Param(0.01, "a score rise of at most this declares the revealed attribution false")
    min_score = Param(0.04, "the test applies only above this score (None: always)")

    def check(self):
        super().check()
        _check_number(self.threshold, "threshold")
        _check_number(self.min_score, "min_score", allow_none=True)

    def compute(self, session, x, maps, target, **data):
        target = self.resolve(session, x, target)
        given = self.checked_ratios()
        perturber, target = self.perturber_and_target(session, target, len(given))
        values = normalize_maps(maps)
        U = values.shape[1]
        H, W = x.shape[-2:]
        ratios = torch.tensor(given, dtype=torch.float64)
        masked = torch.floor(ratios * U).long().to(x.device)  # the authors' int(HW * r)
        revealed = U - masked  # (K,) nondecreasing
        ratios = ratios.to(x.device, values.dtype)
        positions = rank_positions(values, self.seed)  # 0 = most attributed
        scores = perturber.scores(session, x, target, len(given),
                                  ranked_masks(positions, revealed, (H, W), insertion=True), desc=self.name)
        # A_t: summed normalized attribution of the n_t top-ranked pixels, from the same ranking
        ranked_values = values.gather(1, positions.argsort(dim=1))
        prefix = torch.cat([torch.zeros_like(values[:, :1]), ranked_values.cumsum(1)], 1)  # (B, U + 1)
        attribution = prefix[:, revealed]
        accumulated, attr_ratio = false_attribution(scores, attribution, self.threshold, self.min_score)
        curves = {"ratio": ratios.to(x.dtype), "revealed": revealed.to(x.dtype) / U,
                  "scores": scores, "attribution": attribution.to(x.dtype),
                  "false_attribution": accumulated.to(x.dtype), "attr_ratio": attr_ratio.to(x.dtype)}
        return Measurement(self.mean_height(attr_ratio, ratios).to(x.dtype), curves)


__all__ = ["COMPLETENESS_RATIOS", "SOUNDNESS_RATIOS", "Completeness", "Soundness", "false_attribution",
           "normalize_maps"]
