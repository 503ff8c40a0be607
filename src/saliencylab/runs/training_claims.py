"""The training-with-explanations claims, measured on the shortcut environment over several seeds.

    python -m saliencylab.runs.training_claims OUT [--backbone cnn|bcos|all] [--quick] [--seeds 0 1 2] [--threads 1]
    python -m saliencylab.runs.training_claims OUT --backbone bcos --contributions   # + `minority_contributions`

Claims (issue 15, item 6), from "Studying how to efficiently and effectively guide models with
explanations" (Rao, Boehle, Parchami-Araghi, Schiele, ICCV 2023; sukrutrao/Model-Guidance) and "Good
teachers explain" (Parchami-Araghi, Boehle, Rao, Schiele, ECCV 2024; m-parchami/GoodTeachersExplain):

1. energy guidance raises EPG and worst-group accuracy over the unguided model, at a small cost in
   average (in-distribution) accuracy;
2. energy gives a higher EPG than L1, and L1 a higher IoU than energy;
3. guidance still helps (EPG and worst-group accuracy) with boxes on only 5% of the training images;
4. an e2KD student distilled on shortcut-biased data agrees more with an unbiased teacher and reaches a
   higher worst-group accuracy than a plain-KD student.

Set-up (chosen once, from the papers' set-up scaled down; not tuned towards the claims):
- data: `envs.shortcut` digits 0 vs 1 on grass vs brick, 32 px; train 512 images with bias 1.0 (the
  background always predicts the class, as Waterbirds-100), val 256 images from the same biased
  distribution (the "average accuracy" of claim 1: in-distribution, as the papers' VOC F1), test 400
  images balanced over the four (class, background) groups (accuracy, worst-group accuracy, EPG and
  IoU of the maps of the true class in the exact boxes). Every seed draws its own images and weights.
- guidance (Model-Guidance's recipe: train, then fine-tune with guidance, `train.py`): `small_cnn`
  (width 16) trained 10 epochs without guidance; then, from those weights with a fresh Adam, 15 epochs
  of: cross-entropy only (the unguided model), + energy, + L1, + energy with 5% of the boxes; input x
  gradient at the input (the authors' IxG at "Input"); the loss summed over the images with a box
  (as the authors) with weight 1/32 = 1/batch size, so the guidance term weighs as much per image as
  the cross-entropy (the authors sweep lambda, 1e-3 in their README for a batch of 64 fine-tuned 50
  epochs at lr 1e-4; we take one point, for our 240 fine-tuning steps at lr 1e-3).
- distillation (GoodTeachersExplain, `experiment_parameters.py`: gt weight 0, KD weight 1,
  explanation weight 0 for KD or 1 for e2KD, temperature 1, Grad-CAM for standard networks): teacher
  `small_cnn(width=32)` trained 30 epochs on unbiased data (bias 0.5, as the brief; the paper's
  Waterbirds teacher is not released); students `small_cnn(width=16)` trained 20 epochs from scratch
  on the bias-1.0 training images with weights (0, 1, 0) (KD) or (0, 1, 1) (e2KD), Grad-CAM at
  `features` for both. Agreement = share of test images where the student's top-1 class is the
  teacher's. Claim 4 needs an unbiased teacher: if the teacher's mean test worst-group accuracy is
  below 0.75 the claim is inconclusive whatever the students do.
- Adam, lr 1e-3, batch 32 throughout (`training.loop.fit`).

B-cos arm (`--backbone bcos`, `run_claims(..., backbone="bcos")`; settings fixed before any B-cos run,
from the authors' B-cos configurations, not tuned): the same data (same seeds, sizes, bias) and runs,
with `models.bcos.BcosCNN` (b = 2, MaxOut 2, logit bias -log(K - 1) = 0, no normalisation layers) in
place of `small_cnn` (width 16; teacher width 32); every map is the B-cos contribution map W(x) x
(method "bcos", at the input). What comes from the authors:
- guidance (sukrutrao/Model-Guidance, README "Fine-tuning with Model Guidance" and `train.py` `main`:
  `--model_backbone bcos --layer Input --localization_loss_fn Energy --localization_loss_lambda 1e-3`,
  Adam, the loss summed over the boxed images of a batch): energy and L1 on the B-cos maps at the
  input, lambda 1e-3 per image, summed (`guidance_weight=1e-3`), Adam, a model trained without
  guidance first and then fine-tuned with a fresh optimiser;
- distillation (m-parchami/GoodTeachersExplain, `bcos/experiments/ImageNet/final_live/
  experiment_parameters.py`: `BCOS_OPTIMIZER` Adam lr 1e-3, `DEFAULT_TE_CRITERION` with
  `explanation_method=ExpMethod.BCOS_WEIGHT`, swept as gt 0, KD 1, temperature 1, explanation 0 / 1;
  `TeachersExplain.py` `explanation_aware_forward`: the cosine between student's and teacher's dynamic
  weights W(x) of the teacher's top-1 class): weights (0, 1, 0) for KD and (0, 1, 1) for e2KD,
  temperature 1, explanation term 1 - cos(W_student(x), W_teacher(x)) (`distillation_loss`, method "bcos").
Deliberate differences (fixed in advance, for the 20-minute single-thread budget; one epoch of each
phase was timed first, load 5-6 on 2 cores: pretrain 1.7 s, fine-tuning with energy 10 s, teacher
3.7 s, KD 2 s, e2KD 10 s): lr 1e-3 throughout (the authors fine-tune B-cos at 1e-4 for 50 epochs of
VOC, about 3900 steps; we have 6 epochs of 16 steps, and 1e-3 is e2KD's and B-cos v2's lr for
B-cos nets trained from scratch); 10 pretraining epochs, 6 fine-tuning epochs, teacher 24 epochs,
students 8 epochs (the CNN arm: 10 / 15 / 30 / 20); the same lambda for L1 as for energy (the authors
sweep lambda per loss; their README gives only energy's); cross-entropy instead of their BCE
(single-label data); constant lr (e2KD: cosine schedule with warm-up); ResNet-50 / DenseNet-169
B-cos nets pretrained on ImageNet replaced by a small B-cos CNN trained from scratch; the guided
maps are W(x) x with the scales' gradient kept (see `methods.bcos`), where Model-Guidance's
`BCosAttributor` enters explanation mode after the forward pass. The same claims, intervals and
verdict rules; the B-cos arm writes into OUT/bcos/ (its own claims.md, claims.json, runs/).

Statistics: the unit is the seed (data and weights both redrawn). For each comparison the per-seed
paired difference gets its mean, a 95% t interval (df = seeds - 1), a percentile bootstrap interval
(`runs.stats.bootstrap_interval`; with 3 seeds it is close to [min, max]) and a sign-flip permutation p
(`runs.stats.paired_permutation_test`; with n seeds it cannot go below 2 / 2^n, 0.25 for 3 seeds, so
it is reported, not used). A part of a claim is *reproduced* when the t interval of the difference lies
above 0 in the claimed direction, *not reproduced* when the interval excludes any effect of at least
MIN_EFFECT (0.01) in that direction, else *inconclusive*. "Small cost in average accuracy": the drop of
in-distribution accuracy has a t interval below SMALL_COST (0.05) -> reproduced; above it ->
not reproduced. A claim is reproduced when all its parts are, not reproduced when any part is not,
else inconclusive. No correction for the several parts (each part is its own hypothesis).

Resumable: each (run, seed) writes OUT/runs/<run>_seed<k>.json (metrics and the settings) and the
weights later runs start from (pretrain, teacher) as .pt; a finished run is skipped, a folder holding
runs of other settings is refused (the CNN arm's settings and digest are those of the first study, so a
finished CNN folder is reused; the B-cos arm saves every run's weights, for looking at its maps). `quick=True` runs the same study on tiny data in seconds (a test
of the machinery; its numbers mean nothing).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import time
from pathlib import Path
from typing import Sequence

import torch

from ..core.errors import ConfigError
from .stats import bootstrap_interval, paired_permutation_test

MIN_EFFECT = 0.01
SMALL_COST = 0.05
TEACHER_MIN_WGA = 0.75

FULL = dict(size=32, n_train=512, n_val=256, n_test=400, bias=1.0, teacher_bias=0.5, width=16, teacher_width=32,
            batch_size=32, lr=1e-3, pretrain_epochs=10, finetune_epochs=15, guidance_weight=1 / 32,
            guidance_method="input_x_gradient", limited_fraction=0.05, teacher_epochs=30, student_epochs=20,
            temperature=1.0, kd_weights=(0.0, 1.0, 0.0), e2kd_weights=(0.0, 1.0, 1.0), distill_method="gradcam",
            distill_layer="features")
QUICK = dict(FULL, size=16, n_train=48, n_val=16, n_test=16, pretrain_epochs=1, finetune_epochs=1,
             teacher_epochs=1, student_epochs=1, limited_fraction=0.25)

# The B-cos arm (module docstring): same data, B-cos nets, the authors' B-cos settings; fixed before running.
BCOS_FULL = dict(FULL, backbone="bcos", guidance_weight=1e-3, guidance_method="bcos", distill_method="bcos",
                 distill_layer=None, finetune_epochs=6, teacher_epochs=24, student_epochs=8)
BCOS_QUICK = dict(BCOS_FULL, size=16, n_train=48, n_val=16, n_test=16, pretrain_epochs=1, finetune_epochs=1,
                  teacher_epochs=1, student_epochs=1, limited_fraction=0.25)
BACKBONES = ("cnn", "bcos")

# run name -> (what it is, the runs it starts from)
RUNS = ("pretrain", "unguided", "energy", "l1", "energy_limited", "teacher", "kd", "e2kd")

_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def t_interval(values, level: float = 0.95) -> tuple[float, float, float]:
    """Mean and Student-t interval of the mean (95% only; NaNs dropped; a single value gives (v, nan, nan))."""
    if level != 0.95:
        raise ConfigError("t_interval supports level=0.95 only")
    v = [float(x) for x in values if not math.isnan(float(x))]
    if not v:
        return math.nan, math.nan, math.nan
    mean = sum(v) / len(v)
    if len(v) == 1:
        return mean, math.nan, math.nan
    sd = math.sqrt(sum((x - mean) ** 2 for x in v) / (len(v) - 1))
    t = _T975[len(v) - 2] if len(v) - 1 <= len(_T975) else 1.96
    half = t * sd / math.sqrt(len(v))
    return mean, mean - half, mean + half


def _digest(cfg: dict) -> str:
    return hashlib.sha1(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:12]


class _Study:
    def __init__(self, out_dir, cfg: dict, log):
        self.out = Path(out_dir)
        self.runs_dir = self.out / "runs"
        self.runs_dir.mkdir(parents=True, exist_ok=True)
        self.cfg = cfg
        self.digest = _digest(cfg)
        self.log = log
        self.computed: list[str] = []
        self._data: dict = {}

    # -- data and models ------------------------------------------------------------------------
    def data(self, split: str, seed: int, bias: float | None = None, box_fraction: float = 1.0):
        from ..envs.shortcut import shortcut_data

        c = self.cfg
        n = {"train": c["n_train"], "val": c["n_val"], "test": c["n_test"]}[split]
        bias = c["bias"] if bias is None else bias
        key = (split, seed, bias, box_fraction)
        if key not in self._data:
            self._data[key] = shortcut_data(split, n=n, size=c["size"], bias=bias, seed=seed, box_fraction=box_fraction)
        return self._data[key]

    def net(self, seed: int, width: int | None = None):
        from ..training.nets import small_cnn

        if self.cfg.get("backbone", "cnn") == "bcos":
            from ..models.bcos import BcosCNN

            with torch.random.fork_rng(devices=[]):  # weights from the seed alone, global RNG untouched
                torch.manual_seed(seed)
                return BcosCNN(2, width=width or self.cfg["width"])
        return small_cnn(2, width or self.cfg["width"], seed=seed)

    # -- bookkeeping ----------------------------------------------------------------------------
    def _path(self, run: str, seed: int, ext: str) -> Path:
        return self.runs_dir / f"{run}_seed{seed}.{ext}"

    def _load(self, run: str, seed: int) -> dict | None:
        path = self._path(run, seed, "json")
        if not path.exists():
            return None
        saved = json.loads(path.read_text(encoding="utf-8"))
        if saved.get("digest") != self.digest:
            raise ConfigError(f"'{self.out}' holds runs of other settings ({path.name}); use another folder")
        return saved

    def _save(self, run: str, seed: int, metrics: dict, seconds: float, model=None) -> dict:
        if model is not None:
            tmp = self._path(run, seed, "pt.tmp")
            torch.save(model.state_dict(), tmp)
            tmp.replace(self._path(run, seed, "pt"))
        row = {"run": run, "seed": seed, "digest": self.digest, "config": self.cfg, "seconds": seconds, **metrics}
        tmp = self._path(run, seed, "json.tmp")
        tmp.write_text(json.dumps(row, indent=1, default=float), encoding="utf-8")
        tmp.replace(self._path(run, seed, "json"))
        self.computed.append(f"{run}_seed{seed}")
        self.log(f"{run} seed {seed}: {seconds:.1f} s; test acc {metrics.get('test', {}).get('accuracy', math.nan):.3f}, "
                 f"wga {metrics.get('test', {}).get('worst_group_accuracy', math.nan):.3f}, "
                 f"epg {metrics.get('test', {}).get('epg', math.nan):.3f}")
        return row

    def _weights(self, run: str, seed: int, width: int | None = None):
        """The model a finished run saved; recomputed (deterministically) if its weights are missing."""
        path = self._path(run, seed, "pt")
        if not path.exists():
            self._path(run, seed, "json").unlink(missing_ok=True)
            self.run(run, seed)
        model = self.net(seed, width)
        model.load_state_dict(torch.load(path, weights_only=True))
        return model

    def _keep(self, model):
        """The B-cos arm keeps every run's weights (its maps are looked at); the CNN arm as before."""
        return model if self.cfg.get("backbone", "cnn") == "bcos" else None

    # -- evaluation -----------------------------------------------------------------------------
    def evaluate(self, model, seed: int, method: str, layer=None, teacher=None) -> dict:
        from ..training.loop import evaluate_model

        test = self.data("test", seed)
        val = self.data("val", seed)
        out = {"test": evaluate_model(model, test, method=method, layer=layer),
               "val": evaluate_model(model, val, method=None)}
        if teacher is not None:
            model.eval()
            teacher.eval()
            with torch.no_grad():
                agree = (model(test.images).argmax(1) == teacher(test.images).argmax(1)).double().mean()
            out["agreement"] = float(agree)
        return out

    # -- the runs -------------------------------------------------------------------------------
    def run(self, run: str, seed: int) -> dict:
        from ..training.loop import fit

        done = self._load(run, seed)
        if done is not None:
            return done
        c = self.cfg
        t0 = time.perf_counter()
        common = dict(lr=c["lr"], batch_size=c["batch_size"], progress=False, val=None)
        guided_eval = dict(method=c["guidance_method"])
        if run in ("pretrain", "teacher"):
            teacher = run == "teacher"
            model = self.net(seed, c["teacher_width"] if teacher else None)
            train = self.data("train", seed, bias=c["teacher_bias"] if teacher else None)
            fit(model, train, epochs=c["teacher_epochs" if teacher else "pretrain_epochs"], seed=seed * 10 + 1, **common)
            metrics = self.evaluate(model, seed, **(dict(method=c["distill_method"], layer=c["distill_layer"])
                                                    if teacher else guided_eval))
            return self._save(run, seed, metrics, time.perf_counter() - t0, model)
        if run in ("unguided", "energy", "l1", "energy_limited"):
            model = self._weights("pretrain", seed)
            t0 = time.perf_counter()
            fraction = c["limited_fraction"] if run == "energy_limited" else 1.0
            guidance = None if run == "unguided" else dict(
                loss="l1" if run == "l1" else "energy", method=c["guidance_method"], weight=c["guidance_weight"])
            result = fit(model, self.data("train", seed, box_fraction=fraction), epochs=c["finetune_epochs"],
                         guidance=guidance, seed=seed * 10 + 2, **common)
            metrics = self.evaluate(model, seed, **guided_eval)
            metrics["guided_images_last_epoch"] = result.history[-1].get("guided_images")
            return self._save(run, seed, metrics, time.perf_counter() - t0, self._keep(model))
        if run in ("kd", "e2kd"):
            teacher = self._weights("teacher", seed, c["teacher_width"])
            t0 = time.perf_counter()
            student = self.net(seed * 10 + 3)
            distill = dict(teacher=teacher, method=c["distill_method"], temperature=c["temperature"],
                           weights=tuple(c[f"{run}_weights"]), student_layer=c["distill_layer"],
                           teacher_layer=c["distill_layer"])
            fit(student, self.data("train", seed), epochs=c["student_epochs"], distill=distill, seed=seed * 10 + 4,
                **common)
            metrics = self.evaluate(student, seed, method=c["distill_method"], layer=c["distill_layer"],
                                    teacher=teacher)
            return self._save(run, seed, metrics, time.perf_counter() - t0, self._keep(student))
        raise ConfigError(f"unknown run '{run}'")


