"""Pooling a padded set of local features into one vector: GPO (VSE-infinity) and masked mean / max.

Every pooling module has ``forward(features (B, L, D), lengths (B,)) -> (B, D)``; padded positions never
influence the result, so the output does not depend on how much padding a batch carries.
"""

from __future__ import annotations

import math
import numpy as np
import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from xmcl.errors import ConfigError
from xmcl.nn.gru_scan import bidirectional_gru_mean
from xmcl.nn.sequence import BiGRU, all_valid, length_mask
from xmcl.runtime.threads import run_in_parts


def positional_encoding(length: int, dim: int, device: torch.device | None = None) -> Tensor:
    """``(length, dim)`` sinusoidal encoding of positions 0..length-1.

    ``pe[p, 2k] = sin(p / 10000^(2k/dim))``, ``pe[p, 2k+1] = cos(p / 10000^(2k/dim))``; ``dim`` must be even.
    """
    if dim % 2:
        raise ConfigError(f"positional encoding needs an even dimension, got {dim}")
    position = torch.arange(length, device=device, dtype=torch.float32).unsqueeze(1)
    inv_freq = torch.exp(torch.arange(0, dim, 2, device=device, dtype=torch.float32) * (-math.log(10000.0) / dim))
    pe = torch.empty(length, dim, device=device)
    pe[:, 0::2] = torch.sin(position * inv_freq)
    pe[:, 1::2] = torch.cos(position * inv_freq)
    return pe


_INDEX_BITS = 29  # a float32 widened to float64 has its 29 lowest mantissa bits zero
_LOW_BITS = (1 << _INDEX_BITS) - 1
_BEYOND_FLOAT32 = 2.0 ** 1000  # beyond every float32, with a zero mantissa
_SPLIT_ELEMENTS = 1 << 15  # the batch is split over threads in parts of at least this many values


@torch.compiler.disable  # numpy work: a compiled caller runs it as it is, outside its graph
def sorted_columns(features: Tensor, lengths: Tensor, with_index: bool) -> tuple[Tensor, Tensor | None]:
    """Each column of the sets ``features (B, L, D)`` (CPU float32, ``L * D < 2^29``) sorted in descending order over
    its first ``lengths[b]`` positions: ``values (B, D, L)``, ``values[b, d, k]`` the k-th largest of
    ``features[b, :n_b, d]`` and 0 for ``k >= n_b``; with ``with_index``, also ``index (B, D, L)``, the flat position
    ``l * D + d`` in ``features[b]`` of that value (each position once: the pads take the ranks ``k >= n_b``).

    numpy sorts without the GIL, so the batch is split over torch's threads (``run_in_parts``). With the index: each
    value is widened to float64 and its flat position written into the 29 low mantissa bits, which widening leaves
    zero; that moves a key by less than the gap to the next float32, so one sort of plain float64 keys (numpy's
    vectorised sort, about twice as fast as its argsort) orders the values and carries their positions. Infinities
    become +-2^1000 first (an infinity's low bits would make it a NaN) and pads -2^1000; the values are read back
    with the low bits cleared.
    """
    batch, steps, dims = features.shape
    source = features.detach().numpy()
    pad = np.arange(steps) >= lengths.cpu().numpy()[:, None]  # (B, L): pads, and in rank order the ranks k >= n_b
    padded = bool(pad.any())
    values = np.empty((batch, dims, steps), dtype=np.float32)
    index = np.empty((batch, dims, steps), dtype=np.int64) if with_index else None
    position = np.arange(steps, dtype=np.int64) * dims + np.arange(dims, dtype=np.int64)[:, None]  # (D, L)

    def sort_part(part: slice) -> None:
        rank_pads = pad[part, None, :]
        if with_index:
            keys = source[part].transpose(0, 2, 1).astype(np.float64, order="C")
            np.clip(keys, -_BEYOND_FLOAT32, _BEYOND_FLOAT32, out=keys)
        else:
            keys = source[part].transpose(0, 2, 1).copy()
        if padded:
            np.copyto(keys, -np.inf if keys.dtype == np.float32 else -_BEYOND_FLOAT32, where=rank_pads)
        if with_index:
            bits = keys.view(np.int64)
            bits |= position
        np.negative(keys, out=keys)  # ascending of the negated: descending (numpy is slow on reversed views)
        keys.sort(axis=-1)
        if with_index:
            np.bitwise_and(bits, _LOW_BITS, out=index[part])
            bits &= ~_LOW_BITS
        np.negative(keys, out=keys)
        with np.errstate(over="ignore"):  # +-2^1000 back to +-inf
            np.copyto(values[part], keys, casting="same_kind")
        if padded:
            np.copyto(values[part], 0.0, where=rank_pads)

    run_in_parts(sort_part, batch, min_part=_SPLIT_ELEMENTS // max(steps * dims, 1))
    return torch.from_numpy(values), None if index is None else torch.from_numpy(index)


class _RankedPooling(torch.autograd.Function):
    """``out[b, d] = sum_k w[b, k] sorted_k(features[b, :n_b, d])`` (``sorted_columns``), with
    ``d features[b, l, d] = w[b, rank of (l, d)] g[b, d]`` (one scatter of the flat positions, in the features' own
    layout) and ``d w[b, k] = sum_d g[b, d] sorted_k[b, d]`` (one product)."""

    @staticmethod
    def forward(ctx, features: Tensor, weights: Tensor, lengths: Tensor,  # type: ignore[override]
                with_grad: bool) -> Tensor:
        values, index = sorted_columns(features, lengths, with_index=with_grad)
        if with_grad:
            ctx.save_for_backward(values, index, weights)
        return (values * weights.unsqueeze(1)).sum(dim=2)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None, None, None]:  # type: ignore[override]
        values, index, weights = ctx.saved_tensors
        batch, dims, steps = values.shape
        grad_features = grad_weights = None
        if ctx.needs_input_grad[0]:
            spread = (grad.unsqueeze(2) * weights.unsqueeze(1)).view(batch, -1)  # (B, D * L), in rank order
            grad_features = spread.new_empty(batch, steps * dims).scatter_(1, index.view(batch, -1), spread)
            grad_features = grad_features.view(batch, steps, dims)
        if ctx.needs_input_grad[1]:
            grad_weights = torch.bmm(grad.unsqueeze(1), values).squeeze(1)
        return grad_features, grad_weights, None, None


