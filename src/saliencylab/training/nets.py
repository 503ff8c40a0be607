"""A small ReLU CNN for the shortcut environment and other 32-64 px images; trains in seconds on a CPU.

The last convolution block is the module named `features` (convolution + ReLU), so Grad-CAM and the
guidance losses can name it: `layer="features"`. No batch norm, so a guided step's explanation of one
image does not depend on the others in its batch (the authors' ResNet-50 has batch norm; see
`saliencylab.training.guidance_loss` on that coupling).
"""

from __future__ import annotations

import torch
from torch import nn

from ..core.errors import ConfigError

__all__ = ["SmallCNN", "small_cnn"]


class SmallCNN(nn.Module):
    """conv-relu-pool, conv-relu-pool, `features` (conv-relu), global average pool, linear.

    Input (B, in_channels, H, W) with H, W >= 8 (two 2x poolings); `features` runs at H/4 x W/4.
    """

    def __init__(self, num_classes: int = 2, width: int = 16, in_channels: int = 3):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.features = nn.Sequential(nn.Conv2d(2 * width, 2 * width, 3, padding=1), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pool(self.features(self.stem(x))).flatten(1))


def small_cnn(num_classes: int = 2, width: int = 16, in_channels: int = 3, seed: int | None = None) -> SmallCNN:
    """A `SmallCNN`; with `seed`, its initial weights depend only on the seed (the global RNG is left alone)."""
    for name, value in (("num_classes", num_classes), ("width", width), ("in_channels", in_channels)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"small_cnn: {name} must be a positive integer, got {value!r}")
    if num_classes < 2:
        raise ConfigError(f"small_cnn: num_classes must be at least 2, got {num_classes}")
    if seed is None:
        return SmallCNN(num_classes, width, in_channels)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return SmallCNN(num_classes, width, in_channels)
