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
  (`combine="sum"`) or the shallowest map kept where every deeper map is above `threshold` x its
  maximum (`combine="filter"`).

Batching: all images are optimised together. alpha has shape (B, C, h, w) and one Adam optimiser;
Adam is element-wise, so this is exactly B independent optimisers with their own state. Every step,
the `samples` noisy copies of all images are run image-major in forward/backward passes of at most
`batch_size` rows, the gradients of each chunk are accumulated, then Adam steps. Noise comes from one
generator per image seeded with `seed`, so an image's map does not depend on the other images in the
batch or on `batch_size` (up to floating-point summation order).

The bottleneck is a forward hook registered through the model session: it exists only during the call
and is removed (with the session's other hooks) even when the model raises.

Feature statistics (`data=`): a folder path, a tensor of images, an iterable of batches,
`features.sample_crops(n, seed)` or `features.FeatureStats`; estimated once and cached on disk. With
`data=None` and at least two images, statistics are estimated from the batch being explained, with a
warning: this keeps every method runnable without arguments, but statistics of a handful of images are
a poor stand-in for a data set, so pass `data=` for real use. With one image and no data, a ConfigError
says so. `layer=None` picks the middle spatial layer (see `default_layers`).
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from .. import features as _features
from ..core.progress import progress
from ..core.errors import ConfigError, InputError
from ..features import FeatureStats
from ..core.layers import get_layer, to_grid
from ..perturbation import auto_batch_size
from .base import Method, check_batch_size, register

LN2 = math.log(2.0)

NO_DATA = (
    "IBA needs feature statistics (per-element mean and std of the bottleneck layer over many images). "
    "Pass data= a folder of images, a tensor of images (N, C, H, W), an iterable of batches, or "
    "saliencylab.features.sample_crops(1000) for the embedded model's demo; they are estimated once and "
    "cached. Without data, statistics are taken from the batch being explained, which needs at least "
    "two images (and is only a rough stand-in)."
)


class StatisticsWarning(UserWarning):
    """Feature statistics were estimated from the explained batch instead of a data set."""


# -- the bottleneck -------------------------------------------------------------------------------------
def gaussian_kernel(sigma: float, dtype=torch.float32, device=None) -> torch.Tensor:
    """The authors' smoothing kernel: size int(round(2 sigma)) * 2 + 1 (5 for sigma 1), normalised."""
    size = int(round(2 * sigma)) * 2 + 1
    coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(coords[:, None] ** 2 + coords[None, :] ** 2) / (2 * sigma**2))
    return (g / g.sum()).to(dtype=dtype, device=device)


def smooth(lam: torch.Tensor, sigma: float | None) -> torch.Tensor:
    """Depthwise Gaussian smoothing of (N, C, h, w) maps with reflection padding (as the authors)."""
    if not sigma or sigma <= 0:
        return lam
    k = gaussian_kernel(sigma, lam.dtype, lam.device)
    pad = k.shape[-1] // 2
    C = lam.shape[1]
    mode = "reflect" if min(lam.shape[-2:]) > pad else "replicate"
    padded = F.pad(lam, (pad, pad, pad, pad), mode=mode)
    return F.conv2d(padded, k.expand(C, 1, -1, -1), groups=C)


