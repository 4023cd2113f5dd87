"""CLIP's tokenizer: byte-level BPE (lower-cased, whitespace collapsed, HTML entities unescaped; ftfy's mojibake
repair is not applied), between ``<|startoftext|>`` and ``<|endoftext|>``, cut to the context length.

Its vocabulary comes from a directory's ``vocab.json`` + ``merges.txt`` (or ``tokenizer.json``), else from
``bpe_simple_vocab_16e6.txt.gz`` inside the ``open_clip_torch`` wheel (``pip install --no-deps open_clip_torch``),
or a file given explicitly; ``train_bpe`` learns merges of the same layout from a corpus' captions.
"""

from __future__ import annotations

import gzip
import html
import importlib.util
import json
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor

from xmcl.errors import ConfigError

START, END = "<|startoftext|>", "<|endoftext|>"
END_OF_WORD = "</w>"
BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"
OPENAI_MERGES = 49152 - 256 - 2  # merges CLIP uses from the BPE file (vocabulary 49408 = 2 * 256 + merges + 2)
SPLIT_PATTERN = r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"


def clip_text_pipeline(tokenizer: Any) -> Any:
    """Give a ``tokenizers.Tokenizer`` CLIP's normaliser (NFC, whitespace collapsed, lower case) and pre-tokeniser
    (CLIP's word split, then bytes as characters); returns it. Shared by the tokenizer and the BPE trainer."""
    from tokenizers import Regex, normalizers, pre_tokenizers

    tokenizer.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    return tokenizer


