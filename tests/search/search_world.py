"""Helpers of the search tests: the tiny training config and image-folder copies (fixtures are in conftest.py)."""

from __future__ import annotations

import shutil
from pathlib import Path

from xmcl.config import load_config
from xmcl.retrieval.config import RetrievalTrainConfig

from helpers import save_tiny_bert as save_bert

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
    """A randomly initialised one-layer BERT whose vocabulary holds the shapes world's words: a frozen text model
    for the locked-text tests."""
    return save_bert(directory, BERT_WORDS, seed=seed, max_positions=64)
