"""`saliencylab distill`: arguments and errors; the work is `saliencylab.training.loop.fit` with `distill=`.

The data, model and run arguments are `saliencylab guide`'s (`cli.guide`).
"""

from __future__ import annotations

from pathlib import Path

from ..core.errors import ConfigError
from . import guide
from ._common import Fail

# The authors' run.sh (m-parchami/GoodTeachersExplain): GtL0.0 (no ground-truth term), TeL1.0, EXP1.0.
DEFAULT_WEIGHTS = "0,1,1"


def add_parser(sub) -> None:
    p = sub.add_parser(
        "distill", help="distil a teacher into a student that also matches the teacher's explanations (e2KD)",
        description="Train a student with w_gt x cross-entropy + w_kd x T^2 KL(teacher || student) + w_exp x "
                    "(1 - cosine of the student's and the teacher's maps) (Parchami-Araghi et al., ECCV 2024), "
                    "on the shortcut environment or on your images. Same outputs as `saliencylab guide`: a "
                    "checkpoint and a metrics row per epoch, an HTML report, resume by rerunning.")
    p.add_argument("--teacher", required=True, metavar="CKPT|MODULE:FACTORY",
                   help="a model.pt / checkpoint written by `saliencylab guide` or `distill`, or a factory that "
                        "returns the (trained) teacher")
    guide.add_data_arguments(p)
    g = p.add_argument_group("distillation")
    g.add_argument("--method", default="gradcam", help="explanation compared (default: %(default)s)")
    g.add_argument("--temperature", type=float, default=1.0, help="KD temperature T (default: %(default)s)")
    g.add_argument("--weights", default=DEFAULT_WEIGHTS, metavar="GT,KD,EXP",
                   help="weights of the cross-entropy, KD and explanation terms (default: %(default)s, the "
                        "authors' run.sh)")
    g.add_argument("--layer", "--student-layer", dest="layer", default=None,
                   help="the student's CAM layer (default small CNN: features)")
    g.add_argument("--teacher-layer", default=None, help="the teacher's CAM layer (a saved small CNN: features)")
    guide.add_run_arguments(p)


def parse_weights(text: str) -> tuple[float, float, float]:
    try:
        values = tuple(float(v) for v in str(text).split(","))
    except ValueError:
        values = ()
    if len(values) != 3:
        raise ConfigError(f"--weights takes three numbers GT,KD,EXP (e.g. 0,1,1), got {text!r}")
    return values


def load_teacher(source: str, num_classes: int):
    """(teacher, its factory spec or None) from a saved file or module:factory."""
    from ..training import loop

    if Path(source).suffix in (".pt", ".pth") or Path(source).is_file():
        model = loop.load_model_file(source)
        import torch

        blob = torch.load(source, map_location="cpu", weights_only=False)
        return model, (blob.get("meta") or {}).get("model")
    if ":" not in source:
        raise ConfigError(f"--teacher must be a model file or module:factory, got {source!r} (no such file)")
    return loop.model_from_spec(source, num_classes), source


def run(args) -> int:
    try:
        weights = parse_weights(args.weights)
        from .. import methods as _methods

        _methods.get(args.method)
        train, evaluation = guide.load_data(args)
        teacher, teacher_spec = load_teacher(args.teacher, train.num_classes)
        student, meta = guide.build_model(args.model, train.num_classes, args)
        distill = {"teacher": teacher, "method": args.method, "temperature": args.temperature, "weights": weights,
                   "student_layer": guide.default_layer(args.method, args.model, args.layer),
                   "teacher_layer": guide.default_layer(args.method, teacher_spec, args.teacher_layer)}
        return guide.run_fit(args, student, dict(meta, teacher=args.teacher), train, evaluation, distill=distill)
    except KeyboardInterrupt:
        raise
    except Fail:
        raise
    except Exception as exc:  # noqa: BLE001 - one error line (the traceback with --debug)
        raise guide.fail(args, exc) from None
