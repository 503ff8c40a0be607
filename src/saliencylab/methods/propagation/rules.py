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
    """d + eps * (sign(d) + [d == 0]): never zero, sign kept (Zennit's convention), in two operations."""
    return d + torch.where(d >= 0, eps, -eps)


def _pos(t):
    return None if t is None else t.clamp(min=0)


def _neg(t):
    return None if t is None else t.clamp(max=0)


class Rule:
    """A rule for one linear layer. `layer` gives `forward(inp, weight, bias)` and `vjp(weight, grad)`
    (the layer's linear map with other parameters, and its transpose); see `lrp.LinearLayer`."""

    name = "rule"
    input_layer_only = False  # gives relevance to inputs regardless of their value

    def relevance(self, layer, x, z, R):
        """R_in: the relevance of the layer's inputs (used for the first layer)."""
        return x * self.ratio(layer, x, z, R)

    def ratio(self, layer, x, z, R):
        """c_in = R_in / x (a rule with relevance proportional to x computes it without dividing)."""
        raise ConfigError(f"the {self.name} rule can only be used on the first layer")

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({args})"


class Epsilon(Rule):
    name = "epsilon"

    def __init__(self, epsilon: float = 1e-6):
        if epsilon < 0:
            raise ConfigError(f"epsilon must be >= 0, got {epsilon}")
        self.epsilon = float(epsilon)

    def ratio(self, layer, x, z, R):
        if self.epsilon > 0:  # stabilize(z, eps) in two operations: sign(0) counts as +
            d = z + torch.where(z >= 0, self.epsilon, -self.epsilon)
        else:
            d = z.masked_fill(z == 0, 1.0)
        return layer.vjp(layer.weight, R.div_(d))


def _signs(x):
    """(has positive inputs, has negative inputs): after a ReLU the negative terms vanish and are skipped."""
    return bool((x > 0).any()), bool((x < 0).any())


def _masked(v, mask):
    return v.mul_(mask)  # v is a fresh tensor: masking in place saves a copy


def _sum(x, *terms):
    """The sum of the terms present (fresh tensors, summed in place), zeros if none."""
    present = [t for t in terms if t is not None]
    if not present:
        return torch.zeros_like(x)
    out = present[0]
    for t in present[1:]:
        out = out.add_(t)
    return out


class ZPlus(Rule):
    name = "zplus"

    def ratio(self, layer, x, z, R):
        W, b = layer.weight, layer.bias
        pos, neg = _signs(x)
        xp, xn = x.clamp(min=0), x.clamp(max=0)
        d = layer.forward(xp, _pos(W), _pos(b))
        if neg:
            d = d + layer.forward(xn, _neg(W), None)
        s = R.div_(stabilize(d))
        return _sum(x, _masked(layer.vjp(_pos(W), s), x > 0) if pos else None,
                    _masked(layer.vjp(_neg(W), s), x < 0) if neg else None)


class AlphaBeta(Rule):
    name = "alpha_beta"

    def __init__(self, alpha: float = 2.0, beta: float = 1.0):
        if alpha < 0 or beta < 0 or abs(alpha - beta - 1) > 1e-12:
            raise ConfigError(f"alpha-beta needs alpha, beta >= 0 and alpha - beta = 1, got {alpha}, {beta}")
        self.alpha, self.beta = float(alpha), float(beta)

    def ratio(self, layer, x, z, R):
        W, b = layer.weight, layer.bias
        pos, neg = _signs(x)
        xp, xn = x.clamp(min=0), x.clamp(max=0)
        Wp, Wn = _pos(W), _neg(W)
        dp, dn = layer.forward(xp, Wp, _pos(b)), layer.forward(xp, Wn, _neg(b))
        if neg:
            dp, dn = dp + layer.forward(xn, Wn, None), dn + layer.forward(xn, Wp, None)
        sp, sn = R / stabilize(dp), R / stabilize(dn)
        positive = _sum(x, _masked(layer.vjp(Wp, sp), x > 0) if pos else None,
                        _masked(layer.vjp(Wn, sp), x < 0) if neg else None)
        negative = _sum(x, _masked(layer.vjp(Wn, sn), x > 0) if pos else None,
                        _masked(layer.vjp(Wp, sn), x < 0) if neg else None)
        return positive.mul_(self.alpha).sub_(negative, alpha=self.beta)


class Gamma(Rule):
    name = "gamma"

    def __init__(self, gamma: float = 0.25):
        if gamma < 0:
            raise ConfigError(f"gamma must be >= 0, got {gamma}")
        self.gamma = float(gamma)

    def ratio(self, layer, x, z, R):
        g, W, b = self.gamma, layer.weight, layer.bias
        Wa, Wb = W + g * W.clamp(min=0), W + g * W.clamp(max=0)
        ba = None if b is None else b + g * b.clamp(min=0)
        bb = None if b is None else b + g * b.clamp(max=0)
        pos, neg = _signs(x)
        xp, xn = x.clamp(min=0), x.clamp(max=0)
        dp, dn = layer.forward(xp, Wa, ba), layer.forward(xp, Wb, bb)
        if neg:
            dp, dn = dp + layer.forward(xn, Wb, None), dn + layer.forward(xn, Wa, None)
        sp, sn = (z > 0) * R / stabilize(dp), (z < 0) * R / stabilize(dn)
        return _sum(x, _masked(layer.vjp(Wa, sp).add_(layer.vjp(Wb, sn)), x > 0) if pos else None,
                    _masked(layer.vjp(Wb, sp).add_(layer.vjp(Wa, sn)), x < 0) if neg else None)


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
