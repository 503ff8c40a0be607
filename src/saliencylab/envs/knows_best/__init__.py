""""Do Explanations Explain? Model Knows Best" (Khakzar et al., CVPR 2022) as a test suite.

The model itself makes the ground truth: for chosen classes we optimize patches that, pasted anywhere
on a noise background, drive the model to that class (softmax probability above a threshold) while
leaving the other patches' class logits alone. Images composed of such patches have known answers:

- class sensitivity: two patches of different classes; the map for one class must not highlight the
  other class's patch, since that patch does not change the explained class.
- null player: one patch plus a patch the model does not use for the target class (here uniform
  noise); the null patch must get no attribution.
- symmetry: the same patch twice; both copies play the same role and must get equal attribution.

What the authors do (github.com/CAMP-eXplain-AI/Do-Explanations-Explain)
-----------------------------------------------------------------------
- `main.py`, `run.sh`: ResNet-18 (torchvision, ImageNet), 224 px inputs in [0, 1] normalized with the
  ImageNet mean/std. Every saved image gets its own freshly optimized pair of patches, for two
  classes drawn from 0-499 and 500-999; the image is saved with the background and positions of
  the iteration that met the stop criterion.
- `networks.py`, `common.py`: each patch is the output of a deep-image-prior skip network (input
  32-channel uniform noise at 256 px, final stride-3 conv + sigmoid), hence 86 x 86 px with pixels in
  [0, 1]. RMSprop on the generator weights, lr 0.01 (0.005 in run.sh), up to 1500 (1000) iterations,
  batch of one image per iteration.
- `loss.py`: each iteration draws a fresh background N(0.5, 0.1) clamped to [0, 1] and random
  non-overlapping positions (`utils.random_patch_placer`: a random separator along a random axis,
  one patch each side). Loss: the first 300 iterations (200 for the repeated patch) maximize the raw
  target logit (-5 z); afterwards focal-weighted -10 FL z_target + 5 FL (z_j(both) - z_j(patch j
  alone))^2, the square being the change of the other class's logit when this patch is added.
  The null-player variant also penalizes (z_j(patch i alone) - z_j(background))^2, so patch i is a
  null player for class j, and trains patch j toward probability 0.95; the map for class j is scored.
- Stop (`main.py`): after iteration 50, when on the current sample every patch's softmax
  probability is > 0.94 and every interaction tanh(|dz| / min(|z_both|, |z_alone|)) < 0.14.
- Scores (`utils.py`, `Attribution_Methods_Submit.ipynb`) on the heatmaps as saved by
  `save_data_image`: raw (3-channel maps averaged over channels), divided by 255 only when their
  max |h| exceeds 1, never normalized otherwise, so the relative scale of the two class maps counts:
  class sensitivity = [sum_P0 min(|h0|, |h1|) + sum_P1 min(|h0|, |h1|)] / [sum_P0 |h0| + sum_P1 |h1|]
  (`get_class_sensitivity`, lower is better); null player = 1 / (sum_target h / sum_null h)
  (their null-player cell inverts `get_null_player`; signed, lower is better); symmetry: the same
  patch at fixed (5, 5) and (133, 133), Spearman correlation over the data set of the mean |h| on
  the two copies (`two_patch_corr_score`). Each is averaged over the images (no guard against a
  zero denominator).

What we do (this package, src/saliencylab/envs/knows_best/; tests tests/envs/test_knows_best.py)
--------------------------------------------------------------------------------------------
- Any classifier (B, 3, H, W) -> (B, classes). Patches and backgrounds live in [0, 1]; `normalize`
  maps them to the model's input space (None: the model takes [0, 1]; a `Normalize`, a (mean, std)
  pair, or any differentiable callable, keyed in the cache by its `cache_key` attribute or else its
  qualified name). For the embedded model use
  `normalize=kb.normalize_for(models.load("efficientnet_lite0"))` (its mean/std are 127/255 and
  128/255, not ImageNet's; `kb.IMAGENET_NORMALIZE` is for torchvision-style models).
- Patches are pixels parameterized by a sigmoid (no deep image prior), optimized with Adam. All
  classes are optimized together in shared batched passes: each step draws `batch_size` fresh
  backgrounds N(0.5, 0.1) clamped to [0, 1], pairs the classes by a random permutation, places each
  pair at random non-overlapping positions (the authors' placer) and forwards, per pair and
  background, patch i alone, patch j alone, and both. Loss: cross-entropy of each patch alone
  (targets the probability directly) + `independence_weight` * mean of
  ((z_j(both) - z_j(j alone)) / max(1, min(|z_j(both)|, |z_j(j alone)|)))^2 over both directions
  (the square of the argument of the authors' tanh interaction, denominator held fixed). The first `warmup`
  steps forward each patch alone only (cross-entropy only), like the authors' first iterations.
- Convergence is measured on a fixed held-out set (`n_eval` backgrounds, random positions, pairs
  (i, i+1)): `probabilities` is each patch's minimum probability alone, `interaction` the maximum
  of the authors' tanh(|dz| / min(|z_both|, |z_alone|)) of the patch on its partner's class;
  converged = probability > threshold and interaction < `independence`. Optimization stops when
  all have converged, or after `steps`; non-converged patches are reported, not hidden.
- Results are cached under `cache_dir` (default $SALIENCYLAB_CACHE or ~/.cache/saliencylab), in
  knows_best/<sha256>.pt, keyed by the model's state_dict bytes (or `model_key`), the classes and
  every parameter; loaded with torch.load(weights_only=True) without running the model.
- One patch per class, reused across suite images (fresh backgrounds and positions) rather than a
  new pair per image. Suites place patches at random non-overlapping positions for all three kinds
  (also symmetry, where the authors use fixed corners); the null patch is uniform noise U[0, 1] (the
  authors use a patch of another class optimized not to move the target logit). `make_suite`
  measures, rather than assumes, independence: for every image it forwards the image without each
  patch and reports logit changes (`Suite.independence`, `Suite.interaction`).
- `score_maps` (what `evaluate_method` and the leaderboard report) scores per image, in [0, 1],
  higher is better, on |map| divided by its own maximum (the authors score raw maps: a method
  whose two class maps differ in scale scores differently here):
    class_sensitivity = 1 - [sum_R0 min(h0, h1) + sum_R1 min(h0, h1)] / [sum_R0 h0 + sum_R1 h1]
                        (h0, h1: maps for the classes of patches R0, R1; 0 if the denominator is 0)
    null_player       = clamp(1 - sum_null h / sum_target h, 0, 1)   (0 if sum_target h = 0)
    symmetry          = min(m0, m1) / max(m0, m1), m_k = mean of h over copy k   (0 if both are 0)
  i.e. 1 - the authors' class sensitivity and 1 - their null-player ratio but on max-normalized
  |h|, and a per-image symmetry instead of a data-set rank correlation. `authors_scores` gives their
  three numbers exactly as they compute them (raw maps, / 255 rule, signed null-player sums).
"""

from __future__ import annotations

# The package follows the sections of the former single module; every public name stays importable here.
from .cache import _fingerprint, model_key
from .generation import generate_patches
from .normalization import IMAGENET_NORMALIZE, Normalize, normalize_for
from .results import AUTHORS_PATCH_FRACTION, AXIOMS, DESCRIPTIONS, Patches, Suite
from .scoring import authors_scores, evaluate_method, score_maps
from .suites import make_suite

__all__ = [
    "AXIOMS", "DESCRIPTIONS", "Normalize", "IMAGENET_NORMALIZE", "normalize_for", "Patches", "Suite",
    "generate_patches", "make_suite", "evaluate_method", "score_maps", "authors_scores", "model_key",
]
