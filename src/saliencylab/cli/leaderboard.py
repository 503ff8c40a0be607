"""`saliencylab leaderboard`: methods through a suite of environments; the work is `saliencylab.runs.leaderboard`.

Named `leaderboard` so that it does not share a word with the speed scripts in benchmarks/; the old
name `bench` still runs it (hidden from the help), after a one-line deprecation notice.
"""

from __future__ import annotations

import sys
from pathlib import Path

from ..core.errors import SaliencyLabError
from ..runs import leaderboard as _leaderboard
from ._common import Fail

NAME, DEPRECATED = "leaderboard", "bench"


class _Named:
    """Hands `bench.add_parser` a subparsers object that registers its parser under another name."""

    def __init__(self, sub, name: str, hidden: bool = False):
        self.sub, self.name, self.hidden = sub, name, hidden

    def add_parser(self, _name, **kwargs):
        if self.hidden:  # argparse lists a sub-command in the help only when it has help=
            kwargs.pop("help", None)
            kwargs["description"] = f"Deprecated name of `saliencylab {NAME}`. " + kwargs.get("description", "")
        return self.sub.add_parser(self.name, **kwargs)


def add_parser(sub) -> None:
    _add_arguments(_Named(sub, NAME))
    _add_arguments(_Named(sub, DEPRECATED, hidden=True))


def run(args) -> int:
    if args.command == DEPRECATED:
        print(f"note: `saliencylab {DEPRECATED}` is now `saliencylab {NAME}`; the old name will be removed",
              file=sys.stderr, flush=True)
    try:
        return _run(args)
    except SaliencyLabError as exc:
        raise Fail(exc) from None


def _add_arguments(sub) -> None:
    p = sub.add_parser(
        "bench", help="run methods through a suite and write a leaderboard",
        description="Run every chosen method through a suite (groundtruth, knows-best, faithfulness) and write a "
                    "leaderboard: method x metric with 95% intervals, paired tests against the best method, "
                    "costs, and an HTML report with example maps. Seeded and resumable.")
    p.add_argument("--suite", default="groundtruth", help=f"one of {', '.join(_leaderboard.SUITES)} (default: %(default)s)")
    p.add_argument("--methods", default="default",
                   help="comma-separated method names, 'default' or 'all' (default: " + ",".join(_leaderboard.DEFAULT_METHODS)
                        + "; without extremal_perturbation on the photo suites unless --full)")
    p.add_argument("--out", "-o", default="bench-out", help="output folder (default ./bench-out)")
    p.add_argument("--full", action="store_true", help="the larger version (more images)")
    p.add_argument("--images", type=int, default=None, help="images per group (overrides the suite's size)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--debug", action="store_true")


def _run(args) -> int:
    results = _leaderboard.run_bench(args.suite, args.methods, args.out, full=args.full, seed=args.seed, images=args.images,
                        debug=args.debug,
                        on_record=lambda r: print(f"{r.method} / {r.metric}: {r.mean:.4f} "
                                                  f"[{r.low:.4f}, {r.high:.4f}]", flush=True))
    out = Path(args.out)
    print((out / "leaderboard.md").read_text(), end="")
    print((out / "index.html").resolve())
    failed = any(g.errors for g in results)
    return 1 if failed else 0
