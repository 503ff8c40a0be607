"""The demo: explain the bundled photos with a preset's methods, score the maps, write the HTML page.

`saliencylab demo` is a thin wrapper around `run_demo`; scripts can call it directly.
"""

from __future__ import annotations

import datetime
import platform
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch

from .. import __version__
from .. import methods as _methods
from .. import metrics as _metrics
from .. import presets as _presets
from ..core.errors import SaliencyLabError, error_message, one_line
from ..core.progress import progress

__all__ = ["DemoResult", "run_demo", "demo_methods", "demo_photos", "takes_data"]


@dataclass
class DemoResult:
    index: Path  # the page
    errors: dict[str, str] = field(default_factory=dict)  # method -> message, for methods that failed
    records: list = field(default_factory=list)  # evaluation Records of the metrics


def demo_methods(full: bool = False) -> list[str]:
    """The methods the demo runs: a representative handful, or every registered method with `full`."""
    return _methods.available(requires=None) if full else list(_presets.DEMO_METHODS)


def demo_photos(full: bool = False) -> list[str]:
    """The photos the demo explains: those with an ImageNet class, or every bundled photo with `full`."""
    from .. import images

    return images.sample_names() if full else list(_presets.DEMO_PHOTOS)


def takes_data(name: str) -> bool:
    """Whether a method estimates feature statistics or trains on images (`data=`)."""
    return bool(getattr(_methods.get(name), "needs_data", False)) or "data" in _methods.parameters(name)


def run_demo(out_dir, *, methods: Sequence[str] | None = None, preset: str = "demo",
             photos: Sequence[str] | None = None,
             metrics: Sequence[str] = ("deletion", "insertion"), data_size: int = _presets.DEMO_DATA_SIZE,
             command: str = "saliencylab demo", title: str = "saliencylab demo", debug: bool = False,
             on_error: Callable[[str, str], None] | None = None) -> DemoResult:
    """Explain `photos` (bundled sample names; default `presets.DEMO_PHOTOS`) with `methods` (default
    `presets.DEMO_METHODS`) at `preset`'s settings, score every method's maps with `metrics` and write
    `out_dir/index.html` (overlays, a metrics table with intervals, ranking charts and curve plots,
    metrics.md).

    Methods that take `data=` get `features.sample_crops(data_size, seed=0)`, so their feature
    statistics come from crops of the bundled photos rather than from the 3 images being explained.
    A method that fails becomes an error cell: `on_error(method, message)` is called and the page is
    still written (with `debug`, unexpected errors are raised instead).
    """
    from .. import features, images, io, models
    from ..evaluation import markdown_table, score_explanation
    from . import DemoCell, DemoMethod, DemoRow, MetricsTable, overlay, save_png, write_demo_page
    from .plots import plot_metric_curves, plot_metric_ranking

    names = [_methods.get(n).name for n in (methods if methods is not None else _presets.DEMO_METHODS)]
    table = _presets.get(preset)
    metric_names = [_metrics.get(m).name for m in metrics]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    loaded = models.load("efficientnet_lite0")
    chosen = images.samples(list(photos) if photos is not None else list(_presets.DEMO_PHOTOS))
    items = [io.prepare_image(p.path, loaded, stem=name) for name, p in chosen.items()]
    ids = [it.stem for it in items]  # keys of the random draws: a photo's map does not depend on the others
    x = torch.stack([it.tensor for it in items])
    with torch.no_grad():
        probs = loaded.model(x).softmax(dim=1)
    rows = []
    for item, p, photo in zip(items, probs, chosen.values()):
        k = int(p.argmax())
        save_png(out_dir / f"{item.stem}.png", item.photo)
        if photo.expected:
            note = "expected: " + ", ".join(io.label_of(loaded.labels, i) for i in photo.expected)
        else:
            note = "ImageNet has no class for this photo"
        rows.append(DemoRow(item.stem, io.label_of(loaded.labels, k), float(p[k]), f"{item.stem}.png", note=note))

    data = features.sample_crops(data_size, seed=0) if any(takes_data(n) for n in names) else None
    result = DemoResult(index=out_dir / "index.html")
    columns = []
    bar = progress(names, desc="demo", unit="method")
    for name in bar:
        bar.set_description(f"demo: {name}")
        params = dict(table.get(name, {}))
        if data is not None and takes_data(name):
            params["data"] = data
        column = DemoMethod(name, _methods.get(name).description, params=params, images=len(items))
        columns.append(column)
        try:
            method = _methods.build(name, loaded.model, **params)
            t0 = time.perf_counter()
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                expl = method.explain(x, None, image_ids=ids)
            column.seconds_per_image = (time.perf_counter() - t0) / len(items)
            column.cost = expl.cost.as_dict()
            column.note = " ".join(dict.fromkeys(one_line(w.message) for w in caught))
            for item, row, m in zip(items, rows, expl.maps):
                file = f"{item.stem}.{name}.png"
                save_png(out_dir / file, overlay(item.photo, m.cpu()))
                row.cells[name] = DemoCell(image=file, title=f"{row.name} / {name} ({row.label})")
            for metric in metric_names:
                mparams = {k: v for k, v in _presets.metric_params(preset, metric).items()
                           if k in _metrics.parameters(metric)}
                record = score_explanation(loaded.model, x, expl, name, metric, mparams)
                if record is not None:  # None: the metric needs boxes/masks or ground truth
                    result.records.append(record)
        except Exception as exc:  # noqa: BLE001 - a failing method becomes an error cell
            if debug and not isinstance(exc, SaliencyLabError):
                raise
            result.errors[name] = error_message(exc)
            if on_error is not None:
                on_error(name, error_message(exc))
            for row in rows:
                row.cells[name] = DemoCell(error=error_message(exc))
    bar.close()

    meta = {
        "title": title,
        "model": loaded.name,
        "versions": {"saliencylab": __version__, "torch": torch.__version__, "python": platform.python_version()},
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": command,
        "notes": [f"Settings: preset '{preset}' (saliencylab.presets)."
                  + (f" Methods that estimate feature statistics use {data!r}: augmented crops of the bundled "
                     "photos." if data is not None else ""),
                  "Photos: " + " ".join(p.credit for p in chosen.values())],
    }
    tables = []
    if result.records:
        records = result.records
        (out_dir / "metrics.md").write_text(markdown_table(records))
        # per metric: the ranking with intervals (readable with any number of methods), then the curves
        figures = [str(path.relative_to(out_dir)) for metric in metric_names
                   for path in (plot_metric_ranking(records, metric, out_dir / f"ranking_{metric}.png"),
                                plot_metric_curves(records, metric, out_dir / f"curves_{metric}.png"))
                   if path is not None]
        steps = sorted({str(_presets.metric_params(preset, m).get("steps", "default")) for m in metric_names})
        tables.append(MetricsTable.from_records(
            records, title="Faithfulness of each method's maps",
            note=f"Mean over the {len(items)} photos, 95% bootstrap interval in brackets; I-GOS protocol "
                 f"(28x28 ranking upsampled bilinearly, blurred baseline, {'/'.join(steps)} steps). Best mean in bold; "
                 "with this few images, overlapping intervals mean no reliable difference.",
            figures=figures))
        meta["notes"].append(f"Metric tables: {out_dir / 'metrics.md'}")
    result.index = write_demo_page(out_dir, rows, columns, meta, tables=tables)
    return result
