"""Cost of the faithfulness leaderboard: seconds and forward passes per image, images per hour, peak memory.

Three parts, all on the embedded EfficientNet-Lite0 and photos made from the bundled ones (the photos,
their mirror images, and copies shifted by 16k pixels, cyclically: `photos(n)`):

1. metrics: each metric of the default faithfulness leaderboard (deletion, insertion, ROAD,
   MoRF-LeRF, sensitivity-N, sparseness; the suite's settings, `runs.leaderboard._FAITHFULNESS_METRIC_PARAMS`)
   on gradient maps: seconds per image (wall and this process's CPU time), forward images per image,
   and the forward bound (forward images x the model's no-grad cost per image at the engine's batch
   size, measured in this process). `--compare` alternates each metric with the engine's shared
   passes and fast paths switched off (`perturbation.FAST = False`, the code before issue 16: no shared
   rows, no channels-last inputs), in the same process, and reports both and whether the scores agree.
2. leaderboard: every method of the suite's default list at its photo preset (explanation time) and
   the six metrics on its maps: seconds per image for the whole leaderboard, and images per hour.
3. memory: peak RSS (resource.getrusage, in fresh subprocesses) of a streamed run (batches of 8:
   photos made, explained, measured, only the scores kept) at two image counts, with tiny settings
   (gradient maps, few steps) so that the counts finish in minutes; at 224x224 (the default) the
   engine's channels-last path and batch sizes are the leaderboard's.

With one thread (`--threads 1`, the default) the CPU times are the ones to trust on a shared machine.

Usage:  python benchmarks/faithfulness.py [--images 4] [--leaderboard-images 2] [--methods gradient,...]
                                          [--compare] [--memory 64,512] [--threads 1] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch

warnings.filterwarnings("ignore")

import saliencylab as sl  # noqa: E402
from saliencylab import metrics as _metrics  # noqa: E402
from saliencylab import perturbation  # noqa: E402
from saliencylab.runs import leaderboard as lb  # noqa: E402

# the issue's default leaderboard (issue 16, item 4)
METRICS = ("deletion", "insertion", "road", "morf_lerf", "sensitivity_n", "sparseness")


def metric_params() -> dict:
    table = lb._FAITHFULNESS_METRIC_PARAMS["default"]
    return {m: dict(table.get(m, {})) for m in METRICS}


def photos(n: int, size: int | None = None):
    """The model and n photos: the bundled ones, their mirrors, then both shifted by 16, 32, ... pixels."""
    loaded, x, _ = lb.embedded_photos()
    base = torch.cat([x, x.flip(-1)])
    out, shift = [], 0
    while sum(len(t) for t in out) < n:
        out.append(base if shift == 0 else base.roll((shift, shift), dims=(-2, -1)))
        shift += 16
    x = torch.cat(out)[:n]
    if size is not None:
        x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return loaded.model.eval(), x


def timed(fn):
    w0, c0 = time.perf_counter(), time.process_time()
    result = fn()
    return time.perf_counter() - w0, time.process_time() - c0, result


def forward_cost(model, x, batch: int, repeat: int = 5, channels_last: bool = True) -> tuple[float, float]:
    """(wall, CPU) seconds per image of a no-grad forward at the engine's batch size (median), with the
    engine's input layout (channels-last on CPU for large images, `perturbation._forward_fast`) or not."""
    rows = x.repeat((batch + len(x) - 1) // len(x), 1, 1, 1)[:batch]
    min_pixels = perturbation.CHANNELS_LAST_MIN_PIXELS
    if channels_last and min_pixels is not None and rows.shape[-2] * rows.shape[-1] >= min_pixels:
        rows = rows.contiguous(memory_format=torch.channels_last)

    def fwd():
        with torch.no_grad():
            model(rows)

    fwd()
    walls, cpus = zip(*[timed(fwd)[:2] for _ in range(repeat)])
    return statistics.median(walls) / batch, statistics.median(cpus) / batch


def measure_metric(name, params, model, x, maps, target):
    m = _metrics.build(name, **params)
    wall, cpu, meas = timed(lambda: m.measure(model if m.needs_model else None, x, maps, target))
    fwd = meas.cost.forward_images / len(x) if meas.cost is not None else 0.0
    return wall / len(x), cpu / len(x), fwd, meas.scores


def part_metrics(model, x, compare: bool, unit: tuple[float, float]) -> dict:
    with torch.no_grad():
        target = model(x).argmax(1)
    maps = sl.explain(model, x, "gradient", target=target).maps
    rows = {}
    for name, params in metric_params().items():
        modes = (True, False, True, False) if compare else (True,)
        runs = {True: [], False: []}
        for fast in modes:
            perturbation.FAST = fast
            runs[fast].append(measure_metric(name, params, model, x, maps, target))
        perturbation.FAST = True
        row = {}
        for fast in ((True, False) if compare else (True,)):
            key = "after" if fast else "before"
            r = runs[fast]
            row[key] = {"wall_s_per_image": statistics.median(t[0] for t in r),
                        "cpu_s_per_image": statistics.median(t[1] for t in r),
                        "forward_images_per_image": r[0][2],
                        "forward_bound_cpu_s_per_image": r[0][2] * unit[1]}
        if compare:
            a, b = runs[True][0][3].double(), runs[False][0][3].double()
            row["bit_identical"] = bool(torch.equal(a, b))
            row["max_abs_difference"] = float((a - b).abs().max())
        rows[name] = row
        print(name, json.dumps(row), flush=True)
    return rows


def part_leaderboard(model, x, methods, share: bool = True) -> dict:
    with torch.no_grad():
        target = model(x).argmax(1)
    mparams = lb.method_params_for(methods, small=False)
    qparams = metric_params()
    rows = {}
    # the runner's loop over methods on the same images, inside one shared_passes() scope (what
    # runs/leaderboard.py is to do): the map-independent passes run once per image
    scope = perturbation.shared_passes() if share else contextlib.nullcontext()
    with scope:
        rows = _leaderboard_rows(model, x, target, methods, mparams, qparams)
    return rows


def _leaderboard_rows(model, x, target, methods, mparams, qparams) -> dict:
    rows = {}
    for method in methods:
        wall, cpu, expl = timed(lambda: sl.explain(model, x, method, target=target, **mparams.get(method, {})))
        row = {"explain_wall_s_per_image": wall / len(x), "explain_cpu_s_per_image": cpu / len(x), "metrics": {}}
        for name, params in qparams.items():
            w, c, f, _ = measure_metric(name, params, model, x, expl.maps.detach(), target)
            row["metrics"][name] = {"wall_s_per_image": w, "cpu_s_per_image": c, "forward_images_per_image": f}
        row["metrics_wall_s_per_image"] = sum(v["wall_s_per_image"] for v in row["metrics"].values())
        row["metrics_cpu_s_per_image"] = sum(v["cpu_s_per_image"] for v in row["metrics"].values())
        rows[method] = row
        print(method, f"explain {row['explain_cpu_s_per_image']:.2f} s CPU/img, metrics "
              f"{row['metrics_cpu_s_per_image']:.2f} s CPU/img", flush=True)
    return rows


TINY_METRICS = {"deletion": {"steps": 2}, "insertion": {"steps": 2}, "road": {"fractions": (0.0, 0.5)},
                "morf_lerf": {"steps": 2, "tile": 16}, "sensitivity_n": {"samples": 2, "fraction": 0.1},
                "sparseness": {}}


def memory_child(n: int, size: int, batch: int = 8) -> dict:
    """Streamed run over n images (made batch by batch): peak RSS in bytes."""
    model, base = photos(min(n, 10), size)
    scores = {m: [] for m in TINY_METRICS}
    for start in range(0, n, batch):
        idx = torch.arange(start, min(start + batch, n))
        x = base[idx % len(base)].roll(int(start // len(base)), dims=-1)  # a new batch each time
        with torch.no_grad():
            target = model(x).argmax(1)
        maps = sl.explain(model, x, "gradient", target=target).maps
        with perturbation.shared_passes():  # as the leaderboard runs (its cache must not grow either)
            for name, params in TINY_METRICS.items():
                m = _metrics.build(name, **params)
                scores[name].append(m(model if m.needs_model else None, x, maps, target).to(torch.float16))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    return {"images": n, "size": size, "peak_rss_bytes": peak,
            "rows": sum(len(t) for v in scores.values() for t in v)}


def part_memory(counts, size: int, threads: int) -> list:
    out = []
    for n in counts:
        cmd = [sys.executable, __file__, "--memory-child", str(n), "--memory-size", str(size), "--threads", str(threads)]
        t0 = time.perf_counter()
        res = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "SALIENCYLAB_PROGRESS": "0"})
        if res.returncode:
            raise RuntimeError(res.stderr[-2000:])
        row = json.loads(res.stdout.strip().splitlines()[-1])
        row["seconds"] = time.perf_counter() - t0
        out.append(row)
        print("memory", json.dumps(row), flush=True)
    return out


def write_markdown(path: Path, result: dict) -> None:
    a = result["args"]
    lines = ["# Faithfulness leaderboard: cost per image", "",
             f"Command: `{result['command']}`", "",
             f"{result['machine']}; torch {result['torch']}, {a['threads']} thread(s); load average at start "
             f"{result['load_average'][0]:.1f} (a shared 2-core machine: CPU times are the ones to trust). "
             f"No-grad forward of EfficientNet-Lite0 at the engine's batch of {result['batch']}: "
             f"{result['forward_cpu_s_per_image'] * 1000:.1f} ms CPU per image with the engine's channels-last "
             f"inputs ({result.get('forward_contiguous_cpu_s_per_image', float('nan')) * 1000:.1f} ms contiguous).",
             f"Load average at the end: {result.get('load_average_end', [float('nan')])[0]:.1f}.", ""]
    if result.get("metrics"):
        lines += [f"## Metrics on gradient maps ({a['images']} photos; the suite's settings)", ""]
        compare = any("before" in r for r in result["metrics"].values())
        if compare:
            lines += ["| metric | forward images / image (before -> after) | CPU s / image before | CPU s / image "
                      "after | forward bound (CPU s) | speed-up | scores |", "|---|---|---|---|---|---|---|"]
        else:
            lines += ["| metric | forward images / image | CPU s / image | wall s / image | forward bound (CPU s) |",
                      "|---|---|---|---|---|"]
        for name, r in result["metrics"].items():
            af = r["after"]
            if compare:
                bf = r["before"]
                same = "bit-identical" if r["bit_identical"] else f"max diff {r['max_abs_difference']:.1e}"
                lines.append(f"| {name} | {bf['forward_images_per_image']:.0f} -> {af['forward_images_per_image']:.0f} "
                             f"| {bf['cpu_s_per_image']:.2f} | {af['cpu_s_per_image']:.2f} | "
                             f"{af['forward_bound_cpu_s_per_image']:.2f} | "
                             f"{bf['cpu_s_per_image'] / max(af['cpu_s_per_image'], 1e-9):.2f}x | {same} |")
            else:
                lines.append(f"| {name} | {af['forward_images_per_image']:.0f} | {af['cpu_s_per_image']:.2f} | "
                             f"{af['wall_s_per_image']:.2f} | {af['forward_bound_cpu_s_per_image']:.2f} |")
        total = sum(r["after"]["cpu_s_per_image"] for r in result["metrics"].values())
        lines += ["", f"All six metrics: {total:.1f} CPU s per image per method.", ""]
    if result.get("leaderboard"):
        rows = result["leaderboard"]
        lines += [f"## The default leaderboard ({len(rows)} methods x 6 metrics, {a['leaderboard_images']} photos)", "",
                  "| method | explain CPU s / image | metrics CPU s / image |", "|---|---|---|"]
        for m, r in rows.items():
            lines.append(f"| {m} | {r['explain_cpu_s_per_image']:.2f} | {r['metrics_cpu_s_per_image']:.2f} |")
        cpu = sum(r["explain_cpu_s_per_image"] + r["metrics_cpu_s_per_image"] for r in rows.values())
        wall = sum(r["explain_wall_s_per_image"] + r["metrics_wall_s_per_image"] for r in rows.values())
        lines += ["", f"Whole leaderboard: **{cpu:.0f} CPU s per image** ({3600 / cpu:.0f} images per hour on one "
                  f"core; wall {wall:.0f} s per image under this load). Target: 60 s per image.", ""]
    if result.get("memory"):
        lines += ["## Peak memory of a streamed run (tiny settings, batches of 8)", "",
                  "| images | image size | peak RSS (MiB) | seconds |", "|---|---|---|---|"]
        for r in result["memory"]:
            lines.append(f"| {r['images']} | {r['size']} | {r['peak_rss_bytes'] / 2**20:.0f} | {r['seconds']:.0f} |")
        m = result["memory"]
        if len(m) >= 2:
            lines += ["", f"Ratio of the peaks: {m[-1]['peak_rss_bytes'] / m[0]['peak_rss_bytes']:.3f} "
                      "(target: within 10%).", ""]
    path.write_text("\n".join(lines) + "\n")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=4, help="photos for the per-metric part (0: skip)")
    p.add_argument("--leaderboard-images", type=int, default=2, help="photos for the whole leaderboard (0: skip)")
    p.add_argument("--methods", default=None, help="comma-separated methods (default: the photo suite's list)")
    p.add_argument("--compare", action="store_true", help="alternate with the engine's fast paths off")
    p.add_argument("--memory", default="16,128", help="image counts for the peak-memory check ('' to skip)")
    p.add_argument("--memory-size", type=int, default=224, help="image side for the memory check")
    p.add_argument("--memory-child", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--no-share", action="store_true", help="leaderboard without perturbation.shared_passes()")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--name", default="faithfulness")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    os.environ.setdefault("SALIENCYLAB_PROGRESS", "0")
    if args.memory_child is not None:
        print(json.dumps(memory_child(args.memory_child, args.memory_size)))
        return
    batch = perturbation.auto_batch_size("cpu", pixels=224 * 224)
    model, x = photos(max(args.images, args.leaderboard_images, 1))
    unit = forward_cost(model, x, batch)
    plain = forward_cost(model, x, batch, channels_last=False)
    result = {"command": "python benchmarks/faithfulness.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
              "torch": torch.__version__, "args": vars(args), "load_average": os.getloadavg(), "batch": batch,
              "forward_wall_s_per_image": unit[0], "forward_cpu_s_per_image": unit[1],
              "forward_contiguous_cpu_s_per_image": plain[1]}
    if args.images:
        result["metrics"] = part_metrics(model, x[:args.images], args.compare, unit)
    if args.leaderboard_images:
        methods = args.methods.split(",") if args.methods else list(lb.PHOTO_DEFAULT_METHODS)
        result["leaderboard"] = part_leaderboard(model, x[:args.leaderboard_images], methods, not args.no_share)
    if args.memory:
        result["memory"] = part_memory([int(n) for n in args.memory.split(",")], args.memory_size, args.threads)
    result["load_average_end"] = os.getloadavg()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.name}.json").write_text(json.dumps(result, indent=1, default=float))
    write_markdown(out / f"{args.name}.md", result)
    print((out / f"{args.name}.md").read_text())


if __name__ == "__main__":
    main()
