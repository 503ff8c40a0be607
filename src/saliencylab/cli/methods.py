"""`saliencylab methods`: list the attribution methods."""

from __future__ import annotations

from .. import methods as _methods


def add_parser(sub) -> None:
    sub.add_parser("methods", help="list the attribution methods", description="List the attribution methods.")


def run(args) -> int:
    described = _methods.describe()
    width = max((len(n) for n in described), default=0)
    for name, text in described.items():
        print(f"{name:<{width}}  {text}")
    from ..methods.propagation import COMPOSITES

    print(f"\nlrp composites (explain -p composite=NAME; evaluate --method-param lrp.composite=NAME): {', '.join(COMPOSITES)}")
    return 0
