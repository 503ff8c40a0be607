"""`saliencylab demo`: arguments and messages; the work is `saliencylab.report.demo.run_demo`."""

from __future__ import annotations

import shlex
from pathlib import Path

from .. import methods as _methods
from .. import metrics as _metrics
from .. import presets as _presets
from ._common import Fail, error, make_dir, setup


def add_parser(sub) -> None:
    demo = sub.add_parser(
        "demo", help="explain the bundled photos with representative methods and write an HTML page",
        description="Explain bundled sample photos with a handful of representative methods "
                    f"({', '.join(_presets.DEMO_METHODS)}) on {len(_presets.DEMO_PHOTOS)} photos, score the maps "
                    "by deletion/insertion and write overlays, curves and index.html. --full runs every method "
                    "on every photo.")
    demo.add_argument("--out", "-o", default="demo-out", help="output folder (default ./demo-out)")
    demo.add_argument("--full", action="store_true",
                      help="every method on every bundled photo, preset 'full' (tens of minutes on a CPU)")
    demo.add_argument("--preset", help=f"method settings, one of {', '.join(_presets.names())} "
                                       "(default: demo, or full with --full)")
    demo.add_argument("--quick", action="store_true", help="same as --preset quick: a fast smoke run, rough maps")
    demo.add_argument("--methods", help="comma-separated method names, or 'all' (default: "
                                        f"{','.join(_presets.DEMO_METHODS)}; all with --full)")
    demo.add_argument("--metrics", default="deletion,insertion",
                      help="metrics scored on every method's maps, I-GOS protocol (default deletion,insertion; "
                           "'' for none)")
    demo.add_argument("--debug", action="store_true", help="show tracebacks of unexpected errors")


def run(args) -> int:
    from ..report.demo import demo_methods, demo_photos, run_demo

    if args.quick and args.preset not in (None, "quick"):
        raise Fail(f"--quick and --preset {args.preset} contradict each other")
    preset = "quick" if args.quick else args.preset or ("full" if args.full else "demo")
    setup(_presets.get, preset)
    if args.methods is None:
        names = demo_methods(full=args.full)
    elif args.methods.strip() == "all":
        names = _methods.available(requires=None)
    else:
        names = [n.strip() for n in args.methods.split(",") if n.strip()]
        if not names:
            raise Fail("--methods names no method")
    names = [setup(_methods.get, n).name for n in names]
    metric_names = [setup(_metrics.get, m.strip()).name for m in (args.metrics or "").split(",") if m.strip()]
    make_dir(Path(args.out))
    title = "saliencylab demo" + ("" if preset in ("demo", "full") else f" ({preset})")
    result = setup(run_demo, args.out, methods=names, preset=preset, photos=demo_photos(args.full),
                   metrics=metric_names, command=shlex.join(["saliencylab", *args.argv]), title=title, debug=args.debug,
                   on_error=error)
    print(result.index.resolve())
    return 1 if result.errors else 0
