"""Inference with a trained retrieval model: checkpoint -> encoders, tokenizer and config -> embeddings -> metrics.

The CLI, the demo, the benchmarks and the search code call this module; the trainer uses its encoding pieces for
validation. A checkpoint of kind ``RETRIEVAL_CHECKPOINT`` holds the config, the vocabulary (BiGRU), the weights and
``inputs`` (``inputs_record``: the features manifest of the corpus it was trained on, its CGE teacher and, for a
locked-text model, the manifest of its frozen text model), which ``xmcl.retrieval.retriever`` needs to encode raw
images and captions and which evaluation checks a feature corpus against. Loading builds the encoders only
(``DualEncoder``): the key encoders, queues and loss of the checkpoint are dropped.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import torch
from torch.utils.data import DataLoader

from xmcl.config import config_from_dict
from xmcl.data.batches import Collate, SplitCaptions, SplitImages
from xmcl.data.corpus import CaptionSplit
from xmcl.data.images import ImageTransform
from xmcl.data.open import open_split
from xmcl.data.text import HFTokenizer, TextTokenizer, VocabTokenizer, Vocabulary, resolve_text_model_dir
from xmcl.errors import CheckpointError, ConfigError, DataError
from xmcl.metrics.retrieval import Metrics, evaluate_embeddings
from xmcl.retrieval.clip.cache import ClipCache, SplitGuides, split_guides
from xmcl.retrieval.config import RetrievalModelConfig, RetrievalTrainConfig
from xmcl.retrieval.grid_features import FeaturesManifest, check_features_match, read_features_manifest
from xmcl.retrieval.dual_encoder import DualEncoder, encoder_weights
from xmcl.retrieval.model_dir import file_sha256, find_model, is_model_dir, read_model_dir
from xmcl.retrieval.onnx_runtime import OnnxEncoders, check_runtime, load_onnx_encoders
from xmcl.retrieval.token_features import attach_token_features, read_text_manifest, recorded_text_model
from xmcl.runtime.checkpoint import load_checkpoint
from xmcl.runtime.device import resolve_device

RETRIEVAL_CHECKPOINT = ("xmcl.retrieval", 3)  # kind and version of the trainer's checkpoints (3: safe to load)


def build_tokenizer(model_cfg: RetrievalModelConfig, max_tokens: int, vocab: Vocabulary | None) -> TextTokenizer:
    """The tokenizer of the configured text encoder (a vocabulary for the BiGRU, the model's own for BERT)."""
    if model_cfg.text_encoder == "bert":
        return HFTokenizer(resolve_text_model_dir(model_cfg.text_model))
    if vocab is None:
        raise ConfigError("model.text_encoder='bigru' needs a vocabulary")
    return VocabTokenizer(vocab, max_length=max_tokens)


def image_transform(model_cfg: RetrievalModelConfig, model: DualEncoder | OnnxEncoders, size: int, train: bool
                    ) -> ImageTransform | None:
    """The pixel preprocessing of the model's backbone (None when the model reads region features)."""
    if model_cfg.image_input != "images":
        return None
    return ImageTransform(size, model.image_normalization, train=train)


def check_input(split: CaptionSplit, model_cfg: RetrievalModelConfig) -> None:
    """Refuse a corpus whose image side does not fit the model (raw images vs region features, feature width)."""
    if model_cfg.image_input == "regions":
        if split.region_features is None:
            raise ConfigError(f"{split.source}: model.image_input='regions' but this corpus holds raw images; "
                              f"extract features with `xmcl features` or set model.image_input=images")
        if split.region_features.shape[-1] != model_cfg.region_dim:
            raise ConfigError(f"{split.source}: region features are {split.region_features.shape[-1]}-d but "
                              f"model.region_dim is {model_cfg.region_dim}")
    elif split.image_paths is None:
        raise ConfigError(f"{split.source}: model.image_input='images' but this corpus holds precomputed "
                          f"features; set model.image_input=regions")


def inputs_record(model_cfg: RetrievalModelConfig, split: CaptionSplit, clip_sha256: str | None) -> dict:
    """What a model's inputs are made from, saved in its checkpoint: ``features``, the manifest of the region-feature
    corpus ``split`` comes from (None for raw images or a folder without ``features.json``), ``clip``, the CGE
    teacher (``path``, ``sha256``, ``activation``; None without CGE), and ``text``, the manifest of the frozen text
    model whose cached states a locked-text model reads (None otherwise)."""
    features = None
    if model_cfg.image_input == "regions" and split.region_features is not None:
        manifest = read_features_manifest(Path(split.source))
        features = manifest.to_dict() if manifest is not None else None
    clip = None
    if model_cfg.cge or model_cfg.text_cge:
        activation = ClipCache.open(model_cfg.clip_cache).manifest["activation"] if model_cfg.clip_cache \
            else "quick_gelu"
        clip = {"path": str(Path(model_cfg.clip_path).resolve()) if model_cfg.clip_path else None,
                "sha256": clip_sha256, "activation": activation}
    text = read_text_manifest(split.source).to_dict() if model_cfg.text_input == "token_features" else None
    return {"features": features, "clip": clip, "text": text}


def recorded_features(state: dict, where: str) -> FeaturesManifest | None:
    """The features manifest a checkpoint's state records (None: trained on raw images, or before manifests)."""
    record = (state.get("inputs") or {}).get("features")
    return FeaturesManifest.from_dict(record, f"checkpoint {where}") if record else None


def check_corpus_features(state: dict, corpus: CaptionSplit, where: str, allow: bool = False) -> None:
    """Refuse a region-feature corpus whose ``features.json`` differs from the manifest the checkpoint ``where``
    was trained with (backbone, weights hash, image size, ...), naming both sides, unless ``allow``."""
    recorded = recorded_features(state, where)
    if recorded is None or corpus.region_features is None:
        return
    found = read_features_manifest(Path(corpus.source))
    if found is not None:
        check_features_match(recorded, found, f"checkpoint {where}", f"the features in {corpus.source}", allow)


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """Every tensor of a batch on ``device`` (non-blocking where the source is pinned)."""
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


@torch.no_grad()
def encode_split(model: DualEncoder | OnnxEncoders, split: CaptionSplit, tokenizer: TextTokenizer,
                 transform: ImageTransform | None, device: torch.device, batch_size: int = 256,
                 num_workers: int = 0, guides: SplitGuides | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit embeddings of every image (N, d) and caption (M, d) of the split, by the online encoders
    (``guides``: the split's CLIP embeddings, needed when the model has CGE; see ``split_guides``)."""
    model.eval()
    collate = Collate(tokenizer.pad_id)
    clip_image, clip_text = (guides.image, guides.text) if guides is not None else (None, None)
    images, texts = [], []
    for batch in DataLoader(SplitImages(split, transform, clip_image), batch_size=batch_size, collate_fn=collate,
                            num_workers=num_workers, generator=torch.Generator()):  # the global RNG is left alone
        batch = to_device(batch, device)
        inputs = batch["images"] if "images" in batch else batch["regions"]
        images.append(model.encode_images(inputs, batch.get("region_lengths"), batch.get("clip_image")).float().cpu())
    for batch in DataLoader(SplitCaptions(split, tokenizer, clip_text), batch_size=batch_size, collate_fn=collate,
                            num_workers=num_workers, generator=torch.Generator()):
        batch = to_device(batch, device)
        texts.append(model.encode_texts(model.text_inputs(batch), batch["token_lengths"],
                                        batch.get("clip_text")).float().cpu())
    return torch.cat(images), torch.cat(texts)


def load_retrieval_checkpoint(checkpoint: Path) -> dict:
    """The state dict of a retrieval training checkpoint (kind and version checked)."""
    kind, version = RETRIEVAL_CHECKPOINT
    return load_checkpoint(checkpoint, kind, version)


@dataclass
class SavedModel:
    """A trained model's saved state (a training checkpoint's, or a model directory's in the same layout), where it
    came from, its ``sha256`` (what an index records), ``aliases`` (other sha256 naming the same weights) and, for a
    model directory, its parsed ``config.json`` (``manifest``; None for a checkpoint)."""

    path: Path
    state: dict
    sha256: str
    aliases: tuple[str, ...] = ()
    manifest: dict | None = None


def open_saved_model(path: Path | str) -> SavedModel:
    """The saved model at ``path``: a training checkpoint, a model directory or a shipped model's name."""
    path = find_model(path)
    if is_model_dir(path):
        directory = read_model_dir(path)
        return SavedModel(path, directory.state, directory.identity, directory.aliases, directory.manifest)
    return SavedModel(path, load_retrieval_checkpoint(path), file_sha256(path))


def model_from_state(state: dict, where: str, device: torch.device, with_text_model: bool = False,
                     text_model: str | None = None) -> tuple[DualEncoder, TextTokenizer, RetrievalTrainConfig]:
    """The encoders (eval mode, on ``device``), tokenizer and config held by a checkpoint's state (a training
    checkpoint's or a model directory's). ``with_text_model``: a locked-text model also gets its frozen text model
    (``recorded_text_model``; ``text_model`` says where it is when it moved), so that it encodes raw captions."""
    missing = [key for key in ("config", "model") if key not in state]
    if missing:
        raise CheckpointError(f"{where}: the checkpoint has no {' or '.join(repr(k) for k in missing)} entry")
    cfg = config_from_dict(RetrievalTrainConfig, state["config"], where=where)
    vocab = Vocabulary(state["vocab"]) if state.get("vocab") else None
    frozen = None
    if with_text_model and cfg.model.text_input == "token_features":
        frozen, tokenizer, _ = recorded_text_model(text_model_record(state, cfg, where), where, text_model)
    else:
        tokenizer = build_tokenizer(cfg.model, cfg.data.max_caption_tokens, vocab)
    model = DualEncoder(cfg.model, vocab_size=tokenizer.vocab_size, text_model=frozen, pretrained=False)
    model.load_encoder_state(encoder_weights(state["model"]), where)
    return model.to(device).eval(), tokenizer, cfg


def text_model_record(state: dict, cfg: RetrievalTrainConfig, where: str) -> dict:
    """The frozen text model manifest of a locked-text model: recorded in its ``inputs``, or, for a checkpoint written
    before they recorded it, the ``text_features.json`` of its training corpus."""
    record = (state.get("inputs") or {}).get("text")
    if record:
        return record
    try:
        return read_text_manifest(cfg.data.path).to_dict()
    except DataError:
        raise CheckpointError(f"{where} is a locked-text model that does not record its frozen text model, and its "
                              f"training corpus {cfg.data.path} has no text_features.json to tell it") from None


def embed_checkpoint(checkpoint: Path, data_path: Path | None, split: str, device: str | torch.device = "auto",
                     allow_feature_mismatch: bool = False, runtime: str = "torch", threads: int = 1
                     ) -> tuple[torch.Tensor, torch.Tensor, CaptionSplit, RetrievalTrainConfig]:
    """Image (N, d) and caption (M, d) unit embeddings of ``split`` of ``data_path`` (default: the model's
    training corpus) by a trained model (a checkpoint, model directory or shipped model's name), with the split and
    the model's config. Region features made otherwise than the training ones are refused unless
    ``allow_feature_mismatch`` (``check_corpus_features``). ``runtime``: ``"torch"``, or ``"onnx"`` / ``"onnx-int8"``
    (a model directory's ONNX graphs on ``threads`` threads; a locked-text model's graph reads the captions' token
    ids, not the cached states).

    With CGE, the CLIP embeddings come from the model's cache; images or captions it lacks are encoded by the
    CLIP teacher (``model.clip_path``), which must be the checkpoint the model was trained with."""
    check_runtime(runtime)
    saved = open_saved_model(checkpoint)
    where = str(saved.path)
    if runtime == "torch":
        torch_device = resolve_device(device)
        model, tokenizer, cfg = model_from_state(saved.state, where, torch_device)
    else:
        torch_device = torch.device("cpu")
        model, tokenizer, cfg, _ = load_onnx_encoders(saved.path, saved.state, saved.manifest, runtime == "onnx-int8",
                                                      threads)
    folder = data_path if data_path is not None else cfg.data.path
    corpus = open_split(folder, split, key=None if data_path is not None else f"data.path of {where}")
    if cfg.model.text_input == "token_features" and runtime == "torch":  # locked text: the cached states
        (corpus,) = attach_token_features([corpus], folder, cfg.model.text_model)
    check_input(corpus, cfg.model)
    check_corpus_features(saved.state, corpus, where, allow_feature_mismatch)
    guides = split_guides(cfg.model, corpus, torch_device, compute_missing=True,
                          trained_sha256=saved.state.get("clip_sha256"))
    transform = image_transform(cfg.model, model, cfg.data.image_size, train=False)
    img, txt = encode_split(model, corpus, tokenizer, transform, torch_device, guides=guides)
    return img, txt, corpus, cfg


def evaluate_checkpoint(checkpoint: Path, data_path: Path | None, split: str, protocols: Iterable[str],
                        device: str = "auto", allow_feature_mismatch: bool = False, runtime: str = "torch",
                        threads: int = 1) -> dict[str, Metrics]:
    """Metrics per protocol of a trained model on ``split`` of ``data_path`` (see ``embed_checkpoint``)."""
    img, txt, corpus, _ = embed_checkpoint(checkpoint, data_path, split, device, allow_feature_mismatch, runtime,
                                           threads)
    return evaluate_embeddings(img, txt, corpus.caption_image, protocols=tuple(protocols))
