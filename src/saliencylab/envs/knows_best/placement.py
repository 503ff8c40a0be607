"""Placement and composition: non-overlapping patch positions (the authors' placer), noise backgrounds."""

from __future__ import annotations

from typing import Sequence

import torch


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
