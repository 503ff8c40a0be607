"""The demo page: a self-contained HTML grid of images x methods."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

from jinja2 import Environment, FileSystemLoader, select_autoescape
from markupsafe import Markup, escape

__all__ = ["DemoCell", "DemoRow", "DemoMethod", "MetricsTable", "write_demo_page", "write_bench_page"]

TEMPLATES = Path(__file__).resolve().parent / "templates"


@dataclass
class DemoCell:
    """One (image, method) result: an overlay PNG path relative to the page, or an error message."""

    image: str | None = None
    error: str | None = None
    title: str = ""


@dataclass
class DemoRow:
    """One photo: its name, the model's prediction, and a cell per method name."""

    name: str
    label: str = ""
    probability: float | None = None
    photo: str | None = None  # the model's input crop, relative to the page
    cells: dict[str, DemoCell] = field(default_factory=dict)
    note: str = ""


@dataclass
class DemoMethod:
    """One column: a method, its description and its time per image (None if it failed)."""

    name: str
    description: str = ""
    seconds_per_image: float | None = None
    params: dict = field(default_factory=dict)
    note: str = ""  # e.g. warnings the method gave, shown under the header
    cost: dict = field(default_factory=dict)  # Cost.as_dict() of the whole column (all images)
    images: int | None = None  # how many images `cost` covers

    @property
    def passes_per_image(self) -> str:
        n = self.images or 0
        if not n or "forward_images" not in self.cost:
            return ""
        fwd, bwd = self.cost["forward_images"] / n, self.cost.get("backward_images", 0) / n
        return f"{fwd:.3g} fwd + {bwd:.3g} bwd passes / image"


@dataclass
class MetricsTable:
    """A method x metric table of means with intervals, for the page; `best` marks the best mean per metric."""

    title: str
    metrics: list[str]
    arrows: dict[str, str]
    rows: list[dict]  # {"method": name, "cells": {metric: {"text", "best", "title"}}}
    note: str = ""
    figures: list[str] = field(default_factory=list)  # image paths relative to the page
    costs: dict = field(default_factory=dict)  # method -> {forward_per_image, backward_per_image, seconds_per_image}
    errors: dict = field(default_factory=dict)  # method -> message, for methods that failed

    @classmethod
    def from_records(cls, records: Sequence, title: str, note: str = "", figures: Sequence[str] = ()):
        """From evaluation Records (method, metric, mean, low, high, higher_is_better)."""
        metrics = list(dict.fromkeys(r.metric for r in records))
        methods = list(dict.fromkeys(r.method for r in records))
        by = {(r.method, r.metric): r for r in records}
        better = {r.metric: r.higher_is_better for r in records}
        best = {}
        for metric in metrics:
            means = [by[m, metric].mean for m in methods if (m, metric) in by and by[m, metric].mean == by[m, metric].mean]
            if means:
                best[metric] = max(means) if better[metric] else min(means)
        rows = []
        for method in methods:
            cells = {}
            for metric in metrics:
                r = by.get((method, metric))
                if r is None:
                    continue
                cells[metric] = {"text": f"{r.mean:.3f}", "interval": f"[{r.low:.3f}, {r.high:.3f}]",
                                 "best": best.get(metric) == r.mean,
                                 "title": f"n = {sum(1 for s in r.scores if s == s)} images"}
            rows.append({"method": method, "cells": cells})
        return cls(title=title, metrics=metrics, arrows={m: "↑" if better[m] else "↓" for m in metrics},
                   rows=rows, note=note, figures=list(figures))


def _as(cls, item):
    if isinstance(item, cls):
        return item
    if isinstance(item, Mapping):
        return cls(**item)
    if cls is DemoMethod and isinstance(item, str):
        return DemoMethod(item)
    raise TypeError(f"expected a {cls.__name__} or a dict, got {type(item).__name__}")


def _environment() -> Environment:
    env = Environment(loader=FileSystemLoader(str(TEMPLATES)), autoescape=select_autoescape(["html", "j2"]),
                      trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True)
    env.filters["relpath"] = lambda p: Path(p).as_posix()
    # long method names in narrow columns break after an underscore, not inside a word
    env.filters["breakable"] = lambda name: escape(name).replace("_", Markup("_<wbr>"))
    return env


def write_demo_page(out_dir: str | os.PathLike, rows: Sequence, methods: Sequence, meta: Mapping,
                    tables: Sequence[MetricsTable] = ()) -> Path:
    """Write `out_dir/index.html` and return its path.

    rows: DemoRow (or dicts with the same fields) in display order; each row's `cells` maps a method
    name to a DemoCell (image path relative to `out_dir`, or an error message).
    methods: DemoMethod (or dicts, or plain names), the columns in display order.
    meta: free-form facts for the header and footer; known keys: title, model, command, date,
    versions (a dict name -> version), notes (a list of strings), layout ("methods": methods as rows,
    "images": images as rows; default: methods as rows when there are more methods than images, so
    the page grows downwards rather than sideways).
    tables: MetricsTable sections shown under the grid (scores with intervals, curve figures).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = [_as(DemoRow, r) for r in rows]
    for row in rows:
        row.cells = {name: _as(DemoCell, cell) for name, cell in row.cells.items()}
    methods = [_as(DemoMethod, m) for m in methods]
    meta = dict(meta)
    html = _environment().get_template("demo.html.j2").render(
        rows=rows, methods=methods, meta=meta, tables=list(tables), title=meta.get("title", "saliencylab demo"))
    path = out_dir / "index.html"
    path.write_text(html, encoding="utf-8")
    return path


def write_bench_page(out_dir: str | os.PathLike, tables: Sequence[MetricsTable], meta: Mapping) -> Path:
    """Write the `saliencylab leaderboard` page `out_dir/index.html` and return its path.

    meta: title, command, seed, seconds, methods, versions."""
    import platform

    import torch

    from .. import __version__

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = dict(meta)
    meta.setdefault("versions", {"saliencylab": __version__, "torch": torch.__version__,
                                 "python": platform.python_version()})
    html = _environment().get_template("bench.html.j2").render(
        tables=list(tables), meta=meta, title=meta.get("title", "saliencylab leaderboard"))
    path = out_dir / "index.html"
    path.write_text(html, encoding="utf-8")
    return path
