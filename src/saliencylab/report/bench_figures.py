"""Example figures for `saliencylab leaderboard`: a few inputs, their ground truth and every method's map."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from .plots import new_figure
from .render import to_display


def example_grid(images: Sequence[np.ndarray], maps: Sequence, names: Sequence[str], path, *, truth=None,
                 title: str = "") -> Path:
    """Rows: images; columns: the input, the signed ground truth (if given), then one map per method.

    images: (H, W, 3) uint8 pictures; maps: per method, a (k, H, W) tensor or array for the k images.
    Each map is scaled for display on its own (signed maps diverging around 0, others sequential)."""
    k = len(images)
    columns = ["input"] + (["ground truth"] if truth is not None else []) + list(names)
    fig = new_figure(figsize=(1.25 * len(columns), 1.3 * k + 0.4), dpi=100)
    axes = fig.subplots(k, len(columns), squeeze=False)
    for i in range(k):
        panels = [np.asarray(images[i])]
        if truth is not None:
            panels.append(to_display(truth[i], signed=True))
        panels += [to_display(m[i]) for m in maps]
        for j, (ax, panel) in enumerate(zip(axes[i], panels)):
            ax.imshow(panel, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(columns[j], fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    return path
