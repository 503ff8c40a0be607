"""Guided backpropagation (Springenberg et al. 2015, "Striving for simplicity").

The backward pass through every ReLU-family activation module lets only positive gradients through:
the ordinary ReLU derivative (gradient where the input was positive) is combined with the "deconvnet"
rule (gradient where the incoming gradient is positive). The families handled are `nn.ReLU` and
`nn.ReLU6`, both piecewise linear with a zero region, matching captum's GuidedBackprop for nn.ReLU.
Smooth activations (LeakyReLU, GELU, SiLU, ...) are left untouched, and ReLUs called as functions
(`F.relu`, `torch.relu`) cannot be hooked: a model with no ReLU modules is refused.
"""

from __future__ import annotations

import torch
from torch import nn

from ..core.errors import ConfigError
from ..core.explanation import Explanation
from .base import Method, Param, check_batch_size, register, replace_activation_backward
from .gradient import clean_gradients

GUIDED_ACTIVATIONS = (nn.ReLU, nn.ReLU6)


class _ClampGrad(torch.autograd.Function):
    """Identity in the forward pass; lets only non-negative gradients through in the backward pass."""

    @staticmethod
    def forward(ctx, x):
        # A copy, not x itself: returning an input (or a view of it) from a custom Function forbids
        # later in-place ops such as the next ReLU(inplace=True).
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad.clamp(min=0)


def _clamp_output(module, args, output):
    # Applied on every call, so a ReLU module reused several times in one forward is guided each time.
    if isinstance(output, torch.Tensor) and output.requires_grad:
        return _ClampGrad.apply(output)
    return None


def add_guided_hooks(session) -> int:
    """Hook every ReLU/ReLU6 module of the session's model; returns how many were hooked.

    The hooks are session edits: they go at the session's exit, or at the end of an enclosing
    `session.scope()`."""
    modules = [m for m in session.model.modules() if isinstance(m, GUIDED_ACTIVATIONS)]
    if not modules:
        raise ConfigError(
            "guided backprop needs nn.ReLU or nn.ReLU6 modules to modify, and this model has none; "
            "functional relu calls (F.relu, torch.relu) cannot be hooked"
        )
    for module in modules:
        session.add_forward_hook(module, _clamp_output)
    return len(modules)


@register
class GuidedBackprop(Method):
    name = "guided_backprop"
    description = "Guided backprop: gradients with negative values zeroed at every ReLU/ReLU6 module."
    batch_size = Param(32, "images per forward+backward pass")

    def check(self):
        check_batch_size(self.batch_size)

    def compute(self, session, x, target):
        with session.scope():
            add_guided_hooks(session)
            grads, outputs, classes = clean_gradients(session, x, target, self.batch_size)
        return Explanation(maps=grads, targets=classes, outputs=outputs)


class _DeconvRelu(torch.autograd.Function):
    """Output of a ReLU forward; backward relu(gradient), whatever the ReLU's input was (DeconvNet)."""

    @staticmethod
    def forward(ctx, x, y):
        return y.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad.clamp(min=0), None


@register
class Deconvnet(Method):
    """DeconvNet (Zeiler & Fergus 2014) as a backward rule: at every ReLU/ReLU6 module the gradient is
    relu(incoming gradient), ignoring where the forward input was positive (guided backprop keeps
    both conditions, the plain gradient only the forward one). As captum.attr.Deconvolution for
    nn.ReLU; ReLU6 modules get the same rule (Captum leaves them alone). In-place ReLUs are switched
    to out-of-place for the call (an edit), or the rule would be masked by the ReLU's own backward."""

    name = "deconvnet"
    description = "DeconvNet: gradients with the ReLU rule replaced by relu(incoming gradient)."
    batch_size = Param(32, "images per forward+backward pass")

    def check(self):
        check_batch_size(self.batch_size)

    def compute(self, session, x, target):
        with session.scope():
            modules = [m for m in session.model.modules() if isinstance(m, GUIDED_ACTIVATIONS)]
            if not modules:
                raise ConfigError("deconvnet needs nn.ReLU or nn.ReLU6 modules to modify, and this model has none")
            # in-place ReLUs are switched off: they would overwrite the input the rule routes to
            replace_activation_backward(session, modules, _DeconvRelu)
            grads, outputs, classes = clean_gradients(session, x, target, self.batch_size)
        return Explanation(maps=grads, targets=classes, outputs=outputs)


