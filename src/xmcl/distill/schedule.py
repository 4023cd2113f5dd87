"""The optimiser and learning-rate schedule of pretraining and fine-tuning."""

from __future__ import annotations

import math

import torch
from torch import nn

from xmcl.distill.config import DistillOptimConfig


def build_optimizer(params: list[nn.Parameter], cfg: DistillOptimConfig) -> tuple[torch.optim.Optimizer,
                                                                          torch.optim.lr_scheduler.LambdaLR]:
    """AdamW or SGD (momentum, dampening, weight decay) and the warm-up + cosine schedule ``lr_s = lr * factor(s)``."""
    if cfg.optimizer == "adamw":
        optimizer: torch.optim.Optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    else:
        optimizer = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, dampening=cfg.dampening,
                                    weight_decay=cfg.weight_decay)

    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
