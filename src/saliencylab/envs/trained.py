"""Trained variants: a small CNN or a small ViT fitted to an environment's data, deterministically from a seed.

The truth maps stay the designed (data-defined) ones; a trained network may solve the task with
other pixels (shortcuts, partial evidence), which is why the designed networks exist. Training runs
on the CPU in seconds (Adam on freshly sampled batches). Trained weights are cached in-process by
(name, seed, model, recipe) and on disk under $SALIENCYLAB_CACHE (default ~/.cache/saliencylab; an
empty value turns the disk cache off), loaded with `torch.load(weights_only=True)`.

`model="cnn"` (default, `envs.load(name, trained=True)`): `EnvCNN`, recipe `RECIPE`.
`model="vit"`: `saliencylab.models.vit.small_vit` with `VIT_CONFIG` (patch 4 on 32x32 images: an 8x8
token grid plus the class token; 2 blocks of width 32, 4 heads), recipe `VIT_RECIPE`, trained with
Adam at `VIT_LR` for `VIT_STEPS` batches on one CPU thread (the thread count is set to 1 for the
training and restored, so the weights do not depend on the caller's thread setting). It is a ViT for
the explanation methods (timm layout: attention rollout, gradient rollout, CAMs on token layers), not a
reproduction of a published ViT training recipe: no warm-up, augmentation, weight decay or drop-path
(small data that is sampled fresh every step does not need them).
`trained_environment(name, seed, model=...)` wraps either in an `Environment`.
"""

from __future__ import annotations

import os
import pickle
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn
import torch.nn.functional as F

from ..core.errors import ConfigError
from .base import TRAINED_NOTE, Design, Environment, get

RECIPE = "v1"            # bump when the architecture or the training changes: old cache files are ignored
STEPS = 250
BATCH = 64
LR = 5e-3
# The ViT's own recipe (its cache files are keyed by it, apart from the CNN's): measured on the three
# environments at 250 steps (seed 0), held-out accuracy 1.000 / 0.994 / 0.997 (dominant_colour / null_player /
# pattern_at_location), ~13 s of CPU time each on one thread; small_vit's defaults (width 64, 4 blocks) reached
# 1.000 / 0.999 / 0.968 on 1000 held-out images in 2-5x the time.
VIT_RECIPE = "vit-v1"
VIT_CONFIG = {"patch_size": 4, "dim": 32, "depth": 2, "heads": 4}
VIT_STEPS = 250
VIT_LR = 1e-3
MODELS = ("cnn", "vit")
HELD_OUT = 2000          # images in the seeded held-out batch that measures accuracy
_TRAIN_SEEDS = 1 << 40   # training and held-out batches use seeds far from the ones users pick
_HELD_OUT_SEED = 1 << 41

_CACHE: dict[tuple, dict] = {}


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


def _check_model(model: str) -> str:
    if model not in MODELS:
        raise ConfigError(f"model must be one of {', '.join(MODELS)}, got {model!r}")
    return model


def _build(design: Design, seed: int, model: str = "cnn") -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if _check_model(model) == "vit":
            from ..models.vit import small_vit

            return small_vit(design.num_classes, img_size=design.image_size, **VIT_CONFIG)
        return EnvCNN(design.num_classes, design.image_size)


@contextmanager
def _one_thread(enabled: bool):
    """One intra-op thread while training (restored after): reduction order, hence the weights, then do
    not depend on the caller's thread count."""
    before = torch.get_num_threads()
    if enabled:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if enabled:
            torch.set_num_threads(before)


def accuracy(model: nn.Module, design: Design, seed: int, n: int = HELD_OUT) -> float:
    """Accuracy on a seeded held-out batch (seeds disjoint from the training batches')."""
    batch = design.sample(n, _HELD_OUT_SEED + seed)
    with torch.no_grad():
        return float((model(batch.x).argmax(1) == batch.labels).to(torch.float64).mean())


def train(design: Design, seed: int = 0, steps: int | None = None, model: str = "cnn") -> dict:
    """Train an EnvCNN (model="cnn") or the small ViT (model="vit") on fresh seeded batches; returns
    {"state_dict", "accuracy", "seconds"}. `steps` defaults to the model's recipe (STEPS, VIT_STEPS)."""
    vit = _check_model(model) == "vit"
    if steps is None:
        steps = VIT_STEPS if vit else STEPS
    start = time.perf_counter()
    with _one_thread(vit):
        net = _build(design, seed, model).train()
        optimizer = torch.optim.Adam(net.parameters(), lr=VIT_LR if vit else LR)
        for step in range(steps):
            batch = design.sample(BATCH, _TRAIN_SEEDS + seed * steps + step)
            loss = F.cross_entropy(net(batch.x), batch.labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        net.eval()
        seconds = time.perf_counter() - start
        held_out = accuracy(net, design, seed)
    state = {k: v.detach().clone() for k, v in net.state_dict().items()}
    return {"state_dict": state, "accuracy": held_out, "seconds": seconds}


def _load_disk(path: Path) -> dict | None:
    try:
        record = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError):  # missing or unreadable: train again
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


def cache_path(design: Design, seed: int = 0, model: str = "cnn") -> Path | None:
    """Where the trained weights of (design, seed, model) are cached on disk (None: disk cache off)."""
    folder = cache_dir()
    if folder is None:
        return None
    recipe = VIT_RECIPE if _check_model(model) == "vit" else RECIPE  # vit-v1: its own files
    return folder / "envs" / f"{design.name}-seed{seed}-{recipe}.pt"


def trained_record(design: Design, seed: int = 0, model: str = "cnn") -> dict:
    """The cached training record {"state_dict", "accuracy", "seconds"} of (design, seed, model),
    trained on a miss (in-process cache, then disk, then training)."""
    key = (design.name, seed, model, VIT_RECIPE if _check_model(model) == "vit" else RECIPE)
    record = _CACHE.get(key)
    path = cache_path(design, seed, model)
    if record is None and path is not None:
        record = _load_disk(path)
    if record is None:
        record = train(design, seed, model=model)
        if path is not None:
            _save_disk(path, record)
    _CACHE[key] = record
    return record


def trained_model(design: Design, seed: int = 0, model: str = "cnn") -> tuple[nn.Module, float]:
    """A fresh network (eval mode; EnvCNN or the small ViT) with the weights trained for (design, seed),
    and its held-out accuracy."""
    record = trained_record(design, seed, model)
    net = _build(design, seed, model)
    net.load_state_dict(record["state_dict"])
    return net.eval(), float(record["accuracy"])


def trained_environment(name: str, seed: int = 0, model: str = "cnn") -> Environment:
    """The environment `name` with a trained network: the CNN (as `envs.load(name, trained=True)`) or
    (model="vit") the small ViT, on the same data and designed truth."""
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ConfigError(f"seed must be an int, got {seed!r}")
    design = get(name)()
    net, acc = trained_model(design, seed, model)
    note = TRAINED_NOTE if model == "cnn" else TRAINED_NOTE + " (a small ViT: saliencylab.models.vit.small_vit)"
    return Environment(name=design.name, description=design.description, image_size=design.image_size,
                       num_classes=design.num_classes, model=net, design=design, trained=True, note=note,
                       accuracy=acc, seed=seed, class_names=design.class_names)
