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
  the rules' layer maps (`LinearLayer.forward_parts` / `vjp` / `vjp_parts` / `forward`) in an
  instrumented run, minus those of the epsilon composite (whose maps are the gradient's own transposed
  convolutions) in the next run (median over the repeats), added to the gradient's time.

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


def mac_bounds(model, x, low, high) -> tuple[dict, float]:
    """Each composite's pass bound by counting multiply-accumulates: (the gradient's forward and backward
    MACs + the extra MACs of the composite's rules) / the gradient's, the transposed map of a layer
    costing what its forward costs. Extra per layer of M MACs per image, s = 1 where its input has
    negative values: z-plus M (1 + s) forward + M s backward; alpha-beta and gamma 2 M (1 + s) forward
    + M (1 + 2 s) backward; flat and w-square M; z-box 5 M; epsilon nothing."""
    from torch import nn

    from saliencylab.methods.propagation import AlphaBeta, Flat, Gamma, WSquare, ZBox, ZPlus, make_composite

    layers, handles = [], []

    def count(name):
        def hook(m, args, out):
            per_image = out[0].numel()
            macs = per_image * (m.in_features if isinstance(m, nn.Linear)
                                else m.in_channels // m.groups * int(torch.tensor(m.kernel_size).prod()))
            layers.append((name, m, macs, bool((args[0] < 0).any())))
        return hook

    for name, m in model.named_modules():
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):
            handles.append(m.register_forward_hook(count(name)))
    with torch.no_grad():
        model(x[:1])
    for h in handles:
        h.remove()
    gradient = 2 * sum(macs for _, _, macs, _ in layers)
    bounds = {}
    for cname in COMPOSITES:
        composite = make_composite(cname, epsilon=1e-6, gamma=0.25, low=low, high=high)
        extra = 0
        for i, (name, m, M, signed) in enumerate(layers):
            rule = composite.first if i == 0 and composite.first is not None else composite.rule_for(name, m)
            s = int(signed)
            if isinstance(rule, ZPlus):
                extra += M * (1 + s) + M * s
            elif isinstance(rule, (AlphaBeta, Gamma)):
                extra += 2 * M * (1 + s) + M * (1 + 2 * s)
            elif isinstance(rule, (Flat, WSquare)):
                extra += M
            elif isinstance(rule, ZBox):
                extra += 5 * M
        bounds[cname] = (gradient + extra) / gradient
    signed = sum(macs for _, _, macs, s in layers if s) / sum(macs for _, _, macs, _ in layers)
    return bounds, signed


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
    macs, signed_share = mac_bounds(model, x, low, high)
    for bs in [int(b) for b in args.batch_sizes.split(",")]:
        grad = lambda: sl.explain(model, x, "gradient", batch_size=bs)  # noqa: E731
        bound_walls = []
        maps = {}
        for name in COMPOSITES:
            extra = {"low": low, "high": high} if name == "epsilon_gamma_box" else {}
            seen = []
            run = lambda: seen.append(sl.explain(model, x, "lrp", composite=name, batch_size=bs, **extra))  # noqa: E731
            run(), run()  # warm: the first runs of a process pay for growing its memory
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
            # the rules' extra maps: time in the layer maps beyond the epsilon composite's, alternating too
            eps_run = lambda: sl.explain(model, x, "lrp", composite="epsilon", batch_size=bs)  # noqa: E731
            extra_maps = []
            for _ in range(args.repeats):
                extra_maps.append(map_seconds(run) - map_seconds(eps_run))
            maps[name] = statistics.median(extra_maps)
            own = base_wall + max(maps[name], 0.0)
            rows.append({"composite": name, "batch_size": bs, "wall_s": wall, "cpu_s": cpu,
                         "bound_wall_s": base_wall, "ratio_wall": wall / base_wall, "ratio_cpu": cpu / base_cpu,
                         "extra_map_s": maps[name], "own_bound_s": own, "own_bound_ratio": own / base_wall,
                         "ratio_own_bound": wall / own, "mac_bound_ratio": macs[name],
                         "ratio_mac_bound": wall / base_wall / macs[name], "passes": seen[-1].cost.as_dict()})
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
    result["signed_input_mac_share"] = signed_share
    (out / "propagation.json").write_text(json.dumps(result, indent=1))
    lines = ["# LRP against its pass bounds, embedded EfficientNet-Lite0", "",
             f"{len(photos)} photos at 224x224, median of {args.repeats}, torch {torch.__version__}, "
             f"{torch.get_num_threads()} threads, {os.cpu_count()} CPUs, load average {load:.1f} at the end "
             "(other processes shared the machine: only the ratios, timed alternately, compare). "
             f"Command: `{' '.join(['python benchmarks/propagation.py', *(sys.argv[1:] if argv is None else argv)])}`.", "",
             "Bound: `gradient` (forward+backward) on the same images: "
             + ", ".join(f"batch {b}: {v['wall_s']:.2f} s wall" for b, v in bounds.items()) + ". "
             "Own bound: the gradient plus the extra linear maps the composite's rules need (z-plus: each "
             "convolution again with W+, and with W- forward and backward where its input has negative "
             "values; alpha-beta and gamma: two parts forward and backward), measured as the time in the "
             "rules' layer maps beyond the epsilon composite's; MAC bound: the same counted in multiply-"
             f"accumulates (see `mac_bounds`). Lite0 feeds {signed_share:.0%} of its layer MACs signed inputs (the "
             "stem, the 15 expansion layers after linear bottlenecks, the head), which z-plus, alpha-beta "
             "and gamma evaluate twice.", "",
             "| batch | composite | wall s | x gradient (wall) | x gradient (CPU) | own bound, timed (x gradient) "
             "| x own bound | MAC bound (x gradient) | x MAC bound |",
             "|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['batch_size']} | {r['composite']} | {r['wall_s']:.2f} | {r['ratio_wall']:.2f} | "
              f"{r['ratio_cpu']:.2f} | {r['own_bound_ratio']:.2f} | {r['ratio_own_bound']:.2f} | "
              f"{r['mac_bound_ratio']:.2f} | {r['ratio_mac_bound']:.2f} |" for r in rows]
    (out / "propagation.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
