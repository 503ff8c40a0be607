"""The embedded default model, its preprocessing, and loading of user models."""

from __future__ import annotations

import importlib
import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable, Sequence, Union

import numpy as np
import torch
from PIL import Image
from torch import nn

from saliencylab.core.errors import ConfigError, InputError

__all__ = ["LoadedModel", "load", "available", "from_spec", "imagenet_labels"]

DATA_DIR = Path(__file__).resolve().parent / "data"

ImageLike = Union[Image.Image, str, os.PathLike, np.ndarray]

# TF EfficientNet-Lite was trained on (x*255 - 127) / 128. On the bundled photos this
# gives the confident correct answers (espresso 0.95 vs 0.78 with ImageNet mean/std).
LITE_MEAN = (127.0 / 255.0,) * 3
LITE_STD = (128.0 / 255.0,) * 3


@lru_cache(maxsize=1)
def _labels() -> tuple[str, ...]:
    labels = tuple((DATA_DIR / "imagenet_classes.txt").read_text(encoding="utf-8").splitlines())
    assert len(labels) == 1000, "imagenet_classes.txt must have 1000 lines"
    return labels


def imagenet_labels() -> list[str]:
    """The 1000 ImageNet class names in index order (torchvision's short names)."""
    return list(_labels())


@dataclass
class LoadedModel:
    """A model plus everything needed to feed it and read its output."""

    name: str
    model: nn.Module
    labels: list[str]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    input_size: int = 224
    resize_size: int = 256  # shorter side before the centre crop (224/256 = the usual 0.875)
    interpolation: str = "bicubic"  # TF EfficientNet evaluates with bicubic resizing

    def preprocess(self, image: ImageLike) -> torch.Tensor:
        """PIL image, path, or HxWx3 / HxW uint8 array -> normalized float tensor (3, S, S)."""
        im = _to_pil(image)
        w, h = im.size
        scale = self.resize_size / min(w, h)
        size = (max(self.resize_size, round(w * scale)), max(self.resize_size, round(h * scale)))
        im = im.resize(size, _RESAMPLE[self.interpolation])
        left = int(round((size[0] - self.input_size) / 2.0))
        top = int(round((size[1] - self.input_size) / 2.0))
        im = im.crop((left, top, left + self.input_size, top + self.input_size))
        x = torch.from_numpy(np.array(im, dtype=np.float32)).permute(2, 0, 1) / 255.0
        return (x - _channel(self.mean)) / _channel(self.std)

    def preprocess_batch(self, images: Sequence[ImageLike]) -> torch.Tensor:
        if len(images) == 0:
            raise InputError("preprocess_batch needs at least one image")
        return torch.stack([self.preprocess(im) for im in images])

    def input_bounds(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The lowest and highest input values, (1, 3, 1, 1) each: pixels 0 and 1 normalized (LRP's z-box)."""
        mean, std = _channel(self.mean).view(1, 3, 1, 1), _channel(self.std).view(1, 3, 1, 1)
        return (0.0 - mean) / std, (1.0 - mean) / std

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        """Undo the normalization: (3,H,W) or (B,3,H,W) -> values in [0, 1] for display."""
        return (x.detach() * _channel(self.std).to(x) + _channel(self.mean).to(x)).clamp(0.0, 1.0)


_RESAMPLE = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR}


def _channel(values: Sequence[float]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32).view(3, 1, 1)


def _to_pil(image: ImageLike) -> Image.Image:
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, (str, os.PathLike)):
        from saliencylab.images import open_image

        return open_image(image)
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8:
            raise InputError(
                f"image array must be uint8 with values 0-255, got dtype {image.dtype}")
        if image.ndim == 2:
            return Image.fromarray(image).convert("RGB")
        if image.ndim == 3 and image.shape[2] == 3:
            return Image.fromarray(np.ascontiguousarray(image))
        raise InputError(
            f"image array must have shape (H, W, 3) or (H, W), got {tuple(image.shape)}")
    raise InputError(
        f"expected a PIL image, a file path or a uint8 numpy array, got {type(image).__name__}")