# -- claims ---------------------------------------------------------------------------------------
def _value(row: dict, metric: str) -> float:
    if metric == "id_accuracy":
        return float(row["val"]["accuracy"])
    if metric == "agreement":
        return float(row["agreement"])
    return float(row["test"][metric])


def _compare(rows: dict, a: str, b: str, metric: str, seeds, kind: str = "higher") -> dict:
    """Part of a claim: run `a` vs run `b` on `metric`, paired by seed. kind "higher": a > b claimed;
    "small_cost": b - a (the drop from b to a) claimed below SMALL_COST."""
    va = [_value(rows[a][s], metric) for s in seeds]
    vb = [_value(rows[b][s], metric) for s in seeds]
    diff = [x - y for x, y in zip(va, vb)]
    mean, lo, hi = t_interval(diff)
    _, blo, bhi = bootstrap_interval(diff)
    p = paired_permutation_test(va, vb)
    if kind == "higher":
        verdict = ("inconclusive" if math.isnan(lo) else "reproduced" if lo > 0
                   else "not reproduced" if hi < MIN_EFFECT else "inconclusive")
        text = f"{a} > {b} on {metric}"
    else:  # the drop b - a must be small: -hi .. -lo is its interval
        verdict = ("inconclusive" if math.isnan(lo) else "reproduced" if -lo < SMALL_COST
                   else "not reproduced" if -hi > SMALL_COST else "inconclusive")
        text = f"{b} - {a} on {metric} < {SMALL_COST}"
    return {"part": text, "a": a, "b": b, "metric": metric, "kind": kind, "a_values": va, "b_values": vb,
            "a_mean": sum(va) / len(va), "b_mean": sum(vb) / len(vb), "diff_mean": mean, "t_low": lo, "t_high": hi,
            "boot_low": blo, "boot_high": bhi, "p_permutation": p, "verdict": verdict}


