"""Counterfactual metrics: COUT (counterfactual transition), validity and proximity.

A counterfactual metric evaluates counterfactual images x_cf (shaped like the query images x) rather
than saliency maps: they go where the other metrics take their maps, so any counterfactual a user
brings can be scored, whatever made it (C3LT, the latent-gradient baseline, another method).

>>> scores = saliencylab.evaluate(model, x, x_cf, "cout", target=cf_class, source=query_class)
>>> m = counterfactual.cout(model, x, x_cf, source=3, target=8)      # Measurement: scores and curves

- `cout` (Khorram & Li Fuxin, "Cycle-Consistent Counterfactuals by Latent Transformations", CVPR 2022):
  the pixels of x_cf are inserted into x, those that differ most (|x - x_cf| summed over channels)
  first; along the insertion the probabilities of the source (the query's class) and of the target
  (the counterfactual's class) are recorded, and COUT = AUC(p target) - AUC(p source), in [-1, 1]:
  +1 for a counterfactual whose first changed pixels already flip the decision, negative when the
  changes move the model towards the source class. The insertion runs on the one perturbation engine
  (the query is the "baseline", x_cf the image revealed pixel by pixel), batched over images and
  checkpoints; both curves come from the same forward pass of each row.
- `validity`: whether the model classifies x_cf as the target class (1.0 / 0.0 per image).
- `proximity`: mean |x - x_cf| (lower is better).

Authors' code (khorrams/c3lt, GPL: read for its semantics, not copied): c3lt/eval.py `evaluate`
(`cout_num_steps = 50`, step `max(1, img_size ** 2 // cout_num_steps)`), `calculate_cout`, `phi`, `auc`,
`calculate_validity`, `calculate_proximity`, and c3lt/helper.py `gen_masks(..., mode='abs')` (the
insertion order). As theirs: the curves start at the query itself and end at x_cf, the probabilities
are a softmax over all classes of the model's outputs (their MnistNet returns log-probabilities, whose
softmax is that of its logits), pixels are ranked by decreasing |x_cf - x|. Where we differ:
- checkpoints and area: by default `steps=50` evenly spread checkpoints (round(k * HW / 50) pixels,
  51 points) and the trapezoid over the fraction of pixels inserted, on [0, 1]. Theirs inserts
  max(1, HW // 50) pixels per step, the last step the rest (28x28: 15 pixels, 53 steps, the last of 4;
  54 points), and takes the area as (step / HW) x a unit-spacing trapezoid, so their x axis runs to
  53 x 15 / 784 = 795 / 784 (the short last step counts as a full one). `protocol="c3lt"` gives
  theirs (step_rule="floor", auc="c3lt").
- ranking of multi-channel images: per pixel, |x - x_cf| summed over channels (the whole pixel is
  inserted). Their code handles single-channel images only (gen_masks: "TODO RGB images"; their mask
  grid is viewed as (B, 1, size, size)); for one channel both rank the same pixels.
- ties: a seeded random order (`seed`, perturbation.rank_positions, as every ranking metric here);
  theirs: torch.argsort's order. Their min-max normalisation of |x_cf - x| does not change the order
  (and is NaN for x_cf == x, where our curves are flat at the query's probabilities).
- classes: `source`/`target` per image, None for the model's predictions on x / x_cf; theirs: one
  fixed pair (args.cls_1, args.cls_2). `probability="pair"` (softmax over the two classes' logits
  only) is an option of ours, for models with many classes; theirs: "softmax".
- scores per image; their printed COUT / validity / proximity are the means over the test set.
- proximity: the mean over every value (C x H x W); theirs divides the sum by the number of pixels
  (H x W), i.e. sums the channels: `channels="sum"` (the same for single-channel images).
"""

from __future__ import annotations

import torch

from ..core.errors import ConfigError, InputError
from ..core.explanation import Explanation
from ..core.registry import Param, declared_params
from ..core.targets import Target, resolve_target
from ..perturbation import Perturber, STEP_RULES, auto_batch_size, rank_positions, ranked_masks, step_counts
from .base import Measurement, Metric, register
from .faithfulness import AUC_RULES, area

