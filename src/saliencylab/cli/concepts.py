"""`saliencylab concepts`: arguments and messages; the work is `saliencylab.report.concepts.run_concepts`."""

from __future__ import annotations

import shlex
from pathlib import Path

from ._common import Fail, make_dir, setup


def _positive(text: str) -> int:
    import argparse

    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def add_parser(sub) -> None:
    p = sub.add_parser(
        "concepts", help="concepts of a small B-cos network (FaCT): contributions, traces, an HTML page",
        description="Train (once, cached) a small B-cos network on generated shape images, fit a bias-free top-k "
                    "sparse autoencoder at one of its layers (checkpoints in OUT/sae, resumed when run again) and "
                    "write OUT/index.html: per concept its top-activating images with their B-cos traces, per image "
                    "the logit as the exact sum of its concepts' contributions (FaCT, Parchami-Araghi et al. 2025).")
    p.add_argument("--out", "-o", default="concepts-out", help="output folder (default ./concepts-out)")
    p.add_argument("--layer", default="features", help="the layer the SAE reads (default features, the last 3x3 conv; "
                                                       "also conv1, conv2, conv3)")
    p.add_argument("--concepts", type=_positive, default=32, help="SAE dictionary size (default 32)")
    p.add_argument("--k", type=_positive, default=4, help="active concepts per position, top-k (default 4)")
    p.add_argument("--images", type=_positive, default=6, help="images whose decisions are shown in concepts (default 6)")
    p.add_argument("--top", type=_positive, default=6, help="top-activating images per concept (default 6)")
    p.add_argument("--show", type=_positive, default=8, help="concepts shown, by mean |contribution| (default 8)")
    p.add_argument("--sae-epochs", type=_positive, default=16, help="SAE training epochs (default 16, as FaCT)")
    p.add_argument("--train-images", type=_positive, default=1024,
                   help="training images of the network and the SAE (default 1024)")
    p.add_argument("--epochs", type=_positive, default=12, help="network training epochs (default 12)")
    p.add_argument("--probe", type=_positive, default=256, help="held-out images measured (default 256)")
    p.add_argument("--splice", choices=("replace", "residual"), default="replace",
                   help="replace: the network runs on the SAE reconstruction (FaCT); residual: on reconstruction + "
                        "error, the error's contribution reported separately (default replace)")
    p.add_argument("--seed", type=int, default=0, help="seed of the data, the network and the SAE (default 0)")
    p.add_argument("--no-resume", dest="resume", action="store_false", help="train the SAE from scratch")
    p.add_argument("--debug", action="store_true", help="show tracebacks of unexpected errors")


def run(args) -> int:
    from ..report.concepts import run_concepts

    if args.k > args.concepts:
        raise Fail(f"--k ({args.k}) must not exceed --concepts ({args.concepts})")
    out = Path(args.out)
    make_dir(out)
    result = setup(run_concepts, out, layer=args.layer, concepts=args.concepts, k=args.k, images=args.images,
                   top=args.top, show=args.show, sae_epochs=args.sae_epochs, train_images=args.train_images,
                   epochs=args.epochs, probe=args.probe, splice=args.splice, seed=args.seed, resume=args.resume,
                   command=shlex.join(["saliencylab", *args.argv]), debug=args.debug)
    print(f"accuracy {result.accuracy:.3f}, with the SAE {result.spliced_accuracy:.3f}")
    print(result.index.resolve())
    return 0
