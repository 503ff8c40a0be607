"""Evaluate image files: load the model and images, run methods x metrics into rows, write tables and plots.

What `saliencylab evaluate` does, callable from Python: `evaluate_files(paths, methods, metrics, ...)`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Sequence

import torch

from .. import methods as _methods
from .. import metrics as _metrics
from ..core.errors import InputError


def evaluate_files(paths: Sequence[str], method_names: Sequence[str], metric_names: Sequence[str], *, out,
                   model: str = "efficientnet_lite0", weights: str | None = None, target: str | None = None,
                   method_params: dict | None = None, metric_params: dict | None = None, boxes: str | None = None,
                   fail_line: Callable = lambda path, exc: None, on_record: Callable | None = None) -> int:
    """Returns the exit code (1 if some images failed); `fail_line(path, exc)` reports one image's error."""
    from .. import io
    from ..evaluation import run_evaluation, write_tables
    from ..report.plots import plot_metric_curves
    from .local import check_requirements

    for m in method_names:
        _methods.get(m)
    for m in metric_names:
        _metrics.get(m)
    # before loading anything: a metric that needs boxes (or masks, truth, which files cannot give) fails now
    check_requirements(metric_names, boxes=boxes)
    loaded = io.load_model(model, weights)
    resolved_target = io.resolve_target_arg(target, loaded.labels)

    items, failed = [], False
    for path, stem in zip(paths, io.unique_stems(paths)):
        try:
            items.append(io.prepare_image(path, loaded, stem=stem))
        except Exception as exc:  # noqa: BLE001 - one unreadable image loses only itself
            failed = True
            fail_line(path, exc)
    if not items:
        raise InputError("no readable images")
    if len({tuple(it.tensor.shape) for it in items}) > 1:
        raise InputError("images must preprocess to the same size to be evaluated together")
    x = torch.stack([it.tensor for it in items])
    box_tensor = None
    if boxes:
        try:
            box_tensor = torch.tensor(json.loads(Path(boxes).read_text()), dtype=torch.long)
        except (OSError, ValueError, TypeError) as exc:
            raise InputError(f"cannot read boxes from '{boxes}': {exc}") from None
        if box_tensor.shape != (len(paths), 4):
            raise InputError(f"--boxes must hold one [x0, y0, x1, y1] box per image, got shape {tuple(box_tensor.shape)}")
        keep = [i for i, p in enumerate(paths) if p in {it.path for it in items}]
        box_tensor = box_tensor[keep]

    out = Path(out)
    records = run_evaluation(loaded.model, x, method_names, metric_names, target=resolved_target,
                             method_params=method_params or {}, metric_params=metric_params or {}, boxes=box_tensor,
                             out_dir=out, image_ids=[it.path for it in items], on_record=on_record)
    paths_written = write_tables(records, out)
    for metric in dict.fromkeys(r.metric for r in records):
        plot_metric_curves(records, metric, out / f"curves_{metric}.png")
    print(paths_written["markdown"].read_text(), end="")
    print(paths_written["json"])
    return 1 if failed else 0
