"""`saliencylab evaluate`: arguments and errors; the work is `saliencylab.evaluate_cmd`."""

from __future__ import annotations

from .. import evaluate_cmd
from ..core.errors import SaliencyLabError
from ._common import Fail, error, message


def add_parser(sub) -> None:
    evaluate_cmd.add_parser(sub)


def run(args) -> int:
    def fail(path, exc):
        if args.debug and not isinstance(exc, SaliencyLabError):
            raise exc
        error(path, message(exc))

    try:
        return evaluate_cmd.cmd_evaluate(args, fail)
    except SaliencyLabError as exc:
        raise Fail(exc) from None
