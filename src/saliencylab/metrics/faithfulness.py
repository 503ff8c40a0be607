"""Ranking curves: deletion, insertion, MoRF/LeRF degradation and ROAD, all on the perturbation engine.

Pixels (or square tiles) are ranked by attribution; step by step the top-ranked units are removed
(replaced by a baseline) or revealed, and the target's score is recorded. The area under the curve
over the fraction of units acted on is the metric.

Protocols (reproducible through parameters):
- RISE / InputIBA: deletion to "zero", insertion from "blur"; InputIBA uses per_step=10 pixels.
- I-GOS: blurred baseline Blur(sigma=50, kernel_size=51) for both, ranking at 28x28 (tile=8 on 224),
  about 50 steps, right Riemann sum (auc="right"). `protocol="igos"` sets all of these.
- IBA degradation: tiles 8 or 14, "mean" baseline, 100 checkpoints: `morf`, `lerf`, `morf_lerf`.
- ROAD: the same with noisy linear imputation (baseline="road"): `road_morf`, `road_lerf`, `road`.
"""

from __future__ import annotations

import torch

from ..baselines import Blur
from ..core.errors import ConfigError
from ..perturbation import Perturber, rank_positions, ranked_masks, step_counts, tile_sums
from .base import Metric, register

AUC_RULES = ("trapezoid", "right", "left")
PROTOCOLS = {
    None: {},
    "igos": {"baseline": Blur(sigma=50.0, kernel_size=51), "tile": 8, "steps": 50, "auc": "right"},
    "inputiba": {"per_step": 10, "auc": "trapezoid"},
}


def area(curves: torch.Tensor, fractions: torch.Tensor, rule: str) -> torch.Tensor:
    """Area under (B, K) curves sampled at K increasing fractions."""
    fractions = fractions.to(curves.device, curves.dtype)
    if rule == "trapezoid":
        return torch.trapezoid(curves, fractions, dim=1)
    widths = fractions.diff()
    if rule == "right":
        return (curves[:, 1:] * widths).sum(1)
    if rule == "left":
        return (curves[:, :-1] * widths).sum(1)
    raise ConfigError(f"unknown auc rule '{rule}'; choose one of {', '.join(AUC_RULES)}")


def ranked_curves(session, x, maps, target, *, insertion: bool, least_first: bool, steps, per_step, tile,
                  baseline, score, batch_size, seed, desc="", fractions=None):
    """Scores after acting on the top-ranked units, at each checkpoint: fractions (K,), curves (B, K).

    Checkpoints: `fractions` (of the units, e.g. ROAD's 0, 0.1, ..., 0.9) if given, else `steps`/`per_step`.
    """
    if not isinstance(tile, int) or tile < 1:
        raise ConfigError(f"tile must be a positive int, got {tile!r}")
    units = tile_sums(maps, tile)
    h, w = units.shape[-2:]
    values = units.flatten(1)
    positions = rank_positions(-values if least_first else values, seed)
    if fractions is not None:
        counts = torch.round(torch.as_tensor(fractions, dtype=torch.float64) * (h * w)).long().to(x.device)
    else:
        counts = step_counts(h * w, steps, per_step).to(x.device)
    perturber = Perturber(baseline, score, batch_size)
    curves = perturber.scores(session, x, target, len(counts),
                              ranked_masks(positions, counts, (h, w), insertion=insertion), desc=desc)
    return counts.to(x.dtype) / (h * w), curves


class RankedCurveMetric(Metric):
    category = "faithfulness"
    insertion = False
    least_first = False
    default_baseline = "zero"
    default_tile = 1
    default_steps = 50

    def __init__(self, *, steps: int | None = None, per_step: int | None = None, tile: int | None = None,
                 baseline=None, score: str = "softmax", auc: str | None = None, protocol: str | None = None,
                 batch_size: int | None = None, seed: int = 0):
        if protocol not in PROTOCOLS:
            raise ConfigError(f"unknown protocol '{protocol}'; choose one of igos, inputiba")
        preset = PROTOCOLS[protocol]
        super().__init__(
            steps=steps if steps is not None else preset.get("steps", self.default_steps),
            per_step=per_step if per_step is not None else preset.get("per_step"),
            tile=tile if tile is not None else preset.get("tile", self.default_tile),
            baseline=baseline if baseline is not None else preset.get("baseline", self.default_baseline),
            score=score, auc=auc or preset.get("auc", "trapezoid"), protocol=protocol,
            batch_size=batch_size, seed=seed)
        if self.auc not in AUC_RULES:
            raise ConfigError(f"unknown auc rule '{self.auc}'; choose one of {', '.join(AUC_RULES)}")

    def curves(self, session, x, maps, target, *, least_first=None):
        least_first = self.least_first if least_first is None else least_first
        return ranked_curves(session, x, maps, target, insertion=self.insertion, least_first=least_first,
                             steps=self.steps, per_step=self.per_step, tile=self.tile, baseline=self.baseline,
                             score=self.score, batch_size=self.batch_size, seed=self.seed, desc=self.name)

    def _score(self, session, x, maps, target, **data):
        target = self.resolve(session, x, target)
        fractions, curves = self.curves(session, x, maps, target)
        self.last_curves = {"fraction": fractions, "scores": curves}
        return area(curves, fractions, self.auc)


@register
class Deletion(RankedCurveMetric):
    name = "deletion"
    description = "Area under the score curve as the most important pixels are removed (lower is better)."
    higher_is_better = False


@register
class Insertion(RankedCurveMetric):
    name = "insertion"
    description = "Area under the score curve as the most important pixels are revealed on a blurred image."
    insertion = True
    default_baseline = "blur"


@register
class MoRF(RankedCurveMetric):
    name = "morf"
    description = "Degradation, most relevant tiles first (IBA protocol: 8x8 tiles, mean baseline); lower is better."
    higher_is_better = False
    default_baseline = "mean"
    default_tile = 8
    default_steps = 100


@register
class LeRF(MoRF):
    name = "lerf"
    description = "Degradation, least relevant tiles first (IBA protocol); higher is better."
    higher_is_better = True
    least_first = True


@register
class MoRFLeRF(MoRF):
    name = "morf_lerf"
    description = "Area between the LeRF and MoRF degradation curves (IBA paper's score); higher is better."
    higher_is_better = True

    def _score(self, session, x, maps, target, **data):
        target = self.resolve(session, x, target)
        fractions, morf = self.curves(session, x, maps, target, least_first=False)
        _, lerf = self.curves(session, x, maps, target, least_first=True)
        self.last_curves = {"fraction": fractions, "morf": morf, "lerf": lerf}
        return area(lerf, fractions, self.auc) - area(morf, fractions, self.auc)
