"""Methods x metrics over a batch of images: a table with 95% bootstrap intervals, curves and costs.

Results are written as they are computed (one JSON record per method x metric in `records.jsonl`),
and a rerun with the same settings skips what is already there, so long runs resume.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from . import methods as _methods
from . import metrics as _metrics
from .api import evaluate, explain
from .core.errors import ConfigError


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

    def row(self) -> dict:
        return {"method": self.method, "metric": self.metric, "mean": self.mean, "ci_low": self.low,
                "ci_high": self.high, "n": len([s for s in self.scores if not math.isnan(s)]),
                "higher_is_better": self.higher_is_better, "category": self.category}


# Metrics that re-explain with the method under evaluation take it as a parameter.
_NEEDS_METHOD = ("model_randomization", "random_logit")
# Localization metrics need boxes or masks, ground-truth metrics the truth; skipped when not given.
_NEEDS_REGIONS = "localization"
_NEEDS_TRUTH = "groundtruth"


def score_explanation(model, x: torch.Tensor, explanation, method: str, metric: str, params: dict | None = None, *,
                      boxes=None, masks=None, truth=None, key: str = "") -> Record | None:
    """Score one explanation with one metric: a Record with the per-image scores, interval, curves and
    costs; None when the metric needs data (regions, ground truth) that was not given."""
    cls = _metrics.get(metric)
    data = {}
    if cls.category == _NEEDS_REGIONS:
        if boxes is None and masks is None:
            return None
        data = {"boxes": boxes} if boxes is not None else {"masks": masks}
    elif cls.category == _NEEDS_TRUTH:
        if truth is None:
            return None
        data = {"truth": truth}
    instance = _metrics.build(metric, **(params or {}))
    measured = instance.measure(model if cls.needs_model else None, x, explanation, **data)
    scores, curves = measured.scores, measured.curves
    mean, lo, hi = bootstrap_interval(scores)
    return Record(method=method, metric=metric, scores=[float(s) for s in scores], mean=mean, low=lo, high=hi,
                  higher_is_better=cls.higher_is_better, category=cls.category, curves=_curves_to_lists(curves),
                  cost={"explain": explanation.cost.as_dict(),
                        "metric": measured.cost.as_dict() if measured.cost else {}},
                  key=key)


def load_records(log: Path) -> dict[str, "Record"]:
    """Records already written to a records.jsonl, by key (none if the file does not exist)."""
    done: dict[str, Record] = {}
    if log.exists():
        for line in log.read_text().splitlines():
            try:
                rec = Record(**json.loads(line))
            except (json.JSONDecodeError, TypeError):
                continue  # a line cut short by an interrupted run
            done[rec.key] = rec
    return done


def append_record(log: Path, rec: "Record") -> None:
    """Append one record as soon as it exists, so an interrupted run keeps it."""
    with log.open("a") as f:
        f.write(json.dumps(rec.__dict__) + "\n")


def _key(method: str, method_params: dict, metric: str, metric_params: dict, n_images: int, image_ids) -> str:
    text = json.dumps([method, method_params, metric, metric_params, n_images, list(image_ids)], sort_keys=True,
                      default=repr)
    return hashlib.sha1(text.encode()).hexdigest()[:16]


def _curves_to_lists(curves: dict | None) -> dict | None:
    if not curves:
        return None
    out = {}
    for k, v in curves.items():
        out[k] = v.tolist() if isinstance(v, torch.Tensor) else v
    return out


def run_evaluation(model, x: torch.Tensor, method_names: Sequence[str], metric_names: Sequence[str], *,
                   target=None, method_params: dict | None = None, metric_params: dict | None = None,
                   boxes=None, masks=None, truth=None, out_dir=None, image_ids: Sequence[str] | None = None,
                   on_record=None, on_explanation=None) -> list[Record]:
    """Explain `x` with every method and score the maps with every metric.

    `on_explanation(method, explanation)` is called for every explanation computed (not for methods
    whose records were all reused), e.g. to keep example maps.

    method_params / metric_params: {name: {param: value}}. With `out_dir`, each record is appended to
    `out_dir/records.jsonl` as soon as it exists, and records already there (same settings) are reused.
    """
    method_params = method_params or {}
    metric_params = metric_params or {}
    for name in method_names:
        _methods.get(name)
    for name in metric_names:
        _metrics.get(name)
    image_ids = list(image_ids) if image_ids is not None else [str(i) for i in range(len(x))]
    done: dict[str, Record] = {}
    log = None
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        log = out / "records.jsonl"
        done = load_records(log)

    records: list[Record] = []
    for method in method_names:
        mparams = method_params.get(method, {})
        plan = {}
        for metric in metric_names:
            params = dict(metric_params.get(metric, {}))
            if metric in _NEEDS_METHOD:
                params.setdefault("method", method)
                params.setdefault("method_params", mparams)
            plan[metric] = (params, _key(method, mparams, metric, params, len(x), image_ids))
        pending = [m for m in metric_names if plan[m][1] not in done]
        explanation = explain(model, x, method, target, **mparams) if pending else None
        if explanation is not None and on_explanation is not None:
            on_explanation(method, explanation)
        for metric in metric_names:
            params, key = plan[metric]
            if key in done:
                records.append(done[key])
                continue
            rec = score_explanation(model, x, explanation, method, metric, params, boxes=boxes, masks=masks,
                                    truth=truth, key=key)
            if rec is None:
                continue
            records.append(rec)
            if log is not None:
                append_record(log, rec)
            if on_record is not None:
                on_record(rec)
    return records


def write_tables(records: Sequence[Record], out_dir) -> dict[str, Path]:
    """results.json (rows + per-image scores + curves), results.csv (rows), a markdown table."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if not records:
        raise ConfigError("nothing was evaluated")
    rows = [r.row() for r in records]
    paths = {"json": out / "results.json", "csv": out / "results.csv", "markdown": out / "results.md"}
    paths["json"].write_text(json.dumps({"rows": rows, "records": [r.__dict__ for r in records]}, indent=1))
    with paths["csv"].open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    paths["markdown"].write_text(markdown_table(records))
    return paths


def markdown_table(records: Sequence[Record]) -> str:
    """method x metric: mean [95% interval]; arrows say which direction is better."""
    methods = list(dict.fromkeys(r.method for r in records))
    metrics = list(dict.fromkeys(r.metric for r in records))
    by = {(r.method, r.metric): r for r in records}
    arrow = {r.metric: ("↑" if r.higher_is_better else "↓") for r in records}
    lines = ["| method | " + " | ".join(f"{m} {arrow[m]}" for m in metrics) + " |",
             "|---|" + "---|" * len(metrics)]
    for method in methods:
        cells = []
        for metric in metrics:
            r = by.get((method, metric))
            cells.append("" if r is None else f"{r.mean:.3f} [{r.low:.3f}, {r.high:.3f}]")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
