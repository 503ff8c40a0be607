"""I-GOS (Qi et al. 2020) and iGOS++ (Khorram et al. 2021), batched, on the perturbation engine.

Both optimize low-resolution masks (1 = keep, low = important) by gradient descent where the
gradient of the model's score is an *integrated* gradient: the mean of the gradients at N points
s_i = i/N on the straight path from the baseline (s=0) to the perturbed image (s=1), each point with
Gaussian noise added in the model's input space. Steps are chosen by a backtracking (Armijo) line
search (`optimizers.armijo_search`) on the same integrated score plus the L1 and (bilateral)
total-variation regularizers.

- I-GOS: one deletion mask M; loss  D(M) + l1 mean|1-M| + l2 TV(M).
- iGOS++: a deletion mask Md and an insertion mask Mi, M = Md * Mi; loss
  D(Md) - S(Mi) + D(M) - S(M) + l1 mean|1-M| + l2 BTV(x, M), gradients as in the authors' code
  (the score terms halved, see `_Objective`), one shared step for both masks.

Batched: B images are optimized together. All the path points of all images (and, for iGOS++, of
all four score terms) are rows for the engine (`Perturber.scores_and_grads`), run in chunks of
`batch_size` rows. The optimization is per image: every image keeps its own step size, Armijo
acceptance, L1 weight and noise, so an image's mask does not depend on its batch or on `batch_size`.

Noise: drawn through `session.random(seed, "igos")`, keyed by (image id, draw index), the draw
index of path point k of noise draw d being d * rows + k. Deviation from the authors' code (one
image at a time, torch's global generator): images never share noise, and with `image_ids` an
image gets the same noise in any batch or shard.

Where the passes go, and what we save (the authors' code spends 87% of its forward passes in the
line search, each test with fresh noise):
- Common random numbers: the noise of an iteration (draw d = the iteration) is drawn once and used
  by the gradient pass and by every acceptance test of that iteration. The Armijo test then compares
  one deterministic function at two points instead of two noisy estimates.
- The current mask's loss, which the Armijo test needs, is the mean of the scores the gradient pass
  already computed with that same noise: no separate forward passes for it.
- Warm start: the search starts from the step accepted at the previous iteration (times
  `ls_growth`) instead of from `alpha` every time; one candidate is usually enough.
- Candidates of all images still searching go through the engine together, in full chunks.
`line_search="authors"` restores the iGOS++ code's schedule (khorrams/IGOS_pp, methods_helper.py
`line_search`: fresh noise for every evaluation, a separate evaluation of the current mask, restart
from `alpha`) to measure what the savings cost; its fresh draws are counted per image (iteration,
evaluation), so images stay independent.

`line_search="aaai"` is the original AAAI 2020 code's search (zhongangqi/IGOS,
IGOS_generate_video.py, `Integrated_Mask`): the gradient is the same noisy integrated gradient, but
the Armijo test compares l1 mean|1-M| + l2 TV(M) + the *clean deletion score* softmax(f(x U(M) +
b (1 - U(M)))) (one forward pass per image, no noise, no path) of the current mask and of each
candidate clamp(M - step g, 0, 1); the step restarts from 200 (`alpha=None` resolves to 200 here,
1000 otherwise) at every iteration, decays by 0.2, c = 1e-4 on |g|^2, and the first candidate whose
step fell below 1e-5 is taken unchecked (their `if step < 0.00001: break` after the evaluation).
Update M <- clamp(M - step g, 0, 1). I-GOS only (iGOS++ has no clean-score search: ConfigError).
With it `adaptive_l1=None` turns the AAAI demo's L1 rule on, as that code always applies it.
The AAAI code also scores a top-40-pixel mask every iteration for its curves; that pass changes
nothing in the optimization and is not spent here.

Adaptive L1 (`_AdaptiveL1`, the AAAI rule, per image) follows their timing: the clean score of the
mask at the start of iteration i-1 decides, at the end of iteration i = int(T/2) (int(T/1.25)),
whether L1 is divided by 10 (5) from iteration i+1 on.

Baselines: each image's baseline is computed once per call (`baseline_images`) and sliced with the
images of every evaluation, so a per-image (B, C, H, W) tensor baseline works although the line
search scores subsets of the images.

`seeds=k` averages the masks of k noise draws (cost x k): replica r is exactly the single-seed run
with seed `seed + r` (same keys), the k replicas are optimized together as k B independent rows, and
the returned mask is their mean (`extras["seed_masks"]` (k, B, h, w) keeps each). Measured
seed-to-seed agreement: docs/igos.md. Our addition; the authors' code has one draw.

Other differences from the authors' code, deliberate: the integrated score is the mean over the N
path points (the AAAI code divides by a hard-coded 20.0, the same at its N = 20); the noise is keyed
(above) instead of cv2.randn / torch.randn from a global generator.

`explain(...)` returns maps = 1 - upsampled M (higher = more important), lowres = 1 - M, and extras:
"mask" (B, h, w) M itself (1 = keep, the authors' convention; the mean over seeds), "masks"
{"deletion", "insertion"} (the separate iGOS++ masks), "seed_masks" (k, B, h, w), "seeds" the seeds
used, "history" (per iteration, one entry per row r B + i = seed seed + r, image i: "loss", "alpha"
accepted steps, "candidates" tried, "l1").
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..baselines import Baseline, Blur, baseline_images
from ..core.errors import ConfigError
from ..core.explanation import Explanation
from ..core.randomness import KeyedRandom
from ..perturbation import Imputer, Perturber
from .base import Method, Param, check_batch_size, clean_outputs, register
from .optimizers import armijo_search, nesterov_step

LINE_SEARCHES = ("lookahead", "reuse", "authors", "aaai")
OPTIMIZERS = ("ls", "nag")
NOISE_PURPOSE = "igos"
# line_search="authors": noise draw of evaluation e of iteration t is t * _AUTHORS_STRIDE + e
# (e = 0 gradient pass, 1 current mask, 2 + i the i-th candidate).
_AUTHORS_STRIDE = 1 << 20
# First trial step of every search: the iGOS++ code's `alpha`, the AAAI code's `step = 200.0`.
DEFAULT_ALPHA = 1000.0
AAAI_ALPHA = 200.0


def igos_baseline() -> Blur:
    """The I-GOS baseline: Gaussian blur, kernel 51, sigma 50 (on 224 images)."""
    return Blur(sigma=50.0, kernel_size=51)


def igos_noise(rng: KeyedRandom, images, draws, rows: int, shape, sigma: float, *, device=None,
               dtype=torch.float32) -> torch.Tensor:
    """Noise of every path point of noise draws `draws` (n,) of `images` (n,): (n, rows, *shape).

    Row k of draw d of an image is keyed by (image, d * rows + k): what the optimizer adds to that
    image's k-th path point (`_Objective` draws the same numbers a chunk at a time)."""
    images = torch.as_tensor(images).flatten()
    draws = torch.as_tensor(draws).flatten()
    n = images.numel()
    if sigma == 0:
        return torch.zeros((n, rows, *shape), device=device, dtype=dtype)
    k = torch.arange(rows)
    noise = rng.normal(images.repeat_interleave(rows), (draws[:, None] * rows + k).flatten(), tuple(shape),
                       device=device, dtype=dtype)
    return (noise * sigma).view(n, rows, *shape)


