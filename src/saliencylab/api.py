"""`explain` and `evaluate`: one call from a model and images to an Explanation or scores."""

from __future__ import annotations

from torch import nn

from . import methods as _methods
from . import metrics as _metrics
from .core.explanation import Explanation
from .core.targets import TargetSpec


def explain(model: nn.Module, x, method="integrated_gradients", target: TargetSpec = None, *,
            channels: bool = False, create_graph: bool = False, image_ids=None, **params) -> Explanation:
    """Explain `model`'s decision on images `x` (B, C, H, W) with a registered method.

    `method` is a registered name (see `saliencylab.methods.available()`), a Method class, or a
    Method instance (then `params` must be empty). `target`: None (predicted class), an int, B ints,
    or a callable `f(outputs) -> (B,)`. `create_graph=True` returns maps that carry gradient to the
    model's parameters (train with explanation losses; differentiable methods only) and leaves the
    model's train/eval mode as the caller set it. `image_ids` key the random draws of stochastic
    methods, so an image's map does not depend on the batch it was explained in.
    """
    if isinstance(method, _methods.Method):
        if params:
            raise TypeError("pass parameters to the Method instance, not to explain()")
        instance = method
    else:
        instance = _methods.build(method, model, **params)
    return instance.explain(x, target, channels=channels, create_graph=create_graph, image_ids=image_ids)


def evaluate(model: nn.Module | None, x, maps, metric="deletion", target: TargetSpec = None, *,
             return_curves: bool = False, image_ids=None, **params):
    """Score explanations `maps` (B, H, W) (or an Explanation) with a registered metric: (B,) scores.

    Localization metrics take `boxes=` or `masks=`; other keyword arguments are the metric's
    parameters (see `saliencylab.metrics.parameters(name)`). With `return_curves=True` returns
    (scores, curves) where the metric has curves. `image_ids` key a stochastic metric's draws to the
    images (an Explanation carries its own), so scores do not depend on batching.
    """
    data = {k: params.pop(k) for k in list(params) if k in _metrics.base.DATA_KEYS}
    instance = metric if isinstance(metric, _metrics.Metric) else _metrics.build(metric, **params)
    return instance(model, x, maps, target, return_curves=return_curves, image_ids=image_ids, **data)
