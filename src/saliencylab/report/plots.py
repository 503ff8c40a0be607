"""Curve and ranking plots for evaluation reports.

Figures are `matplotlib.figure.Figure` objects drawn by `FigureCanvasAgg`, never pyplot: no window
opens, and a notebook's backend (and its list of open figures) is left as the user set it.

Built for many methods (the demo's `--full` runs every registered one, 22-29 of them): every method
gets its own (colour, line style) pair, the same in every figure of a report; the legend sits outside
the axes with its entries sorted by score, and figures are sized from the entry count and saved with
a tight bounding box, so no entry is clipped. The ranking chart (mean and 95% interval per method,
best first) is the readable summary when the curves crowd each other.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

__all__ = ["new_figure", "method_styles", "curves_figure", "ranking_figure", "plot_metric_curves",
           "plot_metric_ranking", "save_figure"]

# A qualitative palette, then line styles once its colours run out: (colour, style) pairs never repeat.
PALETTE = "tab10"
LINESTYLES = ["-", "--", ":", "-.", (0, (5, 1, 1, 1, 1, 1)), (0, (1, 1)), (0, (7, 2)), (0, (3, 1, 1, 1))]
BANDS_UP_TO = 4  # +-1 s.e. bands only while they do not turn the panel into mud
DPI = 110


def new_figure(**kwargs) -> Figure:
    """A figure with its own Agg canvas, outside pyplot's figure manager."""
    fig = Figure(**kwargs)
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig: Figure, path) -> Path:
    """Save with a tight bounding box: legends and labels outside the axes are kept whole."""
    path = Path(path)
    fig.savefig(path, bbox_inches="tight", pad_inches=0.08)
    return path


def _linestyle(k: int):
    if k < len(LINESTYLES):
        return LINESTYLES[k]
    return (0, (k - len(LINESTYLES) + 9, 3))  # longer dashes than any listed style: still unique