class _BaselineRows(Baseline):
    """Baseline images computed once for the rows of a call (an image's own baseline, whatever the
    subset of images an evaluation scores: the line search scores the images still searching)."""

    name = "igos rows"

    def __init__(self, images: torch.Tensor):
        self.images = images

    def __call__(self, x, rng=None):
        return self.images

    def __repr__(self) -> str:
        return f"_BaselineRows(shape={tuple(self.images.shape)})"


class SeedReplicas:
    """The noise of `seeds=k`: row j of the stacked batch (k B rows, replica-major) is image j % B
    drawing from `rngs[j // B]`, i.e. keyed exactly as a single-seed call with seed `seed + j // B`."""

    def __init__(self, rngs, n_images: int):
        self.rngs, self.n = list(rngs), int(n_images)

    def normal(self, images, draws, shape, *, device="cpu", dtype=torch.float32) -> torch.Tensor:
        images = torch.as_tensor(images).flatten().cpu()
        draws = torch.as_tensor(draws).flatten().cpu()
        if len(self.rngs) == 1:
            return self.rngs[0].normal(images, draws, shape, device=device, dtype=dtype)
        out = torch.empty((len(images), *shape), device=device, dtype=dtype)
        replica = images // self.n
        for r in replica.unique().tolist():  # k whole-row groups, not a loop over samples
            rows = (replica == r).nonzero()[:, 0]
            out[rows.to(out.device)] = self.rngs[r].normal(images[rows] % self.n, draws[rows], shape,
                                                           device=device, dtype=dtype)
        return out


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

    Mask parameters P are (B, K, h, w): K = 1 (I-GOS) or 2 (iGOS++: deletion, insertion). Every
    evaluation names its images (`images`, indices into the batch; None = all) and each image's
    noise draw (`draws`, (n,) ints); rows of the same (image, draw) always get the same noise.
    """

    # Noise rows kept between the evaluations of an iteration (they reuse its draw); beyond this the
    # rows are drawn again per chunk (the same numbers, only slower).
    noise_cache_bytes = 256 * 2 ** 20

    def __init__(self, session, x, target, base, score, batch_size, terms, grad_scale, steps, noise, rng, l1, l2,
                 bilateral_sigma, size):
        self.session, self.x, self.target = session, x, target
        self.base, self.score, self.batch_size = base, score, batch_size
        self.terms, self.grad_scale, self.steps = terms, grad_scale, steps
        self.noise_sigma = float(noise)
        self.rng = rng
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
        self._cache: dict = {}
        self._cached = 0

    # -- noise -------------------------------------------------------------------------------
    def forget_noise(self) -> None:
        """Drop the cached noise rows (a new iteration draws new ones)."""
        self._cache.clear()
        self._cached = 0

    def _noise_rows(self, images: torch.Tensor, row_draws: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) noise for rows keyed by (image, row draw index), cached within the budget."""
        keys = list(zip(images.tolist(), row_draws.tolist()))
        out = torch.empty((len(keys), *self.x.shape[1:]), device=self.x.device, dtype=self.x.dtype)
        missing = [j for j, key in enumerate(keys) if key not in self._cache]
        if missing:
            idx = torch.tensor(missing)
            fresh = self.rng.normal(images.cpu()[idx], row_draws.cpu()[idx], self.x.shape[1:],
                                    device=self.x.device, dtype=self.x.dtype) * self.noise_sigma
            out[idx.to(self.x.device)] = fresh
            for j, row in zip(missing, fresh):
                size = row.numel() * row.element_size()
                if self._cached + size <= self.noise_cache_bytes:
                    self._cache[keys[j]] = row
                    self._cached += size
        fresh_rows = set(missing)
        for j, key in enumerate(keys):
            if j not in fresh_rows:
                out[j] = self._cache[key]
        return out

    def _perturb(self, images: torch.Tensor, draws: torch.Tensor):
        """The engine's `perturb` for a call on `images` with noise draws `draws` (None without noise)."""
        if not self.noise_sigma:
            return None

        def perturb(inputs, image, k):
            return inputs + self._noise_rows(images[image], draws[image] * self.rows + k)

        return perturb

    def _images(self, images):
        return torch.arange(self.x.shape[0], device=self.x.device) if images is None else images

    def _engine(self, images: torch.Tensor) -> Perturber:
        """The engine for a call on `images`, with their own baseline rows (per-image baselines work
        for any subset the line search scores)."""
        return Perturber(_BaselineRows(self.base[images]), self.score, self.batch_size)

    # -- pieces ------------------------------------------------------------------------------
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
    def score_value_and_grad(self, P: torch.Tensor, images: torch.Tensor | None, draws: torch.Tensor):
        """Signed integrated score (n,) and its gradient direction (n, K, h, w) at masks P of the given
        images (all for None) with noise draws `draws`, in one engine pass with gradients; no regularizer."""
        n, K = P.shape[:2]
        H, W = self.size
        T, N = len(self.terms), self.steps
        images = self._images(images)
        x, target = self.x[images], self.target.for_images(images)
        up = self.up_masks(P)
        acc = torch.zeros(n * T, H, W, dtype=self.x.dtype, device=self.x.device)
        dkeep = torch.where(self.term_ins, -1.0, 1.0).to(self.x.dtype)

        def reduce(scores, grads, image, k, masks):
            t, i = self.term_of_row[k], self.point_of_row[k]
            coeff = dkeep[t] * self.points[i] / N
            acc.index_add_(0, image * T + t, grads[:, 0] * coeff.view(-1, 1, 1))

        scores = self._engine(images).scores_and_grads(self.session, x, target, self.rows, self._make_masks(up),
                                                       reduce=reduce, perturb=self._perturb(images, draws),
                                                       desc="igos")
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

    def score_value(self, P: torch.Tensor, images: torch.Tensor, draws: torch.Tensor) -> torch.Tensor:
        """Signed integrated score (n,) of masks P (n, K, h, w) for the given images, forward passes only."""
        up = self.up_masks(P)
        scores = self._engine(images).scores(self.session, self.x[images], self.target.for_images(images),
                                             self.rows, self._make_masks(up), perturb=self._perturb(images, draws),
                                             desc="igos line search")
        return self.score_loss(scores)

    def clean_scores(self, P: torch.Tensor, images: torch.Tensor | None = None) -> torch.Tensor:
        """Score (n,) of the deletion-perturbed images x*U(M) + b*(1-U(M)), M the combined mask, one
        forward pass per image without noise or path (the AAAI line search, the adaptive L1)."""
        images = self._images(images)
        up = self.up_masks(P)[:, 2:3]
        return self._engine(images).scores(self.session, self.x[images], self.target.for_images(images), 1,
                                           lambda image, k: up[image], desc="igos")[:, 0]


