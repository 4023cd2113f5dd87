"""Projection of local features into the joint embedding space (VSE-infinity's ``fc + MLP`` head).

Unlike a ``BatchNorm1d(R)`` tied to a fixed region count, normalisation here runs over the feature
dimension and takes its statistics from the valid (unpadded) locations only, so any number of regions
or tokens works and padding never shifts the statistics.
"""

from __future__ import annotations

import math

from torch import Tensor, nn

from xmcl.errors import ConfigError
from xmcl.nn.dense import linear, linear_activation
from xmcl.nn.global_batchnorm import GlobalBatchNorm1d, batchnorm_of_linear, fold_batchnorm
from xmcl.nn.sequence import all_valid, length_mask

HEAD_INITS = ("xavier_kaiming", "pytorch")


class ProjectionHead(nn.Module):
    """``y = fc(x) + W_2 relu(BN(W_1 x))`` applied to each valid location.

    ``forward(x (B, L, D_in), lengths (B,)) -> (B, L, D_out)`` with padded locations set to 0; with
    ``lengths=None`` every location of ``x (..., D_in)`` is valid. BN is a ``BatchNorm1d(hidden)`` over
    the valid locations of the batch (hidden = D_out // 2 by default, as VSE-infinity); in data-parallel training
    its statistics span every rank's batch (``GlobalBatchNorm1d``). ``init="xavier_kaiming"``: Xavier-uniform fc, Kaiming-normal
    MLP, zero biases (VSE-infinity); ``"pytorch"``: the layers' default PyTorch init (the USER authors' MLP).
    """

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int | None = None, init: str = "xavier_kaiming") -> None:
        super().__init__()
        hidden_dim = hidden_dim or max(out_dim // 2, 1)
        self.out_dim = out_dim
        self.fc = nn.Linear(in_dim, out_dim)
        self.mlp = nn.Sequential(
            nn.Linear(in_dim, hidden_dim), GlobalBatchNorm1d(hidden_dim), nn.ReLU(), nn.Linear(hidden_dim, out_dim)
        )
        if init not in HEAD_INITS:
            raise ConfigError(f"projection head init must be one of {HEAD_INITS}, got '{init}'")
        if init == "pytorch":
            return
        bound = math.sqrt(6.0 / (in_dim + out_dim))
        nn.init.uniform_(self.fc.weight, -bound, bound)
        nn.init.zeros_(self.fc.bias)
        for layer in (self.mlp[0], self.mlp[3]):
            nn.init.kaiming_normal_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x: Tensor, lengths: Tensor | None = None) -> Tensor:
        mask = None if lengths is None else length_mask(lengths.to(x.device), x.size(1))
        if mask is None or all_valid(mask):  # nothing padded: no gather and scatter
            return self.project(x.reshape(-1, x.size(-1))).reshape(*x.shape[:-1], self.out_dim)
        projected = self.project(x[mask])  # the valid rows (N_valid, D_in): the only ones the normalisation sees
        out = projected.new_zeros(*mask.shape, self.out_dim)
        out[mask] = projected
        return out

    def project(self, rows: Tensor) -> Tensor:
        """``fc(x) + mlp(x)`` of ``rows (N, D_in)``: the last product adds the fc branch as it is written (a fused
        residual, ``nn.dense.linear``), and the fc product carries both biases; in training ``W_1``'s bias, which the
        BN cancels, is left out (``batchnorm_of_linear``); in eval mode the BN is folded into ``W_1``
        (``fold_batchnorm``) and the ReLU into its product."""
        first, norm, _, last = self.mlp
        if norm.training:
            hidden = batchnorm_of_linear(first, norm, rows).relu_()
        else:
            weight, bias = fold_batchnorm(first, norm)
            hidden = linear_activation(rows, weight, bias, "relu")
        out = linear(rows, self.fc.weight, self.fc.bias + last.bias)
        return linear(hidden, last.weight, residual=out)