def _combine(parts: Sequence[dict], precondition: str | None = None) -> str:
    if precondition:   # the comparison does not test the claim
        return "inconclusive"
    verdicts = [p["verdict"] for p in parts]
    if "not reproduced" in verdicts:
        return "not reproduced"
    return "reproduced" if all(v == "reproduced" for v in verdicts) else "inconclusive"


def evaluate_claims(rows: dict, seeds, cfg: dict) -> list[dict]:
    claims = []
    parts = [_compare(rows, "energy", "unguided", "epg", seeds),
             _compare(rows, "energy", "unguided", "worst_group_accuracy", seeds),
             _compare(rows, "energy", "unguided", "id_accuracy", seeds, kind="small_cost")]
    claims.append({"id": 1, "claim": "energy guidance raises EPG and worst-group accuracy over the unguided model "
                   "at a small cost in average (in-distribution) accuracy", "parts": parts})
    parts = [_compare(rows, "energy", "l1", "epg", seeds), _compare(rows, "l1", "energy", "iou", seeds)]
    claims.append({"id": 2, "claim": "energy gives higher EPG than L1; L1 gives higher IoU than energy", "parts": parts})
    parts = [_compare(rows, "energy_limited", "unguided", "epg", seeds),
             _compare(rows, "energy_limited", "unguided", "worst_group_accuracy", seeds)]
    claims.append({"id": 3, "claim": f"energy guidance with boxes on {cfg['limited_fraction']:.0%} of the training "
                   "images still raises EPG and worst-group accuracy over the unguided model", "parts": parts})
    parts = [_compare(rows, "e2kd", "kd", "agreement", seeds), _compare(rows, "e2kd", "kd", "worst_group_accuracy", seeds)]
    teacher_wga = sum(_value(rows["teacher"][s], "worst_group_accuracy") for s in seeds) / len(seeds)
    pre = None if teacher_wga >= TEACHER_MIN_WGA else (
        f"the teacher is not unbiased enough (mean test worst-group accuracy {teacher_wga:.3f} < {TEACHER_MIN_WGA})")
    claims.append({"id": 4, "claim": "an e2KD student distilled on shortcut-biased data agrees more with an unbiased "
                   "teacher and reaches a higher worst-group accuracy than a plain-KD student", "parts": parts,
                   "precondition": pre, "teacher_worst_group_accuracy": teacher_wga})
    for c in claims:
        c["verdict"] = _combine(c["parts"], c.get("precondition"))
    return claims