def byte_alphabet() -> list[str]:
    """The 256 characters that stand for bytes 0..255 in byte-level BPE, in CLIP's vocabulary order.

    Printable bytes (``!``..``~``, ``¡``..``¬``, ``®``..``ÿ``) stand for themselves and come first, in byte order;
    the other bytes follow, in byte order, as ``chr(256)``, ``chr(257)``, ...
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in set(printable)]
    return [chr(b) for b in printable] + [chr(256 + n) for n in range(len(others))]


def clip_vocabulary(merges: Sequence[tuple[str, str]]) -> dict[str, int]:
    """CLIP's token -> id layout: the byte alphabet, the alphabet + ``</w>``, one token per merge, then the
    start and end tokens."""
    alphabet = byte_alphabet()
    tokens = alphabet + [c + END_OF_WORD for c in alphabet] + ["".join(pair) for pair in merges] + [START, END]
    vocab = {token: i for i, token in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise ConfigError(f"CLIP BPE merges repeat a token ({len(tokens) - len(vocab)} duplicates)")
    return vocab


class ClipTokenizer:
    """Caption -> CLIP token ids ``[<|startoftext|>, ..., <|endoftext|>]`` of at most ``context_length`` ids."""

    def __init__(self, vocab: dict[str, int], merges: Sequence[tuple[str, str]], context_length: int = 77,
                 source: str = "") -> None:
        from tokenizers import Tokenizer, models

        missing = [token for token in (START, END) if token not in vocab]
        if missing:
            raise ConfigError(f"CLIP tokenizer {source}: the vocabulary lacks {missing}")
        if context_length < 3:
            raise ConfigError(f"CLIP tokenizer {source}: context length must be >= 3, got {context_length}")
        bpe = models.BPE(vocab=dict(vocab), merges=[tuple(pair) for pair in merges], unk_token=END,
                         end_of_word_suffix=END_OF_WORD, continuing_subword_prefix="", fuse_unk=False)
        tokenizer = clip_text_pipeline(Tokenizer(bpe))
        tokenizer.add_special_tokens([START, END])
        self.tokenizer = tokenizer
        self.start_id, self.end_id = vocab[START], vocab[END]
        self.vocab_size = max(vocab.values()) + 1
        self.context_length = context_length
        self.source = source

    @classmethod
    def from_bpe_file(cls, path: Path | str, context_length: int = 77) -> "ClipTokenizer":
        """From CLIP's ``bpe_simple_vocab_16e6.txt.gz``: a header line, then one merge ``a b`` per line."""
        path = Path(path)
        try:
            lines = gzip.decompress(path.read_bytes()).decode("utf-8").split("\n")
        except FileNotFoundError:
            raise ConfigError(f"CLIP BPE file {path} does not exist") from None
        except (OSError, UnicodeDecodeError, EOFError) as error:
            raise ConfigError(f"CLIP BPE file {path} cannot be read: {error}") from None
        merges = [tuple(line.split()) for line in lines[1: OPENAI_MERGES + 1]]
        if len(merges) != OPENAI_MERGES or any(len(pair) != 2 for pair in merges):
            raise ConfigError(f"CLIP BPE file {path}: expected {OPENAI_MERGES} merges of two symbols after the header")
        return cls(clip_vocabulary(merges), merges, context_length, str(path))

    @classmethod
    def from_directory(cls, directory: Path | str, context_length: int = 77) -> "ClipTokenizer":
        """From a CLIP directory's ``vocab.json`` + ``merges.txt``, else its ``tokenizer.json``."""
        directory = Path(directory)
        vocab_file, merges_file, json_file = (directory / n for n in ("vocab.json", "merges.txt", "tokenizer.json"))
        try:
            if vocab_file.is_file() and merges_file.is_file():
                vocab = json.loads(vocab_file.read_text(encoding="utf-8"))
                lines = merges_file.read_text(encoding="utf-8").split("\n")
                merges = [tuple(line.split()) for line in lines if line.strip() and not line.startswith("#version")]
            elif json_file.is_file():
                model = json.loads(json_file.read_text(encoding="utf-8"))["model"]
                vocab = model["vocab"]
                merges = [tuple(m.split()) if isinstance(m, str) else tuple(m) for m in model["merges"]]
            else:
                raise ConfigError(f"CLIP directory {directory} holds no tokenizer (vocab.json + merges.txt, or "
                                  f"tokenizer.json)")
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as error:
            raise ConfigError(f"CLIP tokenizer files in {directory} cannot be read: {error}") from None
        bad = [pair for pair in merges if len(pair) != 2]
        if bad:
            raise ConfigError(f"CLIP tokenizer in {directory}: merge {bad[0]} is not a pair of symbols")
        return cls(vocab, merges, context_length, str(directory))

    def encode(self, text: str) -> list[int]:
        """Ids of one caption, start and end ids included (the end id stays when the text is cut)."""
        clean = " ".join(html.unescape(html.unescape(text)).split())
        ids = self.tokenizer.encode(clean, add_special_tokens=False).ids
        return [self.start_id, *ids[: self.context_length - 2], self.end_id]

    def batch(self, texts: Sequence[str]) -> tuple[Tensor, Tensor]:
        """``ids (B, L)`` padded with 0 to the longest caption, and the attention mask ``(B, L)``."""
        encoded = [self.encode(text) for text in texts]
        length = max(len(ids) for ids in encoded)
        ids = torch.zeros((len(encoded), length), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, sequence in enumerate(encoded):
            ids[row, : len(sequence)] = torch.tensor(sequence)
            mask[row, : len(sequence)] = 1
        return ids, mask


def packaged_bpe_file() -> Path | None:
    """``bpe_simple_vocab_16e6.txt.gz`` of the installed ``open_clip_torch`` wheel (not imported), or None."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / BPE_FILE
    return path if path.is_file() else None


def build_clip_tokenizer(source: Path | str | None, context_length: int = 77) -> ClipTokenizer:
    """From a directory (its tokenizer files), a BPE ``.txt.gz`` file, or None: the packaged CLIP BPE."""
    if source is None:
        found = packaged_bpe_file()
        if found is None:
            raise ConfigError(f"no CLIP tokenizer: the checkpoint carries none and {BPE_FILE} was not found; install "
                              f"it with `pip install --no-deps open_clip_torch`, or give a directory with vocab.json "
                              f"+ merges.txt")
        return ClipTokenizer.from_bpe_file(found, context_length)
    source = Path(source)
    if source.is_dir():
        return ClipTokenizer.from_directory(source, context_length)
    return ClipTokenizer.from_bpe_file(source, context_length)


def train_bpe(captions: Sequence[str], vocab_size: int) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """CLIP-layout ``(vocab, merges)`` whose merges a byte-level BPE trainer learns from ``captions`` (with CLIP's
    normalisation, word split and ``</w>`` end-of-word suffix; merges of pairs seen at least twice)."""
    from tokenizers import Tokenizer, models, trainers

    tokenizer = clip_text_pipeline(Tokenizer(models.BPE(end_of_word_suffix=END_OF_WORD, continuing_subword_prefix="")))
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, initial_alphabet=byte_alphabet(),
                                  end_of_word_suffix=END_OF_WORD, continuing_subword_prefix="", show_progress=False)
    tokenizer.train_from_iterator(list(captions), trainer)
    merges = [tuple(m.split()) if isinstance(m, str) else tuple(m)
              for m in json.loads(tokenizer.to_str())["model"]["merges"]]
    return clip_vocabulary(merges), merges
