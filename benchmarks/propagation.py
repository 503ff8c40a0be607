"""Speed of LRP against its pass bound, and against Captum's LRP, on the embedded model.

LRP takes one forward and one modified backward pass per image (BatchNorm layers are merged in the
same forward pass). Its bound is the plain gradient's cost on the same images in
this process: one forward+backward per image (`method="gradient"`), so

    ratio = t(lrp) / t(gradient)

and the issue's target is <= 1.5 for every composite. (Captum's LRP cannot run on this model: it has
no rule for ReLU6 or for the "same"-padding convolution module, so no peer ratio is given.) Times are the median of `--repeats` runs, wall clock and this process's CPU time; the bound is timed
alternately with each composite (a process's speed drifts over a run, so only adjacent timings compare).

Usage:  python benchmarks/propagation.py [--images 4] [--batch-sizes 2,4] [--repeats 3] [--threads 0]
                                         [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

import saliencylab as sl
from saliencylab import images as sample_images
from saliencylab import models
from saliencylab.methods.propagation import COMPOSITES

warnings.filterwarnings("ignore")


def timed(fn, repeats):
    walls, cpus = [], []
    for _ in range(repeats):
        w, c = time.perf_counter(), time.process_time()
        fn()
        walls.append(time.perf_counter() - w)
        cpus.append(time.process_time() - c)
    return statistics.median(walls), statistics.median(cpus)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=4)
    ap.add_argument("--batch-sizes", default="2,4", help="comma-separated batch sizes")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    loaded = models.load()
    model = loaded.model
    photos = list(sample_images.samples().values())[: args.images]
    x = torch.stack([loaded.preprocess(p.image) for p in photos])
    low, high = loaded.input_bounds()
    sl.explain(model, x[:1], "gradient")  # warm-up
    rows, bounds = [], {}
    for bs in [int(b) for b in args.batch_sizes.split(",")]:
        grad = lambda: sl.explain(model, x, "gradient", batch_size=bs)  # noqa: E731
        bound_walls = []
        for name in COMPOSITES:
            extra = {"low": low, "high": high} if name == "epsilon_gamma_box" else {}
            seen = []
            run = lambda: seen.append(sl.explain(model, x, "lrp", composite=name, batch_size=bs, **extra))  # noqa: E731
            run()
            # the bound is timed beside each composite, alternating: a process's speed drifts over a run
            gw, gc, lw, lc = [], [], [], []
            for _ in range(args.repeats):
                w, c = timed(grad, 1)
                gw.append(w), gc.append(c)
                w, c = timed(run, 1)
                lw.append(w), lc.append(c)
            base_wall, base_cpu = statistics.median(gw), statistics.median(gc)
            wall, cpu = statistics.median(lw), statistics.median(lc)
            bound_walls.append(base_wall)
            rows.append({"composite": name, "batch_size": bs, "wall_s": wall, "cpu_s": cpu,
                         "bound_wall_s": base_wall, "ratio_wall": wall / base_wall, "ratio_cpu": cpu / base_cpu,
                         "passes": seen[-1].cost.as_dict()})
            print(f"batch {bs} {name:28s} {wall:7.2f} s  x{wall / base_wall:.2f} of the gradient's forward+backward "
                  f"(cpu x{cpu / base_cpu:.2f})", flush=True)
        bounds[bs] = {"wall_s": statistics.median(bound_walls)}
    result = {"images": len(photos), "bounds": bounds, "rows": rows, "torch": torch.__version__,
              "python": sys.version.split()[0], "machine": platform.machine(), "threads": torch.get_num_threads()}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "propagation.json").write_text(json.dumps(result, indent=1))
    lines = ["# LRP against its pass bound (the gradient's forward+backward), embedded EfficientNet-Lite0", "",
             f"{len(photos)} photos at 224x224, median of {args.repeats}, torch {torch.__version__}, "
             f"{torch.get_num_threads()} threads. Command: `python benchmarks/propagation.py`.", "",
             "Bound: `gradient` on the same images: "
             + ", ".join(f"batch {b}: {v['wall_s']:.2f} s wall" for b, v in bounds.items()) + ".", "",
             "| batch | composite | wall s | x bound (wall) | x bound (CPU) |", "|---|---|---|---|---|"]
    lines += [f"| {r['batch_size']} | {r['composite']} | {r['wall_s']:.2f} | {r['ratio_wall']:.2f} | "
              f"{r['ratio_cpu']:.2f} |" for r in rows]
    (out / "propagation.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
