"""RISE (Petsiuk et al. 2018): randomized input sampling on the perturbation engine.

N random binary grids of s x s cells (a cell is kept with probability p) are upsampled bilinearly
to (s + 1) * ceil(H / s) pixels per side and cropped to H x W at a random shift in
[0, ceil(H / s)) per dimension, as in the authors' code (eclique/RISE, `generate_masks`, which
uses skimage's `resize(order=1, mode="reflect")`: half-pixel centres, mirror reflection at the
border). The saliency of a pixel is sum_k score_k * mask_k / (N * p), with score_k the target's
score (softmax probability by default, as in the paper) on the image with mask k applied.

The same N masks serve every image. Only the low-resolution grids and the shifts (N * (s*s + 2)
numbers) exist up front; a chunk's full-resolution masks are built inside `make_masks` with two
batched matrix products (rows and columns of a fixed interpolation matrix, gathered at the chunk's
shifts), and folded into the saliency maps by the engine's `reduce` callback, so the N masks are
never stored.
"""

from __future__ import annotations

import math

import torch

from ..core.errors import ConfigError
from ..core.explanation import Explanation
from ..perturbation import Perturber
from .base import Method, Param, clean_outputs, register
from .occlusion import check_score


def interpolation_matrix(n: int, size: int, dtype=torch.float64, device=None) -> torch.Tensor:
    """(size, n) matrix R with R @ v = bilinear resize of v from n to size samples.

    skimage's `resize(order=1, mode="reflect")` convention: half-pixel centres (output sample o
    reads the input at (o + 0.5) * n / size - 0.5), mirror reflection about the edge samples
    (index -1 reads sample 1, index n reads sample n - 2).
    """
    o = torch.arange(size, dtype=torch.float64)
    src = (o + 0.5) * n / size - 0.5
    i0 = torch.floor(src)
    t = src - i0
    i0 = i0.long()

    def mirror(i):
        if n == 1:
            return torch.zeros_like(i)
        period = 2 * (n - 1)
        i = i.remainder(period)
        return torch.where(i >= n, period - i, i)

    R = torch.zeros(size, n, dtype=torch.float64)
    R.index_put_((torch.arange(size), mirror(i0)), 1 - t, accumulate=True)
    R.index_put_((torch.arange(size), mirror(i0 + 1)), t, accumulate=True)
    return R.to(device=device, dtype=dtype)


def rise_grids(n: int, cell: int, probability: float, seed: int, size) -> tuple[torch.Tensor, torch.Tensor]:
    """The random part of RISE: binary grids (n, cell, cell) and crop shifts (n, 2) as (dy, dx)."""
    H, W = size
    g = torch.Generator(device="cpu").manual_seed(seed)
    grids = (torch.rand(n, cell, cell, generator=g, dtype=torch.float64) < probability).to(torch.float64)
    cell_h, cell_w = math.ceil(H / cell), math.ceil(W / cell)
    shifts = torch.stack([torch.randint(0, cell_h, (n,), generator=g), torch.randint(0, cell_w, (n,), generator=g)], 1)
    return grids, shifts


class RiseMasks:
    """Builds the full-resolution RISE masks k (any rows, any order) from the grids and shifts."""

    def __init__(self, grids: torch.Tensor, shifts: torch.Tensor, size, dtype=torch.float32, device=None):
        H, W = size
        cell = grids.shape[-1]
        up_h, up_w = (cell + 1) * math.ceil(H / cell), (cell + 1) * math.ceil(W / cell)
        self.grids = grids.to(device=device, dtype=dtype)
        self.shifts = shifts.to(device)
        self.rows = interpolation_matrix(cell, up_h, dtype, device)  # (up_h, cell)
        self.cols = interpolation_matrix(cell, up_w, dtype, device)  # (up_w, cell)
        self.ys = torch.arange(H, device=device)
        self.xs = torch.arange(W, device=device)

    def __call__(self, k: torch.Tensor) -> torch.Tensor:
        """Masks (N, 1, H, W) for mask indices k (N,)."""
        shift = self.shifts[k]
        rows = self.rows[shift[:, :1] + self.ys]  # (N, H, cell): the cropped rows of the upsampling
        cols = self.cols[shift[:, 1:] + self.xs]  # (N, W, cell)
        return torch.bmm(torch.bmm(rows, self.grids[k]), cols.transpose(1, 2))[:, None]


def check_int(value, what: str, minimum: int = 1) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ConfigError(f"{what} must be an int >= {minimum}, got {value!r}")
    return value


@register
class RISE(Method):
    """The masks are drawn from `seed` alone and shared by every image, so an image's map does not
    depend on the other images of its call (batch- and shard-invariant without image keys)."""

    name = "rise"
    description = "RISE (Petsiuk et al.): score-weighted average of random upsampled binary masks."
    input_space = False
    uses_gradients = False
    stochastic = True

    masks = Param(2000, "number of random masks")
    cell = Param(7, "grid cells per side of a mask")
    probability = Param(0.5, "probability that a cell is kept")
    score = Param("softmax", "the score weighting each mask: softmax, logit, log_softmax")
    baseline = Param("zero", "what masked pixels become: a baseline name, number, tensor or Baseline")
    seed = Param(0, "seed of the masks (shared by all images)")
    batch_size = Param(None, "rows per forward pass; None: automatic for the device")

    def check(self):
        check_int(self.masks, "masks")
        check_int(self.cell, "cell")
        check_int(self.seed, "seed", 0)
        p = self.probability
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 < p <= 1:
            raise ConfigError(f"probability must be a number in (0, 1], got {p!r}")
        check_score(self.score)
        self._perturber = Perturber(self.baseline, self.score, self.batch_size)

    def compute(self, session, x, target):
        target, outputs = clean_outputs(session, x, target)
        B, _, H, W = x.shape
        grids, shifts = rise_grids(self.masks, self.cell, float(self.probability), self.seed, (H, W))
        build = RiseMasks(grids, shifts, (H, W), x.dtype, x.device)
        saliency = torch.zeros(B, H, W, device=x.device, dtype=x.dtype)

        def make_masks(image, k):
            return build(k)

        def reduce(scores, image, k, masks):
            # saliency[image[r]] += scores[r] * masks[r], as one (images x rows) @ (rows x pixels)
            # product over the chunk's few images (index_add_ of full maps is several times slower)
            lo, hi = int(image.min()), int(image.max()) + 1
            weights = torch.zeros(hi - lo, len(image), device=x.device, dtype=x.dtype)
            weights[image - lo, torch.arange(len(image), device=x.device)] = scores.to(x.dtype)
            saliency[lo:hi] += (weights @ masks.reshape(len(image), H * W)).view(hi - lo, H, W)

        self._perturber.scores(session, x, target, self.masks, make_masks, reduce=reduce, desc=self.name)
        return Explanation(maps=saliency / (self.masks * float(self.probability)), targets=target.classes,
                           outputs=outputs)
