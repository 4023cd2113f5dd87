"""USER's two towers: local features -> (SGE) -> joint space -> pooling -> L2-normalised embedding.

Image tower: precomputed region features ``(B, R, D)`` + lengths, or raw images through a CNN backbone
whose last feature map ``(B, C, h, w)`` becomes ``h*w`` grid "regions". Order, as in the authors' code:
SGE on the raw locals, projection (``fc + MLP``) to the joint space, pooling, L2.
Text tower: a BERT-family model from a local directory (last hidden state -> linear -> optional SGE) or a
BiGRU over a vocabulary embedding (its output is already in the joint space -> optional SGE); then pooling, L2.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from xmcl.data.text import resolve_text_model_dir
from xmcl.errors import CheckpointError, ConfigError, DataError
from xmcl.nn import dense
from xmcl.nn.backbones import build_image_backbone, set_trainable
from xmcl.nn.gpo import build_pooling
from xmcl.nn.heads import ProjectionHead
from xmcl.nn.pca import FrozenPCA
from xmcl.nn.sequence import BiGRU, all_valid, length_mask
from xmcl.retrieval.cge import CGE
from xmcl.retrieval.config import RetrievalModelConfig
from xmcl.retrieval.enhancement import SGE

GRID_DROP_GATE = 0.2  # VSE-infinity: an image keeps all its cells when its draw u <= 0.2


def drop_grid_cells(features: Tensor, rate: float) -> tuple[Tensor, Tensor]:
    """VSE-infinity's size augmentation of grid features ``(B, N, C)``.

    Per image draw ``u ~ U(0, 1)``; if ``u > 0.2`` each cell is dropped with probability ``rate * u``.
    Kept cells move to the front (in their original order); returns ``(features (B, N', C), lengths (B,))``
    with ``N'`` the largest kept count. At least one cell of each image is always kept.
    """
    batch, cells = features.shape[:2]
    u = torch.rand(batch, 1, device=features.device)
    keep = (torch.rand(batch, cells, device=features.device) >= rate * u) | (u <= GRID_DROP_GATE)
    keep[:, 0] |= ~keep.any(dim=1)
    order = torch.sort((~keep).to(torch.uint8), dim=1, stable=True).indices
    lengths = keep.sum(dim=1)
    compact = features.gather(1, order.unsqueeze(-1).expand_as(features))
    return compact[:, : int(lengths.max())], lengths


def project_valid_positions(projection: nn.Module, states: Tensor, lengths: Tensor) -> Tensor:
    """``projection`` (a per-position map) of the first ``lengths[b]`` positions of ``states (B, L, H)``, 0 at the
    pads, which nothing downstream reads: a batch padded to its longest caption is about half pads, and their
    products and gradients are skipped. Without pads, under ``torch.compile`` / ``export`` and the tracer (a shape
    that depends on the data), every position is projected."""
    if isinstance(projection, nn.Identity) or torch.jit.is_tracing() or torch.compiler.is_compiling():
        return projection(states)
    mask = length_mask(lengths, states.size(1))
    if all_valid(mask):
        return projection(states)
    positions = mask.flatten().nonzero().squeeze(1)
    projected = projection(states.flatten(0, 1).index_select(0, positions))
    out = projected.new_zeros(mask.numel(), projected.size(-1)).index_copy(0, positions, projected)
    return out.view(*mask.shape, -1)


def _need_guide(clip: Tensor | None, key: str, switch: str) -> Tensor:
    if clip is None:
        raise DataError(f"CGE is on ({switch}) but no CLIP embeddings were given (batch key '{key}'); compute them "
                        f"with `xmcl clip-cache` and set model.clip_cache")
    return clip


class ImageEncoder(nn.Module):
    """``forward(inputs, lengths=None, clip=None) -> (B, embed_dim)`` unit vectors.

    Without a backbone, ``inputs`` are region features ``(B, R, local_dim)`` and ``lengths (B,)`` the valid
    counts (None = all R valid); with a ``reduction`` (a frozen PCA to ``local_dim``) they may also be the raw
    ``(B, R, reduction.in_dim)`` features, which it projects first (``reduce`` does that alone, so that a caller
    running two encoders on one batch projects once). With a backbone, ``inputs`` are images ``(B, 3, H, W)`` and
    ``lengths`` must be None.
    The raw locals go through SGE (``sge_on="raw"``; ``"joint"``: after the projection), then CGE guided by
    ``clip (B, clip_dim)`` (required when ``cge`` is set).
    """

    def __init__(self, local_dim: int, embed_dim: int, pooling: str = "gpo", sge: SGE | None = None,
                 backbone: nn.Module | None = None, grid_drop: float = 0.0, cge: CGE | None = None,
                 head: ProjectionHead | None = None, sge_on: str = "raw", reduction: FrozenPCA | None = None) -> None:
        super().__init__()
        self.local_dim = local_dim
        self.reduction = reduction
        self.backbone = backbone
        self.grid_drop = grid_drop
        self.sge = sge
        self.head = head or ProjectionHead(local_dim, embed_dim)
        self.sge_on = sge_on
        self.pooling = build_pooling(pooling)
        self.cge = cge

    def local_features(self, inputs: Tensor, lengths: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """The raw locals ``(B, R, local_dim)`` and their lengths (grid cells for images)."""
        if self.backbone is not None:
            if inputs.dim() != 4:
                raise DataError(f"the image encoder expects images (B, 3, H, W), got shape {tuple(inputs.shape)}")
            if lengths is not None:
                raise DataError("images come without lengths: every grid cell of the feature map is valid")
            grid = self.backbone(inputs)
            local = grid.flatten(2).transpose(1, 2)  # (B, h*w, C)
            if self.training and self.grid_drop > 0:
                return drop_grid_cells(local, self.grid_drop)
            return local, torch.full((local.size(0),), local.size(1), device=local.device, dtype=torch.long)
        inputs = self.reduce(inputs)
        if inputs.dim() != 3 or inputs.size(-1) != self.local_dim:
            widths = f"{self.reduction.in_dim} or {self.local_dim}" if self.reduction is not None else self.local_dim
            raise DataError(f"the image encoder expects region features (B, R, {widths}), "
                            f"got shape {tuple(inputs.shape)}")
        if lengths is None:
            lengths = torch.full((inputs.size(0),), inputs.size(1), dtype=torch.long)
        return inputs, lengths.to(inputs.device)

    def reduce(self, inputs: Tensor) -> Tensor:
        """Raw region features projected by the frozen PCA; anything else (images, reduced features) unchanged."""
        if self.reduction is None or self.backbone is not None or inputs.size(-1) != self.reduction.in_dim:
            return inputs
        return self.reduction(inputs)

    def forward(self, inputs: Tensor, lengths: Tensor | None = None, clip: Tensor | None = None) -> Tensor:
        local, lengths = self.local_features(inputs, lengths)
        if self.sge is not None and self.sge_on == "raw":
            local = self.sge(local, lengths)
        if self.cge is not None:
            local = self.cge(local, lengths, _need_guide(clip, "clip_image", "model.cge"))
        joint = self.head(local, lengths)
        if self.sge is not None and self.sge_on == "joint":
            joint = self.sge(joint, lengths)
        return F.normalize(self.pooling(joint, lengths), dim=-1)


class HFTextModel(nn.Module):
    """A BERT-family model loaded from a local directory: ``(ids, lengths) -> last hidden state (B, L, H)``.
    ``pretrained=False`` builds its architecture from the directory's ``config.json`` alone (random weights, for a
    caller that loads trained ones next: a saved retrieval model's fine-tuned text model)."""

    def __init__(self, model_dir: Path | str, pretrained: bool = True) -> None:
        super().__init__()
        from transformers import AutoConfig, AutoModel
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()  # no "Loading weights" bar on every command that loads a model

        model_dir = Path(model_dir)
        if not (model_dir / "config.json").is_file():
            raise ConfigError(f"text model directory {model_dir} has no config.json")
        try:
            if pretrained:
                self.model = AutoModel.from_pretrained(str(model_dir), local_files_only=True).float()
            else:
                self.model = AutoModel.from_config(AutoConfig.from_pretrained(str(model_dir), local_files_only=True))
        except pickle.UnpicklingError:  # transformers loads .bin weights with torch.load(weights_only=True)
            raise CheckpointError(f"text model directory {model_dir}: a weights file is refused: it holds objects "
                                  f"other than tensors, and loading it could run code") from None
        except (OSError, ValueError, KeyError) as error:
            raise ConfigError(f"cannot load the text model in {model_dir}: {error}") from None
        self.hidden_dim = int(self.model.config.hidden_size)

    def forward(self, ids: Tensor, lengths: Tensor) -> Tensor:
        attention_mask = length_mask(lengths.to(ids.device), ids.size(1)).long()
        return self.model(input_ids=ids, attention_mask=attention_mask).last_hidden_state


class GRUTextModel(nn.Module):
    """Word embedding (uniform init in [-0.1, 0.1]) + BiGRU, directions averaged: ``-> (B, L, hidden_dim)``."""

    def __init__(self, vocab_size: int, word_dim: int, hidden_dim: int, num_layers: int = 1) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, word_dim)
        nn.init.uniform_(self.embed.weight, -0.1, 0.1)
        self.gru = BiGRU(word_dim, hidden_dim, num_layers)
        self.hidden_dim = hidden_dim

    def forward(self, ids: Tensor, lengths: Tensor) -> Tensor:
        return self.gru(self.embed(ids), lengths)


class CachedTextStates(nn.Module):
    """The frozen text model's states read from the token-feature cache: ``(states (B, L, H), lengths) -> states``."""

    input_rank = 3

    def __init__(self, hidden_dim: int) -> None:
        super().__init__()
        self.hidden_dim = hidden_dim

    def forward(self, states: Tensor, lengths: Tensor) -> Tensor:
        if states.size(-1) != self.hidden_dim:
            raise DataError(f"cached token features are {states.size(-1)}-d but model.text_feature_dim is "
                            f"{self.hidden_dim}")
        return states


class TextEncoder(nn.Module):
    """``forward(ids (B, L), lengths (B,), clip=None) -> (B, embed_dim)`` unit vectors (``ids`` are cached token
    states (B, L, H) when ``sequence`` is ``CachedTextStates``).

    ``sequence`` maps ids to per-token states of size ``sequence.hidden_dim``; with ``project`` a linear layer
    maps them to the joint space (BERT; the valid positions only, ``project_valid_positions``), without it they must
    already be ``embed_dim``-d (BiGRU); then optional SGE, optional CGE guided by ``clip (B, clip_dim)``, pooling
    and L2.
    """

    def __init__(self, sequence: nn.Module, embed_dim: int, project: bool = True, pooling: str = "gpo",
                 sge: SGE | None = None, cge: CGE | None = None) -> None:
        super().__init__()
        self.sequence = sequence
        if not project and sequence.hidden_dim != embed_dim:
            raise ConfigError(f"text states are {sequence.hidden_dim}-d but the joint space is {embed_dim}-d: "
                              "a projection is needed")
        self.projection = dense.Linear(sequence.hidden_dim, embed_dim) if project else nn.Identity()
        self.sge = sge
        self.pooling = build_pooling(pooling)
        self.cge = cge

    def forward(self, ids: Tensor, lengths: Tensor, clip: Tensor | None = None) -> Tensor:
        rank = getattr(self.sequence, "input_rank", 2)
        if ids.dim() != rank:
            expected = "token ids (B, L)" if rank == 2 else "token features (B, L, H)"
            raise DataError(f"the text encoder expects {expected}, got shape {tuple(ids.shape)}")
        lengths = lengths.to(ids.device)
        local = project_valid_positions(self.projection, self.sequence(ids, lengths), lengths)
        if self.sge is not None:
            local = self.sge(local, lengths)
        if self.cge is not None:
            local = self.cge(local, lengths, _need_guide(clip, "clip_text", "model.text_cge"))
        return F.normalize(self.pooling(local, lengths), dim=-1)


def build_image_encoder(cfg: RetrievalModelConfig, pretrained: bool = True) -> ImageEncoder:
    """The image tower ``cfg`` describes (the backbone from ``xmcl.nn.backbones`` when ``image_input="images"``;
    ``pretrained=False``: without its pretrained weights, for a caller that loads trained ones next)."""
    backbone = reduction = None
    local_dim = cfg.region_dim
    if cfg.region_pca_dim is not None:
        reduction = FrozenPCA(cfg.region_dim, cfg.region_pca_dim)
        local_dim = cfg.region_pca_dim
    if cfg.image_input == "images":
        backbone = build_image_backbone(cfg.backbone, cfg.backbone_weights if pretrained else None)
        set_trainable(backbone, cfg.backbone_trainable)
        local_dim = backbone.out_channels
    sge_dim = local_dim if cfg.image_sge_on == "raw" else cfg.embed_dim
    sge = SGE(sge_dim, cfg.sge_lambda, cfg.sge_dropout) if cfg.sge else None
    cge = CGE(cfg.clip_dim, local_dim, cfg.cge_lambda) if cfg.cge else None
    head = ProjectionHead(local_dim, cfg.embed_dim, cfg.head_hidden_dim, cfg.head_init)
    return ImageEncoder(local_dim, cfg.embed_dim, cfg.pooling, sge, backbone, cfg.grid_drop, cge, head,
                        cfg.image_sge_on, reduction)


def build_text_encoder(cfg: RetrievalModelConfig, vocab_size: int | None = None,
                       pretrained: bool = True) -> TextEncoder:
    """The text tower ``cfg`` describes; ``vocab_size`` is required for ``text_encoder="bigru"``. ``pretrained=False``:
    a BERT-family model gets its architecture only (trained weights are loaded next)."""
    if cfg.text_input == "token_features":
        sequence: nn.Module = CachedTextStates(cfg.text_feature_dim)
    elif cfg.text_encoder == "bert":
        sequence = HFTextModel(resolve_text_model_dir(cfg.text_model), pretrained)
    elif cfg.text_encoder == "bigru":
        if not vocab_size:
            raise ConfigError("model.text_encoder='bigru' needs the vocabulary size (build the vocabulary first)")
        sequence = GRUTextModel(vocab_size, cfg.word_dim, cfg.embed_dim, cfg.gru_layers)
    else:
        raise ConfigError(f"model.text_encoder must be 'bert' or 'bigru', got '{cfg.text_encoder}'")
    sge = SGE(cfg.embed_dim, cfg.sge_lambda, cfg.sge_dropout) if cfg.text_sge else None
    cge = CGE(cfg.clip_dim, cfg.embed_dim, cfg.cge_lambda) if cfg.text_cge else None
    return TextEncoder(sequence, cfg.embed_dim, cfg.text_encoder == "bert", cfg.pooling, sge, cge)
