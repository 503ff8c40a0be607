"""Ranking curves: deletion, insertion, MoRF/LeRF degradation and ROAD, all on the perturbation engine.

Pixels (or square tiles) are ranked by attribution; step by step the top-ranked units are removed
(replaced by a baseline) or revealed, and the target's score is recorded. The area under the curve
over the fraction of units acted on is the metric.

Protocols (reproducible through parameters):
- RISE / InputIBA: deletion to "zero", insertion from "blur"; InputIBA uses per_step=10 pixels.
- I-GOS (`protocol="igos"`), as the authors' evaluation, khorrams/IGOS_pp methods_helper.py `metric`
  (the same code scores I-GOS and I-GOS++; zhongangqi/IGOS has only a video demo, Deletion_Insertion
  in IGOS_generate_video.py, with no area): cells of a 28x28 ranking (tile=8 on 224x224), most salient
  first, `step = max(1, num_pixels // 50)` cells per step (15 of 784, 53 steps, the last of 4 cells:
  step_rule="floor", steps=50); the binary 28x28 keep grid is upsampled to the image by
  torch.nn.UpsamplingBilinear2d, i.e. bilinear with align_corners=True (`upscale`, sized by
  `init(args.input_size)` in main.py): soft tents, mask_upsampling="bilinear"; deletion shows
  image * m + blur * (1 - m), insertion blur * m + image * (1 - m), with the same blurred image for
  both (utils.ImageSet: cv2.GaussianBlur, kernel 51, sigmaX = 50 below 500 px: Blur(sigma=50,
  kernel_size=51)); the score is the softmax probability of the label (`score_output`); the area adds
  score x (cells in the step) / cells over the steps, a right Riemann sum (auc="right").
  `mask_upsampling="nearest"` keeps hard 8x8 tiles (this protocol's behaviour before) and
  `step_rule="even"` evenly spread checkpoints. The demo presets' `steps=25` give 784 // 25 = 31 cells
  per step. Where we differ from their code:
  - their last step is mis-scored: `del_scores += outputs * step if pixels + step < num_pixels else
    num_pixels - pixels` (the same for ins_scores) parses as `+= (outputs * step) if ... else
    (num_pixels - pixels)`, so the last step (always the else branch) adds its cell count, as if its
    score were 1. Not reproduced: theirs = ours + (last step's cells / cells) x (1 - last score), e.g.
    4/784 x (1 - s) at 224x224.
  - they blur the resized uint8 RGB image (PIL resize, while the image itself goes through
    torchvision's Resize) and round it to uint8; we blur the model input. The blur is linear with
    unit gain and both use reflect-101 borders, so this equals theirs up to that rounding and resize.
  - they rank the I-GOS mask itself at 28x28 (ascending: a low keep value is important) and always
    use a 28x28 grid (args.size); we rank 8x8 tile sums of the image-size map (a 28x28 grid at 224 px,
    ceil(H/8) x ceil(W/8) otherwise), with seeded random tie-breaks (theirs: torch.argsort's order).
  - their figure captions use utils.auc, (sum - first/2 - last/2) / len(curve), a trapezoid divided
    by the number of points, and an x axis ending at (780 + 15) / 784 > 1; we report the area above.
- IBA degradation: tiles 8 or 14, "mean" baseline, 100 checkpoints: `morf`, `lerf`, `morf_lerf`.
- ROAD: the same with noisy linear imputation (baseline="road"): `road_morf`, `road_lerf`, `road`.

Shared passes: the checkpoint that keeps every unit (deletion's first, insertion's last, MoRF/LeRF's
first) is scored from the metric's clean forward (see perturbation), and `morf_lerf` scores the
all-removed image, where both of its curves end, once.
"""

from __future__ import annotations

import torch

from .. import perturbation as _perturbation
from ..baselines import Blur
from ..core.errors import ConfigError
from ..perturbation import (MASK_UPSAMPLING, STEP_RULES, Perturber, rank_positions, ranked_masks, resolve_remembered,
                            step_counts, tile_sums)
from ..core.registry import Param, declared_params
from .base import Measurement, Metric, register

