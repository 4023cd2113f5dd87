"""Dropout whose CPU mask is drawn by numpy's SFC64 generators, over torch's threads, from a seed of torch's."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from xmcl.errors import ConfigError
from xmcl.runtime.threads import run_in_parts

_LEVELS = 1 << 16  # a CPU mask compares 16-bit uniform integers: probabilities in steps of 1 / 65536
_CHUNK = 1 << 17  # mask elements per generator: the mask does not depend on how many threads draw it


@torch.compiler.disable  # numpy work: a compiled caller runs it as it is, outside its graph
def cpu_keep_mask(shape: torch.Size, p: float, keep_value: float | None = None) -> Tensor:
    """A boolean mask, each element True with probability ``1 - round(p * 65536) / 65536`` (within 7.7e-6 of
    ``1 - p``); with ``keep_value``, the float32 mask ``keep_value`` where True and 0 elsewhere. One seed is drawn
    from torch's global generator (so ``torch.manual_seed`` and a ``TorchStream`` govern the mask); chunk ``c`` of
    ``_CHUNK`` elements comes from numpy's ``SFC64(SeedSequence([seed, c]))``, whose 64-bit words are cut into four
    16-bit integers ``u ~ U{-32768, ..., 32767}``, kept where ``u >= round(p * 65536) - 32768``. The chunks are drawn
    side by side over torch's threads (``run_in_parts``); one thread draws a 64-bit word in about a third of the time
    of torch's generator."""
    count = shape.numel()
    seed = int(torch.randint(0, 1 << 62, (1,)).item())
    threshold = round(p * _LEVELS) - _LEVELS // 2
    keep = np.empty(count, dtype=np.bool_)
    scaled = None if keep_value is None else np.empty(count, dtype=np.float32)

    def draw(chunks: slice) -> None:
        for chunk in range(chunks.start, chunks.stop):
            part = slice(chunk * _CHUNK, min(count, (chunk + 1) * _CHUNK))
            size = part.stop - part.start
            words = np.random.SFC64(np.random.SeedSequence([seed, chunk])).random_raw((size + 3) // 4)
            np.greater_equal(words.view(np.int16)[:size], threshold, out=keep[part])
            if scaled is not None:  # while the chunk is in cache
                scaled[part] = keep[part]
                scaled[part] *= np.float32(keep_value)

    run_in_parts(draw, (count + _CHUNK - 1) // _CHUNK, min_part=1)
    return torch.from_numpy(keep if scaled is None else scaled).view(shape)


class Dropout(nn.Module):
    """Inverted dropout: in training ``y = x * m / (1 - p)`` with ``m_i`` kept with probability ``1 - p``, drawn
    from (or, on CPU, seeded by) torch's global generator, so a ``TorchStream`` governs it as it does ``nn.Dropout``;
    identity in eval.

    On CPU, whose ``nn.Dropout`` draws a Bernoulli variate per element on one thread, the mask is ``cpu_keep_mask``
    (``p`` rounded to a multiple of 1 / 65536); elsewhere it is ``F.dropout``.
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
        return x * cpu_keep_mask(x.shape, self.p, keep_value=1.0 / (1.0 - self.p)).to(x.dtype)

    def extra_repr(self) -> str:
        return f"p={self.p}"