def _fmt(x: float) -> str:
    return "nan" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3f}"


def _markdown(claims, rows, seeds, cfg, command: str, seconds: float) -> str:
    total = sum(rows[run][s]["seconds"] for run in RUNS for s in seeds)
    bcos = cfg.get("backbone", "cnn") == "bcos"
    lines = ["# Training with explanations: the papers' claims on the shortcut environment"
             + (" (B-cos arm)" if bcos else ""), "",
             f"Command: `{command}`", "",
             f"Seeds {list(seeds)}; settings digest {_digest(cfg)}; the runs took {total / 60:.1f} min in all "
             f"(this call: {seconds / 60:.1f} min; finished runs are reused). Set-up and decision rules: "
             "`saliencylab.runs.training_claims` "
             f"(docstring). Intervals: 95% t over seeds (df = {len(seeds) - 1}), bootstrap over seeds in brackets; "
             f"p: sign-flip permutation over seeds (cannot go below {2 / 2 ** len(seeds):.3g} with {len(seeds)} seeds).",
             "", "## Verdicts", ""]
    for c in claims:
        lines.append(f"**Claim {c['id']}: {c['verdict'].upper()}**: {c['claim']}.")
        if c.get("precondition"):
            lines.append(f"  Precondition failed: {c['precondition']}.")
        lines.append("")
        lines.append("| part | A mean | B mean | A - B | 95% t interval | bootstrap | p | verdict |")
        lines.append("|---|---|---|---|---|---|---|---|")
        for p in c["parts"]:
            lines.append(f"| {p['part']} | {_fmt(p['a_mean'])} | {_fmt(p['b_mean'])} | {_fmt(p['diff_mean'])} | "
                         f"[{_fmt(p['t_low'])}, {_fmt(p['t_high'])}] | [{_fmt(p['boot_low'])}, {_fmt(p['boot_high'])}] | "
                         f"{_fmt(p['p_permutation'])} | {p['verdict']} |")
        lines.append("")
    lines += ["## Every model (mean over seeds, 95% t interval)", "",
              "| run | test accuracy | test worst-group | in-distribution accuracy | test EPG | test IoU | agreement | seconds |",
              "|---|---|---|---|---|---|---|---|"]
    for run in RUNS:
        if run not in rows:
            continue
        cells = []
        for metric in ("accuracy", "worst_group_accuracy", "id_accuracy", "epg", "iou", "agreement"):
            if metric == "agreement" and "agreement" not in rows[run][seeds[0]]:
                cells.append("")
                continue
            m, lo, hi = t_interval([_value(rows[run][s], metric) for s in seeds])
            cells.append(f"{_fmt(m)} [{_fmt(lo)}, {_fmt(hi)}]")
        secs = sum(rows[run][s]["seconds"] for s in seeds) / len(seeds)
        lines.append(f"| {run} | " + " | ".join(cells) + f" | {secs:.1f} |")
    lines += ["", "Test accuracy per (class, background) group, mean over seeds (group = class * 2 + background; "
              "groups 0 and 3 have the training images' pairing, 1 and 2 the other):", "",
              "| run | " + " | ".join(f"group {g}" for g in range(4)) + " |", "|---|---|---|---|---|"]
    for run in RUNS:
        if run not in rows:
            continue
        accs = [[rows[run][s]["test"]["group_accuracies"].get(str(g), math.nan) for s in seeds] for g in range(4)]
        lines.append(f"| {run} | " + " | ".join(_fmt(sum(a) / len(a)) for a in accs) + " |")
    lines += ["", ("EPG / IoU: B-cos contribution maps W(x) x (method `bcos`, summed over the encoded channels) of "
                   "the true class for every model" if bcos else
                   "EPG / IoU: input x gradient maps of the true class for pretrain/unguided/energy/l1/energy_limited, "
                   "Grad-CAM at `features` for teacher/kd/e2kd") + "; exact object boxes of the balanced test images.", ""]
    return "\n".join(lines)


