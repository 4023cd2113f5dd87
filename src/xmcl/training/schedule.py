"""Optimisers and the warm-up + cosine learning-rate schedule shared by the loops."""

from __future__ import annotations

import math

import torch
from torch import nn

from xmcl.distill.config import DistillOptimConfig


def warmup_cosine(optimizer: torch.optim.Optimizer, warmup: int, total: int,
                  decay_from: int = 0) -> torch.optim.lr_scheduler.LambdaLR:
    """``lr_s = lr * min((s + 1) / warmup, (1 + cos(pi * p_s)) / 2)``, ``p_s = clamp((s - decay_from) / (total -
    decay_from), 0, 1)``: a linear warm-up over ``warmup`` steps (none when 0) and a cosine decay to 0 that starts at
    step ``decay_from`` and ends at ``total``."""

    def factor(step: int) -> float:
        ramp = (step + 1) / warmup if warmup > 0 else 1.0
        progress = min(max((step - decay_from) / max(1, total - decay_from), 0.0), 1.0)
        return min(ramp, 0.5 * (1.0 + math.cos(math.pi * progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def build_optimizer(params: list[nn.Parameter], cfg: DistillOptimConfig) -> tuple[torch.optim.Optimizer,
                                                                          torch.optim.lr_scheduler.LambdaLR]:
    """AdamW or SGD (momentum, dampening, weight decay), with ``cfg.warmup_steps`` of warm-up and a cosine decay
    over the remaining ``cfg.steps``."""
    if cfg.optimizer == "adamw":
        optimizer: torch.optim.Optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                                                    fused=True)
    else:
        optimizer = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, dampening=cfg.dampening,
                                    weight_decay=cfg.weight_decay)
    return optimizer, warmup_cosine(optimizer, cfg.warmup_steps, cfg.steps, decay_from=cfg.warmup_steps)
