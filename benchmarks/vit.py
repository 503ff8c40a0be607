"""Cost of every ViT-applicable method on the trained small ViT against its pass bound.

The model is the ViT of the ground-truth leaderboard's ViT column (`--suite groundtruth-vit`):
`saliencylab.models.vit.small_vit` trained on an environment (`envs.trained`, model="vit", cached),
32x32 images. Methods and settings are the column's: the small-image presets, CAM methods on the last
block's `norm1` tokens (`runs.leaderboard.vit_method_params`), minus the methods the leaderboard skips
on a ViT (`runs.leaderboard.skipped_methods`: the ReLU-rule methods). The bound is computed as in
benchmarks/run.py (its `unit_costs` and `bench_method`, imported):
    bound = backward_images * t(forward+backward per image) + forward_only_images * t(forward per image)
with the forward/backward image counts from the Explanation's cost and both unit costs measured on the
same model, in this process, at the rows per pass the method used. A ratio of 1.0 means the method
spends nothing beyond its passes; on a model this small (~29k parameters, 65 tokens) the per-call
overhead of Python and autograd is a large part of every pass, so ratios are higher than on the
embedded EfficientNet (benchmarks/results/methods.md).

Usage:  python benchmarks/vit.py [--env dominant_colour] [--images 8] [--repeat 2] [--methods all]
                                 [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import bench_method, unit_costs  # noqa: E402  (benchmarks/run.py: the same bound, the same timer)

import saliencylab as sl  # noqa: E402
from saliencylab.envs import trained  # noqa: E402
from saliencylab.runs import leaderboard as lb  # noqa: E402

warnings.filterwarnings("ignore")


def vit_methods(text: str, model) -> tuple[list[str], dict[str, str]]:
    """The methods to time (the leaderboard's ViT default list, or `all` / a comma list) and the skipped ones."""
    names = lb.resolve_methods(text or "default", "groundtruth-vit")
    skipped = lb.skipped_methods(names, model)
    return [n for n in names if n not in skipped], skipped


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--env", default="dominant_colour", help="environment the ViT is trained on")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--repeat", type=int, default=2, help="timed calls per method (median), after one warm-up")
    ap.add_argument("--methods", default="", help="comma-separated, or 'all' (default: the leaderboard's ViT list)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1: a shared machine)")
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    sl.set_progress(False)
    env = trained.trained_environment(args.env, seed=args.seed, model="vit")
    model = env.model
    batch = env.sample(args.images, seed=args.seed)
    names, skipped = vit_methods(args.methods, model)
    params_by_method = lb.vit_method_params(names, model, data=env.sample(256, seed=args.seed + 1).x)

    cache: dict[int, tuple[float, float]] = {}

    def unit(rows: int) -> tuple[float, float]:
        if rows not in cache:
            cache[rows] = unit_costs(model, batch.x, rows, max(3, args.repeat))
        return cache[rows]

    rows, failed = [], {}
    for name in names:
        params = {**params_by_method.get(name, {}), "target": batch.target}
        try:
            row = bench_method(model, batch.x, name, params, unit, args.repeat)
        except Exception as exc:  # noqa: BLE001 - one failing method is reported, the others go on
            failed[name] = " ".join(str(exc).split())
            print(f"{name:24s} failed: {failed[name]}", flush=True)
            continue
        row["params"] = {k: (v if isinstance(v, (int, float, str, bool, type(None), list)) else type(v).__name__)
                         for k, v in row["params"].items() if k not in ("target", "data")}
        rows.append(row)
        print(f"{name:24s} {row['seconds_per_image']:7.4f} s/image  bound {row['bound_seconds_per_image']:7.4f}"
              f"  ratio {row['ratio_to_bound']:5.2f}", flush=True)

    grid = model.patch_embed.grid_size
    result = {
        "model": f"small_vit {trained.VIT_CONFIG} trained on {args.env} (recipe {trained.VIT_RECIPE}, "
                 f"seed {args.seed}, held-out accuracy {env.accuracy:.3f})",
        "parameters": sum(p.numel() for p in model.parameters()), "tokens": 1 + grid[0] * grid[1],
        "images": len(batch), "image_size": env.image_size,
        "unit_costs_by_rows": {str(k): {"forward": v[0], "forward_backward": v[1]} for k, v in sorted(cache.items())},
        "torch": torch.__version__, "threads": torch.get_num_threads(), "python": sys.version.split()[0],
        "load_average_at_end": os.getloadavg(), "machine": platform.machine(), "processor": platform.processor(),
        "methods": rows, "skipped": skipped, "failed": failed,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "vit.json").write_text(json.dumps(result, indent=2))
    lines = [f"# ViT-applicable methods against their pass bound: {result['model']}", "",
             f"{result['parameters']} parameters, {result['tokens']} tokens, {len(batch)} images of "
             f"{env.image_size}x{env.image_size}, {result['threads']} thread(s), torch {result['torch']}, load average "
             f"at the end {result['load_average_at_end'][0]:.1f}. Settings: the leaderboard's ViT column "
             "(`saliencylab leaderboard --suite groundtruth-vit`). Command: `python benchmarks/vit.py --images "
             f"{len(batch)} --repeat {args.repeat}" + (f" --methods {args.methods}" if args.methods else "") + "`.", "",
             "| method | s/image | bound s/image | ratio to bound | fwd/bwd images (the whole batch) | rows per pass |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['seconds_per_image']:.4f} | {r['bound_seconds_per_image']:.4f} | "
                     f"{r['ratio_to_bound']:.2f} | {r['forward_images']}/{r['backward_images']} | {r['rows_per_pass']} |")
    lines += [""] + [f"- {m} skipped: {why}" for m, why in skipped.items()]
    lines += [f"- {m} failed: {why}" for m, why in failed.items()]
    lines += ["", "What moves a ratio from 1 here: the CAM methods and gradient rollout stop their backward pass at "
              "the explained layer or the attention weights, short of the input the bound's backward reaches (cheaper); "
              "attention_rollout runs the explicit softmax attention (the fused kernel of the bound's forward never "
              "materialises the weights) and multiplies the T x T matrices, work that does not shrink with a model this "
              "small (dearer); extremal perturbation builds and smooths its masks at every step (dearer). On a shared "
              "machine (see the load average) single ratios move by up to 2x between runs: three runs within an hour "
              "gave FullGrad 3.20, 1.08, 1.93 and gradient rollout 1.17, 0.83, 2.02. Use --repeat 5 on a quiet "
              "machine before quoting one."]
    lines += ["", "Unit costs (s/image) by rows per pass: " + ", ".join(
        f"{k}: fwd {v['forward']:.2e}, fwd+bwd {v['forward_backward']:.2e}"
        for k, v in result["unit_costs_by_rows"].items()) + "."]
    (out / "vit.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out / 'vit.json'} and {out / 'vit.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
