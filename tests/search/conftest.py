"""Shared, built once per session: a tiny shapes world, its EfficientNet-Lite0 grid features (64 px, 2 x 2 cells),
a tiny USER model trained one epoch on them, its retriever, and an index of the world's images with captions; a
tiny locked-text model (a frozen tiny BERT's cached token states beside a copy of the features) trained one epoch."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from xmcl.data.shapes import generate_shapes_world
from xmcl.retrieval.grid_features import extract_corpus_features
from xmcl.retrieval.index.build import IndexOptions, build_index
from xmcl.retrieval.retriever import Retriever
from xmcl.retrieval.token_features import extract_corpus_token_features
from xmcl.training.retrieval_trainer import train_retrieval

from search_world import IMAGE_SIZE, save_tiny_bert, tiny_config


@pytest.fixture(scope="session")
def world(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("world") / "shapes"
    generate_shapes_world(root, num_images=30, seed=0, image_size=IMAGE_SIZE)
    return root


@pytest.fixture(scope="session")
def features(world: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("features") / "feats"
    extract_corpus_features(world, ("train", "val"), "efficientnet_lite0", "imagenet", out, image_size=IMAGE_SIZE,
                            batch_size=16, device="cpu")
    return out


@pytest.fixture(scope="session")
def checkpoint(features: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run") / "user"
    return train_retrieval(tiny_config(features), out, progress=False)["best"]


@pytest.fixture(scope="session")
def retriever(checkpoint: Path) -> Retriever:
    return Retriever.load(checkpoint, "cpu")


@pytest.fixture(scope="session")
def built_index(world: Path, retriever: Retriever, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("index") / "shapes_index"
    build_index(retriever, world / "images", out, world / "dataset_shapes.json",
                IndexOptions(shard_size=8, progress=False))
    return out


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> Path:
    return save_tiny_bert(tmp_path_factory.mktemp("bert") / "tiny_bert", seed=0)


@pytest.fixture(scope="session")
def locked_features(features: Path, tiny_bert: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("locked") / "feats"
    shutil.copytree(features, out)
    extract_corpus_token_features(out, ("train", "val"), str(tiny_bert), out, batch_size=16, device="cpu")
    return out


@pytest.fixture(scope="session")
def locked_checkpoint(locked_features: Path, tiny_bert: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run") / "locked"
    cfg = tiny_config(locked_features, "model.text_encoder=bert", "model.text_input=token_features",
                      "model.text_feature_dim=8", f"model.text_model={tiny_bert}", "data.augment_captions=false",
                      "model.region_pca_dim=8")
    return train_retrieval(cfg, out, progress=False)["best"]
