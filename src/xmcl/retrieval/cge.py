"""CLIP-guided enhancement (CGE) of USER's local features.

A frozen CLIP's global embedding ``c`` of the same image (or caption) is projected to the locals' width and
L2-normalised, ``g = normalise(W c + b)``, and guides the locals with SGE's operator
(:func:`xmcl.retrieval.enhancement.guided_enhancement`): ``v_i' = v_i + a_i g``,
``a = normalise_L2(softmax_i(lam * <g, v_i>))`` over the valid locals. Only ``W, b`` train; CLIP does not.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from xmcl.errors import DataError
from xmcl.retrieval.enhancement import guided_enhancement


class CGE(nn.Module):
    """``forward(local (B, R, dim), lengths (B,), clip (B, clip_dim)) -> (B, R, dim)``."""

    def __init__(self, clip_dim: int, dim: int, lam: float = 1.0) -> None:
        super().__init__()
        self.clip_dim, self.lam = clip_dim, lam
        self.projection = nn.Linear(clip_dim, dim)
        nn.init.xavier_uniform_(self.projection.weight)
        nn.init.zeros_(self.projection.bias)

    def guide(self, clip: Tensor) -> Tensor:
        """``(B, dim)`` unit guide from the CLIP embeddings ``(B, clip_dim)``."""
        if clip.dim() != 2 or clip.size(-1) != self.clip_dim:
            raise DataError(f"CGE expects CLIP embeddings (B, {self.clip_dim}) (model.clip_dim), "
                            f"got shape {tuple(clip.shape)}")
        return F.normalize(self.projection(clip.to(self.projection.weight.dtype)), dim=-1)

    def forward(self, local: Tensor, lengths: Tensor, clip: Tensor) -> Tensor:
        if clip.size(0) != local.size(0):
            raise DataError(f"CGE got {clip.size(0)} CLIP embeddings for a batch of {local.size(0)}")
        return guided_enhancement(local, lengths, self.guide(clip), self.lam)
