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
    p.add_argument("--seed", type=int, default=0, help="seed of the environments, images and methods (default 0)")
    p.add_argument("--debug", action="store_true", help="show tracebacks of unexpected errors")


def group_of(record) -> str:
    """The group (environment) a record belongs to: its image ids are '<group>:<seed or suite id>:<index>'."""
    ids = getattr(record, "image_ids", None) or []
    return str(ids[0]).rsplit(":", 2)[0] if ids and str(ids[0]).count(":") >= 2 else "?"


def stored_rows(out: Path) -> int:
    """Rows already in the run folder's stores (OUT/<group>/rows.jsonl), counted by key."""
    import warnings

    from ..runs.store import RunStore

    n = 0
    for path in sorted(out.glob("*/rows.jsonl")):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # unreadable lines are reported by the run itself
            n += len(RunStore(path))
    return n


def _run(args) -> int:
    out = Path(args.out)
    before = stored_rows(out) if out.is_dir() else 0
    if before:
        print(f"resuming: {before} rows found in {out}; rows already done are skipped, only missing ones computed",
              flush=True)

    def on_record(r):
        print(f"[{group_of(r)}] {r.method} / {r.metric}: {r.mean:.4f} [{r.low:.4f}, {r.high:.4f}]", flush=True)

    results = _leaderboard.run_bench(args.suite, args.methods, args.out, full=args.full, seed=args.seed,
                                     images=args.images, debug=args.debug, on_record=on_record)
    total = sum(len(r.scores) for g in results for r in g.records)
    computed = max(0, stored_rows(out) - before)
    if before:
        print(f"resumed: {max(0, total - computed)} of {total} rows were already done, {computed} computed", flush=True)
    for g in results:
        rows = sum(len(r.scores) for r in g.records)
        failed = f", {len(g.errors)} method(s) failed" if g.errors else ""
        print(f"[{g.name}] {len({r.method for r in g.records})} methods, {rows} rows{failed}", flush=True)
    print((out / "leaderboard.md").read_text(), end="")
    print((out / "index.html").resolve())
    failed = any(g.errors for g in results)
    return 1 if failed else 0
