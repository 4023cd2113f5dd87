"""ONNX graphs of the encoders: ONNX Runtime's float32 embeddings equal torch's (cosine >= 0.9999) for a tiny random
model of each kind, the int8 graphs stay close, and a model directory exported with --onnx serves, indexes and
evaluates under --runtime onnx as under torch."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from xmcl.cli import main
from xmcl.errors import CheckpointError
from xmcl.retrieval.config import RetrievalModelConfig
from xmcl.retrieval.dual_encoder import DualEncoder
from xmcl.retrieval.encoders import HFTextModel
from xmcl.retrieval.export import export_model_dir
from xmcl.retrieval.index.search import Searcher
from xmcl.retrieval.inference import evaluate_checkpoint
from xmcl.retrieval.onnx_export import export_encoders
from xmcl.retrieval.onnx_runtime import OnnxEncoders
from xmcl.retrieval.retriever import Retriever

VOCAB = 30
COMMON = dict(embed_dim=16, region_dim=12, word_dim=8, sge_dropout=0.0, head_hidden_dim=8, clip_dim=6)
KINDS = {
    "bigru_regions": dict(text_encoder="bigru", region_pca_dim=10),
    "bert_tokens": dict(text_encoder="bert", text_sge=True),
    "locked_text": dict(text_encoder="bert", text_input="token_features", text_feature_dim=8),
    "images": dict(text_encoder="bigru", image_input="images", backbone_weights=None),
    "cge": dict(text_encoder="bigru", cge=True, text_cge=True),
}


def random_encoders(kind: str, bert: Path) -> DualEncoder:
    """A tiny randomly initialised model of ``kind`` in eval mode (BatchNorm statistics and PCA made non-trivial)."""
    torch.manual_seed(0)
    cfg = RetrievalModelConfig(**COMMON, **KINDS[kind], text_model=str(bert))
    frozen = HFTextModel(bert) if kind == "locked_text" else None
    model = DualEncoder(cfg, vocab_size=VOCAB, text_model=frozen)
    if cfg.region_pca_dim:
        model.image_encoder.reduction.fit([torch.randn(200, cfg.region_dim)])
    for name, buffer in model.named_buffers():
        if name.endswith("running_mean"):
            buffer.normal_(0, 0.1)
        elif name.endswith("running_var"):
            buffer.uniform_(0.5, 1.5)
    return model.eval()


def cosines(a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
    a, b = a.double(), b.double()
    return ((a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))).numpy()


@pytest.mark.parametrize("kind", list(KINDS))
def test_onnx_runtime_float32_equals_torch_for_each_kind_of_model(kind: str, tiny_bert: Path, tmp_path: Path) -> None:
    model = random_encoders(kind, tiny_bert)
    export_encoders(model, 24, 64, tmp_path, quantize=True)
    ids = torch.randint(5, VOCAB, (4, 9))
    lengths = torch.tensor([9, 3, 6, 1])
    ids[torch.arange(9) >= lengths[:, None]] = 0
    images = torch.randn(3, 3, 64, 64) if kind == "images" else torch.randn(3, 7, COMMON["region_dim"])
    clip_text, clip_image = (torch.randn(4, 6), torch.randn(3, 6)) if kind == "cge" else (None, None)
    want_text = model.encode_texts(ids, lengths, clip_text)
    want_image = model.encode_images(images, None, clip_image)
    for int8, floor in ((False, 0.9999), (True, 0.95)):
        runtime = OnnxEncoders(model.cfg, tmp_path, int8=int8)
        got_text = runtime.encode_texts(ids, lengths, clip_text)
        got_image = runtime.encode_images(images, None, clip_image)
        assert got_text.shape == want_text.shape and got_image.shape == want_image.shape
        assert cosines(got_text, want_text).min() >= floor, (int8, cosines(got_text, want_text))
        assert cosines(got_image, want_image).min() >= floor, (int8, cosines(got_image, want_image))
    # the batch axis is dynamic, and a caption's embedding does not depend on the padding of its batch
    alone = OnnxEncoders(model.cfg, tmp_path).encode_texts(ids[1:2, :3], lengths[1:2],
                                                           None if clip_text is None else clip_text[1:2])
    assert cosines(alone, want_text[1:2]).min() >= 0.9999


@pytest.fixture(scope="module")
def onnx_locked(locked_checkpoint: Path, tmp_path_factory) -> Path:
    return export_model_dir(locked_checkpoint, tmp_path_factory.mktemp("onnx") / "locked", onnx=True, quantize=True)


def test_a_locked_text_model_directory_answers_under_onnx_runtime_as_under_torch(
        onnx_locked: Path, world: Path, tmp_path: Path) -> None:
    config = json.loads((onnx_locked / "config.json").read_text())
    assert {"text_encoder.onnx", "image_encoder.onnx", "backbone.onnx", "text_encoder.int8.onnx",
            "tokenizer/tokenizer.json"} <= set(config["files"])
    torch_side = Retriever.load(onnx_locked, "cpu")
    onnx_side = Retriever.load(onnx_locked, "cpu", runtime="onnx")
    assert isinstance(onnx_side.model, OnnxEncoders)
    captions = ["a red circle above a blue square", "a small green triangle", "the big square next to a circle"]
    assert cosines(onnx_side.encode_texts(captions), torch_side.encode_texts(captions)).min() >= 0.9999
    images = sorted((world / "images").glob("*.png"))[:4]
    assert cosines(onnx_side.encode_images(images), torch_side.encode_images(images)).min() >= 0.9999

    out = tmp_path / "index"
    result = CliRunner().invoke(main, ["index", "--checkpoint", str(onnx_locked), "--images", str(world / "images"),
                                       "--out", str(out), "--captions", str(world / "dataset_shapes.json"),
                                       "--runtime", "onnx"])
    assert result.exit_code == 0, result.output
    by_torch = Searcher.open(out, device="cpu").search(text="a red circle", k=5)
    by_onnx = Searcher.open(out, device="cpu", runtime="onnx-int8").search(text="a red circle", k=5)
    assert len(by_onnx) == 5 and len({r["id"] for r in by_onnx} & {r["id"] for r in by_torch}) >= 3


def test_evaluation_under_onnx_runtime_gives_the_torch_figures(onnx_locked: Path, locked_features: Path) -> None:
    torch_figures = evaluate_checkpoint(onnx_locked, locked_features, "val", ["all"], device="cpu")["all"]
    onnx_figures = evaluate_checkpoint(onnx_locked, locked_features, "val", ["all"], runtime="onnx")["all"]
    assert onnx_figures.rsum == pytest.approx(torch_figures.rsum, abs=1e-6)


def test_the_onnx_runtime_of_a_checkpoint_or_a_directory_without_graphs_says_how_to_export(
        locked_checkpoint: Path) -> None:
    with pytest.raises(CheckpointError, match="--onnx"):
        Retriever.load(locked_checkpoint, "cpu", runtime="onnx")
