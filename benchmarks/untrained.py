"""An untrained retrieval checkpoint of a shipped config, for benchmarks that time inference (the cost of a forward
pass does not depend on the weights). Imported as ``untrained``: scripts run from ``benchmarks/``."""

from __future__ import annotations

from pathlib import Path

import torch

from xmcl.config import config_to_dict, load_config
from xmcl.nn.backbones import build_image_backbone
from xmcl.retrieval.config import RetrievalTrainConfig
from xmcl.retrieval.grid_features import FeaturesManifest
from xmcl.retrieval.inference import RETRIEVAL_CHECKPOINT
from xmcl.retrieval.model import USERModel
from xmcl.runtime.checkpoint import save_checkpoint


def untrained_checkpoint(config: str, out: Path, image_size: int = 224, seed: int = 0) -> Path:
    """``out``: a checkpoint of ``config`` (a shipped config name) with seeded random towers, recording the features
    manifest of EfficientNet-Lite0 (ImageNet) at ``image_size`` as a model trained on ``xmcl features`` would."""
    torch.manual_seed(seed)
    cfg = load_config(RetrievalTrainConfig, config, ["run.device=cpu"])
    model = USERModel(cfg.model, cfg.loss)
    manifest = FeaturesManifest.of(build_image_backbone("efficientnet_lite0", "imagenet"), "imagenet", image_size)
    save_checkpoint(out, *RETRIEVAL_CHECKPOINT, {
        "config": config_to_dict(cfg), "model": model.state_dict(), "vocab": None,
        "inputs": {"features": manifest.to_dict(), "clip": None}})
    return out
