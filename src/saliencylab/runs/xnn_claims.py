"""The XNN claim, measured on sklearn's digits over several seeds (one command, a few CPU minutes).

    python -m saliencylab.runs.xnn_claims OUT [--seeds 0 1 2] [--steps 480] [--quick] [--threads 1]

Claim (issue 18, item 3), from "Embedding deep networks into visual explanations" (Qi, Khorram, Li
Fuxin, AIJ 2021; arXiv 1709.05360): the few concepts (x-features) an XNN extracts at a layer are
*faithful*: the network's prediction is reconstructed from them (a linear function of the concepts),
while only a few concepts carry each decision.

What is measured (on held-out images), fixed before the first run:
- faithfulness: for every class c, the Pearson correlation between the one-vs-all XNN's prediction
  W e(z) + b and the network's logit c (one value per (seed, class)); and top-1 agreement: the class
  whose XNN predicts the highest logit is the network's predicted class (one 0/1 per (seed, image));
- sparsity: per image, the concepts of its predicted class's XNN that are active (e_i > 0) and that
  contribute positively (W_i e_i > 0); per XNN, the authors' acceptance test (`Main1_TrainXNN.py`:
  at least 2 x-features with a positive mean contribution over the training images, and the second
  largest >= 0.3 of the largest).
The paper's numbers could not be read offline (its PDF is not in our sources), so the verdict uses
thresholds fixed by us in advance: reproduced if the lower 95% bounds of the mean logit correlation
and of the agreement are both >= 0.9, with 5 concepts per class (the authors' `Neuron_n = 5`) and a
mean of >= 2 positively contributing concepts per image (their acceptance level); not reproduced
otherwise. Intervals: percentile bootstrap (`runs.stats.bootstrap_interval`) over the (seed, class)
correlations and over the (seed, image) agreements; an XNN whose prediction is constant (all concepts dead) counts
as correlation 0.

Set-up: sklearn's 8x8 digits (1797 images, 10 classes, bundled with scikit-learn), scaled to [0, 1] and
upsampled to 16x16 (nearest); per seed a random 2/3 train, 1/3 test split; `training.nets.small_cnn(10,
width=16, in_channels=1)` trained 25 epochs (Adam 3e-3, batch 64); one XNN per class at the layer
`features` (conv + ReLU, 32 x 4 x 4 = 512 values, flattened) with the authors' settings (`fit_xnn`
defaults: encoder 512 -> 800 -> 100 -> 5, weights 1 / 10 / 10, q = 100, pull-away along the images,
Adam 1e-3 with weight decay 1e-4, batch 50) for `steps` minibatches (480 = 20 passes over the training
images, after the authors' layer-wise pretraining, one pass per layer; the authors then train 1 epoch).
`--retries 4` adds the authors' re-training loop (`fit_accepted`, from `Main1_TrainXNN.py`); the
verdict's thresholds are the same with or without it.

Measured (session 7, seeds 0 1 2, CNN test accuracy 0.96 / 0.93 / 0.95), mean [95% interval]:
- default (2 min 41 s CPU, one thread): logit correlation 0.968 [0.950, 0.984], top-1 agreement 0.805
  [0.786, 0.824], active concepts per image 1.82 [1.76, 1.87], positively contributing 0.95 [0.92, 0.97],
  10% of the XNNs pass the authors' acceptance test: NOT REPRODUCED (faithful logits, but not the top-1
  decision, and about one concept per decision, not a few). Seed 0's agreement moves with float-level
  changes (0.47 here; 0.64 before the pull-away term was batched over outputs): the training is chaotic;
- `--retries 4`: correlation 0.969 [0.950, 0.985], agreement 0.839 [0.822, 0.856], active 2.28
  [2.22, 2.33], positive 1.24 [1.21, 1.28], 30% accepted after 4.1 rounds per class on average: NOT
  REPRODUCED. Seed 0 pulls the agreement down (0.47 / 0.57; seeds 1 and 2: 0.96-0.98); many XNNs
  predict the logit through negative contributions (concepts of the other classes), as the one-vs-all
  regression on all images allows.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

CONCEPTS = 5          # the authors' Neuron_n (Main1_TrainXNN.py)
THRESHOLD = 0.9       # lower 95% bound needed for the correlation and the agreement (ours, fixed in advance)
MIN_POSITIVE = 2      # positively contributing concepts per image (the authors' acceptance: PositiveNum >= 2)
CNN_EPOCHS = 25
CNN_LR = 3e-3


def digits(size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """sklearn's digits as (N, 1, size, size) floats in [0, 1] and (N,) labels."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32)[:, None] / 16.0
    if size != 8:
        x = F.interpolate(x, size=(size, size), mode="nearest")
    return x, torch.tensor(d.target, dtype=torch.long)


