"""`Explanation`: the record that flows from `explain` into `evaluate` and `report`."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .session import Cost


@dataclass
class Explanation:
    """Attribution maps with everything needed to interpret and reproduce them.

    maps: (B, H, W) (or (B, C, H, W) with channels=True), higher = more important, raw sign and scale.
    targets: (B,) class indices explained, or None for a callable target.
    outputs: (B, K) model outputs on the clean images.
    """

    maps: torch.Tensor
    targets: torch.Tensor | None
    method: str
    params: dict = field(default_factory=dict)
    cost: Cost = field(default_factory=Cost)
    outputs: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.maps.shape[0]

    @property
    def probabilities(self) -> torch.Tensor | None:
        """Softmax probability of each explained class on the clean image, when known."""
        if self.outputs is None or self.targets is None or self.outputs.dim() != 2:
            return None
        return self.outputs.softmax(dim=1).gather(1, self.targets[:, None].to(self.outputs.device)).squeeze(1)

    def to_dict(self) -> dict:
        """A JSON-friendly summary (no maps)."""
        params = {k: (v if isinstance(v, (int, float, str, bool, type(None), list, tuple)) else repr(v))
                  for k, v in self.params.items()}
        return {
            "method": self.method,
            "params": params,
            "targets": None if self.targets is None else self.targets.tolist(),
            "cost": self.cost.as_dict(),
        }
