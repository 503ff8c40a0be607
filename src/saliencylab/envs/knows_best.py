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
- Scores (`utils.py`, `Attribution_Methods_Submit.ipynb`), heatmaps divided by their max:
  class sensitivity = [sum_P0 min(|h0|, |h1|) + sum_P1 min(|h0|, |h1|)] / [sum_P0 |h0| + sum_P1 |h1|]
  (`get_class_sensitivity`, lower is better); null player = sum_null h / sum_target h
  (`get_null_player`, signed, lower is better); symmetry: the same patch at fixed (5, 5) and
  (133, 133), Spearman correlation over the data set of the mean |h| on the two copies
  (`two_patch_corr_score`).

What we do (this file, src/saliencylab/envs/knows_best.py; tests tests/envs/test_knows_best.py)
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
- Scores are per image, in [0, 1], higher is better; maps are |map| (max-normalized per map):
    class_sensitivity = 1 - [sum_R0 min(h0, h1) + sum_R1 min(h0, h1)] / [sum_R0 h0 + sum_R1 h1]
                        (h0, h1: maps for the classes of patches R0, R1; 0 if the denominator is 0)
    null_player       = clamp(1 - sum_null h / sum_target h, 0, 1)   (0 if sum_target h = 0)
    symmetry          = min(m0, m1) / max(m0, m1), m_k = mean of h over copy k   (0 if both are 0)
  i.e. 1 - the authors' class sensitivity, 1 - their null-player ratio (on |h|), and a per-image
  symmetry instead of a data-set rank correlation (`authors_scores` gives their three numbers).
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..core.errors import ConfigError, InputError
from ..core.session import Cost, ModelSession, model_device

__all__ = [
    "AXIOMS", "DESCRIPTIONS", "Normalize", "IMAGENET_NORMALIZE", "normalize_for", "Patches", "Suite",
    "generate_patches", "make_suite", "evaluate_method", "score_maps", "authors_scores", "model_key",
]

AXIOMS = ("class_sensitivity", "null_player", "symmetry")
DESCRIPTIONS = {
    "class_sensitivity": "two patches of different classes: each class's map must leave the other patch out",
    "null_player": "a target patch plus a noise patch the model ignores: the noise patch gets no attribution",
    "symmetry": "the same patch twice: both copies must get equal attribution",
}

_FORMAT = 1
AUTHORS_PATCH_FRACTION = 86 / 224  # the authors' 86 px patches on 224 px images


