"""EfficientNet-Lite0 (Tan & Le 2019, the "Lite" variant for mobile accelerators) in plain PyTorch.

Lite = EfficientNet-B0's inverted-residual (MBConv) layout without squeeze-excitation, ReLU6
instead of swish, and a stem (32 channels) and head (1280 channels) that are not width-scaled.
Parameter names follow the widely used PyTorch port of the TensorFlow checkpoints
(``_conv_stem``, ``_bn0``, ``_blocks.N._expand_conv`` ..., ``_conv_head``, ``_bn1``, ``_fc``), so
its ImageNet weights load strictly. The weights were trained in TensorFlow with "SAME" padding,
which pads the odd pixel of a stride-2 convolution on the right/bottom; ``SamePadConv2d``
reproduces it (symmetric padding shifts every stride-2 map by half a pixel and costs accuracy).
Input: (x - 127) / 128 for x on the 0..255 scale; at 224 px the last map is 1280 x 7 x 7.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from xmcl.nn.init import init_conv_batchnorm

# (expand ratio, kernel, stride, repeats, output channels) of the seven MBConv stages of B0 / Lite0.
LITE0_STAGES: tuple[tuple[int, int, int, int, int], ...] = (
    (1, 3, 1, 1, 16),
    (6, 3, 2, 2, 24),
    (6, 5, 2, 2, 40),
    (6, 3, 2, 3, 80),
    (6, 5, 1, 3, 112),
    (6, 5, 2, 4, 192),
    (6, 3, 1, 1, 320),
)
STEM_CHANNELS = 32
HEAD_CHANNELS = 1280
# TensorFlow's BatchNorm epsilon, with which the checkpoint's running statistics were computed.
BN_EPS = 1e-3
BN_MOMENTUM = 0.01


class SamePadConv2d(nn.Conv2d):
    """Conv2d with TensorFlow "SAME" padding: output size ceil(in / stride) for any input size.

    Total padding per axis p = max((ceil(i/s) - 1) * s + k - i, 0), split as floor(p/2) before and
    the rest after.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 groups: int = 1) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=0,
                         groups=groups, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads = []
        for size, k, s in zip(reversed(x.shape[-2:]), reversed(self.kernel_size), reversed(self.stride)):
            total = max((math.ceil(size / s) - 1) * s + k - size, 0)
            pads += [total // 2, total - total // 2]
        if any(pads):
            x = F.pad(x, pads)
        return super().forward(x)


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=BN_EPS, momentum=BN_MOMENTUM)


class MBConv(nn.Module):
    """Inverted residual: 1x1 expand -> kxk depthwise -> 1x1 project (linear), identity skip when
    the stride is 1 and the channel count is unchanged. No expansion conv when the ratio is 1."""

    def __init__(self, in_channels: int, out_channels: int, expand_ratio: int, kernel: int, stride: int) -> None:
        super().__init__()
        hidden = in_channels * expand_ratio
        self.has_expansion = expand_ratio != 1
        if self.has_expansion:
            self._expand_conv = SamePadConv2d(in_channels, hidden, 1)
            self._bn0 = _bn(hidden)
        self._depthwise_conv = SamePadConv2d(hidden, hidden, kernel, stride=stride, groups=hidden)
        self._bn1 = _bn(hidden)
        self._project_conv = SamePadConv2d(hidden, out_channels, 1)
        self._bn2 = _bn(out_channels)
        self.stride = stride
        self.has_skip = stride == 1 and in_channels == out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x
        if self.has_expansion:
            h = F.relu6(self._bn0(self._expand_conv(h)))
        h = F.relu6(self._bn1(self._depthwise_conv(h)))
        h = self._bn2(self._project_conv(h))
        return h + x if self.has_skip else h


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0: ``forward`` returns the last feature map (B, 1280, ceil(H/32), ceil(W/32)).

    ``classify`` applies global average pooling, dropout and the ImageNet classifier ``_fc``.
    """

    out_channels = HEAD_CHANNELS

    def __init__(self, num_classes: int = 1000, dropout: float = 0.2) -> None:
        super().__init__()
        self._conv_stem = SamePadConv2d(3, STEM_CHANNELS, 3, stride=2)
        self._bn0 = _bn(STEM_CHANNELS)
        blocks: list[MBConv] = []
        in_channels = STEM_CHANNELS
        for expand, kernel, stride, repeats, out_channels in LITE0_STAGES:
            for r in range(repeats):
                blocks.append(MBConv(in_channels, out_channels, expand, kernel, stride if r == 0 else 1))
                in_channels = out_channels
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = SamePadConv2d(in_channels, HEAD_CHANNELS, 1)
        self._bn1 = _bn(HEAD_CHANNELS)
        self._dropout = nn.Dropout(dropout)
        self._fc = nn.Linear(HEAD_CHANNELS, num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        init_conv_batchnorm(self)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                bound = 1.0 / math.sqrt(m.weight.shape[1])
                nn.init.uniform_(m.weight, -bound, bound)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu6(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            h = block(h)
        return F.relu6(self._bn1(self._conv_head(h)))

    def classify(self, x: torch.Tensor) -> torch.Tensor:
        """(B, num_classes) logits of normalised images."""
        pooled = self.forward(x).mean(dim=(2, 3))
        return self._fc(self._dropout(pooled))

    def stages(self) -> list[list[nn.Module]]:
        """Feature-extracting modules grouped by output stride (2, 4, 8, 16, 32), input to output."""
        by_stride: list[list[nn.Module]] = [[self._conv_stem, self._bn0]]
        for block in self._blocks:
            if block.stride == 2:
                by_stride.append([])
            by_stride[-1].append(block)
        by_stride[-1] += [self._conv_head, self._bn1]
        return by_stride

    def classifier(self) -> nn.Module:
        return self._fc
