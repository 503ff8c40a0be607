"""`saliencylab guide`: arguments and errors; the work is `saliencylab.training.loop.fit`.

Also the argument groups and data/model loading that `saliencylab distill` shares (`add_data_arguments`,
`add_run_arguments`, `load_data`, `build_model`, `run_fit`).
"""

from __future__ import annotations

import shlex
import sys

from ..core.errors import ConfigError, SaliencyLabError
from ._common import Fail, message

DEFAULT_MODEL = "saliencylab.training.nets:small_cnn"
CAM_METHODS = ("gradcam", "gradcam_plus_plus", "layercam")


def add_data_arguments(p) -> None:
    g = p.add_argument_group("data: the shortcut environment (default) or a folder of images with a boxes file")
    g.add_argument("--env", choices=["shortcut"], default=None,
                   help="the generated Waterbirds-style environment (saliencylab.envs.shortcut)")
    g.add_argument("--bias", type=float, default=0.95,
                   help="probability that the background matches the class in training (default: %(default)s)")
    g.add_argument("--size", type=int, default=None,
                   help="image side in pixels (shortcut: default 48; a folder: resize every image to it)")
    g.add_argument("--n", type=int, default=512, help="training images of the environment (default: %(default)s)")
    g.add_argument("--n-eval", type=int, default=None, help="evaluation images of the environment (default: n / 2)")
    g.add_argument("--eval-split", choices=["test", "val"], default="test",
                   help="environment split evaluated each epoch: test is balanced over the (class, background) "
                        "groups, val is biased like train (default: %(default)s)")
    g.add_argument("--box-fraction", type=float, default=1.0,
                   help="share of training images whose box the guidance may use (default: %(default)s)")
    g.add_argument("--data", default=None, metavar="DIR", help="a folder of training images")
    g.add_argument("--boxes", default=None, metavar="FILE",
                   help="its boxes file: CSV file,label,x0,y0,x1,y1 or JSON (default: DIR/boxes.csv or boxes.json)")
    g.add_argument("--val-data", default=None, metavar="DIR", help="a folder of evaluation images (default: hold "
                   "out --val-fraction of --data)")
    g.add_argument("--val-boxes", default=None, metavar="FILE", help="the boxes file of --val-data")
    g.add_argument("--val-fraction", type=float, default=0.2, help="share of --data held out (default: %(default)s)")


def add_run_arguments(p, epochs: int = 10) -> None:
    g = p.add_argument_group("training")
    g.add_argument("--model", default=DEFAULT_MODEL, metavar="MODULE:FACTORY",
                   help="the model to train, a factory called with num_classes= (default: %(default)s)")
    g.add_argument("--width", type=int, default=16, help="channels of the default small CNN (default: %(default)s)")
    g.add_argument("--epochs", type=int, default=epochs, help="(default: %(default)s)")
    g.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (default: %(default)s)")
    g.add_argument("--batch-size", type=int, default=32, help="(default: %(default)s)")
    g.add_argument("--seed", type=int, default=0, help="data, initial weights and shuffling (default: %(default)s)")
    g.add_argument("--out", required=True, metavar="DIR",
                   help="checkpoints, metrics.csv, metrics.json, model.pt and report.html")
    g.add_argument("--resume", action=argparse_bool(), default=True,
                   help="continue the run in --out from its last checkpoint (default); --no-resume starts over")
    g.add_argument("--keep-checkpoints", type=int, default=None, metavar="K",
                   help="keep only the newest K epoch checkpoints (default: all)")
    g.add_argument("--eval-method", default=None, help="method of the evaluated maps (default: the training one)")
    g.add_argument("--examples", type=int, default=6, help="example images in the report (default: %(default)s)")
    g.add_argument("--debug", action="store_true", help="raise unexpected errors with their traceback")


def argparse_bool():
    import argparse

    return argparse.BooleanOptionalAction


def add_parser(sub) -> None:
    p = sub.add_parser(
        "guide", help="train a model with a guidance loss on its explanations (model guidance)",
        description="Train with cross-entropy + weight x a guidance loss that pulls each image's explanation "
                    "into its box (Rao et al., ICCV 2023), on the shortcut environment or on your images. "
                    "Writes a checkpoint and a metrics row (accuracy, worst-group accuracy, EPG, IoU) per "
                    "epoch, and an HTML report; rerunning the command resumes an interrupted run.")
    add_data_arguments(p)
    g = p.add_argument_group("guidance")
    g.add_argument("--loss", default="energy", help="energy, l1, rrr or ppce (default: %(default)s)")
    g.add_argument("--method", default="input_x_gradient",
                   help="explanation the loss acts on: input_x_gradient, gradcam, integrated_gradients, bcos, "
                        "... (default: %(default)s)")
    g.add_argument("--layer", default=None, help="layer of a CAM method (default small CNN: features)")
    g.add_argument("--weight", type=float, default=1e-2,
                   help="lambda, the guidance loss's weight; the loss is summed over a batch's images "
                        "(default: %(default)s)")
    g.add_argument("--method-param", action="append", default=[], metavar="KEY=VALUE",
                   help="a parameter of the guidance method, e.g. steps=8 for integrated_gradients (repeatable)")
    g.add_argument("--start", type=int, default=0,
                   help="epochs trained without guidance first, then fine-tuned with it (default: %(default)s)")
    add_run_arguments(p)


