"""Extremal perturbation (Fong, Patrick & Vedaldi 2019), batched over images and area levels.

For each fixed area a, a smooth mask m of area ~a is optimized so that keeping only m (the rest
perturbed) preserves the target's score ("preserve"), deleting m destroys it ("delete"), or both
("dual", reward = score(keep m) - score(keep 1 - m)). This follows TorchRay's reference code
(facebookresearch/TorchRay, torchray/attribution/extremal_perturbation.py), formula by formula:

- `MaskGenerator`: the mask lives on a canvas larger than the image by a margin of `sigma` pixels
  (margin = sigma; padding = 1 + ceil(2 sigma / step) nodes; radius = 1 + ceil(sigma / step);
  canvas side = step * (ceil(side / step) + 2 padding - 2 radius) - step + 1). Node j of the
  ceil(side / step) parameter grid sits at canvas pixel margin + step * j, i.e. at image pixel
  step * j + margin - round(margin) (the image is the canvas crop starting at round(margin)).
  Canvas pixel u sees the nodes floor(u / step) + o - padding, o = 0 .. 2 radius (nodes off the grid
  are 0), each weighted by exp(-2 max(0, d / sigma - 1/2)^2) at distance d, pooled by a softmax
  with coldness 20 (sum of v * softmax(20 v)), clamped to [0, 1].
- area penalty (`extremal_perturbation`, `reference`, `regul`): the sorted values of the WHOLE
  canvas against a reference vector of int(canvas pixels * (1 - a)) zeros then ones, mean squared
  difference times a weight 300 that grows by 1.0035 per step. Border mass is not free: for a = 0.1
  at 224x224 (canvas 260x260) the penalty asks for 6760 ones, 13.5% of the image's pixel count.
- `Perturbation` (blur): an 8-level pyramid, level l = Gaussian blur of sigma (1 - l/7) * 20 (level
  7 the image itself); `imsmooth`: taps -ceil(4 sigma) .. ceil(4 sigma), exp(-i^2 / (sqrt2 sigma +
  1.19e-7)^2) normalised, zero padding. A mask value v in [0, 1] reads the pyramid at 7 v with linear
  interpolation between the two levels around it (gradient 7 (y_{k+1} - y_k), zero at v = 1).
- `simple_reward`: the model's output for the target (score "logit"); SGD on -(reward - penalty),
  learning rate 0.01, momentum 0.9 with dampening 0.9, node values initialised to 1 and clamped to
  [0, 1] after each step; jitter: the perturbed image is flipped horizontally on even steps.
- the returned mask is the one of the last step, as TorchRay's (computed before that step's update).
  The area weight grows without bound (TorchRay's `regul_weight_last` only paces its debug plots).

Differences (deliberate):
- Defaults scale with the image: TorchRay's step 7, sigma 21 and maximal blur 20 are for 224-pixel
  images; with s = min(H, W) / 224, `step` defaults to max(1, round(7 s)), `sigma` to 21 s and
  `max_blur` to 20 s (exactly TorchRay's at 224). With the 224-pixel values on a 32x32 image the
  mask is one blob wider than the image: on a designed model whose class is decided by a 10x10
  pattern on 32x32 (tests/methods/test_extremal.py), 800 steps, they put 11% of the mask on it (the
  mask covers 65% of the image), the scaled ones 66% (measured).
- Where TorchRay's canvas is too short for its crop (some step/sigma pairs, e.g. step 4 and sigma 6
  on 20x20 or 24x24: TorchRay stops with a shape mismatch), the canvas is extended at the bottom and
  right by the same formulas. An explicit `step` larger than the image is clamped to its side.
- `baseline` given (a name, number, Baseline or tensor broadcastable to (B, C, H, W), per image
  allowed): the perturbed image is baseline + v (x - baseline) instead of the blur pyramid;
  `baseline="zero"` is TorchRay's FADE_PERTURBATION (its fade pyramid interpolates linearly).
- TorchRay's `contrastive_reward` (target minus the best other logit) is not an option here: pass a
  callable target for it. TorchRay explains one image at a time; here images and areas are
  independent rows of one batched optimisation (per-row momentum and weight), with identical results.

Rows (image, area[, preserve/delete]) run in chunks of `batch_size` (forward + backward each step).
The map is the mean of the area levels' masks (higher = more important). `explain(...)` returns
lowres = the generator's node values averaged over the area levels (B, h, w), and extras "masks"
(B, A, H, W) per area level (1 = the region that matters), "params" (B, A, h, w) the node values that
generated them, "history" ("reward", "area_loss" per step and row; area_loss = -TorchRay's regul).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..baselines import baseline_images, make_baseline
from ..core.errors import ConfigError
from ..core.explanation import Explanation
from ..core.progress import progress
from ..perturbation import auto_batch_size
from .base import Method, Param, check_batch_size, clean_outputs, register
from .optimizers import momentum_step

VARIANTS = ("preserve", "delete", "dual")
REFERENCE_SIZE = 224  # the image side TorchRay's defaults (step 7, sigma 21, max blur 20) are for


def default_geometry(size, step=None, sigma=None, max_blur=None) -> tuple[int, float, float]:
    """(step, sigma, max_blur) for an image of `size` (H, W): the given values, or TorchRay's
    224-pixel defaults scaled by min(H, W) / 224 (step rounded, at least 1)."""
    s = min(size) / REFERENCE_SIZE
    step = max(1, round(7 * s)) if step is None else step
    sigma = 21.0 * s if sigma is None else float(sigma)
    max_blur = 20.0 * s if max_blur is None else float(max_blur)
    return step, sigma, max_blur


class SmoothMaskGenerator:
    """TorchRay's mask generator: node parameters (n, 1, ceil(H/step), ceil(W/step)) -> smooth masks
    on a canvas with a margin of sigma pixels; `generate` returns (image crop, whole canvas)."""

    def __init__(self, size, step: int, sigma: float, coldness: float = 20.0, device=None, dtype=torch.float32):
        self.size, self.step, self.sigma, self.coldness = tuple(size), int(step), float(sigma), coldness
        self.margin = self.sigma
        self.padding = 1 + math.ceil((self.margin + self.sigma) / step)
        self.radius = 1 + math.ceil(self.sigma / step)
        self.shape_in = tuple(math.ceil(z / step) for z in self.size)
        self.crop = round(self.margin)
        mid = [z + 2 * self.padding - 2 * self.radius for z in self.shape_in]
        # the canvas; where TorchRay's is too short for its crop (sigma < ~1.5 step: TorchRay fails
        # with a shape mismatch), it is extended at the bottom/right by the same formulas
        self.shape_out = tuple(max(step * z - step + 1, self.crop + side) for z, side in zip(mid, self.size))
        self.shape_mid = tuple(math.ceil(z / step) for z in self.shape_out)
        self.extra = tuple(a - b for a, b in zip(self.shape_mid, mid))  # nodes of padding added after
        k = 2 * self.radius + 1
        offsets = torch.arange(k, device=device, dtype=torch.float64)

        def delta(n):  # (k, n): canvas pixel u to its o-th node, margin + step * (floor(u/step) + o - padding)
            u = torch.arange(n, device=device, dtype=torch.float64)
            nodes = torch.div(u, step, rounding_mode="floor")[None, :] + offsets[:, None] - self.padding
            return u[None, :] - (self.margin + step * nodes)

        dy, dx = delta(self.shape_out[0]), delta(self.shape_out[1])
        z = torch.sqrt(dy[:, None, :, None] ** 2 + dx[None, :, None, :] ** 2) / self.sigma
        self.weight = torch.exp(-2 * (z - 0.5).clamp(min=0) ** 2).reshape(1, k * k, *self.shape_out).to(dtype)

    def generate(self, params: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n, (Hc, Wc), s = params.shape[0], self.shape_out, self.step
        k = 2 * self.radius + 1
        pad = self.padding
        vals = F.unfold(F.pad(params, (pad, pad + self.extra[1], pad, pad + self.extra[0])), k)
        vals = vals.reshape(n, k * k, *self.shape_mid)
        vals = vals.repeat_interleave(s, 2).repeat_interleave(s, 3)[..., :Hc, :Wc]  # nearest upsampling
        v = self.weight * vals
        canvas = (v * torch.softmax(self.coldness * v, dim=1)).sum(1, keepdim=True).clamp(0, 1)
        m, (H, W) = self.crop, self.size
        return canvas[..., m:m + H, m:m + W], canvas

    def __call__(self, params: torch.Tensor) -> torch.Tensor:
        return self.generate(params)[0]


def area_reference(areas, n_pixels: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """The sorted ideal masks: (A, n_pixels) with int(n_pixels * (1 - area)) zeros, then ones."""
    ref = torch.ones(len(areas), n_pixels, device=device, dtype=dtype)
    for i, a in enumerate(areas):
        ref[i, : int(n_pixels * (1 - a))] = 0
    return ref


def torchray_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """TorchRay's `imsmooth` semantics: separable Gaussian, taps up to ceil(4 sigma), zero padding."""
    if sigma <= 0:
        return x.clone()
    width = math.ceil(4 * sigma)
    i = torch.arange(-width, width + 1, device=x.device, dtype=x.dtype) / (math.sqrt(2) * sigma + 1.1920929e-07)
    f = torch.exp(-i * i)
    f = f / f.sum()
    C = x.shape[1]
    y = F.conv2d(x, f.view(1, 1, -1, 1).expand(C, 1, -1, 1), padding=(width, 0), groups=C)
    return F.conv2d(y, f.view(1, 1, 1, -1).expand(C, 1, 1, -1), padding=(0, width), groups=C)


