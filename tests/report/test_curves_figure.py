"""The curves and ranking figures stay readable with many methods (issue 19, item 1).

Checked with matplotlib's own renderer (`fig.canvas.get_renderer()`, `get_window_extent`): the legend
lies inside the saved (tight) area, right of the axes and clear of the x-axis label, has one entry per
method sorted by score, and no two methods share a (colour, line style) pair.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
from matplotlib.colors import to_hex
from matplotlib.transforms import Bbox
from PIL import Image

from saliencylab.report.plots import (curves_figure, method_styles, plot_metric_curves, plot_metric_ranking,
                                      ranking_figure, save_figure)

N_METHODS = 29


def _records(n=N_METHODS, metric="deletion", higher=False, seed=0):
    rng = np.random.default_rng(seed)
    x = np.linspace(0.0, 1.0, 9)
    records = []
    for i in range(n):
        y = np.clip(np.exp(-rng.uniform(1, 8) * x)[None] + rng.normal(0, 0.03, (4, x.size)), 0, 1)
        scores = y.mean(1)
        lo, hi = float(np.quantile(scores, 0.1)), float(np.quantile(scores, 0.9))
        name = "structured_attention_graph" if i == 7 else f"method_{i:02d}"
        records.append(SimpleNamespace(metric=metric, method=name, mean=float(scores.mean()), low=lo, high=hi,
                                       scores=list(scores), higher_is_better=higher,
                                       curves={"fraction": x, "scores": y}))
    return records


def _overlap(a: Bbox, b: Bbox) -> bool:
    return a.x0 < b.x1 and b.x0 < a.x1 and a.y0 < b.y1 and b.y0 < a.y1


def _contains(outer: Bbox, inner: Bbox, tol: float = 0.5) -> bool:
    return (inner.x0 >= outer.x0 - tol and inner.y0 >= outer.y0 - tol
            and inner.x1 <= outer.x1 + tol and inner.y1 <= outer.y1 + tol)


def test_legend_outside_axes_inside_saved_area(tmp_path):
    records = _records()
    fig = curves_figure(records, "deletion")
    renderer = fig.canvas.get_renderer()
    fig.draw(renderer)  # constrained layout places the legend at draw time
    (ax,) = fig.axes
    (legend,) = fig.legends
    box = legend.get_window_extent(renderer)
    saved = fig.get_tightbbox(renderer).transformed(fig.dpi_scale_trans)  # the bbox_inches="tight" area, pixels
    assert _contains(saved, box)
    assert _contains(fig.bbox, box)  # not even partly outside the canvas
    assert not _overlap(box, ax.bbox)  # outside the plotting area
    assert not _overlap(box, ax.xaxis.label.get_window_extent(renderer))
    assert box.x0 >= ax.bbox.x1  # right of the axes
    # every entry is drawn inside the legend box (none clipped off the figure)
    texts = legend.get_texts()
    assert len(texts) == N_METHODS
    for text in texts:
        assert _contains(saved, text.get_window_extent(renderer))

    # the saved PNG is the tight area: nothing of the legend is cut off
    path = save_figure(fig, tmp_path / "curves.png")
    width, height = Image.open(path).size
    assert width >= box.x1 - saved.x0 - 1 and height >= saved.height - 1


def test_one_entry_per_method_sorted_with_unique_styles():
    records = _records()
    fig = curves_figure(records, "deletion")
    (legend,) = fig.legends
    labels = [t.get_text() for t in legend.get_texts()]
    names = [label.rsplit(":", 1)[0] for label in labels]
    assert sorted(names) == sorted(r.method for r in records)  # each method once
    assert "structured_attention_graph" in names
    # lower is better for deletion: best (smallest area) first
    by_name = {r.method: r.mean for r in records}
    assert [by_name[n] for n in names] == sorted(by_name.values())
    assert float(labels[0].rsplit(":", 1)[1]) == pytest.approx(min(by_name.values()), abs=5e-4)

    lines = fig.axes[0].get_lines()
    assert len(lines) == N_METHODS
    # get_linestyle() says '--' for every custom dash tuple: compare the dash patterns themselves
    pairs = {(to_hex(line.get_color()), repr(line._unscaled_dash_pattern)) for line in lines}
    assert len(pairs) == N_METHODS  # no two curves look alike


def test_each_metric_sorts_in_its_own_direction():
    # a report's records mix metrics: deletion (lower is better) first, then insertion (higher is better)
    records = _records(12, seed=2) + _records(12, metric="insertion", higher=True, seed=3)
    for metric, higher in (("deletion", False), ("insertion", True)):
        labels = [t.get_text() for t in curves_figure(records, metric).legends[0].get_texts()]
        scores = [float(label.rsplit(":", 1)[1]) for label in labels]
        assert scores == sorted(scores, reverse=higher), metric
        ax = ranking_figure(records, metric).axes[0]
        top_down = [t.get_text() for _, t in sorted(zip(ax.get_yticks(), ax.get_yticklabels()),
                                                    key=lambda p: -p[0])]
        by_name = {r.method: r.mean for r in records if r.metric == metric}
        assert [by_name[n] for n in top_down] == sorted(by_name.values(), reverse=higher), metric
        assert ("higher" if higher else "lower") in ax.get_xlabel()


@pytest.mark.parametrize("n", [1, 10, 29, 45])
def test_method_styles_unique(n):
    styles = method_styles([f"m{i}" for i in range(n)])
    assert len(styles) == n and len(set(styles.values())) == n
    # the first ten get distinct colours and solid lines
    first = list(styles.values())[: min(n, 10)]
    assert len({c for c, _ in first}) == len(first) and {s for _, s in first} == {"-"}


def test_styles_agree_across_figures():
    """A method keeps its colour in the deletion curves, the insertion curves and the ranking chart."""
    records = _records(14) + _records(14, metric="insertion", higher=True, seed=1)
    colours = {}
    for metric in ("deletion", "insertion"):
        fig = curves_figure(records, metric)
        for line, text in zip(fig.axes[0].get_lines(), fig.legends[0].get_texts()):
            # legend entries and plotted lines are in the same (sorted) order
            colours.setdefault(text.get_text().rsplit(":", 1)[0], set()).add(to_hex(line.get_color()))
    assert all(len(c) == 1 for c in colours.values())


def test_ranking_chart_ranks_with_intervals(tmp_path):
    records = _records()
    fig = ranking_figure(records, "deletion")
    (ax,) = fig.axes
    labels = [t.get_text() for t in ax.get_yticklabels()]
    ys = list(ax.get_yticks())
    top_down = [label for _, label in sorted(zip(ys, labels), reverse=True)]
    by_name = {r.method: r.mean for r in records}
    assert [by_name[n] for n in top_down] == sorted(by_name.values())  # best at the top
    # one interval segment per method, spanning [low, high] of its record
    segments = [line for line in ax.get_lines() if len(line.get_xdata()) == 2]
    assert len(segments) == N_METHODS
    spans = sorted((float(s.get_xdata()[0]), float(s.get_xdata()[1])) for s in segments)
    assert spans == sorted((r.low, r.high) for r in records)
    renderer = fig.canvas.get_renderer()
    fig.draw(renderer)
    saved = fig.get_tightbbox(renderer).transformed(fig.dpi_scale_trans)
    for text in ax.get_yticklabels():
        assert _contains(saved, text.get_window_extent(renderer))
    assert plot_metric_ranking(records, "deletion", tmp_path / "r.png").is_file()


def test_interval_from_scores_when_record_has_none():
    """Records without low/high (e.g. hand-made) get the tables' bootstrap interval of their scores."""
    from saliencylab.runs.stats import bootstrap_interval

    rec = _records(1)[0]
    rec.low = rec.high = None
    fig = ranking_figure([rec], "deletion")
    (segment,) = [line for line in fig.axes[0].get_lines() if len(line.get_xdata()) == 2]
    _, lo, hi = bootstrap_interval(rec.scores)
    np.testing.assert_allclose(segment.get_xdata(), [lo, hi])


def test_nothing_to_plot(tmp_path):
    assert plot_metric_curves(_records(3), "insertion", tmp_path / "c.png") is None
    assert plot_metric_ranking(_records(3), "insertion", tmp_path / "r.png") is None
    assert not list(tmp_path.iterdir())
