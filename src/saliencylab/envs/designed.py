"""Designed environments: data and hand-set weights, so the pixels the network uses are known.

Pixels are black (exact zeros) or pure red / green / blue (one channel at 1), so designed detectors
are exact. The truth of a pixel is its Shapley value for the target logit with black as the absent
value, computed from the design (and checked against the network by the tests):

- `dominant_colour`: the logit is a sum over pixels, so each pixel's truth is its own term.
- `pattern_at_location`: the target logit is 1 exactly when the whole target pattern is present
  (a unanimity game on its pixels), so each of its pixels gets 1 / (pattern size).
- `null_player`: as dominant_colour on the left half; the right half has zero weights.

In every design the target logit equals `truth.sum()` (completeness).
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn
import torch.nn.functional as F

from .base import Design, EnvBatch, register

COLOURS = ("red", "green", "blue")
CELL = 2  # colour pixels come in CELL x CELL squares


def _one_hot_image(index: torch.Tensor) -> torch.Tensor:
    """(n, H, W) colour indices (3 = black) -> (n, 3, H, W) float32 images."""
    return F.one_hot(index, 4)[..., :3].permute(0, 3, 1, 2).to(torch.float32).contiguous()


# -- dominant colour ---------------------------------------------------------------------------
def _colour_cells(n: int, rows: int, cols: int, other: tuple[int, int], margin: tuple[int, int],
                  g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Scatter colour cells on a rows x cols grid: every colour gets a count in `other`, then the
    dominant one (uniform) gets max(others) + a count in `margin`. Returns (n, rows*CELL, cols*CELL)
    colour indices (3 = black) and the dominant colour (n,)."""
    k = len(COLOURS)
    dominant = torch.randint(0, k, (n,), generator=g)
    counts = torch.randint(other[0], other[1] + 1, (n, k), generator=g)
    is_dom = F.one_hot(dominant, k).bool()
    best_other = counts.masked_fill(is_dom, -1).amax(1)
    extra = torch.randint(margin[0], margin[1] + 1, (n,), generator=g)
    counts = torch.where(is_dom, (best_other + extra)[:, None], counts)
    cells = rows * cols
    rank = torch.rand(n, cells, generator=g).argsort(1).argsort(1)          # a random order of the cells
    colour = (rank[:, :, None] >= counts.cumsum(1)[:, None, :]).sum(-1)    # first counts[0] cells red, ...
    grid = colour.view(n, rows, cols)
    return grid.repeat_interleave(CELL, 1).repeat_interleave(CELL, 2), dominant


class ColourCountNet(nn.Module):
    """Bias-free 1x1 colour detectors + ReLU, a fixed spatial window, sum pooling to per-colour pixel
    counts, and a bias-free readout logit_k = unit * (count_k - mean of the other counts).

    Additive over pixels and positively homogeneous: gradient x input and integrated gradients from
    a black baseline recover each pixel's term exactly. The detectors inhibit the other channels
    (red: (1, -1, -1)), so a plain gradient summed over channels is -truth on coloured pixels: its
    sign says nothing about the pixel's effect.
    """

    def __init__(self, window: torch.Tensor, unit: float):
        super().__init__()
        k = len(COLOURS)
        self.detect = nn.Conv2d(3, k, 1, bias=False)
        self.relu = nn.ReLU()
        self.register_buffer("window", window.to(torch.float32)[None, None])
        self.readout = nn.Linear(k, k, bias=False)
        with torch.no_grad():
            self.detect.weight.copy_((2 * torch.eye(k) - 1)[:, :, None, None])   # red: (1, -1, -1)
            self.readout.weight.copy_(unit * (torch.eye(k) * k / (k - 1) - 1 / (k - 1)))

    def forward(self, x):
        counts = (self.relu(self.detect(x)) * self.window).sum((2, 3))
        return self.readout(counts)


class _ColourCount(Design):
    num_classes = len(COLOURS)
    class_names = COLOURS
    unit: ClassVar[float] = 1 / 16   # a power of two: logits and truth are exact in float32

    def _truth(self, index: torch.Tensor, target: torch.Tensor, counted: torch.Tensor) -> torch.Tensor:
        k = len(COLOURS)
        coloured = index < k
        own = index == target[:, None, None]
        truth = own.to(torch.float32) * self.unit - (coloured & ~own).to(torch.float32) * (self.unit / (k - 1))
        return truth * counted


@register
class DominantColour(_ColourCount):
    name = "dominant_colour"
    description = ("Which colour has the most pixels? Signed truth: the target colour's pixels raise the "
                   "logit, the other colours' lower it, the black background is inert.")
    other: ClassVar[tuple[int, int]] = (8, 24)   # cells per competing colour (of 256)
    margin: ClassVar[tuple[int, int]] = (4, 16)  # extra cells of the dominant colour

    def _sample(self, n, g):
        cells = self.image_size // CELL
        index, dominant = _colour_cells(n, cells, cells, self.other, self.margin, g)
        everywhere = torch.ones(self.image_size, self.image_size)
        null = torch.zeros(n, self.image_size, self.image_size, dtype=torch.bool)
        return EnvBatch(x=_one_hot_image(index), labels=dominant, truth=self._truth(index, dominant, everywhere),
                        null=null)

    def designed_model(self):
        return ColourCountNet(torch.ones(self.image_size, self.image_size), self.unit)