class MeanPooling(nn.Module):
    """``sum_{i < n_b} x_bi / n_b``."""

    def forward(self, features: Tensor, lengths: Tensor) -> Tensor:
        mask = length_mask(lengths.to(features.device), features.size(1)).unsqueeze(-1)
        total = features.sum(dim=1) if all_valid(mask) else features.masked_fill(~mask, 0).sum(dim=1)
        return total / lengths.to(features.device, features.dtype).unsqueeze(1)


class MaxPooling(nn.Module):
    """Per-dimension ``max_{i < n_b} x_bi``."""

    def forward(self, features: Tensor, lengths: Tensor) -> Tensor:
        mask = length_mask(lengths.to(features.device), features.size(1)).unsqueeze(-1)
        return features.masked_fill(~mask, float("-inf")).amax(dim=1)


class GPO(nn.Module):
    """Generalized Pooling Operator (Chen et al., CVPR 2021, "VSE-infinity").

    For a set of ``n`` features, each dimension is sorted in descending order and pooled with weights
    ``theta_k`` (k = rank) that depend only on ``n``: a BiGRU reads the sinusoidal encodings of ranks
    0..n-1, a linear scorer gives ``s_k``, and ``theta = softmax_k(s_k / temperature)`` over the n valid
    ranks. Output: ``sum_k theta_k * sorted_k(x)``. On the CPU in float32 the sort, the weighted sum and their
    backward are ``_RankedPooling`` (numpy's sort, the features never transposed); elsewhere torch's sort and gather.
    """

    def __init__(self, d_pe: int = 32, d_hidden: int = 32, temperature: float = 0.1) -> None:
        super().__init__()
        if d_pe % 2:
            raise ConfigError(f"GPO: d_pe must be even, got {d_pe}")
        self.d_pe = d_pe
        self.temperature = temperature
        self.gru = BiGRU(d_pe, d_hidden)
        self.scorer = nn.Linear(d_hidden, 1, bias=False)

    def pool_weights(self, lengths: Tensor, max_len: int) -> Tensor:
        """``(B, max_len)`` weights over ranks: softmax over the first ``lengths[b]`` ranks, 0 beyond.

        The weights depend on ``n`` alone, so the BiGRU runs once per distinct length (a batch of 49-cell grids
        is one sequence, not B) and each row takes the weights of its length. On the CPU it runs as
        ``xmcl.nn.gru_scan`` (the same function: a few short sequences cost per operator there, and that scan has
        fewer); on CUDA as ``nn.GRU`` (cuDNN).
        """
        device = self.scorer.weight.device
        distinct, row_of = torch.unique(lengths.to(device), return_inverse=True)
        mask = length_mask(distinct, max_len)
        pe = positional_encoding(max_len, self.d_pe, device=device)
        pe = pe.to(self.scorer.weight.dtype).expand(distinct.size(0), max_len, self.d_pe)
        states = (bidirectional_gru_mean(pe, distinct, self.gru.gru) if device.type == "cpu"
                  else self.gru(pe, distinct))
        scores = self.scorer(states).squeeze(-1)
        scores = scores.masked_fill(~mask, float("-inf"))
        return torch.softmax(scores / self.temperature, dim=1)[row_of]

    def forward(self, features: Tensor, lengths: Tensor) -> Tensor:
        max_len = features.size(1)
        weights = self.pool_weights(lengths, max_len).to(features.dtype)  # (B, L)
        cpu_float32 = features.device.type == "cpu" and features.dtype == torch.float32
        if cpu_float32 and features.shape[1] * features.shape[2] <= _LOW_BITS:
            with_grad = torch.is_grad_enabled() and (features.requires_grad or weights.requires_grad)
            return _RankedPooling.apply(features, weights, lengths, with_grad)
        mask = length_mask(lengths.to(features.device), max_len).unsqueeze(1)  # (B, 1, L)
        columns = features.transpose(1, 2)  # (B, D, L)
        padded = not all_valid(mask)
        keys = columns.detach().masked_fill(~mask, float("-inf")) if padded else columns.detach()
        if torch.is_grad_enabled() and columns.requires_grad:
            ranked = columns.gather(2, torch.argsort(keys, dim=2, descending=True))
        else:  # nothing to differentiate (a key encoder, inference): the sorted values, without the permutation
            ranked = torch.sort(keys, dim=2, descending=True).values
        if padded:  # the valid values occupy ranks 0..n-1; a pad's weight is 0 anyway
            ranked = ranked.masked_fill(~mask, 0)
        return (ranked * weights.unsqueeze(1)).sum(dim=2)


