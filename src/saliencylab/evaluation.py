"""Methods x metrics over a batch of images: a table with 95% bootstrap intervals, curves and costs.

Results are rows (`saliencylab.runs.store`): one per (image, model, method spec, metric spec, target),
appended to `<out_dir>/rows.jsonl` as they are computed; a rerun computes only the rows whose key is
missing, so long runs resume, and a rerun with another model, target or setting computes new rows.
Tables and tests come from the rows (`saliencylab.runs.stats`).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Sequence

import torch

from . import metrics as _metrics
from .core.errors import ConfigError
from .runs.local import metric_data, missing_requirements, run_rows, split_curves
from .runs.stats import Record, bootstrap_interval, holm, paired_permutation_test, summarize
from .runs.store import RunStore

__all__ = ["Record", "bootstrap_interval", "paired_permutation_test", "holm", "score_explanation", "run_evaluation",
           "write_tables", "markdown_table"]


def score_explanation(model, x: torch.Tensor, explanation, method: str, metric: str, params: dict | None = None, *,
                      boxes=None, masks=None, truth=None, key: str = "") -> Record | None:
    """Score one explanation with one metric: a Record with the per-image scores, interval, curves and
    costs (not stored); None when the metric needs data (regions, ground truth) that was not given."""
    cls = _metrics.get(metric)
    if missing_requirements(metric, boxes=boxes, masks=masks, truth=truth):
        return None
    instance = _metrics.build(metric, **(params or {}))
    data = metric_data(metric, boxes=boxes, masks=masks, truth=truth)
    measured = instance.measure(model if cls.needs_model else None, x, explanation, **data)
    scores = [float(s) for s in measured.scores.detach().cpu().flatten()]
    mean, lo, hi = bootstrap_interval(scores)
    per_image = split_curves(measured.curves, len(scores))
    curves = None
    if per_image[0] is not None:
        curves = {**per_image[0]["shared"], **{k: [c["image"][k] for c in per_image] for k in per_image[0]["image"]}}
    ids = list(explanation.image_ids) if getattr(explanation, "image_ids", None) else [str(i) for i in range(len(scores))]
    return Record(method=method, metric=metric, scores=scores, mean=mean, low=lo, high=hi,
                  higher_is_better=cls.higher_is_better, category=cls.category, curves=curves,
                  cost={"explain": {**explanation.cost.as_dict(), "images": len(scores)},
                        "metric": {**measured.cost.as_dict(), "images": len(scores)} if measured.cost else {}},
                  key=key, image_ids=[str(i) for i in ids])


def run_evaluation(model, x: torch.Tensor, method_names: Sequence[str], metric_names: Sequence[str], *,
                   target=None, method_params: dict | None = None, metric_params: dict | None = None,
                   boxes=None, masks=None, truth=None, out_dir=None, image_ids: Sequence[str] | None = None,
                   on_record=None, on_explanation=None, store: RunStore | None = None) -> list[Record]:
    """Explain `x` with every method and score the maps with every metric: one Record per method x metric,
    summarized from the per-image rows.

    method_params / metric_params: {name: {param: value}}. With `out_dir` (or a `store`), rows are
    appended to `out_dir/rows.jsonl` as soon as they exist, and rows already there with the same key
    (image, model, method spec, metric spec, target) are reused. `on_record(record)` is called for
    every method x metric with newly computed rows, `on_explanation(method, explanation)` for every
    explanation computed (of the images that missed a row). Raises ConfigError before running when a
    metric needs boxes, masks or truth that were not given.
    """
    if store is None:
        store = RunStore(out_dir)

    def done(rows):
        if on_record is not None:
            on_record(summarize(rows)[0])

    rows = run_rows(model, x, method_names, metric_names, target=target, method_params=method_params,
                    metric_params=metric_params, boxes=boxes, masks=masks, truth=truth, store=store,
                    image_ids=image_ids, on_rows=done, on_explanation=on_explanation)
    return summarize(rows)


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