@register
class NullPlayer(_ColourCount):
    name = "null_player"
    description = ("Dominant colour of the left half; the right half holds decoys from the same distribution "
                   "that the network provably ignores (zero weights).")
    other: ClassVar[tuple[int, int]] = (4, 12)   # cells per competing colour (of 128 per half)
    margin: ClassVar[tuple[int, int]] = (2, 8)

    def left(self) -> torch.Tensor:
        s = self.image_size
        return (torch.arange(s) < s // 2).to(torch.float32).expand(s, s)

    def _sample(self, n, g):
        rows, cols = self.image_size // CELL, self.image_size // (2 * CELL)
        left, dominant = _colour_cells(n, rows, cols, self.other, self.margin, g)
        right, _ = _colour_cells(n, rows, cols, self.other, self.margin, g)   # decoys, independent label
        index = torch.cat([left, right], 2)
        counted = self.left()
        null = (counted == 0).expand(n, -1, -1).clone()
        return EnvBatch(x=_one_hot_image(index), labels=dominant, truth=self._truth(index, dominant, counted),
                        null=null)

    def designed_model(self):
        return ColourCountNet(self.left(), self.unit)


# -- pattern at location -----------------------------------------------------------------------
def _patterns() -> torch.Tensor:
    """Four 5x5 binary shapes, each spanning its full 5x5 box; no shape equals a crop of a shifted
    other one, so an exact detector fires only on its own shape."""
    p = torch.zeros(4, 5, 5, dtype=torch.bool)
    p[0, 2, :] = p[0, :, 2] = True                                   # plus
    p[1] = torch.eye(5, dtype=torch.bool) | torch.eye(5, dtype=torch.bool).flip(1)   # x
    p[2, [0, 4], :] = p[2, :, [0, 4]] = True                         # hollow square
    p[3, [0, 2, 4], :] = True                                        # three horizontal bars
    return p


PATTERNS = _patterns()
PATTERN = PATTERNS.shape[-1]


class PatternDetectorNet(nn.Module):
    """Exact 5x5 shape detectors on the channel sum: +2 on the shape's pixels, -2 off them, bias
    1 - 2|shape|, so after ReLU a window scores 1 iff it shows exactly the shape on black (any
    missing or extra pixel gives <= -1). A fixed spatial weight keeps only windows inside the
    designated region; sum pooling gives the logits."""

    def __init__(self, region: int, image_size: int):
        super().__init__()
        k = PATTERNS.shape[0]
        self.detect = nn.Conv2d(3, k, PATTERN)
        self.relu = nn.ReLU()
        out = image_size - PATTERN + 1
        inside = torch.arange(out) <= region - PATTERN
        self.register_buffer("window", (inside[:, None] & inside[None, :]).to(torch.float32)[None, None])
        with torch.no_grad():
            signs = PATTERNS.to(torch.float32) * 2 - 1
            self.detect.weight.copy_(2 * signs[:, None].expand(k, 3, PATTERN, PATTERN))
            self.detect.bias.copy_(1 - 2 * PATTERNS.flatten(1).sum(1).to(torch.float32))

    def forward(self, x):
        return (self.relu(self.detect(x)) * self.window).sum((2, 3))


@register
class PatternAtLocation(Design):
    name = "pattern_at_location"
    description = ("Which shape is in the top-left quadrant? The same shapes appear elsewhere as distractors; "
                   "only the target shape's pixels matter, everything outside the quadrant is ignored.")
    num_classes = PATTERNS.shape[0]
    class_names = ("plus", "x", "square", "bars")
    distractor_rate: ClassVar[float] = 0.75   # chance of a shape in each of the other quadrants

    def _sample(self, n, g):
        s, q = self.image_size, self.image_size // 2
        index = torch.full((n, s, s), len(COLOURS))
        truth = torch.zeros(n, s, s)
        arange = torch.arange(PATTERN)
        b = torch.arange(n)[:, None, None]
        sizes = PATTERNS.flatten(1).sum(1).to(torch.float32)
        labels = None
        for qy, qx in ((0, 0), (0, q), (q, 0), (q, q)):   # four quadrants; the first is the region
            shape = torch.randint(0, PATTERNS.shape[0], (n,), generator=g)
            oy, ox = torch.randint(0, q - PATTERN + 1, (2, n), generator=g)
            colour = torch.randint(0, len(COLOURS), (n,), generator=g)
            present = torch.rand(n, generator=g) < self.distractor_rate
            rows = qy + oy[:, None, None] + arange[None, :, None]
            cols = qx + ox[:, None, None] + arange[None, None, :]
            if labels is None:
                labels, present = shape, torch.ones(n, dtype=torch.bool)
                truth[b, rows, cols] = PATTERNS[shape].to(torch.float32) / sizes[shape][:, None, None]
            stamp = PATTERNS[shape] & present[:, None, None]
            index[b, rows, cols] = torch.where(stamp, colour[:, None, None], index[b, rows, cols])
        region = torch.zeros(s, s, dtype=torch.bool)
        region[:q, :q] = True
        return EnvBatch(x=_one_hot_image(index), labels=labels, truth=truth, null=(~region).expand(n, -1, -1).clone())

    def designed_model(self):
        return PatternDetectorNet(self.image_size // 2, self.image_size)
