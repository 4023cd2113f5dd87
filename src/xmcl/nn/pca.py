"""A frozen principal-component projection of local features (a fixed, fitted first layer; never trained).

``FrozenPCA(in_dim, out_dim)`` maps ``x (..., in_dim) -> (x - mean) @ basis (..., out_dim)``, where ``mean`` is the
mean of the rows it was fitted on and the columns of ``basis`` are the ``out_dim`` leading eigenvectors of their
covariance ``C = E[x x^T] - mean mean^T`` (largest eigenvalue first; each column's sign fixed so that its entry of
largest magnitude is positive, which makes the fit deterministic). ``mean``, ``basis`` and ``fitted`` are buffers,
so a checkpoint carries the projection and inference applies the very one training used.
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import Tensor, nn

from xmcl.errors import ConfigError, DataError


class FrozenPCA(nn.Module):
    """``forward(x (..., in_dim)) -> (..., out_dim)``; ``fit(blocks)`` first (see the module docstring)."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        if not 1 <= out_dim < in_dim:
            raise ConfigError(f"a PCA projection must reduce: out_dim {out_dim} must be in [1, {in_dim})")
        self.in_dim, self.out_dim = in_dim, out_dim
        self.register_buffer("mean", torch.zeros(in_dim))
        self.register_buffer("basis", torch.zeros(in_dim, out_dim))
        self.register_buffer("fitted", torch.tensor(False))

    @torch.no_grad()
    def fit(self, blocks: Iterable[Tensor]) -> None:
        """Fit on every row of ``blocks`` (each ``(n, in_dim)``): each block's sums in float32 (one GEMM), added up
        in float64, then ``torch.linalg.eigh`` in float64."""
        count = 0
        total = torch.zeros(self.in_dim, dtype=torch.float64)
        second = torch.zeros(self.in_dim, self.in_dim, dtype=torch.float64)
        for block in blocks:
            if block.dim() != 2 or block.shape[1] != self.in_dim:
                raise DataError(f"PCA fit rows must be (n, {self.in_dim}), got {tuple(block.shape)}")
            block = block.to(torch.float32)
            count += block.shape[0]
            total += block.sum(0, dtype=torch.float64)
            second += (block.T @ block).to(torch.float64)
        if count < 2:
            raise DataError(f"a PCA fit needs at least 2 rows, got {count}")
        mean = total / count
        covariance = second / count - torch.outer(mean, mean)
        _, vectors = torch.linalg.eigh(covariance)  # ascending eigenvalues
        basis = vectors[:, -self.out_dim:].flip(1)
        signs = torch.sign(basis.gather(0, basis.abs().argmax(0, keepdim=True)))
        self.mean.copy_(mean)
        self.basis.copy_(basis * signs)
        self.fitted.fill_(True)

    def forward(self, x: Tensor) -> Tensor:
        if not bool(self.fitted):
            raise ConfigError("the PCA projection was never fitted (fit it on the training features first)")
        if x.shape[-1] != self.in_dim:
            raise DataError(f"the PCA projection expects {self.in_dim}-d inputs, got shape {tuple(x.shape)}")
        return (x - self.mean.to(x.dtype)) @ self.basis.to(x.dtype)