PROBABILITIES = ("softmax", "pair")
COUT_AUC_RULES = AUC_RULES + ("c3lt",)
PROTOCOLS = {None: {}, "c3lt": {"steps": 50, "step_rule": "floor", "auc": "c3lt"}}
CHANNELS = ("mean", "sum")


def check_counterfactuals(x_cf, x: torch.Tensor) -> torch.Tensor:
    """Counterfactual images shaped like x (B, C, H, W); (B, H, W) or (B, 1, H, W) stand for the same
    values on every channel."""
    if not isinstance(x_cf, torch.Tensor):
        raise InputError(f"the counterfactuals must be a torch.Tensor shaped like the images {tuple(x.shape)}, "
                         f"got {type(x_cf).__name__}")
    if x_cf.dim() == 3:
        x_cf = x_cf[:, None]
    B, C, H, W = x.shape
    if x_cf.dim() != 4 or x_cf.shape[0] != B or tuple(x_cf.shape[-2:]) != (H, W) or x_cf.shape[1] not in (1, C):
        raise InputError(f"the counterfactuals must have the images' shape {tuple(x.shape)}, got {tuple(x_cf.shape)}")
    if not x_cf.is_floating_point():
        raise InputError(f"the counterfactuals must be floating point like the images, got dtype {x_cf.dtype}")
    if not torch.isfinite(x_cf).all():
        raise InputError("the counterfactuals contain NaN or infinite values")
    return x_cf.detach().to(x.device, x.dtype).expand(B, C, H, W).contiguous()


def _classes(spec, outputs: torch.Tensor, what: str) -> torch.Tensor:
    """(B,) class indices from None (the predicted class), an int or B ints, checked against the outputs."""
    if callable(spec) and not isinstance(spec, torch.Tensor):
        raise InputError(f"the {what} of a counterfactual metric must be a class index (an int or one per image), "
                         "not a callable")
    try:
        return resolve_target(spec, outputs).classes
    except InputError as e:  # the message says "target"; name the argument at fault
        raise InputError(f"{what}: {e}") from None


def _forward(session, x: torch.Tensor, batch_size: int | None) -> torch.Tensor:
    """The model's outputs on x, in chunks of batch_size rows (counted by the session)."""
    size = batch_size or auto_batch_size(x.device, pixels=x.shape[-2] * x.shape[-1])
    with torch.no_grad():
        return torch.cat([session.forward(x[i:i + size]) for i in range(0, x.shape[0], size)])


class _TwoClasses(Target):
    """p(target) for the perturbation engine, with p(source) of the same forward pass kept for the
    engine's per-chunk `reduce` callback: both curves from one pass per row."""

    def __init__(self, source: torch.Tensor, target: torch.Tensor, probability: str):
        super().__init__(classes=target, score="softmax")
        self.source = source
        self.probability = probability
        self.kept: list[torch.Tensor] = []

    def with_score(self, score):  # the engine asks for its score kind; this target computes its own
        return self

    def both(self, outputs: torch.Tensor, image_index: torch.Tensor | None = None):
        """(p source, p target) per row."""
        if image_index is None:
            image_index = torch.arange(outputs.shape[0], device=outputs.device)
        s = self.source.to(outputs.device)[image_index]
        t = self.classes.to(outputs.device)[image_index]
        if self.probability == "pair":
            p = torch.cat([outputs.gather(1, s[:, None]), outputs.gather(1, t[:, None])], 1).softmax(1)
            return p[:, 0], p[:, 1]
        p = outputs.softmax(dim=1)
        return p.gather(1, s[:, None]).squeeze(1), p.gather(1, t[:, None]).squeeze(1)

    def __call__(self, outputs, image_index=None):
        ps, pt = self.both(outputs, image_index)
        self.kept.append(ps)
        return pt


