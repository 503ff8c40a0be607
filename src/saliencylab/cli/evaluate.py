"""`saliencylab evaluate`: arguments and errors; the work is `saliencylab.evaluate_cmd`."""

from __future__ import annotations

from .. import evaluate_cmd
from .. import methods as _methods
from .. import presets as _presets
from ..core.errors import SaliencyLabError
from ._common import Fail, error, message, setup


def add_parser(sub) -> None:
    evaluate_cmd.add_parser(sub)
    sub.choices["evaluate"].add_argument(
        "--preset", help=f"cost settings for the methods, one of {', '.join(_presets.names())} (default: each "
                         "method's defaults); --method-param overrides them")


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

    args.method_param = preset_method_params(args.preset, args.methods) + list(args.method_param)
    try:
        return evaluate_cmd.cmd_evaluate(args, fail)
    except SaliencyLabError as exc:
        raise Fail(exc) from None
