"""Dropout whose CPU mask costs a uniform draw and a comparison."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from xmcl.errors import ConfigError


class Dropout(nn.Module):
    """Inverted dropout: in training ``y = x * m / (1 - p)``, ``m_i = [u_i >= p]``, ``u ~ U[0, 1)`` drawn from
    torch's global generator (so a ``TorchStream`` governs it as it does ``nn.Dropout``); identity in eval.

    The distribution is ``nn.Dropout``'s. On CPU, whose ``nn.Dropout`` draws a Bernoulli variate per element
    (about 4x the time of ``torch.rand``), the mask is ``torch.rand(...) >= p``; elsewhere it is ``F.dropout``.
    No parameters or buffers: it can replace ``nn.Dropout`` in a module without changing its checkpoint keys.
    """

    def __init__(self, p: float = 0.5) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ConfigError(f"dropout probability must be in [0, 1), got {p}")
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0.0:
            return x
        if x.device.type != "cpu":
            return F.dropout(x, self.p, training=True)
        scaled_mask = (torch.rand(x.shape, dtype=x.dtype) >= self.p).to(x.dtype).mul_(1.0 / (1.0 - self.p))
        return x * scaled_mask

    def extra_repr(self) -> str:
        return f"p={self.p}"
