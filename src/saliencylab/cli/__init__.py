"""The `saliencylab` command: list methods, explain image files, evaluate, leaderboard, demo page, and
training with explanations (guide, distill), counterfactuals and concepts.

One module per subcommand (`add_parser(sub)` and `run(args) -> exit code`); the work itself lives in
the library (`io`, `runs.files`, `runs.leaderboard`, `report.demo`), so scripts can do what the command does.

Exit codes: 0 all good; 1 some images (or demo methods) failed, the rest have results;
2 bad arguments (unknown method, parameter, layer or model), nothing was processed.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings

from .. import __version__
from ..core.errors import ConfigError
from ..core.threads import ENV as THREADS_ENV, resolve_threads, threads
from . import concepts, counterfactual, demo, distill, evaluate, explain, guide, leaderboard, methods, report
from ._common import Fail, error, one_line

__all__ = ["main", "build_parser", "COMMANDS"]

# Sub-command name -> module; the order is the order of the help. `bench` is the hidden old name of
# `leaderboard`.
COMMANDS = {"methods": methods, "explain": explain, "evaluate": evaluate, "leaderboard": leaderboard,
            "demo": demo, "report": report, "guide": guide, "distill": distill,
            "counterfactual": counterfactual, "concepts": concepts}
_ALIASES = {leaderboard.DEPRECATED: leaderboard}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="saliencylab", description="Explain PyTorch vision models with saliency maps.")
    parser.add_argument("--version", action="version", version=f"saliencylab {__version__}")
    parser.add_argument("--threads", default=None, type=_threads_arg, metavar="N",
                        help="torch CPU threads: a number, or 'auto' (the cores other work leaves idle; 1 on a busy "
                             f"machine). Default: ${THREADS_ENV}, else auto")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in COMMANDS.values():
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, usage errors: return instead of exiting
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    if args.command is None:
        parser.print_help()
        return 2
    args.argv = argv
    module = COMMANDS.get(args.command) or _ALIASES[args.command]
    try:  # --threads, else SALIENCYLAB_THREADS, else "auto" (1 thread when other work fills the cores)
        n_threads = resolve_threads(args.threads if args.threads is not None
                                    else None if os.environ.get(THREADS_ENV, "").strip() else "auto")
    except ConfigError as exc:  # a bad SALIENCYLAB_THREADS (a bad --threads is a usage error above)
        error(exc)
        return 2
    with warnings.catch_warnings():
        warnings.simplefilter("default")  # each distinct warning once
        warnings.showwarning = _show_warning
        try:
            with threads(n_threads):
                return module.run(args)
        except Fail as exc:
            error(exc)
            return 2
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return 130


def _threads_arg(text: str) -> str:
    try:
        resolve_threads(text)  # checked now; "auto" is worked out when the command starts
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _show_warning(message, category, filename, lineno, file=None, line=None):
    print(f"warning: {one_line(message)}", file=sys.stderr, flush=True)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
