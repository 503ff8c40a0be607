"""The page of one training run (`fit` with `out_dir`, `saliencylab guide` / `distill`): `report.html`.

Curves per epoch of the evaluation metrics (accuracy, worst-group accuracy, EPG, IoU) and of the
training loss and its parts, a table of the rows, and example maps of the same validation images
before and after training. Figures are `Figure` objects on their own Agg canvas (`plots.new_figure`),
so the caller's matplotlib backend is left alone.
"""

from __future__ import annotations

import datetime
import math
import platform
from pathlib import Path
from typing import Mapping, Sequence

__all__ = ["write_training_report", "plot_training_curves", "CURVES"]

# history key -> title on the page
CURVES = {"accuracy": "accuracy", "worst_group_accuracy": "worst-group accuracy", "epg": "EPG (energy pointing game)",
          "iou": "IoU"}
LOSSES = ("loss", "ce", "guidance")


def _series(history: Sequence[Mapping], key: str):
    xs, ys = [], []
    for row in history:
        v = row.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            xs.append(row["epoch"])
            ys.append(float(v))
    return xs, ys


def plot_training_curves(history: Sequence[Mapping], path) -> tuple[Path | None, Path | None]:
    """(metrics figure, loss figure) written next to `path` (`path` and `path` with `_loss`); None where
    the history has nothing to plot."""
    from matplotlib.ticker import MaxNLocator

    from .plots import new_figure

    path = Path(path)
    out_metrics = out_loss = None
    shown = [k for k in CURVES if _series(history, k)[0]]
    if shown:
        fig = new_figure(figsize=(3.0 * len(shown), 2.8), dpi=110)
        axes = fig.subplots(1, len(shown), squeeze=False)[0]
        for ax, key in zip(axes, shown):
            xs, ys = _series(history, key)
            ax.plot(xs, ys, marker="o", markersize=3)
            ax.set_title(CURVES[key], fontsize=9)
            ax.set_xlabel("epoch", fontsize=8)
            ax.set_ylim(-0.02, 1.02)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.grid(alpha=0.3)
            ax.tick_params(labelsize=7)
        fig.tight_layout()
        fig.savefig(path)
        out_metrics = path
    losses = [k for k in sorted({k for row in history for k in row}) if k in LOSSES or k.startswith("distill_")]
    losses = [k for k in losses if _series(history, k)[0]]
    if losses:
        fig = new_figure(figsize=(4.2, 2.8), dpi=110)
        ax = fig.subplots()
        for key in losses:
            ax.plot(*_series(history, key), marker="o", markersize=3, label=key)
        ax.set_title("training loss (mean over images)", fontsize=9)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("epoch", fontsize=8)
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=7, frameon=False)
        fig.tight_layout()
        out_loss = path.with_name(path.stem + "_loss" + path.suffix)
        fig.savefig(out_loss)
    return out_metrics, out_loss


def _fmt(v) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "—"
    if isinstance(v, float):
        return f"{v:.4f}"
    return str(v)


def write_training_report(out_dir, history: Sequence[Mapping], examples: Sequence[Mapping] = (),
                          meta: Mapping | None = None) -> Path:
    """Write `out_dir/report.html` (and its figures) for a run's `history` (rows of `fit`) and return it.

    examples: dicts with `image`, `before`, `after` (PNG paths relative to out_dir), `label`, `group`.
    meta: free-form facts; known keys: title, command, config, eval_method, class_names, model.
    """
    import torch

    from .. import __version__
    from .html import _environment

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = dict(meta or {})
    figure, loss_figure = plot_training_curves(history, out_dir / "curves.png")
    columns = ["epoch"] + [k for k in ("loss", "ce", "guidance") if any(r.get(k) is not None for r in history)]
    columns += sorted({k for r in history for k in r if k.startswith("distill_")})
    columns += [k for k in ("guided_images", *CURVES) if any(r.get(k) is not None for r in history)]
    rows = [[_fmt(r.get(k)) for k in columns] for r in history]
    names = meta.get("class_names")
    examples = [dict(e, label_name=names[e["label"]] if names and 0 <= e.get("label", -1) < len(names)
                     else e.get("label")) for e in examples]
    page = {
        "title": meta.get("title", "saliencylab training run"),
        "curves": [CURVES[k] for k in CURVES if any(isinstance(r.get(k), float) and math.isfinite(r[k]) for r in history)],
        "figure": figure.name if figure else None,
        "loss_figure": loss_figure.name if loss_figure else None,
        "columns": [("EPG" if c == "epg" else "IoU" if c == "iou" else c.replace("_", " ")) for c in columns],
        "rows": rows,
        "examples": examples,
        "eval_method": meta.get("eval_method", ""),
        "config": meta.get("config") or {},
        "versions": {"saliencylab": __version__, "torch": torch.__version__, "python": platform.python_version()},
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": meta.get("command"),
        "model": meta.get("model"),
    }
    html = _environment().get_template("training.html.j2").render(page=page, title=page["title"])
    path = out_dir / "report.html"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(html, encoding="utf-8")
    tmp.replace(path)
    return path
