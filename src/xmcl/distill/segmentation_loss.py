"""The authors' downstream loss: cross-entropy + Lovasz-softmax (Berman et al. 2018) over the labelled points.

For class probabilities ``p`` (P, C) and labels ``y`` (P,), per class c present in ``y``: errors
``e_i = |[y_i = c] - p_ic|`` sorted in decreasing order; with ``g`` the class-c indicators in that order,
``J_k = 1 - (G - sum_{i<=k} g_i) / (G + sum_{i<=k} (1 - g_i))`` (``G = sum g``) is the Jaccard loss of predicting
the first k sorted points as errors, and the class's loss is ``sum_k e_(k) (J_k - J_{k-1})`` (``J_0 = 0``), the
Lovasz extension of the Jaccard loss at ``e``. Lovasz-softmax = the mean over the present classes; at hard
(one-hot) predictions it equals the mean of ``1 - IoU_c`` over them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def lovasz_softmax(probas: Tensor, labels: Tensor) -> Tensor:
    """Mean over the classes present in ``labels`` (P,) of the Lovasz hinge of ``probas`` (P, C)."""
    losses = []
    for c in torch.unique(labels).tolist():
        fg = (labels == c).to(probas.dtype)
        errors = (fg - probas[:, c]).abs()
        errors_sorted, order = torch.sort(errors, descending=True)
        g = fg[order]
        total = g.sum()
        jaccard = 1.0 - (total - g.cumsum(0)) / (total + (1.0 - g).cumsum(0))
        steps = torch.cat([jaccard[:1], jaccard[1:] - jaccard[:-1]])
        losses.append(errors_sorted @ steps)
    return torch.stack(losses).mean() if losses else probas.sum() * 0.0


def cross_entropy_lovasz(logits: Tensor, labels: Tensor, ignore_index: int = -1) -> Tensor:
    """``CE(logits, y) + lovasz_softmax(softmax(logits), y)`` over the points whose label is not ``ignore_index``."""
    keep = labels != ignore_index
    logits, labels = logits[keep], labels[keep]
    if labels.numel() == 0:
        return logits.sum() * 0.0
    return F.cross_entropy(logits, labels) + lovasz_softmax(logits.softmax(dim=1), labels)
