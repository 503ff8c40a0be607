"""The registered methods: iba, inverse_iba, multilayer_iba (and the shared base of the IBA family)."""

from __future__ import annotations

import math
import os
import sys
import warnings

import torch

from ... import features as _features
from ...core.errors import ConfigError
from ...core.explanation import Explanation
from ...core.layers import get_layer
from ...features import FeatureStats
from ..base import Method, Param, check_batch_size, clean_outputs, register, upsample
from .bottleneck import capacity_map
from .layers import default_layers, layer_list, module_name, probe_layers
from .optimisation import REUSE, optimize_bottleneck
from .regression import model_loss_fn

NO_DATA = (
    "IBA needs feature statistics (per-element mean and std of the bottleneck layer over many images). "
    "Pass data= a folder of images, a tensor of images (N, C, H, W), an iterable of batches, or "
    "saliencylab.features.sample_crops(1000) for the embedded model's demo; they are estimated once and "
    "cached. Without data, statistics are taken from the batch being explained, which needs at least "
    "two images (and is only a rough stand-in)."
)


class StatisticsWarning(UserWarning):
    """Feature statistics were estimated from the explained batch instead of a data set."""


def _caller_level() -> int:
    """The stacklevel of the first frame outside saliencylab: a warning points at the user's call."""
    package = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    frame, level = sys._getframe(1), 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(package + os.sep):
        frame, level = frame.f_back, level + 1
    return level


def _check_int(name, value, minimum=1):
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ConfigError(f"{name} must be an int >= {minimum}, got {value!r}")


def _check_number(name, value, minimum=None, strict=False):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{name} must be a number, got {value!r}")
    if minimum is not None and (value <= minimum if strict else value < minimum):
        raise ConfigError(f"{name} must be {'>' if strict else '>='} {minimum}, got {value!r}")


