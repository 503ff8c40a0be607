"""Model key and patch cache: generated patches stored by a key over the model's weights and every parameter."""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path

import torch
from torch import nn

from ...core.session import Cost
from .results import _FORMAT, Patches


def _fingerprint(model: nn.Module) -> str:
    """sha256 of the model's class and every state_dict tensor's name, shape, dtype and bytes."""
    h = hashlib.sha256(f"{type(model).__module__}.{type(model).__qualname__}".encode())
    for name, t in model.state_dict().items():
        if not isinstance(t, torch.Tensor):
            continue
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


model_key = _fingerprint


def _default_cache_dir() -> Path:
    env = os.environ.get("SALIENCYLAB_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "saliencylab"


def _cache_path(cache_dir, key: str) -> Path:
    base = Path(cache_dir).expanduser() if cache_dir is not None else _default_cache_dir()
    return base / "knows_best" / f"{key}.pt"


def _save(path: Path, p: Patches) -> None:
    record = {
        "format": _FORMAT, "key": p.key, "patches": p.patches.detach().cpu(), "classes": p.classes.cpu(),
        "probabilities": p.probabilities.cpu(), "converged": p.converged.cpu(),
        "interaction": p.interaction.cpu(), "probabilities_mean": p.probabilities_mean.cpu(),
        "steps": int(p.steps), "image_size": int(p.image_size), "threshold": float(p.threshold),
        "params": json.dumps(p.params, sort_keys=True), "cost": p.cost.as_dict(),
    }
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        torch.save(record, tmp)
        os.replace(tmp, path)
    except OSError as exc:  # a read-only cache only costs a regeneration next time
        warnings.warn(f"could not write knows-best patches to {path}: {exc}", stacklevel=3)


def _load(path: Path, key: str) -> Patches | None:
    if not path.is_file():
        return None
    try:
        d = torch.load(path, map_location="cpu", weights_only=True)
        if d.get("format") != _FORMAT or d.get("key") != key:
            return None
        return Patches(
            patches=d["patches"], classes=d["classes"], probabilities=d["probabilities"],
            converged=d["converged"], cost=Cost(**d["cost"]), interaction=d["interaction"],
            probabilities_mean=d["probabilities_mean"], steps=int(d["steps"]),
            image_size=int(d["image_size"]), threshold=float(d["threshold"]),
            params=json.loads(d["params"]), key=key, from_cache=True)
    except Exception as exc:  # a corrupt or foreign file: regenerate
        warnings.warn(f"ignoring unreadable knows-best cache file {path}: {exc}", stacklevel=3)
        return None