def cout_area(curves: torch.Tensor, counts: torch.Tensor, units: int, rule: str) -> torch.Tensor:
    """Area under (B, K) curves sampled after inserting counts[k] of `units` pixels. "c3lt": the
    authors' unit-spacing trapezoid scaled by (pixels per step) / units (see the module docstring)."""
    if rule == "c3lt":
        width = float(counts[1] - counts[0]) / units if len(counts) > 1 else 0.0
        return torch.trapezoid(curves, dx=width, dim=1)
    return area(curves, counts.to(torch.float64) / units, rule)


class CounterfactualMetric(Metric):
    """A metric of counterfactual images x_cf, given where the other metrics take their maps."""

    category = "counterfactual"

    def measure(self, model, x, maps, target=None, *, image_ids=None, **data) -> Measurement:
        if isinstance(maps, Explanation):  # saliency maps are not counterfactuals
            raise InputError(f"metric '{self.name}' scores counterfactual images shaped like the queries, "
                             "not an explanation's maps")
        return super().measure(model, x, maps, target, image_ids=image_ids, **data)

    def check_input(self, maps, x):
        return check_counterfactuals(maps, x)


@register
class Cout(CounterfactualMetric):
    name = "cout"
    description = ("Counterfactual transition: AUC of p(target) minus AUC of p(source) as the counterfactual's "
                   "most changed pixels are inserted into the query (C3LT).")
    higher_is_better = True

    source = Param(None, "the query's class: None (the model's prediction on x), an int, or one per image")
    steps = Param(50, "checkpoints (step_rule even: the curves have steps + 1 points)")
    step_rule = Param("even", "even (round(k * pixels / steps)) or floor (max(1, pixels // steps) pixels "
                              "per step, the last takes the rest: C3LT)")
    auc = Param("trapezoid", "area rule: trapezoid, right, left, or c3lt (the authors' uniform steps)")
    probability = Param("softmax", "softmax over all classes (C3LT) or pair (over the two classes only)")
    protocol = Param(None, "the authors' settings: c3lt (step_rule floor, auc c3lt, 50 steps)")
    batch_size = Param(None, "rows per forward pass (None: automatic)")
    seed = Param(0, "tie-break of equal differences")

    def check(self):
        if self.protocol not in PROTOCOLS:
            raise ConfigError(f"unknown protocol '{self.protocol}'; choose c3lt or None")
        declared = declared_params(type(self))
        for key in ("steps", "step_rule", "auc"):  # the protocol fills what was not given
            if self.params.get(key) is None:
                setattr(self, key, PROTOCOLS[self.protocol].get(key, declared[key].default))
        if not isinstance(self.steps, int) or isinstance(self.steps, bool) or self.steps < 1:
            raise ConfigError(f"steps must be a positive int, got {self.steps!r}")
        if self.step_rule not in STEP_RULES:
            raise ConfigError(f"unknown step_rule '{self.step_rule}'; choose one of {', '.join(STEP_RULES)}")
        if self.auc not in COUT_AUC_RULES:
            raise ConfigError(f"unknown auc rule '{self.auc}'; choose one of {', '.join(COUT_AUC_RULES)}")
        if self.probability not in PROBABILITIES:
            raise ConfigError(f"unknown probability '{self.probability}'; choose one of {', '.join(PROBABILITIES)}")
        Perturber(batch_size=self.batch_size)  # validates batch_size

    def compute(self, session, x, x_cf, target, **data):
        B, _, H, W = x.shape
        units = H * W
        # the curves' two ends are the query and the counterfactual themselves: one pass each, which
        # also resolves the classes (source: predicted on x, target: predicted on x_cf, by default)
        out = _forward(session, torch.cat([x, x_cf]), self.batch_size)
        two = _TwoClasses(_classes(self.source, out[:B], "source"), _classes(target, out[B:], "target"),
                          self.probability)
        counts = step_counts(units, self.steps, rule=self.step_rule).to(x.device)
        K = len(counts)
        source = torch.empty(B, K, device=x.device, dtype=x.dtype)
        target_ = torch.empty_like(source)
        source[:, 0], target_[:, 0] = two.both(out[:B])
        source[:, -1], target_[:, -1] = two.both(out[B:])
        if K > 2:
            # most changed pixels first; keep-mask 1 = the counterfactual's pixel (x is the engine's baseline)
            positions = rank_positions((x - x_cf).abs().sum(1).flatten(1), self.seed)
            masks = ranked_masks(positions, counts[1:-1], (H, W), insertion=True)

            def keep_source(scores, image, k, masks):
                ps = torch.cat(two.kept)
                two.kept.clear()
                if ps.shape[0] != image.shape[0]:  # one target call per chunk: the engine's contract
                    raise RuntimeError("cout: the perturbation engine scored a chunk in several calls")
                source[image, k + 1] = ps.to(source.dtype)

            target_[:, 1:-1] = Perturber(x, "softmax", self.batch_size).scores(
                session, x_cf, two, K - 2, masks, reduce=keep_source, desc=self.name)
        scores = cout_area(target_, counts, units, self.auc) - cout_area(source, counts, units, self.auc)
        return Measurement(scores, {"fraction": counts.to(x.dtype) / units, "source": source, "target": target_})


