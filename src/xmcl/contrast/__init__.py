"""Losses, queues and weights shared by both systems.

Retrieval (USER): ``build_retrieval_loss("uto" | "hinge" | "infonce", **kwargs)`` returns a module called as
``loss(img, txt, image_ids, img_key=None, txt_key=None, img_queue=None, txt_queue=None, queue_ids=None,
queue_valid=None, global_batch=None, semantic=None, queue_semantic=None) -> {"loss", "batch", ["queue_i2t",
"queue_t2i"]}`` (UTO and InfoNCE take ``tolerance`` / ``balance``: ST-SLidR's semantic weights on retrieval);
``MomentumQueue`` holds keys with their image ids; ``make_key_encoder`` / ``momentum_update`` maintain the
momentum encoder.

Distillation (ST-SLidR): ``STSlidrLoss(...)(points, pixels, semantic=None) -> scalar``; the weights it uses are
exposed for inspection in ``semantic_weights``.
"""

from xmcl.contrast.momentum import make_key_encoder, momentum_update
from xmcl.contrast.queue import MomentumQueue
from xmcl.contrast.retrieval_losses import (
    RETRIEVAL_LOSSES,
    GlobalBatch,
    HingeLoss,
    InfoNCELoss,
    RetrievalLoss,
    UTOLoss,
    WarmStartLoss,
    build_retrieval_loss,
)
from xmcl.contrast.semantic_weights import (
    class_balance_weights,
    quantile_drop_mask,
    semantic_similarity,
    soft_negative_weights,
)
from xmcl.contrast.superpixel_losses import STSlidrLoss

__all__ = [
    "RETRIEVAL_LOSSES",
    "GlobalBatch",
    "HingeLoss",
    "InfoNCELoss",
    "MomentumQueue",
    "RetrievalLoss",
    "STSlidrLoss",
    "UTOLoss",
    "WarmStartLoss",
    "build_retrieval_loss",
    "class_balance_weights",
    "make_key_encoder",
    "momentum_update",
    "quantile_drop_mask",
    "semantic_similarity",
    "soft_negative_weights",
]
