"""Canonizers: revertible edits that put a model in a form the rules apply to.

`merge_batchnorms`: a BatchNorm in eval mode is an affine map y = s x + t per channel (s = gamma /
sqrt(var + eps), t = beta - mean s). When it reads the output of a convolution or dense layer, the pair
is one linear layer with weight s W (per output channel) and bias s b + t; LRP rules are defined for
that merged layer, not for the two halves (Montavon et al. 2019; Zennit's MergeBatchNorm). The
pairs are found by one probe forward pass (a BatchNorm whose input is exactly the output of a
convolution or dense layer, however the model's forward is written), and the merge is a set of
session edits: the layer's weight and bias are replaced by new tensors and the BatchNorm's forward by
the identity, all put back (the same tensor objects) when the session ends, also on error.
A BatchNorm without running statistics (track_running_stats=False) is left alone, as is one whose
input comes from anything else (it then passes relevance like any affine map: LRP-0, with its shift
absorbing relevance).
"""

from __future__ import annotations

import torch
from torch import nn

from .composites import LINEAR_LAYERS

BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def _identity(x):
    return x


def find_batchnorm_pairs(session, x_probe: torch.Tensor) -> list[tuple[str, str]]:
    """[(layer name, batchnorm name)] for every BatchNorm that reads a linear layer's output (one probe pass)."""
    produced: dict[int, tuple[str, torch.Tensor]] = {}
    pairs: list[tuple[str, str]] = []

    def record(name):
        def hook(module, args, output):
            if isinstance(output, torch.Tensor):
                produced[id(output)] = (name, output)  # the reference keeps the id valid
        return hook

    def match(name):
        def hook(module, args):
            hit = produced.get(id(args[0])) if args and isinstance(args[0], torch.Tensor) else None
            if hit is not None and hit[1] is args[0]:
                pairs.append((hit[0], name))
        return hook

    with session.scope():
        for name, module in session.model.named_modules():
            if isinstance(module, LINEAR_LAYERS):
                session.hook(module, record(name))
            elif isinstance(module, BATCHNORMS) and module.track_running_stats and module.running_var is not None:
                session.hook(module, match(name), "forward_pre")
        with torch.no_grad():
            session.forward(x_probe)
    pairs = list(dict.fromkeys(pairs))
    # A layer called more than once (weight sharing) may meet several BatchNorms: merging one would
    # change the others' input, so such layers stay as they are.
    layers = [layer for layer, _ in pairs]
    return [(layer, bn) for layer, bn in pairs if layers.count(layer) == 1]


def folded(layer: nn.Module, bn: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """The weight and bias of `layer` followed by `bn` (eval mode) as one layer."""
    with torch.no_grad():
        scale = bn.running_var.add(bn.eps).rsqrt()
        if bn.weight is not None:
            scale = scale * bn.weight
        shift = -bn.running_mean * scale
        if bn.bias is not None:
            shift = shift + bn.bias
        W = layer.weight
        weight = W * scale.view(-1, *([1] * (W.dim() - 1))).to(W)
        bias = shift.to(W) if layer.bias is None else layer.bias * scale.to(W) + shift.to(W)
    return weight, bias


def merge_batchnorms(session, x_probe: torch.Tensor) -> list[tuple[str, str]]:
    """Merge every (linear layer, BatchNorm) pair for the session (edits undone at its end)."""
    pairs = find_batchnorm_pairs(session, x_probe)
    modules = dict(session.model.named_modules())
    for layer_name, bn_name in pairs:
        layer, bn = modules[layer_name], modules[bn_name]
        weight, bias = folded(layer, bn)
        session.set_attr(layer, "weight", nn.Parameter(weight, requires_grad=False))
        session.set_attr(layer, "bias", nn.Parameter(bias, requires_grad=False))
        session.set_attr(bn, "forward", _identity)
    return pairs
