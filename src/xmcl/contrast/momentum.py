"""The momentum (key) encoder: a frozen copy of an online encoder that follows it by exponential averaging."""

from __future__ import annotations

import copy

import torch
from torch import nn

from xmcl.errors import ConfigError


def make_key_encoder(online: nn.Module) -> nn.Module:
    """A deep copy of ``online`` whose parameters do not require gradients."""
    key = copy.deepcopy(online)
    key.requires_grad_(False)
    return key


@torch.no_grad()
def momentum_update(online: nn.Module, key: nn.Module, m: float) -> None:
    """theta_k <- m theta_k + (1 - m) theta_q for every parameter; buffers (e.g. BatchNorm statistics) are copied.

    Parameters and buffers are matched by name; ``key`` must mirror ``online`` (as ``make_key_encoder`` makes it).
    """
    if not 0.0 <= m <= 1.0:
        raise ConfigError(f"momentum m must be in [0, 1], got {m}")
    for kind, online_items, key_items in (
        ("parameter", dict(online.named_parameters()), dict(key.named_parameters())),
        ("buffer", dict(online.named_buffers()), dict(key.named_buffers())),
    ):
        if online_items.keys() != key_items.keys():
            differing = sorted(set(online_items) ^ set(key_items))
            raise ConfigError(f"the key encoder does not mirror the online encoder: {kind}s {differing[:5]} differ")
        for name, target in key_items.items():
            source = online_items[name].detach()
            if target.shape != source.shape:
                raise ConfigError(f"key encoder {kind} '{name}' has shape {tuple(target.shape)}, "
                                  f"the online one {tuple(source.shape)}")
            if kind == "parameter":
                target.mul_(m).add_(source, alpha=1.0 - m)
            else:
                target.copy_(source)
