"""ROAD: RemOve And Debias (Rong et al. 2022), on the perturbation engine.

Pixels (or square tiles) are ranked by attribution; at each checkpoint a fraction of them is
removed, most relevant first (MoRF) or least relevant first (LeRF), and filled by ROAD's noisy
linear imputation (`perturbation.LinearImputer`: each removed pixel is the weighted mean of its 8
neighbours, 1/6 direct and 1/12 diagonal, plus Gaussian noise of std `noise`), which leaks far less
of the mask's shape to the model than a constant baseline. The curves reuse `ranked_curves`.

Protocol (the paper's and the authors' code, tleemann/road_evaluation): removal fractions 0%, 10%,
..., 90% of the pixels (`fractions`), imputation noise 0.01 in the model's input space. The paper
reports accuracy over a data set; per image we record the target's score (softmax probability by
default, `score=`) and summarize each curve by its mean height, i.e. the trapezoid area divided by
the span of the fractions (so a constant curve at p scores p):

- `road_morf`: MoRF curve, lower is better;
- `road_lerf`: LeRF curve, higher is better;
- `road`: LeRF minus MoRF (the gap between the curves), higher is better.

The curves (`return_curves=True`) are {"fraction", "scores"} (or {"fraction", "morf", "lerf"} for
`road`). The imputation noise is drawn per perturbed row from `seed`, so results do not depend on
`batch_size`.
"""

from __future__ import annotations

from typing import Sequence

from ..core.errors import ConfigError
from ..perturbation import LinearImputer
from ..core.targets import SCORES
from .base import Metric, register
from .faithfulness import AUC_RULES, area, ranked_curves

ROAD_FRACTIONS = tuple(round(0.1 * i, 1) for i in range(10))  # 0.0, 0.1, ..., 0.9


def _check_fractions(fractions) -> tuple[float, ...]:
    try:
        values = tuple(float(f) for f in fractions)
    except TypeError as e:
        raise ConfigError(f"fractions must be a sequence of numbers in [0, 1], got {fractions!r}") from e
    if len(values) < 2 or any(not 0 <= f <= 1 for f in values) or any(b <= a for a, b in zip(values, values[1:])):
        raise ConfigError(f"fractions must be at least two increasing numbers in [0, 1], got {fractions!r}")
    return values


class ROADMetric(Metric):
    category = "faithfulness"
    least_first = False

    def __init__(self, *, fractions: Sequence[float] | None = None, tile: int = 1, noise: float = 0.01,
                 score: str = "softmax", auc: str = "trapezoid", iterations: int = 50, tol: float = 1e-6,
                 batch_size: int | None = None, seed: int = 0):
        fractions = _check_fractions(ROAD_FRACTIONS if fractions is None else fractions)
        super().__init__(fractions=fractions, tile=tile, noise=noise, score=score, auc=auc, iterations=iterations,
                         tol=tol, batch_size=batch_size, seed=seed)
        if auc not in AUC_RULES:
            raise ConfigError(f"unknown auc rule '{auc}'; choose one of {', '.join(AUC_RULES)}")
        if score not in SCORES:
            raise ConfigError(f"unknown score '{score}'; choose one of {', '.join(SCORES)}")
        if isinstance(noise, bool) or not isinstance(noise, (int, float)) or noise < 0:
            raise ConfigError(f"noise must be a non-negative number, got {noise!r}")
        self.imputer = LinearImputer(noise=noise, iterations=iterations, tol=tol, seed=seed)

    def curves(self, session, x, maps, target, least_first: bool):
        return ranked_curves(session, x, maps, target, insertion=False, least_first=least_first, steps=None,
                             per_step=None, tile=self.tile, baseline=self.imputer, score=self.score,
                             batch_size=self.batch_size, seed=self.seed, desc=self.name, fractions=self.fractions)

    def summary(self, curves, fractions):
        return area(curves, fractions, self.auc) / float(fractions[-1] - fractions[0])

    def _score(self, session, x, maps, target, **data):
        target = self.resolve(session, x, target)
        fractions, curves = self.curves(session, x, maps, target, self.least_first)
        self.last_curves = {"fraction": fractions, "scores": curves}
        return self.summary(curves, fractions)


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

    def _score(self, session, x, maps, target, **data):
        target = self.resolve(session, x, target)
        fractions, morf = self.curves(session, x, maps, target, False)
        _, lerf = self.curves(session, x, maps, target, True)
        self.last_curves = {"fraction": fractions, "morf": morf, "lerf": lerf}
        return self.summary(lerf, fractions) - self.summary(morf, fractions)


__all__ = ["ROAD", "ROADLeRF", "ROADMoRF", "ROAD_FRACTIONS"]