class IBAMethod(Method):
    """Shared parameters, checks, layer choice and feature statistics of the IBA family.

    Parameters are declared once, here and on `PerSampleIBA`; a variant changes only what differs
    (`inverse_iba` its beta, `readout_iba` its learning rate and batch size). Feature statistics are
    kept in `self._stats_memo`, a cache made at construction and keyed by (layer, image size): results
    never depend on it, it only saves re-reading (or, for sources without a cache key, re-estimating)
    the same statistics at every call."""

    input_space = False
    needs_data = True
    layers_wanted = 1  # how many default layers the method uses
    auto_batch = False  # whether batch_size=None (rows per pass chosen for the device) is supported

    layer = Param(None, "bottleneck layer: a dotted module name or the module (None: the middle spatial layer)")
    data = Param(None, "feature statistics: a folder, a tensor of images, batches, sample_crops(n) or FeatureStats")
    beta = Param(10.0, "weight of the capacity term in the loss")
    lr = Param(1.0, "learning rate")
    sigma = Param(1.0, "std of the Gaussian smoothing of lambda (None: no smoothing)")
    min_std = Param(0.01, "floor of the feature std")
    active_threshold = Param(0.01, "an element is active when non-zero in more than this fraction of the data")
    relu = Param(False, "clamp Z at zero (for a layer followed by a ReLU)")
    cache = Param(True, "keep feature statistics (and trained networks) in the cache folder")
    seed = Param(0, "seed of the random draws")
    batch_size = Param(None, "rows per forward/backward pass (None: chosen for the device)")

    def check(self) -> None:
        if self.batch_size is not None or not self.auto_batch:
            check_batch_size(self.batch_size)
        for name in ("steps", "samples"):
            if hasattr(self, name):
                _check_int(name, getattr(self, name))
        for name in ("beta", "lr", "min_std", "active_threshold"):
            _check_number(name, getattr(self, name), 0.0, strict=name in ("lr", "min_std"))
        if hasattr(self, "initial_alpha"):
            _check_number("initial_alpha", self.initial_alpha)
        if hasattr(self, "reuse_features") and self.reuse_features not in REUSE:
            raise ConfigError(f"reuse_features must be True, False or 'auto', got {self.reuse_features!r}")
        if self.sigma is not None:
            _check_number("sigma", self.sigma, 0.0)
        for n in layer_list(self.layer) or []:
            if not isinstance(n, torch.nn.Module):
                get_layer(self.model, n)  # a misspelt name fails now, with suggestions
        data = self.data
        if isinstance(data, (str, os.PathLike)) and not os.path.isdir(data):
            raise ConfigError(f"data folder '{data}' does not exist" if not os.path.exists(data) else
                              f"data '{data}' is a file; pass a folder of images, a tensor or batches")
        self._stats_memo: dict = {}

    def _one_layer(self) -> None:
        if isinstance(self.layer, (list, tuple)) or (isinstance(self.layer, str) and "," in self.layer):
            raise ConfigError(f"method '{self.name}' takes one layer; use multilayer_iba for several")

    # -- layers
    def _layers(self, session, x, k: int | None = None, probe: bool = False):
        """The bottleneck layer name(s), and the probe (execution order) when it was needed."""
        names = layer_list(self.layer)
        infos = None
        if names is None or probe:
            infos = probe_layers(session, x)
        if names is None:
            names = default_layers(infos, k or self.layers_wanted)
        names = [module_name(session.model, n) for n in names]
        if infos is not None:
            known = {i.name: i for i in infos}
            for n in names:
                if n not in known:
                    raise ConfigError(f"layer '{n}' did not run during the forward pass; choose a layer the model uses")
                if known[n].shape is None:
                    raise ConfigError(f"layer '{n}' does not return a tensor; choose a layer with a feature map output")
                if known[n].calls > 1:
                    raise ConfigError(f"layer '{n}' runs {known[n].calls} times per forward pass; choose a layer "
                                      "that runs once")
            order = {i.name: k for k, i in enumerate(infos)}
            names = sorted(dict.fromkeys(names), key=lambda n: order[n])
        return names, infos

    # -- statistics
    def _stats(self, session, x, names: list[str]) -> dict[str, FeatureStats]:
        if self.data is None:
            if x.shape[0] < 2:
                raise ConfigError(NO_DATA)
            warnings.warn(
                f"{self.name}: no data= given, so feature statistics are estimated from the {x.shape[0]} images "
                "being explained; this is a rough stand-in. " + NO_DATA.split(". ", 1)[1], StatisticsWarning,
                stacklevel=_caller_level())
            return _features.estimate(session, names, x, batch_size=self.batch_size or 32, desc="feature statistics")
        size = tuple(x.shape[-2:])  # folder images are cropped to the explained images' size
        memo = self._stats_memo
        missing = [n for n in names if (n, size) not in memo]
        if missing:
            if _features.is_one_shot(self.data) and memo:
                raise ConfigError("the data iterator was already consumed; pass a tensor, a folder or a re-iterable "
                                  "source (a list of batches, a DataLoader, sample_crops(...))")
            found = _features.feature_stats(session.model, missing, self.data, session=session, cache=self.cache,
                                            batch_size=self.batch_size or 32, size=size)
            memo.update({(n, size): st for n, st in found.items()})
        return {n: memo[(n, size)] for n in names}

    def _bottleneck_params(self, **override) -> dict:
        """The keyword arguments of `optimize_bottleneck` from this method's parameters."""
        keys = ("steps", "samples", "lr", "beta", "sigma", "initial_alpha", "min_std", "active_threshold", "relu",
                "batch_size", "seed", "reuse_features")
        params = {k: getattr(self, k) for k in keys if hasattr(self, k)}
        params.update(override)
        return params


