"""train-clip: the corpus BPE, and a trained model saved so that the CLIP teacher loader reads it back."""

import json
from pathlib import Path

import pytest
import torch

from xmcl.config import load_config
from xmcl.data.open import open_split
from xmcl.data.shapes import generate_shapes_world
from xmcl.errors import CheckpointError, ConfigError
from xmcl.metrics.retrieval import evaluate_embeddings
from xmcl.retrieval.clip.config import ClipModelConfig, ClipTrainConfig
from xmcl.retrieval.clip.teacher import load_clip_teacher
from xmcl.retrieval.clip.tokenizer import ClipTokenizer, train_bpe
from xmcl.runtime.checkpoint import read_checkpoint
from xmcl.training.clip_trainer import train_clip

from helpers import TINY_CLIP_MODEL, assert_resumed_weights, clip_config


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes") / "world"
    generate_shapes_world(root, num_images=20, seed=0, image_size=64, progress=False)
    return root


def test_bpe_makes_frequent_words_single_tokens():
    captions = ["a red circle left of a blue square", "two red circles", "a blue star"] * 4
    vocab, merges = train_bpe(captions, 800)
    tokenizer = ClipTokenizer(vocab, merges, 16)
    start, end = vocab["<|startoftext|>"], vocab["<|endoftext|>"]
    assert (start, end) == (len(vocab) - 2, len(vocab) - 1)
    assert tokenizer.encode("Red  circle") == [start, vocab["red</w>"], vocab["circle</w>"], end]
    pieces = tokenizer.encode("purple")[1:-1]  # unseen: byte pieces whose concatenation is the word
    inverse = {i: token for token, i in vocab.items()}
    assert len(pieces) > 1 and "".join(inverse[i] for i in pieces) == "purple</w>"


@pytest.mark.slow
def test_trained_clip_is_saved_in_the_format_the_teacher_loads(shapes, tmp_path):
    out = tmp_path / "clip"
    summary = train_clip(clip_config(shapes, 16, 3), out, progress=False)
    assert {p.name for p in out.iterdir()} >= {"config.json", "model.safetensors", "vocab.json", "merges.txt"}
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    log = [r for r in log if "val_rsum" in r]
    assert [r["epoch"] for r in log] == [1, 2, 3]
    assert log[-1]["train_loss_mean"] < log[0]["train_loss_mean"]
    assert summary["best_rsum"] == max(r["val_rsum"] for r in log)

    teacher = load_clip_teacher(out)  # the saved best model, through the loader: the same recall
    val = open_split(shapes, "val")
    img, txt = teacher.encode_images(val.image_paths), teacher.encode_texts(val.captions)
    metrics = evaluate_embeddings(img, txt, val.caption_image, protocols=("all",))["all"]
    assert metrics.rsum == pytest.approx(summary["metrics"].rsum)
    assert teacher.dim == 16 and teacher.image_size == 32
    assert torch.allclose(img.norm(dim=-1), torch.ones(len(img)), atol=1e-5)


def test_bad_shapes_are_refused():
    with pytest.raises(ConfigError, match="model: 'width' = 64 is not a multiple of 'heads' = 3"):
        load_config(ClipTrainConfig, None, ["model.width=64", "model.heads=3"])
    with pytest.raises(ConfigError, match="'image_size' = 30 is not a multiple of 'patch_size' = 8"):
        ClipModelConfig(**dict(TINY_CLIP_MODEL, image_size=30))


@pytest.mark.slow
def test_interrupted_run_resumes_to_the_same_weights(shapes, tmp_path, monkeypatch):
    """A run stopped after its first epoch's checkpoint and resumed ends with the uninterrupted run's weights."""
    import xmcl.training.clip_trainer as clip_trainer

    cfg = clip_config(shapes, 16, 2)
    straight = train_clip(cfg, tmp_path / "straight", progress=False)
    evaluate, calls = clip_trainer._evaluate, {"n": 0}

    def stop_at_second_validation(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return evaluate(*args, **kwargs)

    monkeypatch.setattr(clip_trainer, "_evaluate", stop_at_second_validation)
    with pytest.raises(KeyboardInterrupt):
        train_clip(cfg, tmp_path / "resumed", progress=False)
    monkeypatch.setattr(clip_trainer, "_evaluate", evaluate)
    assert read_checkpoint(tmp_path / "resumed" / "last.pt")["epoch"] == 1
    resumed = train_clip(cfg, tmp_path / "resumed", progress=False)
    assert_resumed_weights(read_checkpoint(tmp_path / "straight" / "last.pt")["model"],
                           read_checkpoint(tmp_path / "resumed" / "last.pt")["model"])
    assert resumed["best_rsum"] == straight["best_rsum"] and resumed["best_epoch"] == straight["best_epoch"]


def test_resume_with_another_model_is_refused(shapes, tmp_path):
    train_clip(clip_config(shapes, 16, 1), tmp_path / "run", progress=False)
    with pytest.raises(CheckpointError, match=r"model.width: 64 -> 32"):
        train_clip(load_config(ClipTrainConfig, None, [f"data.path={shapes}", "model.width=32", "model.heads=1",
                                                       "run.device=cpu"]), tmp_path / "run", progress=False)
