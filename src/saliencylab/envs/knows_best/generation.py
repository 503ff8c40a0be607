"""Generation: one patch per class optimized to drive the model to that class, independently of the others."""

from __future__ import annotations

import hashlib
import json
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ...core.errors import ConfigError, InputError
from ...core.session import ModelSession, model_device
from .cache import _cache_path, _fingerprint, _load, _save
from .normalization import _as_normalize
from .placement import _backgrounds, _compose, _one_position, _two_positions
from .results import _FORMAT, AUTHORS_PATCH_FRACTION, Patches


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