# -- normalization -----------------------------------------------------------------------------------
class Normalize:
    """(x - mean) / std per channel: maps [0, 1] pixels to a model's input space."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        self.mean = tuple(float(v) for v in mean)
        self.std = tuple(float(v) for v in std)
        if len(self.mean) != len(self.std) or any(s <= 0 for s in self.std):
            raise ConfigError(f"normalize needs equal-length mean and positive std, got {mean}, {std}")

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        shape = (1, -1, 1, 1)
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(shape)
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(shape)
        return (x - mean) / std

    @property
    def cache_key(self) -> str:
        return f"Normalize(mean={self.mean}, std={self.std})"

    def __repr__(self) -> str:
        return self.cache_key


IMAGENET_NORMALIZE = Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def normalize_for(loaded) -> Normalize:
    """The normalization of a `saliencylab.models.LoadedModel` (its `.mean` / `.std`)."""
    return Normalize(loaded.mean, loaded.std)


def _as_normalize(normalize) -> tuple[Callable[[torch.Tensor], torch.Tensor], str]:
    if normalize is None:
        return (lambda x: x), "identity"
    if isinstance(normalize, Normalize):
        return normalize, normalize.cache_key
    if isinstance(normalize, (tuple, list)) and len(normalize) == 2 and not callable(normalize[0]):
        n = Normalize(*normalize)
        return n, n.cache_key
    if callable(normalize):
        qualname = getattr(normalize, "__qualname__", type(normalize).__qualname__)
        key = getattr(normalize, "cache_key", None) or f"{getattr(normalize, '__module__', '')}.{qualname}"
        return normalize, str(key)
    raise ConfigError(
        f"normalize must be None, a callable or a (mean, std) pair, got {type(normalize).__name__}")


# -- results -----------------------------------------------------------------------------------------
@dataclass
class Patches:
    """Generated patches: pixels in [0, 1], one per class."""

    patches: torch.Tensor  # (P, 3, s, s)
    classes: torch.Tensor  # (P,) long
    probabilities: torch.Tensor  # (P,) min held-out softmax probability of the class, patch alone
    converged: torch.Tensor  # (P,) bool: probability > threshold and interaction < independence
    cost: Cost
    interaction: torch.Tensor | None = None  # (P,) max held-out tanh(|dz| / min|z|) on the partner class
    probabilities_mean: torch.Tensor | None = None  # (P,) mean held-out probability
    steps: int = 0  # optimization steps run
    image_size: int = 224
    threshold: float = 0.94
    params: dict = field(default_factory=dict)
    key: str = ""
    from_cache: bool = False
    normalize: Callable | None = field(default=None, repr=False)  # not cached; set by generate_patches

    @property
    def patch_size(self) -> int:
        return int(self.patches.shape[-1])

    def __len__(self) -> int:
        return int(self.patches.shape[0])


@dataclass
class Suite:
    """Composed test images with known answers. Kinds are contiguous, in AXIOMS order.

    `region_classes[k, r]` is the class whose patch fills region r of image k (-1: the null patch);
    `targets[k] = region_classes[k, 0]` is the class explained first (class sensitivity images are
    also explained for `region_classes[k, 1]`).
    """

    x: torch.Tensor  # (N, 3, H, W) in the model's input space
    pixels: torch.Tensor  # (N, 3, H, W) in [0, 1]
    targets: torch.Tensor  # (N,) long
    region_classes: torch.Tensor  # (N, 2) long
    regions: torch.Tensor  # (N, 2, H, W) bool
    boxes: torch.Tensor  # (N, 2, 4) long: y0, x0, y1, x1 (exclusive)
    kind: list  # (N,) axiom name per image
    interaction: torch.Tensor  # (N,) measured relative interaction per image (see make_suite)
    independence: dict  # max changes per kind
    patch_size: int = 0

    def indices(self, kind: str) -> torch.Tensor:
        return torch.tensor([i for i, k in enumerate(self.kind) if k == kind], dtype=torch.long)

    def __len__(self) -> int:
        return int(self.x.shape[0])


# -- model key and cache -------------------------------------------------------------------------------
def _fingerprint(model: nn.Module) -> str:
    """sha256 of the model's class and every state_dict tensor's name, shape, dtype and bytes."""
    h = hashlib.sha256(f"{type(model).__module__}.{type(model).__qualname__}".encode())
    for name, t in model.state_dict().items():
        if not isinstance(t, torch.Tensor):
            continue
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


model_key = _fingerprint


def _default_cache_dir() -> Path:
    env = os.environ.get("SALIENCYLAB_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "saliencylab"


def _cache_path(cache_dir, key: str) -> Path:
    base = Path(cache_dir).expanduser() if cache_dir is not None else _default_cache_dir()
    return base / "knows_best" / f"{key}.pt"


def _save(path: Path, p: Patches) -> None:
    record = {
        "format": _FORMAT, "key": p.key, "patches": p.patches.detach().cpu(), "classes": p.classes.cpu(),
        "probabilities": p.probabilities.cpu(), "converged": p.converged.cpu(),
        "interaction": p.interaction.cpu(), "probabilities_mean": p.probabilities_mean.cpu(),
        "steps": int(p.steps), "image_size": int(p.image_size), "threshold": float(p.threshold),
        "params": json.dumps(p.params, sort_keys=True), "cost": p.cost.as_dict(),
    }
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        torch.save(record, tmp)
        os.replace(tmp, path)
    except OSError as exc:  # a read-only cache only costs a regeneration next time
        warnings.warn(f"could not write knows-best patches to {path}: {exc}", stacklevel=3)


def _load(path: Path, key: str) -> Patches | None:
    if not path.is_file():
        return None
    try:
        d = torch.load(path, map_location="cpu", weights_only=True)
        if d.get("format") != _FORMAT or d.get("key") != key:
            return None
        return Patches(
            patches=d["patches"], classes=d["classes"], probabilities=d["probabilities"],
            converged=d["converged"], cost=Cost(**d["cost"]), interaction=d["interaction"],
            probabilities_mean=d["probabilities_mean"], steps=int(d["steps"]),
            image_size=int(d["image_size"]), threshold=float(d["threshold"]),
            params=json.loads(d["params"]), key=key, from_cache=True)
    except Exception as exc:  # a corrupt or foreign file: regenerate
        warnings.warn(f"ignoring unreadable knows-best cache file {path}: {exc}", stacklevel=3)
        return None


# -- placement and composition ---------------------------------------------------------------------
def _randint(low: int, high_inclusive: int, gen: torch.Generator) -> int:
    return int(torch.randint(low, high_inclusive + 1, (1,), generator=gen).item())


def _one_position(size: int, s: int, gen: torch.Generator) -> tuple[int, int]:
    return _randint(0, size - s, gen), _randint(0, size - s, gen)


def _two_positions(size: int, s: int, gen: torch.Generator) -> tuple[tuple[int, int], tuple[int, int]]:
    """The authors' placer: a random separator along a random axis, one patch on each side."""
    sep = _randint(s, size - s, gen)
    a0, b0 = _randint(0, sep - s, gen), _randint(sep, size - s, gen)
    a1, b1 = _randint(0, size - s, gen), _randint(0, size - s, gen)
    first, second = (a0, a1), (b0, b1)
    if bool(torch.rand(1, generator=gen) < 0.5):  # separate along columns instead of rows
        first, second = (a1, a0), (b1, b0)
    if bool(torch.rand(1, generator=gen) < 0.5):
        first, second = second, first
    return first, second


