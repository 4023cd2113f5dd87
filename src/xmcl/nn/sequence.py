"""Padded sequences: the length mask every masked module shares, and a bidirectional GRU.

Convention used across ``xmcl.nn`` and ``xmcl.retrieval``: a batch of variable-size sets or sequences is a
padded tensor ``(B, L, D)`` plus ``lengths (B,)``; the valid items of row ``b`` are ``0 .. lengths[b]-1``.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from xmcl.errors import DataError


def length_mask(lengths: Tensor, max_len: int) -> Tensor:
    """``(B, max_len)`` bool mask, True where ``position < lengths[b]``.

    Raises DataError if a length is below 1 or above ``max_len`` (an empty or over-long row).
    """
    if lengths.dim() != 1:
        raise DataError(f"lengths must be a 1-D tensor, got shape {tuple(lengths.shape)}")
    if lengths.numel() > 0:
        low, high = int(lengths.min()), int(lengths.max())
        if low < 1 or high > max_len:
            raise DataError(f"lengths must lie in [1, {max_len}] (the padded size), got min {low}, max {high}")
    positions = torch.arange(max_len, device=lengths.device)
    return positions.unsqueeze(0) < lengths.to(positions.device).unsqueeze(1)


_complete_sets = False


@contextmanager
def tracing_complete_sets() -> Iterator[None]:
    """While a graph whose every input set is complete (no padding: grid cells) is traced, ``all_valid`` says so
    and the traced graph takes the fast paths, without the masks' gathers and scatters."""
    global _complete_sets
    _complete_sets = True
    try:
        yield
    finally:
        _complete_sets = False


def all_valid(mask: Tensor) -> bool:
    """True when no position of ``mask`` is padding, for the fast paths that skip masking. While a graph is traced
    for export (``torch.jit.is_tracing``) a branch is fixed for every later input, so this is False there (the
    traced graph masks), unless ``tracing_complete_sets`` declares that no input of the graph has padding."""
    if torch.jit.is_tracing():
        return _complete_sets
    return bool(mask.all())


class BiGRU(nn.Module):
    """Bidirectional GRU over padded sequences (packed, so padding never reaches the recurrence).

    ``forward(x (B, L, D_in), lengths (B,)) -> (B, L, hidden)``: the mean of the forward and backward
    hidden states at each position (as VSE-infinity); padded positions are 0.
    """

    def __init__(self, input_dim: int, hidden_dim: int, num_layers: int = 1) -> None:
        super().__init__()
        self.hidden_dim = hidden_dim
        self.gru = nn.GRU(input_dim, hidden_dim, num_layers, batch_first=True, bidirectional=True)

    def forward(self, x: Tensor, lengths: Tensor) -> Tensor:
        length_mask(lengths, x.size(1))  # validates the lengths
        self.gru.flatten_parameters()  # keeps cuDNN weights contiguous after copies (key encoders)
        packed = pack_padded_sequence(x, lengths.cpu().long(), batch_first=True, enforce_sorted=False)
        out, _ = self.gru(packed)
        out, _ = pad_packed_sequence(out, batch_first=True, total_length=x.size(1))
        return (out[..., : self.hidden_dim] + out[..., self.hidden_dim :]) / 2
