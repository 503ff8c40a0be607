"""Sanity checks: does the explanation depend on what it claims to explain? Lower similarity = better.

- `model_randomization` (Adebayo et al. 2018, "Sanity checks for saliency maps", cascading model
  parameter randomization): on a deep copy of the model (the user's model is never touched), the
  layers are re-initialized one after the other from the output down, cumulatively; after each,
  the maps are recomputed with `method` and compared with the given maps. Score: the per-image mean
  similarity over layers; curves {"layers": names, "similarity": (B, L)}.
- `random_logit` (Sixt et al. 2020, "When explanations lie"; Quantus RandomLogit): the similarity
  between the given map of the explained class and the map, by `method`, of a random other class
  (uniform over the other classes, drawn per image from `session.random(seed, OTHER_CLASS)`, so an
  image's class does not depend on its batch). A map that ignores the class scores high. (This
  covers a "target sensitivity" check as well.)

Both re-explain through the method's public `explain(..., image_ids=session.image_ids)` (a
stochastic method draws the same noise per image as it would on its own) and add its passes to the
metric's cost (`session.charge`).

The given `maps` are taken as the method's original maps: compute them with the same `method` and
`method_params` (and target). Targets are resolved once on the user's model (None = predicted class)
and the same classes are explained on the randomized copies. Similarities: "spearman",
"spearman_abs", "ssim", "hog" (see saliencylab.metrics.similarity) or a callable f(a, b) -> (B,).

Re-initialization of a module: every submodule that owns parameters is reset with its own
`reset_parameters()` (for BatchNorm this also resets the running statistics) under
`torch.manual_seed(seed + layer index)` inside `torch.random.fork_rng()`, so the global RNG is not
disturbed; parameters of modules without `reset_parameters` are redrawn from N(0, s), s the
parameter's current standard deviation (1 if that is 0 or undefined).
"""

from __future__ import annotations

import copy
import difflib

import torch
from torch import nn

from .. import methods as _methods
from ..core.errors import ConfigError, InputError
from ..core.registry import Param
from ..core.targets import resolve_target
from .base import Measurement, Metric, register
from .similarity import SIMILARITIES, get_similarity


def _check_similarity(similarity):
    if not callable(similarity) and similarity not in SIMILARITIES:
        raise ConfigError(f"unknown similarity {similarity!r}; choose one of {', '.join(SIMILARITIES)}")


def _check_method(method, method_params):
    if method_params is not None and not isinstance(method_params, dict):
        raise ConfigError(f"method_params must be a dict, got {type(method_params).__name__}")
    if isinstance(method, _methods.Method):
        if method_params:
            raise ConfigError("pass the parameters to the Method instance or as method_params, not both")
        return
    cls = _methods.get(method)
    known = _methods.parameters(cls.name)
    unknown = [k for k in (method_params or {}) if k not in known]
    if unknown:
        raise ConfigError(f"unknown method_params {', '.join(map(repr, unknown))} for method '{cls.name}'; "
                          f"its parameters are: {', '.join(known) or '(none)'}")


def make_method(method, method_params, model: nn.Module) -> _methods.Method:
    """The method, on `model`: a fresh instance (a Method instance is rebuilt with its parameters)."""
    if isinstance(method, _methods.Method):
        return type(method)(model, **method.params)
    return _methods.build(method, model, **(method_params or {}))


OTHER_CLASS = "random_logit other class"  # purpose of random_logit's draws (core.randomness)


def _target_spec(target):
    return target.classes if target.fn is None else target.fn


def _owns_parameters(module: nn.Module) -> bool:
    return any(True for _ in module.parameters(recurse=False))


def default_layers(model: nn.Module) -> list[str]:
    """Every module that owns parameters, output layer first (reverse registration order)."""
    return [name for name, module in model.named_modules() if _owns_parameters(module)][::-1]


def reinitialize(module: nn.Module, seed: int) -> None:
    """Re-initialize every parameter-owning submodule of `module`; see the module docstring."""
    targets = [m for m in module.modules() if _owns_parameters(m)]
    devices = sorted({p.device.index or 0 for m in targets for p in m.parameters(recurse=False)
                      if p.device.type == "cuda"})
    with torch.random.fork_rng(devices=devices), torch.no_grad():
        torch.manual_seed(seed)
        for m in targets:
            if callable(getattr(m, "reset_parameters", None)):
                m.reset_parameters()
                continue
            for p in m.parameters(recurse=False):
                s = p.detach().float().std() if p.numel() > 1 else torch.tensor(float("nan"))
                s = float(s) if torch.isfinite(s) and s > 0 else 1.0
                p.normal_(0.0, s)


