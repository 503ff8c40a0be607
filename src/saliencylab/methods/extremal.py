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
mask generator. The map is the mean of the area levels' masks (higher = more important).
"""

from __future__ import annotations

import math

import torch

from ..baselines import Blur
from ..core.errors import ConfigError
from ..perturbation import Perturber
from .base import Method, check_batch_size, register

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

    def __init__(self, model, *, areas=(0.1,), steps: int = 800, step: int = 7, sigma: float = 21.0,
                 variant: str = "preserve", baseline=None, lr: float = 0.01, momentum: float = 0.9,
                 area_weight: float = 300.0, area_growth: float = 1.0035, jitter: bool = True,
                 score: str = "logit", batch_size: int = 10):
        areas = (float(areas),) if isinstance(areas, (int, float)) else tuple(float(a) for a in areas)
        super().__init__(model, areas=areas, steps=steps, step=step, sigma=sigma, variant=variant,
                         baseline=Blur(sigma=20.0) if baseline is None else baseline, lr=lr, momentum=momentum,
                         area_weight=area_weight, area_growth=area_growth, jitter=jitter, score=score,
                         batch_size=batch_size)
        if not areas or not all(0 < a <= 1 for a in areas):
            raise ConfigError(f"areas must be fractions in (0, 1], got {areas!r}")
        for key in ("steps", "step"):
            v = getattr(self, key)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ConfigError(f"{key} must be a positive int, got {v!r}")
        if variant not in VARIANTS:
            raise ConfigError(f"unknown variant '{variant}'; choose one of {', '.join(VARIANTS)}")
        if sigma <= 0:
            raise ConfigError(f"sigma must be positive, got {sigma!r}")
        check_batch_size(batch_size)
        self._perturber = Perturber(self.baseline, score, batch_size)

    def _attribute(self, session, x, target):
        target = self.resolve(session, x)
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
        self.last_history = {"reward": [], "area_loss": []}
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
            self.last_history["reward"].append(reward.tolist())
            self.last_history["area_loss"].append(area_loss.detach().tolist())
            descent = -grad  # SGD minimizes -energy
            buf = descent.clone() if buf is None else self.momentum * buf + (1 - self.momentum) * descent
            params = (params - self.lr * buf).clamp(0, 1)
            weight *= self.area_growth
        with torch.no_grad():
            masks = gen(params).reshape(B, A, H, W)
        self.last_masks = masks  # per area level, 1 = the region that matters
        self.last_lowres = params.reshape(B, A, *gen.shape_in)
        return masks.mean(1, keepdim=True)
