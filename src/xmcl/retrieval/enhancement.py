"""Guided semantic enhancement of local features (USER, Zhang et al., IEEE TIP 2024).

One operator serves both enhancements of the paper: SGE (self-guided, the guide comes from the locals
themselves) and CGE (cross-modal-guided, the guide comes from another model's global embedding).
Padded locals never influence any valid output.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from xmcl.nn.activations import FastTanh
from xmcl.nn.dense import linear_activation
from xmcl.nn.dropout import Dropout
from xmcl.nn.global_batchnorm import GlobalBatchNorm1d, batchnorm_of_linear, fold_batchnorm
from xmcl.nn.gpo import MeanPooling
from xmcl.nn.sequence import all_valid, length_mask


class _RowDot(torch.autograd.Function):
    """``(x * v).sum(-1)`` for ``x (B, R, d)`` and ``v (B, 1, d)`` -> ``(B, R)``; backward ``dx = g v`` and
    ``dv = g^T x``, one batched product (autograd's form writes and reads a (B, R, d) temporary for it)."""

    @staticmethod
    def forward(ctx, x: Tensor, v: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(x, v)
        return (x * v).sum(-1)  # on CPU a product and a sum outrun a batched mat-vec

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None]:  # type: ignore[override]
        x, v = ctx.saved_tensors
        grad_x = (grad.unsqueeze(-1) * v).to(x.dtype) if ctx.needs_input_grad[0] else None
        grad_v = torch.bmm(grad.unsqueeze(1).to(x.dtype), x).to(v.dtype) if ctx.needs_input_grad[1] else None
        return grad_x, grad_v


def row_dot(x: Tensor, v: Tensor) -> Tensor:
    """``(x * v).sum(-1)``: each local's dot product with its sample's vector, ``x (B, R, d)``, ``v (B, 1, d)``
    (``_RowDot``); other shapes as written."""
    if x.dim() == 3 and v.dim() == 3 and v.size(1) == 1 and x.size(0) == v.size(0):
        return _RowDot.apply(x, v)
    return (x * v).sum(-1)


def guided_enhancement(local: Tensor, lengths: Tensor, guide: Tensor, lam: float = 1.0) -> Tensor:
    """Add the guide to each local in proportion to how much the local attends to it.

    For valid locals ``v_i`` (i < n) of one sample and its guide ``g``:
    ``p = softmax_i(lam * <g, v_i>)``, ``a = p / ||p||_2`` (the authors' normalisation: L2 over the locals,
    so ``a_i`` lies in (0, 1] and a uniform ``p`` over n locals gives ``a_i = 1/sqrt(n)``), and
    ``v_i' = v_i + a_i g``. Padded locals are returned unchanged.
    ``local (B, R, d)``, ``lengths (B,)``, ``guide (B, d)`` -> ``(B, R, d)``.
    """
    mask = length_mask(lengths.to(local.device), local.size(1))
    scores = row_dot(local, guide.unsqueeze(1)) * lam
    attention = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=1)
    attention = F.normalize(attention, p=2, dim=1)
    return torch.baddbmm(local, attention.unsqueeze(-1), guide.unsqueeze(1))


def _run_branch(branch: nn.Sequential, x: Tensor) -> Tensor:
    """An SGE branch ``dropout(tanh(BN(W x + b)))`` on rows ``x (N, d)``, the product through
    ``batchnorm_of_linear`` (in training without ``b``, which the BN cancels)."""
    linear, norm, tanh, dropout = branch
    return dropout(tanh(batchnorm_of_linear(linear, norm, x)))


class SGE(nn.Module):
    """Self-guided global-representation enhancement.

    ``g0 = mean_i v_i`` over valid locals; ``h_i = tanh(BN(W_l v_i)) * tanh(BN(W_g g0))`` (dropout after each
    tanh); ``w = softmax_i(w_c . h_i)``; guide ``g = l2normalise(sum_i w_i v_i)``; output
    ``guided_enhancement(v, g, lam)``. BN is over the feature dimension (statistics from valid locals only
    for the local branch), replacing the authors' region-indexed ``BatchNorm1d(36)``.
    """

    def __init__(self, dim: int, lam: float = 1.0, dropout: float = 0.4) -> None:
        super().__init__()
        self.lam = lam
        self.local_branch = nn.Sequential(nn.Linear(dim, dim), GlobalBatchNorm1d(dim), FastTanh(), Dropout(dropout))
        self.global_branch = nn.Sequential(nn.Linear(dim, dim), GlobalBatchNorm1d(dim), FastTanh(), Dropout(dropout))
        self.scorer = nn.Linear(dim, 1)
        for layer in (self.local_branch[0], self.global_branch[0], self.scorer):
            nn.init.xavier_uniform_(layer.weight)
            nn.init.zeros_(layer.bias)

    def attention(self, local: Tensor, lengths: Tensor) -> Tensor:
        """``(B, R)`` weights ``w`` over the locals (0 at padded positions)."""
        mask = length_mask(lengths.to(local.device), local.size(1))
        gate = _run_branch(self.global_branch, MeanPooling()(local, lengths))  # (B, d)
        # w_c . (h_i * gate) + b = h_i . (gate * w_c) + b: the (B, R, d) product is never formed
        scorer = gate * self.scorer.weight.squeeze(0)  # (B, d)
        if all_valid(mask):  # nothing padded: every (b, i) is valid, no gather and scatter; BN over (B * R, d)
            return torch.softmax(self.local_scores(local, scorer.unsqueeze(1)) + self.scorer.bias, dim=1)
        rows = mask.nonzero(as_tuple=True)  # the valid (b, i) pairs: BN sees only these
        scores_valid = self.local_scores(local[rows], scorer[rows[0]]) + self.scorer.bias
        scores = scores_valid.new_full(mask.shape, float("-inf"))
        scores[rows] = scores_valid
        return torch.softmax(scores, dim=1)

    def local_scores(self, local: Tensor, scorer: Tensor) -> Tensor:
        """``h_i . s`` for the locals ``local (..., d)`` and ``scorer`` broadcast to them, ``h_i`` the local branch's
        output. In eval mode (dropout off, BN on running statistics) ``h = tanh(z) = 2 sigmoid(2z) - 1`` with
        ``2z = x W'^T + b'`` one product (``fold_batchnorm``), so ``h . s = 2 sigmoid(2z) . s - sum(s)``."""
        flat = local.reshape(-1, local.size(-1))
        linear, norm = self.local_branch[0], self.local_branch[1]
        if self.local_branch.training:
            return row_dot(_run_branch(self.local_branch, flat).view_as(local), scorer)
        weight, bias = fold_batchnorm(linear, norm, scale=2.0)
        halves = linear_activation(flat, weight, bias, "sigmoid").view_as(local)
        return row_dot(halves, 2 * scorer) - scorer.sum(-1)

    def guide(self, local: Tensor, lengths: Tensor) -> Tensor:
        """``(B, d)`` L2-normalised self-guide ``g``."""
        mask = length_mask(lengths.to(local.device), local.size(1))
        weights = self.attention(local, lengths)
        valid = local if all_valid(mask) else local.masked_fill(~mask.unsqueeze(-1), 0)
        pooled = torch.bmm(weights.unsqueeze(1).to(valid.dtype), valid).squeeze(1)  # sum_i w_i v_i
        return F.normalize(pooled, p=2, dim=-1)

    def forward(self, local: Tensor, lengths: Tensor) -> Tensor:
        return guided_enhancement(local, lengths, self.guide(local, lengths), self.lam)
