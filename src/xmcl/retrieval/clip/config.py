"""Typed configuration of ``xmcl train-clip``: the small CLIP's shapes, its corpus, its optimiser and the run."""

from __future__ import annotations

from dataclasses import dataclass, field

from xmcl.config import require, require_optimiser
from xmcl.errors import ConfigError
from xmcl.runtime.run_config import RunConfig


@dataclass
class ClipModelConfig:
    """Both towers are ``width`` wide with ``layers`` layers of ``heads`` heads; images are ``image_size`` pixels
    cut into ``patch_size`` patches; captions hold at most ``context_length`` ids; embeddings are ``embed_dim``-d;
    ``temperature`` is the initial InfoNCE temperature. ``bpe_vocab_size`` bounds the BPE trainer's vocabulary (the
    saved one adds CLIP's 2 x 256 byte tokens)."""

    image_size: int = 64
    patch_size: int = 8
    width: int = 96
    layers: int = 2
    heads: int = 2
    embed_dim: int = 128
    context_length: int = 32
    bpe_vocab_size: int = 1000
    temperature: float = 0.07

    def __post_init__(self) -> None:
        for name in ("image_size", "patch_size", "width", "layers", "heads", "embed_dim", "bpe_vocab_size"):
            require(self, name, ge=1)
        require(self, "context_length", ge=3)
        require(self, "temperature", gt=0.0, le=10.0)
        if self.width % self.heads:
            raise ConfigError(f"'width' = {self.width} is not a multiple of 'heads' = {self.heads}")
        if self.image_size % self.patch_size:
            raise ConfigError(f"'image_size' = {self.image_size} is not a multiple of 'patch_size' = "
                              f"{self.patch_size}")


@dataclass
class ClipDataConfig:
    """The corpus (a folder or Karpathy JSON of raw images) and its splits."""

    path: str = "runs/shapes"
    train_split: str = "train"
    val_split: str = "val"


@dataclass
class ClipOptimConfig:
    """AdamW (``lr``, ``weight_decay`` on matrices only) with ``warmup_fraction`` of linear warm-up, then cosine
    decay to 0; gradients clipped to norm ``grad_clip``. An epoch shows each training image once, with one of its
    captions drawn at random."""

    epochs: int = 40
    batch_size: int = 64
    lr: float = 5e-4
    weight_decay: float = 0.1
    warmup_fraction: float = 0.05
    grad_clip: float = 1.0

    def __post_init__(self) -> None:
        require_optimiser(self)
        require(self, "warmup_fraction", ge=0.0, le=1.0)


@dataclass
class ClipTrainConfig:
    """Everything one ``train-clip`` run needs."""

    run: RunConfig = field(default_factory=RunConfig)
    data: ClipDataConfig = field(default_factory=ClipDataConfig)
    model: ClipModelConfig = field(default_factory=ClipModelConfig)
    optim: ClipOptimConfig = field(default_factory=ClipOptimConfig)
