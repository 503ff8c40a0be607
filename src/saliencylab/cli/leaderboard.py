"""`saliencylab leaderboard`: methods through a suite of environments; the work is `saliencylab.bench`.

Named `leaderboard` so that it does not share a word with the speed scripts in benchmarks/; the old
name `bench` still runs it (hidden from the help), after a one-line deprecation notice.
"""

from __future__ import annotations

import sys

from .. import bench as _bench
from ..core.errors import SaliencyLabError
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
    _bench.add_parser(_Named(sub, NAME))
    _bench.add_parser(_Named(sub, DEPRECATED, hidden=True))


def run(args) -> int:
    if args.command == DEPRECATED:
        print(f"note: `saliencylab {DEPRECATED}` is now `saliencylab {NAME}`; the old name will be removed",
              file=sys.stderr, flush=True)
    try:
        return _bench.cmd_bench(args)
    except SaliencyLabError as exc:
        raise Fail(exc) from None