AUC_RULES = ("trapezoid", "right", "left")
PROTOCOLS = {
    None: {},
    "igos": {"baseline": Blur(sigma=50.0, kernel_size=51), "tile": 8, "steps": 50, "step_rule": "floor",
             "mask_upsampling": "bilinear", "auc": "right"},
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
                  baseline, score, batch_size, seed, desc="", fractions=None, step_rule="even",
                  mask_upsampling="nearest", all_removed=None):
    """Scores after acting on the top-ranked units, at each checkpoint: fractions (K,), curves (B, K).

    Checkpoints: `fractions` (of the units, e.g. ROAD's 0, 0.1, ..., 0.9) if given, else `steps`/`per_step`
    (by `step_rule`, see perturbation.step_counts). `mask_upsampling`: "nearest" (hard tiles) or
    "bilinear" (the binary unit grid interpolated to the image, I-GOS's soft masks).
    All checkpoints of all images go through the engine's chunked batches.
    `all_removed`: (B,) scores already known for the image with every unit removed (MoRF's last
    checkpoint, when LeRF's is the same image): that checkpoint is not scored again.
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
        counts = step_counts(h * w, steps, per_step, step_rule).to(x.device)
    perturber = Perturber(baseline, score, batch_size)
    masks = ranked_masks(positions, counts, (h, w), insertion=insertion, size=tuple(x.shape[-2:]),
                         upsampling=mask_upsampling, dtype=x.dtype)
    known = all_removed is not None and not insertion and int(counts[-1]) == h * w
    curves = perturber.scores(session, x, target, len(counts) - known, masks, desc=desc)
    if known:
        curves = torch.cat([curves, all_removed.to(curves)[:, None]], 1)
    return counts.to(x.dtype) / (h * w), curves


class RankedCurveMetric(Metric):
    """Deletion / insertion style curves. A `protocol` preset fills the parameters not given
    explicitly; subclasses change defaults by redeclaring a Param."""

    category = "faithfulness"
    insertion = False
    least_first = False

    steps = Param(50, "checkpoints (step_rule even: the curve has steps + 1 points)")
    per_step = Param(None, "units acted on per checkpoint (overrides steps)")
    step_rule = Param("even", "checkpoints from steps: even (round(k * units / steps)) or floor "
                              "(max(1, units // steps) units per step, the last takes the rest: I-GOS)")
    tile = Param(1, "rank square tiles of this many pixels per side")
    mask_upsampling = Param("nearest", "unit grid to image: nearest (hard tiles) or bilinear "
                                       "(soft, align_corners=True: I-GOS)")
    baseline = Param("zero", "what removed pixels become (see saliencylab.baselines)")
    score = Param("softmax", "the target's score: softmax, logit or log_softmax")
    auc = Param("trapezoid", "area rule: trapezoid, right or left")
    protocol = Param(None, "a published protocol's settings: igos or inputiba")
    batch_size = Param(None, "rows per forward pass (None: automatic)")
    seed = Param(0, "tie-break of equal attributions")

    def check(self):
        if self.protocol not in PROTOCOLS:
            raise ConfigError(f"unknown protocol '{self.protocol}'; choose one of igos, inputiba")
        # The preset's values are the effective settings where the caller gave none (self.params is
        # left as given, so rebuilding the metric applies the preset again).
        # A given None means "the default" too, as it always has.
        declared = declared_params(type(self))
        for key in ("steps", "per_step", "step_rule", "tile", "mask_upsampling", "baseline", "auc"):
            if self.params.get(key) is None:
                setattr(self, key, PROTOCOLS[self.protocol].get(key, declared[key].default))
        if self.auc not in AUC_RULES:
            raise ConfigError(f"unknown auc rule '{self.auc}'; choose one of {', '.join(AUC_RULES)}")
        if self.step_rule not in STEP_RULES:
            raise ConfigError(f"unknown step_rule '{self.step_rule}'; choose one of {', '.join(STEP_RULES)}")
        if self.mask_upsampling not in MASK_UPSAMPLING:
            raise ConfigError(f"unknown mask_upsampling '{self.mask_upsampling}'; "
                              f"choose one of {', '.join(MASK_UPSAMPLING)}")

    def curves(self, session, x, maps, target, *, least_first=None, all_removed=None):
        least_first = self.least_first if least_first is None else least_first
        return ranked_curves(session, x, maps, target, insertion=self.insertion, least_first=least_first,
                             steps=self.steps, per_step=self.per_step, tile=self.tile, baseline=self.baseline,
                             score=self.score, batch_size=self.batch_size, seed=self.seed, desc=self.name,
                             step_rule=self.step_rule, mask_upsampling=self.mask_upsampling,
                             all_removed=all_removed)

    def compute(self, session, x, maps, target, **data):
        target = resolve_remembered(self, session, x, target)
        fractions, curves = self.curves(session, x, maps, target)
        return Measurement(area(curves, fractions, self.auc), {"fraction": fractions, "scores": curves})


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
    baseline = Param("blur", "what hidden pixels are (see saliencylab.baselines)")


@register
class MoRF(RankedCurveMetric):
    name = "morf"
    description = "Degradation, most relevant tiles first (IBA protocol: 8x8 tiles, mean baseline); lower is better."
    higher_is_better = False
    steps = Param(100, "checkpoints (the curve has steps + 1 points)")
    tile = Param(8, "rank square tiles of this many pixels per side")
    baseline = Param("mean", "what removed tiles become (see saliencylab.baselines)")


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

    def compute(self, session, x, maps, target, **data):
        target = resolve_remembered(self, session, x, target)
        fractions, morf = self.curves(session, x, maps, target, least_first=False)
        # both curves end on the image with every tile removed (the same image): scored once
        _, lerf = self.curves(session, x, maps, target, least_first=True,
                              all_removed=morf[:, -1] if _perturbation.FAST else None)
        return Measurement(area(lerf, fractions, self.auc) - area(morf, fractions, self.auc),
                           {"fraction": fractions, "morf": morf, "lerf": lerf})
