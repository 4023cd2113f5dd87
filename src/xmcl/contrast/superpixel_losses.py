"""Superpixel-to-superpoint contrastive losses: SLidR (Sautier et al. CVPR 2022) and ST-SLidR (Mahmoud et al. 2023).

Inputs: ``points`` f (K x d) and ``pixels`` g (K x d), superpixel-pooled point and pixel features (row i of both
is superpixel i; L2-normalised by the caller: SLidR itself averages normalised features without renormalising),
and, for the semantic parts, ``semantic`` z (K x c), superpixel-pooled features of the frozen 2D backbone.
Superpixels without points or without backbone features must be dropped before the loss.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from xmcl.contrast.semantic_weights import (
    class_balance_weights,
    quantile_drop_mask,
    semantic_similarity,
    soft_negative_weights,
)
from xmcl.errors import ConfigError, DataError

TOLERANCES = ("none", "quantile", "soft")
QUANTILE_VARIANTS = ("remove", "authors")


class STSlidrLoss(nn.Module):
    """Superpixel InfoNCE with optional semantic tolerance and class-agnostic balancing.

    Plain SLidR (tolerance="none", balance=False), point superpixel as the anchor against all pixel superpixels
    (SLidR's ``NCELoss(k=points, q=pixels)``: cross-entropy over rows of f g^T / tau):
        l_i = -log( exp(f_i.g_i / tau) / sum_j exp(f_i.g_j / tau) ),   loss = mean_i l_i.
    Tolerance changes the negatives j != i of anchor i, with s = cos(z_i, z_j) (``semantic_weights``):
      - "quantile", variant "remove": negatives in ``quantile_drop_mask(s, q)`` leave the denominator;
      - "quantile", variant "authors": their logit is multiplied by 0 instead (the authors' code), so each
        dropped negative still adds exp(0) = 1 to the denominator;
      - "soft": each negative's exp-term is weighted by w_ij = 1 - clip(s_ij, 0, 1) (``soft_negative_weights``),
        evaluated as logsumexp(f_i.g_j / tau + log w_ij).
    The positive term is never dropped nor weighted. Balancing (balance=True): a = ``class_balance_weights(s,
    threshold)`` and loss = sum_i a_i l_i / sum_i a_i (a detached).
    """

    def __init__(self, tau: float = 0.07, tolerance: str = "none", quantile_variant: str = "remove",
                 q: float = 0.01, balance: bool = False, threshold: float = 0.5) -> None:
        super().__init__()
        if tau <= 0:
            raise ConfigError(f"temperature tau must be > 0, got {tau}")
        if tolerance not in TOLERANCES:
            raise ConfigError(f"tolerance must be one of {TOLERANCES}, got '{tolerance}'")
        if quantile_variant not in QUANTILE_VARIANTS:
            raise ConfigError(f"quantile_variant must be one of {QUANTILE_VARIANTS}, got '{quantile_variant}'")
        if not 0.0 <= q < 1.0:
            raise ConfigError(f"tolerance quantile q must be in [0, 1), got {q}")
        if not -1.0 <= threshold <= 1.0:
            raise ConfigError(f"balance threshold must be a cosine in [-1, 1], got {threshold}")
        self.tau = float(tau)
        self.tolerance = tolerance
        self.quantile_variant = quantile_variant
        self.q = float(q)
        self.balance = balance
        self.threshold = float(threshold)

    @property
    def needs_semantic(self) -> bool:
        """Whether ``forward`` needs the backbone features z."""
        return self.tolerance != "none" or self.balance

    def forward(self, points: Tensor, pixels: Tensor, semantic: Tensor | None = None) -> Tensor:
        if points.dim() != 2 or points.shape != pixels.shape or points.shape[0] == 0:
            raise DataError(f"points {tuple(points.shape)} and pixels {tuple(pixels.shape)} must both be "
                            "(K x d) with K >= 1")
        s = None
        if self.needs_semantic:
            if semantic is None:
                raise DataError(f"tolerance='{self.tolerance}', balance={self.balance} needs semantic features")
            if semantic.dim() != 2 or semantic.shape[0] != points.shape[0]:
                raise DataError(f"semantic features {tuple(semantic.shape)} must be ({points.shape[0]} x c)")
            s = semantic_similarity(semantic)
        logits = points @ pixels.T / self.tau
        if self.tolerance == "quantile":
            drop = quantile_drop_mask(s, self.q)
            logits = logits.masked_fill(drop, -math.inf if self.quantile_variant == "remove" else 0.0)
        elif self.tolerance == "soft":
            logits = logits + soft_negative_weights(s).log()
        per_anchor = torch.logsumexp(logits, dim=1) - logits.diagonal()
        if not self.balance:
            return per_anchor.mean()
        weights = class_balance_weights(s, self.threshold)
        return (weights * per_anchor).sum() / weights.sum()
