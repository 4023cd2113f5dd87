"""A frozen CLIP that gives global image and text embeddings (the guide of USER's CGE).

Two checkpoint forms load into ``transformers.CLIPModel``: a transformers directory (``config.json`` +
``model.safetensors`` / ``pytorch_model.bin``), read with ``from_pretrained(..., local_files_only=True)`` with every
weight present (none initialised at random); or an OpenAI / open_clip ``.pt`` file (:mod:`.convert`). Images go
through :class:`~.preprocess.ClipImagePreprocess`, text through :class:`~.tokenizer.ClipTokenizer`. Embeddings are
L2-normalised float32; the teacher never trains.
"""

from __future__ import annotations

import hashlib
import json
import pickle
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from xmcl.errors import CheckpointError, ConfigError
from xmcl.retrieval.clip.convert import ACTIVATIONS, load_openai_state_dict, openai_to_transformers
from xmcl.retrieval.clip.preprocess import ClipImagePreprocess
from xmcl.retrieval.clip.tokenizer import ClipTokenizer, build_clip_tokenizer

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")


def checkpoint_sha256(path: Path | str) -> str:
    """SHA-256 (hex) of a checkpoint: the file's bytes, or for a directory its ``config.json`` and weight files
    (each file's name, then its bytes, in name order)."""
    path = Path(path)
    files = [path] if path.is_file() else sorted(
        p for p in path.iterdir() if p.name == "config.json" or p.suffix in (".safetensors", ".bin"))
    digest = hashlib.sha256()
    for file in files:
        if path.is_dir():
            digest.update(file.name.encode() + b"\0")
        with open(file, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def _from_state_dict(path: Path, activation: str):
    from transformers import CLIPModel

    config, weights = openai_to_transformers(load_openai_state_dict(path), activation)
    model = CLIPModel(config)
    try:
        model.load_state_dict(weights, strict=True)
    except RuntimeError as error:
        raise CheckpointError(f"CLIP checkpoint {path}: weights do not fit the inferred model: {error}") from None
    return model


def _from_directory(path: Path):
    from transformers import CLIPModel

    if not (path / "config.json").is_file():
        raise CheckpointError(f"CLIP directory {path} has no config.json")
    if not any((path / name).is_file() for name in WEIGHT_FILES):
        raise CheckpointError(f"CLIP directory {path} has no weights (expected one of {', '.join(WEIGHT_FILES)})")
    try:
        model_type = json.loads((path / "config.json").read_text(encoding="utf-8")).get("model_type")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError) as error:
        raise CheckpointError(f"CLIP directory {path}: config.json cannot be read: {error}") from None
    if model_type != "clip":
        raise CheckpointError(f"CLIP directory {path}: config.json describes a '{model_type}' model, not 'clip'")
    try:
        model, info = CLIPModel.from_pretrained(str(path), local_files_only=True, output_loading_info=True)
    except pickle.UnpicklingError:  # transformers loads .bin weights with torch.load(weights_only=True)
        raise CheckpointError(f"CLIP directory {path}: a weights file is refused: it holds objects other than "
                              f"tensors, and loading it could run code") from None
    except (OSError, ValueError, KeyError, RuntimeError) as error:
        raise CheckpointError(f"cannot load the CLIP model in {path}: {error}") from None
    missing = sorted(info.get("missing_keys", []))
    if missing:
        raise CheckpointError(f"CLIP directory {path}: the weights lack {len(missing)} tensors "
                              f"(e.g. {', '.join(missing[:3])})")
    return model.float()


def clip_image_features(model, pixels: Tensor) -> Tensor:
    """Unit image embeddings ``(B, dim)`` of a ``transformers.CLIPModel`` from preprocessed pixels."""
    pooled = model.vision_model(pixel_values=pixels).pooler_output
    return F.normalize(model.visual_projection(pooled).float(), dim=-1)


def clip_text_features(model, ids: Tensor, mask: Tensor) -> Tensor:
    """Unit text embeddings ``(M, dim)`` of a ``transformers.CLIPModel`` (pooled at the end token)."""
    pooled = model.text_model(input_ids=ids, attention_mask=mask).pooler_output
    return F.normalize(model.text_projection(pooled).float(), dim=-1)