def optimize_masks(obj: _Objective, B: int, K: int, *, iterations: int, alpha: float, armijo: float, decay: float,
                   alpha_min: float, line_search: str, ls_growth: float, opt: str, adaptive_l1: bool,
                   clean_score: torch.Tensor | None):
    """The (batched, per-image) I-GOS optimizer; returns the masks P (B, K, h, w) and a history dict.

    One loop serves every schedule; they differ in the noise draws and in which pass evaluates a
    line-search candidate:
    - "reuse": draw d = the iteration for the gradient pass and every candidate; candidates forward only.
    - "authors": a fresh draw for the gradient pass, the current mask's loss and every candidate.
    - "aaai": the AAAI code's search: draw d = the iteration for the gradient pass only; the current
      mask and every candidate are scored on the clean deletion image x U(M) + b (1 - U(M)) (one
      forward pass each, no noise, no path) plus the regularizer; restart from `alpha` every iteration.
    - "lookahead": one draw for the whole run, so the objective is one deterministic function and a
      candidate's evaluation is also the next iteration's gradient pass: the candidates of the middle
      iterations run forward+backward and the accepted one's score and gradient are reused; the first
      search (which usually backtracks) runs forward only and is followed by one gradient pass; the
      last needs no gradient. Same result as "reuse" with the noise held fixed (tested).
    """
    x = obj.x
    dev = x.device
    P = torch.ones(B, K, *obj.low, dtype=x.dtype, device=dev)
    step = torch.full((B,), float(alpha), dtype=x.dtype, device=dev)
    every = torch.arange(B, device=dev)
    theta_prev = None
    history = {"alpha": [], "loss": [], "candidates": [], "l1": []}
    lookahead = line_search == "lookahead" and opt == "ls"
    authors = line_search == "authors" and opt == "ls"
    aaai = line_search == "aaai" and opt == "ls"
    l1_rule = _AdaptiveL1(iterations, clean_score) if adaptive_l1 else None

    def draw_of(it: int, evaluation=0):
        """Each image's noise draw (n,) for an evaluation of iteration `it`."""
        if lookahead:
            d = 0
        elif authors:
            d = it * _AUTHORS_STRIDE
        else:
            d = it
        return torch.as_tensor(evaluation, device=dev) + d

    if lookahead:
        s, gs = obj.score_value_and_grad(P, None, draw_of(0).expand(B))
    for it in range(iterations):
        # the clean deletion score of the current mask: the AAAI search's loss, the adaptive L1's record
        clean_now = obj.clean_scores(P) if aaai or (l1_rule is not None and l1_rule.records(it)) else None
        if l1_rule is not None:
            obj.l1 = l1_rule.update(it, obj.l1, clean_now)
        if not lookahead:
            obj.forget_noise()
            s, gs = obj.score_value_and_grad(P, None, draw_of(it).expand(B))
        r, gr = obj.regularizer_grad(P, obj.l1)
        loss, g = s + r, gs + gr
        history["loss"].append(loss.tolist())
        history["l1"].append(obj.l1.tolist())
        if opt == "nag":
            P, theta_prev = nesterov_step(P, g, theta_prev, lr=alpha, iteration=it)
            P = P.clamp(0, 1)
            history["alpha"].append([float(alpha)] * B)
            continue
        if authors:  # the authors evaluate the current mask again, with fresh noise, and restart from alpha
            a0 = torch.full((B,), float(alpha), dtype=x.dtype, device=dev)
            loss = obj.score_value(P, every, draw_of(it, 1).expand(B)) + obj.regularizer(P, obj.l1)
        elif aaai:  # AAAI: loss_ori = regularizer + clean score; step = 200 at every iteration
            a0 = torch.full((B,), float(alpha), dtype=x.dtype, device=dev)
            loss = clean_now + r
        else:
            a0 = step.clone() if it == 0 else torch.clamp(step * ls_growth, max=float(alpha))
        slope = armijo * g.pow(2).reshape(B, -1).sum(1)
        with_grad = lookahead and 0 < it < iterations - 1  # the candidate's pass is the next gradient pass

        def evaluate(rows, a, attempt, it=it, P=P, g=g, with_grad=with_grad):
            cand = (P[rows] - a.view(-1, 1, 1, 1) * g[rows]).clamp(0, 1)
            reg = obj.regularizer(cand, obj.l1[rows], rows)
            if aaai:
                return obj.clean_scores(cand, rows) + reg, ()
            draws = draw_of(it, 2 + attempt.to(dev)) if authors else draw_of(it).expand(len(rows))
            if with_grad:
                cs, cg = obj.score_value_and_grad(cand, rows, draws)
                return cs + reg, (cs, cg)
            return obj.score_value(cand, rows, draws) + reg, ()

        a, tried, accepted = armijo_search(loss, slope, a0, evaluate, decay=decay, step_min=alpha_min)
        history["alpha"].append(a.tolist())
        history["candidates"].append(tried.tolist())
        step = a
        P = (P - a.view(-1, 1, 1, 1) * g).clamp(0, 1)
        if with_grad:
            s, gs = accepted
        elif lookahead and it == 0 and iterations > 1:
            s, gs = obj.score_value_and_grad(P, None, draw_of(0).expand(B))
    return P, history


