"""The C3LT claim, measured on the shipped digits domain:

    python -m saliencylab.runs.counterfactual_claims OUT [--quick] [--seed 0] [--threads 1]

Claim (Khorram & Li Fuxin, CVPR 2022, "Cycle-consistent counterfactuals by latent transformations";
their tables compare C3LT with optimisation-based counterfactuals): C3LT's counterfactuals are valid
(classified as the target class) more often, and have a higher COUT, than the plain latent-gradient
counterfactual (Adam steps on the query's latent code, `counterfactuals.latent_gradient`), for the
class pair 4 <-> 9, on held-out images of both classes.

Set-up (fixed before any run; nothing tuned):
- domain: `counterfactuals.digits.digits_domain(seed)` (defaults), held-out 4s (query class 4, target 9)
  and held-out 9s (query 9, target 4);
- C3LT: `C3LT` with the authors' defaults (args.py: alpha 0.1, beta 0.1, gamma 0.001, p1 10, p2 1, NLL,
  Adam 1e-3, batch 128, 200 epochs, StepLR 25 / 0.5, one latent step), trained once on the training 4s
  and 9s (g: 4 -> 9 for the 4s, h: 9 -> 4 for the 9s), perceptual layers the classifier's layer1 /
  layer2 ReLUs;
- baseline: `latent_gradient_counterfactual(generator, classifier, encoder(x), target)` with helper
  cout's defaults (100 Adam steps, lr 0.05, no proximity term);
- measures (helper cout's metrics, `metrics.counterfactual`): validity (top class = target), COUT with
  `protocol="c3lt"` (the authors' checkpoints and area), proximity (mean |x - x_cf|, reported only).

Statistics: the unit is the held-out image; per direction, the paired difference C3LT - baseline gets
its mean, a 95% percentile bootstrap interval (`runs.stats.bootstrap_interval`) and a sign-flip
permutation p (`runs.stats.paired_permutation_test`). A part is *reproduced* when the interval lies
above 0, *not reproduced* when it lies below MIN_EFFECT (0.01) (no effect of that size in the claimed
direction), else *inconclusive*. The claim is reproduced when all four parts (validity and COUT, both
directions) are, not reproduced when any is not, else inconclusive. One seed: the intervals cover the
held-out images, not the training's randomness.

Resumable: C3LT's training checkpoints in OUT/c3lt (a rerun continues). `--quick`: tiny domain and 2
epochs, a test of the machinery (its numbers mean nothing).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from .stats import bootstrap_interval, paired_permutation_test

MIN_EFFECT = 0.01
QUICK_IMAGES = 12  # held-out images per direction in quick mode
PAIRS = ((4, 9), (9, 4))


def _verdict(lo: float, hi: float) -> str:
    if lo > 0:
        return "reproduced"
    if hi < MIN_EFFECT:
        return "not reproduced"
    return "inconclusive"


def run_claims(out_dir, *, seed: int = 0, quick: bool = False, progress: bool = True) -> dict:
    from ..counterfactuals.c3lt import C3LT
    from ..counterfactuals.digits import digits_domain
    from ..counterfactuals.latent_gradient import latent_gradient_counterfactual
    from ..metrics.counterfactual import cout, proximity, validity
    from ..report.counterfactual import QUICK_DOMAIN, QUICK_EPOCHS

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    domain = digits_domain(seed, **(QUICK_DOMAIN if quick else {}))
    (a, b) = PAIRS[0]
    model = C3LT(domain.generator, domain.encoder, domain.classifier, domain.discriminator, source=a, target=b,
                 perceptual_layers=domain.perceptual_layers, seed=seed)
    epochs = QUICK_EPOCHS if quick else 200
    model.fit(domain.images(a, "train"), domain.images(b, "train"), epochs=epochs, out_dir=out / "c3lt",
              progress=progress)
    fit_seconds = sum(r["seconds"] for r in model.history)  # all epochs, also those of an earlier, resumed call
    rows, parts = {}, []
    for source, target in PAIRS:
        x = domain.images(source, "test")[: QUICK_IMAGES if quick else None]
        t1 = time.perf_counter()
        ours = model.explain(x, direction="forward" if source == a else "backward").images
        t_ours = time.perf_counter() - t1
        t1 = time.perf_counter()
        with torch.no_grad():
            z = domain.encoder(x)
        base, _ = latent_gradient_counterfactual(domain.generator, domain.classifier, z, target)
        t_base = time.perf_counter() - t1
        result = {"n": len(x), "seconds_c3lt_explain": t_ours, "seconds_latent_gradient": t_base}
        for name, cf in (("c3lt", ours), ("latent_gradient", base)):
            result[name] = {
                "validity": validity(domain.classifier, cf, target).double(),
                "cout": cout(domain.classifier, x, cf, source, target, protocol="c3lt").scores.double(),
                "proximity": proximity(x, cf).double()}
        summary = {"n": len(x), "seconds_c3lt_explain": t_ours, "seconds_latent_gradient": t_base}
        for measure in ("validity", "cout", "proximity"):
            ours_v, base_v = result["c3lt"][measure], result["latent_gradient"][measure]
            diff = ours_v - base_v
            mean, lo, hi = bootstrap_interval(diff, seed=seed)
            entry = {"c3lt": bootstrap_interval(ours_v, seed=seed), "latent_gradient": bootstrap_interval(base_v, seed=seed),
                     "difference": [mean, lo, hi], "p": paired_permutation_test(ours_v, base_v, seed=seed)}
            if measure != "proximity":
                entry["verdict"] = _verdict(lo, hi)
                parts.append(entry["verdict"])
            summary[measure] = entry
        rows[f"{source}->{target}"] = summary
    verdict = ("reproduced" if all(p == "reproduced" for p in parts)
               else "not reproduced" if any(p == "not reproduced" for p in parts) else "inconclusive")
    report = {"claim": "C3LT counterfactuals are valid more often and have a higher COUT than the latent-gradient "
                       "baseline (digits 4 <-> 9, held-out images)",
              "verdict": verdict, "quick": quick, "seed": seed, "epochs": epochs, "domain": domain.info,
              "fit_seconds": fit_seconds, "final_training_row": model.history[-1] if model.history else None,
              "directions": rows, "seconds": time.perf_counter() - t0}
    (out / "claims.json").write_text(json.dumps(report, indent=1, default=float), encoding="utf-8")
    (out / "claims.md").write_text(_markdown(report), encoding="utf-8")
    return report


def _markdown(r: dict) -> str:
    def f(t):
        return f"{t[0]:.3f} [{t[1]:.3f}, {t[2]:.3f}]"

    lines = [f"# C3LT claim: {r['verdict']}", "", r["claim"] + ".", "",
             f"Domain: digits, classifier held-out accuracy {r['domain'].get('accuracy', float('nan')):.3f}; "
             f"C3LT {r['epochs']} epochs ({r['fit_seconds']:.0f} s){' (quick: numbers mean nothing)' if r['quick'] else ''}.",
             "", "Seconds to explain all held-out images of a direction (one batch): "
             + "; ".join(f"{d} C3LT {s['seconds_c3lt_explain']:.2f} s, latent gradient {s['seconds_latent_gradient']:.1f} s"
                         for d, s in r["directions"].items()) + " (1 CPU thread, shared machine).",
             "", "| direction | n | measure | C3LT | latent gradient | difference [95% bootstrap] | p | verdict |",
             "|---|---|---|---|---|---|---|---|"]
    for d, s in r["directions"].items():
        for m in ("validity", "cout", "proximity"):
            e = s[m]
            lines.append(f"| {d} | {s['n']} | {m} | {f(e['c3lt'])} | {f(e['latent_gradient'])} | {f(e['difference'])} "
                         f"| {e['p']:.3g} | {e.get('verdict', '(reported only)')} |")
    lines += ["", "Means with 95% percentile bootstrap intervals over the held-out images; p: paired sign-flip "
              "permutation test. Proximity: mean |x - x_cf| (lower is closer)."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m saliencylab.runs.counterfactual_claims",
                                 description="Test the C3LT claim on the shipped digits domain.")
    ap.add_argument("out", help="output folder (resumable)")
    ap.add_argument("--quick", action="store_true", help="tiny domain and 2 epochs: a test, not a result")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    r = run_claims(args.out, seed=args.seed, quick=args.quick)
    print(f"claim: {r['verdict']}")
    print(Path(args.out) / "claims.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