class _SanityMetric(Metric):
    category = "sanity"
    higher_is_better = False
    requires = ("method",)

    method = Param("gradient", "the method that made the maps (a registered name or a Method instance)")
    method_params = Param(None, "its parameters, when `method` is a name")

    def check(self):
        _check_method(self.method, self.method_params)
        _check_similarity(self.similarity)


@register
class ModelRandomization(_SanityMetric):
    name = "model_randomization"
    description = ("Cascading model-parameter randomization (Adebayo et al.): mean similarity of the maps "
                   "to maps of progressively randomized models; lower is better.")
    stochastic = True  # random weights, drawn per layer from `seed` (the same for every image)

    similarity = Param("spearman", "spearman, spearman_abs, ssim, hog or a callable f(a, b) -> (B,)")
    seed = Param(0, "weight re-initialization (layer i uses seed + i)")
    layers = Param(None, "module names to randomize, in order (None: every layer with parameters, output first)")

    def check(self):
        super().check()
        layers = self.layers
        if layers is not None and (isinstance(layers, str) or not layers
                                   or not all(isinstance(n, str) for n in layers)):
            raise ConfigError(f"layers must be None or a non-empty list of module names, got {layers!r}")

    def _layer_names(self, model: nn.Module) -> list[str]:
        if self.layers is None:
            names = default_layers(model)
            if not names:
                raise InputError("model_randomization needs a model with parameters")
            return names
        modules = dict(model.named_modules())
        for name in self.layers:
            if name not in modules:
                close = difflib.get_close_matches(name, list(modules), n=3)
                hint = f"; did you mean {', '.join(close)}?" if close else ""
                raise ConfigError(f"no module named '{name}' in the model{hint}")
            if not any(True for _ in modules[name].parameters()):
                raise ConfigError(f"module '{name}' has no parameters to randomize")
        return list(self.layers)

    def compute(self, session, x, maps, target, **data):
        target = self.resolve(session, x, target)
        try:
            model = copy.deepcopy(session.model)
        except Exception as e:  # noqa: BLE001 - any failure to copy means we cannot work on a copy
            raise InputError(f"model_randomization works on a copy of the model, but copy.deepcopy failed: {e}") from e
        names = self._layer_names(model)
        modules = dict(model.named_modules())
        similarity = get_similarity(self.similarity)
        spec = _target_spec(target)
        curves = []
        for i, name in enumerate(names):
            reinitialize(modules[name], self.seed + i)
            method = make_method(self.method, self.method_params, model)
            e = method.explain(x, spec, image_ids=session.image_ids)
            session.charge(e.cost)
            curves.append(similarity(maps, e.maps.to(maps.dtype)))
        curves = torch.stack(curves, 1)
        return Measurement(curves.mean(1), {"layers": names, "similarity": curves})


@register
class RandomLogit(_SanityMetric):
    name = "random_logit"
    description = ("Similarity between the map of the explained class and the map of a random other class "
                   "(Sixt et al.); lower is better.")
    stochastic = True

    similarity = Param("ssim", "spearman, spearman_abs, ssim, hog or a callable f(a, b) -> (B,)")
    seed = Param(0, "the other class of each image")

    def compute(self, session, x, maps, target, **data):
        with torch.no_grad():
            outputs = session.forward(x)
        target = resolve_target(target, outputs)
        if target.classes is None:
            raise InputError("random_logit explains another class: it needs class targets (None, an int or B "
                             "ints), not a callable")
        classes = outputs.shape[1]
        if classes < 2:
            raise InputError("random_logit needs a model with at least 2 outputs")
        B = x.shape[0]
        shift = session.random(self.seed, OTHER_CLASS).integers(torch.arange(B), torch.zeros(B, dtype=torch.long),
                                                                1, classes)
        other = (target.classes.cpu() + shift) % classes
        method = make_method(self.method, self.method_params, session.model)
        e = method.explain(x, other.to(x.device), image_ids=session.image_ids)
        session.charge(e.cost)
        return Measurement(get_similarity(self.similarity)(maps, e.maps.to(maps.dtype)), {"other_class": other})