@register
class Validity(CounterfactualMetric):
    name = "counterfactual_validity"
    description = ("1 where the model classifies the counterfactual as the target class (None: as any class "
                   "other than its prediction on the query), else 0.")
    higher_is_better = True

    batch_size = Param(None, "rows per forward pass (None: automatic)")

    def check(self):
        Perturber(batch_size=self.batch_size)

    def compute(self, session, x, x_cf, target, **data):
        out = _forward(session, x_cf, self.batch_size)
        predicted = out.argmax(1)
        if target is None:  # valid when the decision changed
            return Measurement((predicted != _forward(session, x, self.batch_size).argmax(1)).to(x.dtype))
        return Measurement((predicted == _classes(target, out, "target")).to(x.dtype))


@register
class Proximity(CounterfactualMetric):
    name = "counterfactual_proximity"
    description = "Mean absolute difference between the query and its counterfactual (lower is better)."
    higher_is_better = False
    needs_model = False

    channels = Param("mean", "mean over every value, or sum over channels and mean over pixels (C3LT)")

    def check(self):
        if self.channels not in CHANNELS:
            raise ConfigError(f"unknown channels '{self.channels}'; choose one of {', '.join(CHANNELS)}")

    def compute(self, session, x, x_cf, target, **data):
        diff = (x - x_cf).abs()
        if self.channels == "sum":
            diff = diff.sum(1)
        return Measurement(diff.flatten(1).mean(1))


def cout(model, x: torch.Tensor, x_cf: torch.Tensor, source=None, target=None, *, steps: int = 50,
         batch_size: int | None = None, image_ids=None, **params) -> Measurement:
    """COUT of counterfactuals x_cf for queries x: Measurement(scores (B,), curves {"fraction": (K,),
    "source": (B, K), "target": (B, K)}, cost). K = steps + 1 (even steps). `source`/`target`: None
    (the model's predictions on x / x_cf), an int or B ints. Other parameters: see the `Cout` metric
    (`protocol="c3lt"` for the authors' checkpoints and area)."""
    return Cout(source=source, steps=steps, batch_size=batch_size, **params).measure(model, x, x_cf, target,
                                                                                     image_ids=image_ids)


def validity(model, x_cf: torch.Tensor, target=None, *, x: torch.Tensor | None = None,
             batch_size: int | None = None) -> torch.Tensor:
    """(B,) 1.0 where the model classifies x_cf as `target` (an int or B ints), else 0.0. With target None,
    the queries `x` are needed: 1.0 where the prediction differs from the one on x."""
    if target is None and x is None:
        raise InputError("validity needs the target class, or the queries x= (valid: the prediction changed)")
    return Validity(batch_size=batch_size).measure(model, x_cf if x is None else x, x_cf, target).scores


def proximity(x: torch.Tensor, x_cf: torch.Tensor, *, channels: str = "mean") -> torch.Tensor:
    """(B,) mean |x - x_cf| (channels="sum": summed over channels, mean over pixels: C3LT)."""
    return Proximity(channels=channels).measure(None, x, x_cf).scores
