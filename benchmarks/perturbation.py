"""Speed of the perturbation engine against its forward-pass bound, and occlusion against Captum.

Perturbation methods and metrics take forward passes only, so their bound is
    bound = forward_images * t(no-grad forward per image)
with the unit cost measured on the same model, at the same batch size, in this process. A ratio of
1.0 means the engine spends nothing beyond the model's own forward passes (mask building, blending,
scoring and accumulation are free). Captum's Occlusion runs the same windows on the same images with
the same batch (perturbations_per_eval * images = batch size) and the same number of forward images,
so its ratio uses the same bound.

Every time is taken twice: wall clock, and this process's CPU time (`time.process_time`). On a shared
machine the wall clock includes waiting for other processes; the CPU time does not, so with
`--threads 1` the CPU-time ratios are the ones to trust under load. The unit cost is measured before
and after the runs and the mean is used.

Usage:  python benchmarks/perturbation.py [--images 4] [--window 32] [--stride 16] [--steps 50]
                                          [--rise-masks 256] [--batch-size 64] [--threads 0]
                                          [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
import math
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

warnings.filterwarnings("ignore")


def once(fn):
    """(wall seconds, process CPU seconds, result) of one call."""
    w0, c0 = time.perf_counter(), time.process_time()
    result = fn()
    return time.perf_counter() - w0, time.process_time() - c0, result


def forward_unit_cost(model, x, batch_size: int, repeat: int) -> tuple[float, float]:
    """(wall, CPU) seconds per image of a no-grad forward at batch_size: median of `repeat` after a warm-up."""
    rows = x.repeat((batch_size + len(x) - 1) // len(x), 1, 1, 1)[:batch_size]

    def fwd():
        with torch.no_grad():
            model(rows)

    fwd()
    walls, cpus = zip(*[once(fwd)[:2] for _ in range(repeat)])
    return statistics.median(walls) / batch_size, statistics.median(cpus) / batch_size


class NullModel(torch.nn.Module):
    """Reads each image once (channel means) and maps it to 1000 logits: a forward that costs ~nothing,
    so the time of a run on it is the engine's own work (masks, blending, gathering, scoring)."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(3, 1000)

    def forward(self, x):
        return self.fc(x.mean((2, 3)))


def engine_overhead(x, batch_size, window, stride, steps, rise_masks):
    """(wall, CPU) milliseconds per perturbed row spent outside the model, measured on NullModel."""
    null = NullModel().eval()
    sl.explain(null, x[:1], "occlusion", window=x.shape[-1], stride=x.shape[-1])  # warm-up
    calls = {"occlusion": lambda: sl.explain(null, x, "occlusion", window=window, stride=stride,
                                             batch_size=batch_size).cost}
    if rise_masks:
        calls["rise"] = lambda: sl.explain(null, x, "rise", masks=rise_masks, batch_size=batch_size).cost
    for metric in ("deletion", "insertion"):
        def run(metric=metric):
            instance = sl.metrics.build(metric, steps=steps, batch_size=batch_size)
            return instance.measure(null, x, torch.rand(x.shape[0], *x.shape[-2:])).cost
        calls[metric] = run
    out = {}
    for name, fn in calls.items():
        wall, cpu, cost = once(fn)
        out[name] = {"wall_ms_per_row": 1000 * wall / cost.forward_images,
                     "cpu_ms_per_row": 1000 * cpu / cost.forward_images}
    return out


