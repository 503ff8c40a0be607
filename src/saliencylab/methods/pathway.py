"""Critical pathways (Khakzar et al., CVPR 2021, "Neural response interpretation through the lens of
critical pathways"): PruneGrad and PruneInt, `method="prune_grad"` / `"prune_int"`.

Every activation of the network (the output of each call of an activation module) is a neuron. Each
neuron gets a score, the neurons scoring at or below one global percentile per image (over all layers
together) are pruned (their output set to 0), and the map is the input gradient of the target logit
through the pruned network (masks are constants).

- `prune_grad`: score = |a * dy/da|, first-order Taylor, one forward and backward pass (y: the target
  logit). Then one forward and backward pass through the pruned network: 2 fwd+bwd per image.
- `prune_int`: score = |a * mean over alphas of dy/dh at h = alpha a|, an integrated gradient of each
  layer's activations with the other layers left as they are; `steps + 1` points per layer. All
  (layer, alpha) rows of all images run in shared batches: layers x (steps + 1) fwd+bwd, plus 2
  forward and 1 backward pass, per image.

As in the authors' code (CAMP-eXplain-AI/PathwayGrad, src/Pruner.py; no licence, read for semantics):
the threshold is numpy's linear-interpolation percentile of the image's scores, and a neuron is pruned
when its score is <= the threshold (ties at the threshold, and every zero score when the threshold is
0, are pruned); the gradient for a neuron is taken with respect to the (scaled) output the rest of the
network reads.

Where we differ from the authors' code:
- The activation types are a parameter (`activations`, default every ReLU-family and smooth
  activation module); the authors hook `nn.ReLU` only, which prunes nothing on EfficientNet-Lite0
  (ReLU6). Pass `activations=(torch.nn.ReLU,)` for theirs.
- Masks belong to calls, not modules: a module called twice in one forward pass (torchvision's ResNet
  BasicBlock uses `self.relu` twice) has two layers of neurons. The authors' PruneInt pairs the i-th
  ReLU *module* with the i-th recorded *call*, which misaligns them in such models.
- The percentile is found per image with `torch.kthvalue` (two order statistics, interpolated as
  numpy does) instead of a numpy round trip; `torch.quantile` refuses more than 2^24 values and
  EfficientNet-Lite0 has 6.2M activations per image.
- `prune_int`'s alphas are j / steps, j = 0..steps (an integrated gradient). The authors' loop adds
  j / steps to the scale at step j without resetting it, so their alphas are cumulative
  (0, 0.1, 0.3, 0.6, ..., 5.5 for 10 steps): `alpha_schedule="authors"` reproduces them.
- Batched over images (the authors explain one image per call); the map keeps the channels (summed by
  `explain`) where the authors' figure code keeps the channel value of largest magnitude.

`explain` returns extras "masks" (a list, one (B, ...) boolean keep-mask per activation call, in call
order), "threshold" (B,) and "kept" (B,) the fraction of neurons kept.
"""

from __future__ import annotations

import torch

from ..core.errors import ConfigError
from ..core.explanation import Explanation
from ..core.targets import resolve_target, slice_target
from .base import ACTIVATIONS, Method, Param, check_batch_size, out_of_place, register

ALPHA_SCHEDULES = ("linear", "authors")


def percentile_threshold(scores: torch.Tensor, percentile: float) -> torch.Tensor:
    """numpy.percentile(row, percentile) (linear interpolation) for every row of (B, N) scores."""
    n = scores.shape[1]
    position = percentile / 100.0 * (n - 1)
    lo = int(position)
    hi = min(lo + 1, n - 1)
    v_lo = scores.kthvalue(lo + 1, dim=1).values
    v_hi = scores.kthvalue(hi + 1, dim=1).values if hi != lo else v_lo
    return v_lo + (v_hi - v_lo) * (position - lo)


def alphas(steps: int, schedule: str) -> torch.Tensor:
    j = torch.arange(steps + 1, dtype=torch.float64)
    if schedule == "linear":
        return j / steps
    return torch.cumsum(j / steps, 0)  # the authors' scale after step j: sum_{k <= j} k / steps


class _Activations:
    """Hooks on every activation module (session edits): records each call's output, and multiplies
    it by a per-call factor (a keep-mask, or per-row scales) when one is set."""

    def __init__(self, session, types):
        self.outputs: list[torch.Tensor] = []
        self.factors: list[torch.Tensor] | None = None
        self.scales: torch.Tensor | None = None
        modules = [m for m in session.model.modules() if isinstance(m, types)]
        if not modules:
            raise ConfigError(f"the model has no activation modules of the types {', '.join(t.__name__ for t in types)} "
                              "to prune; pass activations=(...) with the types it uses")
        for m in modules:
            out_of_place(session, m)  # the recorded output must not be overwritten
            session.hook(m, self._hook)
        session.hook(session.model, self._reset, "forward_pre")

    def _reset(self, module, args):
        self.outputs = []

    def _hook(self, module, args, output):
        i = len(self.outputs)
        if self.factors is not None:
            output = output * self.factors[i]
        if self.scales is not None:  # PruneInt rows: row r scales call calls_of_row[r] by its alpha
            rows = self.scales[:, i].view(-1, *([1] * (output.dim() - 1)))
            output = output * rows.to(output)
        self.outputs.append(output)
        return output