class TabulatedGPO(nn.Module):
    """A trained GPO with its weights tabulated, for export: ``table[n - 1, :n]`` holds ``theta`` for a set of ``n``
    features (``GPO.pool_weights``; zero beyond ``n``), so the pooling is a sort, a lookup and a weighted sum, with
    no recurrence and no data-dependent branch. Same ``forward`` contract and result as the GPO it was made from,
    for sets of up to ``table.shape[0]`` features."""

    def __init__(self, table: Tensor) -> None:
        super().__init__()
        self.register_buffer("table", table)

    @classmethod
    @torch.no_grad()
    def of(cls, gpo: GPO, max_len: int) -> "TabulatedGPO":
        lengths = torch.arange(1, max_len + 1, device=gpo.scorer.weight.device)
        return cls(gpo.pool_weights(lengths, max_len).float())

    def forward(self, features: Tensor, lengths: Tensor) -> Tensor:
        max_len = features.size(1)
        mask = length_mask(lengths.to(features.device), max_len).unsqueeze(-1)
        ranked = torch.sort(features.masked_fill(~mask, float("-inf")), dim=1, descending=True).values
        weights = self.table[lengths.to(self.table.device) - 1, :max_len].to(features.dtype)
        return (ranked.masked_fill(~mask, 0) * weights.unsqueeze(-1)).sum(dim=1)


def build_pooling(name: str) -> nn.Module:
    """``"gpo"`` (GPO with d_pe = d_hidden = 32, as VSE-infinity), ``"mean"`` or ``"max"`` (ablations)."""
    if name == "gpo":
        return GPO()
    if name == "mean":
        return MeanPooling()
    if name == "max":
        return MaxPooling()
    raise ConfigError(f"unknown pooling '{name}'; expected 'gpo', 'mean' or 'max'")
