"""Occlusion (Zeiler & Fergus 2014) on the perturbation engine, with Captum's semantics.

A window of `window` pixels (all channels) slides over the image with step `stride`; each position
is replaced by the baseline and the target's score is recorded. A pixel's attribution is the mean,
over the windows that cover it, of score(x) - score(x with the window occluded), the same for every
channel: exactly `captum.attr.Occlusion(model).attribute(x, sliding_window_shapes=(C, h, w),
strides=(C, sh, sw), baselines=0, target=...)`.

Window positions follow Captum: per dimension, ceil((size - window) / stride) + 1 windows start at
0, stride, 2 * stride, ...; when the stride does not divide size - window the last window starts
less than `window` from the border and is cut off by it (it covers fewer pixels, it is not moved
back inside the image). A window larger than the image is clamped to the image (one position in that
dimension), so the defaults also work on small images. The stride may not exceed the window (Captum's
rule), so every pixel is covered at least once.

Cost: one clean forward per image (which also resolves the target) and one forward per window per
image, all through `Perturber.scores` in chunks of `batch_size` rows; no backward pass. The per-pixel
sums and cover counts come from the (B, windows) score matrix in one transposed convolution with a
box kernel each, so nothing per window is ever stored at full resolution.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..core.errors import ConfigError
from ..core.explanation import Explanation
from ..perturbation import Perturber
from ..core.targets import SCORES
from .base import Method, Param, clean_outputs, register


def as_pair(value, what: str) -> tuple[int, int]:
    """An int or a pair of ints, all positive, as (h, w)."""
    pair = tuple(value) if isinstance(value, (tuple, list)) else (value, value)
    if len(pair) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in pair):
        raise ConfigError(f"{what} must be a positive int or a pair of positive ints (h, w), got {value!r}")
    return pair


def check_score(score) -> str:
    if score not in SCORES:
        raise ConfigError(f"unknown score {score!r}; choose one of {', '.join(SCORES)}")
    return score


def window_offsets(size: int, window: int, stride: int) -> torch.Tensor:
    """Captum's window starts in one dimension: ceil((size - window) / stride) + 1 of them."""
    count = math.ceil((size - window) / stride) + 1
    return torch.arange(count) * stride


def occlusion_masks(tops: torch.Tensor, lefts: torch.Tensor, window: tuple[int, int], size) -> torch.Tensor:
    """Keep-masks (N, 1, H, W), False inside the window at (tops[i], lefts[i]) (cut at the border)."""
    H, W = size
    ys = torch.arange(H, device=tops.device)
    xs = torch.arange(W, device=lefts.device)
    in_rows = (ys >= tops[:, None]) & (ys < tops[:, None] + window[0])
    in_cols = (xs >= lefts[:, None]) & (xs < lefts[:, None] + window[1])
    return ~(in_rows[:, :, None] & in_cols[:, None, :])[:, None]


def spread_windows(values: torch.Tensor, window: tuple[int, int], stride: tuple[int, int], size) -> torch.Tensor:
    """Sum, at every pixel, the values (B, nh, nw) of the windows that cover it: (B, H, W).

    A transposed convolution with a box kernel: window (i, j) adds its value to the pixels
    [i*sh, i*sh + h) x [j*sw, j*sw + w); the overhang past the border is cropped.
    """
    kernel = torch.ones(1, 1, *window, device=values.device, dtype=values.dtype)
    out = F.conv_transpose2d(values[:, None], kernel, stride=stride)
    return out[:, 0, : size[0], : size[1]]


@register
class Occlusion(Method):
    name = "occlusion"
    description = "Occlusion (Zeiler & Fergus): mean score drop over the sliding windows covering a pixel (Captum's)."
    uses_gradients = False

    window = Param(16, "window size in pixels: an int or (h, w); clamped to the image")
    stride = Param(8, "step between windows: an int or (h, w), at most the window")
    baseline = Param("zero", "what occluded pixels become: a baseline name, number, tensor or Baseline")
    score = Param("logit", "the score whose drop is measured: logit, softmax, log_softmax")
    batch_size = Param(None, "rows per forward pass; None: automatic for the device")

    def check(self):
        self._window = as_pair(self.window, "window")
        self._stride = as_pair(self.stride, "stride")
        if any(s > w for s, w in zip(self._stride, self._window)):
            raise ConfigError(f"stride {self.stride!r} may not exceed the window {self.window!r}: pixels between "
                              "windows would never be occluded")
        check_score(self.score)
        self._perturber = Perturber(self.baseline, self.score, self.batch_size)

    def compute(self, session, x, target):
        target, outputs = clean_outputs(session, x, target)
        B, C, H, W = x.shape
        window = (min(self._window[0], H), min(self._window[1], W))  # clamped: one position
        tops = window_offsets(H, window[0], self._stride[0]).to(x.device)
        lefts = window_offsets(W, window[1], self._stride[1]).to(x.device)
        nh, nw = len(tops), len(lefts)

        def make_masks(image, k):
            return occlusion_masks(tops[k // nw], lefts[k % nw], window, (H, W))

        scores = self._perturber.scores(session, x, target, nh * nw, make_masks, desc=self.name)
        clean = target.with_score(self.score)(outputs).to(scores.dtype)
        drops = (clean[:, None] - scores).view(B, nh, nw)
        sums = spread_windows(drops, window, self._stride, (H, W))
        counts = spread_windows(torch.ones_like(drops[:1]), window, self._stride, (H, W))
        maps = (sums / counts)[:, None].expand(B, C, H, W).contiguous()
        return Explanation(maps=maps, targets=target.classes, outputs=outputs)
