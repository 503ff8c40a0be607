"""The latent-gradient counterfactual: the plain baseline for latent-space counterfactuals.

Starting from a latent code z (e.g. an encoder's code of the query), Adam steps on z raise the
classifier's log-probability of the target class for the generated image G(z), optionally with an
L1 proximity term that keeps G(z) near the start image G(z_0):

    minimise over z:  -log softmax(f(G(z)))[target] + proximity_weight * mean |G(z) - G(z_0)|

No mapping is learned (C3LT learns one per class pair, see counterfactuals.c3lt); each image is
optimised on its own, for a fixed number of steps. The L1 proximity is C3LT's proximity loss without
its mask terms (khorrams/c3lt, c3lt/helper.py `proximity_loss` with p1 = p2 = 0), per image, with one
difference: C3LT measures it from the real query image (c3lt/train.py: `proximity_loss(imgs_1, imgs_1_cf)`,
marked "TODO imgs v.s. recon_imgs"), here from the start image G(z_0) (only the codes are given); for
the query's own code, G(z_0) is its reconstruction. C3LT averages its losses over the batch, here they
are summed over the images (each code's gradient its own image's; Adam is invariant to that scale up to
its epsilon).

>>> x_cf, z_cf = latent_gradient_counterfactual(generator, classifier, z, target=8, steps=100)

The models are only used through model sessions: eval mode and frozen parameters during the call
(the gradient is taken with respect to z only), their modes and requires_grad flags restored after.
The loss sums the images' terms and Adam is elementwise, so an image's result does not depend on the
other images of its batch.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..core.errors import ConfigError, InputError
from ..core.session import ModelSession, model_device


def _target_classes(target, batch: int) -> torch.Tensor:
    if isinstance(target, bool) or target is None or callable(target) and not isinstance(target, torch.Tensor):
        raise InputError(f"target must be a class index (an int or one per latent code), got {target!r}")
    classes = torch.as_tensor(target)
    if classes.is_floating_point() or classes.dtype == torch.bool:
        raise InputError(f"target class indices must be integers, got dtype {classes.dtype}")
    classes = classes.long().reshape(-1)
    if classes.numel() == 1:
        classes = classes.expand(batch)
    if classes.numel() != batch:
        raise InputError(f"got {classes.numel()} targets for {batch} latent codes; give one per code or a single int")
    return classes


def latent_gradient_counterfactual(generator: nn.Module, classifier: nn.Module, z: torch.Tensor, target, *,
                                   steps: int = 100, lr: float = 0.05, proximity_weight: float = 0.0):
    """Counterfactuals by gradient steps on the latent codes: returns (x_cf, z_cf), detached.

    generator: z (B, ...) -> images (B, C, H, W); classifier: images -> logits (B, classes);
    z: the starting codes (B, ...); target: the counterfactual class, an int or B ints;
    steps: Adam steps (0 returns G(z)); lr: Adam's learning rate; proximity_weight: weight of the L1
    distance between G(z) and the start image G(z_0) (0: none).
    """
    for name, m in (("generator", generator), ("classifier", classifier)):
        if not isinstance(m, nn.Module):
            raise InputError(f"the {name} must be a torch.nn.Module, got {type(m).__name__}")
    if not isinstance(z, torch.Tensor) or z.dim() < 2 or not z.is_floating_point() or z.shape[0] == 0:
        got = tuple(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__
        raise InputError(f"z must be a floating-point tensor of latent codes (B, ...), got {got}")
    if not torch.isfinite(z).all():
        raise InputError("z contains NaN or infinite values")
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 0:
        raise ConfigError(f"steps must be a non-negative int, got {steps!r}")
    if not isinstance(lr, (int, float)) or isinstance(lr, bool) or not math.isfinite(lr) or lr <= 0:
        raise ConfigError(f"lr must be a positive number, got {lr!r}")
    if (not isinstance(proximity_weight, (int, float)) or isinstance(proximity_weight, bool)
            or not math.isfinite(proximity_weight) or proximity_weight < 0):
        raise ConfigError(f"proximity_weight must be a non-negative number, got {proximity_weight!r}")
    B = z.shape[0]
    classes = _target_classes(target, B)
    z0 = z.detach().to(model_device(generator)).clone()
    classes = classes.to(z0.device)
    with ModelSession(generator) as gen, ModelSession(classifier) as cls:
        with torch.no_grad():
            start = gen.forward(z0)
            logits = cls.forward(start)
        if logits.dim() != 2:
            raise InputError(f"the classifier must return logits (B, classes), got shape {tuple(logits.shape)}")
        bad = (classes < 0) | (classes >= logits.shape[1])
        if bad.any():
            i = int(bad.nonzero()[0])
            raise InputError(f"target {int(classes[i])} is out of range for a classifier with {logits.shape[1]} "
                             f"outputs (code {i})")
        code = z0.clone().requires_grad_(True)
        optimizer = torch.optim.Adam([code], lr=float(lr))
        for _ in range(steps):
            with torch.enable_grad():
                images = gen.forward(code)
                # summed over images: each code's gradient is its own image's (batch-independent)
                loss = -cls.forward(images).log_softmax(1).gather(1, classes[:, None]).sum()
                if proximity_weight:
                    loss = loss + float(proximity_weight) * (images - start).abs().flatten(1).mean(1).sum()
                (grad,) = torch.autograd.grad(loss, code)
            code.grad = grad
            optimizer.step()
        with torch.no_grad():
            x_cf = gen.forward(code)
    return x_cf.detach(), code.detach()
