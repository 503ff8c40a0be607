"""Integrated gradients (Sundararajan et al. 2017), batched over images and path points.

Differentiable: with `create_graph=True` every path gradient keeps its graph, so the maps carry
gradient to the parameters. A random baseline ("uniform") is drawn per image, keyed by the image
(`session.random(seed, "baseline")`), so results do not depend on batching or sharding.
"""

from __future__ import annotations

import numpy as np
import torch

from ..baselines import baseline_images, make_baseline
from ..core.errors import ConfigError
from ..core.explanation import Explanation
from .base import Method, Param, accumulate_input_gradients, check_batch_size, clean_outputs, register

RULES = ("gausslegendre", "riemann_trapezoid", "riemann_left", "riemann_right", "riemann_middle")


def path_points(steps: int, rule: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Points alpha in [0, 1] on the straight path and their quadrature weights (summing to 1)."""
    if not isinstance(steps, int) or steps < 1:
        raise ConfigError(f"steps must be a positive int, got {steps!r}")
    if rule == "gausslegendre":
        nodes, weights = np.polynomial.legendre.leggauss(steps)
        return torch.tensor(0.5 * (nodes + 1)), torch.tensor(0.5 * weights)
    if rule == "riemann_trapezoid":
        if steps < 2:
            raise ConfigError("riemann_trapezoid needs at least 2 steps")
        w = torch.full((steps,), 1.0 / (steps - 1), dtype=torch.float64)
        w[0] = w[-1] = 0.5 / (steps - 1)
        return torch.linspace(0, 1, steps, dtype=torch.float64), w
    w = torch.full((steps,), 1.0 / steps, dtype=torch.float64)
    if rule == "riemann_left":
        return torch.arange(steps, dtype=torch.float64) / steps, w
    if rule == "riemann_right":
        return (torch.arange(steps, dtype=torch.float64) + 1) / steps, w
    if rule == "riemann_middle":
        return (torch.arange(steps, dtype=torch.float64) + 0.5) / steps, w
    raise ConfigError(f"unknown integration rule '{rule}'; choose one of {', '.join(RULES)}")


def integrated_path_gradients(session, x, baseline, target, alphas, weights, batch_size, desc):
    """Sum over path points of weight * grad f(baseline + alpha (x - baseline)), per image."""
    alphas = alphas.to(x.device, x.dtype)
    weights = weights.to(x.device, x.dtype)
    total = torch.zeros_like(x)
    delta = x - baseline

    def make_inputs(image, step):
        return torch.addcmul(baseline[image], alphas[step].view(-1, 1, 1, 1), delta[image])

    def reduce(grads, image, step, inputs):
        total.index_add_(0, image, grads * weights[step].view(-1, 1, 1, 1))

    accumulate_input_gradients(session, target, x.shape[0], len(alphas), make_inputs, reduce, batch_size, desc,
                               pixels=x.shape[-2] * x.shape[-1])
    return total


@register
class IntegratedGradients(Method):
    """extras["baseline"]: the baseline images (B, C, H, W) the paths started from (completeness:
    maps.sum() = f(x) - f(baseline) up to quadrature error)."""

    name = "integrated_gradients"
    description = "Integrated gradients along the straight path from a baseline (zero, blur, noise, tensor)."
    differentiable = True

    steps = Param(32, "path points")
    baseline = Param("zero", "the path's start: a baseline name, number, tensor or Baseline")
    rule = Param("gausslegendre", f"quadrature rule: {', '.join(RULES)}")
    batch_size = Param(None, "rows (image x path point) per pass; None: automatic for the device")

    def check(self):
        self._baseline = make_baseline(self.baseline)
        path_points(self.steps, self.rule)  # validate now, not deep inside attribute()
        if self.batch_size is not None:
            check_batch_size(self.batch_size)

    def compute(self, session, x, target):
        target, outputs = clean_outputs(session, x, target)
        baseline = baseline_images(self._baseline, x, session)
        alphas, weights = path_points(self.steps, self.rule)
        total = integrated_path_gradients(session, x, baseline, target, alphas, weights, self.batch_size, self.name)
        return Explanation(maps=(x - baseline) * total, targets=target.classes, outputs=outputs,
                           extras={"baseline": baseline})
