"""Helpers of the search tests: the tiny training config and image-folder copies (fixtures are in conftest.py)."""

from __future__ import annotations

import shutil
from pathlib import Path

from xmcl.config import load_config
from xmcl.retrieval.config import RetrievalTrainConfig

IMAGE_SIZE = 64


def tiny_config(features: Path, *extra: str) -> RetrievalTrainConfig:
    return load_config(RetrievalTrainConfig, "shapes_user", [
        f"data.path={features}", "model.embed_dim=16", "model.word_dim=8", "model.queue_size=16",
        "model.sge_dropout=0.0", "optim.epochs=1", "optim.batch_size=16", "run.device=cpu", "run.progress=false",
        *extra])


def copy_images(world: Path, target: Path, names: list[str] | None = None) -> Path:
    """A fresh folder holding (some of) the world's images, half of them in a sub-folder."""
    target.mkdir(parents=True)
    sources = sorted((world / "images").glob("*.png"))
    for n, source in enumerate(sources):
        if names is not None and source.name not in names:
            continue
        folder = target / "sub" if n % 2 else target
        folder.mkdir(exist_ok=True)
        shutil.copy2(source, folder / source.name)
    return target


BERT_WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "an", "the", "red", "green", "blue", "yellow",
              "circle", "square", "triangle", "small", "large", "big", "left", "right", "of", "and", "on", "above",
              "below", "next", "to", "is", "there", "with"]


def save_tiny_bert(directory: Path, seed: int) -> Path:
    """A randomly initialised one-layer BERT (8-d states) with a word-level vocabulary, saved as a transformers
    directory: a frozen text model for the locked-text tests."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizer

    torch.manual_seed(seed)
    config = BertConfig(vocab_size=len(BERT_WORDS), hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=16, max_position_embeddings=64)
    BertModel(config).save_pretrained(str(directory))
    BertTokenizer(vocab={w: i for i, w in enumerate(BERT_WORDS)}).save_pretrained(str(directory))
    return directory
