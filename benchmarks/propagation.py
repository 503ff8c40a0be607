"""Speed of LRP against its pass bound on the embedded model.

LRP takes one forward and one modified backward pass per image (BatchNorm layers are merged in the
same forward pass). Two bounds, both measured in this process on the same images:

- the gradient's forward+backward (`method="gradient"`): ratio = t(lrp) / t(gradient); the issue's
  target is <= 1.5. It is the whole cost of the epsilon rule, whose modified backward is the
  gradient's with one scaling per layer.
- the composite's own pass bound: the gradient plus the extra linear maps its rules need, which a plain
  gradient does not run: z-plus evaluates each convolution again with W+ for its denominator (and with
  W- on inputs with negative values, which Lite0's linear bottlenecks feed to the expansion layers, with
  a second transposed map in the backward); alpha-beta and gamma evaluate two parts (stacked into one
  layer of twice the outputs) forward and backward. It is measured, not counted: the seconds spent in
  the rules' layer maps (`LinearLayer.forward_parts` / `vjp` / `vjp_parts` / `forward`) in a separate
  instrumented run, minus those of the epsilon composite (whose maps are the gradient's own transposed
  convolutions), added to the gradient's time.

(Captum's LRP cannot run on this model: it has no rule for ReLU6 or for the "same"-padding convolution
module, so no peer ratio is given.) Times are the median of `--repeats` runs, wall clock and this
process's CPU time; the gradient is timed alternately with each composite (a process's speed drifts
over a run, so only adjacent timings compare).

Usage:  python benchmarks/propagation.py [--images 4] [--batch-sizes 2,4] [--repeats 3] [--threads 0]
                                         [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
import os
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


def map_seconds(fn) -> float:
    """Seconds fn() spends in the LRP layers' linear maps (outermost calls only)."""
    from saliencylab.methods.propagation import lrp

    names = ("forward", "forward_parts", "vjp", "vjp_parts")
    originals = {n: getattr(lrp.LinearLayer, n) for n in names}
    total, depth = [0.0], [0]

    def timed_map(f):
        def g(*args, **kwargs):
            if depth[0]:
                return f(*args, **kwargs)
            depth[0] += 1
            t = time.perf_counter()
            try:
                return f(*args, **kwargs)
            finally:
                total[0] += time.perf_counter() - t
                depth[0] -= 1
        return g

    for n in names:
        setattr(lrp.LinearLayer, n, timed_map(originals[n]))
    try:
        fn()
    finally:
        for n in names:
            setattr(lrp.LinearLayer, n, originals[n])
    return total[0]


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
        maps = {}
        for name in ["epsilon"] + [n for n in COMPOSITES if n != "epsilon"]:  # epsilon's maps first
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
            maps[name] = statistics.median(map_seconds(run) for _ in range(args.repeats))
            own = base_wall + max(maps[name] - maps["epsilon"], 0.0)
            rows.append({"composite": name, "batch_size": bs, "wall_s": wall, "cpu_s": cpu,
                         "bound_wall_s": base_wall, "ratio_wall": wall / base_wall, "ratio_cpu": cpu / base_cpu,
                         "map_s": maps[name], "own_bound_s": own, "own_bound_ratio": own / base_wall,
                         "ratio_own_bound": wall / own, "passes": seen[-1].cost.as_dict()})
            print(f"batch {bs} {name:28s} {wall:7.2f} s  x{wall / base_wall:.2f} of the gradient's forward+backward "
                  f"(cpu x{cpu / base_cpu:.2f}); own bound x{own / base_wall:.2f} of it, lrp x{wall / own:.2f} "
                  "of its own bound", flush=True)
        bounds[bs] = {"wall_s": statistics.median(bound_walls)}
    result = {"images": len(photos), "bounds": bounds, "rows": rows, "torch": torch.__version__,
              "python": sys.version.split()[0], "machine": platform.machine(), "threads": torch.get_num_threads()}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    result["load_average_1min"] = load
    result["cpus"] = os.cpu_count()
    (out / "propagation.json").write_text(json.dumps(result, indent=1))
    lines = ["# LRP against its pass bounds, embedded EfficientNet-Lite0", "",
             f"{len(photos)} photos at 224x224, median of {args.repeats}, torch {torch.__version__}, "
             f"{torch.get_num_threads()} threads, {os.cpu_count()} CPUs, load average {load:.1f} at the end "
             "(other processes shared the machine: only the ratios, timed alternately, compare). "
             "Command: `python benchmarks/propagation.py`.", "",
             "Bound: `gradient` (forward+backward) on the same images: "
             + ", ".join(f"batch {b}: {v['wall_s']:.2f} s wall" for b, v in bounds.items()) + ". "
             "Own bound: the gradient plus the extra linear maps the composite's rules need (z-plus: each "
             "convolution again with W+, and with W- forward and backward where its input has negative "
             "values; alpha-beta and gamma: two parts forward and backward), measured as the time in the "
             "rules' layer maps beyond the epsilon composite's, see the script's docstring.", "",
             "| batch | composite | wall s | x gradient (wall) | x gradient (CPU) | own bound (x gradient) | x own bound |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['batch_size']} | {r['composite']} | {r['wall_s']:.2f} | {r['ratio_wall']:.2f} | "
              f"{r['ratio_cpu']:.2f} | {r['own_bound_ratio']:.2f} | {r['ratio_own_bound']:.2f} |" for r in rows]
    (out / "propagation.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
