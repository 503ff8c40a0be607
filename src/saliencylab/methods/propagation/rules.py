"""LRP rules for linear layers (convolutions and dense layers) and the pass rule for activations.

Formulas (Bach et al. 2015; Montavon et al. 2017, 2019), with the generalisations of Zennit
(Anders et al. 2021) to inputs of both signs. Notation for one layer z = W x + b: x its input, z its
actual output, R the relevance of its outputs, x+ = max(x, 0), x- = min(x, 0), W+ / W- likewise,
stab(d) = d + eps * (sign(d) + [d == 0]) (a zero denominator gets +eps).

- `Epsilon(eps)`: R_in = x * W^T (R / stab_eps(z)); eps = 0 is LRP-0.
- `ZPlus()`: positive contributions only: D = W+ x+ + b+ + W- x-,
  R_in = x+ * W+^T (R / D) + x- * W-^T (R / D) (alpha 1, beta 0).
- `AlphaBeta(alpha, beta)`, alpha - beta = 1: positive part P = W+ x+ + b+ + W- x-, negative part
  N = W- x+ + b- + W+ x-; R_in = alpha (x+ W+^T + x- W-^T)(R / P) - beta (x+ W-^T + x- W+^T)(R / N).
- `Gamma(gamma)`: W_a = W + gamma W+, W_b = W + gamma W- (biases likewise). Outputs with z > 0 share
  R by P = W_a x+ + b_a + W_b x-, those with z < 0 by N = W_b x+ + b_b + W_a x-;
  R_in = x+ * (W_a^T s_P + W_b^T s_N) + x- * (W_b^T s_P + W_a^T s_N), s_P = [z > 0] R / P, s_N = [z < 0] R / N.
- `Flat()`: every input of a receptive field gets the same share: R_in = 1^T (R / stab(1^T 1)).
- `WSquare()`: R_in = (W^2)^T (R / stab(W^2 1 + b^2)).
- `ZBox(low, high)`: for bounded inputs low <= x <= high (pixels):
  D = W x + b - (W+ low + b+) - (W- high + b-); R_in = (x W^T - low W+^T - high W-^T)(R / D).

Flat, WSquare and ZBox give relevance to inputs independently of their value, so they are input-layer
rules: a composite may put them on the first layer only (see `lrp.py` for why).

The rules compute, for each layer, either R_in (the first layer) or c_in = R_in / x (every other
layer): relevance travels through the network as c = R / value, which makes the ordinary gradient of
additions (residual connections), average pooling, reshapes and concatenations split relevance in
proportion to their inputs with no rule at all (see `lrp.py`). Every rule above except the input-layer
ones gives R_in as x times something, so c_in needs no division by x.
"""

from __future__ import annotations

import torch

from ...core.errors import ConfigError

STABILIZER = 1e-6  # Zennit's default denominator stabiliser for the rules without their own epsilon


def stabilize(d: torch.Tensor, eps: float = STABILIZER) -> torch.Tensor:
    """d + eps * (sign(d) + [d == 0]): never zero, sign kept (Zennit's convention; -0.0 counts as 0).

    Computed as (|d| + eps) with the sign of d + 0.0 (which turns -0.0 into +0.0): bit for bit the same
    as d + where(d >= 0, eps, -eps), and some ten times faster on CPU than torch.where."""
    return d.abs().add_(eps).copysign_(d + 0.0)


def _pos(t):
    return None if t is None else t.clamp(min=0)


def _neg(t):
    return None if t is None else t.clamp(max=0)


class Rule:
    """A rule for one linear layer. `layer` gives `forward(inp, weight, bias)` and `vjp(weight, grad)`
    (the layer's linear map with other parameters, and its transpose) and `cached(key, make)` (tensors
    derived from the layer's parameters, made once per call); see `lrp.LinearLayer`.

    The backward pass of a layer is split in two: `prepare(layer, x, z)` runs in the forward pass, on
    the layer's input x and output z, and returns what the backward needs (never z itself: the model
    may change it in place afterwards); `backward(layer, x, prepared, c)` turns c = R / z at the output
    into c_in = R_in / x. A rule written against the one-step interface (`ratio(layer, x, z, R)` or,
    for the first layer, `relevance(layer, x, z, R)`) works unchanged: the default `prepare` keeps a
    copy of z."""

    name = "rule"
    input_layer_only = False  # gives relevance to inputs regardless of their value

    def prepare(self, layer, x, z):
        return z.clone()

    def backward(self, layer, x, prepared, c):
        """c_in = R_in / x (every layer but the first)."""
        return self.ratio(layer, x, prepared, prepared * c)

    def input_relevance(self, layer, x, prepared, c):
        """R_in (the first layer)."""
        return self.relevance(layer, x, prepared, prepared * c)

    def relevance(self, layer, x, z, R):
        """R_in: the relevance of the layer's inputs (used for the first layer)."""
        return x * self.ratio(layer, x, z, R)

    def ratio(self, layer, x, z, R):
        """c_in = R_in / x (a rule with relevance proportional to x computes it without dividing)."""
        raise ConfigError(f"the {self.name} rule can only be used on the first layer")

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({args})"


