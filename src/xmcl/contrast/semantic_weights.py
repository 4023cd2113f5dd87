"""Weights derived from a frozen 2D backbone's superpixel features (ST-SLidR, Mahmoud et al. CVPR 2023).

All functions take the K x K cosine similarity s_ij = cos(z_i, z_j) of superpixel-pooled backbone features
(``semantic_similarity``) and return detached masks or weights; row i is anchor i, its positive is j = i.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from xmcl.errors import ConfigError, DataError


def semantic_similarity(z: Tensor) -> Tensor:
    """s = normalise(z) normalise(z)^T (K x K), detached; a row of z with zero norm raises DataError."""
    if z.dim() != 2:
        raise DataError(f"semantic features must be (K x c), got {tuple(z.shape)}")
    z = z.detach()
    empty = z.norm(dim=1) == 0
    if empty.any():
        raise DataError(f"semantic feature row {int(empty.nonzero()[0])} has zero norm "
                        "(drop superpixels without backbone features before the loss)")
    z = F.normalize(z, dim=1)
    return z @ z.T


def _negatives_only(x: Tensor) -> Tensor:
    """The off-diagonal entries of a square (K x K) tensor as K x (K - 1), row order kept."""
    k = x.shape[0]
    return x.masked_select(~torch.eye(k, dtype=torch.bool, device=x.device)).view(k, k - 1)


def row_quantile(x: Tensor, q: float) -> Tensor:
    """(R,) the q-quantile of each row of ``x`` (R x n), linear interpolation (numpy's default method).

    Uses the smallest ceil(q (n - 1)) + 1 values only (``torch.topk``), so it also works where
    ``torch.quantile`` refuses large inputs.
    """
    n = x.shape[1]
    position = q * (n - 1)
    low = int(position)
    high = min(low + 1, n - 1)
    smallest = torch.topk(x, high + 1, dim=1, largest=False, sorted=True).values
    return smallest[:, low] + (position - low) * (smallest[:, high] - smallest[:, low])


def quantile_drop_mask(s: Tensor, q: float = 0.01) -> Tensor:
    """(K x K) bool: True where negative j of anchor i is dropped as too similar to it.

    d_ij = 1 - clip(s_ij, 0, 1) (the authors clip s to [0, 1]); negative j is dropped when d_ij is strictly
    below the q-quantile of {d_ij : j != i}. The diagonal (the positive) is never dropped.
    The authors' code takes the quantile over the whole row, positive included (d_ii = 0), and also drops
    negatives with d_ij = 0 exactly; with hundreds of superpixels per batch both differences are negligible.
    """
    if not 0.0 <= q < 1.0:
        raise ConfigError(f"tolerance quantile q must be in [0, 1), got {q}")
    k = s.shape[0]
    drop = torch.zeros(k, k, dtype=torch.bool, device=s.device)
    if k < 2:
        return drop
    d = _negatives_only(1.0 - s.detach().clamp(0.0, 1.0))
    threshold = row_quantile(d, q)
    drop[~torch.eye(k, dtype=torch.bool, device=s.device)] = (d < threshold[:, None]).flatten()
    return drop


def soft_negative_weights(s: Tensor) -> Tensor:
    """(K x K) w_ij = 1 - clip(s_ij, 0, 1) in [0, 1] for negatives, w_ii = 1 for the positive.

    Clipping follows the authors' tolerant loss (``torch.clip(similarity, 0, 1)``): a negative that is
    anti-correlated with the anchor keeps weight 1 (as in plain SLidR) rather than being up-weighted to 2.
    """
    w = 1.0 - s.detach().clamp(0.0, 1.0)
    w.fill_diagonal_(1.0)
    return w


def class_balance_weights(s: Tensor, threshold: float = 0.5) -> Tensor:
    """(K,) anchor weights a_i = 1 - v_hat_i from votes v_i = sum_j s_ij [s_ij >= threshold] (j = i included).

    v_hat is v min-max normalised over the batch, so the most "popular" (over-represented) anchor gets weight 0
    and the rarest weight 1. If every vote is equal the weights are uniform (ones). Detached.
    """
    s = s.detach()
    votes = (s * (s >= threshold)).sum(dim=1)
    spread = votes.max() - votes.min()
    if spread <= 0:
        return torch.ones_like(votes)
    return 1.0 - (votes - votes.min()) / spread
