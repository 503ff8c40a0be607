"""Extremal perturbation (Fong, Patrick & Vedaldi 2019), batched over images and area levels.

For each fixed area a, a smooth mask m of area ~a is optimized so that keeping only m (the rest
replaced by a blurred image) preserves the target's score ("preserve"), deleting m destroys it
("delete"), or both ("dual"). Following TorchRay's implementation:
- the mask is generated from a coarse parameter grid (one node every `step` pixels) by a smooth
  max (softmax-weighted, coldness 20) of radial kernels exp(-2 max(0, d/sigma - 1/2)^2) centred on
  the nodes and scaled by their values, so masks are smooth by construction;
- the area constraint is a penalty: the squared distance between the sorted mask values and the
  sorted ideal mask with a fraction a of ones, weight 300 growing by 1.0035 per step;
- SGD with momentum 0.9 (dampening 0.9), learning rate 0.01, parameters clamped to [0, 1];
- jitter: the perturbed image is flipped horizontally every other step.
Deviation: TorchRay blends between levels of an 8-level blur pyramid; here the mask blends the image
with one blurred image (sigma 20, TorchRay's maximal blur) through the perturbation engine.

All (image, area[, preserve/delete]) rows of a step go through `Perturber.scores_and_grads` in
chunks of `batch_size`; the gradients with respect to the masks are then pulled back through the
mask generator. The map is the mean of the area levels' masks (higher = more important). Images and
area levels are independent problems (per-row momentum and area weight), so a row's mask does not
depend on its batch. `explain(...)` returns lowres = the generator's node values averaged over the
area levels (B, h, w), and extras "masks" (B, A, H, W) per area level (1 = the region that matters),
"params" (B, A, h, w) the node values, "history" ("reward", "area_loss" per step and row).
"""

from __future__ import annotations

import math

import torch

from ..baselines import Blur
from ..core.errors import ConfigError
from ..core.explanation import Explanation
from ..perturbation import Perturber
from .base import Method, Param, check_batch_size, clean_outputs, register
from .optimizers import momentum_step

VARIANTS = ("preserve", "delete", "dual")


class SmoothMaskGenerator:
    """Smooth masks (n, 1, H, W) from node parameters (n, 1, ceil(H/step), ceil(W/step))."""

    def __init__(self, size, step: int, sigma: float, coldness: float = 20.0, device=None, dtype=torch.float32):
        H, W = size
        self.size, self.step, self.sigma, self.coldness = (H, W), step, float(sigma), coldness
        self.shape_in = (math.ceil(H / step), math.ceil(W / step))
        self.radius = 1 + math.ceil(sigma / step)
        r = self.radius
        ys = torch.arange(H, device=device, dtype=dtype)
        xs = torch.arange(W, device=device, dtype=dtype)
        cy, cx = torch.div(ys, step, rounding_mode="floor"), torch.div(xs, step, rounding_mode="floor")
        offsets = torch.arange(-r, r + 1, device=device, dtype=dtype)
        centre = (step - 1) / 2
        # distance from pixel (y, x) to the node at (cell + offset) * step + centre, per offset pair
        dy = (cy[None, :] + offsets[:, None]) * step + centre - ys[None, :]  # (2r+1, H)
        dx = (cx[None, :] + offsets[:, None]) * step + centre - xs[None, :]  # (2r+1, W)
        dist = torch.sqrt(dy[:, None, :, None] ** 2 + dx[None, :, None, :] ** 2)  # (2r+1, 2r+1, H, W)
        z = dist / self.sigma
        self.weight = torch.exp(-2 * (z - 0.5).clamp(min=0) ** 2).reshape(1, (2 * r + 1) ** 2, H, W)

    def __call__(self, params: torch.Tensor) -> torch.Tensor:
        n = params.shape[0]
        H, W = self.size
        k = 2 * self.radius + 1
        vals = torch.nn.functional.unfold(params, k, padding=self.radius)  # (n, k*k, h*w)
        vals = vals.reshape(n, k * k, *self.shape_in)
        vals = vals.repeat_interleave(self.step, 2).repeat_interleave(self.step, 3)[..., :H, :W]
        v = self.weight * vals
        mask = (v * torch.softmax(self.coldness * v, dim=1)).sum(1, keepdim=True)
        return mask.clamp(0, 1)


