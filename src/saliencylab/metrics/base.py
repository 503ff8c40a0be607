"""The metric contract and registry.

A metric is a class: `Metric(**params)(model, x, maps, target=None, **data) -> (B,) scores`, with
metadata `name`, `higher_is_better`, `category` (faithfulness / sanity / localization / complexity /
groundtruth) and a one-line `description`. `return_curves=True` also returns the curves a metric has
(deletion/insertion, MoRF/LeRF...) as a dict of tensors. Localization metrics take `boxes=` or
`masks=` as data, ground-truth metrics `truth=`; perturbation metrics take `steps=` and `baseline=`
as parameters; sanity metrics take `method=` (a method name or instance) to recompute maps.
"""

from __future__ import annotations

import inspect
from typing import ClassVar

import torch
from torch import nn

from ..errors import ConfigError, InputError, unknown_name
from ..explanation import Explanation
from ..session import Cost, ModelSession, model_device
from ..targets import Target, resolve_target
from ..validation import check_images

CATEGORIES = ("faithfulness", "sanity", "localization", "complexity", "groundtruth")
DATA_KEYS = ("boxes", "masks", "truth")

_REGISTRY: dict[str, type["Metric"]] = {}


def register(cls):
    if not cls.name or cls.category not in CATEGORIES:
        raise TypeError(f"{cls.__name__} needs a name and a category in {CATEGORIES}")
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise TypeError(f"metric name '{cls.name}' is already registered")
    _REGISTRY[cls.name] = cls
    return cls


def available(category: str | None = None) -> list[str]:
    return sorted(n for n, c in _REGISTRY.items() if category is None or c.category == category)


def get(name) -> type["Metric"]:
    if isinstance(name, type) and issubclass(name, Metric):
        return name
    if name not in _REGISTRY:
        raise unknown_name("metric", name, _REGISTRY)
    return _REGISTRY[name]


def describe() -> dict[str, dict]:
    return {n: {"description": c.description, "category": c.category, "higher_is_better": c.higher_is_better}
            for n, c in sorted(_REGISTRY.items())}


def parameters(name) -> dict[str, object]:
    sig = inspect.signature(get(name).__init__)
    return {p.name: p.default for p in list(sig.parameters.values())[1:]
            if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}


def build(name, **params) -> "Metric":
    cls = get(name)
    known = parameters(cls.name)
    unknown = [k for k in params if k not in known]
    if unknown:
        raise ConfigError(f"unknown parameter{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))} "
                          f"for metric '{cls.name}'; its parameters are: {', '.join(known) or '(none)'}")
    return cls(**params)


class Metric:
    """Base class: subclasses set the metadata, declare keyword parameters in `__init__` (passed to
    `super().__init__`) and implement `_score(session, x, maps, target, **data) -> (B,)`, optionally
    storing curves in `self.last_curves`."""

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    category: ClassVar[str] = ""
    higher_is_better: ClassVar[bool] = True
    needs_model: ClassVar[bool] = True

    def __init__(self, **params):
        self.params = dict(params)
        for k, v in params.items():
            setattr(self, k, v)
        self.last_curves: dict | None = None
        self.last_cost: Cost | None = None

    def __repr__(self):
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self.params.items())})"

    def __call__(self, model: nn.Module | None, x: torch.Tensor, maps, target=None, *, return_curves: bool = False,
                 **data):
        unknown = [k for k in data if k not in DATA_KEYS]
        if unknown:
            raise ConfigError(f"unknown data {', '.join(map(repr, unknown))} for metric '{self.name}'")
        if isinstance(maps, Explanation):
            if target is None:
                target = maps.targets
            maps = maps.maps
        device = model_device(model) if model is not None else None
        x = check_images(x, device)
        maps = check_maps(maps, x)
        self.last_curves = None
        if model is None:
            if self.needs_model:
                raise InputError(f"metric '{self.name}' needs the model")
            scores = self._score(None, x, maps, None, **data)
        else:
            with ModelSession(model) as session:
                scores = self._score(session, x, maps, target, **data)
            self.last_cost = session.cost
        scores = scores.detach()
        return (scores, self.last_curves) if return_curves else scores

    def resolve(self, session, x, target) -> Target:
        """Resolve the target against the clean images (one no-grad forward)."""
        with torch.no_grad():
            outputs = session.forward(x)
        return resolve_target(target, outputs)

    def _score(self, session, x, maps, target, **data) -> torch.Tensor:
        raise NotImplementedError


def check_maps(maps, x: torch.Tensor) -> torch.Tensor:
    """Maps (B, H, W) or (B, C, H, W) matching the images; channels are summed."""
    if not isinstance(maps, torch.Tensor):
        raise InputError(f"maps must be a torch.Tensor (B, H, W), got {type(maps).__name__}")
    if maps.dim() == 4:
        maps = maps.sum(1)
    if maps.dim() != 3 or maps.shape[0] != x.shape[0] or tuple(maps.shape[-2:]) != tuple(x.shape[-2:]):
        raise InputError(f"maps must have shape (B, H, W) = ({x.shape[0]}, {x.shape[2]}, {x.shape[3]}) to match "
                         f"the images, got {tuple(maps.shape)}")
    if not torch.isfinite(maps).all():
        raise InputError("maps contain NaN or infinite values")
    return maps.detach().to(x.device, x.dtype)
