"""train-clip: the corpus BPE, and a trained model saved so that the CLIP teacher loader reads it back."""

import json

import pytest
import torch

from xmcl.data.open import open_split
from xmcl.data.shapes import generate_shapes_world
from xmcl.errors import ConfigError
from xmcl.evaluation import evaluate_embeddings
from xmcl.retrieval.clip_teacher import ClipTokenizer, load_clip_teacher
from xmcl.retrieval.clip_training import ClipTrainConfig, new_clip_model, train_bpe, train_clip

TINY = dict(image_size=32, patch_size=8, width=64, layers=1, heads=1, embed_dim=16, context_length=24,
            batch_size=16, lr=2e-3, warmup_fraction=0.0, device="cpu")


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


def test_trained_clip_is_saved_in_the_format_the_teacher_loads(shapes, tmp_path):
    out = tmp_path / "clip"
    summary = train_clip(shapes, out, ClipTrainConfig(epochs=3, **TINY), progress=False)
    assert {p.name for p in out.iterdir()} >= {"config.json", "model.safetensors", "vocab.json", "merges.txt"}
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
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
    with pytest.raises(ConfigError, match="width 64 is not a multiple of heads 3"):
        new_clip_model(ClipTrainConfig(**dict(TINY, heads=3)), 600)
    with pytest.raises(ConfigError, match="image_size 30 is not a multiple of patch_size 8"):
        new_clip_model(ClipTrainConfig(**dict(TINY, image_size=30)), 600)
