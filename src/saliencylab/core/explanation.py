"""`Explanation`: the record a method returns, and that flows from `explain` into `evaluate` and `report`."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .session import Cost
from .validation import numpy_as_tensor


def jsonable(value):
    """A JSON-friendly stand-in for a parameter value (tensors become their shape, objects their repr)."""
    if isinstance(value, (int, float, str, bool, type(None))):
        return value
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    value = numpy_as_tensor(value)  # arrays like tensors: by content (repr cuts large arrays to "...")
    if isinstance(value, torch.Tensor):
        # the content digest keeps two data tensors of the same shape apart in a result's key
        import hashlib

        data = value.detach().to("cpu").contiguous().reshape(-1)
        digest = hashlib.sha1(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"").hexdigest()[:12]
        return f"tensor{tuple(value.shape)}#{digest}"
    return repr(value)


@dataclass
class Explanation:
    """Attribution maps with everything needed to interpret and reproduce them.

    maps: (B, H, W) (or (B, C, H, W) with channels=True), higher = more important, raw sign and scale;
        detached, unless computed with `create_graph=True` (then they carry gradient to the parameters).
    targets: (B,) class indices explained, or None for a callable target.
    outputs: (B, K) model outputs on the clean images.
    lowres: the maps at the method's own resolution (a layer's grid, a mask's node grid), when it has one.
    extras: what else the method computed, by name (the layer used, I-GOS masks and history, SAG
        graphs, IBA capacity, ...): see each method's docstring.
    image_ids: the caller's image ids (the keys of the call's randomness), when given.
    """

    maps: torch.Tensor
    targets: torch.Tensor | None = None
    method: str = ""
    params: dict = field(default_factory=dict)
    cost: Cost = field(default_factory=Cost)
    outputs: torch.Tensor | None = None
    lowres: torch.Tensor | None = None
    extras: dict = field(default_factory=dict)
    image_ids: list | None = None

    def __len__(self) -> int:
        return self.maps.shape[0]

    @property
    def probabilities(self) -> torch.Tensor | None:
        """Softmax probability of each explained class on the clean image, when known."""
        if self.outputs is None or self.targets is None or self.outputs.dim() != 2:
            return None
        return self.outputs.softmax(dim=1).gather(1, self.targets[:, None].to(self.outputs.device)).squeeze(1)

    @property
    def spec(self) -> dict:
        """The method and its parameters as JSON-friendly values: the method part of a result's key."""
        return {"method": self.method, "params": {k: jsonable(v) for k, v in sorted(self.params.items())}}

    def to_dict(self) -> dict:
        """A JSON-friendly summary (no maps)."""
        layer = self.extras.get("layer")
        out = {
            "method": self.method,
            "params": self.spec["params"],
            "targets": None if self.targets is None else self.targets.tolist(),
            "cost": self.cost.as_dict(),
        }
        if layer is not None:
            out["layer"] = jsonable(layer)
        return out