def run_claims(out_dir, seeds: Sequence[int] = (0, 1, 2), quick: bool = False, log=None,
               backbone: str = "cnn") -> dict:
    """Run (or resume) the study into `out_dir`; writes claims.md and claims.json; returns the json dict.

    backbone "cnn" (the first study: `small_cnn`, files directly in `out_dir`) or "bcos" (the B-cos
    arm: `BcosCNN` and the authors' B-cos settings, files in `out_dir`/bcos)."""
    seeds = [int(s) for s in seeds]
    if backbone not in BACKBONES:
        raise ConfigError(f"backbone must be one of {', '.join(BACKBONES)}, got {backbone!r}")
    if len(seeds) < 2 or len(set(seeds)) != len(seeds):
        raise ConfigError(f"the study needs at least two distinct seeds (three or more for the claims), got {seeds}")
    if backbone == "bcos":
        cfg = dict(BCOS_QUICK if quick else BCOS_FULL)
        out_dir = Path(out_dir) / "bcos"
    else:  # unchanged settings (and digest): a finished CNN folder is reused
        cfg = dict(QUICK if quick else FULL)
    cfg["kd_weights"], cfg["e2kd_weights"] = list(cfg["kd_weights"]), list(cfg["e2kd_weights"])
    log = log or (lambda line: print(line, file=sys.stderr, flush=True))
    t0 = time.perf_counter()
    study = _Study(out_dir, cfg, log)
    rows: dict = {run: {} for run in RUNS}
    for seed in seeds:
        for run in RUNS:
            rows[run][seed] = study.run(run, seed)
    claims = evaluate_claims(rows, seeds, cfg)
    seconds = time.perf_counter() - t0
    command = "python -m saliencylab.runs.training_claims OUT" + (" --backbone bcos" if backbone == "bcos" else "") + \
              (" --quick" if quick else "") + \
              ("" if seeds == [0, 1, 2] else " --seeds " + " ".join(map(str, seeds)))
    out = Path(out_dir)
    result = {"backbone": backbone, "config": cfg, "digest": study.digest, "seeds": seeds, "claims": claims, "computed": study.computed,
              "seconds": seconds, "run_seconds": sum(rows[r][s]["seconds"] for r in RUNS for s in seeds),
              "command": command,
              "runs": {run: {str(s): {k: v for k, v in rows[run][s].items() if k != "config"} for s in seeds}
                       for run in RUNS}}
    (out / "claims.json").write_text(json.dumps(result, indent=1, default=float), encoding="utf-8")
    (out / "claims.md").write_text(_markdown(claims, rows, seeds, cfg, command, seconds), encoding="utf-8")
    return result


