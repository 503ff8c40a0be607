"""Trained variants: a small CNN fitted to an environment's data, deterministically from a seed.

The truth maps stay the designed (data-defined) ones; a trained network may solve the task with
other pixels (shortcuts, partial evidence), which is why the designed networks exist. Training runs
on the CPU in seconds (Adam on freshly sampled batches). Trained weights are cached in-process by
(name, seed) and on disk under $SALIENCYLAB_CACHE (default ~/.cache/saliencylab; an empty value
turns the disk cache off), loaded with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch
from torch import nn
import torch.nn.functional as F

from .base import Design

RECIPE = "v1"            # bump when the architecture or the training changes: old cache files are ignored
STEPS = 250
BATCH = 64
LR = 5e-3
HELD_OUT = 2000          # images in the seeded held-out batch that measures accuracy
_TRAIN_SEEDS = 1 << 40   # training and held-out batches use seeds far from the ones users pick
_HELD_OUT_SEED = 1 << 41

_CACHE: dict[tuple[str, int], dict] = {}


class EnvCNN(nn.Module):
    """conv-ReLU-maxpool twice, then a linear layer over the whole (S/4 x S/4) feature map: no
    global pooling, so the network can learn where things are (a designated region, a half)."""

    def __init__(self, num_classes: int, image_size: int = 32, width: int = 8):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, padding=1)
        self.relu1 = nn.ReLU()
        self.pool1 = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1)
        self.relu2 = nn.ReLU()
        self.pool2 = nn.MaxPool2d(2)
        self.fc = nn.Linear(2 * width * (image_size // 4) ** 2, num_classes)

    def forward(self, x):
        x = self.pool1(self.relu1(self.conv1(x)))
        x = self.pool2(self.relu2(self.conv2(x)))
        return self.fc(x.flatten(1))


def cache_dir() -> Path | None:
    value = os.environ.get("SALIENCYLAB_CACHE")
    if value is None:
        return Path.home() / ".cache" / "saliencylab"
    return Path(value).expanduser() if value else None


def clear_cache() -> None:
    """Forget the in-process cache (the disk cache stays)."""
    _CACHE.clear()


def _build(design: Design, seed: int) -> EnvCNN:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return EnvCNN(design.num_classes, design.image_size)


def accuracy(model: nn.Module, design: Design, seed: int, n: int = HELD_OUT) -> float:
    """Accuracy on a seeded held-out batch (seeds disjoint from the training batches')."""
    batch = design.sample(n, _HELD_OUT_SEED + seed)
    with torch.no_grad():
        return float((model(batch.x).argmax(1) == batch.labels).to(torch.float64).mean())


def train(design: Design, seed: int = 0, steps: int = STEPS) -> dict:
    """Train an EnvCNN on fresh seeded batches; returns {"state_dict", "accuracy", "seconds"}."""
    start = time.perf_counter()
    model = _build(design, seed).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=LR)
    for step in range(steps):
        batch = design.sample(BATCH, _TRAIN_SEEDS + seed * steps + step)
        loss = F.cross_entropy(model(batch.x), batch.labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    model.eval()
    seconds = time.perf_counter() - start
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return {"state_dict": state, "accuracy": accuracy(model, design, seed), "seconds": seconds}


def _load_disk(path: Path) -> dict | None:
    try:
        record = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, ValueError):   # missing or unreadable: train again
        return None
    if not isinstance(record, dict) or not {"state_dict", "accuracy"} <= set(record):
        return None
    return record


def _save_disk(path: Path, record: dict) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        torch.save(record, tmp)
        os.replace(tmp, path)
    except OSError:   # a read-only cache is not an error: the weights are in memory
        pass


def trained_model(design: Design, seed: int = 0) -> tuple[nn.Module, float]:
    """A fresh EnvCNN (eval mode) with the weights trained for (design, seed), and its accuracy."""
    key = (design.name, seed)
    record = _CACHE.get(key)
    folder = cache_dir()
    path = folder / "envs" / f"{design.name}-seed{seed}-{RECIPE}.pt" if folder is not None else None
    if record is None and path is not None:
        record = _load_disk(path)
    if record is None:
        record = train(design, seed)
        if path is not None:
            _save_disk(path, record)
    _CACHE[key] = record
    model = _build(design, seed)
    model.load_state_dict(record["state_dict"])
    return model.eval(), float(record["accuracy"])
