"""`saliencylab report OUT`: merge every rows file of an output folder (all shards) into one leaderboard;
and `evaluate --data DIR`, the folder run, whose work is `saliencylab.runs.dataset.evaluate_folder`
(`--engine ray`: `saliencylab.runs.ray_engine.evaluate_folder_ray`).
"""

from __future__ import annotations

import sys
from pathlib import Path

from ..core.errors import ConfigError, SaliencyLabError
from ._common import Fail


def add_parser(sub) -> None:
    p = sub.add_parser(
        "report", help="merge the rows of a folder run (all shards) into one leaderboard",
        description="Read every rows file of OUT (rows.jsonl and rows-shard-i-of-N.jsonl, written by "
                    "`saliencylab evaluate --data DIR --out OUT [--shard i/N]`), one row per key, and write the "
                    "leaderboard: method x metric means with 95% bootstrap intervals, paired permutation tests "
                    "against the best method (Holm-corrected) and costs, as leaderboard.md, leaderboard.json "
                    "and index.html.")
    p.add_argument("out", metavar="OUT", help="the output folder of the evaluate runs")
    p.add_argument("--to", default=None, metavar="DIR", help="write the leaderboard here (default: OUT)")


def run(args) -> int:
    from ..runs.shards import write_report

    try:
        paths = write_report(args.out, args.to)
    except SaliencyLabError as exc:
        raise Fail(exc) from None
    print(paths["markdown"].read_text(), end="")
    print(paths["html"].resolve())
    return 0


def add_data_options(p) -> None:
    """`evaluate`'s folder-run options; IMAGE files become optional (one of IMAGE or --data is needed)."""
    for action in p._actions:  # argparse has no public way to relax a positional added before
        if action.dest == "images":
            action.nargs = "*"
    p.add_argument("--data", default=None, metavar="DIR",
                   help="evaluate every image of a folder instead of IMAGE files: class subfolders (ImageNet synset "
                        "names, class indices or class names) or a flat folder with --labels; streamed in chunks, "
                        "resumable; rows in OUT/rows.jsonl (see docs/scale.md)")
    p.add_argument("--labels", default=None, metavar="FILE",
                   help="with --data: CSV file,label or JSON {file: label}; files relative to DIR")
    p.add_argument("--shard", default=None, metavar="i/N",
                   help="with --data: run shard i of N (0 <= i < N; an image's shard is a hash of its path); "
                        "merge with `saliencylab report OUT`")
    p.add_argument("--workers", type=int, default=2, help="with --data: image decoding threads (default 2)")
    p.add_argument("--chunk-size", type=int, default=32, help="with --data: images per chunk (default 32; with "
                        "--engine ray, images per actor call)")
    p.add_argument("--engine", choices=("local", "ray"), default="local",
                   help="with --data: 'local' (this process) or 'ray' (Ray Data, an actor pool that loads the model "
                        "once per actor; a local Ray, or the cluster at RAY_ADDRESS; pip install saliencylab[ray])")
    p.add_argument("--actors", type=int, default=None, metavar="N",
                   help="with --engine ray: actors in the pool (default 2)")
    p.add_argument("--gpus-per-actor", type=float, default=0, metavar="G",
                   help="with --engine ray: GPUs each actor reserves (default 0: CPU; 1: one GPU per actor)")


def evaluate_data(args, method_names, metric_names, method_params, metric_params) -> int:
    """`saliencylab evaluate --data DIR`: the folder run of one shard; writes the leaderboard when it ran
    the whole job (a shard says how to merge). Exit 1 when some files were skipped."""
    from .. import io
    from ..runs.dataset import evaluate_folder
    from ..runs.local import check_requirements
    from ..runs.shards import parse_shard, write_report

    if args.data is None:
        raise ConfigError("give IMAGE files, or --data DIR (--labels and --shard go with --data)")
    if args.images:
        raise ConfigError("give either IMAGE files or --data DIR, not both")
    if args.boxes or getattr(args, "masks", None):
        raise ConfigError("--boxes/--masks go with IMAGE files; a --data run takes metrics that need no regions")
    i, n = parse_shard(args.shard)
    check_requirements(metric_names)  # before the model or any image is loaded
    engine = getattr(args, "engine", "local")
    if engine != "ray" and (getattr(args, "actors", None) is not None or getattr(args, "gpus_per_actor", 0)):
        raise ConfigError("--actors and --gpus-per-actor go with --engine ray")
    if engine == "ray":
        from ..runs.ray_engine import import_ray

        args.actors = 2 if args.actors is None else args.actors

        import_ray()  # one line naming the extra, before the model is loaded
        if args.actors < 1:
            raise ConfigError(f"--actors must be a positive int, got {args.actors}")
        if args.gpus_per_actor < 0:
            raise ConfigError(f"--gpus-per-actor must be >= 0, got {args.gpus_per_actor}")
    loaded = io.load_model(args.model, args.weights)
    target = args.target
    if target not in (None, "label", "predicted"):
        target = io.resolve_target_arg(target, loaded.labels)
    common = dict(out=args.out, labels=args.labels, target=target, shard=(i, n), workers=args.workers,
                  chunk_size=args.chunk_size, method_params=method_params, metric_params=metric_params)
    if engine == "ray":
        from ..runs.ray_engine import evaluate_folder_ray

        # actors load the model themselves from the spec (the driver's copy gives labels and the fingerprint)
        result = evaluate_folder_ray(loaded, args.data, method_names, metric_names, spec=args.model,
                                     weights=args.weights, num_actors=args.actors,
                                     num_gpus_per_actor=args.gpus_per_actor, **common)
    else:
        result = evaluate_folder(loaded, args.data, method_names, metric_names, **common)
    if result.skipped:
        print(f"warning: skipped {len(result.skipped)} file(s), listed with the reason in "
              f"{Path(args.out) / ('skipped.csv' if n == 1 else f'skipped-shard-{i}-of-{n}.csv')}",
              file=sys.stderr, flush=True)
    print(f"{result.images} images, {result.computed} new rows in {result.rows_file}", flush=True)
    if n == 1:
        paths = write_report(args.out)
        print(paths["markdown"].read_text(), end="")
        print(paths["html"].resolve())
    else:
        print(f"shard {i}/{n} done; once every shard is done: saliencylab report {args.out}")
    return 1 if result.skipped else 0