def _split(n: int, seed: int):
    from ..training.loop import _key

    perm = torch.randperm(n, generator=torch.Generator().manual_seed(_key(seed, "xnn-split")))
    k = n // 3
    return perm[k:].sort().values, perm[:k].sort().values


def train_cnn(x: torch.Tensor, y: torch.Tensor, seed: int, epochs: int = CNN_EPOCHS):
    from ..training.loop import _key
    from ..training.nets import small_cnn

    model = small_cnn(10, width=16, in_channels=1, seed=seed)
    opt = torch.optim.Adam(model.parameters(), lr=CNN_LR)
    model.train()
    for epoch in range(epochs):
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(_key(seed, epoch, "cnn")))
        for idx in order.split(64):
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return model.eval()


def _pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.corrcoef(torch.stack([a.double(), b.double()]))[0, 1])


def fit_accepted(model, x, c: int, steps: int, seed: int, retries: int):
    """The authors' loop (`Main1_TrainXNN.py`): train; if fewer than 2 concepts have a positive mean
    contribution over the training images, or the second is below 0.3 of the first, train again with
    the reconstruction weight x1.2 and the pull-away weight x0.8, at most `retries` more times.
    Returns (xnn, rounds used, accepted, positive mean contributions)."""
    from ..concepts.xnn import DEFAULT_WEIGHTS, fit_xnn, layer_features

    f_tr, _ = layer_features(model, "features", x)
    weights = dict(DEFAULT_WEIGHTS)
    for round_ in range(retries + 1):
        xnn = fit_xnn(model, "features", x, concepts=CONCEPTS, steps=steps, seed=seed, classes=c, weights=weights,
                      progress=False)
        with torch.no_grad():
            mean = (xnn.encode(f_tr) * xnn.head.weight[0]).mean(0).sort(descending=True).values
        n_pos = int((mean > 0).sum())
        ok = bool(n_pos >= 2 and float(mean[1]) >= 0.3 * float(mean[0]))
        if ok:
            break
        weights = {**weights, "reconstruction": weights["reconstruction"] * 1.2, "pull_away": weights["pull_away"] * 0.8}
    return xnn, round_ + 1, ok, n_pos


def run_seed(seed: int, steps: int, quick: bool = False, log=print, retries: int = 0) -> dict:
    from ..concepts.xnn import layer_features

    x, y = digits()
    if quick:
        x, y = x[:300], y[:300]
    tr, te = _split(len(x), seed)
    t0 = time.perf_counter()
    model = train_cnn(x[tr], y[tr], seed, epochs=2 if quick else CNN_EPOCHS)
    with torch.no_grad():
        acc = float((model(x[te]).argmax(1) == y[te]).double().mean())
    log(f"seed {seed}: CNN test accuracy {acc:.3f} ({time.perf_counter() - t0:.0f} s)")
    f_te, logits = layer_features(model, "features", x[te])
    preds, corr, accepted, n_pos_mean = [], [], [], []
    active = torch.zeros(len(te), 10)
    positive = torch.zeros(len(te), 10)
    rounds = []
    for c in range(10):
        xnn, used, ok, n_pos = fit_accepted(model, x[tr], c, steps, seed, retries)
        with torch.no_grad():
            e, _, p = xnn(f_te)
            contrib = e * xnn.head.weight[0]
        preds.append(p[:, 0])
        corr.append(_pearson(p[:, 0], logits[:, c]))
        active[:, c] = (e > 0).sum(1).float()
        positive[:, c] = (contrib > 0).sum(1).float()
        n_pos_mean.append(n_pos)
        accepted.append(ok)
        rounds.append(used)
    pred = torch.stack(preds, 1)
    predicted = logits.argmax(1)
    agree = (pred.argmax(1) == predicted).double()
    rows = torch.arange(len(te))
    log(f"seed {seed}: agreement {float(agree.mean()):.3f}, mean logit correlation {sum(corr) / 10:.3f}, "
        f"{time.perf_counter() - t0:.0f} s")
    return {"seed": seed, "cnn_accuracy": acc, "correlations": corr, "agreement": agree.tolist(),
            "active": active[rows, predicted].tolist(), "positive": positive[rows, predicted].tolist(),
            "accepted": accepted, "positive_mean_contributions": n_pos_mean, "rounds": rounds, "n_test": len(te),
            "seconds": time.perf_counter() - t0}


def evaluate(results: Sequence[dict]) -> dict:
    from .stats import bootstrap_interval

    # a constant prediction (every concept dead) has no correlation: it counts as 0, not as missing
    corr = [0.0 if math.isnan(c) else c for r in results for c in r["correlations"]]
    agree = [a for r in results for a in r["agreement"]]
    active = [a for r in results for a in r["active"]]
    positive = [a for r in results for a in r["positive"]]
    accepted = [a for r in results for a in r["accepted"]]
    out = {"correlation": bootstrap_interval(corr), "agreement": bootstrap_interval(agree),
           "active_per_image": bootstrap_interval(active), "positive_per_image": bootstrap_interval(positive),
           "accepted_fraction": sum(accepted) / len(accepted), "concepts": CONCEPTS,
           "cnn_accuracy": [r["cnn_accuracy"] for r in results]}
    ok = (out["correlation"][1] >= THRESHOLD and out["agreement"][1] >= THRESHOLD
          and out["positive_per_image"][0] >= MIN_POSITIVE)
    out["verdict"] = "reproduced" if ok else "not reproduced"
    return out


