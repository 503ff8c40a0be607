"""Every GPU claim of the project in one run: `benchmarks/gpu.sh` (under 8 minutes on one H100/H200).

What it measures, on the embedded EfficientNet-Lite0 and the bundled photos (mirrored and shifted
copies make up larger batches), all in this process on the same device:

1. device agreement: maps on the device against maps on the CPU for deterministic and for keyed-random
   methods (SmoothGrad noise and RISE masks are drawn on the CPU from (seed, purpose, image, draw), so
   the device must not change them); max |difference| relative to the map's scale, and correlation.
2. batch size: seconds per image of a no-grad forward and of a forward+backward to the input at batch
   1 .. 256. On the 2-core CPU small batches are cheapest per image; this says what a GPU does, and
   whether `batch_size=None` (64 forward / 32 forward+backward rows on accelerators) is a good default.
3. occlusion against Captum at a large batch (the same windows, the same forward images, both against
   the forward bound), and Captum's default `perturbations_per_eval=1`.
4. I-GOS batched (B=8 in one call) against eight one-image calls, seconds per image.
5. IBA: statistics estimation on bundled crops, then per-image IBA, against its pass bound.
6. leaderboard throughput: explain with several methods and score deletion, insertion and ROAD on a
   batch of images; images per second end to end (explanations and metrics).

`--tiny` runs every part at toy sizes (CPU, seconds) so the tests can check the script itself.
Writes <out>/gpu.md and <out>/gpu.json.

Usage:  bash benchmarks/gpu.sh                      # DEVICE=cuda, writes benchmarks/results/gpu.*
        python benchmarks/gpu.py --device cpu --tiny --out /tmp/gpu
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

import saliencylab as sl
from saliencylab import features, models
from saliencylab.runs.leaderboard import embedded_photos

warnings.filterwarnings("ignore")

FULL = dict(size=224, batches=(1, 4, 16, 64, 128, 256), repeat=5, occ_window=16, occ_stride=8,
            occ_images=8, occ_batch=512, igos_images=8, igos_iterations=15, igos_steps=20, igos_batch_sizes=(10, None), iba_images=16, iba_crops=1000, iba_steps=10,
            board_images=64, board_steps=50, road_fractions=(0.1, 0.3, 0.5, 0.7, 0.9), agree_images=5,
            smooth_samples=16, ig_steps=32, rise_masks=1000,
            board_methods=("gradient", "input_x_gradient", "integrated_gradients", "smoothgrad", "gradcam", "lrp",
                           "occlusion", "rise"), lrp_images=32,
            lrp_composites=("epsilon", "epsilon_plus", "epsilon_gamma_box", "epsilon_alpha2_beta1"),
            vit_images=64, vit_config=dict(img_size=224, patch_size=16, dim=192, depth=12, heads=3))
TINY = dict(size=32, batches=(1, 4), repeat=1, occ_window=16, occ_stride=16, occ_images=2, occ_batch=8,
            igos_images=2, igos_iterations=2, igos_steps=2, igos_batch_sizes=(10,), iba_images=2, iba_crops=8, iba_steps=2, board_images=2, board_steps=4,
            road_fractions=(0.3, 0.6), agree_images=2, smooth_samples=2, ig_steps=4, rise_masks=16,
            board_methods=("gradient", "occlusion"), lrp_images=2,
            lrp_composites=("epsilon",), vit_images=2, vit_config=dict(img_size=32, patch_size=8, dim=32, depth=2, heads=2))

PARTS = ("agreement", "agreement_no_tf32", "batch_curve", "occlusion", "igos", "igos_profile", "iba", "leaderboard",
         "lrp", "vit")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, repeat=1, warmup=True):
    """(median wall seconds, last result) over `repeat` calls, after one warm-up call if asked."""
    if warmup:
        fn()
    times, result = [], None
    for _ in range(repeat):
        sync(device)
        t0 = time.perf_counter()
        result = fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), result


def photo_batch(x: torch.Tensor, n: int) -> torch.Tensor:
    """n images from the photos: the photos, their mirrors, then shifted copies (all distinct)."""
    pool, shift = [x, x.flip(-1)], 8
    while sum(len(p) for p in pool) < n:
        pool.append(torch.roll(x, shifts=(shift, shift), dims=(-2, -1)))
        shift += 8
    return torch.cat(pool)[:n]


def frozen(model):
    for p in model.parameters():  # as in a model session: gradients to the input only
        p.requires_grad_(False)
    return model


def unit_costs(model, x, batch_size, device, repeat):
    """Seconds per image of a no-grad forward and of a forward+backward to the input, at batch_size."""
    rows = photo_batch(x, batch_size).to(device)

    def fwd():
        with torch.no_grad():
            return model(rows)

    def fwd_bwd():
        inp = rows.detach().requires_grad_(True)
        return torch.autograd.grad(model(inp)[:, 0].sum(), inp)[0]

    return timed(fwd, device, repeat)[0] / batch_size, timed(fwd_bwd, device, repeat)[0] / batch_size


def agreement(model_cpu, model_dev, x, targets, device, cfg, cases=None):
    """Maps on the device against the CPU's, per method."""
    cases = cases or {"gradient": {}, "integrated_gradients": {"steps": cfg["ig_steps"]},
                      "smoothgrad": {"samples": cfg["smooth_samples"]}, "rise": {"masks": cfg["rise_masks"]},
                      "gradcam": {}, "occlusion": {"window": cfg["occ_window"], "stride": cfg["occ_window"]}}
    out = {}
    for name, params in cases.items():
        ref = sl.explain(model_cpu, x, name, target=targets, **params).maps.double()
        got = sl.explain(model_dev, x.to(device), name, target=targets.to(device), **params).maps.cpu().double()
        scale = ref.flatten(1).abs().amax(1).clamp_min(1e-12)
        rel = ((got - ref).flatten(1).abs().amax(1) / scale).max().item()
        a, b = ref.flatten(1), got.flatten(1)
        a, b = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
        corr = ((a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1)).clamp_min(1e-12)).min().item()
        out[name] = {"max_relative_difference": rel, "min_correlation": corr, "params": params}
        print(f"  agreement {name:22s} max rel diff {rel:.2e}  min corr {corr:.6f}", flush=True)
    return out


