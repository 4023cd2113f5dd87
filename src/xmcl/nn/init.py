"""Weight initialisation shared by the CNN backbones."""

from __future__ import annotations

from torch import nn


def init_conv_batchnorm(module: nn.Module) -> None:
    """He (fan-out, ReLU) init for every Conv2d; BatchNorm2d scale 1 and shift 0."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
