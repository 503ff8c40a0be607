"""Scoring: per-image axiom scores from maps, the authors' data-set numbers, and a method run over a suite."""

from __future__ import annotations

import torch
from torch import nn

from ...core.errors import ConfigError, InputError
from .results import Suite


def _abs_maxnorm(maps: torch.Tensor) -> torch.Tensor:
    h = maps.detach().float().abs().cpu()
    return h / h.flatten(1).amax(dim=1).clamp_min(1e-12)[:, None, None]


def _sums(h: torch.Tensor, regions: torch.Tensor) -> torch.Tensor:
    return (h[:, None] * regions).flatten(2).sum(dim=2)  # (N, R)


def score_maps(suite: Suite, maps: torch.Tensor, maps_second: torch.Tensor | None = None) -> dict:
    """Our per-image scores in [0, 1] (higher is better) from maps already computed: `maps` (N, H, W)
    for `suite.targets` on every image, `maps_second` (N_cs, H, W) for `region_classes[:, 1]` on the
    class-sensitivity images. Each map is |map| divided by its own maximum (ours: the authors score
    raw maps, see `authors_scores`), so a method's two class maps are compared in shape, not in scale."""
    if maps.shape[0] != len(suite) or tuple(maps.shape[-2:]) != tuple(suite.regions.shape[-2:]):
        raise InputError(
            f"maps must have shape ({len(suite)}, H, W) matching the suite, got {tuple(maps.shape)}")
    h = _abs_maxnorm(maps)
    regions = suite.regions.float()
    scores = {}
    cs = suite.indices("class_sensitivity")
    if len(cs):
        if maps_second is None or maps_second.shape[0] != len(cs):
            raise InputError(f"class sensitivity needs maps_second for {len(cs)} images")
        h0, h1, reg = h[cs], _abs_maxnorm(maps_second), regions[cs]
        both = torch.minimum(h0, h1)
        overlap = _sums(both, reg).sum(dim=1)
        total = _sums(h0, reg)[:, 0] + _sums(h1, reg)[:, 1]
        scores["class_sensitivity"] = torch.where(total > 0, 1 - overlap / total.clamp_min(1e-30),
                                                  torch.zeros_like(total))
    npl = suite.indices("null_player")
    if len(npl):
        sums = _sums(h[npl], regions[npl])
        ratio = sums[:, 1] / sums[:, 0].clamp_min(1e-30)
        scores["null_player"] = torch.where(sums[:, 0] > 0, (1 - ratio).clamp(0, 1), torch.zeros_like(ratio))
    sym = suite.indices("symmetry")
    if len(sym):
        reg = regions[sym]
        means = _sums(h[sym], reg) / reg.flatten(2).sum(dim=2).clamp_min(1)
        hi, lo = means.amax(dim=1), means.amin(dim=1)
        scores["symmetry"] = torch.where(hi > 0, lo / hi.clamp_min(1e-30), torch.zeros_like(hi))
    return scores


def _spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    def rank(v):
        order = v.argsort()
        r = torch.empty_like(v)
        r[order] = torch.arange(len(v), dtype=v.dtype)
        for val in v.unique():  # average ranks of ties
            tie = v == val
            r[tie] = r[tie].mean()
        return r

    ra, rb = rank(a.double()), rank(b.double())
    ra, rb = ra - ra.mean(), rb - rb.mean()
    den = (ra.norm() * rb.norm()).item()
    return float((ra * rb).sum().item() / den) if den > 0 else float("nan")


def _authors_scale(maps: torch.Tensor) -> torch.Tensor:
    """The heatmaps the authors save (`Attribution_Methods_Submit.ipynb`, `save_data_image`): raw, each
    divided by 255 only when its max |h| exceeds 1; no other normalization."""
    h = maps.detach().float().cpu()
    big = h.abs().flatten(1).amax(dim=1) > 1
    return torch.where(big[:, None, None], h / 255, h)


def authors_scores(suite: Suite, maps: torch.Tensor, maps_second: torch.Tensor | None = None) -> dict:
    """The authors' data-set numbers, from their saved heatmaps (`_authors_scale`: raw maps, / 255 when
    max |h| > 1; the two class maps keep their relative scale), `utils.py` and the scoring cells of
    `Attribution_Methods_Submit.ipynb`:

    - "class_sensitivity_overlap" (`get_class_sensitivity`, lower is better): mean over the images of
      [sum_P0 min(|h0|, |h1|) + sum_P1 min(|h0|, |h1|)] / [sum_P0 |h0| + sum_P1 |h1|];
    - "null_player_ratio" (their null-player cell: 1 / `get_null_player`, lower is better): mean of
      1 / (sum_target h / sum_null h), i.e. sum_null h / sum_target h on the signed map;
    - "symmetry_spearman" (`two_patch_corr_score` then `scipy.stats.spearmanr`, higher is better):
      Spearman correlation over the symmetry images of the mean |h| on the two copies.

    Divisions are plain, as theirs: a zero denominator gives inf or nan. `score_maps` is our per-image
    variant (max-normalized maps, scores in [0, 1])."""
    out = {}
    regions = suite.regions.float()
    cs = suite.indices("class_sensitivity")
    if len(cs):
        if maps_second is None or maps_second.shape[0] != len(cs):
            raise InputError(f"class sensitivity needs maps_second for {len(cs)} images")
        h0, h1, reg = _authors_scale(maps[cs]).abs(), _authors_scale(maps_second).abs(), regions[cs]
        both = _sums(torch.minimum(h0, h1), reg)
        term0 = both[:, 0] + both[:, 1]
        term1 = _sums(h0, reg)[:, 0] + _sums(h1, reg)[:, 1]
        out["class_sensitivity_overlap"] = float((term0 / term1).mean())
    npl = suite.indices("null_player")
    if len(npl):
        sums = _sums(_authors_scale(maps[npl]), regions[npl])  # signed: region 0 target, region 1 null
        out["null_player_ratio"] = float((1 / (sums[:, 0] / sums[:, 1])).mean())
    sym = suite.indices("symmetry")
    if len(sym) > 1:
        reg = regions[sym]
        means = _sums(_authors_scale(maps[sym]).abs(), reg) / reg.flatten(2).sum(dim=2)
        out["symmetry_spearman"] = _spearman(means[:, 0], means[:, 1])
    return out


def evaluate_method(model: nn.Module, method, suite: Suite, *, return_maps: bool = False, costs: list | None = None,
                    **method_params):
    """Score a method on a suite: {axiom: (N_axiom,) scores in [0, 1], higher is better}.

    `method`: a registered name (built with `method_params`) or a Method instance. Two batched
    explain calls: every image for `suite.targets`, and the class-sensitivity images for their
    second class. With `return_maps=True` returns (scores, (maps, maps_second)). `costs`, if given a
    list, receives the Cost of each explain call.
    """
    from ... import methods as _methods
    from ...api import explain

    if isinstance(method, _methods.Method):
        if method_params:
            raise ConfigError("pass parameters to the Method instance, not to evaluate_method()")
        instance = method
    else:
        instance = _methods.build(method, model, **method_params)
    first = explain(model, suite.x, instance, target=suite.targets)
    maps = first.maps
    if costs is not None:
        costs.append(first.cost)
    cs = suite.indices("class_sensitivity")
    maps_second = None
    if len(cs):
        second = explain(model, suite.x[cs], instance, target=suite.region_classes[cs, 1])
        maps_second = second.maps
        if costs is not None:
            costs.append(second.cost)
    scores = score_maps(suite, maps.cpu(), None if maps_second is None else maps_second.cpu())
    return (scores, (maps, maps_second)) if return_maps else scores
