"""What every subcommand shares: one-line error messages and the exit-2 "whole command failed" error."""

from __future__ import annotations

import sys

from ..core.errors import SaliencyLabError, error_message, one_line  # noqa: F401  (one_line re-exported)


class Fail(Exception):
    """A whole-command error: print one line and exit 2."""


message = error_message


def error(*parts) -> None:
    print("error: " + ": ".join(one_line(p) for p in parts), file=sys.stderr, flush=True)


def setup(fn, *a, debug=False, **kw):
    """Run a setup step; any failure is a whole-command error (exit 2)."""
    try:
        return fn(*a, **kw)
    except SaliencyLabError as exc:
        raise Fail(exc) from None
    except Exception as exc:  # noqa: BLE001
        if debug:
            raise
        raise Fail(message(exc)) from None


def make_dir(path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise Fail(f"cannot create output folder '{path}': {exc.strerror or exc}") from None
