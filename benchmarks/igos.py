"""I-GOS / iGOS++ on the embedded model and bundled photos: faithfulness, passes, seconds, batching.

What it measures (all in one process, on this machine):
- deletion and insertion (the I-GOS protocol: blurred baseline, 28x28 ranking, 50 steps, right
  Riemann sum; softmax probability) for I-GOS, iGOS++, gradient, integrated gradients, Grad-CAM and
  a random order, with 95% percentile-bootstrap intervals over images, and paired bootstrap
  intervals for the differences that the claims are about;
- passes per image (forward images, backward images) against the authors' code (2,245 forward /
  300 backward images per I-GOS explanation, 9,220 / 1,200 per iGOS++, from the issue), and
  optionally against our re-implementation of the authors' line-search schedule on the same images
  (`--variants igos@authors`, expensive) and our other line searches (`igos@reuse`);
- seconds per image against the pass bound: backward_images * t(fwd+bwd) + forward-only images *
  t(fwd), unit costs measured on the same model at the method's batch size;
- batched (B images in one call) against B single-image calls, seconds per image;
- `--stability`: seed-to-seed agreement of the 28x28 masks (Spearman) on the bundled photos, for single
  noise draws and for `seeds=k` averages (see `stability`).

Usage (the figures in docs/igos.md):
    python benchmarks/igos.py --images chelsea,coffee,rocket,astronaut --threads 2 \
        --variants igos@reuse,igos@authors,igos_plus_plus@reuse --batched 8 --batched-iterations 3 \
        --out benchmarks/results
    python benchmarks/igos.py --stability --stability-seeds 4 --iterations 8 --threads 1
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

import numpy as np
import torch

import saliencylab as sl
from saliencylab import images as sample_images
from saliencylab import models
from saliencylab.methods import build

warnings.filterwarnings("ignore")
os.environ.setdefault("SALIENCYLAB_PROGRESS", "0")

AUTHORS = {  # per explanation, from the issue (the authors' code with its defaults, this CPU)
    "igos": {"forward_images": 2245, "backward_images": 300, "seconds_per_image": 53.0,
             "deletion": 0.096, "insertion": 0.442},
    "igos_plus_plus": {"forward_images": 9220, "backward_images": 1200, "seconds_per_image": 168.0,
                       "deletion": 0.094, "insertion": 0.429},
    "gradient": {"deletion": 0.197, "insertion": 0.328},
    "random": {"deletion": 0.242, "insertion": 0.234},
}


def bootstrap(values, n=10000, seed=0):
    """Mean and 95% percentile-bootstrap interval over images."""
    v = np.asarray(values, dtype=np.float64)
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, len(v), size=(n, len(v)))].mean(1)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return {"mean": float(v.mean()), "lo": float(lo), "hi": float(hi), "n": int(len(v))}


def timed(fn, repeat):
    """Median wall and CPU (process) seconds of `repeat` calls after a warm-up call."""
    fn()
    wall, cpu = [], []
    for _ in range(repeat):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return statistics.median(wall), statistics.median(cpu)


def unit_costs(model, x, batch_size, repeat=2):
    """Seconds per image of a no-grad forward and of a forward+backward to the input, at batch_size:
    ((wall forward, wall forward+backward), (CPU forward, CPU forward+backward))."""
    rows = x.repeat((batch_size + len(x) - 1) // len(x), 1, 1, 1)[:batch_size]
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        def fwd():
            with torch.no_grad():
                model(rows)

        def fwd_bwd():
            inp = rows.detach().requires_grad_(True)
            torch.autograd.grad(model(inp)[:, 0].sum(), inp)

        (wf, cf), (wfb, cfb) = timed(fwd, repeat), timed(fwd_bwd, repeat)
        return (wf / batch_size, wfb / batch_size), (cf / batch_size, cfb / batch_size)
    finally:
        for p, f in flags:
            p.requires_grad_(f)


def run_method(model, x, name, params, units):
    """Explain x with one batched call; passes, wall and CPU seconds against the pass bound."""
    (t_f, t_fb), (c_f, c_fb) = units
    method = build(name, model, **params)
    t0, p0 = time.perf_counter(), time.process_time()
    e = sl.explain(model, x, method)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - p0
    c = e.cost
    B = len(x)
    only_fwd = c.forward_images - c.backward_images
    bound = c.backward_images * t_fb + only_fwd * t_f
    cpu_bound = c.backward_images * c_fb + only_fwd * c_f
    info = {"method": name, "params": {k: v for k, v in params.items()}, "seconds_per_image": seconds / B,
            "forward_images_per_image": c.forward_images / B, "backward_images_per_image": c.backward_images / B,
            "bound_seconds_per_image": bound / B, "ratio_to_bound": seconds / bound if bound else None,
            "cpu_seconds_per_image": cpu / B, "cpu_bound_seconds_per_image": cpu_bound / B,
            "cpu_ratio_to_bound": cpu / cpu_bound if cpu_bound else None}
    hist = e.extras.get("history")
    if hist and hist["candidates"]:
        info["line_search_candidates_per_iteration"] = float(np.mean(hist["candidates"]))
        info["accepted_steps_image0"] = [a[0] for a in hist["alpha"]]
    return e.maps, e.targets, info


def stability(model, x, names, *, method="igos", seeds=4, params=None):
    """Seed-to-seed agreement of the mask at its own resolution (28x28), per photo.

    One call with `seeds=S` (S even): its `extras["seed_masks"]` are the S single-seed masks (replica r
    is exactly the single-seed run with seed r; tested), and `seeds=k` returns the mean of the first k
    of them (tested), so one call yields both: k = 1: the mean Spearman over the pairs of single seeds
    (r, S/2 + r); k > 1 (k <= S/2): Spearman of the seeds=k mask of seeds 0..k-1 and the one of seeds
    S/2..S/2+k-1 (disjoint draws). Returns {"per_photo": {name: {k: rho}}, "mean": {k: rho}, cost}."""
    from saliencylab.metrics.similarity import spearman

    params = dict(params or {})
    half = seeds // 2
    t0 = time.perf_counter()
    e = sl.explain(model, x, method, image_ids=names, seed=0, seeds=seeds, **params)
    seconds = time.perf_counter() - t0
    masks = e.extras["seed_masks"].double()  # (S, B, h, w)
    out = {}
    for k in range(1, half + 1):
        if k == 1:
            rho = torch.stack([spearman(masks[r], masks[half + r]) for r in range(half)]).mean(0)
        else:
            rho = spearman(masks[:k].mean(0), masks[half:half + k].mean(0))
        out[k] = rho.tolist()
    return {"method": method, "params": params, "seeds": seeds, "images": names,
            "per_photo": {n: {k: out[k][j] for k in out} for j, n in enumerate(names)},
            "mean": {k: float(np.mean(v)) for k, v in out.items()},
            "seconds": seconds, "forward_images": e.cost.forward_images, "backward_images": e.cost.backward_images,
            "seed_masks": masks.tolist()}


def stability_markdown(r, command):
    ks = sorted(r["mean"], key=int)
    lines = [f"Command: `{command}`", "",
             f"{r['method']} {r['params']}, {r['seeds']} noise draws in one call ({r['seconds']:.0f} s, "
             f"{r['forward_images']} forward / {r['backward_images']} backward images); Spearman of the "
             "28x28 masks between disjoint draws.", "",
             "| photo | " + " | ".join("1 seed" if int(k) == 1 else f"seeds={k}" for k in ks) + " |",
             "|---|" + "---|" * len(ks)]
    for name, row in r["per_photo"].items():
        lines.append(f"| {name} | " + " | ".join(f"{row[k]:.2f}" for k in ks) + " |")
    lines.append("| mean | " + " | ".join(f"{r['mean'][k]:.2f}" for k in ks) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", default="chelsea,coffee,rocket,astronaut")
    ap.add_argument("--methods", default="igos,igos_plus_plus,gradient,integrated_gradients,gradcam,random")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave torch's default)")
    ap.add_argument("--batch-size", type=int, default=10)
    ap.add_argument("--variants", default="", help="comma list of METHOD@LINE_SEARCH to also run, e.g. "
                    "igos@reuse,igos@authors (line_search='authors' is the authors' pass schedule; expensive)")
    ap.add_argument("--batched", type=int, default=8, help="B for batched vs single-image timing (0: skip)")
    ap.add_argument("--batched-iterations", type=int, default=15)
    ap.add_argument("--batched-line-search", default="reuse")
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--stability", action="store_true", help="only the seed-to-seed agreement (see `stability`)")
    ap.add_argument("--stability-seeds", type=int, default=4, help="noise draws (even): half against half")
    ap.add_argument("--stability-method", default="igos")
    ap.add_argument("--iterations", type=int, default=0, help="--stability: optimizer iterations (0: default)")
    ap.add_argument("--steps", type=int, default=0, help="--stability: path points (0: default)")
    ap.add_argument("--line-search", default="", help="--stability: line_search (empty: default)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    loaded = models.load("efficientnet_lite0")
    model = loaded.model
    photos = sample_images.samples()
    names = args.images.split(",")
    x = loaded.preprocess_batch([photos[n].image for n in names])
    if args.stability:
        params = {"batch_size": args.batch_size}
        params.update({k: v for k, v in (("iterations", args.iterations), ("steps", args.steps),
                                          ("line_search", args.line_search)) if v})
        r = stability(model, x, names, method=args.stability_method, seeds=args.stability_seeds, params=params)
        r["threads"] = torch.get_num_threads()
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        tag = "_".join(f"{k}{v}" for k, v in params.items() if k != "batch_size")
        stem = f"igos_stability_{args.stability_method}{'_' + tag if tag else ''}"
        (out / f"{stem}.json").write_text(json.dumps(r, indent=1))
        md = stability_markdown(r, "python benchmarks/igos.py " + " ".join(sys.argv[1:]))
        (out / f"{stem}.md").write_text(md)
        print(md)
        return
    units = unit_costs(model, x, args.batch_size)
    (t_f, t_fb), (c_f, c_fb) = units
    print(f"unit costs: forward {t_f * 1e3:.1f} ms/image, forward+backward {t_fb * 1e3:.1f} ms/image "
          f"(CPU {c_f * 1e3:.1f} / {c_fb * 1e3:.1f})", flush=True)
    load_before = os.getloadavg()

    results = {"images": names, "threads": torch.get_num_threads(), "batch_size": args.batch_size,
               "unit_costs": {"forward_s": t_f, "forward_backward_s": t_fb,
                                                              "cpu_forward_s": c_f, "cpu_forward_backward_s": c_fb}, "authors_reference": AUTHORS,
               "machine": {"platform": platform.platform(), "python": sys.version.split()[0],
                           "torch": torch.__version__, "cpus": os.cpu_count(), "loadavg_start": load_before},
               "methods": {}}
    deletion = sl.metrics.build("deletion", protocol="igos", batch_size=args.batch_size)
    insertion = sl.metrics.build("insertion", protocol="igos", batch_size=args.batch_size)
    todo = [(m, {}) for m in args.methods.split(",") if m]
    todo += [(v.split("@")[0], {"line_search": v.split("@")[1]}) for v in args.variants.split(",") if v]
    per_image = {}
    for name, extra in todo:
        label = name if not extra else f"{name}@{extra['line_search']}"
        if name == "random":
            g = torch.Generator().manual_seed(0)
            maps = torch.rand(len(x), *x.shape[-2:], generator=g)
            info = {"method": "random"}
        else:
            params = dict(extra)
            if "batch_size" in sl.methods.parameters(name):
                params["batch_size"] = args.batch_size
            maps, _, info = run_method(model, x, name, params, units)
        d = deletion(model, x, maps).tolist()
        i = insertion(model, x, maps).tolist()
        per_image[label] = {"deletion": d, "insertion": i}
        info.update({"deletion": bootstrap(d), "insertion": bootstrap(i), "per_image": per_image[label]})
        results["methods"][label] = info
        save(args.out, results, partial=True)
        print(f"{label:32s} deletion {info['deletion']['mean']:.3f} insertion {info['insertion']['mean']:.3f} "
              + (f"fwd/img {info['forward_images_per_image']:.0f} bwd/img {info['backward_images_per_image']:.0f} "
                 f"s/img {info['seconds_per_image']:.1f} (x{info['ratio_to_bound']:.2f} bound; CPU "
                 f"{info['cpu_seconds_per_image']:.1f} s, x{info['cpu_ratio_to_bound']:.2f} CPU bound)"
                 if "seconds_per_image" in info else ""), flush=True)

    summarize(results)

    # batched vs single
    if args.batched:
        B = args.batched
        pool = [photos[n].image for n in sorted(photos)]
        xs = loaded.preprocess_batch(pool)
        xs = torch.cat([xs, xs.flip(-1)])[:B]  # bundled photos and their mirror images
        params = {"iterations": args.batched_iterations, "batch_size": args.batch_size,
                  "line_search": args.batched_line_search}
        # image ids key each image's noise: a single-image call draws what the batched call drew for it
        ids = [f"image{j}" for j in range(B)]
        t0, p0 = time.perf_counter(), time.process_time()
        e = sl.explain(model, xs, "igos", image_ids=ids, **params)
        batched, batched_cpu = time.perf_counter() - t0, time.process_time() - p0
        t0, p0 = time.perf_counter(), time.process_time()
        singles = [sl.explain(model, xs[j:j + 1], "igos", image_ids=ids[j:j + 1], **params) for j in range(B)]
        single, single_cpu = time.perf_counter() - t0, time.process_time() - p0
        same = float(max((e.maps[j] - s.maps[0]).abs().max() for j, s in enumerate(singles)))
        results["batched_vs_single"] = {
            "B": B, "iterations": args.batched_iterations, "line_search": args.batched_line_search,
            "batched_seconds_per_image": batched / B,
            "single_seconds_per_image": single / B, "speedup": single / batched,
            "batched_cpu_seconds_per_image": batched_cpu / B, "single_cpu_seconds_per_image": single_cpu / B,
            "cpu_speedup": single_cpu / batched_cpu,
            "batched_forward_images": e.cost.forward_images, "single_forward_images":
                sum(s.cost.forward_images for s in singles), "max_abs_map_difference": same}
        print(f"batched B={B}: {batched / B:.1f} s/img, single: {single / B:.1f} s/img (x{single / batched:.2f}; "
              f"CPU x{single_cpu / batched_cpu:.2f}); max |map difference| {same:.2e}", flush=True)
    results["machine"]["loadavg_end"] = os.getloadavg()

    save(args.out, results)
    print(f"wrote {Path(args.out) / 'igos.json'} and {Path(args.out) / 'igos.md'}")


def summarize(results):
    """Paired differences (the claims) and passes against the authors' code, from results["methods"]."""
    per_image = {k: v["per_image"] for k, v in results["methods"].items() if "per_image" in v}
    t_f, t_fb = results["unit_costs"]["forward_s"], results["unit_costs"]["forward_backward_s"]
    diffs = {}

    def paired(a, b, metric):
        if a in per_image and b in per_image:
            v = np.subtract(per_image[a][metric], per_image[b][metric])
            diffs[f"{metric}: {a} - {b}"] = bootstrap(v)

    for m in ("igos", "igos_plus_plus"):
        for other in ("gradient", "integrated_gradients", "gradcam", "random"):
            paired(m, other, "deletion")
        for ls in ("lookahead", "reuse", "authors"):
            paired(f"{m}@{ls}", m, "deletion")
            paired(f"{m}@{ls}", m, "insertion")
    paired("igos_plus_plus", "igos", "insertion")
    paired("igos_plus_plus", "igos", "deletion")
    results["paired_differences"] = diffs

    def reductions(r, a):
        fwd, bwd = r["forward_images_per_image"], r["backward_images_per_image"]
        return {"forward_images": fwd, "backward_images": bwd,
                "authors_forward_images": a["forward_images"], "authors_backward_images": a["backward_images"],
                "forward_reduction": a["forward_images"] / fwd,
                "total_reduction": (a["forward_images"] + a["backward_images"]) / (fwd + bwd),
                # the same passes weighted by their unit costs (forward-only vs forward+backward)
                "pass_seconds_reduction": ((a["forward_images"] - a["backward_images"]) * t_f
                                           + a["backward_images"] * t_fb) / ((fwd - bwd) * t_f + bwd * t_fb)}

    passes = {}
    for m in ("igos", "igos_plus_plus"):
        for label in (m, f"{m}@lookahead", f"{m}@reuse", f"{m}@authors"):
            if label in results["methods"]:
                passes[label] = reductions(results["methods"][label], AUTHORS[m])
    results["passes"] = passes


