"""The `positive-aggregation` suite: does aggregating or propagating only positive signal make maps
blind to the class and to the model's parameters? (Khakzar, Baselizadeh, Navab 2020, "Rethinking
positive aggregation and propagation of gradients in gradient-based saliency methods").

Every method family of the study is run twice on the embedded model and the bundled photos (and their
mirror images): with its positive aggregation/propagation ("positive" group) and without it ("signed"
group). Two sanity metrics score each map, lower = more sensitive = better:
- `random_logit`: similarity (SSIM) between the map of the explained class and the map of a random
  other class; a class-insensitive method scores high.
- `model_randomization`: cascading parameter randomization of chosen layers (output first); mean
  similarity (Spearman) to the original map over the layers; a parameter-insensitive method scores
  high.
A photo and its mirror image are one unit (their scores are averaged: a mirror is not an independent
sample). Each family's pair (positive vs signed, paired by photo) gets the mean difference with a 95%
bootstrap interval, a paired sign-flip permutation test (Holm-corrected over the families of each
metric) and the number of photos where the positive variant is the more similar. The study's claim is
*reproduced* for a family and metric when the positive variant is significantly more similar (less
sensitive) than the signed one. With the 5 bundled photos the smallest possible p is 2/32 = 0.0625,
so no family can reach 5%: the table then reports the direction ("consistent in 5/5 photos") and says
that more photos are needed.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .stats import bootstrap_interval, holm, paired_permutation_test

# (family, positive variant, signed variant): (method, parameters)
STUDY = (
    ("Grad-CAM channel weights", ("gradcam", {"positive_gradients": True}), ("gradcam", {})),
    ("Grad-CAM++ channel weights", ("gradcam_plus_plus", {}), ("gradcam_plus_plus", {"positive_gradients": False})),
    ("LayerCAM weights", ("layercam", {}), ("layercam", {"positive_gradients": False})),
    ("FullGrad post-processing", ("fullgrad", {}), ("fullgrad", {"postprocess": "signed"})),
    ("LRP z-plus vs epsilon", ("lrp", {"composite": "zplus"}), ("lrp", {"composite": "epsilon"})),
    ("guided backprop vs gradient", ("guided_backprop", {}), ("gradient", {})),
    ("DeconvNet vs gradient", ("deconvnet", {}), ("gradient", {})),
    ("RectGrad vs input x gradient", ("rectgrad", {}), ("input_x_gradient", {})),
)
METRICS = ("random_logit", "model_randomization")
# Cascading randomization of EfficientNet-Lite0, output first: every fourth block (the full cascade of
# ~150 parameterised modules would cost ~150 explanations per map).
LITE0_LAYERS = ["classifier", "head", "blocks.15", "blocks.12", "blocks.8", "blocks.4", "blocks.0", "stem"]


def _groups(families, images: int | None, full: bool):
    from .leaderboard import Group, embedded_photos

    loaded, x, display = embedded_photos()
    if images:
        x = x[:images]
    x = torch.cat([x, x.flip(-1)])  # mirror images: averaged with their photo (see compare)
    metric_params = {"model_randomization": {"layers": LITE0_LAYERS}}
    groups = []
    for side, index in (("positive", 1), ("signed", 2)):
        params = {}
        for family in families:
            name, p = family[index]
            params[name] = dict(p)
        note = (f"EfficientNet-Lite0 on {len(x)} photos (bundled and mirrored); the {side} variant of every "
                "family of the positive-aggregation study. Lower similarity = more sensitive = better.")
        groups.append(Group(side, loaded.model, x, None, METRICS, params, metric_params=metric_params, note=note,
                            display=display))
    return groups


def per_photo(scores, mirrored: bool = True) -> list[float]:
    """Scores of [photos..., their mirrors...] averaged per photo (one unit per photo)."""
    if not mirrored or len(scores) % 2:
        return list(scores)
    half = len(scores) // 2
    return [(a + b) / 2 for a, b in zip(scores[:half], scores[half:])]


def compare(results, families, mirrored: bool = True) -> list[dict]:
    """Per family and metric: positive minus signed similarity, paired by photo (mirror averaged in)."""
    by = {(g.name, r.method, r.metric): r for g in results for r in g.records}
    rows = []
    for metric in METRICS:
        found = []
        for family, (pos, _), (neg, _) in families:
            a, b = by.get(("positive", pos, metric)), by.get(("signed", neg, metric))
            if a is None or b is None:
                continue
            sa, sb = per_photo(a.scores, mirrored), per_photo(b.scores, mirrored)
            diff = [p - s for p, s in zip(sa, sb)]
            mean, low, high = bootstrap_interval(diff)
            found.append({"family": family, "metric": metric, "positive": pos, "signed": neg,
                          "positive_mean": sum(sa) / len(sa), "signed_mean": sum(sb) / len(sb), "difference": mean,
                          "ci_low": low, "ci_high": high, "p": paired_permutation_test(sa, sb), "n": len(diff),
                          "consistent": sum(d > 0 for d in diff)})
        for row, p_adj in zip(found, holm([r["p"] for r in found])):
            row["p_holm"] = p_adj
            row["reproduced"] = bool(p_adj < 0.05 and row["difference"] > 0)
            smallest = 2.0 / 2 ** row["n"]  # the exact two-sided sign-flip test's smallest p
            row["verdict"] = ("reproduced" if row["reproduced"] else
                              f"direction in {row['consistent']}/{row['n']} photos; too few photos for 5%"
                              if smallest >= 0.05 else "not reproduced")
        rows += found
    return rows


def comparison_markdown(rows) -> str:
    lines = ["## Positive vs signed variants (Khakzar et al. 2020)", "",
             "Similarity of the positive variant minus the signed one, paired by photo (each photo's score is "
             "the mean over the photo and its mirror image; 95% bootstrap interval); p: paired sign-flip "
             "permutation test, Holm-corrected per metric. The claim (positive aggregation/propagation makes "
             "maps less sensitive) is reproduced where the difference is significantly above 0.", "",
             "| family | metric | positive | signed | difference [95% CI] | positive more similar | p (Holm) | claim |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['family']} | {r['metric']} | {r['positive_mean']:.3f} | {r['signed_mean']:.3f} | "
                     f"{r['difference']:+.3f} [{r['ci_low']:+.3f}, {r['ci_high']:+.3f}] | "
                     f"{r['consistent']}/{r['n']} | {r['p_holm']:.3f} | {r['verdict']} |")
    return "\n".join(lines) + "\n"


def run(names, out: Path, *, full, seed, images, on_record, debug):
    from .leaderboard import run_group

    families = [f for f in STUDY if not names or f[1][0] in names or f[2][0] in names]
    results = []
    for group in _groups(families, images, full):
        methods = list(dict.fromkeys(group.method_params))
        results.append(run_group(group, methods, out, seed=seed, on_record=on_record, debug=debug))
    rows = compare(results, families)
    (out / "positive-aggregation.json").write_text(json.dumps(rows, indent=1))
    (out / "positive-aggregation.md").write_text(comparison_markdown(rows))
    return results


def study_methods() -> list[str]:
    return list(dict.fromkeys(m for _, (a, _), (b, _) in STUDY for m in (a, b)))
