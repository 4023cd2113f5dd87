"""The model shipped with the package (``flickr8k``): a small verified model directory, found by name, that finds
real photos by their captions far above chance."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from xmcl.retrieval.model_dir import SHIPPED_MODELS, read_model_dir, shipped_models
from xmcl.retrieval.retriever import Retriever

FLICKR = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "flickr8k"
SHIPPED = SHIPPED_MODELS / "flickr8k"


def test_the_shipped_model_is_a_small_verified_directory_with_a_card() -> None:
    assert "flickr8k" in shipped_models()
    assert sum(p.stat().st_size for p in SHIPPED.rglob("*") if p.is_file()) <= 10 * 2**20
    directory = read_model_dir(SHIPPED)  # every file checked against its sha256
    assert directory.state["config"]["model"]["text_input"] == "token_features"
    card = (SHIPPED / "README.md").read_text()
    val = json.loads((SHIPPED / "config.json").read_text())["trained"]["val"]
    assert f"rSum {val['rsum']:.1f}" in card


@pytest.mark.skipif(not FLICKR.is_dir(), reason="the Flickr8K photos of ../shared are not here")
def test_the_shipped_model_finds_real_photos_by_their_captions() -> None:
    data = json.loads((FLICKR / "dataset_flickr8k.json").read_text())
    val = [im for im in data["images"] if im["split"] == "val"][:40]
    retriever = Retriever.load("flickr8k", "cpu")
    images = retriever.encode_images([FLICKR / "images" / im["filename"] for im in val]).numpy()
    texts = retriever.encode_texts([im["sentences"][0]["raw"] for im in val]).numpy()
    ranks = (texts @ images.T > np.diag(texts @ images.T)[:, None]).sum(1)  # images scored above the right one
    recall_at_5 = float(np.mean(ranks < 5))
    assert recall_at_5 >= 0.5  # chance is 5 / 40 = 0.125
