"""The metric contract and registry.

A metric is a class: `Metric(**params)(model, x, maps, target=None, **data) -> (B,) scores`, with
metadata `name`, `higher_is_better`, `category` (faithfulness / sanity / localization / complexity /
groundtruth) and a one-line `description`. `return_curves=True` also returns the curves a metric has
(deletion/insertion, MoRF/LeRF...) as a dict of tensors. Localization metrics take `boxes=` or
`masks=` as data, ground-truth metrics `truth=`; perturbation metrics take `steps=` and `baseline=`
as parameters; sanity metrics take `method=` (a method name or instance) to recompute maps.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from ..core.errors import ConfigError, InputError
from ..core.registry import Registry
from ..core.explanation import Explanation
from ..core.session import Cost, ModelSession, model_device
from ..core.targets import Target, resolve_target
from ..core.validation import check_images

CATEGORIES = ("faithfulness", "sanity", "localization", "complexity", "groundtruth")
DATA_KEYS = ("boxes", "masks", "truth")

def _check_metric(cls) -> None:
    if cls.category not in CATEGORIES:
        raise TypeError(f"{cls.__name__} needs a category in {CATEGORIES}")


registry: Registry = Registry("metric", skip=1, check=_check_metric)
register = registry.register
get = registry.get


def available(category: str | None = None) -> list[str]:
    return registry.available() if category is None else registry.available(category=category)


def describe() -> dict[str, dict]:
    return {n: {"description": c.description, "category": c.category, "higher_is_better": c.higher_is_better}
            for n, c in ((n, registry.get(n)) for n in registry.available())}


def parameters(name) -> dict[str, object]:
    return registry.parameters(name)


def build(name, **params) -> "Metric":
    return registry.build(name, **params)


@dataclass
class Measurement:
    """What a metric returns: per-image scores (B,), its curves by name (or None), and its cost."""

    scores: torch.Tensor
    curves: dict | None = None
    cost: Cost | None = None


class Metric:
    """Base class; see the module docstring. Metadata on the class: `name`, `description`, `category`,
    `higher_is_better`, `needs_model`, `requires` (data it cannot run without: "boxes_or_masks", "truth",
    "method"), `stochastic`. Parameters are keyword arguments of `__init__` (passed to `super().__init__`)
    or `Param` class attributes. A subclass implements
    `compute(session, x, maps, target, **data) -> Measurement` (session None for metrics without a model)."""

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    category: ClassVar[str] = ""
    higher_is_better: ClassVar[bool] = True
    needs_model: ClassVar[bool] = True
    requires: ClassVar[tuple] = ()
    stochastic: ClassVar[bool] = False

    def __init__(self, **params):
        self.params = dict(params)
        for k, v in params.items():
            setattr(self, k, v)

    def __repr__(self):
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self.params.items())})"

    def __call__(self, model: nn.Module | None, x: torch.Tensor, maps, target=None, *, return_curves: bool = False,
                 image_ids=None, **data):
        """(B,) scores, or (scores, curves) with `return_curves=True`."""
        m = self.measure(model, x, maps, target, image_ids=image_ids, **data)
        return (m.scores, m.curves) if return_curves else m.scores

    def measure(self, model: nn.Module | None, x: torch.Tensor, maps, target=None, *, image_ids=None,
                **data) -> Measurement:
        """Scores, curves and cost in one record (nothing is kept on the instance)."""
        unknown = [k for k in data if k not in DATA_KEYS]
        if unknown:
            raise ConfigError(f"unknown data {', '.join(map(repr, unknown))} for metric '{self.name}'")
        if isinstance(maps, Explanation):
            if target is None:
                target = maps.targets
            if image_ids is None:
                image_ids = maps.image_ids
            maps = maps.maps
        device = model_device(model) if model is not None else None
        x = check_images(x, device)
        maps = check_maps(maps, x)
        if image_ids is not None:
            from ..core.randomness import image_keys

            image_ids = image_keys(x.shape[0], image_ids)
        if model is None:
            if self.needs_model:
                raise InputError(f"metric '{self.name}' needs the model")
            result = self.compute(None, x, maps, None, **data)
            cost = None
        else:
            with ModelSession(model, image_ids=image_ids) as session:
                result = self.compute(session, x, maps, target, **data)
            cost = session.cost
        if not isinstance(result, Measurement):  # TRANSITION: `_score` metrics return bare scores
            result = Measurement(result, getattr(self, "last_curves", None))
        result.scores = result.scores.detach()
        result.cost = cost
        return result

    def compute(self, session, x, maps, target, **data) -> Measurement:
        # TRANSITION: metrics not yet moved to `compute` keep `_score` + `last_curves`.
        self.last_curves = None
        scores = self._score(session, x, maps, target, **data)
        return Measurement(scores, self.last_curves)

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
