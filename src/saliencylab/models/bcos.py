"""B-cos networks: layers, the (x, 1 - x) input encoding and a small B-cos CNN.

Boehle, Fritz, Schiele, "B-cos Networks: Alignment is All We Need for Interpretability" (CVPR 2022)
and "B-cos Alignment for Inherently Interpretable CNNs and Vision Transformers" (TPAMI 2024, "B-cos
v2"). A B-cos unit computes

    out = |cos(x, w)|^(b - 1) * (w_hat . x),        w_hat = w / ||w||,

no biases, so a B-cos network is a *dynamic linear* map: out(x) = W(x) x. Its explanation is the
contribution map W(x) * x, exact by construction (see `saliencylab.methods.bcos`, method "bcos").

Adapted from the authors' B-cos v2 code, https://github.com/B-cos/B-cos-v2 (Apache-2.0, Copyright the
B-cos authors): `bcos/modules/bcosconv2d.py` (`NormedConv2d`, `BcosConv2d.forward_impl`,
`calc_patch_norms`), `bcos/modules/bcoslinear.py` (`NormedLinear`, `BcosLinear`),
`bcos/data/transforms.py` (`AddInverse`), `bcos/modules/logitlayer.py` (`LogitLayer`) and
`bcos/common.py` (`gradient_to_image`). The v1 code (moboehle/B-cos) is under a non-commercial licence:
only read for its semantics (its `scale` / `scale_fact=100` output division, dropped in v2), not copied.

What matches the authors (v2): unit-norm weights normalised in every forward; patch norms
sqrt(sum over the window of ||x||^2 + 1e-6) (zero padding counts as zeros); for b = 2 the dynamic
scale |w_hat . x| / ||x|| (no epsilon), otherwise (|w_hat . x| / ||x|| + 1e-6)^(b - 1); MaxOut over
groups of `max_out` consecutive output channels (channel o * max_out + m); no `scale` division (v2's
`BcosConv2d`; v1's scale lives on in their deprecated `BcosConv2dWithScale`); a B-cos 1x1 classifier
before global average pooling, then a logit layer (optional temperature, bias -log(K - 1)).

Deliberate differences:
- Explanation mode. The authors' `detach` flag (kept, with their `set_explanation_mode`) detaches
  the dynamic scale from the whole graph, so with `create_graph=True` an explanation's gradient never
  reaches the parameters through the scales. Our layers add `forward_linearised(z, x)` = W(x) z
  (scale and MaxOut choice computed at x, differentiable there): the "bcos" method uses it for
  create_graph=True, so a loss on W(x) * x gets its true gradient w.r.t. every parameter (checked
  against finite differences). saliencylab never sets either persistently: the method switches them
  through the ModelSession, undone at exit.
- `BcosCNN` is ours (a small plain B-cos CNN for 32-64 px images, no normalisation layers), shaped
  like the authors' CIFAR-10 nets (v1 `experiments/CIFAR10/bcos/model.py`: a stack of B-cos convs,
  MaxOut 2, stride-2 downsampling; v2: classifier before pooling, `LogitLayer`).
- `gradient_to_image` returns a torch tensor, channels first ((4, H, W) or (B, 4, H, W), RGBA in
  [0, 1]), batched with a per-image alpha percentile; the authors return an (H, W, 4) numpy array.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["NormedConv2d", "NormedLinear", "BcosConv2d", "BcosLinear", "AddInverse", "LogitLayer", "BcosCNN",
           "gradient_to_image", "is_bcos_module"]


class NormedConv2d(nn.Conv2d):
    """A convolution with unit-norm filters (each output channel's weight normalised in every forward)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight / torch.linalg.vector_norm(self.weight, dim=(1, 2, 3), keepdim=True)
        return self._conv_forward(x, w, self.bias)


class NormedLinear(nn.Linear):
    """A linear layer with unit-norm weight rows."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight / torch.linalg.vector_norm(self.weight, dim=1, keepdim=True)
        return F.linear(x, w, self.bias)


def _dynamic_scale(out: torch.Tensor, norm: torch.Tensor, b: float) -> torch.Tensor:
    """|cos|^(b - 1), cos = out / norm (the authors' `forward_impl` after the MaxOut)."""
    if b == 2:
        return out.abs() / norm
    return ((out / norm).abs() + 1e-6).pow(b - 1)


class BcosConv2d(nn.Module):
    """B-cos convolution: unit-norm filters, output scaled by |cos(patch, filter)|^(b - 1), MaxOut.

    No bias (a B-cos network is dynamic linear). `detach=True` is the authors' explanation mode: the
    dynamic scale is detached, so the input gradient is the layer's linear map W(x).
    `forward_linearised(z, x)` applies W(x) to z (see the module docstring)."""

    def __init__(self, in_ch: int, out_ch: int, kernel_size=1, stride=1, padding=0, b: float = 2, max_out: int = 1):
        super().__init__()
        if max_out < 1:
            raise ValueError(f"max_out must be >= 1, got {max_out}")
        self.in_channels, self.out_channels = in_ch, out_ch
        self.kernel_size, self.stride, self.padding = kernel_size, stride, padding
        self.b, self.max_out = b, max_out
        self.detach = False
        self.linear = NormedConv2d(in_ch, out_ch * max_out, kernel_size, stride, padding, bias=False)
        self.patch_size = int(math.prod(self.linear.kernel_size))

    def set_explanation_mode(self, activate: bool = True) -> None:
        """The authors' switch (persistent; saliencylab's method uses session edits instead)."""
        self.detach = bool(activate)

    def patch_norms(self, x: torch.Tensor) -> torch.Tensor:
        """||patch|| for every output position: the windowed sum of squares over all input channels."""
        squares = (x ** 2).sum(1, keepdim=True)
        return (F.avg_pool2d(squares, self.linear.kernel_size, self.linear.stride, self.linear.padding)
                * self.patch_size + 1e-6).sqrt()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.linear(x)
        if self.max_out > 1:
            out = out.unflatten(1, (self.out_channels, self.max_out)).max(dim=2).values
        if self.b == 1:
            return out
        norm = self.patch_norms(x)
        if self.detach:
            return _dynamic_scale(out.detach(), norm.detach(), self.b) * out
        return _dynamic_scale(out, norm, self.b) * out

    def forward_linearised(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """W(x) z: the linear map this layer applies at input `x` (its MaxOut choice and dynamic scale,
        kept differentiable in `x` and the weights) applied to `z`; equals `forward(x)` at z = x."""
        out, lin = self.linear(x), self.linear(z)
        if self.max_out > 1:
            out = out.unflatten(1, (self.out_channels, self.max_out))
            index = out.argmax(2, keepdim=True)
            out = out.gather(2, index).squeeze(2)
            lin = lin.unflatten(1, (self.out_channels, self.max_out)).gather(2, index).squeeze(2)
        if self.b == 1:
            return lin
        return _dynamic_scale(out, self.patch_norms(x), self.b) * lin

    def extra_repr(self) -> str:
        return f"b={self.b}" + (f", max_out={self.max_out}" if self.max_out > 1 else "")


class BcosLinear(nn.Module):
    """B-cos linear layer (same transform as `BcosConv2d` on vectors; input norm ||x|| + 1e-12)."""

    def __init__(self, in_f: int, out_f: int, b: float = 2, max_out: int = 1):
        super().__init__()
        if max_out < 1:
            raise ValueError(f"max_out must be >= 1, got {max_out}")
        self.in_features, self.out_features = in_f, out_f
        self.b, self.max_out = b, max_out
        self.detach = False
        self.linear = NormedLinear(in_f, out_f * max_out, bias=False)

    def set_explanation_mode(self, activate: bool = True) -> None:
        self.detach = bool(activate)

    @staticmethod
    def norm(x: torch.Tensor) -> torch.Tensor:
        return torch.linalg.vector_norm(x, dim=-1, keepdim=True) + 1e-12

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.linear(x)
        if self.max_out > 1:
            out = out.unflatten(-1, (self.out_features, self.max_out)).max(dim=-1).values
        if self.b == 1:
            return out
        norm = self.norm(x)
        if self.detach:
            return _dynamic_scale(out.detach(), norm.detach(), self.b) * out
        return _dynamic_scale(out, norm, self.b) * out

    def forward_linearised(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """W(x) z (see `BcosConv2d.forward_linearised`)."""
        out, lin = self.linear(x), self.linear(z)
        if self.max_out > 1:
            out = out.unflatten(-1, (self.out_features, self.max_out))
            index = out.argmax(-1, keepdim=True)
            out = out.gather(-1, index).squeeze(-1)
            lin = lin.unflatten(-1, (self.out_features, self.max_out)).gather(-1, index).squeeze(-1)
        if self.b == 1:
            return lin
        return _dynamic_scale(out, self.norm(x), self.b) * lin

    def extra_repr(self) -> str:
        return f"b={self.b}" + (f", max_out={self.max_out}" if self.max_out > 1 else "")


class AddInverse(nn.Module):
    """x -> cat(x, 1 - x) on the channel axis (dim -3): every pixel's encoding has the same norm
    share per channel pair, so dark and bright pixels can both contribute (the authors' encoding)."""

    def __init__(self, dim: int = -3):
        super().__init__()
        self.dim = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, 1 - x], dim=self.dim)


class LogitLayer(nn.Module):
    """logits / temperature + bias (both optional constants, as in the authors' `LogitLayer`)."""

    def __init__(self, temperature: float | None = None, bias: float | None = None):
        super().__init__()
        self.temperature, self.bias = temperature, bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.temperature is not None:
            x = x / self.temperature
        if self.bias is not None:
            x = x + self.bias
        return x

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, bias={self.bias}"


class BcosCNN(nn.Module):
    """A small B-cos CNN for [0, 1] images (32-64 px): AddInverse, four 3x3 B-cos convs (MaxOut 2,
    two of stride 2), a 1x1 B-cos classifier, global average pooling, a logit layer.

    `features` is the last 3x3 conv (a layer for Grad-CAM); `conv1`, `conv2`, `conv3` come before it.
    `logit_bias` defaults to the authors' -log(K - 1) (0 for two classes); `logit_temperature` None."""

    def __init__(self, num_classes: int = 2, in_channels: int = 3, width: int = 16, b: float = 2,
                 max_out: int = 2, logit_bias: float | None = None, logit_temperature: float | None = None):
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        w = width
        self.encode = AddInverse()
        self.conv1 = BcosConv2d(2 * in_channels, w, 3, padding=1, b=b, max_out=max_out)
        self.conv2 = BcosConv2d(w, 2 * w, 3, stride=2, padding=1, b=b, max_out=max_out)
        self.conv3 = BcosConv2d(2 * w, 2 * w, 3, stride=2, padding=1, b=b, max_out=max_out)
        self.features = BcosConv2d(2 * w, 2 * w, 3, padding=1, b=b, max_out=max_out)
        self.classifier = BcosConv2d(2 * w, num_classes, 1, b=b, max_out=max_out)
        self.pool = nn.AdaptiveAvgPool2d(1)
        bias = -math.log(num_classes - 1) if logit_bias is None else logit_bias
        self.logit = LogitLayer(logit_temperature, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.encode(x)
        x = self.conv3(self.conv2(self.conv1(x)))
        x = self.classifier(self.features(x))
        return self.logit(self.pool(x).flatten(1))


def is_bcos_module(module: nn.Module) -> bool:
    """A module with an explanation-mode flag: ours, and the authors' v1/v2 layers and detachable norms
    (a boolean `detach` attribute and a `set_explanation_mode` (v2) or `explanation_mode` (v1) method)."""
    return isinstance(getattr(module, "detach", None), bool) and (
        callable(getattr(module, "set_explanation_mode", None)) or callable(getattr(module, "explanation_mode", None)))


def gradient_to_image(image: torch.Tensor, weights: torch.Tensor, smooth: int = 15,
                      alpha_percentile: float = 99.5) -> torch.Tensor:
    """The authors' colour explanation from the dynamic linear weights W(x) of the encoded input.

    `image`, `weights`: (6, H, W) or (B, 6, H, W) (encoded (r, g, b, 1-r, 1-g, 1-b) input and W(x),
    e.g. `explain(..., "bcos", return_weights=True).extras["encoded"]` / `["weights"]`). Returns RGBA in
    [0, 1], (4, H, W) or (B, 4, H, W): colour = each pixel's weights scaled to max |entry| 1, negatives
    clipped, r / (r + (1-r)) per channel pair; alpha = ||W(x)|| per pixel, 0 where the pixel's
    contribution is negative, smoothed by a `smooth` box filter and divided by its `alpha_percentile`
    percentile (per image), clipped to 1. (bcos/common.py `gradient_to_image`; tensor, channels first.)
    """
    single = image.dim() == 3
    img, w = (image[None], weights[None]) if single else (image, weights)
    if img.shape != w.shape or img.dim() != 4 or img.shape[1] != 6:
        raise ValueError(f"expected (B, 6, H, W) image and weights of one shape, got {tuple(image.shape)} "
                         f"and {tuple(weights.shape)}")
    img, w = img.detach(), w.detach()
    contribs = (img * w).sum(1, keepdim=True)
    rgb = (w / (w.abs().amax(1, keepdim=True) + 1e-12)).clamp(min=0)
    rgb = rgb[:, :3] / (rgb[:, :3] + rgb[:, 3:] + 1e-12)
    alpha = torch.linalg.vector_norm(w, dim=1, keepdim=True)
    alpha = torch.where(contribs < 0, torch.full_like(alpha, 1e-12), alpha)
    if smooth:
        alpha = F.avg_pool2d(alpha, smooth, stride=1, padding=(smooth - 1) // 2)
    cut = torch.quantile(alpha.flatten(1), alpha_percentile / 100, dim=1)[:, None, None, None]
    alpha = (alpha / cut).clamp(0, 1)
    out = torch.cat([rgb, alpha], dim=1)
    return out[0] if single else out