def _backgrounds(n: int, size: int, gen: torch.Generator) -> torch.Tensor:
    return (torch.randn(n, 3, size, size, generator=gen) * 0.1 + 0.5).clamp(0.0, 1.0)


def _compose(backgrounds: torch.Tensor, bg_index: Sequence[int], placements: Sequence[Sequence[tuple]],
             pixels: torch.Tensor) -> torch.Tensor:
    """Image k: background bg_index[k] with pixels[p] pasted at (y, x) for each (p, y, x) in placements[k]."""
    s = pixels.shape[-1]
    images = backgrounds[torch.as_tensor(list(bg_index), device=backgrounds.device)].clone()
    for k, placed in enumerate(placements):
        for p, y, x in placed:
            images[k, :, y:y + s, x:x + s] = pixels[p]
    return images


# -- generation ------------------------------------------------------------------------------------
def _check_classes(classes, n_classes: int | None) -> list[int]:
    if isinstance(classes, torch.Tensor):
        classes = classes.flatten().tolist()
    try:
        out = [int(c) for c in classes]
    except TypeError as exc:
        raise ConfigError(f"classes must be a sequence of ints, got {classes!r}") from exc
    if not out:
        raise ConfigError("classes is empty: name at least one class")
    if len(set(out)) != len(out):
        raise ConfigError(f"classes must be distinct, got {out}")
    if n_classes is not None and any(c < 0 or c >= n_classes for c in out):
        raise ConfigError(f"classes {out} out of range for a model with {n_classes} outputs")
    return out


def _pairs(order: list[int]) -> list[tuple[int, int]]:
    """Consecutive pairs of a permutation; an odd one out is paired with the first element."""
    if len(order) == 1:
        return []
    pairs = [(order[k], order[k + 1]) for k in range(0, len(order) - 1, 2)]
    if len(order) % 2:
        pairs.append((order[-1], order[0]))
    return pairs


def _interaction(z_both: torch.Tensor, z_alone: torch.Tensor) -> torch.Tensor:
    """The authors' measure: tanh(|z_both - z_alone| / min(|z_both|, |z_alone|))."""
    denom = torch.minimum(z_both.abs(), z_alone.abs()).clamp_min(1e-6)
    return torch.tanh((z_both - z_alone).abs() / denom)


