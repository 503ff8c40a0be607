"""I-GOS (Qi et al. 2020) and iGOS++ (Khorram et al. 2021), batched, on the perturbation engine.

Both optimize low-resolution masks (1 = keep, low = important) by gradient descent where the
gradient of the model's score is an *integrated* gradient: the mean of the gradients at N points
s_i = i/N on the straight path from the baseline (s=0) to the perturbed image (s=1), each point with
Gaussian noise added in the model's input space. Steps are chosen by a backtracking (Armijo) line
search on the same integrated score plus the L1 and (bilateral) total-variation regularizers.

- I-GOS: one deletion mask M; loss  D(M) + l1 mean|1-M| + l2 TV(M).
- iGOS++: a deletion mask Md and an insertion mask Mi, M = Md * Mi; loss
  D(Md) - S(Mi) + D(M) - S(M) + l1 mean|1-M| + l2 BTV(x, M), gradients as in the authors' code
  (the score terms halved, see `_Objective`), one shared step for both masks.

Batched: B images are optimized together. All the path points of all images (and, for iGOS++, of
all four score terms) are rows for the engine (`Perturber.scores_and_grads`), run in chunks of
`batch_size` rows; every image keeps its own step size, acceptance and L1 weight.

Where the passes go, and what we save (the authors' code spends 87% of its forward passes in the
line search, each test with fresh noise):
- Common random numbers: the noise of an iteration is drawn once (seeded by `seed` and the
  iteration, the same for every image, so an image's mask does not depend on its batch) and used by
  the gradient pass and by every acceptance test of that iteration. The Armijo test then compares
  one deterministic function at two points instead of two noisy estimates.
- The current mask's loss, which the Armijo test needs, is the mean of the scores the gradient pass
  already computed with that same noise: no separate forward passes for it.
- Warm start: the search starts from the step accepted at the previous iteration (times
  `ls_growth`) instead of from `alpha` every time; one candidate is usually enough.
- Candidates of all images still searching go through the engine together, in full chunks.
`line_search="authors"` restores the authors' schedule (fresh noise for every evaluation, a
separate evaluation of the current mask, restart from `alpha`) to measure what the savings cost.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..baselines import Blur
from ..core.errors import ConfigError
from ..perturbation import Perturber
from .base import Method, check_batch_size, register

LINE_SEARCHES = ("lookahead", "reuse", "authors")
OPTIMIZERS = ("ls", "nag")


def igos_baseline() -> Blur:
    """The I-GOS baseline: Gaussian blur, kernel 51, sigma 50 (on 224 images)."""
    return Blur(sigma=50.0, kernel_size=51)


def igos_noise(seed: int, draw: int, rows: int, shape, sigma: float, device=None, dtype=torch.float32) -> torch.Tensor:
    """Noise for `rows` path points, (rows, C, H, W), N(0, sigma^2), from (seed, draw) only.

    `draw` is the iteration (or, for the authors' schedule, a running evaluation counter). The same
    noise is used for every image of a batch, so an image's result does not depend on its batch.
    """
    if sigma == 0:
        return torch.zeros((rows, *shape), device=device, dtype=dtype)
    g = torch.Generator(device="cpu").manual_seed((int(seed) * 1_000_003 + int(draw) * 7919 + 17) % (2 ** 63))
    return (torch.randn((rows, *shape), generator=g) * sigma).to(device=device, dtype=dtype)


def upscale(masks: torch.Tensor, size) -> torch.Tensor:
    """Bilinear upsampling with align_corners=True (the authors' UpsamplingBilinear2d)."""
    if tuple(masks.shape[-2:]) == tuple(size):
        return masks
    return F.interpolate(masks, size=tuple(size), mode="bilinear", align_corners=True)


def upscale_adjoint(grad_up: torch.Tensor, low_shape, size) -> torch.Tensor:
    """The transpose of `upscale`: maps a gradient at the image size back to the mask size."""
    low = torch.zeros(low_shape, dtype=grad_up.dtype, device=grad_up.device, requires_grad=True)
    with torch.enable_grad():
        (g,) = torch.autograd.grad(upscale(low, size), low, grad_up)
    return g


def tv_norm(masks: torch.Tensor, beta: float = 2.0) -> torch.Tensor:
    """Mean |vertical difference|^beta + mean |horizontal difference|^beta of (B, h, w) masks."""
    B = masks.shape[0]
    zero = masks.new_zeros(B)
    a = (masks[:, :-1, :] - masks[:, 1:, :]).abs().pow(beta).reshape(B, -1).mean(1) if masks.shape[1] > 1 else zero
    b = (masks[:, :, :-1] - masks[:, :, 1:]).abs().pow(beta).reshape(B, -1).mean(1) if masks.shape[2] > 1 else zero
    return a + b


def bilateral_weights(x: torch.Tensor, sigma: float):
    """exp(-(neighbour difference)^2 / sigma) of the normalized images, vertical and horizontal."""
    wv = torch.exp(-((x[:, :, :-1, :] - x[:, :, 1:, :]) ** 2).mean(1) / sigma)
    wh = torch.exp(-((x[:, :, :, :-1] - x[:, :, :, 1:]) ** 2).mean(1) / sigma)
    return wv, wh


def bilateral_tv(masks: torch.Tensor, up: torch.Tensor, weights, beta: float = 2.0) -> torch.Tensor:
    """iGOS++'s bilateral TV: 0.5 (TV at mask resolution + image-weighted TV of the upsampled mask)."""
    B = masks.shape[0]
    wv, wh = weights
    zero = masks.new_zeros(B)
    bv = (wv * (up[:, :-1, :] - up[:, 1:, :]).abs().pow(beta)).reshape(B, -1).mean(1) if up.shape[1] > 1 else zero
    bh = (wh * (up[:, :, :-1] - up[:, :, 1:]).abs().pow(beta)).reshape(B, -1).mean(1) if up.shape[2] > 1 else zero
    return 0.5 * (tv_norm(masks, beta) + bv + bh)


@dataclass(frozen=True)
class Term:
    """One integrated score in the objective.

    kind: "del" (path from the baseline to x*m + b*(1-m)) or "ins" (path from the image to
    b*m + x*(1-m)); mask: 0 = deletion mask, 1 = insertion mask, 2 = their product; sign: +1 for
    a score to lower (deletion), -1 for one to raise (insertion).
    """

    kind: str
    mask: int
    sign: float


class _Objective:
    """The masks' objective: integrated score terms on the engine plus the regularizer.

    Mask parameters P are (B, K, h, w): K = 1 (I-GOS) or 2 (iGOS++: deletion, insertion).
    """

    def __init__(self, session, x, target, perturber, terms, grad_scale, steps, noise, seed, l1, l2,
                 bilateral_sigma, size):
        self.session, self.x, self.target, self.perturber = session, x, target, perturber
        self.terms, self.grad_scale, self.steps = terms, grad_scale, steps
        self.noise_sigma, self.seed = noise, seed
        self.l1 = torch.full((x.shape[0],), float(l1), dtype=x.dtype, device=x.device)
        self.l2 = float(l2)
        self.size = tuple(x.shape[-2:])
        self.low = size
        self.bilateral = bilateral_weights(x, bilateral_sigma) if bilateral_sigma else None
        T, N = len(terms), steps
        self.points = torch.arange(1, N + 1, dtype=x.dtype, device=x.device) / N
        self.term_of_row = torch.arange(T * N, device=x.device) // N
        self.point_of_row = torch.arange(T * N, device=x.device) % N
        self.term_mask = torch.tensor([t.mask for t in terms], device=x.device)
        self.term_ins = torch.tensor([t.kind == "ins" for t in terms], device=x.device)
        self.term_sign = torch.tensor([t.sign for t in terms], dtype=x.dtype, device=x.device)
        self.rows = T * N
        self.noise = None

    # -- pieces ------------------------------------------------------------------------------
    def draw_noise(self, draw: int) -> None:
        self.noise = igos_noise(self.seed, draw, self.rows, self.x.shape[1:], self.noise_sigma,
                                self.x.device, self.x.dtype)

    def up_masks(self, P: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W): upsampled deletion, insertion (ones for I-GOS) and product masks."""
        up = upscale(P, self.size)
        if up.shape[1] == 1:
            return torch.cat([up, torch.ones_like(up), up], 1)
        return torch.cat([up, up[:, :1] * up[:, 1:2]], 1)

    def _make_masks(self, up):
        def make(image, k):
            t, i = self.term_of_row[k], self.point_of_row[k]
            m = up[image, self.term_mask[t]] * self.points[i].view(-1, 1, 1)
            keep = torch.where(self.term_ins[t].view(-1, 1, 1), 1 - m, m)
            return keep[:, None]

        return make

    def _perturb(self, inputs, image, k):
        return inputs + self.noise[k] if self.noise_sigma else inputs

    def combined(self, P: torch.Tensor) -> torch.Tensor:
        return P[:, 0] if P.shape[1] == 1 else P[:, 0] * P[:, 1]

    def regularizer(self, P: torch.Tensor, l1: torch.Tensor, images: torch.Tensor | None = None) -> torch.Tensor:
        """l1 mean|1-M| + l2 TV(M) (I-GOS) or l2 BTV(x, M) (iGOS++), per image; M the combined mask."""
        M = self.combined(P)
        B = M.shape[0]
        r = l1 * (1 - M).abs().reshape(B, -1).mean(1)
        if self.bilateral is None:
            return r + self.l2 * tv_norm(M)
        weights = self.bilateral if images is None else (self.bilateral[0][images], self.bilateral[1][images])
        up = upscale(M[:, None], self.size)[:, 0]
        return r + self.l2 * bilateral_tv(M, up, weights)

    def regularizer_grad(self, P: torch.Tensor, l1: torch.Tensor, images: torch.Tensor | None = None):
        with torch.enable_grad():
            P = P.detach().requires_grad_(True)
            r = self.regularizer(P, l1, images)
            (g,) = torch.autograd.grad(r.sum(), P)
        return r.detach(), g

    def score_loss(self, scores: torch.Tensor) -> torch.Tensor:
        """(B, T*N) row scores -> (B,) signed sum over terms of the integrated (mean) scores."""
        B = scores.shape[0]
        per_term = scores.view(B, len(self.terms), self.steps).mean(2)
        return (per_term * self.term_sign).sum(1)

    # -- passes ------------------------------------------------------------------------------
    def score_value_and_grad(self, P: torch.Tensor, images: torch.Tensor | None = None):
        """Signed integrated score (n,) and its gradient direction (n, K, h, w) at masks P of the given
        images (all by default), in one engine pass with gradients; no regularizer."""
        n, K = P.shape[:2]
        H, W = self.size
        T, N = len(self.terms), self.steps
        x, target = (self.x, self.target) if images is None else (self.x[images], self.target.for_images(images))
        up = self.up_masks(P)
        acc = torch.zeros(n * T, H, W, dtype=self.x.dtype, device=self.x.device)
        dkeep = torch.where(self.term_ins, -1.0, 1.0).to(self.x.dtype)

        def reduce(scores, grads, image, k, masks):
            t, i = self.term_of_row[k], self.point_of_row[k]
            coeff = dkeep[t] * self.points[i] / N
            acc.index_add_(0, image * T + t, grads[:, 0] * coeff.view(-1, 1, 1))

        scores = self.perturber.scores_and_grads(self.session, x, target, self.rows, self._make_masks(up),
                                                 reduce=reduce, perturb=self._perturb, desc="igos")
        acc = acc.view(n, T, H, W)
        g_up = torch.zeros(n, K, H, W, dtype=self.x.dtype, device=self.x.device)
        for t, term in enumerate(self.terms):
            a = acc[:, t] * (term.sign * self.grad_scale)
            if term.mask == 0:
                g_up[:, 0] += a
            elif term.mask == 1:
                g_up[:, 1] += a
            else:  # d(U(Md) U(Mi)) = dU(Md) U(Mi) + U(Md) dU(Mi)
                g_up[:, 0] += a * (up[:, 1] if K == 2 else 1)
                if K == 2:
                    g_up[:, 1] += a * up[:, 0]
        return self.score_loss(scores), upscale_adjoint(g_up, P.shape, self.size)

    def value_and_grad(self, P: torch.Tensor):
        """Loss (B,) and gradient direction (B, K, h, w) at P, in one engine pass with gradients."""
        s, g = self.score_value_and_grad(P)
        r, gr = self.regularizer_grad(P, self.l1)
        return s + r, g + gr

    def score_value(self, P: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        """Signed integrated score (n,) of masks P (n, K, h, w) for the given images, forward passes only."""
        up = self.up_masks(P)
        scores = self.perturber.scores(self.session, self.x[images], self.target.for_images(images), self.rows,
                                       self._make_masks(up), perturb=self._perturb, desc="igos line search")
        return self.score_loss(scores)

    def value(self, P: torch.Tensor, images: torch.Tensor, l1: torch.Tensor) -> torch.Tensor:
        """Loss (n,) of masks P (n, K, h, w) for the given images, forward passes only."""
        return self.score_value(P, images) + self.regularizer(P, l1, images)

    def clean_scores(self, P: torch.Tensor) -> torch.Tensor:
        """Score of the deletion-perturbed images x*U(M) + b*(1-U(M)), no noise (adaptive L1)."""
        up = self.up_masks(P)[:, 2:3]
        return self.perturber.scores(self.session, self.x, self.target, 1, lambda image, k: up[image],
                                     desc="igos")[:, 0]


def optimize_masks(obj: _Objective, B: int, K: int, *, iterations: int, alpha: float, armijo: float, decay: float,
                   alpha_min: float, line_search: str, ls_growth: float, opt: str, adaptive_l1: bool,
                   clean_score: torch.Tensor | None):
    """The (batched) I-GOS optimizer; returns the masks P (B, K, h, w) and a history dict."""
    x = obj.x
    P = torch.ones(B, K, *obj.low, dtype=x.dtype, device=x.device)
    step = torch.full((B,), float(alpha), dtype=x.dtype, device=x.device)
    theta_prev = None
    history = {"alpha": [], "loss": [], "candidates": [], "l1": []}
    if line_search == "lookahead" and opt == "ls":
        return _optimize_lookahead(obj, P, step, iterations=iterations, alpha=alpha, armijo=armijo, decay=decay,
                                   alpha_min=alpha_min, ls_growth=ls_growth, adaptive_l1=adaptive_l1,
                                   clean_score=clean_score, history=history)
    draw = 0
    for it in range(iterations):
        _adapt_l1(obj, P, it, iterations, adaptive_l1, clean_score)
        obj.draw_noise(draw)
        draw += 1
        loss, g = obj.value_and_grad(P)
        history["loss"].append(loss.tolist())
        history["l1"].append(obj.l1.tolist())
        if opt == "nag":
            theta = P - alpha * g
            e = it / (it + 3)
            P = (theta + e * (theta - theta_prev) if theta_prev is not None else theta).clamp(0, 1)
            theta_prev = theta
            history["alpha"].append([float(alpha)] * B)
            continue
        if line_search == "authors":
            a = torch.full((B,), float(alpha), dtype=x.dtype, device=x.device)
            obj.draw_noise(draw)
            draw += 1
            loss = obj.value(P, torch.arange(B, device=x.device), obj.l1)
        else:
            a = step.clone() if it == 0 else torch.clamp(step * ls_growth, max=float(alpha))
        slope = armijo * g.pow(2).reshape(B, -1).sum(1)
        pending = torch.ones(B, dtype=torch.bool, device=x.device)
        tried = torch.zeros(B, dtype=torch.long)
        while pending.any():
            idx = pending.nonzero()[:, 0]
            if line_search == "authors":
                obj.draw_noise(draw)
                draw += 1
            cand = (P[idx] - a[idx].view(-1, 1, 1, 1) * g[idx]).clamp(0, 1)
            new = obj.value(cand, idx, obj.l1[idx])
            tried[idx.cpu()] += 1
            fail = new > loss[idx] - a[idx] * slope[idx]
            fail &= a[idx] >= alpha_min
            still = idx[fail]
            pending[:] = False
            pending[still] = True
            a[still] *= decay
        history["alpha"].append(a.tolist())
        history["candidates"].append(tried.tolist())
        step = a
        P = (P - a.view(-1, 1, 1, 1) * g).clamp(0, 1)
    return P, history


def _adapt_l1(obj: _Objective, P: torch.Tensor, it: int, iterations: int, adaptive_l1: bool, clean_score) -> None:
    """The I-GOS demo's rule: at T/2 (T/1.25), if the score moved <= 0.001 (0.01), l1 /= 10 (5), per image."""
    if adaptive_l1 and iterations > 3 and it in (int(iterations / 2), int(iterations / 1.25)):
        moved = (clean_score - obj.clean_scores(P)).abs()
        threshold, factor = (0.001, 10.0) if it == int(iterations / 2) else (0.01, 5.0)
        obj.l1 = torch.where(moved <= threshold, obj.l1 / factor, obj.l1)


def _optimize_lookahead(obj: _Objective, P, step, *, iterations, alpha, armijo, decay, alpha_min, ls_growth,
                        adaptive_l1, clean_score, history):
    """The line search where every candidate's evaluation is also the next iteration's gradient pass.

    The noise is drawn once for the whole optimization, so the objective is one deterministic
    function: the accepted candidate's scores and gradient (computed with that noise in the same
    forward+backward pass as its acceptance test) are exactly what the next iteration needs. Each
    iteration then costs one pass with gradients per candidate and nothing else; the first and the
    last iterations' candidates run forward only. Same result as `"reuse"` with the noise held fixed
    (tested).
    """
    B = P.shape[0]
    obj.draw_noise(0)
    s, gs = obj.score_value_and_grad(P)
    for it in range(iterations):
        # The first search starts at `alpha` and usually backtracks several times: its candidates run
        # forward only, then one pass with gradients at the accepted masks. Later searches start from
        # the last accepted step and mostly accept their first candidate: they run with gradients.
        speculate = 0 < it < iterations - 1
        _adapt_l1(obj, P, it, iterations, adaptive_l1, clean_score)
        r, gr = obj.regularizer_grad(P, obj.l1)
        loss, g = s + r, gs + gr
        history["loss"].append(loss.tolist())
        history["l1"].append(obj.l1.tolist())
        a = step.clone() if it == 0 else torch.clamp(step * ls_growth, max=float(alpha))
        slope = armijo * g.pow(2).reshape(B, -1).sum(1)
        last = it == iterations - 1
        new_s, new_gs = s.clone(), gs.clone()
        pending = torch.ones(B, dtype=torch.bool, device=P.device)
        tried = torch.zeros(B, dtype=torch.long)
        while pending.any():
            idx = pending.nonzero()[:, 0]
            cand = (P[idx] - a[idx].view(-1, 1, 1, 1) * g[idx]).clamp(0, 1)
            if speculate:
                cs, cg = obj.score_value_and_grad(cand, idx)
            else:
                cs = obj.score_value(cand, idx)
            new = cs + obj.regularizer(cand, obj.l1[idx], idx)
            tried[idx.cpu()] += 1
            fail = (new > loss[idx] - a[idx] * slope[idx]) & (a[idx] >= alpha_min)
            ok = ~fail
            new_s[idx[ok]] = cs[ok]
            if speculate:
                new_gs[idx[ok]] = cg[ok]
            pending[:] = False
            pending[idx[fail]] = True
            a[idx[fail]] *= decay
        history["alpha"].append(a.tolist())
        history["candidates"].append(tried.tolist())
        step = a
        P = (P - a.view(-1, 1, 1, 1) * g).clamp(0, 1)
        s, gs = new_s, new_gs
        if it == 0 and not last:
            s, gs = obj.score_value_and_grad(P)
    return P, history


class _IGOSBase(Method):
    terms: tuple = ()
    grad_scale = 1.0
    K = 1
    bilateral = False

    def _check(self):
        for key in ("size", "steps", "iterations"):
            v = getattr(self, key)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ConfigError(f"{key} must be a positive int, got {v!r}")
        if self.line_search not in LINE_SEARCHES:
            raise ConfigError(f"unknown line_search '{self.line_search}'; choose one of {', '.join(LINE_SEARCHES)}")
        if self.opt not in OPTIMIZERS:
            raise ConfigError(f"unknown opt '{self.opt}'; choose one of {', '.join(OPTIMIZERS)}")
        if not 0 < self.decay < 1:
            raise ConfigError(f"decay must be in (0, 1), got {self.decay!r}")
        if self.noise < 0:
            raise ConfigError(f"noise must be >= 0, got {self.noise!r}")
        check_batch_size(self.batch_size)
        self._perturber = Perturber(self.baseline, self.score, self.batch_size)

    def _attribute(self, session, x, target):
        H, W = x.shape[-2:]
        low = (min(self.size, H), min(self.size, W))
        with torch.no_grad():
            outputs = session.forward(x)
        resolved = self.resolve(session, x, outputs)
        clean = resolved.with_score(self.score)(outputs).detach() if self.adaptive_l1 else None
        obj = _Objective(session, x, resolved, self._perturber, self.terms, self.grad_scale, self.steps,
                         float(self.noise), self.seed, self.l1, self.l2,
                         getattr(self, "bilateral_sigma", None) if self.bilateral else None, low)
        P, history = optimize_masks(
            obj, x.shape[0], self.K, iterations=self.iterations, alpha=float(self.alpha), armijo=float(self.armijo),
            decay=float(self.decay), alpha_min=float(self.alpha_min), line_search=self.line_search,
            ls_growth=float(self.ls_growth), opt=self.opt, adaptive_l1=self.adaptive_l1, clean_score=clean)
        self.last_history = history
        self.last_masks = {"deletion": P[:, 0].detach()}
        if self.K == 2:
            self.last_masks["insertion"] = P[:, 1].detach()
        mask = obj.combined(P).detach()
        self.last_mask = mask  # (B, h, w), 1 = keep, low = important (the authors' convention)
        self.last_lowres = 1 - mask  # higher = more important
        return 1 - upscale(mask[:, None], (H, W))


@register
class IGOS(_IGOSBase):
    name = "igos"
    description = "I-GOS: a smooth, small deletion mask optimized with integrated gradients and a line search."
    terms = (Term("del", 0, 1.0),)

    def __init__(self, model, *, size: int = 28, steps: int = 20, iterations: int = 15, baseline=None,
                 noise: float = 0.2, l1: float = 1.0, l2: float = 20.0, alpha: float = 1000.0,
                 armijo: float = 1e-4, decay: float = 0.2, alpha_min: float = 1e-5, line_search: str = "reuse",
                 ls_growth: float = 1.0, opt: str = "ls", adaptive_l1: bool = False, score: str = "softmax",
                 seed: int = 0, batch_size: int = 10):
        super().__init__(model, size=size, steps=steps, iterations=iterations,
                         baseline=igos_baseline() if baseline is None else baseline, noise=noise, l1=l1, l2=l2,
                         alpha=alpha, armijo=armijo, decay=decay, alpha_min=alpha_min, line_search=line_search,
                         ls_growth=ls_growth, opt=opt, adaptive_l1=adaptive_l1, score=score, seed=seed,
                         batch_size=batch_size)
        self._check()


@register
class IGOSPlusPlus(_IGOSBase):
    name = "igos_plus_plus"
    description = "iGOS++: deletion and insertion masks optimized together (bilateral perturbations, bilateral TV)."
    terms = (Term("del", 2, 1.0), Term("ins", 2, -1.0), Term("del", 0, 1.0), Term("ins", 1, -1.0))
    grad_scale = 0.5
    K = 2
    bilateral = True

    def __init__(self, model, *, size: int = 28, steps: int = 20, iterations: int = 15, baseline=None,
                 noise: float = 0.2, l1: float = 1.0, l2: float = 20.0, bilateral_sigma: float = 0.01,
                 alpha: float = 1000.0, armijo: float = 1e-4, decay: float = 0.2, alpha_min: float = 1e-5,
                 line_search: str = "reuse", ls_growth: float = 1.0, opt: str = "ls", adaptive_l1: bool = False,
                 score: str = "softmax", seed: int = 0, batch_size: int = 10):
        super().__init__(model, size=size, steps=steps, iterations=iterations,
                         baseline=igos_baseline() if baseline is None else baseline, noise=noise, l1=l1, l2=l2,
                         bilateral_sigma=bilateral_sigma, alpha=alpha, armijo=armijo, decay=decay,
                         alpha_min=alpha_min, line_search=line_search, ls_growth=ls_growth, opt=opt,
                         adaptive_l1=adaptive_l1, score=score, seed=seed, batch_size=batch_size)
        if bilateral_sigma <= 0:
            raise ConfigError(f"bilateral_sigma must be positive, got {bilateral_sigma!r}")
        self._check()