def capacity(r_norm: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """KL(N(lam r, (1-lam)^2) || N(0, 1)) per element, in nats:
    -1/2 [1 + log (1-lam)^2 - (lam r)^2 - (1-lam)^2]. (1-lam)^2 is floored at the dtype's smallest
    normal number so that lam == 1 gives a large finite value instead of inf."""
    var = (1 - lam) ** 2
    log_var = torch.log(var.clamp_min(torch.finfo(var.dtype).tiny))
    return -0.5 * (1 + log_var - (lam * r_norm) ** 2 - var)


def restrict(R, lam, mean, std, active, noise, *, inverse: bool = False, relu: bool = False):
    """Z and the capacity C for features R (rows, ...), lambda, statistics and standard-normal noise."""
    cap = capacity((R - mean) / std, lam) * active
    eps = std * noise + mean
    z = lam * eps + (1 - lam) * R if inverse else lam * R + (1 - lam) * eps
    z = z * active
    if relu:
        z = z.clamp_min(0)
    return z, cap


class BottleneckHook:
    """Forward hook replacing a layer's output R by the bottleneck's Z while armed.

    `arm(lam, noise, expand=None)` sets lambda and standard-normal noise per row; with `expand` (an index
    tensor) the layer's output rows are first gathered, R[expand], so that each image's features are
    computed once and shared by its noisy copies. The capacity of the last call is in `capacity`.
    """

    def __init__(self, mean, std, active, *, inverse: bool = False, relu: bool = False):
        self.mean, self.std, self.active = mean, std, active
        self.inverse, self.relu = inverse, relu
        self.lam = self.noise = self.expand = self.capacity = None
        self.calls = 0

    def arm(self, lam, noise, expand=None):
        self.lam, self.noise, self.expand = lam, noise, expand
        self.calls = 0
        self.capacity = None

    def disarm(self):
        self.lam = self.noise = self.expand = None

    def __call__(self, module, args, output):
        if self.lam is None:
            return None
        self.calls += 1
        if self.calls > 1:
            raise ConfigError("the bottleneck layer runs more than once per forward pass; choose a layer that "
                              "runs once (a module reused in several places cannot hold a bottleneck)")
        if not isinstance(output, torch.Tensor):
            raise ConfigError(f"the bottleneck layer returns a {type(output).__name__}, not a tensor")
        R = output if self.expand is None else output[self.expand]
        if tuple(R.shape[1:]) != tuple(self.mean.shape):
            raise ConfigError(
                f"the layer's output has shape {tuple(R.shape[1:])} but its feature statistics have shape "
                f"{tuple(self.mean.shape)}; estimate them on images of the size you explain")
        z, self.capacity = restrict(R, self.lam, self.mean, self.std, self.active, self.noise,
                                    inverse=self.inverse, relu=self.relu)
        return z


def capacity_map(cap: torch.Tensor, hw) -> torch.Tensor:
    """(B, ...) capacities in nats -> (B, h, w) maps in bits, scaled by (h w) / (H W) (the authors')."""
    grid = to_grid(cap, tuple(hw))
    h, w = grid.shape[-2:]
    return grid.sum(1) / LN2 * (h * w) / (hw[0] * hw[1])


def is_nchw(shape: Sequence[int], hw) -> bool:
    """Whether a feature shape (without batch) is a (C, h, w) map, which is smoothed spatially."""
    if len(shape) != 3:
        return False
    t = torch.zeros((1, *shape))
    try:
        return to_grid(t, tuple(hw)) is t
    except ConfigError:
        return False


# -- regression closures (through callable targets) ------------------------------------------------------
def _select(outputs: torch.Tensor, index) -> torch.Tensor:
    if outputs.dim() == 1:
        return outputs[:, None]
    y = outputs.flatten(1)
    return y if index is None else y[:, index].reshape(len(y), -1)


def mse_target(value, index=None) -> Callable[[torch.Tensor], torch.Tensor]:
    """Regression IBA's "MSE to a target": score = -mean((y - value)^2), y = outputs[:, index] (all
    outputs when index is None). Maximising the score minimises the MSE (CheXplain-IBA
    mse_loss_with_target); `mse_target(0.0)` negated is their "maximize score" closure."""

    def score(outputs: torch.Tensor) -> torch.Tensor:
        y = _select(outputs, index)
        v = torch.as_tensor(value, dtype=y.dtype, device=y.device)
        return -((y - v) ** 2).mean(1)

    score.__name__ = f"mse_target({value!r})"
    return score


class MinimalDeviation:
    """Regression IBA's "minimal deviation": score = -mean((y - y_clean)^2), y_clean the model's output on
    the clean image (CheXplain-IBA mse_loss_minimal_deviation).

    IBA methods bind the clean outputs and pass each row's image index. Unbound (other methods), the
    reference is the rows' own output, so the score and its gradient are zero, which is the exact value
    at the clean image.
    """

    wants_image_index = True

    def __init__(self, index=None, reference: torch.Tensor | None = None):
        self.index, self.reference = index, reference

    def bind(self, clean_outputs: torch.Tensor) -> "MinimalDeviation":
        return MinimalDeviation(self.index, clean_outputs.detach())

    def __call__(self, outputs: torch.Tensor, image_index: torch.Tensor | None = None) -> torch.Tensor:
        y = _select(outputs, self.index)
        if self.reference is None:
            ref = y.detach()
        else:
            ref = _select(self.reference, self.index).to(y)
            ref = ref if image_index is None else ref[image_index.to(ref.device)]
        return -((y - ref) ** 2).mean(1)

    def __repr__(self):
        return f"minimal_deviation(index={self.index!r})"


def minimal_deviation(index=None) -> MinimalDeviation:
    """See MinimalDeviation."""
    return MinimalDeviation(index)


def model_loss_fn(method: Method, target, clean_outputs) -> Callable:
    """Per-row model loss for the bottleneck: CE of the class (-log softmax) or -score of a callable."""
    spec = method._target_spec
    if callable(spec) and not isinstance(spec, torch.Tensor):
        fn = spec.bind(clean_outputs) if hasattr(spec, "bind") else spec
        with_index = getattr(fn, "wants_image_index", False)

        def loss(out, image):
            s = fn(out, image) if with_index else fn(out)
            if not isinstance(s, torch.Tensor) or s.shape != (out.shape[0],):
                raise InputError(f"target callable must return one score per row, shape ({out.shape[0]},)")
            return -s

        return loss
    classes = target.classes

    def ce(out, image):
        return -out.log_softmax(dim=1).gather(1, classes.to(out.device)[image][:, None]).squeeze(1)

    return ce


# -- layers ---------------------------------------------------------------------------------------------
@dataclass
class LayerInfo:
    name: str
    shape: tuple | None  # output shape without batch, None when not a tensor
    calls: int
    nchw: bool

    @property
    def depth(self) -> int:
        return self.name.count(".")


def probe_layers(session, x: torch.Tensor) -> list[LayerInfo]:
    """Every named module in execution order with its output shape and calls, from one forward of x[:1]."""
    names = {m: n for n, m in session.model.named_modules() if n}
    infos: dict[str, LayerInfo] = {}
    hw = tuple(x.shape[-2:])

    def hook(module, args, out):
        name = names.get(module)
        if name is None:
            return
        if name in infos:
            infos[name].calls += 1
            return
        shape = tuple(out.shape[1:]) if isinstance(out, torch.Tensor) else None
        nchw = shape is not None and is_nchw(shape, hw) and shape[1] * shape[2] > 1
        infos[name] = LayerInfo(name, shape, 1, nchw)

    handles = [session.add_forward_hook(m, hook) for m in names]
    try:
        with torch.no_grad():
            session.forward(x[:1])
    finally:
        for h in handles:
            h.remove()
    return list(infos.values())


def _candidate_group(infos: list[LayerInfo]) -> list[LayerInfo]:
    cands = [i for i in infos if i.nchw and i.calls == 1]
    if not cands:
        raise ConfigError("found no layer with a spatial (C, h, w) output that runs once; pass layer='dotted.name'")
    for depth in sorted({c.depth for c in cands}):
        group = [c for c in cands if c.depth == depth]
        if len(group) >= 4:
            return group
    return cands


def default_layers(infos: list[LayerInfo], k: int = 1) -> list[str]:
    """The default bottleneck layer(s): among modules with a (C, h, w) output that run once, take those
    at the shallowest module depth that has at least four of them (top-level layers of a flat CNN,
    blocks.N of the embedded model), in execution order, and pick the middle one (k=1) or k evenly
    spaced inner ones (k=3: at 1/4, 1/2, 3/4)."""
    group = _candidate_group(infos)
    if k == 1:
        return [group[len(group) // 2].name]
    picks = sorted({min(len(group) - 1, len(group) * (i + 1) // (k + 1)) for i in range(k)})
    return [group[p].name for p in picks]


def layer_list(layer) -> list[str] | None:
    """None, a name, a module, a comma-separated string or a sequence of names -> list of names or None."""
    if layer is None:
        return None
    if isinstance(layer, str):
        names = [n.strip() for n in layer.split(",") if n.strip()]
        if not names:
            raise ConfigError("layer is an empty string; pass a dotted module name such as 'blocks.4'")
        return names
    if isinstance(layer, torch.nn.Module):
        return [layer]
    if isinstance(layer, (list, tuple)):
        return [n for item in layer for n in (layer_list(item) or [])]
    raise ConfigError(f"layer must be a dotted module name such as 'blocks.4' (or a list of them), got {layer!r}")


def module_name(model, layer) -> str:
    if isinstance(layer, torch.nn.Module):
        for n, m in model.named_modules():
            if m is layer and n:
                return n
        raise ConfigError("the layer module given is not part of this model")
    return layer


# -- the optimisation -----------------------------------------------------------------------------------
class Adam:
    """torch.optim.Adam's update rule (defaults, no weight decay/amsgrad), element-wise.

    Kept local because constructing a torch.optim optimizer imports torch._dynamo, which costs seconds
    on a small CPU for a ten-step optimisation. Element-wise state means one Adam over a stacked
    (B, ...) tensor is exactly B independent optimisers.
    """

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8):
        self.params = [p for p in params]
        self.lrs = [lr] * len(self.params)
        self.betas, self.eps, self.t = betas, eps, 0
        self.m = [torch.zeros_like(p) for p in self.params]
        self.v = [torch.zeros_like(p) for p in self.params]

    @torch.no_grad()
    def step(self, grads=None) -> None:
        grads = [p.grad for p in self.params] if grads is None else list(grads)
        self.t += 1
        b1, b2 = self.betas
        c1, c2 = 1 - b1**self.t, math.sqrt(1 - b2**self.t)
        for p, g, m, v, lr in zip(self.params, grads, self.m, self.v, self.lrs):
            if g is None:
                continue
            m.lerp_(g, 1 - b1)
            v.mul_(b2).addcmul_(g, g, value=1 - b2)
            p.addcdiv_(m, (v.sqrt() / c2).add_(self.eps), value=-lr / c1)


class RMSprop:
    """torch.optim.RMSprop's update rule (alpha 0.99, eps 1e-8, no momentum), with a learning rate per
    parameter (the InputIBA generator's parameter groups)."""

    def __init__(self, params, lrs, alpha: float = 0.99, eps: float = 1e-8):
        self.params = list(params)
        self.lrs = list(lrs) if isinstance(lrs, (list, tuple)) else [lrs] * len(self.params)
        self.alpha, self.eps = alpha, eps
        self.sq = [torch.zeros_like(p) for p in self.params]

    @torch.no_grad()
    def step(self, grads=None) -> None:
        grads = [p.grad for p in self.params] if grads is None else list(grads)
        for p, g, sq, lr in zip(self.params, grads, self.sq, self.lrs):
            if g is None:
                continue
            sq.mul_(self.alpha).addcmul_(g, g, value=1 - self.alpha)
            p.addcdiv_(g, sq.sqrt().add_(self.eps), value=-lr)


@dataclass
class BottleneckResult:
    capacity: torch.Tensor  # (B, ...) nats, mean over the noisy copies of the last step
    lam: torch.Tensor  # (B, ...) the (smoothed) lambda of the last step
    losses: list  # total loss per step, summed over images
    reused: bool = False  # whether each image's features were computed once and shared by its copies


REUSE = (True, False, "auto")


def _sharing_matches(session, x, hook, lam, noise, uimg, local, ref: torch.Tensor) -> bool:
    """Whether computing each image's features once (R[local]) reproduces `ref`, the outputs of the same
    chunk run copy by copy (same lambda and noise).

    It does unless something computed before the bottleneck layer is used after it (a skip connection
    across the layer, a batch size read from the input): then the shapes clash or the outputs differ.
    One extra no-grad forward pass of the chunk's images, counted in the cost."""
    if len(uimg) == len(ref):
        return False  # one copy per image: nothing to share
    with torch.no_grad():
        try:
            hook.arm(lam, noise, expand=local)
            try:
                shared = session.forward(x[uimg])
            except RuntimeError:  # shapes clash: a tensor from before the layer is used after it
                return False
        finally:
            hook.disarm()
    if not isinstance(shared, torch.Tensor) or shared.shape != ref.shape:
        return False
    scale = float(ref.abs().max()) if ref.numel() else 0.0
    return bool(torch.allclose(shared, ref, rtol=1e-4, atol=1e-5 * max(scale, 1e-12)))


def optimize_bottleneck(session, x: torch.Tensor, layer: str, stats: FeatureStats, model_loss: Callable, *,
                        steps: int = 10, samples: int = 10, lr: float = 1.0, beta: float = 10.0,
                        sigma: float | None = 1.0, initial_alpha: float = 5.0, min_std: float = 0.01,
                        active_threshold: float = 0.01, relu: bool = False, inverse: bool = False,
                        batch_size: int | None = None, seed: int = 0, reuse_features=False,
                        desc: str = "iba") -> BottleneckResult:
    """Fit one alpha per image at `layer`; see the module docstring.

    reuse_features: True computes each image's features once per chunk and shares them among its noisy
    copies (the model runs up to the layer on len(images) rows, after it on all rows); "auto" runs the
    first chunk copy by copy, checks that sharing reproduces its outputs (one extra no-grad pass of that
    chunk's images) and shares from then on if it does; False runs every copy through the whole model
    (the authors' structure). batch_size None: the device's automatic forward+backward rows
    (`perturbation.auto_batch_size`), rounded down to whole images (a multiple of `samples`), so that an
    image's features are computed once per step when shared."""
    if reuse_features not in REUSE:
        raise ConfigError(f"reuse_features must be True, False or 'auto', got {reuse_features!r}")
    reuse = None if reuse_features == "auto" else bool(reuse_features)
    B = x.shape[0]
    dev, dt = x.device, x.dtype
    if batch_size is None:
        batch_size = auto_batch_size(dev, backward=True, pixels=x.shape[-2] * x.shape[-1])
        batch_size = max(batch_size // samples, 1) * samples if batch_size >= samples else batch_size
    feat = stats.shape
    mean = stats.mean.to(dev, dt)
    std = stats.floored_std(min_std).to(dev, dt)
    active = stats.active(active_threshold).to(dev, dt)
    spatial = is_nchw(feat, x.shape[-2:])

    def lam_of(a):
        lam = torch.sigmoid(a)
        return smooth(lam, sigma) if spatial else lam

    hook = BottleneckHook(mean, std, active, inverse=inverse, relu=relu)
    handle = session.add_forward_hook(_features.module_for(session.model, layer), hook)
    alpha = torch.full((B, *feat), float(initial_alpha), device=dev, dtype=dt, requires_grad=True)
    optimizer = Adam([alpha], lr=lr)
    gens = [torch.Generator(device=dev).manual_seed(int(seed)) for _ in range(B)]
    sign = -1.0 if inverse else 1.0
    total = B * samples
    cap_sum = torch.zeros((B, *feat), device=dev, dtype=dt)
    lam_last = None
    losses = []
    try:
        for step in progress(range(steps), desc=desc, total=steps):
            last = step == steps - 1
            noise = torch.stack([torch.randn((samples, *feat), generator=g, device=dev, dtype=dt) for g in gens])
            grad = torch.zeros_like(alpha)
            step_loss = 0.0
            if last:
                with torch.no_grad():
                    lam_last = lam_of(alpha)
            for start in range(0, total, batch_size):
                rows = torch.arange(start, min(start + batch_size, total), device=dev)
                image, sample = rows // samples, rows % samples
                uimg, local = torch.unique_consecutive(image, return_inverse=True)
                lam = lam_of(alpha[uimg])[local]
                share = bool(reuse)  # undecided ("auto"): this first chunk runs copy by copy, then is checked
                hook.arm(lam, noise[image, sample], expand=local if share else None)
                out = session.forward(x[uimg] if share else x[image])
                if share:  # counted as the rows that run after the layer
                    session.cost.forward_images += len(rows) - len(uimg)
                if hook.capacity is None:
                    raise ConfigError(f"layer '{layer}' did not run during the forward pass")
                cap = hook.capacity
                per_row = (sign * model_loss(out, image) + beta * cap.flatten(1).mean(1)) / samples
                grad += session.grad(per_row, alpha, rows=len(rows))
                step_loss += float(per_row.detach().sum())
                if last:
                    cap_sum.index_add_(0, image, cap.detach())
                hook.disarm()
                if reuse is None:
                    reuse = _sharing_matches(session, x, hook, lam.detach(), noise[image, sample], uimg, local,
                                             out.detach())
            losses.append(step_loss)
            optimizer.step([grad])
    finally:
        hook.disarm()
        handle.remove()
    return BottleneckResult(cap_sum / samples, lam_last.detach(), losses, bool(reuse))


# -- the methods ----------------------------------------------------------------------------------------
def _check_int(name, value, minimum=1):
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ConfigError(f"{name} must be an int >= {minimum}, got {value!r}")


def _check_number(name, value, minimum=None, strict=False):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{name} must be a number, got {value!r}")
    if minimum is not None and (value <= minimum if strict else value < minimum):
        raise ConfigError(f"{name} must be {'>' if strict else '>='} {minimum}, got {value!r}")


class IBAMethod(Method):
    """Shared parameter checks, layer choice, feature statistics and target handling for the IBA family."""

    input_space = False
    layers_wanted = 1  # how many default layers the method uses

    auto_batch = False  # whether batch_size=None (rows per pass chosen for the device) is supported

    def __init__(self, model, **params):
        super().__init__(model, **params)
        if self.batch_size is not None or not self.auto_batch:
            check_batch_size(self.batch_size)
        for name in ("steps", "samples"):
            if name in params:
                _check_int(name, params[name])
        for name in ("beta", "lr", "min_std", "active_threshold"):
            if name in params:
                _check_number(name, params[name], 0.0, strict=name in ("lr", "min_std"))
        if "initial_alpha" in params:
            _check_number("initial_alpha", params["initial_alpha"])
        if "reuse_features" in params and params["reuse_features"] not in REUSE:
            raise ConfigError(f"reuse_features must be True, False or 'auto', got {params['reuse_features']!r}")
        if params.get("sigma") is not None:
            _check_number("sigma", params["sigma"], 0.0)
        names = layer_list(params.get("layer"))
        for n in names or []:
            if not isinstance(n, torch.nn.Module):
                get_layer(model, n)  # a misspelt name fails now, with suggestions
        data = params.get("data")
        if isinstance(data, (str, os.PathLike)) and not os.path.isdir(data):
            raise ConfigError(f"data folder '{data}' does not exist" if not os.path.exists(data) else
                              f"data '{data}' is a file; pass a folder of images, a tensor or batches")
        if isinstance(data, torch.Tensor):  # records (Explanation.params, reports) get a summary, not the pixels
            self.params["data"] = f"tensor{tuple(data.shape)}"
        self._memo: dict = {}
        self.last_layer = None
        self.last_lowres: torch.Tensor | None = None
        self.last_result = None

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
                stacklevel=4)
            return _features.estimate(session, names, x, batch_size=self.batch_size or 32, desc="feature statistics")
        size = tuple(x.shape[-2:])  # folder images are cropped to the explained images' size
        missing = [n for n in names if (n, size) not in self._memo]
        if missing:
            if _features.is_one_shot(self.data) and self._memo:
                raise ConfigError("the data iterator was already consumed; pass a tensor, a folder or a re-iterable "
                                  "source (a list of batches, a DataLoader, sample_crops(...))")
            found = _features.feature_stats(session.model, missing, self.data, session=session, cache=self.cache,
                                            batch_size=self.batch_size or 32, size=size)
            self._memo.update({(n, size): st for n, st in found.items()})
        return {n: self._memo[(n, size)] for n in names}

    def _bottleneck_params(self, **override) -> dict:
        keys = ("steps", "samples", "lr", "beta", "sigma", "initial_alpha", "min_std", "active_threshold", "relu",
                "batch_size", "seed", "reuse_features")
        params = {k: getattr(self, k) for k in keys if hasattr(self, k)}
        params.update(override)
        return params


@register
class IBA(IBAMethod):
    name = "iba"
    description = "Per-sample information bottleneck (IBA): bits per location a fitted noise mask lets through."
    inverse = False
    auto_batch = True

    def __init__(self, model, *, layer=None, data=None, beta: float = 10.0, steps: int = 10, samples: int = 10,
                 lr: float = 1.0, sigma: float | None = 1.0, initial_alpha: float = 5.0, min_std: float = 0.01,
                 active_threshold: float = 0.01, relu: bool = False, reuse_features="auto",
                 cache: bool = True, seed: int = 0, batch_size: int | None = None):
        super().__init__(model, layer=layer, data=data, beta=beta, steps=steps, samples=samples, lr=lr, sigma=sigma,
                         initial_alpha=initial_alpha, min_std=min_std, active_threshold=active_threshold, relu=relu,
                         reuse_features=reuse_features, cache=cache, seed=seed, batch_size=batch_size)
        if isinstance(self.layer, (list, tuple)) or (isinstance(self.layer, str) and "," in self.layer):
            raise ConfigError(f"method '{self.name}' takes one layer; use multilayer_iba for several")

    def _attribute(self, session, x, target):
        (layer,), _ = self._layers(session, x)
        stats = self._stats(session, x, [layer])[layer]
        target = self.resolve(session, x)
        loss = model_loss_fn(self, target, self.last_outputs)
        result = optimize_bottleneck(session, x, layer, stats, loss, inverse=self.inverse, desc=self.name,
                                     **self._bottleneck_params())
        self.last_layer, self.last_result = layer, result
        self.last_lowres = capacity_map(result.capacity, x.shape[-2:])
        return self.last_lowres


@register
class InverseIBA(IBA):
    name = "inverse_iba"
    description = "Inverse IBA (CheXplain-IBA): noise placed where it destroys the prediction, Z = lam*eps + (1-lam)*R."
    inverse = True

    def __init__(self, model, *, layer=None, data=None, beta: float = 30.0, steps: int = 10, samples: int = 10,
                 lr: float = 1.0, sigma: float | None = 1.0, initial_alpha: float = 5.0, min_std: float = 0.01,
                 active_threshold: float = 0.01, relu: bool = False, reuse_features="auto",
                 cache: bool = True, seed: int = 0, batch_size: int | None = None):
        super().__init__(model, layer=layer, data=data, beta=beta, steps=steps, samples=samples, lr=lr, sigma=sigma,
                         initial_alpha=initial_alpha, min_std=min_std, active_threshold=active_threshold, relu=relu,
                         reuse_features=reuse_features, cache=cache, seed=seed, batch_size=batch_size)


COMBINERS = ("sum", "filter")


def _upsample(maps: torch.Tensor, hw) -> torch.Tensor:
    if tuple(maps.shape[-2:]) == tuple(hw):
        return maps
    return F.interpolate(maps[:, None], size=tuple(hw), mode="bilinear", align_corners=False)[:, 0]


def combine_maps(maps: list[torch.Tensor], how: str = "sum", threshold: float = 0.3) -> torch.Tensor:
    """Combine (B, H, W) maps ordered shallow to deep.

    "sum": sum of the maps, each divided by its per-image L2 norm. "filter": the shallowest map, kept
    where every deeper map is at least `threshold` times its per-image maximum (zero elsewhere)."""
    if how == "sum":
        return sum(m / m.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1) for m in maps)
    if how == "filter":
        out = maps[0]
        for m in maps[1:]:
            peak = m.flatten(1).amax(1).view(-1, 1, 1)
            out = out * (m >= threshold * peak).to(out.dtype)
        return out
    raise ConfigError(f"unknown combine '{how}'; choose one of {', '.join(COMBINERS)}")


@register
class MultiLayerIBA(IBAMethod):
    name = "multilayer_iba"
    description = "Multi-layer IBA (CheXplain-IBA): per-sample IBA at several layers, maps combined (sum or filter)."
    layers_wanted = 3
    auto_batch = True

    def __init__(self, model, *, layer=None, data=None, combine: str = "sum", threshold: float = 0.3,
                 inverse: bool = False, beta: float = 10.0, steps: int = 10, samples: int = 10, lr: float = 1.0,
                 sigma: float | None = 1.0, initial_alpha: float = 5.0, min_std: float = 0.01,
                 active_threshold: float = 0.01, relu: bool = False, reuse_features="auto",
                 cache: bool = True, seed: int = 0, batch_size: int | None = None):
        super().__init__(model, layer=layer, data=data, combine=combine, threshold=threshold, inverse=inverse,
                         beta=beta, steps=steps, samples=samples, lr=lr, sigma=sigma, initial_alpha=initial_alpha,
                         min_std=min_std, active_threshold=active_threshold, relu=relu,
                         reuse_features=reuse_features, cache=cache, seed=seed, batch_size=batch_size)
        if combine not in COMBINERS:
            raise ConfigError(f"unknown combine '{combine}'; choose one of {', '.join(COMBINERS)}")
        _check_number("threshold", threshold, 0.0)

    def _attribute(self, session, x, target):
        names, _ = self._layers(session, x, probe=True)  # the probe orders the layers shallow to deep
        stats = self._stats(session, x, names)
        target = self.resolve(session, x)
        loss = model_loss_fn(self, target, self.last_outputs)
        maps, results = [], {}
        for name in names:
            r = optimize_bottleneck(session, x, name, stats[name], loss, inverse=self.inverse,
                                    desc=f"{self.name} {name}", **self._bottleneck_params())
            results[name] = r
            maps.append(_upsample(capacity_map(r.capacity, x.shape[-2:]), x.shape[-2:]))
        self.last_layer, self.last_result = names, results
        self.last_maps = dict(zip(names, maps))
        self.last_lowres = combine_maps(maps, self.combine, self.threshold)
        return self.last_lowres
