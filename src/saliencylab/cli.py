"""The `saliencylab` command: list methods, explain image files, build the demo page.

Exit codes: 0 all good; 1 some images (or demo methods) failed, the rest have results;
2 bad arguments (unknown method, parameter, layer or model), nothing was processed.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import shlex
import sys
import time
import warnings
from pathlib import Path

import torch

from . import __version__
from . import bench as bench_cmd
from . import evaluate_cmd
from . import methods as _methods
from . import metrics as _metrics
from .core.progress import progress
from .core.errors import SaliencyLabError

# Cost knobs that the demo lowers for any method that has them (and a higher default).
_DEMO_KNOBS = ("steps", "samples", "n_samples", "n_steps", "num_samples", "masks", "n_masks", "num_masks")
_DEMO_FULL, _DEMO_QUICK = 16, 4
# Per-method demo settings on top of the knobs above. "full" keeps the page meaningful at a bounded cost;
# "quick" is a smoke run (maps are rough). Methods not listed use their defaults, knobs lowered.
_IBA_QUICK = {"steps": 2, "samples": 2}
DEMO_PARAMS: dict[str, dict[str, dict]] = {
    "occlusion": {"full": {"window": 32, "stride": 16}, "quick": {"window": 56, "stride": 56}},
    "rise": {"full": {"masks": 500}, "quick": {"masks": 8}},
    "iba": {"quick": _IBA_QUICK},
    "inverse_iba": {"quick": _IBA_QUICK},
    "multilayer_iba": {"quick": {"steps": 2, "samples": 1}},
    "input_iba": {
        "full": {"steps": 20, "samples": 5, "gan_epochs": 2, "gan_size": 32, "gan_subset": 8, "gan_batch": 16},
        "quick": {"feature_steps": 1, "steps": 2, "samples": 1, "gan_epochs": 1, "gan_size": 4, "gan_subset": 4,
                  "gan_batch": 4, "critic_iter": 1},
    },
    "readout_iba": {"quick": {"epochs": 1}},
    "igos": {"full": {"steps": 8, "iterations": 10}, "quick": {"steps": 2, "iterations": 2}},
    "igos_plus_plus": {"full": {"steps": 8, "iterations": 5}, "quick": {"steps": 2, "iterations": 1}},
    "extremal_perturbation": {"full": {"steps": 200}, "quick": {"steps": 4}},
    "structured_attention_graph": {
        "full": {"steps": 8},
        "quick": {"steps": 2, "iterations": 1, "beam_width": 1, "candidates": 3, "max_patches": 2, "roots": 1,
                  "depth": 1},
    },
}


class _Fail(Exception):
    """A whole-command error: print one line and exit 2."""


def _one_line(text) -> str:
    return " ".join(str(text).split()) or "(no message)"


def _message(exc: BaseException) -> str:
    if isinstance(exc, SaliencyLabError):
        return _one_line(exc)
    return _one_line(f"unexpected {type(exc).__name__}: {exc}")


def _error(*parts) -> None:
    print("error: " + ": ".join(_one_line(p) for p in parts), file=sys.stderr, flush=True)


# -- parser ---------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="saliencylab", description="Explain PyTorch vision models with saliency maps.")
    parser.add_argument("--version", action="version", version=f"saliencylab {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    sub.add_parser("methods", help="list the attribution methods", description="List the attribution methods.")

    ex = sub.add_parser(
        "explain", help="explain image files",
        description="Explain image files; writes OUT/<stem>.<method>.png (overlay), .npy (raw map) and "
                    ".json (target, probability, parameters, cost) per image.")
    ex.add_argument("images", nargs="+", metavar="IMAGE", help="image files")
    ex.add_argument("--method", "-m", required=True, help="method name (see `saliencylab methods`)")
    ex.add_argument("--model", default="efficientnet_lite0",
                    help="embedded model name, package.module:factory, or a TorchScript file "
                         "(default: efficientnet_lite0)")
    ex.add_argument("--weights", help="state-dict file loaded into the model")
    ex.add_argument("--target", help="class index or a unique part of a class name (default: predicted class)")
    ex.add_argument("--param", "-p", action="append", default=[], metavar="KEY=VALUE",
                    help="method parameter, repeatable; values are Python literals or strings")
    ex.add_argument("--batch-size", type=int, default=8, help="images explained together (default 8)")
    ex.add_argument("--out", "-o", required=True, help="output folder")
    ex.add_argument("--size", type=int, help="input size for user models (default 224, resized from 256)")
    ex.add_argument("--mean", help="normalization mean for user models, e.g. 0.485,0.456,0.406")
    ex.add_argument("--std", help="normalization std for user models, e.g. 0.229,0.224,0.225")
    ex.add_argument("--labels", help="class names file, one per line (user models default to 'class N')")
    ex.add_argument("--debug", action="store_true", help="show tracebacks of unexpected errors")

    demo = sub.add_parser(
        "demo", help="explain the bundled photos with every method and write an HTML page",
        description="Explain the bundled sample photos with every method; writes overlays and index.html.")
    demo.add_argument("--out", "-o", default="demo-out", help="output folder (default ./demo-out)")
    demo.add_argument("--quick", action="store_true", help="cheap settings (few steps/samples): a fast smoke run")
    demo.add_argument("--methods", help="comma-separated method names (default: all)")
    demo.add_argument("--metrics", default="deletion,insertion",
                      help="metrics scored on every method's maps, I-GOS protocol (default deletion,insertion; "
                           "'' for none)")
    demo.add_argument("--debug", action="store_true", help="show tracebacks of unexpected errors")

    evaluate_cmd.add_parser(sub)
    bench_cmd.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, usage errors: return instead of exiting
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    if args.command is None:
        parser.print_help()
        return 2
    args.argv = argv
    handler = {"methods": cmd_methods, "explain": cmd_explain, "demo": cmd_demo, "evaluate": cmd_evaluate,
               "bench": cmd_bench}[args.command]
    with warnings.catch_warnings():
        warnings.simplefilter("default")  # each distinct warning once
        warnings.showwarning = _show_warning
        try:
            return handler(args)
        except _Fail as exc:
            _error(exc)
            return 2
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return 130


def _show_warning(message, category, filename, lineno, file=None, line=None):
    print(f"warning: {_one_line(message)}", file=sys.stderr, flush=True)


# -- methods --------------------------------------------------------------------------------------
def cmd_methods(args) -> int:
    described = _methods.describe()
    width = max((len(n) for n in described), default=0)
    for name, text in described.items():
        print(f"{name:<{width}}  {text}")
    return 0


# -- explain --------------------------------------------------------------------------------------
def _setup(fn, *a, debug=False, **kw):
    """Run a setup step; any failure is a whole-command error (exit 2)."""
    try:
        return fn(*a, **kw)
    except SaliencyLabError as exc:
        raise _Fail(exc) from None
    except Exception as exc:  # noqa: BLE001
        if debug:
            raise
        raise _Fail(_message(exc)) from None


def cmd_explain(args) -> int:
    from . import io

    if args.batch_size < 1:
        raise _Fail(f"--batch-size must be at least 1, got {args.batch_size}")
    # Method and parameter names first: they need no model, so mistakes fail fast.
    cls = _setup(_methods.get, args.method)
    params = dict(_setup(io.parse_param, p) for p in args.param)
    known = _methods.parameters(cls.name)
    unknown = [k for k in params if k not in known]
    if unknown:
        raise _Fail(f"unknown parameter{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))} "
                    f"for method '{cls.name}'; its parameters are: {', '.join(known) or '(none)'}")

    loaded = _setup(io.load_model, args.model, args.weights, size=args.size, mean=args.mean, std=args.std,
                    labels=args.labels, debug=args.debug)
    model = loaded.model
    if isinstance(params.get("layer"), str):
        from .core.layers import get_layer

        _setup(get_layer, model, params["layer"])
    method = _setup(_methods.build, cls.name, model, debug=args.debug, **params)
    target = _setup(io.resolve_target_arg, args.target, loaded.labels)
    out_dir = Path(args.out)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise _Fail(f"cannot create output folder '{out_dir}': {exc.strerror or exc}") from None

    failed = False

    def fail(path, exc):
        nonlocal failed
        failed = True
        if args.debug and not isinstance(exc, SaliencyLabError):
            raise exc
        _error(path, _message(exc))

    # 1. read and preprocess every image on its own, so one unreadable file loses only itself.
    items = []
    for path, stem in zip(args.images, io.unique_stems(args.images)):
        try:
            items.append(io.prepare_image(path, loaded, stem=stem))
        except Exception as exc:  # noqa: BLE001
            fail(path, exc)

    # 2. explain the readable ones in batches (image by image only if a batch fails).
    with progress(None, desc=f"explain {cls.name}", total=len(items), unit="image") as bar:
        for start in range(0, len(items), args.batch_size):
            chunk = items[start : start + args.batch_size]
            if len({tuple(it.tensor.shape) for it in chunk}) > 1:  # cannot stack: one at a time
                results = [r for it in chunk for r in io.explain_images(model, method, it.tensor[None], target)]
            else:
                results = io.explain_images(model, method, torch.stack([it.tensor for it in chunk]), target)
            for item, result in zip(chunk, results):
                if isinstance(result, Exception):
                    fail(item.path, result)
                    continue
                try:
                    paths = io.write_result(out_dir, item, result, loaded, model_name=args.model)
                except Exception as exc:  # noqa: BLE001
                    fail(item.path, exc)
                    continue
                label = io.label_of(loaded.labels, result.target) if result.target is not None else "-"
                prob = f"{result.probability:.3f}" if result.probability is not None else "-"
                bar.write(f"{item.path}: {label} ({result.target}, p={prob}) -> {paths['png']}", file=sys.stdout)
            bar.update(len(chunk))
    return 1 if failed else 0


# -- evaluate -------------------------------------------------------------------------------------
def cmd_evaluate(args) -> int:
    def fail(path, exc):
        if args.debug and not isinstance(exc, SaliencyLabError):
            raise exc
        _error(path, _message(exc))

    try:
        return evaluate_cmd.cmd_evaluate(args, fail)
    except SaliencyLabError as exc:
        raise _Fail(exc) from None


# -- bench ----------------------------------------------------------------------------------------
def cmd_bench(args) -> int:
    try:
        return bench_cmd.cmd_bench(args)
    except SaliencyLabError as exc:
        raise _Fail(exc) from None


# -- demo -----------------------------------------------------------------------------------------
# The demo scores maps with the I-GOS protocol (28x28 ranking, blurred baseline); fewer steps when quick.
DEMO_METRIC_PARAMS = {"full": {"protocol": "igos", "steps": 25}, "quick": {"protocol": "igos", "steps": 2}}


def demo_params(name: str, quick: bool = False) -> dict:
    """Demo settings for a method: its cost knobs lowered, plus any per-method entry in DEMO_PARAMS."""
    cap = _DEMO_QUICK if quick else _DEMO_FULL
    known = _methods.parameters(name)
    params = {}
    for key, default in known.items():
        if key in _DEMO_KNOBS and isinstance(default, int) and not isinstance(default, bool) and default > cap:
            params[key] = cap
    extra = DEMO_PARAMS.get(name, {}).get("quick" if quick else "full", {})
    params.update({k: v for k, v in extra.items() if k in known})
    return params


def cmd_demo(args) -> int:
    from . import images, io, models
    from .api import explain
    from .evaluation import markdown_table, score_explanation
    from .report import DemoCell, DemoMethod, DemoRow, MetricsTable, overlay, save_png, write_demo_page
    from .report.plots import plot_metric_curves

    names = [n.strip() for n in args.methods.split(",") if n.strip()] if args.methods else _methods.available()
    if not names:
        raise _Fail("--methods names no method")
    names = [_setup(_methods.get, n).name for n in names]
    out_dir = Path(args.out)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise _Fail(f"cannot create output folder '{out_dir}': {exc.strerror or exc}") from None

    loaded = _setup(models.load, "efficientnet_lite0", debug=args.debug)
    photos = images.samples()
    items = [_setup(io.prepare_image, p.path, loaded, stem=name) for name, p in photos.items()]
    x = torch.stack([it.tensor for it in items])
    with torch.no_grad():
        probs = loaded.model(x).softmax(dim=1)
    rows = []
    for item, p, photo in zip(items, probs, photos.values()):
        k = int(p.argmax())
        save_png(out_dir / f"{item.stem}.png", item.photo)
        if photo.expected:
            note = "expected: " + ", ".join(io.label_of(loaded.labels, i) for i in photo.expected)
        else:
            note = "ImageNet has no class for this photo"
        rows.append(DemoRow(item.stem, io.label_of(loaded.labels, k), float(p[k]), f"{item.stem}.png", note=note))

    metric_names = [m.strip() for m in (args.metrics or "").split(",") if m.strip()]
    metric_names = [_setup(_metrics.get, m).name for m in metric_names]
    metric_params = DEMO_METRIC_PARAMS["quick" if args.quick else "full"]
    records = []
    columns, failed = [], False
    for name in progress(names, desc="demo", unit="method"):
        params = demo_params(name, args.quick)
        column = DemoMethod(name, _methods.get(name).description, params=params, images=len(items))
        columns.append(column)
        try:
            method = _methods.build(name, loaded.model, **params)
            t0 = time.perf_counter()
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                expl = explain(loaded.model, x, method)
            column.seconds_per_image = (time.perf_counter() - t0) / len(items)
            column.cost = expl.cost.as_dict()
            maps = expl.maps
            column.note = " ".join(dict.fromkeys(_one_line(w.message) for w in caught))
            for item, row, m in zip(items, rows, maps):
                file = f"{item.stem}.{name}.png"
                save_png(out_dir / file, overlay(item.photo, m.cpu()))
                row.cells[name] = DemoCell(image=file, title=f"{row.name} / {name} ({row.label})")
            for metric in metric_names:
                params = {k: v for k, v in metric_params.items() if k in _metrics.parameters(metric)}
                record = score_explanation(loaded.model, x, expl, name, metric, params)
                if record is not None:  # None: the metric needs boxes/masks or ground truth
                    records.append(record)
        except Exception as exc:  # noqa: BLE001 - a failing method becomes an error cell
            if args.debug and not isinstance(exc, SaliencyLabError):
                raise
            failed = True
            _error(name, _message(exc))
            for row in rows:
                row.cells[name] = DemoCell(error=_message(exc))

    meta = {
        "title": "saliencylab demo" + (" (quick)" if args.quick else ""),
        "model": loaded.name,
        "versions": {"saliencylab": __version__, "torch": torch.__version__, "python": platform.python_version()},
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": shlex.join(["saliencylab", *args.argv]),
        "notes": ["Photos: " + " ".join(p.credit for p in photos.values())],
    }
    tables = []
    if records:
        (out_dir / "metrics.md").write_text(markdown_table(records))
        figures = [str(path.relative_to(out_dir)) for metric in metric_names
                   if (path := plot_metric_curves(records, metric, out_dir / f"curves_{metric}.png"))]
        tables.append(MetricsTable.from_records(
            records, title="Faithfulness of each method's maps",
            note=f"Mean over the {len(items)} photos, 95% bootstrap interval in brackets; I-GOS protocol "
                 f"(28x28 ranking, blurred baseline, {metric_params['steps']} steps). Best mean in bold; "
                 "with this few images, overlapping intervals mean no reliable difference.",
            figures=figures))
        meta["notes"].append(f"Metric tables: {out_dir / 'metrics.md'}")
    index = write_demo_page(out_dir, rows, columns, meta, tables=tables)
    print(index.resolve())
    return 1 if failed else 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
