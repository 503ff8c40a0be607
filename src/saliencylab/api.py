"""`explain`: one call from a model and images to an Explanation."""

from __future__ import annotations

from torch import nn

from . import methods as _methods
from . import metrics as _metrics
from .explanation import Explanation
from .targets import TargetSpec


def explain(model: nn.Module, x, method="integrated_gradients", target: TargetSpec = None, *,
            channels: bool = False, **params) -> Explanation:
    """Explain `model`'s decision on images `x` (B, C, H, W) with a registered method.

    `method` is a registered name (see `saliencylab.methods.available()`), a Method class, or a
    Method instance (then `params` must be empty). `target`: None (predicted class), an int, B ints,
    or a callable `f(outputs) -> (B,)`.
    """
    if isinstance(method, _methods.Method):
        if params:
            raise TypeError("pass parameters to the Method instance, not to explain()")
        instance = method
    else:
        instance = _methods.build(method, model, **params)
    maps = instance.attribute(x, target, channels=channels)
    return Explanation(
        maps=maps,
        targets=instance.last_targets,
        method=instance.name,
        params=dict(instance.params),
        cost=instance.last_cost,
        outputs=instance.last_outputs,
    )


def evaluate(model: nn.Module | None, x, maps, metric="deletion", target: TargetSpec = None, *,
             return_curves: bool = False, **params):
    """Score explanations `maps` (B, H, W) (or an Explanation) with a registered metric: (B,) scores.

    Localization metrics take `boxes=` or `masks=`; other keyword arguments are the metric's
    parameters (see `saliencylab.metrics.parameters(name)`). With `return_curves=True` returns
    (scores, curves) where the metric has curves.
    """
    data = {k: params.pop(k) for k in list(params) if k in _metrics.base.DATA_KEYS}
    instance = metric if isinstance(metric, _metrics.Metric) else _metrics.build(metric, **params)
    return instance(model, x, maps, target, return_curves=return_curves, **data)
