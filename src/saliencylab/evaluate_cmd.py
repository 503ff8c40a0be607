"""`saliencylab evaluate`: explain image files with several methods and score them with several metrics."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from . import methods as _methods
from . import metrics as _metrics
from .core.errors import ConfigError, InputError

DEFAULT_METRICS = "deletion,insertion,sparseness"


def add_parser(sub) -> None:
    p = sub.add_parser(
        "evaluate", help="score explanations with faithfulness, sanity, localization and complexity metrics",
        description="Explain images with each method and score the maps with each metric; writes a "
                    "method x metric table (mean and 95%% bootstrap interval over images), the curves and "
                    "their plots. Every score is a row of rows.jsonl (image, model, method and metric settings, "
                    "target), written as it is computed; a rerun computes only the missing rows.")
    p.add_argument("images", nargs="+", metavar="IMAGE")
    p.add_argument("--methods", default="gradient,integrated_gradients,gradcam",
                   help="comma-separated method names (default: %(default)s)")
    p.add_argument("--metrics", default=DEFAULT_METRICS, help="comma-separated metric names (default: %(default)s)")
    p.add_argument("--model", default="efficientnet_lite0")
    p.add_argument("--weights", default=None)
    p.add_argument("--target", default=None, help="class index for every image (default: predicted class)")
    p.add_argument("--method-param", action="append", default=[], metavar="METHOD.KEY=VALUE",
                   help="a method parameter, e.g. integrated_gradients.steps=16 (repeatable)")
    p.add_argument("--metric-param", action="append", default=[], metavar="METRIC.KEY=VALUE",
                   help="a metric parameter, e.g. deletion.steps=20 (repeatable)")
    p.add_argument("--boxes", default=None,
                   help="JSON file: one [x0, y0, x1, y1] box per image, in model-input pixels (localization)")
    p.add_argument("--out", required=True)
    p.add_argument("--debug", action="store_true")


def _scoped_params(items, kind: str, known_names) -> dict[str, dict]:
    from .io import parse_param

    out: dict[str, dict] = {}
    for text in items:
        key, value = parse_param(text)
        name, dot, param = key.partition(".")
        if not dot or not param:
            raise ConfigError(f"--{kind}-param expects {kind.upper()}.KEY=VALUE, got {text!r}")
        if name not in known_names:
            raise ConfigError(f"--{kind}-param names '{name}', which is not among the chosen {kind}s")
        out.setdefault(name, {})[param] = value
    return out


def _check_params(scoped: dict, parameters, kind: str) -> None:
    for name, params in scoped.items():
        known = parameters(name)
        unknown = [k for k in params if k not in known]
        if unknown:
            raise ConfigError(f"unknown parameter {', '.join(map(repr, unknown))} for {kind} '{name}'; "
                              f"its parameters are: {', '.join(known)}")


def cmd_evaluate(args, fail_line) -> int:
    """Returns the exit code; `fail_line(path, exc)` reports one image's error."""
    from . import io
    from .evaluation import run_evaluation, write_tables
    from .report.plots import plot_metric_curves
    from .runs.local import check_requirements

    method_names = [m for m in args.methods.split(",") if m]
    metric_names = [m for m in args.metrics.split(",") if m]
    for m in method_names:
        _methods.get(m)
    for m in metric_names:
        _metrics.get(m)
    method_params = _scoped_params(args.method_param, "method", method_names)
    metric_params = _scoped_params(args.metric_param, "metric", metric_names)
    _check_params(method_params, _methods.parameters, "method")
    _check_params(metric_params, _metrics.parameters, "metric")
    # before loading anything: a metric that needs boxes (or masks, truth, which evaluate cannot take) fails now
    check_requirements(metric_names, boxes=args.boxes)
    loaded = io.load_model(args.model, args.weights)
    target = io.resolve_target_arg(args.target, loaded.labels)

    items, failed = [], False
    for path, stem in zip(args.images, io.unique_stems(args.images)):
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
    boxes = None
    if args.boxes:
        try:
            boxes = torch.tensor(json.loads(Path(args.boxes).read_text()), dtype=torch.long)
        except (OSError, ValueError, TypeError) as exc:
            raise InputError(f"cannot read boxes from '{args.boxes}': {exc}") from None
        if boxes.shape != (len(args.images), 4):
            raise InputError(f"--boxes must hold one [x0, y0, x1, y1] box per image, got shape {tuple(boxes.shape)}")
        keep = [i for i, p in enumerate(args.images) if p in {it.path for it in items}]
        boxes = boxes[keep]

    out = Path(args.out)
    records = run_evaluation(loaded.model, x, method_names, metric_names, target=target,
                             method_params=method_params, metric_params=metric_params, boxes=boxes,
                             out_dir=out, image_ids=[it.path for it in items],
                             on_record=lambda r: print(f"{r.method} / {r.metric}: {r.mean:.4f} "
                                                       f"[{r.low:.4f}, {r.high:.4f}]", flush=True))
    paths = write_tables(records, out)
    for metric in dict.fromkeys(r.metric for r in records):
        plot_metric_curves(records, metric, out / f"curves_{metric}.png")
    print(paths["markdown"].read_text(), end="")
    print(paths["json"])
    return 1 if failed else 0