def save(out, results, partial=False, command=None):
    """Write the JSON (after every method, so that an interrupted run keeps what it measured) and the table."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "igos.json").write_text(json.dumps({**results, "partial": partial}, indent=1))
    if not partial:
        command = command or "python benchmarks/igos.py " + " ".join(sys.argv[1:])
        (out / "igos.md").write_text(markdown(results, command))


def fmt(ci):
    return f"{ci['mean']:.3f} [{ci['lo']:.3f}, {ci['hi']:.3f}]"


def markdown(r, command):
    lines = [f"# I-GOS / iGOS++ benchmark", "", f"Command: `{command}`", "",
             f"Images: {', '.join(r['images'])}; torch threads {r['threads']}; batch size {r['batch_size']}; "
             f"load average at start/end {r['machine']['loadavg_start'][0]:.1f} / "
             f"{r['machine']['loadavg_end'][0]:.1f} ({r['machine']['cpus']} cores).", "",
             f"Unit costs: forward {r['unit_costs']['forward_s'] * 1e3:.0f} ms/image, forward+backward "
             f"{r['unit_costs']['forward_backward_s'] * 1e3:.0f} ms/image (CPU time "
             f"{r['unit_costs'].get('cpu_forward_s', float('nan')) * 1e3:.0f} / "
             f"{r['unit_costs'].get('cpu_forward_backward_s', float('nan')) * 1e3:.0f} ms/image).", "",
             "## Deletion / insertion (I-GOS protocol), mean [95% bootstrap interval over images]", "",
             "| method | deletion (lower better) | insertion (higher better) | fwd img/image | bwd img/image "
             "| s/image | x pass bound | CPU s/image | x CPU pass bound | authors' code (del / ins) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, m in r["methods"].items():
        a = r["authors_reference"].get(name, {})
        ref = f"{a['deletion']:.3f} / {a['insertion']:.3f}" if "deletion" in a else ""
        if "seconds_per_image" in m:
            cost = (f"{m['forward_images_per_image']:.0f} | {m['backward_images_per_image']:.0f} | "
                    f"{m['seconds_per_image']:.1f} | {m['ratio_to_bound']:.2f} | "
                    f"{m.get('cpu_seconds_per_image', float('nan')):.1f} | {m.get('cpu_ratio_to_bound', float('nan')):.2f}")
        else:
            cost = " | | | | | "
        lines.append(f"| {name} | {fmt(m['deletion'])} | {fmt(m['insertion'])} | {cost} | {ref} |")
    lines += ["", "## Paired differences (per image), mean [95% bootstrap interval]", "",
              "| difference | mean [interval] |", "|---|---|"]
    lines += [f"| {k} | {fmt(v)} |" for k, v in r["paired_differences"].items()]
    if r.get("passes"):
        lines += ["", "## Passes per explanation against the authors' code", "",
                  "| method | forward images | backward images | authors' forward / backward | fewer forward passes "
                  "| fewer passes (fwd+bwd) | less pass time (passes x unit costs) |", "|---|---|---|---|---|---|---|"]
        for name, p in r["passes"].items():
            lines.append(f"| {name} | {p['forward_images']:.0f} | {p['backward_images']:.0f} | "
                         f"{p['authors_forward_images']} / {p['authors_backward_images']} | "
                         f"{p['forward_reduction']:.2f}x | {p['total_reduction']:.2f}x | "
                         f"{p.get('pass_seconds_reduction', float('nan')):.2f}x |")
    if r.get("batched_vs_single"):
        b = r["batched_vs_single"]
        lines += ["", "## Batched against single-image calls (I-GOS)", "",
                  f"B = {b['B']}, {b['iterations']} iterations: batched {b['batched_seconds_per_image']:.1f} s/image, "
                  f"single {b['single_seconds_per_image']:.1f} s/image (x{b['speedup']:.2f}; CPU time "
                  f"x{b.get('cpu_speedup', float('nan')):.2f}); forward images "
                  f"{b['batched_forward_images']} vs {b['single_forward_images']}; largest map difference "
                  f"{b['max_abs_map_difference']:.1e}."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