def quantus_runs(runs, model, x, maps, targets, args) -> None:
    """Quantus's PixelFlipping against our deletion at the same settings, on the embedded model and on a
    small CNN at 32x32 (where per-step numpy round trips, not the model, dominate)."""
    try:
        import numpy as np
        import quantus
    except ImportError:
        return
    B, C, H, W = x.shape
    per_step = (H * W) // args.steps
    while (H * W) % per_step:  # Quantus needs the pixel count to be a multiple of the step
        per_step += 1
    small = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(16, 16, 3, padding=1),
                                torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(16, 10)).eval()
    xs = torch.nn.functional.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False)
    ms = torch.nn.functional.interpolate(maps[:, None], size=(32, 32), mode="bilinear", align_corners=False)[:, 0]
    for label, net, xx, mm, ps in (("embedded", model, x, maps, per_step), ("small CNN 32x32", small, xs, ms, 32)):
        with torch.no_grad():
            y = net(xx).argmax(1)
        instance = sl.metrics.build("deletion", per_step=ps, baseline="zero", score="softmax",
                                    batch_size=args.batch_size)
        wall, cpu, measured = once(lambda: instance.measure(net, xx, mm, y))
        fwd = measured.cost.forward_images
        runs.append((f"deletion {label} (ours)", wall, cpu, fwd if label == "embedded" else 0,
                     {"library": "saliencylab", "per_step": ps}))
        metric = quantus.PixelFlipping(features_in_step=ps, perturb_baseline=0.0, normalise=False, abs=False,
                                       disable_warnings=True, display_progressbar=False)
        wall, cpu, _ = once(lambda: metric(model=net, x_batch=xx.numpy(), y_batch=y.numpy(),
                                           a_batch=mm[:, None].numpy(), device="cpu", softmax=True,
                                           channel_first=True, batch_size=args.batch_size))
        runs.append((f"deletion {label} (quantus)", wall, cpu, fwd if label == "embedded" else 0,
                     {"library": f"quantus {quantus.__version__}", "per_step": ps}))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=4)
    ap.add_argument("--window", type=int, default=32)
    ap.add_argument("--stride", type=int, default=16)
    ap.add_argument("--steps", type=int, default=50, help="deletion/insertion steps")
    ap.add_argument("--rise-masks", type=int, default=256, help="RISE masks (0 to skip)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=3, help="repeats of the unit-cost measurement")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--no-captum", action="store_true")
    ap.add_argument("--no-quantus", action="store_true")
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args(argv)

    sl.set_progress(False)
    if args.threads:
        torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    loaded = models.load("efficientnet_lite0")
    model = loaded.model.eval()
    for p in model.parameters():  # as in a model session
        p.requires_grad_(False)
    photos = list(sample_images.samples().values())[: args.images]
    x = torch.stack([loaded.preprocess(p.image) for p in photos])
    B, C, H, W = x.shape
    with torch.no_grad():
        targets = model(x).argmax(1).tolist()

    unit_before = forward_unit_cost(model, x, args.batch_size, args.repeat)
    print(f"no-grad forward at batch {args.batch_size}: {unit_before[0] * 1000:.1f} ms/image wall, "
          f"{unit_before[1] * 1000:.1f} ms/image CPU (load average {load_before[0]:.1f} on {os.cpu_count()} cores, "
          f"{torch.get_num_threads()} torch threads)", flush=True)
    runs = []  # (name, wall, cpu, forward_images, extra)

    # -- occlusion: ours, then Captum at the same settings --------------------------------------
    occ = dict(window=args.window, stride=args.stride, batch_size=args.batch_size)
    sl.explain(model, x[:1], "occlusion", target=targets[:1], window=H, stride=H)  # warm-up (2 forwards)
    wall, cpu, expl = once(lambda: sl.explain(model, x, "occlusion", target=targets, **occ))
    windows = (math.ceil((H - args.window) / args.stride) + 1) * (math.ceil((W - args.window) / args.stride) + 1)
    assert expl.cost.forward_images == B * (1 + windows) and expl.cost.backward_images == 0
    runs.append(("occlusion (ours)", wall, cpu, expl.cost.forward_images,
                 {"library": "saliencylab", "params": occ, "windows": windows}))
    ours_maps = expl.maps
    # what a user gets without tuning: our default batch_size=None (automatic for the device)
    occ_default = dict(window=args.window, stride=args.stride)
    wall, cpu, expl = once(lambda: sl.explain(model, x, "occlusion", target=targets, **occ_default))
    runs.append(("occlusion (ours default)", wall, cpu, expl.cost.forward_images,
                 {"library": "saliencylab", "params": occ_default, "windows": windows,
                  "rows_per_pass": round(expl.cost.forward_images / max(1, expl.cost.forward_calls))}))

    if not args.no_captum:
        try:
            import captum
            from captum.attr import Occlusion
        except ImportError:
            captum = None
        if captum is not None:
            per_eval = max(1, args.batch_size // B)

            def captum_occlusion():
                return Occlusion(model).attribute(x, sliding_window_shapes=(C, args.window, args.window),
                                                  strides=(C, args.stride, args.stride), baselines=0,
                                                  target=targets, perturbations_per_eval=per_eval)

            wall, cpu, ref = once(captum_occlusion)
            diff = float((ref.sum(1) - ours_maps).abs().max())
            # Captum: one clean forward of the batch + one forward per window per image (the same count)
            runs.append(("occlusion (captum)", wall, cpu, B * (1 + windows),
                         {"library": f"captum {captum.__version__}", "perturbations_per_eval": per_eval,
                          "max_abs_difference_to_ours": diff}))
            # what a user gets without tuning: Captum's default perturbations_per_eval=1 (batches of B)
            wall, cpu, _ = once(lambda: Occlusion(model).attribute(
                x, sliding_window_shapes=(C, args.window, args.window), strides=(C, args.stride, args.stride),
                baselines=0, target=targets))
            runs.append(("occlusion (captum default)", wall, cpu, B * (1 + windows),
                         {"library": f"captum {captum.__version__}", "perturbations_per_eval": 1}))

    # -- RISE ---------------------------------------------------------------------------------
    if args.rise_masks:
        rise = dict(masks=args.rise_masks, batch_size=args.batch_size)
        wall, cpu, expl = once(lambda: sl.explain(model, x, "rise", target=targets, **rise))
        runs.append(("rise (ours)", wall, cpu, expl.cost.forward_images, {"library": "saliencylab", "params": rise}))

    # -- deletion / insertion of the occlusion maps ---------------------------------------------
    for metric in ("deletion", "insertion"):
        instance = sl.metrics.build(metric, steps=args.steps, batch_size=args.batch_size)
        wall, cpu, measured = once(lambda: instance.measure(model, x, ours_maps, targets))
        scores = measured.scores
        runs.append((f"{metric} (ours)", wall, cpu, measured.cost.forward_images,
                     {"library": "saliencylab", "params": {"steps": args.steps, "batch_size": args.batch_size,
                                                           "baseline": repr(instance.baseline)},
                      "scores": [round(float(s), 4) for s in scores]}))

    # -- Quantus pixel flipping = our deletion curve, same ordering, baseline, steps ---------------
    if not args.no_quantus:
        quantus_runs(runs, model, x, ours_maps, targets, args)

    overhead = engine_overhead(x, args.batch_size, args.window, args.stride, args.steps, args.rise_masks)

    # the machine may be shared: measure the unit cost again and use the mean of both measurements
    unit_after = forward_unit_cost(model, x, args.batch_size, args.repeat)
    t_wall = (unit_before[0] + unit_after[0]) / 2
    t_cpu = (unit_before[1] + unit_after[1]) / 2
    load_after = os.getloadavg()

    rows = []
    for name, wall, cpu, fwd, extra in runs:
        rows.append({"run": name, "forward_images": fwd,
                     "wall_seconds_per_image": wall / B, "wall_bound_seconds_per_image": fwd * t_wall / B,
                     "wall_ratio_to_bound": wall / (fwd * t_wall) if fwd else float("nan"),
                     "cpu_seconds_per_image": cpu / B, "cpu_bound_seconds_per_image": fwd * t_cpu / B,
                     "cpu_ratio_to_bound": cpu / (fwd * t_cpu) if fwd else float("nan"), **extra})
    by_name = {r["run"]: r for r in rows}
    captum_row = by_name.get("occlusion (captum)")

    header = (f"{'run':20s} {'fwd imgs':>8s} {'wall s/img':>10s} {'bound':>7s} {'ratio':>6s} "
              f"{'CPU s/img':>10s} {'bound':>7s} {'ratio':>6s}")
    print(header)
    for r in rows:
        print(f"{r['run']:20s} {r['forward_images']:8d} {r['wall_seconds_per_image']:10.3f} "
              f"{r['wall_bound_seconds_per_image']:7.3f} {r['wall_ratio_to_bound']:6.2f} "
              f"{r['cpu_seconds_per_image']:10.3f} {r['cpu_bound_seconds_per_image']:7.3f} "
              f"{r['cpu_ratio_to_bound']:6.2f}")
    ours = by_name["occlusion (ours)"]
    if captum_row is not None:
        wall_ratio = captum_row["wall_seconds_per_image"] / ours["wall_seconds_per_image"]
        cpu_ratio = captum_row["cpu_seconds_per_image"] / ours["cpu_seconds_per_image"]
        print(f"captum / ours (occlusion): wall {wall_ratio:.2f}, CPU {cpu_ratio:.2f}; "
              f"max |captum (channel-summed) - ours| = {captum_row['max_abs_difference_to_ours']:.2e}")
    for name, o in overhead.items():
        print(f"engine overhead, {name:9s} (null model): {o['wall_ms_per_row']:.2f} ms/row wall, "
              f"{o['cpu_ms_per_row']:.2f} ms/row CPU = {o['cpu_ms_per_row'] / (t_cpu * 1000):.1%} of a forward (CPU)")
    print(f"forward ms/image wall {unit_before[0] * 1000:.1f} before, {unit_after[0] * 1000:.1f} after; "
          f"CPU {unit_before[1] * 1000:.1f} before, {unit_after[1] * 1000:.1f} after; "
          f"load average {load_before[0]:.1f} before, {load_after[0]:.1f} after")

    result = {
        "model": loaded.name, "images": B, "image_size": [H, W], "batch_size": args.batch_size,
        "window": args.window, "stride": args.stride, "steps": args.steps,
        "forward_wall_seconds_per_image": t_wall, "forward_cpu_seconds_per_image": t_cpu,
        "forward_before_after": {"wall": [unit_before[0], unit_after[0]], "cpu": [unit_before[1], unit_after[1]]},
        "load_average_before": load_before, "load_average_after": load_after, "cpu_count": os.cpu_count(),
        "torch": torch.__version__, "threads": torch.get_num_threads(), "python": sys.version.split()[0],
        "machine": platform.machine(), "processor": platform.processor(), "runs": rows,
        "engine_overhead_null_model": overhead,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "perturbation.json").write_text(json.dumps(result, indent=2))
    lines = [
        f"Model {loaded.name}, {B} images {H}x{W}, batch {args.batch_size}, {torch.get_num_threads()} torch "
        f"thread(s). No-grad forward: {t_wall * 1000:.1f} ms/image wall, {t_cpu * 1000:.1f} ms/image CPU "
        f"(mean of before and after the runs). Load average {load_before[0]:.1f} -> {load_after[0]:.1f} on "
        f"{os.cpu_count()} cores.", "",
        "| run | forward images | wall s/image | wall bound | wall ratio | CPU s/image | CPU bound | CPU ratio |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['run']} | {r['forward_images']} | {r['wall_seconds_per_image']:.3f} | "
                     f"{r['wall_bound_seconds_per_image']:.3f} | {r['wall_ratio_to_bound']:.2f} | "
                     f"{r['cpu_seconds_per_image']:.3f} | {r['cpu_bound_seconds_per_image']:.3f} | "
                     f"{r['cpu_ratio_to_bound']:.2f} |")
    if captum_row is not None:
        lines += ["", f"Occlusion window {args.window} stride {args.stride} ({windows} windows per image): "
                      f"captum / ours = {captum_row['wall_seconds_per_image'] / ours['wall_seconds_per_image']:.2f} "
                      f"(wall), {captum_row['cpu_seconds_per_image'] / ours['cpu_seconds_per_image']:.2f} (CPU); "
                      f"max abs difference {captum_row['max_abs_difference_to_ours']:.2e}."]
    pairs = [("occlusion (captum)", "occlusion (ours)"), ("occlusion (captum default)", "occlusion (ours)"),
             ("occlusion (captum default)", "occlusion (ours default)"),
             ("deletion embedded (quantus)", "deletion embedded (ours)"),
             ("deletion small CNN 32x32 (quantus)", "deletion small CNN 32x32 (ours)")]
    found = [(a, b) for a, b in pairs if a in by_name and b in by_name]
    if found:
        lines += ["", "| peer run | ours | peer / ours (wall) | peer / ours (CPU) |", "|---|---|---|---|"]
        for a, b in found:
            lines.append(f"| {a} | {b} | {by_name[a]['wall_seconds_per_image'] / by_name[b]['wall_seconds_per_image']:.2f} | "
                         f"{by_name[a]['cpu_seconds_per_image'] / by_name[b]['cpu_seconds_per_image']:.2f} |")
            print(f"{a} / {b}: wall {by_name[a]['wall_seconds_per_image'] / by_name[b]['wall_seconds_per_image']:.2f}")
    lines += ["", "Engine overhead per perturbed row, measured with a model that only averages the image "
                  "(so the run's time is masks, blending, gathering and scoring):", "",
              "| run | wall ms/row | CPU ms/row | CPU share of a forward |", "|---|---|---|---|"]
    for name, o in overhead.items():
        lines.append(f"| {name} | {o['wall_ms_per_row']:.2f} | {o['cpu_ms_per_row']:.2f} | "
                     f"{o['cpu_ms_per_row'] / (t_cpu * 1000):.1%} |")
    (out / "perturbation.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out / 'perturbation.json'} and {out / 'perturbation.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