class PerSampleIBA(IBAMethod):
    """The parameters of a per-sample bottleneck fit (`optimize_bottleneck`), shared by iba, inverse_iba,
    multilayer_iba and input_iba's feature stage. Not registered."""

    stochastic = True
    auto_batch = True

    steps = Param(10, "optimisation steps")
    samples = Param(10, "noisy copies per image and step")
    initial_alpha = Param(5.0, "initial alpha (lambda = sigmoid(alpha))")
    reuse_features = Param("auto", "compute each image's features once per chunk (True, False or 'auto')")


def _explain_one_layer(method, session, x, target, *, inverse: bool):
    (layer,), _ = method._layers(session, x)
    stats = method._stats(session, x, [layer])[layer]
    resolved, outputs = clean_outputs(session, x, target)
    loss = model_loss_fn(target, resolved, outputs)
    result = optimize_bottleneck(session, x, layer, stats, loss, inverse=inverse, desc=method.name,
                                 **method._bottleneck_params())
    lowres = capacity_map(result.capacity, x.shape[-2:])
    return Explanation(maps=lowres, targets=resolved.classes, outputs=outputs, lowres=lowres,
                       extras={"layer": layer, "capacity": result.capacity, "lambda": result.lam,
                               "losses": result.losses, "result": result})


@register
class IBA(PerSampleIBA):
    """Per-sample IBA; see the package docstring.

    extras: "layer" (the bottleneck layer's name), "capacity" ((B, C, h, w) nats, mean over the last
    step's copies), "lambda" (the last step's smoothed lambda), "losses" ((B, steps) per-image loss),
    "result" (the `BottleneckResult`). lowres: the (B, h, w) capacity map in bits."""

    name = "iba"
    description = "Per-sample information bottleneck (IBA): bits per location a fitted noise mask lets through."
    inverse = False

    def check(self) -> None:
        super().check()
        self._one_layer()

    def compute(self, session, x, target) -> Explanation:
        return _explain_one_layer(self, session, x, target, inverse=self.inverse)


@register
class InverseIBA(IBA):
    """Inverse IBA (CheXplain-IBA): IBA with Z = lambda * eps + (1 - lambda) * R and loss -CE + beta C;
    only beta's default differs (30). extras as `iba`."""

    name = "inverse_iba"
    description = "Inverse IBA (CheXplain-IBA): noise placed where it destroys the prediction, Z = lam*eps + (1-lam)*R."
    inverse = True

    beta = Param(30.0, "weight of the capacity term in the loss")


COMBINERS = ("sum", "filter", "filter_max")
# CheXplain-IBA `evaluation/gen_attribution_map.py::filtered_mask(..., threshold=[0.006, 0.006])`
FILTER_THRESHOLD = 0.006
FILTER_MAX_THRESHOLD = 0.3  # ours: a fraction of each deeper map's maximum


def _l2_normalised(m: torch.Tensor) -> torch.Tensor:
    return m / m.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1)


def _thresholds(threshold, deeper: int, default: float) -> list[float]:
    if threshold is None:
        return [default] * deeper
    if isinstance(threshold, (list, tuple)):
        if len(threshold) != deeper:
            raise ConfigError(f"threshold needs one value per deeper layer ({deeper}), got {len(threshold)}")
        return [float(t) for t in threshold]
    return [float(threshold)] * deeper


