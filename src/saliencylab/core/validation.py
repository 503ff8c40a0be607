"""Input checks that turn bad input into one clear sentence instead of a deep traceback."""

from __future__ import annotations

import torch

from .errors import InputError


def numpy_as_tensor(value):
    """A numpy array as a tensor (same values; keyed and indexed like one); anything else as it is."""
    if type(value).__module__ == "numpy" and hasattr(value, "shape") and hasattr(value, "dtype"):
        return torch.as_tensor(value)
    return value


def check_images(x, device: torch.device | None = None) -> torch.Tensor:
    """Check a batch of images (B, C, H, W) and move it to `device`."""
    if not isinstance(x, torch.Tensor):
        hint = "; convert it with torch.from_numpy(...)" if type(x).__module__.startswith("numpy") else ""
        raise InputError(f"images must be a torch.Tensor of shape (B, C, H, W), got {type(x).__name__}{hint}")
    if x.dim() == 3:
        raise InputError(
            f"images must have shape (B, C, H, W), got {tuple(x.shape)}: add a batch dimension with x.unsqueeze(0)"
        )
    if x.dim() != 4:
        raise InputError(f"images must have shape (B, C, H, W), got {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise InputError("images batch is empty (B = 0)")
    if not x.is_floating_point():
        raise InputError(
            f"images must be floating point, got dtype {x.dtype}; preprocess them first "
            "(e.g. saliencylab.models.load(...).preprocess)"
        )
    finite = torch.isfinite(x).flatten(1).all(dim=1)
    if not bool(finite.all()):
        bad = (~finite).nonzero().flatten().tolist()
        raise InputError(f"images contain NaN or infinite values (image index {', '.join(map(str, bad[:5]))})")
    if device is not None and x.device != device:
        x = x.to(device)
    return x.detach()