def nearest_percentile(values: torch.Tensor, q: float) -> torch.Tensor:
    """Per row of (B, N): the q-th percentile with 'nearest' interpolation (tf.contrib.distributions
    .percentile's default, which RectGrad's authors use): the value of rank round(q/100 (N-1))."""
    n = values.shape[1]
    k = int(torch.round(torch.tensor(q / 100.0 * (n - 1))).item())
    return values.kthvalue(k + 1, dim=1).values


class _RectifiedRelu(torch.autograd.Function):
    """Backward: the incoming gradient where output * gradient exceeds its q-th percentile over the
    layer (per image), else 0 (Kim et al. 2019), replacing the activation's own derivative."""

    @staticmethod
    def forward(ctx, x, y, q):
        ctx.save_for_backward(y)
        ctx.q = q
        return y.clone()

    @staticmethod
    def backward(ctx, grad):
        (y,) = ctx.saved_tensors
        importance = y * grad
        threshold = nearest_percentile(importance.flatten(1), ctx.q).view(-1, *([1] * (grad.dim() - 1)))
        return torch.where(importance > threshold, grad, torch.zeros_like(grad)), None, None


class _ZeroBorder(torch.autograd.Function):
    """Identity forward; backward zeroes a border of `width` pixels of the gradient (RectGrad's
    padding trick for "same" convolutions)."""

    @staticmethod
    def forward(ctx, z, width):
        ctx.width = width
        return z.clone()

    @staticmethod
    def backward(ctx, grad):
        wh, ww = ctx.width
        keep = torch.zeros_like(grad[:1, :1])
        keep[..., wh:grad.shape[-2] - wh, ww:grad.shape[-1] - ww] = 1
        return grad * keep, None


@register
class RectGrad(Method):
    """Rectified gradient (Kim, Seo, Jeong, Yoon 2019, "Why are saliency maps noisy? Cause of and
    solution to noisy saliency maps"; authors' code 1202kbs/Rectified-Gradient, deepexplain
    `RectifiedGradient`): at every activation module the gradient passes only where
    activation x gradient is above its `percentile`-th value over the layer, per image ('nearest'
    percentile, as their tf.contrib percentile); the map is gradient x input, as theirs. Their default
    also zeroes the gradient's 1-pixel border before each "SAME" convolution's backward pass
    (`zero_border=True`, here for every stride-1 Conv2d whose padding keeps the size: the border is
    its padding width).

    Where we differ: the rule applies to the activation *modules* of `activations` (theirs: every
    TF activation op, including functional ones); RectGrad's percentile of 98 is per layer and per
    image, as theirs."""

    name = "rectgrad"
    description = "RectGrad: gradient x input with gradients passed only where activation x gradient is in the top 2%."
    percentile = Param(98.0, "pass gradients where activation x gradient exceeds this percentile of the layer")
    zero_border = Param(True, "zero the gradient's border before 'same' convolutions (the authors' padding trick)")
    activations = Param((nn.ReLU, nn.ReLU6), "activation module types the rule replaces")
    batch_size = Param(32, "images per forward+backward pass")

    def check(self):
        check_batch_size(self.batch_size)
        if not 0 <= float(self.percentile) <= 100:
            raise ConfigError(f"percentile must be in [0, 100], got {self.percentile}")

    def compute(self, session, x, target):
        q = float(self.percentile)

        def border(module, args, output):
            if output.requires_grad and output.dim() == 4 and output.shape[-2:] == args[0].shape[-2:]:
                return _ZeroBorder.apply(output, tuple(module.padding))
            return None

        with session.scope():
            modules = [m for m in session.model.modules() if isinstance(m, tuple(self.activations))]
            if not modules:
                raise ConfigError("rectgrad needs activation modules to modify, and this model has none of "
                                  f"{', '.join(t.__name__ for t in self.activations)}")
            replace_activation_backward(session, modules, _RectifiedRelu, q)
            if self.zero_border:
                for module in session.model.modules():
                    if (isinstance(module, nn.Conv2d) and module.stride == (1, 1) and not isinstance(module.padding, str)
                            and any(module.padding)):
                        session.add_forward_hook(module, border)
            grads, outputs, classes = clean_gradients(session, x, target, self.batch_size)
        return Explanation(maps=grads * x, targets=classes, outputs=outputs)