class _Proportional(Rule):
    """Rules whose R_in is x times something: the first layer multiplies c_in by x."""

    def input_relevance(self, layer, x, prepared, c):
        return self.backward(layer, x, prepared, c).mul_(x)


class Epsilon(_Proportional):
    """R_in = x * W^T (R / stab_eps(z)) with R = z c, i.e. c_in = W^T (c * z / stab_eps(z)): the gradient
    of the layer with its output gradient scaled by z / stab_eps(z) = |z| / (|z| + eps) (0 where z = 0;
    at eps = 0 that factor is [z != 0]), computed in the forward pass."""

    name = "epsilon"

    def __init__(self, epsilon: float = 1e-6):
        if epsilon < 0:
            raise ConfigError(f"epsilon must be >= 0, got {epsilon}")
        self.epsilon = float(epsilon)

    def prepare(self, layer, x, z):
        a = z.abs()
        if self.epsilon > 0:
            return a.div_(a + self.epsilon)
        return a.sign_()  # [z != 0] without a bool tensor (bool masks multiply slowly on CPU)

    def backward(self, layer, x, prepared, c):
        return layer.vjp(layer.weight, c * prepared)


def _by_part(layer, t, parts):
    """A view of a layer output (or of `parts` outputs stacked along the channels, see `_stack`) with an
    axis for the parts: (N, parts, channels, -1) for convolutions, (..., parts, out) for dense layers."""
    if layer.is_dense:
        return t.reshape(*t.shape[:-1], parts, t.shape[-1] // parts)
    return t.reshape(t.shape[0], parts, t.shape[1] // parts, -1)


def _part_shape(layer, parts):
    """Shape that broadcasts one value per part against `_by_part` views."""
    return (parts, 1) if layer.is_dense else (parts, 1, 1)


def _stack(tensors):
    """Weights (or biases) of several parts as one layer with parts x the output channels (see
    `LinearLayer.forward_parts`)."""
    if tensors[0] is None:
        return None
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors, 0)


class _SignSplit(_Proportional):
    """Rules that split a layer by the signs of weights and inputs (z-plus, alpha-beta, gamma). Each of
    the rule's parts k has a denominator D_k = A_k x+ + B_k x- + b_k and a numerator n_k(z):
    c_in = x+-mask * sum_k A_k^T s_k + x--mask * sum_k B_k^T s_k, s_k = c * n_k(z) / stab(D_k).
    The parts are stacked into one layer (one call of the map for x+, one for x- when the input has
    negative values, the same for the transposes), the stacked weights are made once per call, and
    n_k(z) / stab(D_k) is computed in the forward pass, so the backward is one product and the
    transposed map(s)."""

    parts = 1

    def weights(self, W, b):
        """([A_k], [B_k], [b_k]) for the layer's weight and bias."""
        raise NotImplementedError

    def numerators(self, layer, z, D):
        """n_k(z) / stab(D_k), with z and D viewed by part (`_by_part`); D may be overwritten."""
        raise NotImplementedError

    def _weights(self, layer):
        def make():
            A, B, b = self.weights(layer.weight, layer.bias)
            return _stack(A), _stack(B), _stack(b)
        return layer.cached(self, make)

    def prepare(self, layer, x, z):
        A, B, b = self._weights(layer)
        k = self.parts
        mixed = bool(x.min() < 0) if x.numel() else False
        if mixed:
            D = layer.forward_parts(x.clamp(min=0), A, b, k).add_(layer.forward_parts(x.clamp(max=0), B, None, k))
        else:  # after a ReLU-like activation the x- terms vanish: one call of the map, x+ = x
            D = layer.forward_parts(x, A, b, k)
        return self.numerators(layer, _by_part(layer, z, 1), _by_part(layer, D, self.parts)), mixed

    def backward(self, layer, x, prepared, c):
        ratio, mixed = prepared
        A, B, _ = self._weights(layer)
        # ratio is used once: overwrite it. c may be strided (the gradient of padding is a slice): it is
        # broadcast against a view of ratio, not reshaped (which would copy it)
        if layer.is_dense:
            s = ratio.view(*c.shape[:-1], self.parts, c.shape[-1]).mul_(c.unsqueeze(-2)).view(*c.shape[:-1], -1)
        else:
            s = ratio.view(c.shape[0], self.parts, *c.shape[1:]).mul_(c.unsqueeze(1)).view(c.shape[0], -1, *c.shape[2:])
        # threshold_backward(g, x, 0) = g where x > 0, else 0: the x+ mask in one operation
        out = torch.ops.aten.threshold_backward(layer.vjp_parts(A, s, self.parts), x, 0)
        if mixed:
            out.add_(torch.ops.aten.threshold_backward(layer.vjp_parts(B, s, self.parts), x.neg(), 0))
        return out


class ZPlus(_SignSplit):
    name = "zplus"

    def weights(self, W, b):
        return [W.clamp(min=0)], [W.clamp(max=0)], [_pos(b)]

    def numerators(self, layer, z, D):
        return z / D.add_(STABILIZER)  # D >= 0 (a sum of non-negative terms): stab(D) = D + eps


class AlphaBeta(_SignSplit):
    name = "alpha_beta"
    parts = 2

    def __init__(self, alpha: float = 2.0, beta: float = 1.0):
        if alpha < 0 or beta < 0 or abs(alpha - beta - 1) > 1e-12:
            raise ConfigError(f"alpha-beta needs alpha, beta >= 0 and alpha - beta = 1, got {alpha}, {beta}")
        self.alpha, self.beta = float(alpha), float(beta)

    def weights(self, W, b):
        Wp, Wn = W.clamp(min=0), W.clamp(max=0)
        return [Wp, Wn], [Wn, Wp], [_pos(b), _neg(b)]

    def numerators(self, layer, z, D):
        coef = torch.tensor([self.alpha, -self.beta], dtype=z.dtype, device=z.device).view(_part_shape(layer, 2))
        return (z * coef).div_(stabilize(D))


class Gamma(_SignSplit):
    name = "gamma"
    parts = 2

    def __init__(self, gamma: float = 0.25):
        if gamma < 0:
            raise ConfigError(f"gamma must be >= 0, got {gamma}")
        self.gamma = float(gamma)

    def weights(self, W, b):
        g = self.gamma
        Wa, Wb = W + g * W.clamp(min=0), W + g * W.clamp(max=0)
        ba = None if b is None else b + g * b.clamp(min=0)
        bb = None if b is None else b + g * b.clamp(max=0)
        return [Wa, Wb], [Wb, Wa], [ba, bb]

    def numerators(self, layer, z, D):
        # outputs with z > 0 share R by P, those with z < 0 by N: numerators [z]+ and [z]-
        axis = -2 if layer.is_dense else 1
        return torch.cat([z.clamp(min=0), z.clamp(max=0)], axis).div_(stabilize(D))


class Flat(Rule):
    name = "flat"
    input_layer_only = True

    def relevance(self, layer, x, z, R):
        ones = torch.ones_like(layer.weight)
        return layer.vjp(ones, R / stabilize(layer.forward(torch.ones_like(x), ones, None)))


class WSquare(Rule):
    name = "wsquare"
    input_layer_only = True

    def relevance(self, layer, x, z, R):
        W2 = layer.weight ** 2
        b2 = None if layer.bias is None else layer.bias ** 2
        return layer.vjp(W2, R / stabilize(layer.forward(torch.ones_like(x), W2, b2)))


class ZBox(Rule):
    """`low`, `high`: the inputs' bounds (numbers or tensors broadcastable to one image, e.g. (1, C, 1, 1)
    per channel in the model's normalized space). Padding inside the convolution (`padding=`) sees zero
    bounds, as in Zennit; a layer that pads its input itself before the convolution (TensorFlow "same"
    padding) gets the bounds on its padded border too (Zennit pads them with zeros there)."""

    name = "zbox"
    input_layer_only = True

    def __init__(self, low, high):
        self.low, self.high = low, high

    def relevance(self, layer, x, z, R):
        W, b = layer.weight, layer.bias
        low = torch.as_tensor(self.low, dtype=x.dtype, device=x.device).expand_as(x)
        high = torch.as_tensor(self.high, dtype=x.dtype, device=x.device).expand_as(x)
        Wp, Wn = W.clamp(min=0), W.clamp(max=0)
        d = layer.forward(x, W, b) - layer.forward(low, Wp, _pos(b)) - layer.forward(high, Wn, _neg(b))
        s = R / stabilize(d)
        return x * layer.vjp(W, s) - low * layer.vjp(Wp, s) - high * layer.vjp(Wn, s)


RULES = {cls.name: cls for cls in (Epsilon, ZPlus, AlphaBeta, Gamma, Flat, WSquare, ZBox)}


def make_rule(spec) -> Rule:
    """A Rule, or a registered rule's name ("epsilon", "zplus", ...) built with its defaults."""
    if isinstance(spec, Rule):
        return spec
    if isinstance(spec, str) and spec in RULES:
        if spec == "zbox":
            raise ConfigError("the zbox rule needs the input bounds: ZBox(low, high)")
        return RULES[spec]()
    raise ConfigError(f"unknown LRP rule {spec!r}; use a Rule or one of {', '.join(sorted(RULES))}")
