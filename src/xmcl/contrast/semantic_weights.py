"""Weights derived from a frozen backbone's pooled features (ST-SLidR, Mahmoud et al. CVPR 2023).

The mask and weight functions take a Q x N cosine similarity s_qk = cos(z_q, c_k) between queries and candidates
(``semantic_similarity``) and return detached masks or weights. ``negatives`` (Q x N bool) says which candidates
are negatives of each query at all; left None, s must be square and row i's positive is j = i (every other j is
a negative), the superpixel case of ST-SLidR. Retrieval passes its own masks (same-id items and empty queue
slots already excluded).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from xmcl.errors import ConfigError, DataError


def _unit_rows(z: Tensor, name: str, valid: Tensor | None) -> Tensor:
    """normalise(z), detached; a zero-norm row where ``valid`` (None = every row) raises DataError."""
    if z.dim() != 2:
        raise DataError(f"{name} must be (n x c), got {tuple(z.shape)}")
    z = z.detach()
    empty = z.norm(dim=1) == 0
    if valid is not None:
        empty = empty & valid
    if empty.any():
        raise DataError(f"{name} row {int(empty.nonzero()[0])} has zero norm "
                        "(drop items without backbone features before the loss)")
    return F.normalize(z, dim=1)


def semantic_similarity(z: Tensor, candidates: Tensor | None = None, candidate_valid: Tensor | None = None) -> Tensor:
    """s = normalise(z) normalise(c)^T (Q x N), detached, with c = ``candidates`` (default z: K x K).

    A zero-norm row raises DataError, except candidate rows outside ``candidate_valid`` (N,) bool (empty queue
    slots), whose similarities are 0.
    """
    queries = _unit_rows(z, "semantic features", None)
    if candidates is None:
        return queries @ queries.T
    if candidates.dim() != 2 or candidates.shape[1] != z.shape[1]:
        raise DataError(f"candidate semantic features must be (N x {z.shape[1]}), got {tuple(candidates.shape)}")
    if candidate_valid is not None and candidate_valid.shape != (candidates.shape[0],):
        raise DataError(f"candidate_valid must have shape ({candidates.shape[0]},), "
                        f"got {tuple(candidate_valid.shape)}")
    return queries @ _unit_rows(candidates, "candidate semantic features", candidate_valid).T


def _square_negatives(s: Tensor, negatives: Tensor | None) -> Tensor:
    """``negatives``, checked against s; None = every off-diagonal entry of a square s."""
    if negatives is None:
        if s.dim() != 2 or s.shape[0] != s.shape[1]:
            raise DataError(f"without a negatives mask the similarity must be square, got {tuple(s.shape)}")
        return ~torch.eye(s.shape[0], dtype=torch.bool, device=s.device)
    if negatives.shape != s.shape or negatives.dtype != torch.bool:
        raise DataError(f"negatives must be a bool tensor of shape {tuple(s.shape)}, "
                        f"got {negatives.dtype} {tuple(negatives.shape)}")
    return negatives


def row_quantile(x: Tensor, q: float, valid: Tensor | None = None) -> Tensor:
    """(R,) the q-quantile of each row of ``x`` (R x n) over its entries where ``valid`` (None = all), linear
    interpolation (numpy's default method): with the row's n_r valid values sorted, v[p] at p = q (n_r - 1).

    Uses the smallest ceil(q (n_r - 1)) + 1 values only (``torch.topk``), so it also works where
    ``torch.quantile`` refuses large inputs. A row without valid entries gets +inf.
    """
    rows, n = x.shape
    if valid is None:
        counts = torch.full((rows,), n, dtype=torch.long, device=x.device)
    else:
        counts = valid.sum(dim=1)
        x = x.masked_fill(~valid, torch.inf)
    if n == 0:
        return x.new_full((rows,), torch.inf)
    position = q * (counts.clamp(min=1) - 1).double()
    low = position.long()
    high = torch.minimum(low + 1, counts.clamp(min=1) - 1)
    smallest = torch.topk(x, int(high.max()) + 1, dim=1, largest=False, sorted=True).values
    at_low = smallest.gather(1, low[:, None])[:, 0]
    at_high = smallest.gather(1, high[:, None])[:, 0]
    quantile = at_low + (position - low).to(x.dtype) * (at_high - at_low)
    return quantile.masked_fill(counts == 0, torch.inf)


def quantile_drop_mask(s: Tensor, q: float = 0.01, negatives: Tensor | None = None) -> Tensor:
    """(Q x N) bool: True where negative k of query i is dropped as too similar to it.

    d_ik = 1 - clip(s_ik, 0, 1) (the authors clip s to [0, 1]); negative k is dropped when d_ik is strictly
    below the q-quantile of {d_ik : k a negative of i}. A non-negative (the positive, a masked item) is never
    dropped. The authors' code takes the quantile over the whole row, positive included (d_ii = 0), and also drops
    negatives with d_ij = 0 exactly; with hundreds of superpixels per batch both differences are negligible.
    """
    if not 0.0 <= q < 1.0:
        raise ConfigError(f"tolerance quantile q must be in [0, 1), got {q}")
    negatives = _square_negatives(s, negatives)
    d = 1.0 - s.detach().clamp(0.0, 1.0)
    threshold = row_quantile(d, q, negatives)
    return negatives & (d < threshold[:, None])


def soft_negative_weights(s: Tensor, negatives: Tensor | None = None) -> Tensor:
    """(Q x N) w_ik = 1 - clip(s_ik, 0, 1) in [0, 1] for negatives, w_ik = 1 elsewhere (the positive).

    Clipping follows the authors' tolerant loss (``torch.clip(similarity, 0, 1)``): a negative that is
    anti-correlated with the anchor keeps weight 1 (as in plain SLidR) rather than being up-weighted to 2.
    """
    negatives = _square_negatives(s, negatives)
    return (1.0 - s.detach().clamp(0.0, 1.0)).masked_fill(~negatives, 1.0)


def class_balance_weights(s: Tensor, threshold: float = 0.5, candidates: Tensor | None = None) -> Tensor:
    """(Q,) query weights a_i = 1 - v_hat_i from votes v_i = sum_k s_ik [s_ik >= threshold] [k a candidate].

    ``candidates`` (Q x N or (N,) bool, None = all, j = i included) restricts who votes (empty queue slots do
    not). v_hat is v min-max normalised over the Q queries, so the most "popular" (over-represented) query gets
    weight 0 and the rarest weight 1. If every vote is equal the weights are uniform (ones). Detached.
    """
    s = s.detach()
    counted = s >= threshold
    if candidates is not None:
        counted = counted & candidates
    votes = (s * counted).sum(dim=1)
    spread = votes.max() - votes.min()
    if spread <= 0:
        return torch.ones_like(votes)
    return 1.0 - (votes - votes.min()) / spread
