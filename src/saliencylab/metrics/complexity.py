"""Complexity: how concentrated a map is. No model needed; both use |map| (as Quantus, abs=True).

- `sparseness` (Chalasani et al. 2020; Quantus Sparseness): the Gini index of |map|, scaled to max 1
  (Quantus's normalise_by_max) with 1e-7 added to every pixel as in Quantus, then
  sum_i (2i - n - 1) a_(i) / (n * sum_i a_i) over the values sorted ascending. 0 for a uniform map
  (an all-zero map counts as uniform), close to 1 when one pixel holds everything. Higher = sparser,
  which is the desired property: higher_is_better=True.
- `complexity` (Bhatt et al. 2020; Quantus Complexity): the Shannon entropy (natural log) of the
  distribution p = |map| / sum |map|, with 0 log 0 = 0. 0 for a single pixel, log(H*W) for a uniform
  map; an all-zero map is treated as uniform (the limit of constant maps). Lower = simpler:
  higher_is_better=False.
"""

from __future__ import annotations

import math

import torch

from .base import Measurement, Metric, register


class ComplexityMetric(Metric):
    category = "complexity"
    needs_model = False


@register
class Sparseness(ComplexityMetric):
    name = "sparseness"
    description = "Gini index of |map| (Chalasani et al.); higher = sparser, more concentrated."
    higher_is_better = True

    def compute(self, session, x, maps, target, **data):
        a = maps.flatten(1).abs().to(torch.float64 if maps.device.type != "mps" else torch.float32)
        peak = a.amax(1, keepdim=True)
        a = torch.where(peak > 0, a / torch.where(peak > 0, peak, torch.ones_like(peak)), torch.zeros_like(a))
        a = (a + 1e-7).sort(1).values
        n = a.shape[1]
        i = torch.arange(1, n + 1, device=a.device, dtype=a.dtype)
        return Measurement((((2 * i - n - 1) * a).sum(1) / (n * a.sum(1))).to(maps.dtype))


@register
class Complexity(ComplexityMetric):
    name = "complexity"
    description = "Entropy of the |map| distribution (Bhatt et al.); lower = simpler."
    higher_is_better = False

    def compute(self, session, x, maps, target, **data):
        a = maps.flatten(1).abs().to(torch.float64 if maps.device.type != "mps" else torch.float32)
        total = a.sum(1, keepdim=True)
        p = a / torch.where(total > 0, total, torch.ones_like(total))
        entropy = -torch.xlogy(p, p).sum(1)
        uniform = torch.full_like(entropy, math.log(a.shape[1]))
        return Measurement(torch.where(total[:, 0] > 0, entropy, uniform).to(maps.dtype))
