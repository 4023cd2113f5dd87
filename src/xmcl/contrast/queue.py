"""A ring buffer of momentum keys with the image id of each key (MoCo / ALBEF style queue)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from xmcl.errors import ConfigError, DataError


class MomentumQueue(nn.Module):
    """K keys of dimension d, their image ids (-1 while a slot is empty) and a write pointer.

    ``keys``, ``ids``, ``ptr`` and ``filled`` are registered buffers: they follow ``.to(device)`` and are saved
    in and restored from ``state_dict``, so a resumed run continues with the same queue. Writes wrap around;
    K need not be a multiple of the batch size. Slots fill in order 0, 1, ..., so the valid slots are
    exactly the first ``filled`` ones until the queue is full.
    """

    def __init__(self, size: int, dim: int, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        if size < 1 or dim < 1:
            raise ConfigError(f"queue size and dim must be >= 1, got size={size}, dim={dim}")
        self.register_buffer("keys", torch.zeros(size, dim, dtype=dtype))
        self.register_buffer("ids", torch.full((size,), -1, dtype=torch.int64))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.int64))
        self.register_buffer("filled", torch.zeros((), dtype=torch.int64))

    @property
    def size(self) -> int:
        return self.keys.shape[0]

    @torch.no_grad()
    def enqueue(self, keys: Tensor, ids: Tensor) -> None:
        """Write ``keys`` (n x d, detached) and their ``ids`` (n,) at the pointer, oldest first.

        The result equals writing the n rows one by one: a batch larger than K leaves its last K rows.
        """
        if keys.dim() != 2 or keys.shape[1] != self.keys.shape[1]:
            raise DataError(f"queue keys must be (n x {self.keys.shape[1]}), got {tuple(keys.shape)}")
        if ids.shape != (keys.shape[0],):
            raise DataError(f"queue ids must have shape ({keys.shape[0]},), got {tuple(ids.shape)}")
        if ids.is_floating_point() or ids.dtype == torch.bool:
            raise DataError(f"queue ids must be integers, got {ids.dtype}")
        if (ids < 0).any():
            raise DataError(f"queue ids must be >= 0 (-1 marks an empty slot), got {int(ids.min())}")
        n, size = keys.shape[0], self.size
        if n == 0:
            return
        start = int(self.ptr) + max(n - size, 0)
        slots = (start + torch.arange(min(n, size), device=self.keys.device)) % size
        self.keys[slots] = keys[-size:].detach().to(self.keys)
        self.ids[slots] = ids[-size:].to(self.ids)
        self.ptr.fill_((int(self.ptr) + n) % size)
        self.filled.fill_(min(int(self.filled) + n, size))

    def valid_mask(self) -> Tensor:
        """(K,) bool: True for slots that hold a key."""
        return torch.arange(self.size, device=self.keys.device) < self.filled
