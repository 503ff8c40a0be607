"""The method contract, the registry, and the batched gradient loop every gradient method shares.

A method is a class: `Method(model, **params).attribute(x, target=None) -> Tensor (B, H, W)` at the
input's resolution, higher = more important, sign and magnitude kept. `channels=True` keeps
(B, C, H, W) for methods whose maps live in input space.
"""

from __future__ import annotations

import inspect
from typing import Callable, ClassVar

import torch
from torch import nn
import torch.nn.functional as F

from .._progress import progress
from ..errors import ConfigError, InputError, unknown_name
from ..session import Cost, ModelSession, model_device
from ..targets import Target, TargetSpec, resolve_target
from ..validation import check_images

_REGISTRY: dict[str, type["Method"]] = {}


def register(cls: type["Method"]) -> type["Method"]:
    """Class decorator: make a method available by its `name`."""
    if not cls.name:
        raise TypeError(f"{cls.__name__} needs a `name` to be registered")
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise TypeError(f"method name '{cls.name}' is already registered by {_REGISTRY[cls.name].__name__}")
    _REGISTRY[cls.name] = cls
    return cls


def available() -> list[str]:
    """Names of every registered method."""
    return sorted(_REGISTRY)


def get(name: str) -> type["Method"]:
    if isinstance(name, type) and issubclass(name, Method):
        return name
    if name not in _REGISTRY:
        raise unknown_name("method", name, _REGISTRY)
    return _REGISTRY[name]


def describe() -> dict[str, str]:
    """One-line description of each registered method."""
    return {name: _REGISTRY[name].description for name in available()}


def parameters(name: str) -> dict[str, object]:
    """A method's parameters and their defaults."""
    sig = inspect.signature(get(name).__init__)
    return {
        p.name: p.default
        for p in list(sig.parameters.values())[2:]
        if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)
    }


def build(name, model: nn.Module, **params) -> "Method":
    """Instantiate a method by name, with a clear error for unknown parameters."""
    cls = get(name)
    known = parameters(cls.name)
    unknown = [k for k in params if k not in known]
    if unknown:
        raise ConfigError(
            f"unknown parameter{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))} "
            f"for method '{cls.name}'; its parameters are: {', '.join(known) or '(none)'}"
        )
    return cls(model, **params)


class Method:
    """Base class. Subclasses set `name`, `description`, declare keyword parameters in `__init__`
    (passing them to `super().__init__`) and implement `_attribute(session, x, target)`.

    `_attribute` returns (B, C, H, W) maps for input-space methods, or (B, h, w) maps for layer
    methods (upsampled here to the input's resolution).
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    input_space: ClassVar[bool] = True
    uses_gradients: ClassVar[bool] = True  # False for forward-only (perturbation) methods

    def __init__(self, model: nn.Module, **params):
        if not isinstance(model, nn.Module):
            raise InputError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self.model = model
        self.params = dict(params)
        for key, value in params.items():
            setattr(self, key, value)
        self.last_cost: Cost | None = None
        self.last_targets: torch.Tensor | None = None
        self.last_outputs: torch.Tensor | None = None

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params.items() if not isinstance(v, torch.Tensor))
        return f"{type(self).__name__}({args})"

    def attribute(self, x: torch.Tensor, target: TargetSpec = None, *, channels: bool = False) -> torch.Tensor:
        """Attribution maps for a batch of images; see the module docstring for the contract."""
        if channels and not self.input_space:
            raise ConfigError(f"method '{self.name}' works at a layer: channels=True is not available")
        x = check_images(x, model_device(self.model))
        with ModelSession(self.model) as session:
            self._target_spec = target
            maps = self._attribute(session, x, target)
        self.last_cost = session.cost
        if maps.dim() == 4 and not channels:
            maps = maps.sum(dim=1)
        elif maps.dim() == 3 and tuple(maps.shape[-2:]) != tuple(x.shape[-2:]):
            maps = upsample(maps, x.shape[-2:])
        return maps.detach()

    # -- helpers for subclasses ----------------------------------------------------------------
    def resolve(self, session: ModelSession, x: torch.Tensor, outputs: torch.Tensor | None = None) -> Target:
        """Resolve the target against the clean batch's outputs (one no-grad forward if not given)."""
        if outputs is None:
            with torch.no_grad():
                outputs = session.forward(x)
        resolved = resolve_target(self._target_spec, outputs)
        self.record(outputs, resolved.classes)
        return resolved

    def record(self, outputs: torch.Tensor, classes: torch.Tensor | None) -> None:
        """Keep the clean outputs and explained classes for the Explanation record."""
        self.last_outputs = outputs.detach()
        self.last_targets = classes

    def _attribute(self, session: ModelSession, x: torch.Tensor, target: TargetSpec) -> torch.Tensor:
        raise NotImplementedError


def upsample(maps: torch.Tensor, size) -> torch.Tensor:
    """Bilinear upsampling of (B, h, w) maps to `size`."""
    return F.interpolate(maps[:, None], size=tuple(size), mode="bilinear", align_corners=False)[:, 0]


def check_batch_size(batch_size) -> int:
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be a positive int, got {batch_size!r}")
    return batch_size


def accumulate_input_gradients(
    session: ModelSession,
    target: Target,
    n_images: int,
    n_samples: int,
    make_inputs: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    reduce: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], None],
    batch_size: int | None,
    desc: str = "",
) -> None:
    """Forward and backward `n_images * n_samples` derived inputs in chunks of `batch_size` rows.

    Rows are ordered image-major (row = image * n_samples + sample), so a chunk mixes images and
    samples freely and every pass is full. `make_inputs(image_index, sample_index)` builds a chunk's
    inputs; `reduce(grads, image_index, sample_index, inputs)` folds its input gradients into the
    caller's accumulators. `batch_size=None` picks the rows per pass for the device
    (`perturbation.auto_batch_size(device, backward=True)`).
    """
    if batch_size is None:
        from ..perturbation import auto_batch_size

        zero = torch.zeros(1, dtype=torch.long, device=session.device)
        probe = make_inputs(zero, zero)  # one row, to size the passes by the image
        batch_size = auto_batch_size(session.device, backward=True, pixels=probe.shape[-2] * probe.shape[-1])
    batch_size = check_batch_size(batch_size)
    total = n_images * n_samples
    starts = range(0, total, batch_size)
    for start in progress(starts, desc=desc, total=len(starts)):
        rows = torch.arange(start, min(start + batch_size, total), device=session.device)
        image, sample = rows // n_samples, rows % n_samples
        inputs = make_inputs(image, sample).detach().requires_grad_(True)
        scores = target(session.forward(inputs), image)
        grads = session.grad(scores, inputs)
        reduce(grads, image, sample, inputs.detach())