def minority_contributions(out_dir, seeds: Sequence[int] = (0, 1, 2), quick: bool = False) -> dict:
    """Where the B-cos arm's decisions come from on the minority test images (groups 1 and 2: the
    (class, background) pairings never seen in training). A B-cos net with two classes and logit bias 0
    is exactly logit(y) - logit(other) = sum over pixels of (A_y - A_other), A = the contribution maps
    W(x) x; that margin is split over the digit's pixels, the rest of its box (background texture
    inside the box, which the box-based EPG counts as "on the object") and the pixels outside the box.
    Also, per region, the true class's positive and negative contributions (does energy guidance leave
    negative evidence in the background?). Needs a finished B-cos arm in `out_dir`/bcos; writes
    minority_contributions.md / .json there."""
    import saliencylab as sl

    from ..models.bcos import BcosCNN

    cfg = dict(BCOS_QUICK if quick else BCOS_FULL)
    cfg["kd_weights"], cfg["e2kd_weights"] = list(cfg["kd_weights"]), list(cfg["e2kd_weights"])
    folder = Path(out_dir) / "bcos"
    study = _Study(folder, cfg, lambda line: None)
    runs = [r for r in RUNS if r != "pretrain"]
    rows: dict = {}
    for run in runs:
        for seed in seeds:
            if study._load(run, seed) is None or not study._path(run, seed, "pt").exists():
                raise ConfigError(f"'{folder}' has no finished B-cos run {run} seed {seed}; run the B-cos arm first")
            test = study.data("test", seed)
            net = BcosCNN(2, width=cfg["teacher_width"] if run == "teacher" else cfg["width"])
            net.load_state_dict(torch.load(study._path(run, seed, "pt"), weights_only=True))
            net.eval()
            keep = (test.groups == 1) | (test.groups == 2)
            x, y = test.images[keep], test.labels[keep]
            digit = test.true_objects[keep].float()
            x0, y0, x1, y1 = test.true_boxes[keep].round().long().unbind(1)
            ii = torch.arange(x.shape[-1])
            box = (((ii[None, :] >= y0[:, None]) & (ii[None, :] < y1[:, None]))[:, :, None]
                   & ((ii[None, :] >= x0[:, None]) & (ii[None, :] < x1[:, None]))[:, None, :]).float()
            box = torch.maximum(box, digit)
            regions = {"digit": digit, "box_texture": box - digit, "outside": 1 - box}
            a_true = sl.explain(net, x, "bcos", target=y).maps.detach()
            a_other = sl.explain(net, x, "bcos", target=1 - y).maps.detach()
            with torch.no_grad():
                logits = net(x)
            row = {"accuracy": float((logits.argmax(1) == y).double().mean()),
                   "margin": float((logits.gather(1, y[:, None]) - logits.gather(1, (1 - y)[:, None])).mean())}
            for name, r in regions.items():
                row[f"margin_{name}"] = float(((a_true - a_other) * r).flatten(1).sum(1).mean())
                row[f"true_pos_{name}"] = float((a_true.clamp(min=0) * r).flatten(1).sum(1).mean())
                row[f"true_neg_{name}"] = float((a_true.clamp(max=0) * r).flatten(1).sum(1).mean())
            rows.setdefault(run, {})[seed] = row
    keys = ["accuracy", "margin", "margin_digit", "margin_box_texture", "margin_outside", "true_pos_digit",
            "true_pos_box_texture", "true_pos_outside", "true_neg_box_texture", "true_neg_outside"]
    means = {run: {k: sum(rows[run][s][k] for s in seeds) / len(seeds) for k in keys} for run in runs}
    lines = ["# B-cos arm: where the decision comes from on the minority test images", "",
             f"Groups 1 and 2 of the balanced test set, seeds {list(seeds)}, means over seeds. margin = logit(true) - "
             "logit(other) = sum of the contribution differences A_true - A_other (exact for these nets), split "
             "over the digit's pixels, the background texture inside its box and the pixels outside the box; "
             "A_true+ / A_true-: the true class's positive / negative contributions per region (sums per image).", "",
             "| run | accuracy | margin | from digit | from box texture | from outside | A_true+ digit | "
             "A_true+ box texture | A_true+ outside | A_true- box texture | A_true- outside |",
             "|---|" + "---|" * len(keys)]
    for run in runs:
        lines.append(f"| {run} | " + " | ".join(f"{means[run][k]:.3f}" for k in keys) + " |")
    out = {"seeds": list(seeds), "means": means, "per_seed": {r: {str(s): v for s, v in d.items()} for r, d in rows.items()}}
    (folder / "minority_contributions.json").write_text(json.dumps(out, indent=1), encoding="utf-8")
    (folder / "minority_contributions.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m saliencylab.runs.training_claims",
                                 description="Test the training-with-explanations claims on the shortcut environment.")
    ap.add_argument("out", help="output folder (resumable)")
    ap.add_argument("--quick", action="store_true", help="tiny data and one epoch per phase: a test, not a result")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    ap.add_argument("--backbone", choices=(*BACKBONES, "all"), default="cnn",
                    help="cnn: small ReLU CNN (files in OUT); bcos: B-cos CNN with the authors' B-cos settings "
                         "(files in OUT/bcos); all: both")
    ap.add_argument("--contributions", action="store_true",
                    help="after the B-cos arm, split its models' decisions on the minority test images over digit, "
                         "box texture and background (OUT/bcos/minority_contributions.md)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    for backbone in (BACKBONES if args.backbone == "all" else (args.backbone,)):
        result = run_claims(args.out, seeds=args.seeds, quick=args.quick, backbone=backbone)
        for c in result["claims"]:
            print(f"{backbone} claim {c['id']}: {c['verdict']}")
        print(Path(args.out) / ("bcos" if backbone == "bcos" else "") / "claims.md")
        if backbone == "bcos" and args.contributions:
            minority_contributions(args.out, seeds=args.seeds, quick=args.quick)
            print(Path(args.out) / "bcos" / "minority_contributions.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