class _Plan:
    """Images to forward: single-patch rows and two-patch rows with the rows they compare to."""

    def __init__(self):
        self.bg, self.placements = [], []
        self.single_patch, self.single_rows = [], []
        self.pair_rows = []  # (both_row, alone_row_of_j, patch_i, patch_j): effect of i on class of j

    def add(self, bg: int, placed: list) -> int:
        self.bg.append(bg)
        self.placements.append(placed)
        return len(self.bg) - 1

    def single(self, bg: int, p: int, pos) -> int:
        row = self.add(bg, [(p, *pos)])
        self.single_patch.append(p)
        self.single_rows.append(row)
        return row

    def pair(self, bg: int, i: int, j: int, pos_i, pos_j) -> None:
        ri, rj = self.single(bg, i, pos_i), self.single(bg, j, pos_j)
        rb = self.add(bg, [(i, *pos_i), (j, *pos_j)])
        self.pair_rows += [(rb, rj, i, j), (rb, ri, j, i)]


def _plan(n_patches: int, n_bg: int, size: int, s: int, gen: torch.Generator, pairs_for) -> _Plan:
    plan = _Plan()
    for b in range(n_bg):
        pairs = pairs_for()
        if not pairs:
            for p in range(n_patches):
                plan.single(b, p, _one_position(size, s, gen))
        for i, j in pairs:
            pos_i, pos_j = _two_positions(size, s, gen)
            plan.pair(b, i, j, pos_i, pos_j)
    return plan


def _evaluate_plan(session, plan, backgrounds, pixels, norm, classes_t, n_patches, batch_rows):
    """Held-out check (no grad): per patch min/mean probability alone and max interaction."""
    logits = []
    with torch.no_grad():
        for start in range(0, len(plan.bg), batch_rows):
            sl = slice(start, start + batch_rows)
            x = _compose(backgrounds, plan.bg[sl], plan.placements[sl], pixels)
            logits.append(session.forward(norm(x)).float())
    logits = torch.cat(logits)
    rows = torch.tensor(plan.single_rows, device=logits.device)
    pidx = torch.tensor(plan.single_patch, device=logits.device)
    prob = logits[rows].softmax(dim=1).gather(1, classes_t[pidx][:, None]).squeeze(1)
    pmin = torch.full((n_patches,), float("inf"), device=logits.device).scatter_reduce(0, pidx, prob, "amin")
    psum = torch.zeros(n_patches, device=logits.device).index_add(0, pidx, prob)
    pcount = torch.zeros(n_patches, device=logits.device).index_add(0, pidx, torch.ones_like(prob))
    inter = torch.zeros(n_patches, device=logits.device)
    if plan.pair_rows:
        rb, ra, pi, pj = (torch.tensor(c, device=logits.device) for c in zip(*plan.pair_rows))
        cj = classes_t[pj]
        val = _interaction(logits[rb, cj], logits[ra, cj])
        inter = inter.scatter_reduce(0, pi, val, "amax")
    return pmin.cpu(), (psum / pcount).cpu(), inter.cpu()