def _efficientnet_lite0() -> LoadedModel:
    from saliencylab.models.efficientnet_lite import efficientnet_lite0

    return LoadedModel(name="efficientnet_lite0", model=efficientnet_lite0(pretrained=True),
                       labels=imagenet_labels(), mean=LITE_MEAN, std=LITE_STD)


_EMBEDDED: dict[str, Callable[[], LoadedModel]] = {"efficientnet_lite0": _efficientnet_lite0}


def available() -> list[str]:
    """Names accepted by load()."""
    return list(_EMBEDDED)


def load(name: str = "efficientnet_lite0") -> LoadedModel:
    """An embedded model with real weights, in eval mode (a fresh instance each call)."""
    if name not in _EMBEDDED:
        raise ConfigError(f"unknown model {name!r}; available: {', '.join(available())}")
    return _EMBEDDED[name]()


def from_spec(spec: str, weights: str | os.PathLike | None = None) -> nn.Module:
    """A user model from 'package.module:factory', a TorchScript file, or an embedded name.

    `weights` optionally names a state-dict file loaded on top (weights_only=True).
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ConfigError("model spec is empty; use 'package.module:factory' or a TorchScript file path")
    spec = spec.strip()
    if spec in _EMBEDDED:
        model = load(spec).model
    elif os.path.exists(spec) or _looks_like_file(spec):
        model = _load_torchscript(spec)
    elif ":" in spec:
        model = _call_factory(spec)
    else:
        raise ConfigError(
            f"model spec {spec!r} is neither 'package.module:factory', an existing TorchScript "
            f"file, nor an embedded model ({', '.join(available())})")
    if weights is not None:
        _load_weights(model, weights)
    return model.eval()


# Specs with these endings are meant as files, so a typo should say "no such file".
_MODEL_FILE_SUFFIXES = (".pt", ".pth", ".ts", ".jit", ".torchscript", ".zip")


def _looks_like_file(spec: str) -> bool:
    return spec.lower().endswith(_MODEL_FILE_SUFFIXES) or os.sep in spec.split(":")[0]


def _load_torchscript(path: str) -> nn.Module:
    if not os.path.exists(path):
        raise InputError(f"cannot read model file '{path}': no such file")
    if os.path.isdir(path):
        raise InputError(f"cannot read model file '{path}': it is a directory")
    try:
        with warnings.catch_warnings():
            # torch 2.9+ flags TorchScript as deprecated; the user chose the format, not us.
            warnings.filterwarnings("ignore", message=".*torch.jit.load.* is deprecated", category=DeprecationWarning)
            return torch.jit.load(path, map_location="cpu")
    except Exception as exc:
        raise InputError(
            f"cannot read model file '{path}' as TorchScript ({_reason(exc)}); a plain state dict "
            f"goes in weights= together with a 'package.module:factory' spec") from exc


def resolve_factory(spec: str):
    """'package.module:factory' -> the object it names (a callable, or a ready-made module), imported with
    the working directory first on sys.path; one clear ConfigError line when it cannot be found."""
    module_name, _, attr_path = str(spec).partition(":")
    if not module_name or not attr_path:
        raise ConfigError(f"model spec {spec!r} must look like 'package.module:factory'")
    try:
        module = _import_from_cwd(module_name)
    except ModuleNotFoundError as exc:
        raise ConfigError(_not_found(module_name, spec, exc)) from exc
    except Exception as exc:  # the user's module itself is broken
        raise ConfigError(
            f"importing module {module_name!r} for model spec {spec!r} failed: {_reason(exc)}") from exc

    obj = module
    for part in attr_path.split("."):
        if not hasattr(obj, part):
            raise ConfigError(f"module {module_name!r} has no attribute {attr_path!r} (model spec {spec!r})")
        obj = getattr(obj, part)
    if not isinstance(obj, nn.Module) and not callable(obj):
        raise ConfigError(f"{spec!r} is a {type(obj).__name__}, not a callable model factory")
    return obj


def _call_factory(spec: str, **kwargs) -> nn.Module:
    obj = resolve_factory(spec)
    if isinstance(obj, nn.Module):  # the spec names a ready-made instance
        return obj
    try:
        model = obj(**kwargs)
    except Exception as exc:
        raise ConfigError(f"calling model factory {spec!r}() failed: {_reason(exc)}") from exc
    if not isinstance(model, nn.Module):
        raise ConfigError(
            f"model factory {spec!r} returned a {type(model).__name__}, not a torch.nn.Module")
    return model


def _import_from_cwd(module_name: str):
    """Import `module_name` with the current working directory first on sys.path, as `python -m` does
    (a console script's sys.path starts with its own bin folder, so `mynets.py` beside the user is not
    found otherwise); sys.path is restored afterwards, the imported module stays in sys.modules."""
    import sys

    saved = list(sys.path)
    sys.path.insert(0, os.getcwd())
    try:
        importlib.invalidate_caches()  # a module written since the last import must be found
        return importlib.import_module(module_name)
    finally:
        sys.path[:] = saved


def _not_found(module_name: str, spec: str, exc: ModuleNotFoundError) -> str:
    """One line saying which module is missing and how to make it importable."""
    missing = exc.name or module_name
    if module_name.endswith(".py"):
        name = module_name[:-3].replace("/", ".").replace(os.sep, ".")
        return (f"cannot import {module_name!r} for model spec {spec!r}: give the module name, not the file "
                f"name, e.g. '{name}:{spec.partition(':')[2]}'")
    top = module_name.split(".")[0]
    if missing.split(".")[0] != top:  # the user's module was found; something it imports is not installed
        return (f"module {module_name!r} (model spec {spec!r}) imports {missing!r}, which is not installed: "
                f"{exc}; install it in this environment")
    return (f"cannot import module {module_name!r} for model spec {spec!r}: {exc} (searched the current folder "
            f"{os.getcwd()} and sys.path); run from the folder that holds {top}.py (or the {top}/ package), "
            f"or add that folder to PYTHONPATH")


_CHECKPOINT_KEYS = ("state_dict", "model_state_dict", "model")


def _load_weights(model: nn.Module, weights: str | os.PathLike) -> None:
    path = str(weights)
    if not os.path.exists(path):
        raise InputError(f"cannot read weights file '{path}': no such file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise InputError(f"cannot read weights file '{path}': {_reason(exc)}") from exc

    # Training checkpoints often wrap the state dict next to optimizer state.
    if isinstance(state, Mapping) and not _is_state_dict(state):
        for key in _CHECKPOINT_KEYS:
            if isinstance(state.get(key), Mapping) and _is_state_dict(state[key]):
                state = state[key]
                break
    if not isinstance(state, Mapping) or not _is_state_dict(state):
        found = type(state).__name__
        raise ConfigError(f"weights file '{path}' does not contain a state dict of tensors (found a {found})")

    expected = set(model.state_dict())
    missing = sorted(expected - set(state))
    unexpected = sorted(set(state) - expected)
    if missing or unexpected:
        raise ConfigError(
            f"weights file '{path}' does not match the model: "
            f"{len(missing)} missing keys {_few(missing)}, {len(unexpected)} unexpected keys {_few(unexpected)}")
    current = model.state_dict()
    wrong_shape = [f"{k} {tuple(state[k].shape)} vs {tuple(current[k].shape)}"
                   for k in sorted(current) if state[k].shape != current[k].shape]
    if wrong_shape:
        raise ConfigError(
            f"weights file '{path}' does not match the model: size mismatch for "
            f"{len(wrong_shape)} tensors (file vs model) {_few(wrong_shape)}")
    model.load_state_dict(state, strict=True)


def _is_state_dict(obj: Mapping) -> bool:
    return len(obj) > 0 and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def _few(keys: list[str], n: int = 3) -> str:
    shown = ", ".join(keys[:n]) + (", ..." if len(keys) > n else "")
    return f"[{shown}]"


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__
