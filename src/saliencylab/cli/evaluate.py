"""`saliencylab evaluate`: arguments and errors; the work is `saliencylab.runs.files.evaluate_files`."""

from __future__ import annotations

import sys

from .. import methods as _methods
from .. import metrics as _metrics
from .. import presets as _presets
from ..core.errors import ConfigError, SaliencyLabError
from ._common import Fail, add_input_options, check_input_options, error, message, setup, warn

DEFAULT_METRICS = "deletion,insertion,sparseness"


def add_parser(sub) -> None:
    p = sub.add_parser(
        "evaluate", help="score explanations with faithfulness, sanity, localization and complexity metrics",
        description="Explain images with each method and score the maps with each metric; writes a "
                    "method x metric table (mean and 95% bootstrap interval over images), the curves and "
                    "their plots. Every score is a row of rows.jsonl (image, model, method and metric settings, "
                    "target), written as it is computed; a rerun computes only the missing rows.")
    p.add_argument("images", nargs="+", metavar="IMAGE",
                   help="image files, or folders (every image file below them, sorted)")
    p.add_argument("--methods", default="gradient,integrated_gradients,gradcam",
                   help="comma-separated method names (default: %(default)s)")
    p.add_argument("--metrics", default=DEFAULT_METRICS,
                   help="comma-separated metric names (default: %(default)s); localization metrics ("
                        + ", ".join(_localization_metrics()) + ") need --boxes or --masks")
    p.add_argument("--model", default="efficientnet_lite0",
                   help="embedded model name, package.module:factory, or a TorchScript file (default: %(default)s)")
    p.add_argument("--weights", default=None, help="state-dict file loaded into the model")
    p.add_argument("--target", default=None, help="class index for every image (default: predicted class)")
    p.add_argument("--method-param", action="append", default=[], metavar="METHOD.KEY=VALUE",
                   help="a method parameter, e.g. integrated_gradients.steps=16 (repeatable)")
    from .report import add_data_options  # --data DIR, --labels, --shard, --workers, --chunk-size

    add_data_options(p)
    p.add_argument("--metric-param", action="append", default=[], metavar="METRIC.KEY=VALUE",
                   help="a metric parameter, e.g. deletion.steps=20 (repeatable)")
    p.add_argument("--boxes", default=None, metavar="FILE.json",
                   help="object boxes for the localization metrics, in model-input pixels (x0, y0, x1, y1; x1, y1 "
                        "exclusive): a JSON list with one entry per image (a box or a list of boxes), or an object "
                        "from image path, file name or stem to its box(es)")
    p.add_argument("--masks", default=None, metavar="FILE.npy",
                   help="object masks for the localization metrics: a .npy array (N, H, W) of booleans or 0/1, "
                        "one per image in order, at the model input size")
    p.add_argument("--out", required=True, help="output folder (rows.jsonl, results.json/.csv/.md, curve plots)")
    p.add_argument("--preset", help=f"cost settings for the methods, one of {', '.join(_presets.names())} (default: each "
                        "method's defaults); --method-param overrides them")
    add_input_options(p)
    p.add_argument("--debug", action="store_true", help="show tracebacks of unexpected errors")


def _localization_metrics() -> list[str]:
    return [n for n in _metrics.available() if "boxes_or_masks" in _metrics.requirements(n)]


def check_metric_data(metric_names, boxes, masks) -> None:
    """Before anything runs: one line naming every chosen metric that needs data the command was not given
    (from each metric's `requires` metadata), e.g. localization metrics without --boxes/--masks."""
    need_region = [m for m in metric_names if "boxes_or_masks" in _metrics.requirements(m)]
    need_truth = [m for m in metric_names if "truth" in _metrics.requirements(m)]
    problems = []
    if need_region and boxes is None and masks is None:
        problems.append(f"{', '.join(need_region)} need{'s' if len(need_region) == 1 else ''} the object region: "
                        "pass --boxes FILE.json or --masks FILE.npy")
    if need_region and boxes is not None and masks is not None:
        problems.append("--boxes and --masks both give the object region; keep one")
    if need_truth:
        problems.append(f"{', '.join(need_truth)} need{'s' if len(need_truth) == 1 else ''} ground-truth relevance, "
                        "which image files do not have (see `saliencylab leaderboard --suite groundtruth`)")
    if problems:
        raise Fail("cannot evaluate, nothing was run: metric " + "; metric ".join(problems))


def scoped_params(items, kind: str, known_names) -> dict[str, dict]:
    from ..io import parse_param

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


def check_params(scoped: dict, parameters, kind: str) -> None:
    for name, params in scoped.items():
        known = parameters(name)
        unknown = [k for k in params if k not in known]
        if unknown:
            raise ConfigError(f"unknown parameter {', '.join(map(repr, unknown))} for {kind} '{name}'; "
                              f"its parameters are: {', '.join(known)}")



def preset_method_params(preset: str | None, methods: str) -> list[str]:
    """A preset's settings for the chosen methods, as --method-param strings (given ones come after and win)."""
    if not preset:
        return []
    table = setup(_presets.get, preset)
    names = [setup(_methods.get, n).name for n in methods.split(",") if n]
    return [f"{n}.{k}={v!r}" for n in names for k, v in table.get(n, {}).items()]


def run(args) -> int:
    def fail(path, exc):
        if args.debug and not isinstance(exc, SaliencyLabError):
            raise exc
        error(path, message(exc))

    from ..runs.files import evaluate_files

    args.method_param = preset_method_params(args.preset, args.methods) + list(args.method_param)
    try:
        method_names = [m.strip() for m in args.methods.split(",") if m.strip()]
        metric_names = [m.strip() for m in args.metrics.split(",") if m.strip()]
        if not method_names:
            raise ConfigError("--methods names no method")
        if not metric_names:
            raise ConfigError("--metrics names no metric")
        method_names = [_methods.get(m).name for m in method_names]
        metric_names = [_metrics.get(m).name for m in metric_names]
        check_metric_data(metric_names, args.boxes, args.masks)
        check_input_options(args)
        method_params = scoped_params(args.method_param, "method", method_names)
        metric_params = scoped_params(args.metric_param, "metric", metric_names)
        check_params(method_params, _methods.parameters, "method")
        check_params(metric_params, _metrics.parameters, "metric")
        if args.data is not None or not args.images or args.labels or args.shard:  # a folder run (--target: label too)
            from .report import evaluate_data

            return evaluate_data(args, method_names, metric_names, method_params, metric_params)
        return evaluate_files(args.images, method_names, metric_names, out=args.out, model=args.model,
                              weights=args.weights, target=args.target, method_params=method_params,
                              metric_params=metric_params, boxes=args.boxes, masks=args.masks, data=args.feature_data,
                              background=args.background, max_pixels=args.max_pixels, fail_line=fail,
                              on_note=lambda text: print(f"note: {text}", file=sys.stderr, flush=True),
                              on_warning=warn, on_record=lambda r: print(f"{r.method} / {r.metric}: {r.mean:.4f} "
                                                        f"[{r.low:.4f}, {r.high:.4f}]", flush=True))
    except SaliencyLabError as exc:
        raise Fail(exc) from None