class _AdaptiveL1:
    """The AAAI demo's L1 rule (`IGOS_generate_video.py`, `Integrated_Mask`), per image.

    Their loop, at the end of iteration i = int(T/2) (resp. int(T/1.25)), compares the clean score
    of the initial mask, curve2[0], with curve2[i]: the clean score of the mask at the start of
    iteration i-1 (curve2 holds the first score twice). If it moved <= 0.001 (0.01), l1 /= 10 (5),
    which takes effect from iteration i+1. Here: the score is recorded at the start of iteration
    i-1 and the weight changes at the start of iteration i+1, the same timing."""

    def __init__(self, iterations: int, clean_score: torch.Tensor):
        self.clean = clean_score
        self.marks = {}
        if iterations > 3:
            self.marks[int(iterations / 2)] = (0.001, 10.0)
            self.marks.setdefault(int(iterations / 1.25), (0.01, 5.0))  # their `elif`
        self.recorded: dict = {}

    def records(self, it: int) -> bool:
        return it + 1 in self.marks

    def update(self, it: int, l1: torch.Tensor, clean_now) -> torch.Tensor:
        if self.records(it):
            self.recorded[it + 1] = clean_now
        if it - 1 in self.marks:
            threshold, factor = self.marks[it - 1]
            moved = (self.clean - self.recorded.pop(it - 1)).abs()
            l1 = torch.where(moved <= threshold, l1 / factor, l1)
        return l1


