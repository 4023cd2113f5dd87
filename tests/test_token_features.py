"""Locked text: the frozen text model's token features cached once, resumable, checked against the run's model,
and training on them gives the loss the frozen model gives computing them live."""

import numpy as np
import pytest
import torch

from xmcl.data import text
from xmcl.data.batches import CaptionPairs, Collate, SplitCaptions, SplitImages
from xmcl.data.precomputed import PrecomputedWriter, read_precomputed
from xmcl.errors import CheckpointError, DataError
from xmcl.retrieval.config import RetrievalLossConfig, RetrievalModelConfig
from xmcl.retrieval.model import USERModel
from xmcl.retrieval.token_features import (
    attach_token_features,
    extract_corpus_token_features,
    extract_token_features,
    load_text_model,
)

from helpers import load_trained, save_tiny_bert

CAPTIONS = ["a dog runs", "the red ball", "a dog on the grass", "red grass", "the dog runs on a ball", "a ball",
            "dog", "the red dog runs on the grass"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A region-feature folder (4 images, 2 captions each) and a tiny BERT."""
    root = tmp_path_factory.mktemp("locked")
    feats = root / "feats"
    rng = np.random.default_rng(0)
    with PrecomputedWriter(feats, "train", [f"im{n}" for n in range(4)], CAPTIONS, np.arange(8) // 2,
                           regions=3, dim=6) as writer:
        writer.write(0, rng.standard_normal((4, 3, 6)).astype(np.float32))
    return feats, save_tiny_bert(root / "bert", seed=0)


def test_training_on_cached_token_features_gives_the_live_frozen_models_loss(corpus):
    feats, bert = corpus
    extract_corpus_token_features(feats, ("train",), str(bert), feats, batch_size=3, device="cpu")
    (split,) = attach_token_features([read_precomputed(feats, "train")], feats, str(bert))
    assert split.token_features.dtype == np.float16 and split.token_features.shape == (8, max(len(c.split()) for c in CAPTIONS) + 2, 8)
    common = dict(embed_dim=16, region_dim=6, text_encoder="bert", text_model=str(bert), sge_dropout=0.0,
                  queue_size=8, momentum=0.9)
    torch.manual_seed(0)
    live = USERModel(RetrievalModelConfig(**common), RetrievalLossConfig()).train()
    live.text_encoder.sequence.eval()  # the frozen text model (no dropout)
    cached = USERModel(RetrievalModelConfig(**common, text_input="token_features", text_feature_dim=8),
                       RetrievalLossConfig()).train()
    missing, unexpected = cached.load_state_dict(live.state_dict(), strict=False)
    assert not missing and all(".sequence.model." in key for key in unexpected)
    _, _, tokenizer, _ = load_text_model(str(bert))
    pairs, collate = CaptionPairs(split, tokenizer), Collate(tokenizer.pad_id)
    for step in range(2):  # the second step meets the first step's queued keys
        batch = collate([pairs[m] for m in range(4 * step, 4 * step + 4)])
        with torch.no_grad():
            want, got = live(batch), cached(batch)
        for key in want:
            torch.testing.assert_close(got[key], want[key], atol=2e-3, rtol=2e-3)


def test_an_interrupted_extraction_resumes_to_the_uninterrupted_result(corpus, tmp_path):
    feats, bert = corpus
    split = read_precomputed(feats, "train")
    _, model, tokenizer, manifest = load_text_model(str(bert))
    extract_token_features(split, model, tokenizer, tmp_path / "whole", manifest, batch_size=3, progress=False)
    calls = {"n": 0}
    original = model.forward

    def dies_on_second_batch(ids, lengths):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return original(ids, lengths)

    model.forward = dies_on_second_batch
    with pytest.raises(KeyboardInterrupt):
        extract_token_features(split, model, tokenizer, tmp_path / "resumed", manifest, batch_size=3, progress=False)
    model.forward = original
    with pytest.raises(DataError, match="incomplete"):  # refused until finished
        read_precomputed(tmp_path / "resumed", "train_text")
    extract_token_features(split, model, tokenizer, tmp_path / "resumed", manifest, batch_size=3, progress=False)
    whole = np.load(tmp_path / "whole" / "train_text_ims.npy")
    resumed = np.load(tmp_path / "resumed" / "train_text_ims.npy")
    assert np.array_equal(whole, resumed)
    lengths = [len(tokenizer.encode(c)) for c in CAPTIONS]
    assert all(not whole[m, n:].any() and whole[m, :n].any() for m, n in enumerate(lengths))


def test_a_run_with_another_text_model_is_refused_naming_the_weights(corpus, tmp_path):
    feats, bert = corpus
    extract_corpus_token_features(feats, ("train",), str(bert), feats, batch_size=4, device="cpu")
    other = save_tiny_bert(tmp_path / "other_bert", seed=1)
    with pytest.raises(CheckpointError, match="weights_sha256"):
        attach_token_features([read_precomputed(feats, "train")], feats, str(other))


@pytest.mark.slow
def test_a_locked_text_run_with_the_region_pca_trains_resumes_and_evaluates(corpus, tmp_path):
    from xmcl.config import load_config
    from xmcl.metrics.retrieval import evaluate_embeddings
    from xmcl.retrieval.config import RetrievalTrainConfig
    from xmcl.retrieval.inference import encode_split, evaluate_checkpoint
    from xmcl.training.retrieval_trainer import train_retrieval

    feats, bert = corpus
    extract_corpus_token_features(feats, ("train",), str(bert), feats, batch_size=3, device="cpu")

    def config(epochs):
        return load_config(RetrievalTrainConfig, None, [
            f"data.path={feats}", "data.val_split=train", "data.augment_captions=false", "model.embed_dim=8",
            "model.region_dim=6", "model.region_pca_dim=4", "model.text_input=token_features",
            "model.text_feature_dim=8", f"model.text_model={bert}", "model.queue_size=8", "model.sge_dropout=0.0",
            "optim.batch_size=4", f"optim.epochs={epochs}", "optim.lr_decay_epochs=[1]"])

    straight = train_retrieval(config(2), tmp_path / "straight", progress=False)
    train_retrieval(config(1), tmp_path / "resumed", progress=False)
    resumed = train_retrieval(config(2), tmp_path / "resumed", progress=False)
    assert resumed["best_rsum"] == straight["best_rsum"]
    # evaluating the checkpoint gives the run's own best validation rSum, and the one of a direct encoding
    model, tokenizer, cfg = load_trained(tmp_path / "straight" / "best.pt", torch.device("cpu"))
    (split,) = attach_token_features([read_precomputed(feats, "train")], feats, str(bert))
    img, txt = encode_split(model, split, tokenizer, None, torch.device("cpu"))
    want = evaluate_embeddings(img, txt, split.caption_image, protocols=("all",))["all"]
    got = evaluate_checkpoint(tmp_path / "straight" / "best.pt", feats, "train", ("all",))["all"]
    assert got.rsum == pytest.approx(want.rsum) and got.rsum == pytest.approx(straight["best_rsum"])


@pytest.mark.parametrize("dataset", ["pairs", "captions", "images"])
def test_a_batch_read_at_once_equals_its_items_read_one_by_one(corpus, dataset: str):
    feats, bert = corpus
    extract_corpus_token_features(feats, ("train",), str(bert), feats, batch_size=3, device="cpu")
    (split,) = attach_token_features([read_precomputed(feats, "train")], feats, str(bert))
    _, _, tokenizer, _ = load_text_model(str(bert))
    rng = np.random.default_rng(1)
    image_guides = rng.standard_normal((split.num_images, 5)).astype(np.float32)
    text_guides = rng.standard_normal((split.num_captions, 5)).astype(np.float32)
    data = {"pairs": lambda: CaptionPairs(split, tokenizer, clip_image=image_guides),
            "captions": lambda: SplitCaptions(split, tokenizer, clip_text=text_guides),
            "images": lambda: SplitImages(split, clip_image=image_guides)}[dataset]()
    order = [3, 0, 1, 2, 2] if dataset == "images" else [5, 0, 7, 2, 2, 6]
    for _ in range(2):  # the second read takes the ids from the tokenizer's cache
        batched, single = data.__getitems__(order), [data[m] for m in order]
        assert len(batched) == len(single)
        for got, want in zip(batched, single):
            assert got.keys() == want.keys()
            for key in want:
                if isinstance(want[key], torch.Tensor):
                    assert torch.equal(got[key], want[key]), key
                else:
                    assert got[key] == want[key], key
    collate = Collate(tokenizer.pad_id)
    for key, value in collate(data.__getitems__(order)).items():
        assert torch.equal(value, collate([data[m] for m in order])[key]), key


def test_the_tokenizer_keeps_captions_as_written_and_hands_out_copies(corpus, monkeypatch):
    _, bert = corpus
    _, _, tokenizer, _ = load_text_model(str(bert))
    captions = ["a dog runs on the beach", "two children play in the snow", "a man rides a bike"]
    by_hand = [tokenizer.wrap([i for word in tokenizer.word_pieces(c) for i in word]) for c in captions]
    monkeypatch.setattr(text, "WRITTEN_CAPTIONS_KEPT", 2)
    for _ in range(2):
        for caption, want in zip(captions, by_hand):
            got = tokenizer.encode(caption)
            assert got == want
            got.append(-1)  # a caller's change never reaches the kept ids
            assert tokenizer.encode(caption) == want
    assert len(tokenizer._written) <= 2  # the kept set starts over when full
    long_caption = " ".join(["dog"] * 40)  # augmentation draws anew each time, past the kept ids
    drawn = text.augment_words(tokenizer.word_pieces(long_caption), tokenizer.mask_id, tokenizer.ordinary_ids(),
                               np.random.default_rng(0))
    assert tokenizer.encode(long_caption, np.random.default_rng(0)) == tokenizer.wrap(drawn[:tokenizer.max_length - 2])
    assert tokenizer.encode(long_caption, np.random.default_rng(0)) != tokenizer.encode(long_caption)
