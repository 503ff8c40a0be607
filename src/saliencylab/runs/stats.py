"""Statistics from rows: bootstrap intervals, paired permutation tests, Holm, and method x metric tables.

Tables group rows by (method, metric); comparisons pair two methods' scores by image id, so a method
that failed or was skipped on some images is compared on the images both have.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import torch

from ..core.errors import ConfigError


def bootstrap_interval(values, level: float = 0.95, resamples: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """Mean and percentile bootstrap interval of the mean (NaNs dropped); one batched resampling."""
    v = torch.as_tensor(values, dtype=torch.float64).flatten()
    v = v[~torch.isnan(v)]
    if v.numel() == 0:
        return math.nan, math.nan, math.nan
    mean = float(v.mean())
    if v.numel() == 1:
        return mean, mean, mean
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, v.numel(), (resamples, v.numel()), generator=g)
    means = v[idx].mean(1)
    lo, hi = torch.quantile(means, torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64)).tolist()
    return mean, lo, hi


def paired_permutation_test(a, b, resamples: int = 20000, seed: int = 0) -> float:
    """Two-sided p-value that paired scores a and b have equal means (sign-flip permutation test).

    Pairs with a NaN are dropped. Exact over all 2^n sign flips for n <= 16, else `resamples` random
    flips (p = (hits + 1) / (resamples + 1), never 0)."""
    a = torch.as_tensor(a, dtype=torch.float64).flatten()
    b = torch.as_tensor(b, dtype=torch.float64).flatten()
    if a.shape != b.shape:
        raise ConfigError(f"paired scores need equal lengths, got {a.numel()} and {b.numel()}")
    d = a - b
    d = d[~torch.isnan(d)]
    n = d.numel()
    if n == 0:
        return math.nan
    observed = d.mean().abs()
    if observed == 0:
        return 1.0
    tol = 1e-12 * max(1.0, float(d.abs().max()))
    if n <= 16:
        codes = torch.arange(2 ** n)[:, None]
        signs = 1.0 - 2.0 * ((codes >> torch.arange(n)) & 1).to(torch.float64)
        return float(((signs * d).mean(1).abs() >= observed - tol).to(torch.float64).mean())
    g = torch.Generator().manual_seed(seed)
    signs = torch.randint(0, 2, (resamples, n), generator=g).to(torch.float64) * 2 - 1
    hits = int(((signs * d).mean(1).abs() >= observed - tol).sum())
    return (hits + 1) / (resamples + 1)


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values (NaNs kept as NaN)."""
    idx = [i for i, p in enumerate(pvalues) if not math.isnan(p)]
    order = sorted(idx, key=lambda i: pvalues[i])
    adjusted = [math.nan] * len(pvalues)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(order) - rank) * pvalues[i]))
        adjusted[i] = running
    return adjusted


@dataclass
class Record:
    """One method x metric cell summarized from its rows: per-image scores (in `image_ids` order), mean and
    95% bootstrap interval, the curves of every image, and the total cost over its images."""

    method: str
    metric: str
    scores: list[float]
    mean: float
    low: float
    high: float
    higher_is_better: bool
    category: str
    curves: dict | None = None
    cost: dict = field(default_factory=dict)
    key: str = ""
    image_ids: list = field(default_factory=list)

    def row(self) -> dict:
        return {"method": self.method, "metric": self.metric, "mean": self.mean, "ci_low": self.low,
                "ci_high": self.high, "n": len([s for s in self.scores if not math.isnan(s)]),
                "higher_is_better": self.higher_is_better, "category": self.category}

    def by_image(self) -> dict:
        return dict(zip(self.image_ids, self.scores)) if self.image_ids else dict(enumerate(self.scores))


def _sum_costs(costs: Sequence[dict]) -> dict:
    out: dict = {}
    for c in costs:
        for k, v in (c or {}).items():
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                out.setdefault(k, v)
            elif k == "peak_memory_bytes":
                out[k] = max(out.get(k) or 0, v)
            else:
                out[k] = out.get(k, 0) + v
    return out