def area_reference(areas, n_pixels: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """The sorted ideal masks: (A, n_pixels) with a fraction `area` of ones at the end."""
    ref = torch.ones(len(areas), n_pixels, device=device, dtype=dtype)
    for i, a in enumerate(areas):
        ref[i, : int(n_pixels * (1 - a))] = 0
    return ref


@register
class ExtremalPerturbation(Method):
    name = "extremal_perturbation"
    description = "Extremal perturbation: smooth masks of fixed areas that best preserve (or delete) the score."
    stochastic = False  # no random draws: the jitter is a deterministic flip every other step

    areas = Param((0.1,), "mask areas (fractions of the image), one mask per area level")
    steps = Param(800, "optimizer steps")
    step = Param(7, "pixels between the mask generator's nodes")
    sigma = Param(21.0, "radius of the generator's kernels (pixels)")
    variant = Param("preserve", "'preserve', 'delete' or 'dual'")
    baseline = Param(None, "what removed pixels become (None: blur, sigma 20)")
    lr = Param(0.01, "learning rate")
    momentum = Param(0.9, "SGD momentum (dampening equal to it, as TorchRay)")
    area_weight = Param(300.0, "weight of the area penalty")
    area_growth = Param(1.0035, "growth of the area weight per step")
    jitter = Param(True, "flip the perturbed image horizontally every other step")
    score = Param("logit", "score explained: 'logit', 'softmax' or 'log_softmax'")
    batch_size = Param(10, "rows per pass (None: picked for the device)")

    def check(self):
        areas = self.params.get("areas", (0.1,))
        try:
            self.areas = (float(areas),) if isinstance(areas, (int, float)) else tuple(float(a) for a in areas)
        except (TypeError, ValueError):
            raise ConfigError(f"areas must be fractions in (0, 1], got {areas!r}") from None
        if not self.areas or not all(0 < a <= 1 for a in self.areas):
            raise ConfigError(f"areas must be fractions in (0, 1], got {areas!r}")
        for key in ("steps", "step"):
            v = getattr(self, key)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ConfigError(f"{key} must be a positive int, got {v!r}")
        if self.variant not in VARIANTS:
            raise ConfigError(f"unknown variant '{self.variant}'; choose one of {', '.join(VARIANTS)}")
        if self.sigma <= 0:
            raise ConfigError(f"sigma must be positive, got {self.sigma!r}")
        if self.batch_size is not None:
            check_batch_size(self.batch_size)
        self._perturber = Perturber(Blur(sigma=20.0) if self.baseline is None else self.baseline, self.score,
                                    self.batch_size)

    def compute(self, session, x, target):
        target, outputs = clean_outputs(session, x, target)
        B, _, H, W = x.shape
        A = len(self.areas)
        step = min(self.step, H, W)
        gen = SmoothMaskGenerator((H, W), step, self.sigma, device=x.device, dtype=x.dtype)
        params = torch.ones(B * A, 1, *gen.shape_in, device=x.device, dtype=x.dtype)
        reference = area_reference(self.areas, H * W, x.device, x.dtype).repeat(B, 1)  # row = image * A + area
        sides = (1.0, -1.0) if self.variant == "dual" else ((1.0,) if self.variant == "preserve" else (-1.0,))
        S = len(sides)
        n = A * S  # rows per image: k = area * S + side
        sign = torch.tensor(sides, device=x.device, dtype=x.dtype)
        buf = None
        weight = float(self.area_weight)
        history = {"reward": [], "area_loss": []}
        for t in range(self.steps):
            with torch.enable_grad():
                p = params.detach().requires_grad_(True)
                masks = gen(p)  # (B*A, 1, H, W)
                m = masks.detach()
                g_masks = torch.zeros_like(m)

                def make(image, k):
                    mm = m[image * A + k // S]
                    return torch.where(sign[k % S].view(-1, 1, 1, 1) > 0, mm, 1 - mm)

                def reduce(scores, grads, image, k, keep):
                    # reward = sum over sides of side * score(keep), keep = m (preserve, side +1) or
                    # 1 - m (delete, side -1): d reward / d m = d score / d keep in both cases
                    g_masks.index_add_(0, image * A + k // S, grads)

                flip = self.jitter and t % 2 == 0
                scores = self._perturber.scores_and_grads(
                    session, x, target, n, make, reduce=reduce,
                    perturb=(lambda inputs, image, k: torch.flip(inputs, dims=(3,))) if flip else None,
                    desc=self.name)
                reward = (scores.view(B, A, S) * sign).sum(2).reshape(B * A)
                sorted_m = masks.reshape(B * A, -1).sort(dim=1)[0]
                area_loss = ((sorted_m - reference) ** 2).mean(1) * weight
                # energy = reward - area_loss, maximized; the reward's gradient came from the engine
                (grad,) = torch.autograd.grad((masks * g_masks).sum() - area_loss.sum(), p)
            history["reward"].append(reward.tolist())
            history["area_loss"].append(area_loss.detach().tolist())
            # SGD on -energy, momentum with dampening = momentum (TorchRay), parameters kept in [0, 1]
            params, buf = momentum_step(params, -grad, buf, lr=self.lr, momentum=self.momentum,
                                        dampening=self.momentum)
            params = params.clamp(0, 1)
            weight *= self.area_growth
        with torch.no_grad():
            masks = gen(params).reshape(B, A, H, W)
        nodes = params.reshape(B, A, *gen.shape_in)
        return Explanation(maps=masks.mean(1, keepdim=True), targets=target.classes, outputs=outputs,
                           lowres=nodes.mean(1),
                           extras={"masks": masks, "params": nodes, "history": history})