def combine_maps(maps: list[torch.Tensor], how: str = "sum", threshold=None) -> torch.Tensor:
    """Combine (B, H, W) maps ordered shallow to deep (CheXplain-IBA, `evaluation/gen_attribution_map.py`).

    "sum" (`norm_concat_heatmaps`, weights 1): the sum of the maps, each divided by its per-image L2 norm.
    "filter" (`filtered_mask`): the shallowest map, unnormalised, times a binary mask per deeper map:
    1 where the deeper map divided by its per-image L2 norm is >= `threshold` (an absolute value,
    default 0.006), else 0. `threshold` may be one value per deeper map (theirs: a list of two).
    "filter_max" (ours): the shallowest map, kept where every deeper map is >= `threshold` (default
    0.3) times its per-image maximum. The authors' 0.006 was set for 224 x 224 maps, where a uniform
    L2-normalised map is 1/224 = 0.0045 per pixel; the level scales as 1 / sqrt(H W), so at other
    sizes the same number keeps a different share, whereas a fraction of the maximum does not."""
    if how == "sum":
        return sum(_l2_normalised(m) for m in maps)
    if how in ("filter", "filter_max"):
        default = FILTER_THRESHOLD if how == "filter" else FILTER_MAX_THRESHOLD
        out = maps[0]
        for m, t in zip(maps[1:], _thresholds(threshold, len(maps) - 1, default)):
            if how == "filter":
                keep = _l2_normalised(m) >= t
            else:
                keep = m >= t * m.flatten(1).amax(1).view(-1, 1, 1)
            out = out * keep.to(out.dtype)
        return out
    raise ConfigError(f"unknown combine '{how}'; choose one of {', '.join(COMBINERS)}")


@register
class MultiLayerIBA(PerSampleIBA):
    """Multi-layer IBA (CheXplain-IBA): `optimize_bottleneck` at each layer (the public building block
    of `iba`, with the same keyed noise, so each layer's map equals `iba`'s or `inverse_iba`'s there),
    maps upsampled to the input and combined by `combine_maps`: "sum" and "filter" are the authors'
    (`norm_concat_heatmaps`, `filtered_mask`: deeper maps L2-normalised and binarised at the absolute
    level 0.006); "filter_max" (ours, formerly called "filter") thresholds at 0.3 x each deeper map's
    maximum, which does not depend on the image size.

    extras: "layer" (the layers, shallow to deep), "maps" ({layer: (B, H, W) map}), "capacity"
    ({layer: capacity}), "result" ({layer: BottleneckResult}). lowres: the combined map."""

    name = "multilayer_iba"
    description = "Multi-layer IBA (CheXplain-IBA): per-sample IBA at several layers, maps combined (sum or filter)."
    layers_wanted = 3

    combine = Param("sum", "how the per-layer maps are combined: 'sum', 'filter' or 'filter_max'")
    threshold = Param(None, "'filter': level of each L2-normalised deeper map (None: the authors' 0.006); "
                            "'filter_max': fraction of each deeper map's maximum (None: 0.3); a number or one "
                            "per deeper layer")
    inverse = Param(False, "fit inverse bottlenecks (inverse_iba) instead")

    def check(self) -> None:
        super().check()
        if self.combine not in COMBINERS:
            raise ConfigError(f"unknown combine '{self.combine}'; choose one of {', '.join(COMBINERS)}")
        if self.threshold is not None:
            values = self.threshold if isinstance(self.threshold, (list, tuple)) else [self.threshold]
            for t in values:
                _check_number("threshold", t, 0.0)

    def compute(self, session, x, target) -> Explanation:
        hw = x.shape[-2:]
        names, _ = self._layers(session, x, probe=True)  # the probe orders the layers shallow to deep
        stats = self._stats(session, x, names)
        resolved, outputs = clean_outputs(session, x, target)
        loss = model_loss_fn(target, resolved, outputs)
        maps, results = {}, {}
        for name in names:
            r = optimize_bottleneck(session, x, name, stats[name], loss, inverse=bool(self.inverse),
                                    desc=f"{self.name} {name}", **self._bottleneck_params())
            results[name] = r
            m = capacity_map(r.capacity, hw)
            maps[name] = m if tuple(m.shape[-2:]) == tuple(hw) else upsample(m, hw)
        combined = combine_maps(list(maps.values()), self.combine, self.threshold)
        return Explanation(maps=combined, targets=resolved.classes, outputs=outputs, lowres=combined,
                           extras={"layer": names, "maps": maps, "result": results,
                                   "capacity": {n: r.capacity for n, r in results.items()}})