def method_params(method: str, items) -> dict:
    """--method-param KEY=VALUE strings as a dict, checked against the method's parameters."""
    from .. import methods as _methods
    from ..io import parse_param

    params = dict(parse_param(text) for text in items)
    known = _methods.parameters(method)
    unknown = [k for k in params if k not in known]
    if unknown:
        raise ConfigError(f"unknown parameter {', '.join(map(repr, unknown))} for method '{method}'; "
                          f"its parameters are: {', '.join(known)}")
    return params


def load_data(args):
    """(train, eval) data from --env / --data: the library's loaders."""
    from ..training import loop

    if args.data is not None and args.env is not None:
        raise ConfigError("give --env shortcut or --data DIR, not both")
    for name in ("n", "batch_size", "epochs"):
        value = getattr(args, name, None)
        if value is not None and value < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    if args.size is not None and args.size < 8:
        raise ConfigError(f"--size must be at least 8 pixels, got {args.size}")
    if args.data is None:
        if args.boxes or args.val_data:
            raise ConfigError("--boxes and --val-data go with --data DIR")
        return loop.shortcut_splits(n=args.n, size=args.size or 48, bias=args.bias, seed=args.seed,
                                    eval_split=args.eval_split, n_eval=args.n_eval, box_fraction=args.box_fraction)
    train = loop.load_folder(args.data, args.boxes, size=args.size)
    if args.val_data is not None:
        return train, loop.load_folder(args.val_data, args.val_boxes, size=args.size)
    return loop.split_data(train, args.val_fraction, seed=args.seed)


def build_model(spec: str, num_classes: int, args):
    """The model to train and the facts that let `load_model_file` rebuild it."""
    from ..training import loop
    from ..training.nets import small_cnn

    if spec == DEFAULT_MODEL:
        kwargs = {"width": args.width}
        model = small_cnn(num_classes=num_classes, width=args.width, seed=args.seed)
    else:
        kwargs = {}
        model = loop.model_from_spec(spec, num_classes)
    return model, {"model": spec, "model_kwargs": kwargs}


def default_layer(method: str, spec: str, layer):
    """The default small CNN's CAM layer is `features`; otherwise the method's own default."""
    if layer is None and spec == DEFAULT_MODEL and method in CAM_METHODS:
        return "features"
    return layer


def print_row(event: str, info: dict, epochs: int) -> None:
    if event != "epoch":
        return
    parts = [f"epoch {info['epoch']}/{epochs}"]
    for key, label in (("loss", "loss"), ("accuracy", "accuracy"), ("worst_group_accuracy", "worst-group"),
                       ("epg", "EPG"), ("iou", "IoU")):
        v = info.get(key)
        if isinstance(v, float) and v == v:
            parts.append(f"{label} {v:.3f}")
    print("  ".join(parts), flush=True)


def run_fit(args, model, meta, train, evaluation, **kw) -> int:
    from ..training import loop

    meta = dict(meta, command="saliencylab " + " ".join(shlex.quote(a) for a in getattr(args, "argv", []) or []))
    try:
        result = loop.fit(model, train, evaluation, epochs=args.epochs, lr=args.lr, batch_size=args.batch_size,
                          out_dir=args.out, resume=args.resume, seed=args.seed, eval_method=args.eval_method,
                          examples=args.examples, meta=meta, keep_checkpoints=args.keep_checkpoints,
                          callback=lambda e, info: print_row(e, info, args.epochs), **kw)
    except KeyboardInterrupt:
        print(f"interrupted: rerun the same command to resume from the last checkpoint in {args.out}",
              file=sys.stderr, flush=True)
        raise
    if result.resumed_from is not None:
        print(f"resumed after epoch {result.resumed_from}", flush=True)
    print(f"report: {result.report}", flush=True)
    return 0


def fail(args, exc) -> Fail:
    if isinstance(exc, SaliencyLabError):
        return Fail(exc)
    if args.debug:
        raise exc
    return Fail(message(exc))


def run(args) -> int:
    from ..training import loop

    try:
        guidance = loop.check_guidance({"loss": args.loss, "method": args.method, "weight": args.weight,
                                        "start": args.start, "params": method_params(args.method, args.method_param),
                                        "layer": default_layer(args.method, args.model, args.layer)})
        train, evaluation = load_data(args)
        model, meta = build_model(args.model, train.num_classes, args)
        return run_fit(args, model, meta, train, evaluation, guidance=guidance)
    except KeyboardInterrupt:
        raise
    except Fail:
        raise
    except Exception as exc:  # noqa: BLE001 - one error line (the traceback with --debug)
        raise fail(args, exc) from None
