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

Cost (what keeps the modified backward close to a gradient's): a relevance node returns the layer's
output itself (marked dirty: no copy, and the model may still change it in place); the layer runs
without autograd graph of its own. What a rule needs from the output z (epsilon: the factor
|z| / (|z| + eps) on the output gradient; z-plus, alpha-beta, gamma: the denominators, one evaluation
of the layer with W+ and friends, and n(z) / stab(D)) is prepared in the forward pass for a pair merged
with its BatchNorm, and deferred to the backward for a layer without one (a BatchNorm read later would
make that work wasted). A deferred layer's output must keep its value: if the forward changes it in
place, the batch runs again with every layer prepared in the forward pass (one extra forward, counted
in `cost`). Weights derived for a rule (W+, W-, the stacked parts, the folded BatchNorm) are made once
per call. The parts of alpha-beta and gamma run as one layer with twice the outputs (a depthwise layer
on its input repeated, so each group keeps one filter and the depthwise kernel), the x- terms only
where an input has negative values. Results equal the one-step formulas up to rounding (operations
reordered: c * (z / d) for (z c) / d), which the matrix-reference tests bound.

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
from ...core.targets import resolve_target, slice_target
from ..base import ACTIVATIONS, Method, Param, check_batch_size, out_of_place, register
from .canonizers import folded, mergeable
from .composites import COMPOSITES, CONVOLUTIONS, LINEAR_LAYERS, make_composite

# Piecewise linear through 0: the ordinary gradient already is the pass rule (y / x), so no hook is needed.
GRADIENT_IS_PASS = (nn.ReLU, nn.LeakyReLU)


class _Node(torch.autograd.Function):
    """Identity on a layer's output z in the forward pass, the rule's backward in the backward pass.

    z is returned as it is (marked dirty, so no copy and no view: the model may change it in place
    afterwards); the computation that needed z ran in the forward pass (`Call.prepare`) or, for a
    layer without BatchNorm, is deferred to the backward while z is checked unchanged (`LRP.compute`)."""

    @staticmethod
    def forward(ctx, x, z, call):
        ctx.mark_dirty(z)
        ctx.save_for_backward(x)
        ctx.call = call
        return z

    @staticmethod
    def backward(ctx, grad):
        x, = ctx.saved_tensors
        return ctx.call.backward(x, grad), None, None


class _PassNode(torch.autograd.Function):
    """y = f(x) returned as it is; backward c_x = c_y * y / x (relevance passed on unchanged). The ratio
    y / x is taken in the forward pass (0 where x = 0: every pass-rule activation has f(0) = 0)."""

    @staticmethod
    def forward(ctx, x, y):
        ctx.mark_dirty(y)
        ctx.ratio = y.div(x).nan_to_num_(0.0, float("inf"), float("-inf"))
        return y

    @staticmethod
    def backward(ctx, grad):
        ratio, ctx.ratio = ctx.ratio, None
        return grad * ratio, None


class LinearLayer:
    """One call of a convolution or dense layer, as the rules see it: its parameters, its linear map
    with other parameters (`forward`), that map's transpose (`vjp`), and `cached(key, make)` for
    tensors derived from its parameters, made once per `explain` call (`key_` names the layer and the
    BatchNorm merged into it)."""

    def __init__(self, module, weight, bias, linear_map, inp, key_=None, cache=None):
        self.module, self.weight, self.bias = module, weight, bias
        self._map, self.input, self.input_shape = linear_map, inp, inp.shape
        self.is_dense = isinstance(module, nn.Linear)
        self.groups = 1 if self.is_dense else module.groups
        self._key, self._cache = key_, {} if cache is None else cache

    def forward(self, inp, weight, bias):
        return self._map(inp, weight, bias)

    def cached(self, key, make):
        k = (self._key, id(key))
        if k not in self._cache:
            self._cache[k] = (key, make())  # keep `key` alive so its id is not reused
        return self._cache[k][1]

    def _direct(self):
        """A Conv1d/2d/3d whose map is F.convNd with the module's own settings (zero padding, numbers)."""
        m = self.module
        return (not self.is_dense and m.padding_mode == "zeros" and not isinstance(m.padding, str)
                and type(m)._conv_forward is _conv_base(m)._conv_forward)

    def forward_parts(self, inp, weight, bias, parts):
        """The map with `parts` weights stacked along the output channels (output: the parts' outputs
        stacked along the channels). A grouped convolution (depthwise) runs on its input repeated
        `parts` times with parts x the groups, so it keeps one weight per group (its fast kernel)."""
        if parts == 1 or self.groups == 1:
            return self._map(inp, weight, bias)
        m = self.module
        if self._direct():
            repeated = inp.repeat(1, parts, *([1] * (inp.dim() - 2)))
            return CONV_FUNCTIONS[_conv_base(m)](repeated, weight, bias, m.stride, m.padding, m.dilation,
                                                 self.groups * parts)
        biases = [None] * parts if bias is None else bias.chunk(parts)
        return torch.cat([self._map(inp, w, b) for w, b in zip(weight.chunk(parts), biases)], 1)

    def vjp_parts(self, weight, grad, parts):
        """The transpose of `forward_parts`, summed over the parts."""
        if parts == 1 or self.groups == 1:
            return self.vjp(weight, grad)
        if self._direct():
            shape = (self.input_shape[0], parts * self.input_shape[1], *self.input_shape[2:])
            g = self._input_grad(weight, grad, self.input.new_empty(shape), self.groups * parts)
            return g.view(shape[0], parts, *self.input_shape[1:]).sum(1)
        out = None
        for w, gr in zip(weight.chunk(parts), grad.chunk(parts, 1)):
            v = self.vjp(w, gr)
            out = v if out is None else out.add_(v)
        return out

    def _input_grad(self, weight, grad, like, groups):
        """The transposed convolution through aten's convolution backward, given a tensor shaped like
        the input (torch.nn.grad.conv2d_input passes an expanded scalar, which the kernels copy to full
        size first: one copy of the input per layer)."""
        m = self.module
        return torch.ops.aten.convolution_backward(grad, like, weight, None, m.stride, m.padding, m.dilation,
                                                   False, [0] * len(m.stride), groups, (True, False, False))[0]

    def vjp(self, weight, grad):
        if self.is_dense:
            return grad @ weight
        if self._direct():
            return self._input_grad(weight, grad, self.input, self.groups)
        with torch.enable_grad():  # other convolutions: the transpose through autograd
            probe = torch.zeros(self.input_shape, dtype=grad.dtype, device=grad.device, requires_grad=True)
            return torch.autograd.grad(self._map(probe, weight, None), probe, grad)[0]


CONV_FUNCTIONS = {nn.Conv1d: F.conv1d, nn.Conv2d: F.conv2d, nn.Conv3d: F.conv3d}


def _conv_base(m):
    return next(c for c in (nn.Conv1d, nn.Conv2d, nn.Conv3d) if isinstance(m, c))


class Call:
    """One layer call's relevance node: the rule, the layer, whether it is the input layer, and what
    the rule prepared in the forward pass (or z, for a deferred preparation)."""

    __slots__ = ("rule", "layer", "first", "prepared", "z")

    def __init__(self, rule, layer, first):
        self.rule, self.layer, self.first = rule, layer, first
        self.prepared = self.z = None

    def prepare(self, x, z):
        self.prepared = self.rule.prepare(self.layer, x, z)

    def backward(self, x, c):
        prepared = self.prepared if self.z is None else self.rule.prepare(self.layer, x, self.z)
        self.prepared = self.z = None  # used once; frees memory and the reference cycle through z
        if self.first:  # the input layer hands on relevance itself
            return self.rule.input_relevance(self.layer, x, prepared, c)
        return self.rule.backward(self.layer, x, prepared, c)


def install_rules(session, composite, activations, state: dict, canonize: bool = True) -> None:
    """Hook every linear layer with its rule, every activation with the pass rule and (canonize) every
    BatchNorm with the merge (session edits). In-place activations become out-of-place for the call."""
    names = []
    for name, module in session.model.named_modules():
        if isinstance(module, LINEAR_LAYERS):
            names.append(name)
            _hook_linear(session, name, module, composite, state)
        elif canonize and mergeable(module):
            session.hook(module, _merge_batchnorm(name, state))
        elif activations and isinstance(module, activations):
            out_of_place(session, module)  # the pass rule needs x intact; a deferred layer needs its z intact
            if not isinstance(module, GRADIENT_IS_PASS):
                session.hook(module, _pass_hook)
    composite.check_names(names)

    def new_forward(module, args):
        state["first"] = True
        state["calls"] = {}
        state["deferred"] = []
    session.hook(session.model, new_forward, "forward_pre")

    def end_forward(module, args, output):
        # a deferred layer output changed in place: its rule cannot see the value it had; redo eagerly
        state["stale"] = any(t._version != v for t, v in state["deferred"])
    session.hook(session.model, end_forward)


def _pass_hook(module, args, output):
    x = args[0] if args else None
    if isinstance(x, torch.Tensor) and isinstance(output, torch.Tensor) and x.requires_grad:
        return _PassNode.apply(x, output.detach())
    return None


def _merge_batchnorm(bn_name, state):
    """A BatchNorm whose input is a hooked layer's output: the pair is one layer with folded parameters,
    and its relevance node (from the BatchNorm's output to the layer's input) replaces the layer's."""
    def hook(bn, args, output):
        call = state.get("calls", {}).get(id(args[0])) if args else None
        if call is None or call[0] is not args[0] or not isinstance(output, torch.Tensor):
            return None
        _, name, rule, layer, first, inp = call
        key_ = (name, bn_name)
        if key_ not in state["weights"]:  # folded once per call
            state["weights"][key_] = folded(layer.module, bn, layer.weight, layer.bias)
        weight, bias = state["weights"][key_]
        merged = LinearLayer(layer.module, weight, bias, layer._map, layer.input, key_, state["weights"])
        state["merged"].setdefault((name, bn_name), None)
        node = Call(rule, merged, first)
        z = output.detach()
        node.prepare(inp, z)  # now: the model may change the BatchNorm's output in place (out += identity)
        return _Node.apply(inp, z, node)
    return hook


def _hook_linear(session, name, module, composite, state):
    rule = composite.rule_for(name, module)

    def relevance(inp, z, weight, bias, linear_map):
        """z: the layer's output, computed without graph (or detached)."""
        first = state.get("first", False)
        state["first"] = False
        chosen = composite.first if first and composite.first is not None else rule
        if chosen.input_layer_only and not first:
            raise ConfigError(f"the {chosen.name} rule can only be the first layer's rule; layer '{name}' is not "
                              "the first layer the forward pass runs")
        layer = LinearLayer(module, weight, bias, linear_map, inp, (name, None), state["weights"])
        node = Call(chosen, layer, first)
        if state["eager"]:
            node.prepare(inp, z)
        else:
            # deferred to the backward: a BatchNorm reading z usually replaces this node (no preparation
            # is wasted); z must then still hold its value, which end_forward checks
            node.z = z
        result = _Node.apply(inp, z, node)
        if not state["eager"]:
            state["deferred"].append((result, result._version))
            state["nodes"].append(node)
        # a BatchNorm reading exactly this output merges with this call (see _merge_batchnorm)
        state["calls"][id(result)] = (result, name, chosen, layer, first, inp)
        return result

    if isinstance(module, CONVOLUTIONS):
        original = module._conv_forward  # the class's, bound: padding modes and "same" handled by torch

        def conv_forward(inp, weight, bias):
            state["seen"].add(name)
            if not (inp.requires_grad and torch.is_grad_enabled()):
                return original(inp, weight, bias)
            with torch.no_grad():  # the node below is the only path back to inp
                z = original(inp, weight, bias)
            return relevance(inp, z, weight, bias, original)
        session.set_attr(module, "_conv_forward", conv_forward)

        def check_seen(mod, args, output):
            if name not in state["seen"]:
                raise ConfigError(f"layer '{name}' ({type(mod).__name__}) does not compute through "
                                  "_conv_forward, so LRP cannot apply its rule")
        session.hook(module, check_seen)
    else:
        def linear_output(mod, args, output):
            if not args[0].requires_grad:
                return output
            return relevance(args[0], output.detach(), mod.weight, mod.bias, F.linear)
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
        state = {"first": False, "seen": set(), "calls": {}, "merged": {}, "weights": {}, "eager": False,
                 "deferred": [], "nodes": [], "stale": False}
        install_rules(session, composite, tuple(self.activations or ()), state, canonize=self.canonize)
        maps, outputs, classes = [], [], []
        for start in range(0, x.shape[0], self.batch_size):
            inputs = x[start : start + self.batch_size].detach().requires_grad_(True)
            out = session.forward(inputs)
            if state["stale"]:  # a deferred layer's output was changed in place: run again, preparing eagerly
                self._release(state)
                state["eager"] = True
                out = session.forward(inputs)
            resolved = resolve_target(slice_target(target, start, start + len(inputs), len(x)), out)
            maps.append(session.grad(resolved(out), inputs))
            outputs.append(out.detach())
            classes.append(resolved.classes)
            self._release(state)
        return Explanation(maps=torch.cat(maps), targets=None if classes[0] is None else torch.cat(classes),
                           outputs=torch.cat(outputs),
                           extras={"merged": list(state["merged"]), "composite": composite.name})

    @staticmethod
    def _release(state):
        """Drop the deferred nodes' references to their outputs (nodes a BatchNorm replaced never run)."""
        for node in state["nodes"]:
            node.z = node.prepared = None
        state["nodes"], state["deferred"], state["calls"] = [], [], {}
