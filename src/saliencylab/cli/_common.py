"""What every subcommand shares: one-line error messages and the exit-2 "whole command failed" error."""

from __future__ import annotations

import sys

from ..core.errors import SaliencyLabError, error_message, one_line  # noqa: F401  (one_line re-exported)


class Fail(Exception):
    """A whole-command error: print one line and exit 2."""


message = error_message


def error(*parts) -> None:
    print("error: " + ": ".join(one_line(p) for p in parts), file=sys.stderr, flush=True)


def warn(text) -> None:
    """A warning of the command's own (the library's warnings are printed the same way by cli.main)."""
    print("warning: " + one_line(text), file=sys.stderr, flush=True)


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


def add_input_options(p) -> None:
    """Options on how image files (and --feature-data folders) are read; shared by explain and evaluate."""
    from ..io import DEFAULT_BACKGROUND, DEFAULT_MAX_PIXELS

    p.add_argument("--background", default=DEFAULT_BACKGROUND, metavar="COLOUR",
                   help="colour that transparent pixels (RGBA, LA, P with transparency) are composited on: a name, "
                        "#rrggbb or R,G,B (default: white; a warning names the images it applied to)")
    p.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS, metavar="N",
                   help="images with more pixels are downscaled while read, with a warning (default: "
                        f"{DEFAULT_MAX_PIXELS:,}, Pillow's decompression-bomb threshold)")
    p.add_argument("--feature-data", metavar="DIR",
                   help="folder of images (searched recursively) from which the IBA-family methods estimate "
                        "feature statistics (and readout_iba trains); unreadable files are skipped with a "
                        "warning (default for the embedded model: 64 crops of the bundled photos; user models "
                        "need --feature-data)")


def check_input_options(args) -> None:
    """--background and --max-pixels, checked before anything runs."""
    from .. import io

    setup(io.parse_background, args.background)
    if args.max_pixels < 64:
        raise Fail(f"--max-pixels must be at least 64, got {args.max_pixels}")


def feature_data(names, loaded, args, *, embedded: bool) -> dict:
    """{method: data} for the chosen methods that take `data=` (see `io.method_data`); prints which data a
    default stands for; a whole-command error when a method cannot get any."""
    from .. import io

    data, note = setup(io.method_data, names, loaded, args.feature_data, embedded=embedded, background=args.background,
                       max_pixels=args.max_pixels)
    if note:
        print(f"note: {note}", file=sys.stderr, flush=True)
    return data
