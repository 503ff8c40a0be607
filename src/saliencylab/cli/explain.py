"""`saliencylab explain`: arguments, files and messages; the steps are in `saliencylab.io`."""

from __future__ import annotations

import sys
from pathlib import Path

from .. import methods as _methods
from .. import presets as _presets
from ..core.errors import SaliencyLabError
from ..core.progress import progress
from ._common import (Fail, add_input_options, check_input_options, error, feature_data, make_dir, message, setup,
                      warn)


def add_parser(sub) -> None:
    ex = sub.add_parser(
        "explain", help="explain image files",
        description="Explain image files; writes OUT/<stem>.<method>.png (overlay), .npy (raw map) and "
                    ".json (target, probability, parameters, layer, cost) per image.")
    ex.add_argument("images", nargs="+", metavar="IMAGE",
                    help="image files, or folders (every image file below them, sorted)")
    ex.add_argument("--method", "-m", required=True, help="method name (see `saliencylab methods`)")
    ex.add_argument("--model", default="efficientnet_lite0",
                    help="embedded model name, package.module:factory, or a TorchScript file "
                         "(default: efficientnet_lite0)")
    ex.add_argument("--weights", help="state-dict file loaded into the model")
    ex.add_argument("--target", help="class index or a unique part of a class name (default: predicted class)")
    ex.add_argument("--preset", help=f"cost settings for the method, one of {', '.join(_presets.names())} "
                                     "(default: the method's defaults); --param overrides them")
    ex.add_argument("--param", "-p", action="append", default=[], metavar="KEY=VALUE",
                    help="method parameter, repeatable; values are Python literals or strings")
    ex.add_argument("--batch-size", type=int, default=8, help="images explained together (default 8)")
    ex.add_argument("--out", "-o", required=True, help="output folder")
    ex.add_argument("--size", type=int, help="input size for user models (default 224, resized from 256)")
    ex.add_argument("--mean", help="normalization mean for user models, e.g. 0.485,0.456,0.406")
    ex.add_argument("--std", help="normalization std for user models, e.g. 0.229,0.224,0.225")
    ex.add_argument("--labels", help="class names file, one per line (user models default to 'class N')")
    add_input_options(ex)
    ex.add_argument("--debug", action="store_true", help="show tracebacks of unexpected errors")


def run(args) -> int:
    from .. import io

    if args.batch_size < 1:
        raise Fail(f"--batch-size must be at least 1, got {args.batch_size}")
    # Method, preset and parameter names first: they need no model, so mistakes fail fast.
    cls = setup(_methods.get, args.method)
    params = setup(_presets.params, args.preset, cls.name) if args.preset else {}
    params.update(setup(io.parse_param, p) for p in args.param)
    known = _methods.parameters(cls.name)
    unknown = [k for k in params if k not in known]
    if unknown:
        raise Fail(f"unknown parameter{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))} "
                   f"for method '{cls.name}'; its parameters are: {', '.join(known) or '(none)'}")

    if "data" in params and args.feature_data is not None:
        raise Fail("--feature-data and --param data=... both give the method's feature data; keep one")
    check_input_options(args)
    files, missing = io.image_files(args.images)
    if not files:
        raise Fail("; ".join(m for _, m in missing) or "no image files given")

    loaded = setup(io.load_model, args.model, args.weights, size=args.size, mean=args.mean, std=args.std,
                   labels=args.labels, debug=args.debug)
    model = loaded.model
    if "data" not in params:
        params.update(("data", d) for d in feature_data([cls.name], loaded, args,
                                                        embedded=io.is_embedded(args.model)).values())
    if isinstance(params.get("layer"), str):
        from ..core.layers import get_layer

        setup(get_layer, model, params["layer"])
    method = setup(_methods.build, cls.name, model, debug=args.debug, **params)
    target = setup(io.resolve_target_arg, args.target, loaded.labels)
    out_dir = Path(args.out)
    make_dir(out_dir)

    failed = False

    def fail(path, exc):
        nonlocal failed
        failed = True
        if args.debug and not isinstance(exc, SaliencyLabError):
            raise exc
        error(path, message(exc))

    # 1. read and preprocess every image on its own, so one unreadable file loses only itself.
    for _folder, problem in missing:  # a folder without images fails alone, as an unreadable file does
        failed = True
        error(problem)
    items = []
    for path, stem in zip(files, io.unique_stems(files)):
        try:
            items.append(io.prepare_image(path, loaded, stem=stem, background=args.background,
                                          max_pixels=args.max_pixels))
        except Exception as exc:  # noqa: BLE001
            fail(path, exc)
    for line in io.input_warnings(items, args.background, args.max_pixels):
        warn(line)

    # 2. explain the readable ones in batches (image by image only if a batch fails).
    with progress(None, desc=f"explain {cls.name}", total=len(items), unit="image") as bar:
        for batch in io.explain_prepared(model, method, items, target, args.batch_size):
            for item, result in batch:
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
            bar.update(len(batch))
    return 1 if failed else 0