def batch_curve(model, x, device, cfg):
    rows = []
    for b in cfg["batches"]:
        try:
            f, fb = unit_costs(model, x, b, device, cfg["repeat"])
        except torch.OutOfMemoryError:
            break
        rows.append({"batch": b, "forward_ms_per_image": 1000 * f, "forward_backward_ms_per_image": 1000 * fb})
        print(f"  batch {b:4d}: forward {1000 * f:8.3f} ms/image, forward+backward {1000 * fb:8.3f} ms/image", flush=True)
    return rows


def occlusion_vs_captum(model, x, targets, device, cfg):
    B, C, H, W = x.shape
    w, s, batch = cfg["occ_window"], cfg["occ_stride"], cfg["occ_batch"]
    windows = (math.ceil((H - w) / s) + 1) * (math.ceil((W - w) / s) + 1)
    fwd_images = B * (1 + windows)
    t_f = unit_costs(model, x, min(batch, 256), device, cfg["repeat"])[0]
    out = {"images": B, "windows_per_image": windows, "batch": batch, "forward_ms_per_image_bound": 1000 * t_f}
    ours_t, ours = timed(lambda: sl.explain(model, x, "occlusion", target=targets, window=w, stride=s,
                                            batch_size=batch), device)
    out["ours"] = {"seconds_per_image": ours_t / B, "ratio_to_bound": ours_t / (fwd_images * t_f)}
    auto_t, auto = timed(lambda: sl.explain(model, x, "occlusion", target=targets, window=w, stride=s), device)
    out["ours_default_batch"] = {"seconds_per_image": auto_t / B, "ratio_to_bound": auto_t / (fwd_images * t_f),
                                 "rows_per_pass": round(auto.cost.forward_images / max(1, auto.cost.forward_calls))}
    try:
        import captum
        from captum.attr import Occlusion
    except ImportError:
        out["captum"] = None
        print("  captum not installed: occlusion timed without it", flush=True)
        return out
    per_eval = max(1, batch // B)

    def run(per):
        return Occlusion(model).attribute(x, sliding_window_shapes=(C, w, w), strides=(C, s, s), baselines=0,
                                          target=targets, perturbations_per_eval=per)

    cap_t, ref = timed(lambda: run(per_eval), device)
    cap1_t, _ = timed(lambda: run(1), device, warmup=False)
    out["captum"] = {"version": captum.__version__, "perturbations_per_eval": per_eval,
                     "seconds_per_image": cap_t / B, "ratio_to_bound": cap_t / (fwd_images * t_f),
                     "captum_over_ours": cap_t / ours_t,
                     "max_abs_difference": float((ref.sum(1) - ours.maps).abs().max()),
                     "default_seconds_per_image": cap1_t / B, "default_over_ours": cap1_t / ours_t}
    print(f"  occlusion: ours {ours_t / B:.3f} s/image ({out['ours']['ratio_to_bound']:.2f}x bound), captum "
          f"{cap_t / B:.3f} ({cap_t / ours_t:.2f}x ours), captum default {cap1_t / B:.3f}", flush=True)
    return out


def igos_batched(model, x, targets, device, cfg):
    runs = {}
    for batch_size in cfg["igos_batch_sizes"]:
        runs[str(batch_size)] = igos_one(model, x, targets, device, cfg, batch_size)
    return runs


def igos_one(model, x, targets, device, cfg, batch_size):
    params = {"iterations": cfg["igos_iterations"], "steps": cfg["igos_steps"], "batch_size": batch_size}
    B = len(x)
    batched_t, e = timed(lambda: sl.explain(model, x, "igos", target=targets, **params), device, warmup=False)

    def singles():
        return [sl.explain(model, x[i:i + 1], "igos", target=targets[i:i + 1], **params) for i in range(B)]

    single_t, _ = timed(singles, device, warmup=False)
    out = {"images": B, "params": params, "batched_seconds_per_image": batched_t / B,
           "single_seconds_per_image": single_t / B, "speedup": single_t / batched_t,
           "forward_images_per_image": e.cost.forward_images / B, "backward_images_per_image": e.cost.backward_images / B}
    print(f"  igos (batch_size={batch_size}): batched {batched_t / B:.3f} s/image, single {single_t / B:.3f} s/image "
          f"({single_t / batched_t:.2f}x)", flush=True)
    return out


SYNC_OPS = ("aten::item", "aten::_local_scalar_dense", "cudaStreamSynchronize", "cudaDeviceSynchronize",
            "cudaMemcpyAsync", "aten::nonzero")


def igos_profile(model, x, targets, device, cfg):
    """Where batched I-GOS spends its time on this device: torch.profiler over one batched call and over
    one one-image call (fewer iterations), host-sync counts and the top operators by self CPU time.
    Follows up the first GPU run, where batched I-GOS was slower per image than one image per call."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    params = {"iterations": max(2, cfg["igos_iterations"] // 3), "steps": cfg["igos_steps"], "batch_size": 10}
    out = {"params": params}
    for label, xs, ts in (("batched", x, targets), ("one_image", x[:1], targets[:1])):
        sl.explain(model, xs, "igos", target=ts, **params)  # warm-up
        sync(device)
        t0 = time.perf_counter()
        with profile(activities=activities) as prof:
            sl.explain(model, xs, "igos", target=ts, **params)
            sync(device)
        wall = time.perf_counter() - t0
        events = prof.key_averages()
        counts = {e.key: e.count for e in events if e.key in SYNC_OPS}
        top = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:12]
        out[label] = {"images": len(xs), "wall_seconds": wall, "seconds_per_image": wall / len(xs),
                      "sync_counts": counts,
                      "top_self_cpu": [{"op": e.key, "count": e.count, "self_cpu_ms": e.self_cpu_time_total / 1e3}
                                       for e in top]}
        print(f"  igos profile {label}: {wall / len(xs):.3f} s/image (profiled); syncs {counts}", flush=True)
    return out


def iba_speed(model, x, targets, device, cfg):
    data = features.sample_crops(cfg["iba_crops"], seed=0, size=x.shape[-1])
    est_t, stats = timed(lambda: features.feature_stats(model, "blocks.4", data, batch_size=64, cache=False),
                         device, warmup=False)
    t_f, t_fb = unit_costs(model, x, 32, device, cfg["repeat"])
    B = len(x)
    run_t, e = timed(lambda: sl.explain(model, x, "iba", target=targets, layer="blocks.4", data=stats,
                                            steps=cfg["iba_steps"]), device)
    c = e.cost
    bound = c.backward_images * t_fb + (c.forward_images - c.backward_images) * t_f
    out = {"images": B, "crops": cfg["iba_crops"], "estimation_seconds": est_t, "seconds_per_image": run_t / B,
           "ratio_to_bound": run_t / bound if bound else None}
    print(f"  iba: estimation {est_t:.2f} s ({cfg['iba_crops']} crops), {run_t / B:.3f} s/image "
          f"({out['ratio_to_bound']:.2f}x bound)", flush=True)
    return out


def leaderboard_throughput(model, x, targets, device, cfg):
    methods = {"gradient": {}, "input_x_gradient": {}, "integrated_gradients": {"steps": cfg["ig_steps"]},
               "smoothgrad": {"samples": cfg["smooth_samples"]}, "gradcam": {}, "lrp": {},
               "occlusion": {"window": cfg["occ_window"], "stride": cfg["occ_window"] // 2}, "rise": {"masks": cfg["rise_masks"]}}
    methods = {k: v for k, v in methods.items() if k in cfg["board_methods"]}
    metrics = {"deletion": {"steps": cfg["board_steps"]}, "insertion": {"steps": cfg["board_steps"]},
               "road": {"fractions": cfg["road_fractions"]}}
    B = len(x)
    per_method, total = {}, 0.0
    for name, params in methods.items():
        t_e, e = timed(lambda: sl.explain(model, x, name, target=targets, **params), device, warmup=False)
        row = {"explain_seconds": t_e}
        for metric, mparams in metrics.items():
            instance = sl.metrics.build(metric, **mparams)
            t_m, _ = timed(lambda: instance.measure(model, x, e.maps, targets), device, warmup=False)
            row[f"{metric}_seconds"] = t_m
        per_method[name] = row
        total += sum(row.values())
        print(f"  leaderboard {name:22s} " + "  ".join(f"{k[:-8]} {v:.2f}s" for k, v in row.items()), flush=True)
    out = {"images": B, "methods": methods, "metrics": {k: {kk: list(vv) if isinstance(vv, tuple) else vv
                                                            for kk, vv in v.items()} for k, v in metrics.items()},
           "per_method": per_method, "seconds": total, "images_per_second": B / total,
           "seconds_per_image_all_methods_and_metrics": total / B}
    print(f"  leaderboard: {B} images x {len(methods)} methods x {len(metrics)} metrics in {total:.1f} s = "
          f"{B / total:.2f} images/s", flush=True)
    return out


def lrp_cost(model, x, targets, device, cfg):
    """LRP composites against a plain forward+backward of the same batch, timed alternately."""
    rows = {}
    for composite in cfg["lrp_composites"]:
        def grad():
            inp = x.detach().requires_grad_(True)
            out = model(inp)
            return torch.autograd.grad(out.gather(1, targets[:, None]).sum(), inp)[0]

        bounds = {}
        if "box" in composite:  # z-box: the lowest and highest pixel values in the model's input space
            low, high = models.load("efficientnet_lite0").input_bounds()
            bounds = {"low": low.to(device), "high": high.to(device)}

        def lrp():
            return sl.explain(model, x, "lrp", target=targets, composite=composite, batch_size=len(x), **bounds)

        grad(), lrp()  # warm-up
        t_g, t_l = [], []
        for _ in range(cfg["repeat"]):
            t_g.append(timed(grad, device, warmup=False)[0])
            t_l.append(timed(lrp, device, warmup=False)[0])
        rows[composite] = {"ratio_to_forward_backward": statistics.median(t_l) / statistics.median(t_g),
                           "seconds_per_image": statistics.median(t_l) / len(x)}
        print(f"  lrp {composite:28s} {rows[composite]['ratio_to_forward_backward']:.2f}x forward+backward", flush=True)
    return {"images": len(x), "composites": rows}


VIT_METHODS = ("attention_rollout", "gradient_rollout", "transformer_attribution", "attnlrp", "cp_lrp", "gradcam")


def vit_part(photos, device, cfg):
    """The ViT methods on a ViT-Tiny-sized timm-style model (random weights, seeded): maps on the device
    against the CPU's (TF32 off), and each method's time against a plain forward+backward of the same
    batch, timed alternately."""
    from saliencylab.models.vit import small_vit

    torch.manual_seed(0)
    model_cpu = frozen(small_vit(1000, **cfg["vit_config"]).eval())
    model = frozen(small_vit(1000, **cfg["vit_config"]).eval())
    model.load_state_dict(model_cpu.state_dict())
    model = model.to(device)
    size = cfg["vit_config"]["img_size"]
    x = torch.nn.functional.interpolate(photo_batch(photos, cfg["vit_images"]), size=(size, size), mode="bilinear",
                                        align_corners=False)
    with torch.no_grad():
        targets = model_cpu(x[:4]).argmax(1)
    out = {"config": cfg["vit_config"], "images": len(x)}
    flags = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        out["agreement_no_tf32"] = agreement(model_cpu, model, x[:4], targets, device, cfg,
                                             cases={m: {} for m in VIT_METHODS})
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = flags
    xd = x.to(device)
    with torch.no_grad():
        td = model(xd).argmax(1)

    def grad():
        inp = xd.detach().requires_grad_(True)
        return torch.autograd.grad(model(inp).gather(1, td[:, None]).sum(), inp)[0]

    rows = {}
    for name in VIT_METHODS:
        t_g, t_m = [], []
        sl.explain(model, xd, name, target=td)  # warm-up
        for _ in range(cfg["repeat"]):
            t_g.append(timed(grad, device, warmup=False)[0])
            t_m.append(timed(lambda: sl.explain(model, xd, name, target=td), device, warmup=False)[0])
        g, m = statistics.median(t_g), statistics.median(t_m)
        rows[name] = {"seconds_per_image": m / len(x), "ratio_to_forward_backward": m / g}
        print(f"  vit {name:24s} {m / len(x) * 1e3:.3f} ms/image  {m / g:.2f}x forward+backward", flush=True)
    out["timing"] = rows
    return out


def markdown(result) -> str:
    env, cfg = result["environment"], result["config"]
    lines = [f"# GPU claims ({'tiny check' if result['tiny'] else 'full run'})", "",
             f"Device: {env['device_name']} ({env['device']}); torch {env['torch']}; python {env['python']}; "
             f"images {cfg['size']}x{cfg['size']}; total {result['seconds']:.0f} s. Command: `{result['command']}`.", ""]
    for key, err in result.get("errors", {}).items():
        lines += [f"**{key} failed**: {err}", ""]
    if "agreement" in result:
        lines += ["## 1. Device agreement (maps on the device against the CPU's)", "",
              "| method | max abs difference / map scale | min correlation |", "|---|---|---|"]
        for name, r in result["agreement"].items():
            lines.append(f"| {name} | {r['max_relative_difference']:.1e} | {r['min_correlation']:.6f} |")
    if "agreement_no_tf32" in result:
        lines += ["", "The same with TF32 off (`torch.backends.cudnn.allow_tf32 = False`, "
                  "`torch.backends.cuda.matmul.allow_tf32 = False`):", "",
                  "| method | max abs difference / map scale | min correlation |", "|---|---|---|"]
        for name, r in result["agreement_no_tf32"].items():
            lines.append(f"| {name} | {r['max_relative_difference']:.1e} | {r['min_correlation']:.6f} |")
    if "batch_curve" in result:
        lines += ["", "## 2. Per-image cost against batch size", "",
              "| batch | forward ms/image | forward+backward ms/image |", "|---|---|---|"]
        for r in result["batch_curve"]:
            lines.append(f"| {r['batch']} | {r['forward_ms_per_image']:.3f} | {r['forward_backward_ms_per_image']:.3f} |")
    o = result.get("occlusion")
    if o:
        lines += ["", f"## 3. Occlusion against Captum ({o['images']} images, {o['windows_per_image']} windows each, "
              f"batch {o['batch']})", "", "| run | s/image | ratio to forward bound |", "|---|---|---|",
              f"| ours, batch {o['batch']} | {o['ours']['seconds_per_image']:.4f} | {o['ours']['ratio_to_bound']:.2f} |",
              f"| ours, batch_size=None ({o['ours_default_batch']['rows_per_pass']} rows) | "
              f"{o['ours_default_batch']['seconds_per_image']:.4f} | {o['ours_default_batch']['ratio_to_bound']:.2f} |"]
    if o and o["captum"]:
        c = o["captum"]
        lines += [f"| Captum {c['version']}, perturbations_per_eval={c['perturbations_per_eval']} | "
                  f"{c['seconds_per_image']:.4f} | {c['ratio_to_bound']:.2f} |",
                  f"| Captum default (perturbations_per_eval=1) | {c['default_seconds_per_image']:.4f} | |", "",
                  f"Captum / ours: {c['captum_over_ours']:.2f}x at the same batch, {c['default_over_ours']:.2f}x with "
                  f"Captum's default; max |Captum (channel sum) - ours| = {c['max_abs_difference']:.1e}."]
    runs = result.get("igos")
    if runs:
        lines += ["", "## 4. I-GOS batched (all images in one call) against one image per call", "",
                  "| rows per pass | images | batched s/image | one image per call s/image | speed-up |",
                  "|---|---|---|---|---|"]
        lines += [f"| {k if k != 'None' else 'None (device default)'} | {g['images']} | {g['batched_seconds_per_image']:.3f} | "
                  f"{g['single_seconds_per_image']:.3f} | {g['speedup']:.2f}x |" for k, g in runs.items()]
    prof = result.get("igos_profile")
    if prof:
        lines += ["", f"## 4b. I-GOS profile ({prof['params']})", ""]
        for label in ("batched", "one_image"):
            r = prof[label]
            lines += [f"**{label}** ({r['images']} images): {r['seconds_per_image']:.3f} s/image under the profiler; "
                      f"host-sync ops: " + (", ".join(f"{k} x{v}" for k, v in r["sync_counts"].items()) or "none"), "",
                      "| op | calls | self CPU ms |", "|---|---|---|"]
            lines += [f"| {e['op']} | {e['count']} | {e['self_cpu_ms']:.1f} |" for e in r["top_self_cpu"]]
            lines.append("")
    i = result.get("iba")
    if i:
        lines += ["", f"## 5. IBA ({i['images']} images)", "",
              f"Statistics from {i['crops']} crops: {i['estimation_seconds']:.2f} s. IBA: {i['seconds_per_image']:.3f} "
              f"s/image, {i['ratio_to_bound']:.2f}x its pass bound."]
    b = result.get("leaderboard")
    if b:
        lines += ["", f"## 6. Leaderboard throughput ({b['images']} images, {len(b['methods'])} methods x "
              f"{len(b['metrics'])} metrics)", "", "| method | " + " | ".join(k.replace('_seconds', ' s')
                                                                            for k in next(iter(b['per_method'].values())))
              + " |", "|---" * (1 + len(next(iter(b['per_method'].values())))) + "|"]
        for name, row in b["per_method"].items():
            lines.append(f"| {name} | " + " | ".join(f"{v:.2f}" for v in row.values()) + " |")
        lines += ["", f"All together: {b['seconds']:.1f} s, {b['images_per_second']:.2f} images/s "
              f"({b['seconds_per_image_all_methods_and_metrics']:.2f} s per image for every method and metric).", ""]
    lr = result.get("lrp")
    if lr:
        lines += ["", f"## 7. LRP against a plain forward+backward (batch {lr['images']}, timed alternately)", "",
                  "| composite | ratio | s/image |", "|---|---|---|"]
        lines += [f"| {k} | {v['ratio_to_forward_backward']:.2f} | {v['seconds_per_image']:.4f} |"
                  for k, v in lr["composites"].items()]
    v = result.get("vit")
    if v:
        lines += ["", f"## 8. ViT methods ({v['images']} images, {v['config']}, random weights)", "",
                  "| method | max abs difference / map scale (TF32 off) | min correlation | ms/image | x forward+backward |",
                  "|---|---|---|---|---|"]
        lines += [f"| {k} | {v['agreement_no_tf32'][k]['max_relative_difference']:.1e} | "
                  f"{v['agreement_no_tf32'][k]['min_correlation']:.6f} | {t['seconds_per_image'] * 1e3:.3f} | "
                  f"{t['ratio_to_forward_backward']:.2f} |" for k, t in v["timing"].items()]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="toy sizes: checks the script in seconds (CPU)")
    ap.add_argument("--parts", default=",".join(PARTS))
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args(argv)
    cfg = TINY if args.tiny else FULL
    parts = set(args.parts.split(","))
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: run with --device cpu (and --tiny to check the script)", file=sys.stderr)
        return 2
    sl.set_progress(False)
    start = time.perf_counter()
    loaded, photos, _ = embedded_photos()
    if cfg["size"] != photos.shape[-1]:
        photos = torch.nn.functional.interpolate(photos, size=(cfg["size"],) * 2, mode="bilinear", align_corners=False)
    model_cpu = frozen(loaded.model.eval())
    model = frozen(models.load("efficientnet_lite0").model.eval()).to(device)
    with torch.no_grad():
        def targets_of(x):
            return model(x.to(device)).argmax(1)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    result = {"tiny": args.tiny, "config": {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()},
              "command": "python benchmarks/gpu.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "environment": {"device": str(device), "device_name": name, "torch": torch.__version__,
                              "python": platform.python_version()}}
    print(f"device {name}; torch {torch.__version__}", flush=True)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    def part(key, fn):
        """Run one part; a failure is recorded (one line) and the other parts still run."""
        if key not in parts:
            return
        try:
            result[key] = fn()
        except Exception as exc:  # a benchmark reports what broke and goes on
            result.setdefault("errors", {})[key] = f"{type(exc).__name__}: {exc}".splitlines()[0]
            print(f"  {key} failed: {result['errors'][key]}", flush=True)
        (out / "gpu.json").write_text(json.dumps(result, indent=1))  # as it goes

    def on_device(n):
        xs = photo_batch(photos, n).to(device)
        return xs, targets_of(xs)

    x = photos[: cfg["agree_images"]]
    part("agreement", lambda: agreement(model_cpu, model, x, targets_of(x).cpu(), device, cfg))
    if device.type == "cuda":
        def exact():
            flags = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
            torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
            try:
                return agreement(model_cpu, model, x, targets_of(x).cpu(), device, cfg)
            finally:
                torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = flags
        part("agreement_no_tf32", exact)
    part("batch_curve", lambda: batch_curve(model, photos, device, cfg))
    part("occlusion", lambda: occlusion_vs_captum(model, *on_device(cfg["occ_images"]), device, cfg))
    part("igos", lambda: igos_batched(model, *on_device(cfg["igos_images"]), device, cfg))
    part("igos_profile", lambda: igos_profile(model, *on_device(cfg["igos_images"]), device, cfg))
    part("iba", lambda: iba_speed(model, *on_device(cfg["iba_images"]), device, cfg))
    part("leaderboard", lambda: leaderboard_throughput(model, *on_device(cfg["board_images"]), device, cfg))
    part("lrp", lambda: lrp_cost(model, *on_device(cfg["lrp_images"]), device, cfg))
    part("vit", lambda: vit_part(photos, device, cfg))
    result["seconds"] = time.perf_counter() - start
    (out / "gpu.json").write_text(json.dumps(result, indent=1))
    (out / "gpu.md").write_text(markdown(result))
    print(f"wrote {out / 'gpu.json'} ({result['seconds']:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