def method_styles(names: Sequence[str]) -> dict[str, tuple[str, object]]:
    """A (colour as '#rrggbb', matplotlib line style) pair per name, unique, in the order given.

    The first 10 names get the palette's 10 colours with solid lines, the next 10 the same colours
    dashed, and so on; pass every method of a report so a method keeps its style in every figure."""
    colours = colormaps[PALETTE].colors
    styles = {}
    for i, name in enumerate(dict.fromkeys(names)):
        r, g, b = colours[i % len(colours)][:3]
        styles[name] = (f"#{round(r * 255):02x}{round(g * 255):02x}{round(b * 255):02x}",
                        _linestyle(i // len(colours)))
    return styles


def _higher_is_better(records: Sequence, metric: str) -> bool:
    for r in records:
        if r.metric != metric:
            continue
        value = getattr(r, "higher_is_better", None)
        if value is not None:
            return bool(value)
    try:
        from .. import metrics as _metrics

        return bool(_metrics.get(metric).higher_is_better)
    except Exception:  # noqa: BLE001 - a metric unknown here: assume the usual direction
        return True


def _finite(value) -> bool:
    return value is not None and isinstance(value, (int, float, np.floating)) and math.isfinite(value)


def _interval(r) -> tuple[float, float]:
    """The record's 95% bootstrap interval (as in the metrics tables), computed from its scores if absent."""
    low, high = getattr(r, "low", None), getattr(r, "high", None)
    if _finite(low) and _finite(high):
        return float(low), float(high)
    scores = getattr(r, "scores", None)
    if scores is not None and len(scores):
        from ..runs.stats import bootstrap_interval  # the tables' own interval

        _, low, high = bootstrap_interval(scores)
        return float(low), float(high)
    return math.nan, math.nan


def _rank_key(higher: bool):
    def key(mean):
        if not _finite(mean):
            return (1, 0.0)  # NaN means last
        return (0, -mean if higher else mean)
    return key


def _arrow(higher: bool) -> str:
    return "higher is better" if higher else "lower is better"


def _curve_lines(records: Sequence, metric: str) -> list[dict]:
    """One entry per (method, curve key) of `metric`: label, x, mean curve, standard error, score."""
    lines = []
    for r in records:
        if r.metric != metric or not getattr(r, "curves", None) or "fraction" not in r.curves:
            continue
        x = np.asarray(r.curves["fraction"], dtype=float)
        keys = [k for k in r.curves if k != "fraction" and np.ndim(r.curves[k]) == 2]
        for key in keys:
            y = np.asarray(r.curves[key], dtype=float)
            mean = np.nanmean(y, 0)
            sem = np.nanstd(y, 0, ddof=1) / np.sqrt(len(y)) if len(y) > 1 else np.zeros_like(mean)
            label = r.method if len(keys) == 1 else f"{r.method} ({key})"
            lines.append({"label": label, "x": x, "mean": mean, "sem": sem, "score": getattr(r, "mean", math.nan)})
    return lines


def _style_names(records: Sequence) -> list[str]:
    """Labels of every curve of every metric, so styles agree across a report's figures."""
    names = []
    for metric in dict.fromkeys(r.metric for r in records):
        names += [line["label"] for line in _curve_lines(records, metric)]
    names += [r.method for r in records]  # methods without curves still keep a stable colour
    return list(dict.fromkeys(names))


def curves_figure(records: Sequence, metric: str, title: str | None = None) -> Figure | None:
    """Mean curve over images per method for a curve metric, legend outside the axes, best first.

    Each legend entry is 'method: score'; entries are sorted by score (NaN last). The figure grows
    with the number of entries (two legend columns past 36), so it can be saved without clipping
    by `save_figure`. Bands (+-1 standard error over images) are drawn for up to 4 curves."""
    lines = _curve_lines(records, metric)
    if not lines:
        return None
    higher = _higher_is_better(records, metric)
    styles = method_styles(_style_names(records))
    order = sorted(range(len(lines)), key=lambda i: (_rank_key(higher)(lines[i]["score"]), i))
    n = len(lines)
    ncol = 1 if n <= 36 else 2
    rows = math.ceil(n / ncol)
    height = max(3.6, 1.0 + 0.16 * rows)
    fig = new_figure(figsize=(5.0 + 2.3 * ncol, height), dpi=DPI, layout="constrained")
    ax = fig.subplots()
    handles = []
    for i in order:
        line = lines[i]
        colour, style = styles[line["label"]]
        score = f"{line['score']:.3f}" if _finite(line["score"]) else "n/a"
        handle, = ax.plot(line["x"], line["mean"], color=colour, linestyle=style, linewidth=1.5,
                          label=f"{line['label']}: {score}")
        if n <= BANDS_UP_TO:
            ax.fill_between(line["x"], line["mean"] - line["sem"], line["mean"] + line["sem"], color=colour,
                            alpha=0.15, linewidth=0)
        handles.append(handle)
    ax.set_xlabel("fraction of pixels acted on")
    ax.set_ylabel("score of the explained class")
    ax.set_title(title or metric)
    ax.grid(alpha=0.3)
    ax.set_xlim(float(min(line["x"].min() for line in lines)), float(max(line["x"].max() for line in lines)))
    # outside the axes, right of them; constrained layout makes room for it
    fig.legend(handles=handles, loc="outside right upper", ncols=ncol, fontsize=7.5, frameon=False,
               handlelength=3.0, title=f"area ({_arrow(higher)}), best first", title_fontsize=7.5,
               alignment="left")
    return fig


def ranking_figure(records: Sequence, metric: str, title: str | None = None) -> Figure | None:
    """Methods ranked by their mean score on `metric` (best at the top), with 95% bootstrap intervals.

    The intervals are the metrics tables' own (`Record.low` / `Record.high`, else `bootstrap_interval`
    of the scores); the best method's interval is shaded, so methods inside it are not clearly worse.
    Markers share the colours of the curves figure."""
    chosen = [r for r in records if r.metric == metric]
    if not chosen:
        return None
    higher = _higher_is_better(records, metric)
    styles = method_styles(_style_names(records))
    chosen = sorted(chosen, key=lambda r: _rank_key(higher)(getattr(r, "mean", math.nan)))
    n = len(chosen)
    fig = new_figure(figsize=(5.6, 1.1 + 0.22 * n), dpi=DPI, layout="constrained")
    ax = fig.subplots()
    ys = np.arange(n)[::-1]  # best on top
    best = None
    for y, r in zip(ys, chosen):
        mean = getattr(r, "mean", math.nan)
        low, high = _interval(r)
        colour = styles.get(r.method, ("#444444", "-"))[0]
        if _finite(low) and _finite(high):
            if best is None and _finite(mean):
                best = (low, high)
            ax.plot([low, high], [y, y], color=colour, linewidth=2.0, solid_capstyle="butt")
        if _finite(mean):
            ax.plot([mean], [y], "o", color=colour, markersize=5, markeredgecolor="white", markeredgewidth=0.6)
        ax.annotate(f"{mean:.3f}" if _finite(mean) else "n/a", (1.0, y), xycoords=("axes fraction", "data"),
                    xytext=(6, 0), textcoords="offset points", va="center", fontsize=7.5, color="#333333")
    if best is not None and best[1] > best[0]:
        ax.axvspan(best[0], best[1], color="#999999", alpha=0.15, linewidth=0)
    ax.set_yticks(ys, [r.method for r in chosen], fontsize=8)
    ax.set_ylim(-0.7, n - 0.3)
    ax.tick_params(axis="x", labelsize=8)
    ax.grid(axis="x", alpha=0.3)
    images = max((len(getattr(r, "scores", ()) or ()) for r in chosen), default=0)
    ax.set_xlabel(f"{metric} ({_arrow(higher)}): mean and 95% bootstrap interval"
                  + (f" over {images} images" if images else ""), fontsize=8)
    ax.set_title(title or f"{metric}: methods ranked", fontsize=10)
    return fig


def plot_metric_curves(records: Sequence, metric: str, path, title: str | None = None) -> Path | None:
    """Mean curve over images per method (band: +-1 standard error, up to 4 curves) for a curve metric,
    saved to `path` with the legend outside the axes; None when no record of `metric` has curves."""
    fig = curves_figure(records, metric, title=title)
    return None if fig is None else save_figure(fig, path)


def plot_metric_ranking(records: Sequence, metric: str, path, title: str | None = None) -> Path | None:
    """The ranking chart of `ranking_figure` saved to `path`; None when no record is of `metric`."""
    fig = ranking_figure(records, metric, title=title)
    return None if fig is None else save_figure(fig, path)