def generate_patches(model: nn.Module, classes, *, image_size: int = 224, patch_size: int | None = None,
                     threshold: float = 0.94, independence: float = 0.14, steps: int = 300,
                     lr: float = 0.1, seed: int = 0, batch_size: int = 2, n_eval: int = 8,
                     independence_weight: float = 3.0, warmup: int = 50, check_every: int = 5, cache_dir=None,
                     cache: bool = True, model_key: str | None = None, normalize=None,
                     callback: Callable[[int, float, float], None] | None = None) -> Patches:
    """Optimize one patch per class that drives `model` to that class anywhere on a noise background.

    patch_size: default round(0.384 * image_size), the authors' 86 px at 224. batch_size: noise
    backgrounds per step (each carries every class pair: 3 * batch_size * ceil(P/2) images per
    pass; P * batch_size during the first `warmup` steps, which optimize each patch alone as the
    authors' first 200-300 iterations do). steps: the most optimization steps; it stops once every
    patch converged on the held-out check (run every `check_every` steps once the training batch
    passes). `callback(step, loss, batch_min_probability)` is called after every step (not part of
    the cache key). With a single class there are no pairs and `interaction` is 0. See the module
    docstring for the procedure and the cache.
    """
    if not isinstance(model, nn.Module):
        raise InputError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    size = int(image_size)
    s = int(patch_size) if patch_size is not None else max(1, round(AUTHORS_PATCH_FRACTION * size))
    if s < 1 or 2 * s > size:
        raise ConfigError(
            f"patch_size {s} must be between 1 and image_size / 2 = {size // 2} (two patches side by side)")
    if not 0.0 < threshold < 1.0:
        raise ConfigError(f"threshold must be a probability in (0, 1), got {threshold}")
    for name, v in (("steps", steps), ("warmup", warmup), ("batch_size", batch_size), ("n_eval", n_eval),
                    ("check_every", check_every)):
        low = 0 if name in ("steps", "warmup") else 1
        if not isinstance(v, int) or isinstance(v, bool) or v < low:
            raise ConfigError(f"{name} must be a {'non-negative' if low == 0 else 'positive'} int, got {v!r}")
    norm, norm_key = _as_normalize(normalize)
    class_list = _check_classes(classes, None)
    params = dict(classes=class_list, image_size=size, patch_size=s, threshold=float(threshold),
                  independence=float(independence), steps=steps, lr=float(lr), seed=int(seed),
                  batch_size=batch_size, n_eval=n_eval, independence_weight=float(independence_weight),
                  warmup=warmup, check_every=check_every, normalize=norm_key, format=_FORMAT)
    mkey = str(model_key) if model_key is not None else _fingerprint(model)
    key = hashlib.sha256(json.dumps({"model": mkey, **params}, sort_keys=True).encode()).hexdigest()
    path = _cache_path(cache_dir, key)
    if cache:
        loaded = _load(path, key)
        if loaded is not None:
            loaded.normalize = norm
            return loaded

    device = model_device(model)
    gen = torch.Generator().manual_seed(int(seed))
    n = len(class_list)
    with ModelSession(model) as session:
        classes_t = torch.tensor(class_list, device=device)
        # The held-out check: fixed backgrounds and pairs (i, i+1), separate from training draws.
        eval_gen = torch.Generator().manual_seed(int(seed) + 7919)
        eval_bg = _backgrounds(n_eval, size, eval_gen).to(device)
        ring = [(i, (i + 1) % n) for i in range(n)] if n > 2 else _pairs(list(range(n)))
        eval_plan = _plan(n, n_eval, size, s, eval_gen, lambda: ring)
        with torch.no_grad():
            out = session.forward(norm(eval_bg[:1]))
        if out.dim() != 2:
            raise InputError(f"the model must return (B, classes) logits, got shape {tuple(out.shape)}")
        _check_classes(class_list, out.shape[1])

        w = (torch.randn(n, 3, s, s, generator=gen) * 0.5).to(device).requires_grad_(True)
        opt = torch.optim.Adam([w], lr=lr)
        rows_eval = max(1, 3 * batch_size * max(1, (n + 1) // 2))
        steps_run, last_check = 0, -check_every
        result = None
        for step in range(steps):
            bgs = _backgrounds(batch_size, size, gen).to(device)

            def pairing():
                return [] if step < warmup else _pairs(torch.randperm(n, generator=gen).tolist())

            plan = _plan(n, batch_size, size, s, gen, pairing)
            pixels = torch.sigmoid(w)
            x = _compose(bgs, plan.bg, plan.placements, pixels)
            logits = session.forward(norm(x))
            rows = torch.tensor(plan.single_rows, device=device)
            pidx = torch.tensor(plan.single_patch, device=device)
            single = logits[rows]
            loss = F.cross_entropy(single, classes_t[pidx])
            if plan.pair_rows and independence_weight > 0:
                rb, ra, _, pj = (torch.tensor(c, device=device) for c in zip(*plan.pair_rows))
                cj = classes_t[pj]
                both, alone = logits[rb, cj], logits[ra, cj].detach()
                scale = torch.minimum(both.detach().abs(), alone.abs()).clamp_min(1.0)
                loss = loss + independence_weight * (((both - alone) / scale) ** 2).mean()
            grad = session.grad(loss, w, rows=x.shape[0])
            opt.zero_grad(set_to_none=True)
            w.grad = grad
            opt.step()
            steps_run = step + 1
            with torch.no_grad():
                batch_prob = single.softmax(dim=1).gather(1, classes_t[pidx][:, None]).min().item()
            if callback is not None:
                callback(step, float(loss.detach()), batch_prob)
            if batch_prob > threshold and step - last_check >= check_every:
                last_check = step
                result = _evaluate_plan(session, eval_plan, eval_bg, torch.sigmoid(w).detach(), norm,
                                        classes_t, n, rows_eval)
                if bool(((result[0] > threshold) & (result[2] < independence)).all()):
                    break
                result = None
        pixels = torch.sigmoid(w).detach()
        if result is None:
            result = _evaluate_plan(session, eval_plan, eval_bg, pixels, norm, classes_t, n, rows_eval)
    pmin, pmean, inter = result
    patches = Patches(
        patches=pixels.cpu(), classes=torch.tensor(class_list), probabilities=pmin,
        converged=(pmin > threshold) & (inter < independence), cost=session.cost, interaction=inter,
        probabilities_mean=pmean, steps=steps_run, image_size=size, threshold=float(threshold),
        params=params, key=key, normalize=norm)
    if cache:
        _save(path, patches)
    return patches


# -- suites ----------------------------------------------------------------------------------------
def make_suite(model: nn.Module, patches: Patches, n: int = 8, seed: int = 0, *, normalize=None,
               only_converged: bool = True) -> Suite:
    """`n` images per axiom on fresh noise backgrounds, with their patch regions and measured independence.

    Class sensitivity: two patches of different classes. Null player: a patch and a uniform-noise
    patch. Symmetry: one patch twice. Patches that did not converge are left out unless
    `only_converged=False`. Measured (forwarding each image with each patch replaced by background):
    class sensitivity |z_ci(both) - z_ci(i alone)| (the other patch's effect on class i, both ways);
    null player |z_c(both) - z_c(patch alone)|; symmetry |effect of copy 0 - effect of copy 1| on z_c,
    where a patch's effect is z(image) - z(image without it). `interaction` divides each by the
    patch's own effect |z_c(patch alone) - z_c(background)|; `independence` holds the maxima.
    """
    if not isinstance(n, int) or n < 1:
        raise ConfigError(f"n must be a positive int, got {n!r}")
    norm = _as_normalize(normalize)[0] if normalize is not None else (patches.normalize or (lambda x: x))
    usable = torch.arange(len(patches)) if not only_converged else patches.converged.nonzero().flatten()
    if len(usable) < 2:
        raise ConfigError(
            f"a knows-best suite needs at least two converged patches, got {len(usable)} of {len(patches)} "
            f"(probabilities {[round(p, 3) for p in patches.probabilities.tolist()]}); generate with more "
            "steps, or pass only_converged=False")
    size, s = patches.image_size, patches.patch_size
    gen = torch.Generator().manual_seed(int(seed))
    usable = usable.tolist()
    classes = patches.classes.tolist()
    ordered = [(a, b) for a in usable for b in usable if a != b]
    ordered = [ordered[k] for k in torch.randperm(len(ordered), generator=gen).tolist()]
    # pixel bank: the patches, then one noise patch per null-player image
    noise = torch.rand(n, 3, s, s, generator=gen)
    bank = torch.cat([patches.patches.float(), noise])
    null_id = lambda k: len(patches) + k  # noqa: E731
    bgs = _backgrounds(3 * n, size, gen)
    placed, region_classes, kinds = [], [], []
    for k in range(3 * n):
        kind = AXIOMS[k // n]
        pos0, pos1 = _two_positions(size, s, gen)
        if kind == "class_sensitivity":
            a, b = ordered[k % len(ordered)]
            ids, rc = (a, b), (classes[a], classes[b])
        elif kind == "null_player":
            a = usable[k % len(usable)]
            ids, rc = (a, null_id(k - n)), (classes[a], -1)
        else:
            a = usable[k % len(usable)]
            ids, rc = (a, a), (classes[a], classes[a])
        placed.append([(ids[0], *pos0), (ids[1], *pos1)])
        region_classes.append(rc)
        kinds.append(kind)
    idx = list(range(3 * n))
    pixels = _compose(bgs, idx, placed, bank)
    boxes = torch.tensor([[[y, x, y + s, x + s] for _, y, x in p] for p in placed], dtype=torch.long)
    regions = torch.zeros(3 * n, 2, size, size, dtype=torch.bool)
    for k, p in enumerate(placed):
        for r, (_, y, x) in enumerate(p):
            regions[k, r, y:y + s, x:x + s] = True
    region_classes = torch.tensor(region_classes, dtype=torch.long)

    # Measure: full image, without region 0, without region 1, background only.
    without0 = _compose(bgs, idx, [[p[1]] for p in placed], bank)
    without1 = _compose(bgs, idx, [[p[0]] for p in placed], bank)
    device = model_device(model)
    with ModelSession(model) as session, torch.no_grad():
        def logits_of(imgs):
            return torch.cat([session.forward(norm(imgs[i:i + 32].to(device))).float().cpu()
                              for i in range(0, len(imgs), 32)])

        z_full, z_w0, z_w1, z_bg = (logits_of(t) for t in (pixels, without0, without1, bgs))
    c0 = region_classes[:, 0]
    c1 = region_classes[:, 1].clamp_min(0)
    g = lambda z, c: z.gather(1, c[:, None]).squeeze(1)  # noqa: E731
    # effect of region 1 on class 0 (present with region 0), and of region 0 on class 1
    eff1_on_c0 = (g(z_full, c0) - g(z_w1, c0)).abs()
    eff0_on_c1 = (g(z_full, c1) - g(z_w0, c1)).abs()
    own0 = (g(z_w1, c0) - g(z_bg, c0)).abs().clamp_min(1e-6)  # region 0 alone vs background
    own1 = (g(z_w0, c1) - g(z_bg, c1)).abs().clamp_min(1e-6)
    asym = ((g(z_full, c0) - g(z_w0, c0)) - (g(z_full, c0) - g(z_w1, c0))).abs()
    absolute = torch.zeros(3 * n)
    relative = torch.zeros(3 * n)
    ind = {}
    for kind in AXIOMS:
        sel = torch.tensor([i for i, k in enumerate(kinds) if k == kind])
        if kind == "class_sensitivity":
            a = torch.maximum(eff1_on_c0[sel], eff0_on_c1[sel])
            r = torch.maximum(eff1_on_c0[sel] / own0[sel], eff0_on_c1[sel] / own1[sel])
        elif kind == "null_player":
            a, r = eff1_on_c0[sel], eff1_on_c0[sel] / own0[sel]
        else:
            a, r = asym[sel], asym[sel] / own0[sel]
        absolute[sel], relative[sel] = a, r
        ind[f"{kind}_max_logit_change"] = float(a.max())
        ind[f"{kind}_max_relative_change"] = float(r.max())
    probs = z_full.softmax(dim=1).gather(1, c0[:, None]).squeeze(1)
    ind["min_target_probability_alone"] = float(z_w1.softmax(dim=1).gather(1, c0[:, None]).min())
    ind["mean_target_probability"] = float(probs.mean())
    return Suite(x=norm(pixels).detach(), pixels=pixels, targets=c0.clone(), region_classes=region_classes,
                 regions=regions, boxes=boxes, kind=kinds, interaction=relative, independence=ind,
                 patch_size=s)


# -- scoring ---------------------------------------------------------------------------------------
def _abs_maxnorm(maps: torch.Tensor) -> torch.Tensor:
    h = maps.detach().float().abs().cpu()
    return h / h.flatten(1).amax(dim=1).clamp_min(1e-12)[:, None, None]


def _sums(h: torch.Tensor, regions: torch.Tensor) -> torch.Tensor:
    return (h[:, None] * regions).flatten(2).sum(dim=2)  # (N, R)


def score_maps(suite: Suite, maps: torch.Tensor, maps_second: torch.Tensor | None = None) -> dict:
    """Scores from maps already computed: `maps` (N, H, W) for `suite.targets` on every image,
    `maps_second` (N_cs, H, W) for `region_classes[:, 1]` on the class-sensitivity images."""
    if maps.shape[0] != len(suite) or tuple(maps.shape[-2:]) != tuple(suite.regions.shape[-2:]):
        raise InputError(
            f"maps must have shape ({len(suite)}, H, W) matching the suite, got {tuple(maps.shape)}")
    h = _abs_maxnorm(maps)
    regions = suite.regions.float()
    scores = {}
    cs = suite.indices("class_sensitivity")
    if len(cs):
        if maps_second is None or maps_second.shape[0] != len(cs):
            raise InputError(f"class sensitivity needs maps_second for {len(cs)} images")
        h0, h1, reg = h[cs], _abs_maxnorm(maps_second), regions[cs]
        both = torch.minimum(h0, h1)
        overlap = _sums(both, reg).sum(dim=1)
        total = _sums(h0, reg)[:, 0] + _sums(h1, reg)[:, 1]
        scores["class_sensitivity"] = torch.where(total > 0, 1 - overlap / total.clamp_min(1e-30),
                                                  torch.zeros_like(total))
    npl = suite.indices("null_player")
    if len(npl):
        sums = _sums(h[npl], regions[npl])
        ratio = sums[:, 1] / sums[:, 0].clamp_min(1e-30)
        scores["null_player"] = torch.where(sums[:, 0] > 0, (1 - ratio).clamp(0, 1), torch.zeros_like(ratio))
    sym = suite.indices("symmetry")
    if len(sym):
        reg = regions[sym]
        means = _sums(h[sym], reg) / reg.flatten(2).sum(dim=2).clamp_min(1)
        hi, lo = means.amax(dim=1), means.amin(dim=1)
        scores["symmetry"] = torch.where(hi > 0, lo / hi.clamp_min(1e-30), torch.zeros_like(hi))
    return scores


def _spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    def rank(v):
        order = v.argsort()
        r = torch.empty_like(v)
        r[order] = torch.arange(len(v), dtype=v.dtype)
        for val in v.unique():  # average ranks of ties
            tie = v == val
            r[tie] = r[tie].mean()
        return r

    ra, rb = rank(a.double()), rank(b.double())
    ra, rb = ra - ra.mean(), rb - rb.mean()
    den = (ra.norm() * rb.norm()).item()
    return float((ra * rb).sum().item() / den) if den > 0 else float("nan")


def authors_scores(suite: Suite, maps: torch.Tensor, maps_second: torch.Tensor | None = None) -> dict:
    """The authors' data-set numbers: mean class-sensitivity overlap (lower is better), mean null-player
    ratio sum_null |h| / sum_target |h| (lower is better), and the Spearman correlation over the
    symmetry images of the mean |h| on the two copies (higher is better)."""
    s = score_maps(suite, maps, maps_second)
    out = {}
    if "class_sensitivity" in s:
        out["class_sensitivity_overlap"] = float((1 - s["class_sensitivity"]).mean())
    npl = suite.indices("null_player")
    if len(npl):
        sums = _sums(_abs_maxnorm(maps[npl]), suite.regions[npl].float())
        out["null_player_ratio"] = float((sums[:, 1] / sums[:, 0].clamp_min(1e-30)).mean())
    sym = suite.indices("symmetry")
    if len(sym) > 1:
        means = _sums(_abs_maxnorm(maps[sym]), suite.regions[sym].float())
        out["symmetry_spearman"] = _spearman(means[:, 0], means[:, 1])
    return out


def evaluate_method(model: nn.Module, method, suite: Suite, *, return_maps: bool = False, costs: list | None = None,
                    **method_params):
    """Score a method on a suite: {axiom: (N_axiom,) scores in [0, 1], higher is better}.

    `method`: a registered name (built with `method_params`) or a Method instance. Two batched
    explain calls: every image for `suite.targets`, and the class-sensitivity images for their
    second class. With `return_maps=True` returns (scores, (maps, maps_second)). `costs`, if given a
    list, receives the Cost of each explain call.
    """
    from .. import methods as _methods
    from ..api import explain

    if isinstance(method, _methods.Method):
        if method_params:
            raise ConfigError("pass parameters to the Method instance, not to evaluate_method()")
        instance = method
    else:
        instance = _methods.build(method, model, **method_params)
    first = explain(model, suite.x, instance, target=suite.targets)
    maps = first.maps
    if costs is not None:
        costs.append(first.cost)
    cs = suite.indices("class_sensitivity")
    maps_second = None
    if len(cs):
        second = explain(model, suite.x[cs], instance, target=suite.region_classes[cs, 1])
        maps_second = second.maps
        if costs is not None:
            costs.append(second.cost)
    scores = score_maps(suite, maps.cpu(), None if maps_second is None else maps_second.cpu())
    return (scores, (maps, maps_second)) if return_maps else scores
