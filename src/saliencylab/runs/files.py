"""Evaluate image files: load the model and images, run methods x metrics into rows, write tables and plots.

What `saliencylab evaluate` does, callable from Python: `evaluate_files(paths, methods, metrics, ...)`.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Callable, Sequence

import torch

from .. import methods as _methods
from .. import metrics as _metrics
from ..core.errors import ConfigError, InputError


def evaluate_files(paths: Sequence[str], method_names: Sequence[str], metric_names: Sequence[str], *, out,
                   model: str = "efficientnet_lite0", weights: str | None = None, target: str | None = None,
                   method_params: dict | None = None, metric_params: dict | None = None, boxes=None, masks=None,
                   data=None, background=None, max_pixels: int | None = None,
                   fail_line: Callable = lambda path, exc: None, on_record: Callable | None = None,
                   on_note: Callable = lambda text: None, on_warning: Callable = warnings.warn) -> int:
    """Returns the exit code (1 if some images failed); `fail_line(path, exc)` reports one image's error.

    `paths`: image files or folders (see `io.image_files`). `boxes`: a JSON file (one entry per image, a
    box or a list of boxes, or an object keyed by image path, file name or stem) or the parsed value;
    `masks`: a .npy file (N, H, W) or an array. `data`: a folder of images for the methods that take
    `data=` (default for the embedded model: the bundled crops, `io.method_data`). `background` and
    `max_pixels`: how images are read (`io.read_image`). `on_note` / `on_warning` get one line each.
    """
    from .. import io
    from ..evaluation import run_evaluation, write_tables
    from ..report.plots import plot_metric_curves, plot_metric_ranking
    from .local import check_requirements

    background = io.DEFAULT_BACKGROUND if background is None else background
    max_pixels = io.DEFAULT_MAX_PIXELS if max_pixels is None else max_pixels
    for m in method_names:
        _methods.get(m)
    for m in metric_names:
        _metrics.get(m)
    # before loading anything: a metric that needs boxes (or masks, truth, which files cannot give) fails now
    check_requirements(metric_names, boxes=boxes, masks=masks)
    io.parse_background(background)
    files, problems = io.image_files(paths)
    if not files:
        raise InputError("; ".join(m for _, m in problems) or "no image files given")
    loaded = io.load_model(model, weights)
    resolved_target = io.resolve_target_arg(target, loaded.labels)
    method_params = {k: dict(v) for k, v in (method_params or {}).items()}
    given = [n for n in method_names if "data" in method_params.get(n, {})]
    if data is not None and given:
        raise ConfigError(f"--data and --method-param {given[0]}.data both give feature data; keep one")
    found, note = io.method_data([n for n in method_names if n not in given], loaded, data,
                                 embedded=io.is_embedded(model), background=background, max_pixels=max_pixels)
    for n, d in found.items():
        method_params.setdefault(n, {})["data"] = d
    if note:
        on_note(note)

    items, failed = [], False
    for _folder, problem in problems:
        failed = True
        fail_line(_folder, InputError(problem))
    kept = []  # the index in `files` of each readable image
    for i, (path, stem) in enumerate(zip(files, io.unique_stems(files))):
        try:
            items.append(io.prepare_image(path, loaded, stem=stem, background=background, max_pixels=max_pixels))
            kept.append(i)
        except Exception as exc:  # noqa: BLE001 - one unreadable image loses only itself
            failed = True
            fail_line(path, exc)
    for line in io.input_warnings(items, background, max_pixels):
        on_warning(line)
    if not items:
        raise InputError("no readable images")
    if len({tuple(it.tensor.shape) for it in items}) > 1:
        raise InputError("images must preprocess to the same size to be evaluated together")
    x = torch.stack([it.tensor for it in items])
    region = {}
    if boxes is not None:
        region["boxes"] = _boxes_for(boxes, files, kept)
    if masks is not None:
        region["masks"] = _masks_for(masks, files, kept, tuple(x.shape[-2:]))

    out = Path(out)
    records = run_evaluation(loaded.model, x, method_names, metric_names, target=resolved_target,
                             method_params=method_params, metric_params=metric_params or {}, **region,
                             out_dir=out, image_ids=[it.path for it in items], on_record=on_record)
    paths_written = write_tables(records, out)
    for metric in dict.fromkeys(r.metric for r in records):
        plot_metric_ranking(records, metric, out / f"ranking_{metric}.png")
        plot_metric_curves(records, metric, out / f"curves_{metric}.png")
    print(paths_written["markdown"].read_text(), end="")
    print(paths_written["json"])
    return 1 if failed else 0


def _boxes_for(boxes, files: Sequence[str], kept: Sequence[int]) -> list:
    """The box entry of each readable image (a box or a list of boxes; `metrics.localization` checks them)."""
    source = "--boxes"
    if isinstance(boxes, (str, Path)):
        source = f"boxes file '{boxes}'"
        try:
            boxes = json.loads(Path(boxes).read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise InputError(f"cannot read {source}: {getattr(exc, 'strerror', None) or exc}") from None
    if isinstance(boxes, dict):  # keyed by path, file name or stem
        entries = []
        for path in files:
            p = Path(path)
            key = next((k for k in (path, p.name, p.stem) if k in boxes), None)
            if key is None:
                raise InputError(f"{source} has no entry for image '{path}' (keys are image paths, file names "
                                 "or stems)")
            entries.append(boxes[key])
        boxes = entries
    if isinstance(boxes, torch.Tensor):
        boxes = boxes.tolist()
    if not isinstance(boxes, (list, tuple)) or len(boxes) != len(files):
        n = len(boxes) if isinstance(boxes, (list, tuple)) else type(boxes).__name__
        raise InputError(f"{source} must hold one entry (a box [x0, y0, x1, y1] or a list of boxes) per image: "
                         f"{len(files)} images, got {n}")
    return [boxes[i] for i in kept]


def _masks_for(masks, files: Sequence[str], kept: Sequence[int], hw: tuple) -> torch.Tensor:
    """The (N, H, W) masks of the readable images, read from a .npy file."""
    import numpy as np

    source = "--masks"
    if isinstance(masks, (str, Path)):
        source = f"masks file '{masks}'"
        try:
            masks = np.load(masks, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise InputError(f"cannot read {source} as a .npy array: {getattr(exc, 'strerror', None) or exc}") from None
    t = torch.as_tensor(np.asarray(masks))
    if t.dim() != 3 or t.shape[0] != len(files) or tuple(t.shape[1:]) != hw:
        raise InputError(f"{source} must have shape ({len(files)}, {hw[0]}, {hw[1]}): one mask per image at the "
                         f"model input size, got {tuple(t.shape)}")
    return t[list(kept)]
