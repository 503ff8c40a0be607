"""Cost of a guided training step against a plain step on the same batch and model (the bound).

A plain step is forward, cross-entropy, backward, optimizer step. A guided step adds
`guidance_loss` (energy) with input x gradient (at the input) or Grad-CAM (at the last conv layer):
the explanation's backward pass with a graph and the double backward through it. With
`with_logits=True` the cross-entropy uses the logits of the explanation's own forward pass (one
forward pass per step, as the authors' training step); "own forward" calls `model(x)` besides
(a second forward pass and its backward pass). So

    ratio = t(guided step) / t(plain step)

and the issue's target is <= 2.5. An e2KD step (`distillation_loss`, Grad-CAM, a live teacher of the
same architecture) is timed too, for information (no target), and so is the input x gradient
energy step written out by hand as in the authors' train.py (one forward pass, torch.autograd.grad
with create_graph): the cost of double backpropagation itself, without saliencylab. Model: a small BN/ReLU CNN in train
mode; times are the median of `--repeats` runs (wall clock and process CPU time), each step timed
right after a plain step, in rounds over all steps (a process's speed drifts over a run, so only
adjacent timings compare).

Usage:  python benchmarks/training.py [--batch 16] [--size 64] [--width 16] [--repeats 7] [--threads 1]
                                      [--device cpu] [--out benchmarks/results] [--name training]
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
from torch import nn
import torch.nn.functional as F

from saliencylab.training import distillation_loss, guidance_loss

warnings.filterwarnings("ignore")


def small_cnn(width: int, classes: int = 10) -> nn.Module:
    w = width
    return nn.Sequential(
        nn.Conv2d(3, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(),
        nn.Conv2d(w, 2 * w, 3, stride=2, padding=1), nn.BatchNorm2d(2 * w), nn.ReLU(),
        nn.Conv2d(2 * w, 2 * w, 3, stride=2, padding=1), nn.BatchNorm2d(2 * w), nn.ReLU(),
        nn.Conv2d(2 * w, 4 * w, 3, padding=1), nn.ReLU(),  # "10": the Grad-CAM layer
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4 * w, classes))


def timed(fn, device):
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    w, c = time.perf_counter(), time.process_time()
    fn()
    sync()
    return time.perf_counter() - w, time.process_time() - c


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--width", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--name", default="training", help="result file stem")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = small_cnn(args.width).train().to(device)
    teacher = small_cnn(args.width).eval().to(device)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    x = torch.rand(args.batch, 3, args.size, args.size, device=device)
    y = torch.randint(0, 10, (args.batch,), device=device)
    s = args.size
    boxes = torch.tensor([[s // 4, s // 4, 3 * s // 4, 3 * s // 4]] * args.batch)

    def step(extra):
        def run():
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(x), y)
            if extra is not None:
                loss = loss + extra()
            loss.backward()
            opt.step()
        return run

    def shared(**kw):  # with_logits=True: the explanation's forward pass is the step's forward pass
        def run():
            opt.zero_grad(set_to_none=True)
            guide, logits = guidance_loss(model, x, y, boxes=boxes, with_logits=True, **kw)
            (F.cross_entropy(logits, y) + 1e-3 * guide).backward()
            opt.step()
        return run

    region = torch.zeros(args.batch, s, s, device=device)
    region[:, s // 4 : 3 * s // 4, s // 4 : 3 * s // 4] = 1

    def by_hand():  # the authors' train.py step written out: one forward, IxG with create_graph, energy
        opt.zero_grad(set_to_none=True)
        xi = x.detach().requires_grad_(True)
        out = model(xi)
        (g,) = torch.autograd.grad(out.gather(1, y[:, None]).sum(), xi, create_graph=True)
        pos = (g * xi).sum(1).clamp(min=0)
        energy = (1 - (pos * region).sum((1, 2)) / pos.sum((1, 2))).sum()
        (F.cross_entropy(out, y) + 1e-3 * energy).backward()
        opt.step()

    steps = {
        "reference: the same IxG energy step written by hand": by_hand,
        "guided energy, input_x_gradient, with_logits": shared(),
        "guided energy, gradcam (last conv), with_logits": shared(method="gradcam", layer="10"),
        "guided energy, input_x_gradient, own forward": step(lambda: 1e-3 * guidance_loss(model, x, y, boxes=boxes)),
        "guided energy, gradcam (last conv), own forward": step(
            lambda: 1e-3 * guidance_loss(model, x, y, boxes=boxes, method="gradcam", layer="10")),
        "e2KD, gradcam (live teacher)": lambda: _distill(model, teacher, x, y, opt),
    }
    plain = step(None)
    plain(), [fn() for fn in steps.values()]  # warm-up
    # Rounds: in each, every step is timed right after a plain step (drift hits all steps alike).
    times = {name: ([], [], [], []) for name in steps}
    for _ in range(args.repeats):
        for name, fn in steps.items():
            pw, pc, gw, gc = times[name]
            w, c = timed(plain, device)
            pw.append(w), pc.append(c)
            w, c = timed(fn, device)
            gw.append(w), gc.append(c)
    rows = []
    for name, (pw, pc, gw, gc) in times.items():
        row = {"step": name, "wall_s": statistics.median(gw), "cpu_s": statistics.median(gc),
               "plain_wall_s": statistics.median(pw), "plain_cpu_s": statistics.median(pc)}
        row["ratio_wall"] = row["wall_s"] / row["plain_wall_s"]
        row["ratio_cpu"] = row["cpu_s"] / row["plain_cpu_s"]
        rows.append(row)
        print(f"{name:50s} {row['wall_s'] * 1e3:8.1f} ms  x{row['ratio_wall']:.2f} of the plain step "
              f"({row['plain_wall_s'] * 1e3:.1f} ms; cpu x{row['ratio_cpu']:.2f})", flush=True)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    setup = {"batch": args.batch, "size": args.size, "width": args.width, "repeats": args.repeats,
             "params": sum(p.numel() for p in model.parameters()), "device": where}
    result = {"setup": setup, "rows": rows, "target_ratio": 2.5, "torch": torch.__version__,
              "python": sys.version.split()[0], "machine": platform.machine(), "threads": torch.get_num_threads()}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.name}.json").write_text(json.dumps(result, indent=1))
    lines = ["# A guided training step against a plain step (the bound)", "",
             f"Small BN/ReLU CNN ({setup['params']} parameters, train mode), batch {args.batch} of "
             f"{args.size}x{args.size} images, SGD; median of {args.repeats} rounds, each step timed right "
             f"after a plain step; torch {torch.__version__}, {where}. "
             f"Command: `{' '.join(['python benchmarks/training.py', *(argv if argv is not None else sys.argv[1:])])}`. "
             "Target: guided <= 2.5x plain.", "",
             "| step | ms (wall) | plain ms | x plain (wall) | x plain (CPU) |", "|---|---|---|---|---|"]
    lines += [f"| {r['step']} | {r['wall_s'] * 1e3:.1f} | {r['plain_wall_s'] * 1e3:.1f} | {r['ratio_wall']:.2f} | "
              f"{r['ratio_cpu']:.2f} |" for r in rows]
    (out / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    return 0


def _distill(model, teacher, x, y, opt):
    opt.zero_grad(set_to_none=True)
    distillation_loss(model, teacher, x, y, method="gradcam", student_layer="10", teacher_layer="10").backward()
    opt.step()


if __name__ == "__main__":
    raise SystemExit(main())
