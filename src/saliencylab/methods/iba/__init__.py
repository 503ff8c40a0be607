"""Information bottleneck attribution (IBA) and its extensions.

Per-sample IBA (Schulz et al. 2020, "Restricting the Flow"; BioroboticsLab/IBA IBA/pytorch.py) replaces a
layer's output R by Z = lambda * R + (1 - lambda) * eps, eps ~ N(mu, sigma^2) with per-element feature
statistics (see `saliencylab.features`), lambda = GaussSmooth_{sigma=1, kernel 5}(sigmoid(alpha)), alpha
initialised to 5, and fits alpha per image by minimising

    CE(target) + beta * mean(C),   C = -1/2 [1 + log (1-lambda)^2 - (lambda r)^2 - (1-lambda)^2] * active,

r = (R - mu) / sigma (sigma floored at 0.01), over `steps` Adam steps (lr 1) on `samples` noisy copies
(defaults from the authors' code: beta 10, 10 steps, 10 copies). The map is C summed over channels in
bits (/ ln 2), scaled by (h w) / (H W) and upsampled bilinearly; like the authors' code it is the
capacity of the last step's forward pass.

Extensions (CAMP-eXplain-AI/CheXplain-IBA):
- `inverse_iba`: Z = lambda * eps + (1 - lambda) * R, loss = -CE + beta * mean(C) (beta 30), i.e. the
  noise is put where it hurts the prediction most; the map is the same capacity of lambda.
- regression closures through callable targets: `mse_target(value)` (score -(y - value)^2) and
  `minimal_deviation()` (score -(y - y_clean)^2, the output on the clean image); the IBA loss uses
  -score as its model loss.
- `multilayer_iba`: per-sample IBA at several layers, combined as the sum of L2-normalised maps
  (`combine="sum"`, their `norm_concat_heatmaps`) or the shallowest map kept where every deeper map,
  divided by its L2 norm, is >= 0.006 (`combine="filter"`, their `filtered_mask`, both in
  `evaluation/gen_attribution_map.py`). Ours, `combine="filter_max"`: kept where every deeper map is
  >= 0.3 x its maximum (a level that does not depend on the image size, unlike 0.006).

Batching: all images are optimised together. alpha has shape (B, C, h, w) and one Adam optimiser;
Adam is element-wise, so this is exactly B independent optimisers with their own state. Every step,
the `samples` noisy copies of all images are run image-major in forward/backward passes of at most
`batch_size` rows, the gradients of each chunk are accumulated, then Adam steps. The noise of copy s
of image i at step t is keyed by (seed, image key, t * samples + s) (`session.random`; the image key is
the caller's image id, or the position in the call), so an image's map does not depend on the other
images in the batch, on `batch_size` or on sharding (up to floating-point summation order). Where we
differ from the authors: they draw one noise tensor per step for their single image from the global
torch generator.

The bottleneck is a forward hook inserted as a session edit (`session.hook` inside `session.scope()`):
it exists only during the fit and is removed even when the model raises.

Results: `explain` returns an Explanation whose `extras` hold what was computed ("layer", "capacity",
"lambda", "losses", "result"; per layer for `multilayer_iba`, see each class). Nothing is stored on the
method instance during a call.

Feature statistics (`data=`): a folder path, a tensor of images, an iterable of batches,
`features.sample_crops(n, seed)` or `features.FeatureStats`; estimated once and cached on disk. With
`data=None` and at least two images, statistics are estimated from the batch being explained, with a
warning: this keeps every method runnable without arguments, but statistics of a handful of images are
a poor stand-in for a data set, so pass `data=` for real use. With one image and no data, a ConfigError
says so. `layer=None` picks the middle spatial layer (see `default_layers`).

Package layout (one module per part): `bottleneck` (Z, capacity, the hook, capacity maps), `regression`
(closures, the model loss), `layers` (probing, default layers), `optimisation` (Adam, RMSprop,
`optimize_bottleneck`), `methods` (the registered methods). Every public name is importable from here.
"""

from .bottleneck import (LN2, BottleneckHook, capacity, capacity_map, gaussian_kernel, is_nchw,  # noqa: F401
                         restrict, smooth)
from .layers import LayerInfo, default_layers, layer_list, module_name, probe_layers  # noqa: F401
from .methods import (COMBINERS, IBA, NO_DATA, IBAMethod, InverseIBA, MultiLayerIBA, PerSampleIBA,  # noqa: F401
                      StatisticsWarning, combine_maps)
from .optimisation import REUSE, Adam, BottleneckResult, RMSprop, optimize_bottleneck  # noqa: F401
from .regression import MinimalDeviation, minimal_deviation, model_loss_fn, mse_target  # noqa: F401

__all__ = [
    "LN2", "BottleneckHook", "capacity", "capacity_map", "gaussian_kernel", "is_nchw", "restrict", "smooth",
    "LayerInfo", "default_layers", "layer_list", "module_name", "probe_layers",
    "COMBINERS", "IBA", "NO_DATA", "IBAMethod", "InverseIBA", "MultiLayerIBA", "PerSampleIBA", "StatisticsWarning",
    "combine_maps", "REUSE", "Adam", "BottleneckResult", "RMSprop", "optimize_bottleneck",
    "MinimalDeviation", "minimal_deviation", "model_loss_fn", "mse_target",
]
