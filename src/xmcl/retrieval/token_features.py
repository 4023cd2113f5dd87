"""Token features: a frozen BERT-family text model's last hidden states, cached once per caption (locked text).

Caption m of split S becomes the (L, H) matrix of its token states (L = the longest tokenised caption of the
split, rows past its own length zero), float16, in ``S_text_ims.npy`` (M, L, H), written and resumed by the same
``PrecomputedWriter`` as the grid features (rows = captions), beside them. ``text_features.json``
(``TextFeaturesManifest``) names the model that made them: its directory, the SHA-256 of its weights, the
tokeniser's fingerprint and the maximum length. A run whose text model differs from the manifest is refused,
naming both sides (``check_features_match``, as for grid features).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from tqdm import tqdm

from xmcl.data.corpus import CaptionSplit
from xmcl.data.open import open_split
from xmcl.data.precomputed import PrecomputedWriter, read_precomputed
from xmcl.data.text import HFTokenizer, collate_tokens, resolve_text_model_dir
from xmcl.errors import CheckpointError, ConfigError, DataError
from xmcl.nn.backbones import state_sha256
from xmcl.retrieval.encoders import HFTextModel
from xmcl.retrieval.grid_features import check_features_match
from xmcl.runtime.device import resolve_device
from xmcl.runtime.files import atomic_write_json
from xmcl.runtime.lock import RunLock

TEXT_FEATURES_MANIFEST = "text_features.json"
TEXT_MANIFEST_FORMAT = "xmcl-text-features/1"
TEXT_IDENTITY_FIELDS = ("weights_sha256", "tokenizer_sha256", "max_length", "hidden_dim")


def text_split_name(split: str) -> str:
    """The precomputed-layout name of a split's token features (``{split}_text_ims.npy`` and its files)."""
    return f"{split}_text"


@dataclass(frozen=True)
class TextFeaturesManifest:
    """What made a folder's token features: the text ``model`` directory, the SHA-256 of its state
    (``state_sha256``), the tokeniser's SHA-256 (its class and vocabulary), its ``max_length`` and the states'
    width ``hidden_dim``."""

    model: str
    weights_sha256: str
    tokenizer_sha256: str
    max_length: int
    hidden_dim: int

    @classmethod
    def of(cls, model_dir: Path, model: HFTextModel, tokenizer: HFTokenizer) -> "TextFeaturesManifest":
        vocab = json.dumps(sorted(tokenizer.tokenizer.get_vocab().items()))
        tokenizer_sha = hashlib.sha256(f"{type(tokenizer.tokenizer).__name__}:{vocab}".encode()).hexdigest()
        return cls(str(Path(model_dir).resolve()), state_sha256(model.model), tokenizer_sha,
                   tokenizer.max_length, model.hidden_dim)

    def to_dict(self) -> dict:
        return {"format": TEXT_MANIFEST_FORMAT, **asdict(self)}

    @classmethod
    def from_dict(cls, data: dict, where: str) -> "TextFeaturesManifest":
        if not isinstance(data, dict) or data.get("format") != TEXT_MANIFEST_FORMAT:
            raise CheckpointError(f"{where}: not an xmcl text features manifest "
                                  f"(format {TEXT_MANIFEST_FORMAT!r} expected)")
        try:
            return cls(str(data["model"]), str(data["weights_sha256"]), str(data["tokenizer_sha256"]),
                       int(data["max_length"]), int(data["hidden_dim"]))
        except (KeyError, TypeError, ValueError) as error:
            raise CheckpointError(f"{where}: malformed text features manifest ({error!r})") from None

    def differences(self, other: "TextFeaturesManifest") -> list[str]:
        """``"field: mine vs other"`` for each identity field that differs (the directory may move)."""
        return [f"{name}: {getattr(self, name)} vs {getattr(other, name)}"
                for name in TEXT_IDENTITY_FIELDS if getattr(self, name) != getattr(other, name)]


def read_text_manifest(folder: Path | str) -> TextFeaturesManifest:
    """The folder's ``text_features.json``; ``DataError`` when it has none."""
    path = Path(folder) / TEXT_FEATURES_MANIFEST
    if not path.is_file():
        raise DataError(f"{folder} holds no token features ({TEXT_FEATURES_MANIFEST} is missing); build them with "
                        f"`xmcl features --data {folder} --text-only --out {folder}`")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{path} cannot be read: {error}") from None
    return TextFeaturesManifest.from_dict(data, str(path))


def load_text_model(text_model: str | None) -> tuple[Path, HFTextModel, HFTokenizer, TextFeaturesManifest]:
    """The frozen text model ``text_model`` names (None = the installed MiniLM), its tokeniser and manifest."""
    model_dir = resolve_text_model_dir(text_model)
    model, tokenizer = HFTextModel(model_dir).eval(), HFTokenizer(model_dir)
    return model_dir, model, tokenizer, TextFeaturesManifest.of(model_dir, model, tokenizer)


