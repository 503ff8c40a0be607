"""`saliencylab evaluate`: arguments and errors; the work is `saliencylab.runs.files.evaluate_files`."""

from __future__ import annotations

from .. import methods as _methods
from .. import metrics as _metrics
from .. import presets as _presets
from ..core.errors import ConfigError, SaliencyLabError
from ._common import Fail, error, message, setup

DEFAULT_METRICS = "deletion,insertion,sparseness"


def add_parser(sub) -> None:
    p = sub.add_parser(
        "evaluate", help="score explanations with faithfulness, sanity, localization and complexity metrics",
        description="Explain images with each method and score the maps with each metric; writes a "
                    "method x metric table (mean and 95% bootstrap interval over images), the curves and "
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
    from .report import add_data_options  # --data DIR, --labels, --shard, --workers, --chunk-size

    add_data_options(p)
    p.add_argument("--metric-param", action="append", default=[], metavar="METRIC.KEY=VALUE",
                   help="a metric parameter, e.g. deletion.steps=20 (repeatable)")
    p.add_argument("--boxes", default=None,
                   help="JSON file: one [x0, y0, x1, y1] box per image, in model-input pixels (localization)")
    p.add_argument("--out", required=True)
    p.add_argument("--preset", help=f"cost settings for the methods, one of {', '.join(_presets.names())} (default: each "
                        "method's defaults); --method-param overrides them")
    p.add_argument("--debug", action="store_true")


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
        method_names = [m for m in args.methods.split(",") if m]
        metric_names = [m for m in args.metrics.split(",") if m]
        for m in method_names:
            _methods.get(m)
        for m in metric_names:
            _metrics.get(m)
        method_params = scoped_params(args.method_param, "method", method_names)
        metric_params = scoped_params(args.metric_param, "metric", metric_names)
        check_params(method_params, _methods.parameters, "method")
        check_params(metric_params, _metrics.parameters, "metric")
        if args.data is not None or not args.images or args.labels or args.shard:  # a folder run (--target: label too)
            from .report import evaluate_data

            return evaluate_data(args, method_names, metric_names, method_params, metric_params)
        return evaluate_files(args.images, method_names, metric_names, out=args.out, model=args.model,
                              weights=args.weights, target=args.target, method_params=method_params,
                              metric_params=metric_params, boxes=args.boxes, fail_line=fail,
                              on_record=lambda r: print(f"{r.method} / {r.metric}: {r.mean:.4f} "
                                                        f"[{r.low:.4f}, {r.high:.4f}]", flush=True))
    except SaliencyLabError as exc:
        raise Fail(exc) from None
