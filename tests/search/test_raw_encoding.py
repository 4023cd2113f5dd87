"""A checkpoint that encodes raw inputs: the features manifest written by ``xmcl features`` and recorded at training,
raw images through the retriever equal to the cached features' embeddings, and the refusals of features or a
backbone made otherwise (at evaluate and at index), naming both sides, with the override flags."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from xmcl.cli import main
from xmcl.data.open import open_split
from xmcl.errors import CheckpointError
from xmcl.nn.backbones import build_image_backbone
from xmcl.retrieval.grid_features import extract_corpus_features
from xmcl.retrieval.inference import embed_checkpoint, evaluate_checkpoint
from xmcl.retrieval.retriever import Retriever
from xmcl.runtime.checkpoint import read_checkpoint, save_checkpoint

from search_world import IMAGE_SIZE

FLOAT16_TOLERANCE = 2e-3


def test_features_writes_a_manifest_that_training_records(features: Path, checkpoint: Path) -> None:
    manifest = json.loads((features / "features.json").read_text())
    fresh = build_image_backbone("efficientnet_lite0", "imagenet")
    assert manifest["backbone"] == "efficientnet_lite0" and manifest["weights"] == "imagenet"
    assert manifest["weights_sha256"] == fresh.fingerprint()
    assert manifest["image_size"] == IMAGE_SIZE
    assert manifest["mean"] == [127.0] * 3 and manifest["std"] == [128.0] * 3
    assert read_checkpoint(checkpoint)["inputs"]["features"] == manifest


def test_raw_images_encode_as_their_cached_features(world: Path, checkpoint: Path, retriever: Retriever) -> None:
    cached_images, cached_texts, split, _ = embed_checkpoint(checkpoint, None, "val", "cpu")
    raw = open_split(world, "val")
    assert raw.image_ids == split.image_ids
    from_files = retriever.encode_images(raw.image_paths, batch_size=3)
    from_pil = retriever.encode_images([Image.open(p) for p in raw.image_paths[:4]])
    np.testing.assert_allclose(from_files.numpy(), cached_images.numpy(), atol=FLOAT16_TOLERANCE)
    np.testing.assert_allclose(from_pil.numpy(), cached_images[:4].numpy(), atol=FLOAT16_TOLERANCE)
    np.testing.assert_allclose(retriever.encode_texts(raw.captions, batch_size=7).numpy(), cached_texts.numpy(),
                               atol=1e-5)
    assert torch.allclose(from_files.norm(dim=1), torch.ones(len(from_files)), atol=1e-5)


@pytest.fixture(scope="module")
def features_96(world: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("features96") / "feats96"
    extract_corpus_features(world, ("val",), "efficientnet_lite0", "imagenet", out, image_size=96, device="cpu")
    return out


def test_evaluate_refuses_features_of_another_image_size(checkpoint: Path, features_96: Path) -> None:
    with pytest.raises(CheckpointError) as refused:
        evaluate_checkpoint(checkpoint, features_96, "val", ["all"], device="cpu")
    message = str(refused.value)
    assert "image_size: 64 vs 96" in message and str(checkpoint) in message and str(features_96) in message
    assert "--allow-feature-mismatch" in message
    assert evaluate_checkpoint(checkpoint, features_96, "val", ["all"], device="cpu",
                               allow_feature_mismatch=True)["all"].rsum >= 0

    cli = CliRunner().invoke(main, ["evaluate", "--checkpoint", str(checkpoint), "--data", str(features_96),
                                    "--device", "cpu"])
    assert cli.exit_code == 2 and "image_size: 64 vs 96" in cli.output and "Traceback" not in cli.output
    cli = CliRunner().invoke(main, ["evaluate", "--checkpoint", str(checkpoint), "--data", str(features_96),
                                    "--device", "cpu", "--allow-feature-mismatch"])
    assert cli.exit_code == 0, cli.output


def test_features_into_a_folder_made_otherwise_are_refused(world: Path, features: Path) -> None:
    with pytest.raises(CheckpointError, match="image_size: 64 vs 96"):
        extract_corpus_features(world, ("val",), "efficientnet_lite0", "imagenet", features, image_size=96,
                                device="cpu")


def test_index_refuses_another_image_size_or_other_weights(checkpoint: Path, tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="image_size: 64 vs 96.*--allow-mismatch"):
        Retriever.load(checkpoint, "cpu", image_size=96)
    assert Retriever.load(checkpoint, "cpu", image_size=96, allow_mismatch=True).grid.image_size == 96

    torch.manual_seed(1)
    other = tmp_path / "other_lite0.pth"
    torch.save(build_image_backbone("efficientnet_lite0", None).net.state_dict(), other)
    with pytest.raises(CheckpointError) as refused:
        Retriever.load(checkpoint, "cpu", backbone_weights=str(other))
    recorded = read_checkpoint(checkpoint)["inputs"]["features"]["weights_sha256"]
    assert f"weights_sha256: {recorded[:12]}..." in str(refused.value) and str(other) in str(refused.value)

    cli = CliRunner().invoke(main, ["index", "--checkpoint", str(checkpoint), "--images", str(tmp_path),
                                    "--out", str(tmp_path / "idx"), "--image-size", "96", "--device", "cpu"])
    assert cli.exit_code == 2 and "image_size: 64 vs 96" in cli.output and not (tmp_path / "idx").exists()


def test_a_checkpoint_without_a_features_manifest_cannot_encode_raw_images(checkpoint: Path, tmp_path: Path) -> None:
    state = read_checkpoint(checkpoint)
    payload = {key: value for key, value in state.items() if key not in ("kind", "version", "inputs")}
    old = tmp_path / "old.pt"
    save_checkpoint(old, state["kind"], state["version"], payload)
    with pytest.raises(CheckpointError, match="without a features manifest"):
        Retriever.load(old, "cpu")
    explicit = Retriever.load(old, "cpu", backbone="efficientnet_lite0", backbone_weights="imagenet",
                              image_size=IMAGE_SIZE, allow_mismatch=True)
    assert explicit.grid.image_size == IMAGE_SIZE


def test_a_cge_model_records_its_teacher_and_encodes_raw_inputs_as_cached(world: Path, features: Path,
                                                                          tmp_path: Path) -> None:
    from xmcl.retrieval.clip.cache import build_clip_cache
    from xmcl.retrieval.clip.config import ClipModelConfig
    from xmcl.retrieval.clip.small import new_clip_model, save_clip
    from xmcl.retrieval.clip.teacher import checkpoint_sha256
    from xmcl.retrieval.clip.tokenizer import train_bpe
    from xmcl.training.retrieval_trainer import train_retrieval

    from search_world import tiny_config

    torch.manual_seed(0)
    clip_cfg = ClipModelConfig(image_size=32, patch_size=8, width=32, layers=1, heads=1, embed_dim=8,
                               context_length=24)
    vocab, merges = train_bpe(open_split(world, "train").captions, 400)
    save_clip(new_clip_model(clip_cfg, len(vocab)), vocab, merges, tmp_path / "clip")
    build_clip_cache(tmp_path / "clip", world, tmp_path / "cache", splits=("train", "val"), device="cpu",
                     progress=False)
    cfg = tiny_config(features, "model.cge=true", "model.text_cge=true", "model.clip_dim=8",
                      f"model.clip_cache={tmp_path / 'cache'}", f"model.clip_path={tmp_path / 'clip'}")
    best = train_retrieval(cfg, tmp_path / "run", progress=False)["best"]
    record = read_checkpoint(best)["inputs"]["clip"]
    assert record == {"path": str((tmp_path / "clip").resolve()), "sha256": checkpoint_sha256(tmp_path / "clip"),
                      "activation": "quick_gelu"}

    retriever = Retriever.load(best, "cpu")
    cached_images, cached_texts, split, _ = embed_checkpoint(best, None, "val", "cpu")
    raw = open_split(world, "val")
    np.testing.assert_allclose(retriever.encode_images(raw.image_paths).numpy(), cached_images.numpy(),
                               atol=FLOAT16_TOLERANCE)
    np.testing.assert_allclose(retriever.encode_texts(raw.captions).numpy(), cached_texts.numpy(),
                               atol=FLOAT16_TOLERANCE)

    torch.manual_seed(1)
    save_clip(new_clip_model(clip_cfg, len(vocab)), vocab, merges, tmp_path / "other_clip")
    with pytest.raises(CheckpointError, match="is not the teacher"):
        Retriever.load(best, "cpu", clip_path=str(tmp_path / "other_clip"))
    (tmp_path / "clip").rename(tmp_path / "moved_clip")
    with pytest.raises(CheckpointError, match="give --clip-path"):
        Retriever.load(best, "cpu")
    assert Retriever.load(best, "cpu", clip_path=str(tmp_path / "moved_clip")).teacher is not None