def recorded_text_model(record: dict, where: str, text_model: str | None = None
                        ) -> tuple[HFTextModel, HFTokenizer, TextFeaturesManifest]:
    """The frozen text model (eval mode) and tokeniser of a locked-text model whose training recorded the manifest
    ``record`` (a ``TextFeaturesManifest`` dict; ``where`` names its holder). Looked for in ``text_model`` when given,
    else in the recorded directory when it exists, else in the installed default package; it must be the recorded
    model (weights, tokeniser, maximum length, width): otherwise ``CheckpointError`` naming each difference."""
    recorded = TextFeaturesManifest.from_dict(record, where)
    if text_model is None and Path(recorded.model).is_dir():
        text_model = recorded.model
    try:
        model_dir, model, tokenizer, found = load_text_model(text_model)
    except ConfigError as error:
        raise CheckpointError(f"{where} needs its frozen text model ({recorded.model}, weights sha256 "
                              f"{recorded.weights_sha256[:12]}...), which cannot be loaded: {error}; give "
                              f"--text-model DIR") from None
    differences = recorded.differences(found)
    if differences:
        raise CheckpointError(f"the text model in {model_dir} is not the frozen text model {where} was trained on "
                              f"({'; '.join(differences)}; the recorded one first); give --text-model DIR of that "
                              f"model")
    return model, tokenizer, found


@torch.no_grad()
def extract_token_features(split: CaptionSplit, model: HFTextModel, tokenizer: HFTokenizer, out_dir: Path,
                           manifest: TextFeaturesManifest, batch_size: int = 128,
                           device: torch.device = torch.device("cpu"), progress: bool = True) -> Path:
    """Write ``out_dir/{split}_text_ims.npy`` (M, L, H) float16: row m holds caption m's token states (its first
    ``len(tokens)`` rows; the rest zero). Resumes an interrupted extraction of the same captions and model."""
    tokens = [tokenizer.encode(caption) for caption in split.captions]
    length = max(len(t) for t in tokens)
    writer = PrecomputedWriter(Path(out_dir), text_split_name(split.name), [str(m) for m in range(split.num_captions)],
                               split.captions, np.arange(split.num_captions), regions=length, dim=manifest.hidden_dim,
                               dtype=np.float16, meta=manifest.to_dict())
    model.to(device)
    with writer, tqdm(total=split.num_captions, initial=writer.done, unit="cap", desc=f"token features {split.name}",
                      disable=not progress) as bar:
        for start in range(writer.done, split.num_captions, batch_size):
            ids, lengths = collate_tokens(tokens[start:start + batch_size], tokenizer.pad_id)
            states = model(ids.to(device), lengths).float().cpu()
            block = np.zeros((len(ids), length, manifest.hidden_dim), dtype=np.float32)
            for row, n in enumerate(lengths.tolist()):
                block[row, :n] = states[row, :n].numpy()
            writer.write(start, block)
            bar.update(len(ids))
    return writer.files["ims"]


def extract_corpus_token_features(data_path: Path, splits: tuple[str, ...], text_model: str | None, out_dir: Path,
                                  batch_size: int = 128, device: str = "auto") -> list[Path]:
    """``extract_token_features`` for each split of ``data_path`` (raw corpus or a features folder), ``out_dir``
    locked; writes ``text_features.json`` first (a folder made by another text model is refused)."""
    if batch_size < 1:
        raise ConfigError(f"features: batch size (--batch-size) = {batch_size} is out of range: must be >= 1")
    with RunLock(out_dir, "features folder"):
        _, model, tokenizer, manifest = load_text_model(text_model)
        path = Path(out_dir) / TEXT_FEATURES_MANIFEST
        if path.is_file():
            check_features_match(read_text_manifest(out_dir), manifest, str(path), "this extraction",
                                 flag="another --out folder")
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, manifest.to_dict())
        return [extract_token_features(open_split(data_path, split), model, tokenizer, Path(out_dir), manifest,
                                       batch_size, resolve_device(device)) for split in splits]


def attach_token_features(splits: Sequence[CaptionSplit], folder: Path | str, text_model: str | None
                          ) -> list[CaptionSplit]:
    """``splits`` each with ``token_features`` = its memory-mapped (M, L, H) cache in ``folder``, after checking
    once that ``text_model`` (the run's, None = the installed MiniLM) is the one that made the cache, and for each
    split that the cache's captions are the split's, in order; ``CheckpointError`` / ``DataError`` naming both
    sides otherwise."""
    folder = Path(folder)
    recorded = read_text_manifest(folder)
    _, _, _, run_manifest = load_text_model(text_model)
    check_features_match(recorded, run_manifest, str(folder / TEXT_FEATURES_MANIFEST),
                         f"the run's text model ({run_manifest.model})", flag="another features folder")
    for split in splits:
        cached = read_precomputed(folder, text_split_name(split.name))
        if cached.captions != [" ".join(c.splitlines()) for c in split.captions]:
            raise DataError(f"{folder}/{text_split_name(split.name)}_caps.txt: the cached captions are not those of "
                            f"{split.source} (split '{split.name}'); rebuild the token features")
        split.token_features = cached.region_features
    return list(splits)