class _Pathway(Method):
    percentile = Param(90.0, "prune neurons scoring at or below this percentile of the image's scores (0-100; "
                       "the authors: 90 for VGG16 figures, 70 for ResNet50 sanity checks)")
    activations = Param(ACTIVATIONS, "activation module types whose outputs are the neurons")
    batch_size = Param(16, "rows per forward+backward pass")

    def check(self):
        check_batch_size(self.batch_size)
        if not 0 <= float(self.percentile) < 100:
            raise ConfigError(f"percentile must be in [0, 100), got {self.percentile}")

    def scores(self, session, x, y, acts, target, hooks) -> list[torch.Tensor]:
        """Per activation call, (B, ...) scores; `y` the target scores of the clean forward pass (in its
        graph, whose recorded activations are `acts`)."""
        raise NotImplementedError

    def compute(self, session, x, target):
        hooks = _Activations(session, tuple(self.activations))
        maps, outputs, classes, masks, thresholds, kept = [], [], [], [], [], []
        for start in range(0, x.shape[0], self.batch_size):
            xs = x[start:start + self.batch_size]
            spec = slice_target(target, start, start + len(xs), len(x))
            inputs = xs.detach().requires_grad_(True)
            out = session.forward(inputs)  # resolves the target and records the activations
            resolved = resolve_target(spec, out)
            scores = self.scores(session, xs, resolved(out), list(hooks.outputs), resolved, hooks)
            out = out.detach()
            flat = torch.cat([s.flatten(1) for s in scores], 1)
            threshold = percentile_threshold(flat, float(self.percentile))
            keep = [s > threshold.view(-1, *([1] * (s.dim() - 1))) for s in scores]
            # the input gradient through the pruned network
            hooks.factors = [k.to(xs.dtype) for k in keep]
            inputs = xs.detach().requires_grad_(True)
            grad = session.grad(resolved(session.forward(inputs)), inputs)
            hooks.factors = None
            maps.append(grad)
            outputs.append(out)
            classes.append(resolved.classes)
            masks.append(keep)
            thresholds.append(threshold)
            kept.append(sum(k.flatten(1).sum(1) for k in keep).to(xs.dtype) / flat.shape[1])
        layers = [torch.cat([m[i] for m in masks]) for i in range(len(masks[0]))]
        return Explanation(maps=torch.cat(maps), targets=None if classes[0] is None else torch.cat(classes),
                           outputs=torch.cat(outputs),
                           extras={"masks": layers, "threshold": torch.cat(thresholds), "kept": torch.cat(kept)})


@register
class PruneGrad(_Pathway):
    name = "prune_grad"
    description = "PathwayGrad/PruneGrad: input gradient through the critical pathway (neurons pruned by |a dy/da|)."

    def scores(self, session, x, y, acts, target, hooks):
        grads = session.grad(y, acts)
        return [(a * g).abs().detach() for a, g in zip(acts, grads)]


@register
class PruneInt(_Pathway):
    name = "prune_int"
    description = "PathwayGrad/PruneInt: as prune_grad, neurons scored by an integrated gradient of each layer."
    steps = Param(10, "integration steps per layer (steps + 1 points, as the authors' iterations)")
    alpha_schedule = Param("linear", "'linear' (j / steps) or 'authors' (their cumulative scales up to 5.5)")

    def check(self):
        super().check()
        if not isinstance(self.steps, int) or self.steps < 1:
            raise ConfigError(f"steps must be a positive int, got {self.steps!r}")
        if self.alpha_schedule not in ALPHA_SCHEDULES:
            raise ConfigError(f"unknown alpha_schedule {self.alpha_schedule!r}; choose one of {', '.join(ALPHA_SCHEDULES)}")

    def scores(self, session, x, y, acts, target, hooks):
        B = x.shape[0]
        acts = [a.detach() for a in acts]
        L, alpha = len(acts), alphas(self.steps, self.alpha_schedule).to(x.device)
        K = len(alpha)
        # row = (image, layer, step), image-major
        image_of = torch.arange(B, device=x.device).repeat_interleave(L * K)
        layer_of = torch.arange(L, device=x.device).repeat_interleave(K).repeat(B)
        alpha_of = alpha.repeat(B * L)
        total = [torch.zeros_like(a) for a in acts]
        for start in range(0, B * L * K, self.batch_size):
            rows = slice(start, min(start + self.batch_size, B * L * K))
            images, layers = image_of[rows], layer_of[rows]
            scales = torch.ones(len(images), L, dtype=x.dtype, device=x.device)
            scales[torch.arange(len(images)), layers] = alpha_of[rows].to(x.dtype)
            hooks.scales = scales
            inputs = x[images].detach().requires_grad_(True)
            y = target(session.forward(inputs), images)
            grads = session.grad(y, list(hooks.outputs))
            hooks.scales = None
            for call in layers.unique().tolist():
                chosen = (layers == call).nonzero().flatten()
                total[call].index_add_(0, images[chosen], grads[call][chosen].detach())
        return [(a * t / K).abs() for a, t in zip(acts, total)]