def blur_pyramid(x: torch.Tensor, levels: int, max_blur: float) -> torch.Tensor:
    """(B, L, C, H, W): level l blurred with sigma (1 - l / (L - 1)) * max_blur; the last is x."""
    fractions = torch.linspace(0, 1, levels).tolist()
    return torch.stack([torchray_blur(x, (1 - f) * max_blur) for f in fractions], 1)


def apply_pyramid(pyramid: torch.Tensor, image: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """TorchRay's `Perturbation.apply`: row r reads image[r]'s pyramid at keep * (L - 1), linearly
    interpolated between levels floor and floor + 1 (capped at L - 1). keep: (N, 1, H, W)."""
    B, L, C, H, W = pyramid.shape
    flat = pyramid.reshape(B * L, C, H, W)
    w = keep * (L - 1)
    k = w.detach().floor().clamp(0, L - 1)
    frac = w - k
    first = image.view(-1, 1, 1, 1) * L
    k = k.long()
    i0 = (first + k).expand(-1, C, H, W)
    i1 = (first + (k + 1).clamp(max=L - 1)).expand(-1, C, H, W)
    y0, y1 = torch.gather(flat, 0, i0), torch.gather(flat, 0, i1)
    return (1 - frac) * y0 + frac * y1


@register
class ExtremalPerturbation(Method):
    name = "extremal_perturbation"
    description = "Extremal perturbation: smooth masks of fixed areas that best preserve (or delete) the score."
    stochastic = False  # no random draws: the jitter is a deterministic flip every other step
    revision = 1  # 1: TorchRay's canvas, node positions, area target and blur pyramid; scaled defaults (issue 13)

    areas = Param((0.1,), "mask areas (fractions of the canvas, as TorchRay), one mask per area level")
    steps = Param(800, "optimizer steps")
    step = Param(None, "pixels between the mask generator's nodes (None: max(1, round(7 min(H, W) / 224)))")
    sigma = Param(None, "radius of the generator's kernels and margin, pixels (None: 21 min(H, W) / 224)")
    max_blur = Param(None, "blur sigma of the most perturbed pyramid level (None: 20 min(H, W) / 224)")
    levels = Param(8, "levels of the blur pyramid")
    variant = Param("preserve", "'preserve', 'delete' or 'dual'")
    baseline = Param(None, "what removed pixels become (None: the blur pyramid; 'zero': TorchRay's fade)")
    lr = Param(0.01, "learning rate")
    momentum = Param(0.9, "SGD momentum (dampening equal to it, as TorchRay)")
    area_weight = Param(300.0, "weight of the area penalty")
    area_growth = Param(1.0035, "growth of the area weight per step")
    jitter = Param(True, "flip the perturbed image horizontally every other step")
    score = Param("logit", "score explained: 'logit' (TorchRay's simple_reward), 'softmax' or 'log_softmax'")
    batch_size = Param(10, "rows per pass (None: picked for the device)")

    def check(self):
        areas = self.params.get("areas", (0.1,))
        try:
            self.areas = (float(areas),) if isinstance(areas, (int, float)) else tuple(float(a) for a in areas)
        except (TypeError, ValueError):
            raise ConfigError(f"areas must be fractions in (0, 1], got {areas!r}") from None
        if not self.areas or not all(0 < a <= 1 for a in self.areas):
            raise ConfigError(f"areas must be fractions in (0, 1], got {areas!r}")
        for key in ("steps", "step", "levels"):
            v = getattr(self, key)
            if key == "step" and v is None:
                continue
            if not isinstance(v, int) or isinstance(v, bool) or v < (2 if key == "levels" else 1):
                raise ConfigError(f"{key} must be a {'int >= 2' if key == 'levels' else 'positive int'}, got {v!r}")
        for key in ("sigma", "max_blur"):
            v = getattr(self, key)
            if v is not None and (not isinstance(v, (int, float)) or isinstance(v, bool) or not v > 0):
                raise ConfigError(f"{key} must be a positive number or None (scaled to the image), got {v!r}")
        if self.variant not in VARIANTS:
            raise ConfigError(f"unknown variant '{self.variant}'; choose one of {', '.join(VARIANTS)}")
        if self.batch_size is not None:
            check_batch_size(self.batch_size)
        self._baseline = None if self.baseline is None else make_baseline(self.baseline)

    def compute(self, session, x, target):
        target, outputs = clean_outputs(session, x, target)
        scorer = target.with_score(self.score)
        B, _, H, W = x.shape
        A = len(self.areas)
        step, sigma, max_blur = default_geometry((H, W), self.step, self.sigma, self.max_blur)
        step = min(step, H, W)
        gen = SmoothMaskGenerator((H, W), step, sigma, device=x.device, dtype=x.dtype)
        with torch.no_grad():
            if self._baseline is None:
                pyramid = blur_pyramid(x, self.levels, max_blur)
            else:  # two levels: baseline + v (x - baseline)
                pyramid = torch.stack([baseline_images(self._baseline, x, session), x], 1)
        params = torch.ones(B * A, 1, *gen.shape_in, device=x.device, dtype=x.dtype)
        n_canvas = gen.shape_out[0] * gen.shape_out[1]
        reference = area_reference(self.areas, n_canvas, x.device, x.dtype).repeat(B, 1)  # row = image * A + area
        sides = (1.0, -1.0) if self.variant == "dual" else ((1.0,) if self.variant == "preserve" else (-1.0,))
        S = len(sides)
        n = A * S  # rows per image: k = area * S + side
        sign = torch.tensor(sides, device=x.device, dtype=x.dtype)
        total = B * n
        size = check_batch_size(self.batch_size or auto_batch_size(x.device, backward=True, pixels=H * W))
        buf = None
        weight = float(self.area_weight)
        history = {"reward": [], "area_loss": []}
        for t in progress(range(self.steps), desc=self.name, total=self.steps):
            with torch.enable_grad():
                p = params.detach().requires_grad_(True)
                masks, canvas = gen.generate(p)  # (B*A, 1, H, W), (B*A, 1, Hc, Wc)
                m = masks.detach()
                g_masks = torch.zeros_like(m)
                scores = torch.empty(B, n, device=x.device, dtype=x.dtype)
                for start in range(0, total, size):
                    rows = torch.arange(start, min(start + size, total), device=x.device)
                    image, k = rows // n, rows % n
                    mrow = image * A + k // S
                    # keep = m (preserve, side +1) or 1 - m (delete, side -1); reward = sum of side * score:
                    # d reward / d m = d score / d keep for both sides
                    keep = torch.where(sign[k % S].view(-1, 1, 1, 1) > 0, m[mrow], 1 - m[mrow])
                    keep = keep.requires_grad_(True)
                    inputs = apply_pyramid(pyramid, image, keep)
                    if self.jitter and t % 2 == 0:
                        inputs = torch.flip(inputs, dims=(3,))
                    s = scorer(session.forward(inputs), image)
                    g_masks.index_add_(0, mrow, session.grad(s, keep, create_graph=False))
                    scores[image, k] = s.detach().to(x.dtype)
                reward = (scores.view(B, A, S) * sign).sum(2).reshape(B * A)
                sorted_c = canvas.reshape(B * A, -1).sort(dim=1)[0]
                area_loss = ((sorted_c - reference) ** 2).mean(1) * weight
                # energy = reward - area_loss, maximized; the reward's gradient came from the model
                (grad,) = torch.autograd.grad((masks * g_masks).sum() - area_loss.sum(), p)
            history["reward"].append(reward.tolist())
            history["area_loss"].append(area_loss.detach().tolist())
            last = p.detach()
            # SGD on -energy, momentum with dampening = momentum (TorchRay), parameters kept in [0, 1]
            params, buf = momentum_step(params, -grad, buf, lr=self.lr, momentum=self.momentum,
                                        dampening=self.momentum)
            params = params.clamp(0, 1)
            weight *= self.area_growth
        # TorchRay returns the mask of its last iteration, generated before that iteration's update
        masks = m.reshape(B, A, H, W)
        nodes = last.reshape(B, A, *gen.shape_in)
        return Explanation(maps=masks.mean(1, keepdim=True), targets=target.classes, outputs=outputs,
                           lowres=nodes.mean(1),
                           extras={"masks": masks, "params": nodes, "history": history})