def _fmt(t) -> str:
    return f"{t[0]:.3f} [{t[1]:.3f}, {t[2]:.3f}]"


def markdown(summary: dict, results: Sequence[dict], command: str, seconds: float) -> str:
    lines = ["# XNN claim: concepts reconstruct the prediction (digits, one-vs-all XNN per class)", "",
             f"`{command}` ({seconds:.0f} s)", "",
             f"Verdict: **{summary['verdict']}** (thresholds fixed in advance: lower 95% bounds of the logit correlation "
             f"and of the agreement >= {THRESHOLD}; >= {MIN_POSITIVE} positively contributing concepts per image; "
             f"{CONCEPTS} concepts per class, the authors' number).", "",
             "| measure | mean [95% interval] |", "|---|---|",
             f"| logit correlation (XNN prediction vs network logit, per seed x class) | {_fmt(summary['correlation'])} |",
             f"| top-1 agreement (argmax of the 10 XNN predictions vs the network's class) | {_fmt(summary['agreement'])} |",
             f"| active concepts per image (e_i > 0, XNN of the predicted class) | {_fmt(summary['active_per_image'])} |",
             f"| positively contributing concepts per image (W_i e_i > 0) | {_fmt(summary['positive_per_image'])} |",
             f"| XNNs passing the authors' acceptance test (>= 2 positive mean contributions, ratio >= 0.3) | "
             f"{summary['accepted_fraction']:.2f} |",
             f"| rounds of the authors' re-training loop per class (--retries {summary.get('retries', 0)}) | "
             f"{sum(x for r in results for x in r.get('rounds', [1])) / sum(len(r.get('rounds', [1])) for r in results):.2f} |",
             "",
             "Per seed: " + "; ".join(f"seed {r['seed']}: CNN accuracy {r['cnn_accuracy']:.3f}, agreement "
                                       f"{sum(r['agreement']) / len(r['agreement']):.3f}, correlation "
                                       f"{sum(r['correlations']) / len(r['correlations']):.3f}" for r in results), ""]
    return "\n".join(lines)


def run_claims(out_dir, seeds: Sequence[int] = (0, 1, 2), steps: int = 480, quick: bool = False, log=print,
               retries: int = 0) -> dict:
    """Every seed's result is written to OUT/seed_<s>.json as it finishes; a rerun with the same settings
    reuses those files (delete them to measure again)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    settings = {"steps": 20 if quick else steps, "quick": quick, "retries": retries}
    results = []
    for s in seeds:
        path = out / f"seed_{s}.json"
        try:
            saved = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            saved = None
        if saved is None or saved.get("settings") != settings:
            saved = {"settings": settings, "result": run_seed(s, settings["steps"], quick, log, retries)}
            path.write_text(json.dumps(saved), encoding="utf-8")
        results.append(saved["result"])
    summary = evaluate(results)
    summary["retries"] = retries
    command = "python -m saliencylab.runs.xnn_claims " + " ".join(
        [str(out_dir), "--seeds", *map(str, seeds), "--steps", str(steps)] + (["--retries", str(retries)] if retries else [])
        + (["--quick"] if quick else []))
    seconds = time.perf_counter() - t0
    (out / "claims.json").write_text(json.dumps({"summary": summary, "results": results}, indent=1), encoding="utf-8")
    (out / "claims.md").write_text(markdown(summary, results, command, seconds), encoding="utf-8")
    return {"summary": summary, "results": results}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m saliencylab.runs.xnn_claims",
                                 description="Test the XNN faithfulness claim on sklearn's digits.")
    ap.add_argument("out", help="output folder (claims.md, claims.json)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=480, help="XNN training steps per class (default 480)")
    ap.add_argument("--quick", action="store_true", help="300 images, 2 CNN epochs, 20 XNN steps: a test, not a result")
    ap.add_argument("--retries", type=int, default=0,
                    help="the authors' re-training loop: up to this many more rounds per class until accepted (they use 4)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    result = run_claims(args.out, seeds=args.seeds, steps=args.steps, quick=args.quick, retries=args.retries)
    s = result["summary"]
    print(f"XNN claim: {s['verdict']}; correlation {_fmt(s['correlation'])}, agreement {_fmt(s['agreement'])}, "
          f"positive concepts per image {_fmt(s['positive_per_image'])}")
    print(Path(args.out) / "claims.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
