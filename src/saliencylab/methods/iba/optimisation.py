"""Fitting the per-sample bottleneck: the batched, image-keyed optimisation (element-wise Adam and
RMSprop from `methods.optimizers`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ... import features as _features
from ...core.errors import ConfigError
from ...core.progress import progress
from ...features import FeatureStats
from ...perturbation import auto_batch_size
from ..optimizers import Adam, RMSprop  # noqa: F401  (importable from here too)
from .bottleneck import BottleneckHook, is_nchw, smooth


@dataclass
class BottleneckResult:
    """What one bottleneck fit computed, per image (first dimension B)."""

    capacity: torch.Tensor  # (B, ...) nats, mean over the noisy copies of the last step
    lam: torch.Tensor  # (B, ...) the (smoothed) lambda of the last step
    losses: torch.Tensor  # (B, steps) each image's loss per step (model loss + beta * mean capacity)
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
    hook.arm(lam, noise, expand=local)
    with torch.no_grad():
        try:
            shared = session.forward(x[uimg])
        except RuntimeError:  # shapes clash: a tensor from before the layer is used after it
            shared = None
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
                        purpose: str | None = None, desc: str = "iba") -> BottleneckResult:
    """Fit one alpha per image at `layer` of `session`'s model; see the package docstring.

    The public building block of the family: `iba`, `inverse_iba`, `multilayer_iba` (once per layer) and
    `input_iba` (its feature stage) call it. `model_loss(outputs, image_index) -> (rows,)` is the
    per-row model loss (see `regression.model_loss_fn`).

    Noise: row (image i, copy s) at step t draws standard-normal numbers keyed by (seed, purpose, image
    key of i, t * samples + s) through `session.random`, so an image's map does not depend on the other
    images of the call, on `batch_size` or on sharding (pass image ids to `explain`). `purpose` defaults
    to "iba" ("inverse_iba" when inverse), so multilayer IBA's map at a layer equals IBA's there.

    reuse_features: True computes each image's features once per chunk and shares them among its noisy
    copies (the model runs up to the layer on len(images) rows, after it on all rows); "auto" runs the
    first chunk copy by copy, checks that sharing reproduces its outputs (one extra no-grad pass of that
    chunk's images) and shares from then on if it does; False runs every copy through the whole model
    (the authors' structure). batch_size None: the device's automatic forward+backward rows
    (`perturbation.auto_batch_size`), rounded down to whole images (a multiple of `samples`), so that an
    image's features are computed once per step when shared.

    The bottleneck is a forward hook inserted as a session edit, undone when this function returns or
    raises."""
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
    rng = session.random(seed, purpose or ("inverse_iba" if inverse else "iba"))

    def lam_of(a):
        lam = torch.sigmoid(a)
        return smooth(lam, sigma) if spatial else lam

    alpha = torch.full((B, *feat), float(initial_alpha), device=dev, dtype=dt, requires_grad=True)
    optimizer = Adam([alpha], lr=lr)
    sign = -1.0 if inverse else 1.0
    total = B * samples
    cap_sum = torch.zeros((B, *feat), device=dev, dtype=dt)
    losses = torch.zeros((B, steps), dtype=torch.float64)
    lam_last = None
    hook = BottleneckHook(mean, std, active, inverse=inverse, relu=relu)
    with session.scope():
        session.hook(_features.module_for(session.model, layer), hook, "forward")
        for step in progress(range(steps), desc=desc, total=steps):
            last = step == steps - 1
            grad = torch.zeros_like(alpha)
            if last:
                with torch.no_grad():
                    lam_last = lam_of(alpha)
            for start in range(0, total, batch_size):
                rows = torch.arange(start, min(start + batch_size, total), device=dev)
                image, sample = rows // samples, rows % samples
                uimg, local = torch.unique_consecutive(image, return_inverse=True)
                lam = lam_of(alpha[uimg])[local]
                noise = rng.normal(image, step * samples + sample, feat, device=dev, dtype=dt)
                share = bool(reuse)  # undecided ("auto"): this first chunk runs copy by copy, then is checked
                hook.arm(lam, noise, expand=local if share else None)
                out = session.forward(x[uimg] if share else x[image])
                if share:  # counted as the rows that run after the layer
                    session.cost.forward_images += len(rows) - len(uimg)
                if hook.capacity is None:
                    raise ConfigError(f"layer '{layer}' did not run during the forward pass")
                cap = hook.capacity
                per_row = (sign * model_loss(out, image) + beta * cap.flatten(1).mean(1)) / samples
                grad += session.grad(per_row, alpha, rows=len(rows))
                losses[:, step].index_add_(0, image.cpu(), per_row.detach().to("cpu", torch.float64))
                if last:
                    cap_sum.index_add_(0, image, cap.detach())
                hook.disarm()
                if reuse is None:
                    reuse = _sharing_matches(session, x, hook, lam.detach(), noise, uimg, local, out.detach())
            optimizer.step([grad])
    return BottleneckResult(cap_sum / samples, lam_last.detach(), losses, bool(reuse))
