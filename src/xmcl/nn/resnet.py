"""ResNet-18/34/50/101 (He et al. 2016, stride on the 3x3 conv of the bottleneck, "v1.5") in plain PyTorch.

Parameter names are torchvision's (``conv1``, ``bn1``, ``layer1.0.conv1``, ``layer1.0.downsample.0``,
``fc`` ...), so a torchvision-format state dict loads strictly. ``forward`` returns the last
feature map: 512 (BasicBlock) or 2048 (Bottleneck) channels at stride 32.

``dilate`` (torchvision's ``replace_stride_with_dilation``) trades the stride 2 of layer2/3/4 for dilation: a
dilated layer's first block keeps the previous dilation and no stride, its other blocks use twice that dilation
(3x3 convs padded by their dilation). All three dilated = output stride 4 (the authors' 2D network); the weights
are the same tensors, and the stride-32 map is the dilated map sampled every 8th position (the "a trous" identity).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from xmcl.errors import ConfigError
from xmcl.nn.init import init_conv_batchnorm


def _conv3x3(in_channels: int, out_channels: int, stride: int = 1, dilation: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=dilation, dilation=dilation, bias=False)


def _conv1x1(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False)


def _downsample(in_channels: int, out_channels: int, stride: int) -> nn.Sequential | None:
    if stride == 1 and in_channels == out_channels:
        return None
    return nn.Sequential(_conv1x1(in_channels, out_channels, stride), nn.BatchNorm2d(out_channels))


class BasicBlock(nn.Module):
    """relu(x' + bn(conv3x3(relu(bn(conv3x3(x)))))), x' = x or a strided 1x1 projection."""

    expansion = 1

    def __init__(self, in_channels: int, width: int, stride: int = 1, dilation: int = 1) -> None:
        super().__init__()
        self.conv1 = _conv3x3(in_channels, width, stride, dilation)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = _conv3x3(width, width, dilation=dilation)
        self.bn2 = nn.BatchNorm2d(width)
        self.downsample = _downsample(in_channels, width, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn1(self.conv1(x)))
        h = self.bn2(self.conv2(h))
        skip = x if self.downsample is None else self.downsample(x)
        return F.relu(h + skip)


class Bottleneck(nn.Module):
    """1x1 reduce -> 3x3 (strided) -> 1x1 expand to 4 x width, plus the (projected) input, then ReLU."""

    expansion = 4

    def __init__(self, in_channels: int, width: int, stride: int = 1, dilation: int = 1) -> None:
        super().__init__()
        out_channels = width * self.expansion
        self.conv1 = _conv1x1(in_channels, width)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = _conv3x3(width, width, stride, dilation)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = _conv1x1(width, out_channels)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.downsample = _downsample(in_channels, out_channels, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn1(self.conv1(x)))
        h = F.relu(self.bn2(self.conv2(h)))
        h = self.bn3(self.conv3(h))
        skip = x if self.downsample is None else self.downsample(x)
        return F.relu(h + skip)


# depth -> (block type, blocks per layer)
RESNET_LAYOUTS: dict[int, tuple[type[BasicBlock] | type[Bottleneck], tuple[int, int, int, int]]] = {
    18: (BasicBlock, (2, 2, 2, 2)),
    34: (BasicBlock, (3, 4, 6, 3)),
    50: (Bottleneck, (3, 4, 6, 3)),
    101: (Bottleneck, (3, 4, 23, 3)),
}


class ResNet(nn.Module):
    """ResNet of the given depth; ``forward`` -> (B, out_channels, ceil(H/s), ceil(W/s)), s = ``output_stride``
    (32, halved by each of ``dilate`` = (layer2, layer3, layer4) that is true).

    ``base_width`` scales every layer (64 is the standard network; tests use smaller ones).
    ``classify`` = global average pooling + ``fc``.
    """

    def __init__(self, depth: int, num_classes: int = 1000, base_width: int = 64,
                 dilate: tuple[bool, bool, bool] = (False, False, False)) -> None:
        super().__init__()
        if depth not in RESNET_LAYOUTS:
            raise ConfigError(f"ResNet depth {depth} is not one of {sorted(RESNET_LAYOUTS)}")
        block, counts = RESNET_LAYOUTS[depth]
        self.conv1 = nn.Conv2d(3, base_width, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(base_width)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        in_channels = base_width
        layers = []
        dilation = 1
        self.output_stride = 4
        for i, count in enumerate(counts):
            width = base_width * 2**i
            stride, previous = (2 if i > 0 else 1), dilation
            if i > 0 and dilate[i - 1]:
                dilation, stride = dilation * 2, 1
            self.output_stride *= stride
            blocks = []
            for j in range(count):
                blocks.append(block(in_channels, width, stride=stride if j == 0 else 1,
                                    dilation=previous if j == 0 else dilation))
                in_channels = width * block.expansion
            layers.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.out_channels = in_channels
        self.fc = nn.Linear(in_channels, num_classes)
        init_conv_batchnorm(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.maxpool(F.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(h))))

    def classify(self, x: torch.Tensor) -> torch.Tensor:
        """(B, num_classes) logits of normalised images."""
        return self.fc(self.forward(x).mean(dim=(2, 3)))

    def stages(self) -> list[list[nn.Module]]:
        """Feature-extracting modules grouped by output stride (4 stem, 4, 8, 16, 32), input to output."""
        return [[self.conv1, self.bn1], [self.layer1], [self.layer2], [self.layer3], [self.layer4]]

    def classifier(self) -> nn.Module:
        return self.fc
