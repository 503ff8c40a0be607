"""`saliencylab counterfactual`: arguments and errors; the work is
`saliencylab.report.counterfactual.digits_counterfactual_report` (C3LT on the shipped digits domain)."""

from __future__ import annotations

import sys

from ..core.errors import SaliencyLabError
from ._common import Fail, message


def add_parser(sub) -> None:
    p = sub.add_parser(
        "counterfactual", help="C3LT counterfactuals on the shipped digits domain, as an HTML page",
        description="Train C3LT (Khorram & Li Fuxin, CVPR 2022) latent maps between two digit classes of the "
                    "shipped domain (scikit-learn digits at 32 px, with a generator, encoder, discriminator "
                    "and classifier trained once and cached), then write a page with held-out queries, their "
                    "counterfactuals, change masks, COUT curves and summary numbers. Rerunning the command "
                    "resumes the training from its last checkpoint in --out.")
    p.add_argument("--out", required=True, metavar="DIR", help="index.html, summary.json and the C3LT checkpoints")
    p.add_argument("--source", type=int, default=4, help="the queries' digit (default: %(default)s)")
    p.add_argument("--target", type=int, default=9, help="the counterfactual digit (default: %(default)s)")
    p.add_argument("--epochs", "--steps", dest="epochs", type=int, default=None, metavar="N",
                   help="training epochs of the maps (default: the authors' 200; --quick: 2)")
    p.add_argument("--images", type=int, default=8, metavar="K", help="held-out queries shown (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="the domain's and the maps' seed (default: %(default)s)")
    p.add_argument("--quick", action="store_true",
                   help="a tiny domain and 2 epochs: checks the machinery in seconds (the pictures mean nothing)")
    p.add_argument("--no-resume", dest="resume", action="store_false", help="start the training over")
    p.add_argument("--debug", action="store_true", help="raise unexpected errors with their traceback")


def _print_epoch(event, info, every: int = 25) -> None:
    if event == "epoch" and info["epoch"] % every == 0:
        print(f"epoch {info['epoch']}: loss {info['loss']:.4f} (cls {info['cls']:.4f})", flush=True)


def run(args) -> int:
    from ..report.counterfactual import digits_counterfactual_report

    try:
        summary = digits_counterfactual_report(args.out, source=args.source, target=args.target, epochs=args.epochs,
                                               images=args.images, seed=args.seed, quick=args.quick,
                                               resume=args.resume, callback=_print_epoch)
    except KeyboardInterrupt:
        print(f"interrupted: rerun the same command to resume from the last checkpoint in {args.out}",
              file=sys.stderr, flush=True)
        raise
    except SaliencyLabError as exc:
        raise Fail(exc) from None
    except Exception as exc:  # noqa: BLE001 - one error line (the traceback with --debug)
        if args.debug:
            raise
        raise Fail(message(exc)) from None
    print(f"validity {summary['validity']:.3f}, COUT {summary['COUT (mean)']:.3f}", flush=True)
    print(f"page: {summary['page']}", flush=True)
    return 0
