"""What generation and composition return: Patches, Suite, and the constants they share."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from ...core.session import Cost

AXIOMS = ("class_sensitivity", "null_player", "symmetry")
DESCRIPTIONS = {
    "class_sensitivity": "two patches of different classes: each class's map must leave the other patch out",
    "null_player": "a target patch plus a noise patch the model ignores: the noise patch gets no attribution",
    "symmetry": "the same patch twice: both copies must get equal attribution",
}

_FORMAT = 1
AUTHORS_PATCH_FRACTION = 86 / 224  # the authors' 86 px patches on 224 px images


@dataclass
class Patches:
    """Generated patches: pixels in [0, 1], one per class."""

    patches: torch.Tensor  # (P, 3, s, s)
    classes: torch.Tensor  # (P,) long
    probabilities: torch.Tensor  # (P,) min held-out softmax probability of the class, patch alone
    converged: torch.Tensor  # (P,) bool: probability > threshold and interaction < independence
    cost: Cost
    interaction: torch.Tensor | None = None  # (P,) max held-out tanh(|dz| / min|z|) on the partner class
    probabilities_mean: torch.Tensor | None = None  # (P,) mean held-out probability
    steps: int = 0  # optimization steps run
    image_size: int = 224
    threshold: float = 0.94
    params: dict = field(default_factory=dict)
    key: str = ""
    from_cache: bool = False
    normalize: Callable | None = field(default=None, repr=False)  # not cached; set by generate_patches

    @property
    def patch_size(self) -> int:
        return int(self.patches.shape[-1])

    def __len__(self) -> int:
        return int(self.patches.shape[0])


@dataclass
class Suite:
    """Composed test images with known answers. Kinds are contiguous, in AXIOMS order.

    `region_classes[k, r]` is the class whose patch fills region r of image k (-1: the null patch);
    `targets[k] = region_classes[k, 0]` is the class explained first (class sensitivity images are
    also explained for `region_classes[k, 1]`).
    """

    x: torch.Tensor  # (N, 3, H, W) in the model's input space
    pixels: torch.Tensor  # (N, 3, H, W) in [0, 1]
    targets: torch.Tensor  # (N,) long
    region_classes: torch.Tensor  # (N, 2) long
    regions: torch.Tensor  # (N, 2, H, W) bool
    boxes: torch.Tensor  # (N, 2, 4) long: y0, x0, y1, x1 (exclusive)
    kind: list  # (N,) axiom name per image
    interaction: torch.Tensor  # (N,) measured relative interaction per image (see make_suite)
    independence: dict  # max changes per kind
    patch_size: int = 0

    def indices(self, kind: str) -> torch.Tensor:
        return torch.tensor([i for i, k in enumerate(self.kind) if k == kind], dtype=torch.long)

    def __len__(self) -> int:
        return int(self.x.shape[0])
