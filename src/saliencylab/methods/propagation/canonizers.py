"""Canonizers: putting a model in the form the rules are defined for, without editing it.

BatchNorm merging: a BatchNorm in eval mode is an affine map y = s x + t per channel
(s = gamma / sqrt(var + eps), t = beta - mean s). When it reads the output of a convolution or dense
layer, the pair is one linear layer with weight s W (per output channel) and bias s b + t, and the LRP
rules are defined for that merged layer, not for the two halves (Montavon et al. 2019; Zennit's
MergeBatchNorm). Zennit merges by rewriting the layer's parameters for the call. Here the merge
happens in the forward pass instead (`lrp.py`): a BatchNorm whose input is exactly the output of a
convolution or dense layer (however the model's forward is written) hands the pair's relevance to the
layer's input with the rule applied to `folded(layer, bn)`, so no parameter is replaced, no probe pass
is needed, and there is nothing to restore. A BatchNorm without running statistics
(track_running_stats=False) or in training mode is not merged, nor one whose input comes from
anything else: it then passes relevance like any affine map (LRP-0, its shift absorbing relevance).
"""

from __future__ import annotations

import torch
from torch import nn

BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def mergeable(bn: nn.Module) -> bool:
    return isinstance(bn, BATCHNORMS) and not bn.training and bn.running_var is not None


def bn_affine(bn: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """(s, t) with bn(x) = s x + t per channel (eval mode)."""
    scale = bn.running_var.add(bn.eps).rsqrt()
    if bn.weight is not None:
        scale = scale * bn.weight
    shift = -bn.running_mean * scale
    if bn.bias is not None:
        shift = shift + bn.bias
    return scale, shift


def folded(layer: nn.Module, bn: nn.Module, weight=None, bias=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The weight and bias of `layer` (or the given `weight`, `bias` of one of its calls) followed by `bn`."""
    W = layer.weight if weight is None else weight
    b = layer.bias if weight is None else bias
    with torch.no_grad():
        scale, shift = bn_affine(bn)
        scale, shift = scale.to(W), shift.to(W)
        merged_weight = W * scale.view(-1, *([1] * (W.dim() - 1)))
        merged_bias = shift if b is None else b * scale + shift
    return merged_weight, merged_bias
