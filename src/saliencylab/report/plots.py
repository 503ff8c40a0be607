"""Curve plots for evaluation reports.

Figures are `matplotlib.figure.Figure` objects drawn by `FigureCanvasAgg`, never pyplot: no window
opens, and a notebook's backend (and its list of open figures) is left as the user set it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


def new_figure(**kwargs) -> Figure:
    """A figure with its own Agg canvas, outside pyplot's figure manager."""
    fig = Figure(**kwargs)
    FigureCanvasAgg(fig)
    return fig


def plot_metric_curves(records: Sequence, metric: str, path, title: str | None = None) -> Path | None:
    """Mean curve over images per method (band: +-1 standard error) for a curve metric."""
    chosen = [r for r in records if r.metric == metric and r.curves and "fraction" in r.curves]
    if not chosen:
        return None
    fig = new_figure(figsize=(5.2, 3.6), dpi=110)
    ax = fig.subplots()
    for r in chosen:
        x = np.asarray(r.curves["fraction"], dtype=float)
        keys = [k for k in r.curves if k != "fraction" and np.ndim(r.curves[k]) == 2]
        for key in keys:
            y = np.asarray(r.curves[key], dtype=float)
            mean = y.mean(0)
            sem = y.std(0, ddof=1) / np.sqrt(len(y)) if len(y) > 1 else np.zeros_like(mean)
            label = r.method if len(keys) == 1 else f"{r.method} ({key})"
            line, = ax.plot(x, mean, label=f"{label}: {r.mean:.3f}")
            ax.fill_between(x, mean - sem, mean + sem, color=line.get_color(), alpha=0.15, linewidth=0)
    ax.set_xlabel("fraction of pixels acted on")
    ax.set_ylabel("score of the explained class")
    ax.set_title(title or metric)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, frameon=False)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    return path
