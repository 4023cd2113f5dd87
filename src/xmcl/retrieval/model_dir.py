"""Model directories: a trained retrieval model as files that load without the training code or any pickle.

Layout (written by ``xmcl.retrieval.export``)::

    config.json        {"format", "embed_dim", "config" (the training config), "inputs" (features manifest, CGE
                        teacher, frozen text model manifest), "tokenizer", "files" ({name: sha256} of every file
                        loading reads), "trained" (source checkpoint, its sha256, epoch, val figures)}
    model.safetensors  the encoders' weights only (``DualEncoder.encoder_state_dict``: no key encoders, queues, loss)
    vocab.json         the BiGRU's vocabulary (vocabulary models only)
    text_model/        the BERT-family config and tokenizer files of a model whose text model was fine-tuned (its
                        weights are in model.safetensors)
    *.onnx             with ``--onnx``: the encoders' ONNX graphs (``xmcl.retrieval.onnx_export``; ``onnx`` in
                        config.json lists them), and tokenizer/, the tokenizer files they need
    README.md          the model card

Frozen parts that come from their own files (the ImageNet EfficientNet-Lite0 behind region features, the frozen
MiniLM of a locked-text model, a CGE teacher) are referenced by name and SHA-256 in ``inputs``, not copied.
``read_model_dir`` checks every file of ``files`` against its SHA-256 before use and refuses a missing, truncated or
altered one, naming it. A model's identity (what an index records) is the SHA-256 of its ``config.json``, which
covers every other file; an index built with the source checkpoint is searchable with the exported model too.
Shipped models live in the package (``SHIPPED_MODELS``) and are found by name, as shipped configs are.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import safetensors.torch

from xmcl.errors import CheckpointError

MODEL_FORMAT = "xmcl-model/1"
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
VOCAB_FILE = "vocab.json"
TEXT_MODEL_DIR = "text_model"
TOKENIZER_DIR = "tokenizer"
CARD_FILE = "README.md"
SHIPPED_MODELS = Path(__file__).resolve().parent.parent / "models"  # model directories installed with the package


def file_sha256(path: Path) -> str:
    """SHA-256 (hex) of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def is_model_dir(path: Path | str) -> bool:
    """True when ``path`` is a folder with a ``config.json`` (a model directory, or something to refuse as one)."""
    return (Path(path) / CONFIG_FILE).is_file()


def shipped_models() -> list[str]:
    """Names of the model directories shipped with the package."""
    return sorted(p.name for p in SHIPPED_MODELS.iterdir() if is_model_dir(p)) if SHIPPED_MODELS.is_dir() else []


def find_model(path: Path | str) -> Path:
    """``path`` when it exists; else the shipped model directory of that name; ``CheckpointError`` naming the
    shipped models when it is neither."""
    path = Path(path)
    if path.exists():
        return path
    if len(path.parts) == 1 and is_model_dir(SHIPPED_MODELS / path.name):
        return SHIPPED_MODELS / path.name
    raise CheckpointError(f"{path} does not exist: give a checkpoint, a model directory or a shipped model's name "
                          f"(shipped: {', '.join(shipped_models()) or 'none'})")


@dataclass
class ModelDirectory:
    """A verified model directory: ``state`` in the layout of a training checkpoint's (``config``, ``vocab``,
    ``model``: the encoders' weights, ``inputs``), its ``identity`` (sha256 of config.json), ``aliases`` (the
    source checkpoint's sha256: an index it built holds embeddings of this very model) and ``manifest``, its parsed
    ``config.json`` (``onnx``, ``trained``, ...)."""

    path: Path
    state: dict
    identity: str
    aliases: tuple[str, ...]
    manifest: dict


def read_model_dir(path: Path | str) -> ModelDirectory:
    """Read and verify a model directory (see the module docstring): JSON and safetensors only, never a pickle."""
    path = Path(path)
    config_path = path / CONFIG_FILE
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path} is not a model directory (no {CONFIG_FILE}); make one with `xmcl export`") \
            from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{config_path} cannot be read: {error}") from None
    if not isinstance(config, dict) or config.get("format") != MODEL_FORMAT:
        raise CheckpointError(f"{config_path} is not an xmcl model directory's config (format {MODEL_FORMAT!r} "
                              f"expected)")
    files = config.get("files")
    if not isinstance(files, dict) or WEIGHTS_FILE not in files:
        raise CheckpointError(f"{config_path}: 'files' must map each file (at least {WEIGHTS_FILE}) to its sha256")
    for name, expected in files.items():
        _verify_file(path, name, expected)
    try:
        weights = safetensors.torch.load_file(str(path / WEIGHTS_FILE))
    except (OSError, ValueError, RuntimeError) as error:  # verified above, so only a library fault lands here
        raise CheckpointError(f"{path / WEIGHTS_FILE} cannot be read: {error}") from None
    vocab = None
    if VOCAB_FILE in files:
        words = json.loads((path / VOCAB_FILE).read_text(encoding="utf-8")).get("words")
        if not isinstance(words, list) or not all(isinstance(w, str) for w in words):
            raise CheckpointError(f"{path / VOCAB_FILE}: 'words' must be a list of strings")
        vocab = words
    text_dir = path / TEXT_MODEL_DIR if any(n.startswith(f"{TEXT_MODEL_DIR}/") for n in files) else None
    train_config = config.get("config")
    if not isinstance(train_config, dict):
        raise CheckpointError(f"{config_path}: 'config' must be the model's training config")
    if text_dir is not None:  # the fine-tuned text model is built from the directory's own config and tokenizer
        train_config = {**train_config, "model": {**train_config.get("model", {}), "text_model": str(text_dir)}}
    state = {"config": train_config, "vocab": vocab, "model": weights, "inputs": config.get("inputs") or {}}
    source = (config.get("trained") or {}).get("checkpoint_sha256")
    return ModelDirectory(path, state, file_sha256(config_path), (source,) if source else (), config)


def _verify_file(folder: Path, name: object, expected: object) -> None:
    if not isinstance(name, str) or not isinstance(expected, str) or Path(name).is_absolute() or ".." in Path(
            name).parts:
        raise CheckpointError(f"{folder / CONFIG_FILE}: bad entry in 'files': {name!r}")
    file = folder / name
    if not file.is_file():
        raise CheckpointError(f"model directory {folder}: {name} is missing (config.json lists it)")
    found = file_sha256(file)
    if found != expected:
        raise CheckpointError(f"model directory {folder}: {name} is truncated or altered (sha256 {found[:12]}..., "
                              f"config.json records {expected[:12]}...); export the model again")
