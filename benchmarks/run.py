"""Speed of every method against the pass bound, and against Captum in the same process.

The bound for a method is what its passes cost if nothing else cost anything:
    bound = backward_images * t(forward+backward per image) + forward_only_images * t(forward per image)
with both unit costs measured on the same model, at the method's batch size, in this process.
A ratio of 1.0 means the method spends nothing beyond its passes.

Usage:  python benchmarks/run.py [--images 4] [--steps 16] [--batch-size 32] [--out benchmarks/results]
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

warnings.filterwarnings("ignore")


def timed(fn, repeat: int) -> float:
    """Median wall time of `repeat` calls after one warm-up call."""
    fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def unit_costs(model, x, batch_size: int, repeat: int) -> tuple[float, float]:
    """Seconds per image of a no-grad forward and of a forward+backward to the input, at batch_size."""
    rows = x.repeat((batch_size + len(x) - 1) // len(x), 1, 1, 1)[:batch_size]
    params = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in params:  # as in a model session: gradients to the input only
        p.requires_grad_(False)
    try:
        def fwd():
            with torch.no_grad():
                model(rows)

        def fwd_bwd():
            inp = rows.detach().requires_grad_(True)
            out = model(inp)
            torch.autograd.grad(out[:, 0].sum(), inp)

        return timed(fwd, repeat) / batch_size, timed(fwd_bwd, repeat) / batch_size
    finally:
        for p, flag in params:
            p.requires_grad_(flag)


def bench_method(model, x, name, params, unit, repeat):
    """Seconds per image and ratio to the pass bound, with unit costs taken at the rows per call the
    method actually used (a CPU's cost per image depends strongly on the batch size)."""
    holder = {}

    def run():
        holder["e"] = sl.explain(model, x, name, **params)

    seconds = timed(run, repeat)
    cost = holder["e"].cost
    bwd_rows = max(1, round(cost.backward_images / max(1, cost.backward_calls)))
    forward_only = cost.forward_images - cost.backward_images
    fwd_calls = cost.forward_calls - cost.backward_calls
    fwd_rows = max(1, round(forward_only / max(1, fwd_calls)))
    bound = cost.backward_images * unit(bwd_rows)[1] + forward_only * unit(fwd_rows)[0]
    return {
        "method": name,
        "params": {k: v for k, v in params.items()},
        "seconds_per_image": seconds / len(x),
        "forward_images": cost.forward_images,
        "backward_images": cost.backward_images,
        "rows_per_pass": bwd_rows if cost.backward_images else fwd_rows,
        "bound_seconds_per_image": bound / len(x),
        "ratio_to_bound": seconds / bound,
    }


def bench_captum(model, x, targets, steps, batch_size, repeat):
    try:
        from captum.attr import IntegratedGradients, NoiseTunnel, Saliency
    except ImportError:
        return []
    model.eval()
    out = []

    def ig():
        IntegratedGradients(model).attribute(x, target=targets, n_steps=steps, method="gausslegendre",
                                             internal_batch_size=batch_size)

    def sg():
        NoiseTunnel(Saliency(model)).attribute(x, nt_type="smoothgrad", nt_samples=steps, stdevs=0.15,
                                               nt_samples_batch_size=max(1, batch_size // len(x)),
                                               target=targets, abs=False)

    def ours(name, **params):
        return lambda: sl.explain(model, x, name, target=targets, batch_size=batch_size, **params)

    # Ours is timed again right beside Captum, alternating: a process's speed drifts (the allocator's
    # state after large batches made both ~2x faster later in one run), so only adjacent timings compare.
    pairs = (("integrated_gradients", ig, ours("integrated_gradients", steps=steps)),
             ("smoothgrad", sg, ours("smoothgrad", samples=steps)))
    for name, fn, mine in pairs:
        theirs_t, ours_t = [], []
        for _ in range(2):
            theirs_t.append(timed(fn, repeat) / len(x))
            ours_t.append(timed(mine, repeat) / len(x))
        out.append({"method": name, "library": "captum " + __import__("captum").__version__,
                    "seconds_per_image": statistics.median(theirs_t),
                    "ours_adjacent_seconds_per_image": statistics.median(ours_t)})
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=4)
    ap.add_argument("--steps", type=int, default=16, help="IG steps and SmoothGrad samples")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--methods", default="", help="comma-separated subset (default: all)")
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args(argv)

    sl.set_progress(False)
    loaded = models.load("efficientnet_lite0")
    model = loaded.model
    photos = list(sample_images.samples().values())[: args.images]
    x = torch.stack([loaded.preprocess(p.image) for p in photos])
    with torch.no_grad():
        targets = model(x).argmax(1).tolist()

    cache: dict[int, tuple[float, float]] = {}

    def unit(rows: int) -> tuple[float, float]:
        if rows not in cache:
            cache[rows] = unit_costs(model, x, rows, args.repeat)
        return cache[rows]

    t_f, t_fb = unit(args.batch_size)
    names = args.methods.split(",") if args.methods else sl.methods.available()
    common = {"batch_size": args.batch_size}
    per_method = {"integrated_gradients": {"steps": args.steps}, "smoothgrad": {"samples": args.steps},
                  "squaregrad": {"samples": args.steps}, "vargrad": {"samples": args.steps}}
    rows = []
    for name in names:
        known = sl.methods.parameters(name)
        params = {k: v for k, v in {**common, **per_method.get(name, {})}.items() if k in known}
        row = bench_method(model, x, name, params, unit, args.repeat)
        rows.append(row)
        print(f"{name:24s} {row['seconds_per_image']:7.3f} s/image  bound {row['bound_seconds_per_image']:7.3f}"
              f"  ratio {row['ratio_to_bound']:5.2f}", flush=True)

    captum = bench_captum(model, x, targets, args.steps, args.batch_size, args.repeat)
    ours = {r["method"]: r for r in rows}
    for c in captum:
        if c["method"] in ours:
            c["ours_seconds_per_image"] = c.pop("ours_adjacent_seconds_per_image")
            c["captum_over_ours"] = c["seconds_per_image"] / c["ours_seconds_per_image"]
            print(f"captum {c['method']:17s} {c['seconds_per_image']:7.3f} s/image  "
                  f"(captum / ours = {c['captum_over_ours']:.2f})", flush=True)

    result = {
        "model": loaded.name, "images": len(x), "batch_size": args.batch_size, "steps": args.steps,
        "forward_seconds_per_image": t_f, "forward_backward_seconds_per_image": t_fb,
        "unit_costs_by_rows": {str(k): {"forward": v[0], "forward_backward": v[1]} for k, v in cache.items()},
        "torch": torch.__version__, "threads": torch.get_num_threads(), "python": sys.version.split()[0],
        "load_average_at_end": __import__("os").getloadavg(),
        "machine": platform.machine(), "processor": platform.processor(),
        "methods": rows, "captum": captum,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "methods.json").write_text(json.dumps(result, indent=2))
    lines = ["| method | s/image | bound s/image | ratio to bound | passes (fwd/bwd images) |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['seconds_per_image']:.3f} | {r['bound_seconds_per_image']:.3f} | "
                     f"{r['ratio_to_bound']:.2f} | {r['forward_images']}/{r['backward_images']} |")
    if captum:
        lines += ["", "| method | captum s/image | ours s/image | captum / ours |", "|---|---|---|---|"]
        for c in captum:
            if "ours_seconds_per_image" in c:
                lines.append(f"| {c['method']} | {c['seconds_per_image']:.3f} | {c['ours_seconds_per_image']:.3f} | "
                             f"{c['captum_over_ours']:.2f} |")
    (out / "methods.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out / 'methods.json'} and {out / 'methods.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
