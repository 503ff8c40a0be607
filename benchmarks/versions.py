"""Did a change slow saliencylab down? Two versions in one process, timed in interleaved rounds.

The baseline is another checkout's `src/` folder (e.g. `git worktree add /tmp/base <commit>`), loaded
under the module name `saliencylab_base` next to the current `saliencylab`, so both run on the same
model object, the same images and the same machine state. For gradient, integrated gradients,
occlusion and deletion it reports each version's ratio to the pass bound (seconds divided by what its
forward/backward images cost at the rows per pass it used; see benchmarks/run.py) and current / base.

Usage:  python benchmarks/versions.py --base /tmp/base/src [--images 4] [--rounds 3] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

import saliencylab as sl
from saliencylab import images as sample_images
from saliencylab import models

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import unit_costs  # noqa: E402

warnings.filterwarnings("ignore")

TASKS = {
    "gradient": ("method", "gradient", {}),
    "integrated_gradients": ("method", "integrated_gradients", {"steps": 16}),
    "occlusion": ("method", "occlusion", {"window": 32, "stride": 16}),
    "deletion": ("metric", "deletion", {"steps": 50}),
    # not in the default set: keyed noise is drawn per (image, sample) row now, a cost worth watching
    "smoothgrad": ("method", "smoothgrad", {"samples": 16}),
}
DEFAULT_TASKS = ("gradient", "integrated_gradients", "occlusion", "deletion")


def load_base(src: Path):
    """Import the package under `src/saliencylab` as `saliencylab_base` (relative imports resolve inside it)."""
    spec = importlib.util.spec_from_file_location("saliencylab_base", src / "saliencylab" / "__init__.py",
                                                  submodule_search_locations=[str(src / "saliencylab")])
    module = importlib.util.module_from_spec(spec)
    sys.modules["saliencylab_base"] = module
    spec.loader.exec_module(module)
    return module


def run_task(lib, model, x, maps, kind, name, params):
    """One call; returns its Cost (the base version keeps a metric's cost on the instance)."""
    if kind == "method":
        return lib.explain(model, x, name, **params).cost
    metric = lib.metrics.build(name, **params)
    if hasattr(metric, "measure"):
        return metric.measure(model, x, maps).cost
    metric(model, x, maps)
    return metric.last_cost


def bound(cost, unit) -> float:
    bwd_rows = max(1, round(cost.backward_images / max(1, cost.backward_calls)))
    forward_only = cost.forward_images - cost.backward_images
    fwd_rows = max(1, round(forward_only / max(1, cost.forward_calls - cost.backward_calls)))
    return cost.backward_images * unit(bwd_rows)[1] + forward_only * unit(fwd_rows)[0]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", required=True, help="src/ folder of the baseline checkout")
    ap.add_argument("--images", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tasks", default=",".join(DEFAULT_TASKS), help=f"comma-separated, from {', '.join(TASKS)}")
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args(argv)

    base = load_base(Path(args.base).resolve())
    libs = {"base": base, "current": sl}
    for lib in libs.values():
        lib.set_progress(False)
    loaded = models.load("efficientnet_lite0")
    model = loaded.model
    photos = list(sample_images.samples().values())[: args.images]
    x = torch.stack([loaded.preprocess(p.image) for p in photos])
    maps = sl.explain(model, x, "gradient").maps
    cache: dict[int, tuple[float, float]] = {}

    def unit(rows: int):
        if rows not in cache:
            cache[rows] = unit_costs(model, x, rows, 3)
        return cache[rows]

    tasks = args.tasks.split(",")
    times = {(v, t): [] for v in libs for t in tasks}
    costs = {}
    for version, lib in libs.items():  # warm-up, and the pass counts
        for t in tasks:
            costs[version, t] = run_task(lib, model, x, maps, *TASKS[t])
    for _ in range(args.rounds):  # interleaved, so a change in machine load hits both versions alike
        for t in tasks:
            for version, lib in libs.items():
                t0 = time.perf_counter()
                run_task(lib, model, x, maps, *TASKS[t])
                times[version, t].append(time.perf_counter() - t0)

    rows = []
    for t in tasks:
        row = {"task": t}
        for version in libs:
            seconds = statistics.median(times[version, t])
            c = costs[version, t]
            row[version] = {"seconds_per_image": seconds / len(x), "ratio_to_bound": seconds / bound(c, unit),
                            "forward_images": c.forward_images, "backward_images": c.backward_images}
        row["current_over_base"] = row["current"]["ratio_to_bound"] / row["base"]["ratio_to_bound"]
        rows.append(row)
        print(f"{t:22s} base {row['base']['ratio_to_bound']:.3f}  current {row['current']['ratio_to_bound']:.3f}"
              f"  current/base {row['current_over_base']:.3f}", flush=True)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"base": str(args.base), "images": len(x), "rounds": args.rounds, "threads": torch.get_num_threads(),
              "load_average_at_end": __import__("os").getloadavg(), "rows": rows}
    (out / "versions.json").write_text(json.dumps(result, indent=2))
    lines = ["| task | base ratio to bound | current ratio to bound | current / base | passes (fwd/bwd images) |",
             "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['task']} | {r['base']['ratio_to_bound']:.3f} | {r['current']['ratio_to_bound']:.3f} | "
                     f"{r['current_over_base']:.3f} | {r['current']['forward_images']}/{r['current']['backward_images']} |")
    (out / "versions.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out / 'versions.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
