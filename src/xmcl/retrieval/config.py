"""Typed configuration of the USER retrieval model and its loss (loaded from YAML by ``xmcl.config``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass
class ModelConfig:
    """Shapes and switches of :class:`xmcl.retrieval.model.USERModel`.

    Image side: ``image_input="regions"`` takes precomputed region features (``region_dim``-d);
    ``"images"`` runs ``backbone`` (``xmcl.nn.backbones`` name, ``backbone_weights`` path or None for random
    init, ``backbone_trainable`` mode) and treats its last feature map's h*w cells as regions, dropping a random
    share of them in training (``grid_drop``, VSE-infinity's size augmentation; 0 disables).
    Text side: ``"bert"`` loads a BERT-family model from ``text_model`` (a local directory; None = the
    installed default MiniLM), ``"bigru"`` embeds a vocabulary (size given to the model) in ``word_dim`` and
    runs a ``gru_layers``-layer BiGRU. ``sge``/``text_sge`` switch SGE on image/text locals (``sge_lambda`` is
    the attention sharpness, ``sge_dropout`` its dropout). ``cge``/``text_cge`` switch CLIP-guided enhancement
    (``xmcl.retrieval.cge``, sharpness ``cge_lambda``) of image/text locals, independently of SGE: the guides are
    ``clip_dim``-d embeddings of a frozen CLIP read from the ``clip_cache`` folder (``xmcl clip-cache``); the CLIP
    checkpoint ``clip_path`` (a transformers directory or an OpenAI ``.pt``) checks the cache is current and
    encodes images or captions the cache lacks at evaluation. ``use_queue`` adds momentum key encoders
    (``momentum``; kept in eval mode when ``key_encoders_eval``) and image/text queues of ``queue_size`` keys.
    """

    embed_dim: int = 1024
    image_input: Literal["regions", "images"] = "regions"
    region_dim: int = 2048
    backbone: str = "resnet50"
    backbone_weights: str | None = None
    backbone_trainable: Literal["frozen", "partial", "full"] = "partial"
    grid_drop: float = 0.2
    text_encoder: Literal["bert", "bigru"] = "bert"
    text_model: str | None = None
    word_dim: int = 300
    gru_layers: int = 1
    pooling: Literal["gpo", "mean", "max"] = "gpo"
    sge: bool = True
    text_sge: bool = False
    sge_lambda: float = 1.0
    sge_dropout: float = 0.4
    cge: bool = False
    text_cge: bool = False
    cge_lambda: float = 1.0
    clip_dim: int = 512
    clip_path: str | None = None
    clip_cache: str | None = None
    momentum: float = 0.999
    key_encoders_eval: bool = True
    queue_size: int = 4096
    use_queue: bool = True


@dataclass
class LossConfig:
    """Which retrieval loss (``xmcl.contrast``) and its constants.

    ``uto``: ``mu`` (scale), ``gamma`` (margin); ``hinge``: ``margin``, ``warmup_epochs`` of summed violations
    before hardest-negative; ``infonce``: initial ``temperature`` (learnable). ``lambda_batch`` weighs the
    in-batch term against the queue terms; ``queue_false_negatives="mask"`` keeps queued keys of the query's
    own image out of its negatives (``"keep"`` counts them, as the USER authors do). ``uto_warmup_epochs``:
    epochs of the VSE++ sum-of-violations hinge before UTO takes over (0 = none, as in the paper; see
    ``xmcl.contrast.WarmStartLoss`` for when UTO cannot start without it).
    """

    name: Literal["uto", "hinge", "infonce"] = "uto"
    mu: float = 90.0
    gamma: float = 0.5
    lambda_batch: float = 1.0
    margin: float = 0.2
    warmup_epochs: int = 1
    uto_warmup_epochs: int = 0
    temperature: float = 0.07
    queue_false_negatives: Literal["mask", "keep"] = "mask"
