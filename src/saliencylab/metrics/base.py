"""The metric contract and registry.

A metric is a class: `Metric(**params)(model, x, maps, target=None, **data) -> (B,) scores`, with
metadata on the class:
- `name`, a one-line `description`, `category` (faithfulness / sanity / localization / complexity /
  groundtruth / counterfactual), `higher_is_better`;
- `needs_model` (False: the metric reads the maps and data only);
- `requires`: the data or parameters it cannot run without: "boxes_or_masks" (localization:
  `boxes=` or `masks=`), "truth" (ground truth: `truth=`), "method" (sanity metrics re-explain with
  the method under evaluation: its `method=` parameter). `missing_requirements(name, ...)` lets a
  runner fail before any work is done;
- `stochastic`: the metric draws random numbers. Every draw is keyed to (seed, purpose, image,
  draw index) through `session.random` (see core.randomness), so with `image_ids=` an image's score
  does not depend on the other images of its batch nor on `batch_size`.

Parameters are declared once, as `Param` class attributes (a subclass that only changes a default
overrides that one declaration); `check()` validates them at construction. `self.params` keeps the
constructor input as given, so `type(m)(**m.params)` rebuilds the metric.

A subclass implements `compute(session, x, maps, target, **data) -> Measurement(scores, curves)`
(session None for metrics without a model); nothing is stored on the instance during a call.
`measure()` returns the Measurement with the cost of the call; `__call__` returns the scores, or
(scores, curves) with `return_curves=True` (deletion/insertion, MoRF/LeRF... curves as a dict of
tensors).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from ..core.errors import ConfigError, InputError
from ..core.registry import Param, Registry, check_known, declared_params  # noqa: F401 (Param: re-exported)
from ..core.explanation import Explanation
from ..core.session import Cost, ModelSession, model_device
from ..core.targets import Target, resolve_target
from ..core.validation import check_images

CATEGORIES = ("faithfulness", "sanity", "localization", "complexity", "groundtruth", "counterfactual")
DATA_KEYS = ("boxes", "masks", "truth")
# What each requirement asks of the caller, in the words of the error message.
REQUIREMENTS = {"boxes_or_masks": "boxes= or masks=", "truth": "truth=", "method": "method="}
_HINTS = {"boxes_or_masks": "the object region: boxes (B, 4) as (x0, y0, x1, y1) pixels, or masks (B, H, W) booleans",
          "truth": "the signed relevance of each pixel, (B, H, W), e.g. an environment batch's batch.truth"}


def _check_metric(cls) -> None:
    if cls.category not in CATEGORIES:
        raise TypeError(f"{cls.__name__} needs a category in {CATEGORIES}")
    unknown = [r for r in cls.requires if r not in REQUIREMENTS]
    if unknown or isinstance(cls.requires, str):
        raise TypeError(f"{cls.__name__}.requires must be a tuple of {', '.join(REQUIREMENTS)}; got {cls.requires!r}")


registry: Registry = Registry("metric", skip=1, check=_check_metric)
register = registry.register
get = registry.get


def available(category: str | None = None) -> list[str]:
    return registry.available() if category is None else registry.available(category=category)


def describe() -> dict[str, dict]:
    return {n: {"description": c.description, "category": c.category, "higher_is_better": c.higher_is_better,
                "requires": tuple(c.requires), "stochastic": c.stochastic}
            for n, c in ((n, registry.get(n)) for n in registry.available())}


def parameters(name) -> dict[str, object]:
    return registry.parameters(name)


def build(name, **params) -> "Metric":
    return registry.build(name, **params)


def _metric_class(name) -> type:
    if isinstance(name, Metric):
        return type(name)
    return name if isinstance(name, type) and issubclass(name, Metric) else get(name)


def requirements(name) -> tuple:
    """What metric `name` cannot run without: a tuple of "boxes_or_masks", "truth", "method"."""
    return tuple(_metric_class(name).requires)


def missing_requirements(name, boxes=None, masks=None, truth=None) -> list[str]:
    """One message per data requirement of metric `name` that the given data does not meet
    (e.g. "metric 'iou' needs boxes= or masks="); empty when it can run. "method" is a parameter
    with a default (the sanity metrics' `method=`), so it is never missing here."""
    cls = _metric_class(name)
    given = {"boxes_or_masks": boxes is not None or masks is not None, "truth": truth is not None, "method": True}
    return [f"metric '{cls.name}' needs {REQUIREMENTS[r]}" for r in cls.requires if not given[r]]


@dataclass
class Measurement:
    """What a metric returns: per-image scores (B,), its curves by name (or None), and its cost."""

    scores: torch.Tensor
    curves: dict | None = None
    cost: Cost | None = None


class Metric:
    """Base class; see the module docstring."""

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    category: ClassVar[str] = ""
    higher_is_better: ClassVar[bool] = True
    needs_model: ClassVar[bool] = True
    requires: ClassVar[tuple] = ()
    stochastic: ClassVar[bool] = False
    # Bumped when results change for the same parameters: stored rows of an older revision are not reused.
    revision: ClassVar[int] = 0

    def __init__(self, **params):
        declared = declared_params(type(self))
        if type(self).__init__ is Metric.__init__:  # a subclass with its own __init__ checks its keywords
            check_known("metric", self.name or type(self).__name__, params, declared)
        missing = [n for n, p in declared.items() if p.required and n not in params]
        if missing:
            raise ConfigError(f"metric '{self.name}' needs {', '.join(map(repr, missing))}")
        # The constructor's input, exactly as given: `type(m)(**m.params)` gives the same metric.
        self.params = dict(params)
        for k, v in params.items():
            setattr(self, k, v)
        self.check()

    def check(self) -> None:
        """Validate parameters at construction (fail now, not after minutes of forward passes)."""

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
        missing = missing_requirements(type(self), **data)
        if missing:  # before any forward pass
            hints = [_HINTS[r] for r in self.requires if r in _HINTS]
            raise InputError("; ".join(missing) + (f" ({'; '.join(hints)})" if hints else ""))
        if isinstance(maps, Explanation):
            if target is None:
                target = maps.targets
            if image_ids is None:
                image_ids = maps.image_ids
            maps = maps.maps
        device = model_device(model) if model is not None else None
        x = check_images(x, device)
        maps = self.check_input(maps, x)
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
        if not isinstance(result, Measurement):
            raise TypeError(f"{type(self).__name__}.compute must return a Measurement, got {type(result).__name__}")
        result.scores = result.scores.detach()
        result.cost = cost
        return result

    def check_input(self, maps, x: torch.Tensor) -> torch.Tensor:
        """The evaluated input checked against the images x: (B, H, W) maps (`check_maps`). The
        counterfactual metrics evaluate images shaped like x instead (metrics.counterfactual)."""
        return check_maps(maps, x)

    def compute(self, session, x, maps, target, **data) -> Measurement:
        """(B,) scores and curves for maps (B, H, W) already checked against images x (B, C, H, W)."""
        raise NotImplementedError(f"{type(self).__name__} must implement compute()")

    def resolve(self, session, x, target) -> Target:
        """Resolve the target against the clean images (one no-grad forward)."""
        with torch.no_grad():
            outputs = session.forward(x)
        return resolve_target(target, outputs)


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
