"""Pooling a padded set of local features into one vector: GPO (VSE-infinity) and masked mean / max.

Every pooling module has ``forward(features (B, L, D), lengths (B,)) -> (B, D)``; padded positions never
influence the result, so the output does not depend on how much padding a batch carries.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import numpy as np
import torch
from torch import Tensor, nn

from xmcl.errors import ConfigError
from xmcl.nn.gru_scan import bidirectional_gru_mean
from xmcl.nn.sequence import BiGRU, all_valid, length_mask


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


def descending_order(values: Tensor) -> Tensor:
    """Indices that sort ``values (..., L)`` in descending order along its last dimension (no gradient flows).

    On CPU float32/float64 it is numpy's sort, large inputs split over torch's threads (numpy sorts without the GIL):
    for the short rows pooling sorts (49 cells, ~15 tokens) several times faster than ``torch.sort``. Elsewhere
    (CUDA, half precision) it is ``torch.argsort``. The two may order equal values differently, which changes no
    sorted value. Values are not NaN.
    """
    if values.device.type == "cpu" and values.dtype in (torch.float32, torch.float64):
        long_rows = values.shape[-1] >= 1 << _INDEX_BITS
        return _by_rows(values, _descending_float32 if values.dtype == torch.float32 and not long_rows
                        else _descending_argsort, np.int64)
    return torch.argsort(values.detach(), dim=-1, descending=True)


def descending_values(values: Tensor) -> Tensor:
    """``values (..., L)`` sorted in descending order along the last dimension, without the permutation (no
    gradient): on CPU float32/float64 numpy's sort, as ``descending_order``; elsewhere ``torch.sort``."""
    if values.device.type == "cpu" and values.dtype in (torch.float32, torch.float64):
        return _by_rows(values, lambda rows: np.sort(rows, axis=-1)[:, ::-1], rows_dtype=None)
    return torch.sort(values.detach(), dim=-1, descending=True).values


@torch.compiler.disable  # numpy work: a compiled caller runs it as it is, outside its graph
def _by_rows(values: Tensor, sort: Callable[[np.ndarray], np.ndarray], rows_dtype: type | None) -> Tensor:
    """``sort`` applied to the rows of ``values (..., L)`` (CPU), in parts over torch's threads when it is large;
    the result has ``values``' shape and ``rows_dtype`` (None: ``values``' dtype)."""
    rows = values.detach().reshape(-1, values.shape[-1]).numpy()
    out = np.empty(rows.shape, dtype=rows.dtype if rows_dtype is None else rows_dtype)
    parts = max(1, min(torch.get_num_threads(), rows.size // _SPLIT_ELEMENTS + 1, rows.shape[0]))
    bounds = np.linspace(0, rows.shape[0], parts + 1).astype(int)
    spans = [slice(start, stop) for start, stop in zip(bounds[:-1], bounds[1:])]

    def sort_span(span: slice) -> None:
        out[span] = sort(rows[span])

    if parts == 1:
        sort_span(spans[0])
    else:
        list(_sorting_pool(parts).map(sort_span, spans))
    return torch.from_numpy(out).view(values.shape)


_INDEX_BITS = 29  # a float32 widened to float64 has its 29 lowest mantissa bits zero
_BEYOND_FLOAT32 = 2.0 ** 1000
_SPLIT_ELEMENTS = 1 << 15  # rows are split over threads in parts of at least this many values
_pools: dict[int, ThreadPoolExecutor] = {}


def _sorting_pool(workers: int) -> ThreadPoolExecutor:
    """The ``workers`` threads ``_by_rows`` splits its rows over (made once per count)."""
    if workers not in _pools:
        _pools[workers] = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="xmcl-sort")
    return _pools[workers]


def _descending_argsort(rows: np.ndarray) -> np.ndarray:
    """``np.argsort`` of ``-rows``: descending, the -inf pads last."""
    return np.argsort(-rows, axis=-1)


def _descending_float32(rows: np.ndarray) -> np.ndarray:
    """Descending order of float32 rows ``(n, L)`` by one sort of float64 keys that carry their column.

    Each value is widened to float64 and its column index written into the 29 low mantissa bits, which widening
    leaves zero: that moves a key by less than the gap to the next float32, so keys order as their values do
    (equal values by column). Sorting the negated keys ascending (numpy's vectorised sort of plain values, about
    twice as fast as its argsort) is the descending order; the columns are read back from the low bits. Infinities
    (the -inf pads) become +-2^1000 first, beyond every float32 and with a zero mantissa: an infinity's low bits
    would make it a NaN, whose bits the sort does not keep.
    """
    keys = rows.astype(np.float64)
    np.clip(keys, -_BEYOND_FLOAT32, _BEYOND_FLOAT32, out=keys)
    bits = keys.view(np.int64)
    bits |= np.arange(rows.shape[1], dtype=np.int64)
    np.negative(keys, out=keys)
    keys.sort(axis=-1)
    bits &= (1 << _INDEX_BITS) - 1
    return bits


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
    ranks. Output: ``sum_k theta_k * sorted_k(x)``.
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
        mask = length_mask(lengths.to(features.device), max_len).unsqueeze(1)  # (B, 1, L)
        weights = self.pool_weights(lengths, max_len).to(features.dtype).unsqueeze(1)  # (B, 1, L)
        # each dimension's values as a contiguous row (B, D, L): the sort, the gather and its backward's scatter
        # then run along contiguous memory
        columns = features.transpose(1, 2).contiguous()
        padded = not all_valid(mask)  # grid cells: nothing padded, no masking
        keys = columns.detach().masked_fill(~mask, float("-inf")) if padded else columns.detach()
        if torch.is_grad_enabled() and columns.requires_grad:
            ranked = columns.gather(2, descending_order(keys))
        else:  # nothing to differentiate (a key encoder, inference): the sorted values, without the permutation
            ranked = descending_values(keys)
        if padded:  # the valid values occupy ranks 0..n-1; a pad's weight is 0 anyway
            ranked = ranked.masked_fill(~mask, 0)
        return (ranked * weights).sum(dim=2)


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
