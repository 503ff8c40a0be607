"""Layer-wise relevance propagation (Bach et al. 2015; Montavon et al. 2019), `method="lrp"`.

One forward pass and one modified backward pass per image. The relevance of the target class at the
output is its score (the logit): with LRP-0 on a network without biases the input relevance sums to
that logit (Captum's convention; Zennit starts from a one-hot output, so its maps are ours divided by
the logit). Biases absorb their share of the relevance, as the rules prescribe.

How relevance travels: every convolution and dense layer is hooked with its rule (composites.py) and
every activation module with the pass rule. Between hooked layers the backward pass carries
c = R / value, not R itself: then the ordinary gradient of a residual addition a + b gives
R_a = a c and R_b = b c (relevance split in proportion, conserved, not duplicated), the gradient of
average pooling splits in proportion to the pooled values, max pooling routes it to the maximum, and
reshapes, concatenations and padding carry it unchanged; none of them needs a rule or a canonizer,
and functional adds (`x + shortcut` in a forward) work. A linear layer without a rule is LRP-0, which
in this convention is its plain gradient. The first linear layer executed in the forward pass is the
input layer: it returns R_in itself, which the operations in front of it (padding, reshapes) pass on
to the input, where it is the map (channels kept, summed by `explain` unless channels=True).

Activations (the pass rule): y = f(x) hands its relevance to x unchanged (R_x = R_y, so c_x = c_y y/x),
for the module types in `activations` (ReLU, ReLU6, LeakyReLU, ELU, SiLU, GELU, Hardswish, Mish, Tanh
by default; ReLU and LeakyReLU are piecewise linear through 0, so their ordinary gradient already is
y/x and they are left unhooked). ReLU called as a function (F.relu) gets its gradient, which for ReLU is the pass rule; other
functional activations (F.silu, F.relu6 above 6) are not the pass rule: use modules. In-place activation
modules are switched to out-of-place for the call (an edit).

Canonizer: a BatchNorm reading a convolution's or dense layer's output is merged with it (canonizers.py):
the pair gets one rule, on the folded weight and bias. The merge happens in the forward pass (the
BatchNorm's hook replaces the layer's relevance node by the pair's), so the model's parameters are
never replaced and no extra pass is needed.

Where we differ from Zennit (read for its formulas only; LGPL):
- Zennit's first layer is the first linear module in `model.modules()` order; ours is the first one the
  forward pass runs (the same for sequential models; the right one when modules are registered out of
  order).
- Flat, WSquare and ZBox may only be the first layer's rule (Zennit allows them anywhere): they give
  relevance to inputs regardless of their value, which c = R / value cannot carry.
- Residual additions and average pooling need no canonizer here (Zennit adds a Sum module with the
  Norm rule through its ResNet canonizer: the same proportional split, up to the stabiliser).
- Multiplicative gates (squeeze-excitation, x * sigmoid(s)) get relevance on both factors, as an
  unmodified gradient would in Zennit; Zennit has no general rule for them either.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ...core.errors import ConfigError
from ...core.explanation import Explanation
from ..base import ACTIVATIONS, Method, Param, check_batch_size, register, replace_activation_backward
from ..gradient import clean_gradients
from .canonizers import folded, mergeable
from .composites import COMPOSITES, CONVOLUTIONS, LINEAR_LAYERS, make_composite

# Piecewise linear through 0: the ordinary gradient already is the pass rule (y / x), so no hook is needed.
GRADIENT_IS_PASS = (nn.ReLU, nn.LeakyReLU)


class _Relevance(torch.autograd.Function):
    """Identity on the layer's output in the forward pass; the rule's backward in the backward pass."""

    @staticmethod
    def forward(ctx, x, z, backward):
        ctx.save_for_backward(x, z)
        ctx.rule_backward = backward
        return z.clone()

    @staticmethod
    def backward(ctx, grad):
        x, z = ctx.saved_tensors
        return ctx.rule_backward(x, z, grad), None, None


class _Pass(torch.autograd.Function):
    """y = f(x) forward; backward c_x = c_y * y / x (relevance passed on unchanged)."""

    @staticmethod
    def forward(ctx, x, y):
        ctx.save_for_backward(x, y)
        return y.clone()

    @staticmethod
    def backward(ctx, grad):
        x, y = ctx.saved_tensors
        # every pass-rule activation has f(0) = 0, so y / x with x = 0 replaced by 1 gives 0 there
        return (grad * y).div_(x.masked_fill(x == 0, 1)), None


class LinearLayer:
    """One call of a convolution or dense layer, as the rules see it: its parameters, its linear map
    with other parameters (`forward`) and that map's transpose (`vjp`)."""

    def __init__(self, module, weight, bias, linear_map, input_shape):
        self.module, self.weight, self.bias = module, weight, bias
        self._map, self.input_shape = linear_map, input_shape

    def forward(self, inp, weight, bias):
        return self._map(inp, weight, bias)

    def vjp(self, weight, grad):
        m = self.module
        if isinstance(m, nn.Linear):
            return grad @ weight
        if isinstance(m, nn.Conv2d) and m.padding_mode == "zeros" and not isinstance(m.padding, str):
            return torch.nn.grad.conv2d_input(self.input_shape, weight, grad, m.stride, m.padding, m.dilation, m.groups)
        with torch.enable_grad():  # other convolutions: the transpose through autograd
            probe = torch.zeros(self.input_shape, dtype=grad.dtype, device=grad.device, requires_grad=True)
            return torch.autograd.grad(self._map(probe, weight, None), probe, grad)[0]