class CLIPTeacher:
    """A frozen ``transformers.CLIPModel`` with its preprocessing and tokenizer.

    ``encode_pixels`` / ``encode_images`` -> ``(B, dim)`` and ``encode_token_ids`` / ``encode_texts`` ->
    ``(M, dim)``: L2-normalised float32 on ``device``. ``sha256`` identifies the checkpoint (cache manifests).
    """

    def __init__(self, model, tokenizer: ClipTokenizer, sha256: str, source: str,
                 device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.model = model.to(self.device).eval().requires_grad_(False)
        self.tokenizer, self.sha256, self.source = tokenizer, sha256, source
        self.dim = int(model.config.projection_dim)
        self.image_size = int(model.config.vision_config.image_size)
        self.preprocess = ClipImagePreprocess(self.image_size)
        text = model.config.text_config
        if tokenizer.vocab_size > text.vocab_size:
            raise CheckpointError(f"CLIP {source}: the tokenizer has {tokenizer.vocab_size} ids, the model "
                                  f"{text.vocab_size}")
        legacy = text.eos_token_id == 2  # transformers then pools at the largest id, CLIP's end id
        if not legacy and tokenizer.end_id != text.eos_token_id:
            raise CheckpointError(f"CLIP {source}: the tokenizer's end id {tokenizer.end_id} is not the model's "
                                  f"eos_token_id {text.eos_token_id}")
        if legacy and tokenizer.end_id != tokenizer.vocab_size - 1:
            raise CheckpointError(f"CLIP {source}: eos_token_id 2 means the end id must be the largest id, but it is "
                                  f"{tokenizer.end_id} of {tokenizer.vocab_size}")

    @torch.no_grad()
    def encode_pixels(self, pixels: Tensor) -> Tensor:
        """Preprocessed images ``(B, 3, S, S)`` -> unit embeddings ``(B, dim)``."""
        return clip_image_features(self.model, pixels.to(self.device))

    @torch.no_grad()
    def encode_token_ids(self, ids: Tensor, mask: Tensor) -> Tensor:
        """Token ids ``(M, L)`` with their attention mask -> unit embeddings ``(M, dim)``."""
        return clip_text_features(self.model, ids.to(self.device), mask.to(self.device))

    def encode_images(self, images: Sequence[Image.Image | np.ndarray | Path | str], batch_size: int = 64) -> Tensor:
        """Image files / PIL images / uint8 arrays -> ``(B, dim)``."""
        out = [self.encode_pixels(torch.stack([self.preprocess(image) for image in images[i: i + batch_size]]))
               for i in range(0, len(images), batch_size)]
        return torch.cat(out) if out else torch.zeros((0, self.dim), device=self.device)

    def encode_texts(self, texts: Sequence[str], batch_size: int = 256) -> Tensor:
        """Captions -> ``(M, dim)``."""
        out = [self.encode_token_ids(*self.tokenizer.batch(texts[i: i + batch_size]))
               for i in range(0, len(texts), batch_size)]
        return torch.cat(out) if out else torch.zeros((0, self.dim), device=self.device)


def load_clip_teacher(path: Path | str, device: torch.device | str = "cpu", tokenizer: Path | str | None = None,
                      activation: str = "quick_gelu") -> CLIPTeacher:
    """The frozen CLIP at ``path``: a transformers directory or an OpenAI / open_clip ``.pt`` file.

    ``tokenizer``: a directory with CLIP tokenizer files or a BPE ``.txt.gz``; by default the directory's own
    files, else the packaged CLIP BPE. ``activation`` applies to ``.pt`` files only (their config is inferred).
    """
    path = Path(path)
    if activation not in ACTIVATIONS:
        raise ConfigError(f"CLIP activation must be one of {list(ACTIVATIONS)}, got {activation!r}")
    if path.is_dir():
        model = _from_directory(path)
        has_own = any((path / n).is_file() for n in ("vocab.json", "tokenizer.json"))
        tokenizer_source = tokenizer if tokenizer is not None else (path if has_own else None)
    elif path.is_file():
        model = _from_state_dict(path, activation)
        tokenizer_source = tokenizer
    else:
        raise CheckpointError(f"CLIP checkpoint {path} does not exist (expected a transformers directory or a "
                              f".pt file)")
    context = int(model.config.text_config.max_position_embeddings)
    return CLIPTeacher(model, build_clip_tokenizer(tokenizer_source, context), checkpoint_sha256(path), str(path),
                       device)