def _combine_curves(rows) -> dict | None:
    """Per-image curves stacked in row order; shared axes taken once (as `curves` of one batch used to be)."""
    with_curves = [r.curves for r in rows if r.curves]
    if len(with_curves) != len(rows) or not with_curves:
        return None
    out = dict(with_curves[0].get("shared", {}))
    for k in with_curves[0].get("image", {}):
        out[k] = [c["image"].get(k) for c in with_curves]
    return out


def summarize(rows: Sequence, level: float = 0.95) -> list[Record]:
    """One Record per (method, metric), in the order they first appear; scores in row order, one per image
    id (a later row of the same image replaces an earlier one)."""
    groups: dict[tuple, dict] = {}
    for r in rows:
        groups.setdefault((r.method, r.metric), {})[r.image_id] = r
    out = []
    for (method, metric), by_id in groups.items():
        chosen = list(by_id.values())
        scores = [float(r.score) for r in chosen]
        mean, lo, hi = bootstrap_interval(scores, level=level)
        cost = {}
        for part in ("explain", "metric"):
            parts = [r.cost.get(part) for r in chosen if r.cost.get(part)]
            if parts:
                cost[part] = {**_sum_costs(parts), "images": len(parts)}
        out.append(Record(method=method, metric=metric, scores=scores, mean=mean, low=lo, high=hi,
                          higher_is_better=chosen[0].higher_is_better, category=chosen[0].category,
                          curves=_combine_curves(chosen), cost=cost, image_ids=[r.image_id for r in chosen]))
    return out


def paired_scores(a: Record, b: Record) -> tuple[list[float], list[float]]:
    """The scores of two records on the images both have, paired by image id (by position when a record
    carries no ids)."""
    if not a.image_ids or not b.image_ids:
        if len(a.scores) != len(b.scores):
            raise ConfigError(f"cannot pair {a.method} and {b.method}: no image ids and "
                              f"{len(a.scores)} vs {len(b.scores)} scores")
        return list(a.scores), list(b.scores)
    sa, sb = a.by_image(), b.by_image()
    common = [i for i in sa if i in sb]
    return [sa[i] for i in common], [sb[i] for i in common]


def significance_against_best(records: Sequence[Record], level: float = 0.05) -> list[dict]:
    """Per metric: every method against the best mean, paired permutation test on per-image scores (paired
    by image id), Holm-corrected over the comparisons of that metric."""
    rows = []
    for metric in dict.fromkeys(r.metric for r in records):
        chosen = [r for r in records if r.metric == metric and not math.isnan(r.mean)]
        if len(chosen) < 2:
            continue
        best = (max if chosen[0].higher_is_better else min)(chosen, key=lambda r: r.mean)
        others = [r for r in chosen if r is not best]
        raw = [paired_permutation_test(*paired_scores(r, best)) for r in others]
        for r, p, p_adj in zip(others, raw, holm(raw)):
            rows.append({"metric": metric, "best": best.method, "method": r.method, "p": p, "p_holm": p_adj,
                         "different": bool(p_adj < level) if not math.isnan(p_adj) else False})
    return rows


def significance(rows: Sequence, level: float = 0.05) -> list[dict]:
    """`significance_against_best` straight from rows."""
    return significance_against_best(summarize(rows), level)


def cost_rows(records: Sequence[Record]) -> list[dict]:
    """Passes and seconds per image of each method's explanations, each image counted once (records of one
    method share images across metrics in `evaluate`, and cover different images per axiom in knows-best)."""
    totals: dict[str, dict] = {}
    seen: dict[str, set] = {}
    for r in records:
        c = r.cost.get("explain") if r.cost else None
        if not c:
            continue
        ids = r.image_ids or list(range(int(c.get("images", len(r.scores)))))
        done = seen.setdefault(r.method, set())
        new = [i for i in ids if i not in done]
        if not new:
            continue
        done.update(new)
        share = len(new) / len(ids)
        t = totals.setdefault(r.method, {"forward": 0.0, "backward": 0.0, "seconds": 0.0, "images": 0})
        t["forward"] += c.get("forward_images", 0) * share
        t["backward"] += c.get("backward_images", 0) * share
        t["seconds"] += c.get("seconds", math.nan) * share
        t["images"] += len(new)
    return [{"method": m, "forward_per_image": t["forward"] / t["images"],
             "backward_per_image": t["backward"] / t["images"], "seconds_per_image": t["seconds"] / t["images"]}
            for m, t in totals.items()]