def install_rules(session, composite, activations, state: dict, canonize: bool = True) -> None:
    """Hook every linear layer with its rule, every activation with the pass rule and (canonize) every
    BatchNorm with the merge (session edits)."""
    names, passing = [], []
    for name, module in session.model.named_modules():
        if isinstance(module, LINEAR_LAYERS):
            names.append(name)
            _hook_linear(session, name, module, composite, state)
        elif canonize and mergeable(module):
            session.hook(module, _merge_batchnorm(name, state))
        elif activations and isinstance(module, activations) and not isinstance(module, GRADIENT_IS_PASS):
            passing.append(module)
    composite.check_names(names)
    replace_activation_backward(session, passing, _Pass)

    def new_forward(module, args):
        state["first"] = True
        state["calls"] = {}
    session.hook(session.model, new_forward, "forward_pre")


def _rule_backward(rule, layer, first):
    if first:  # the input layer hands on relevance itself
        return lambda x, z, c: rule.relevance(layer, x, z, z * c)
    return lambda x, z, c: rule.ratio(layer, x, z, z * c)


def _merge_batchnorm(bn_name, state):
    """A BatchNorm whose input is a hooked layer's output: the pair is one layer with folded parameters,
    and its relevance node (from the BatchNorm's output to the layer's input) replaces the layer's."""
    def hook(bn, args, output):
        call = state.get("calls", {}).get(id(args[0])) if args else None
        if call is None or call[0] is not args[0] or not isinstance(output, torch.Tensor):
            return None
        _, name, rule, layer, first, inp = call
        weight, bias = folded(layer.module, bn, layer.weight, layer.bias)
        merged = LinearLayer(layer.module, weight, bias, layer._map, layer.input_shape)
        state["merged"].setdefault((name, bn_name), None)
        return _Relevance.apply(inp, output.detach(), _rule_backward(rule, merged, first))
    return hook


def _hook_linear(session, name, module, composite, state):
    rule = composite.rule_for(name, module)

    def relevance(inp, out, weight, bias, linear_map):
        if not inp.requires_grad:
            return out
        first = state.get("first", False)
        state["first"] = False
        chosen = composite.first if first and composite.first is not None else rule
        if chosen.input_layer_only and not first:
            raise ConfigError(f"the {chosen.name} rule can only be the first layer's rule; layer '{name}' is not "
                              "the first layer the forward pass runs")
        layer = LinearLayer(module, weight, bias, linear_map, inp.shape)
        result = _Relevance.apply(inp, out.detach(), _rule_backward(chosen, layer, first))
        # a BatchNorm reading exactly this output merges with this call (see _merge_batchnorm)
        state["calls"][id(result)] = (result, name, chosen, layer, first, inp)
        return result

    if isinstance(module, CONVOLUTIONS):
        original = module._conv_forward  # the class's, bound: padding modes and "same" handled by torch

        def conv_forward(inp, weight, bias):
            state["seen"].add(name)
            return relevance(inp, original(inp, weight, bias), weight, bias, original)
        session.set_attr(module, "_conv_forward", conv_forward)

        def check_seen(mod, args, output):
            if name not in state["seen"]:
                raise ConfigError(f"layer '{name}' ({type(mod).__name__}) does not compute through "
                                  "_conv_forward, so LRP cannot apply its rule")
        session.hook(module, check_seen)
    else:
        def linear_output(mod, args, output):
            return relevance(args[0], output, mod.weight, mod.bias, F.linear)
        session.hook(module, linear_output)


@register
class LRP(Method):
    name = "lrp"
    description = "Layer-wise relevance propagation with a composite of rules (epsilon_plus, gamma-box, ...)."
    composite = Param("epsilon_plus", f"rules per layer: {', '.join(COMPOSITES)}, a dict "
                      "{module type or name: rule} or a Composite")
    epsilon = Param(1e-6, "epsilon of the epsilon rule (dense layers in the named composites)")
    gamma = Param(0.25, "gamma of the gamma rule (epsilon_gamma_box)")
    low = Param(None, "lowest input value for the z-box rule (number or per-channel tensor, model input space)")
    high = Param(None, "highest input value for the z-box rule")
    canonize = Param(True, "merge each BatchNorm with the convolution/dense layer it reads (one rule for the pair)")
    activations = Param(ACTIVATIONS, "activation module types that pass relevance on unchanged")
    batch_size = Param(32, "images per forward+backward pass")

    def check(self):
        check_batch_size(self.batch_size)
        self._composite()  # fail now on unknown names and missing bounds

    def _composite(self):
        return make_composite(self.composite, epsilon=self.epsilon, gamma=self.gamma, low=self.low, high=self.high)

    def compute(self, session, x, target):
        composite = self._composite()
        state = {"first": False, "seen": set(), "calls": {}, "merged": {}}
        install_rules(session, composite, tuple(self.activations or ()), state, canonize=self.canonize)
        relevance, outputs, classes = clean_gradients(session, x, target, self.batch_size)
        return Explanation(maps=relevance, targets=classes, outputs=outputs,
                           extras={"merged": list(state["merged"]), "composite": composite.name})