class _IGOSBase(Method):
    """Shared parameters of I-GOS and iGOS++ (declared once; iGOS++ adds `bilateral_sigma`)."""

    stochastic = True  # path-point noise, keyed to the images (noise=0 makes it deterministic)
    terms: tuple = ()
    grad_scale = 1.0
    K = 1
    bilateral = False

    size = Param(28, "mask side (clipped to the image)")
    steps = Param(20, "path points of the integrated gradient")
    iterations = Param(15, "optimizer iterations")
    baseline = Param(None, "what deleted pixels become (None: the I-GOS blur, kernel 51, sigma 50)")
    noise = Param(0.2, "std of the Gaussian noise added to every path point (input space)")
    l1 = Param(1.0, "L1 weight")
    l2 = Param(20.0, "TV weight")
    alpha = Param(None, "first (largest) trial step; None: 1000 (iGOS++ code), 200 with line_search='aaai' (AAAI code)")
    armijo = Param(1e-4, "Armijo constant")
    decay = Param(0.2, "line-search step decay")
    alpha_min = Param(1e-5, "smallest step tried")
    line_search = Param("reuse", "'reuse', 'lookahead', 'authors' or 'aaai' (see the module docstring)")
    ls_growth = Param(1.0, "factor on the last accepted step where the next search starts")
    opt = Param("ls", "'ls' (line search) or 'nag' (the authors' accelerated gradient)")
    adaptive_l1 = Param(None, "the AAAI demo's L1 lowering at T/2 and T/1.25; None: on with line_search='aaai'")
    score = Param("softmax", "score explained: 'softmax', 'logit' or 'log_softmax'")
    seed = Param(0, "noise seed")
    seeds = Param(1, "average the masks of this many noise draws, seeds seed, seed+1, ... (cost x seeds)")
    batch_size = Param(10, "rows per pass (None: picked for the device)")

    def check(self):
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
        if not isinstance(self.seeds, int) or isinstance(self.seeds, bool) or self.seeds < 1:
            raise ConfigError(f"seeds must be a positive int, got {self.seeds!r}")
        if self.line_search == "aaai" and self.K != 1:
            raise ConfigError("line_search='aaai' is the AAAI I-GOS search (clean deletion score); "
                              "iGOS++ has no such search: use 'reuse', 'lookahead' or 'authors'")
        if self.batch_size is not None:  # None: rows per pass picked for the device
            check_batch_size(self.batch_size)
        self._perturber = Perturber(igos_baseline() if self.baseline is None else self.baseline, self.score,
                                    self.batch_size)
        if isinstance(self._perturber.baseline, Imputer):
            raise ConfigError("I-GOS needs mask gradients, hence a fixed baseline, not a mask-dependent imputer")

    def compute(self, session, x, target):
        B, H, W = x.shape[0], *x.shape[-2:]
        k = self.seeds
        low = (min(self.size, H), min(self.size, W))
        resolved, outputs = clean_outputs(session, x, target)
        aaai = self.line_search == "aaai"
        adaptive = aaai if self.adaptive_l1 is None else bool(self.adaptive_l1)
        alpha = (AAAI_ALPHA if aaai else DEFAULT_ALPHA) if self.alpha is None else float(self.alpha)
        # each image's baseline, computed once for the whole call (a per-image tensor baseline included)
        base = baseline_images(self._perturber.baseline, x, session)
        # seeds=k: the k noise draws are k replicas of the batch (row r*B + i: image i, seed seed + r),
        # optimized together; every row is independent, so replica r is the single-seed run with seed + r
        rows = torch.arange(k * B, device=x.device) % B
        xs, base = (x, base) if k == 1 else (x[rows], base[rows])
        rng = SeedReplicas([session.random(self.seed + r, NOISE_PURPOSE, B) for r in range(k)], B)
        clean = resolved.with_score(self.score)(outputs).detach()[rows] if adaptive else None
        obj = _Objective(session, xs, resolved.for_images(rows), base, self.score, self.batch_size, self.terms,
                         self.grad_scale, self.steps, float(self.noise), rng, self.l1, self.l2,
                         self.bilateral_sigma if self.bilateral else None, low)
        P, history = optimize_masks(
            obj, k * B, self.K, iterations=self.iterations, alpha=alpha, armijo=float(self.armijo),
            decay=float(self.decay), alpha_min=float(self.alpha_min), line_search=self.line_search,
            ls_growth=float(self.ls_growth), opt=self.opt, adaptive_l1=adaptive, clean_score=clean)
        P = P.detach()
        seed_masks = obj.combined(P).view(k, B, *low)  # (k, B, h, w), 1 = keep, low = important (authors')
        mask = seed_masks.mean(0)
        P = P.view(k, B, self.K, *low).mean(0)
        masks = {"deletion": P[:, 0]}
        if self.K == 2:
            masks["insertion"] = P[:, 1]
        return Explanation(maps=1 - upscale(mask[:, None], (H, W))[:, 0], targets=resolved.classes, outputs=outputs,
                           lowres=1 - mask, extras={"mask": mask, "masks": masks, "seed_masks": seed_masks,
                                                    "seeds": [self.seed + r for r in range(k)],
                                                    "history": history})


@register
class IGOS(_IGOSBase):
    name = "igos"
    description = "I-GOS: a smooth, small deletion mask optimized with integrated gradients and a line search."
    terms = (Term("del", 0, 1.0),)


@register
class IGOSPlusPlus(_IGOSBase):
    name = "igos_plus_plus"
    description = "iGOS++: deletion and insertion masks optimized together (bilateral perturbations, bilateral TV)."
    terms = (Term("del", 2, 1.0), Term("ins", 2, -1.0), Term("del", 0, 1.0), Term("ins", 1, -1.0))
    grad_scale = 0.5
    K = 2
    bilateral = True

    bilateral_sigma = Param(0.01, "bilateral TV's colour scale")

    def check(self):
        super().check()
        if self.bilateral_sigma <= 0:
            raise ConfigError(f"bilateral_sigma must be positive, got {self.bilateral_sigma!r}")
