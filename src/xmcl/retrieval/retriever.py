"""A trained model as a retriever: raw image files / PIL images and caption strings -> unit embeddings.

``Retriever.load(path)`` takes a training checkpoint, a model directory (``xmcl.retrieval.model_dir``) or the name of
a shipped model, builds the encoders only (``xmcl.retrieval.inference``), and adds what turns a raw input into the
model's input:

- a model trained on region features (``xmcl features`` output) gets the backbone its features manifest names,
  rebuilt from the recorded weights; each image is resized as the features were (bicubic, aspect ratio not kept),
  normalised, run through the backbone, and its grid cells rounded through float16 as the feature files store
  them, then the image tower runs. The rebuilt backbone's weights hash, and any backbone, weights or image size
  asked for, must match the manifest (``check_features_match``) unless ``allow_mismatch``;
- a model trained end to end on images uses its own backbone and the evaluation transform (centred square);
- a locked-text model runs the frozen text model its training recorded (``recorded_text_model``: same weights,
  tokeniser and length, else refused) and then its trained text tower, so a raw caption is encoded as its cached
  states were;
- a CGE model loads its CLIP teacher (the recorded path, or ``clip_path``), which must hash to the recorded
  checkpoint; its guides are rounded through float16 as the CLIP cache stores them.

Encoding is batched and runs on the chosen device; ``prepare`` (decode + preprocess one image) is separate from
``encode_prepared`` (a stacked batch -> embeddings) so that decoding can run in DataLoader workers.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor

from xmcl.data.images import ImageTransform, open_image
from xmcl.data.text import TextTokenizer, collate_tokens, word_tokenize
from xmcl.errors import CheckpointError, DataError
from xmcl.nn.backbones import build_image_backbone
from xmcl.retrieval.clip.teacher import CLIPTeacher, load_clip_teacher
from xmcl.retrieval.config import RetrievalTrainConfig
from xmcl.retrieval.dual_encoder import DualEncoder
from xmcl.retrieval.grid_features import FeaturesManifest, StoredGrid, check_features_match
from xmcl.retrieval.inference import model_from_state, open_saved_model, recorded_features
from xmcl.retrieval.onnx_runtime import OnnxEncoders, OnnxGridFeatures, check_runtime, load_onnx_encoders
from xmcl.runtime.device import resolve_device

ImageInput = Image.Image | np.ndarray | Path | str
MISMATCH_FLAG = "--allow-mismatch"
MAX_PIXELS = 50_000_000  # an upload decoding to more pixels is refused before it is decoded


def decode_image_bytes(data: bytes, what: str = "the upload") -> Image.Image:
    """An RGB PIL image from encoded bytes (JPEG, PNG, WebP, ...); ``DataError`` when they are not an image or
    would decode to more than ``MAX_PIXELS`` pixels."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.width * image.height > MAX_PIXELS:
                raise DataError(f"{what} is {image.width} x {image.height} pixels, more than {MAX_PIXELS:,}")
            image.load()
            return image if image.mode == "RGB" else image.convert("RGB")  # no second full-size copy
    except UnidentifiedImageError:
        raise DataError(f"{what} is not an image in a format Pillow reads (JPEG, PNG, WebP, ...)") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise DataError(f"{what} is not a decodable image ({error})") from None


def as_rgb(image: ImageInput) -> Image.Image:
    """A decoded RGB PIL image from a file path, a PIL image or a uint8 H x W x 3 array (``DataError`` if not)."""
    if isinstance(image, (str, Path)):
        return open_image(image)
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise DataError(f"expected a uint8 H x W x 3 image array, got {image.dtype} {image.shape}")
        return Image.fromarray(image)
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    raise DataError(f"not an image: {type(image).__name__}")


class GridFeaturePipeline:
    """Raw image -> the grid features ``xmcl features`` would have stored for it (float16-rounded, ``(R, C)``), by
    ``network``: uint8 pixels ``(B, S, S, 3)`` -> ``(B, R, C)`` (``StoredGrid`` of the torch backbone, or its ONNX
    graph ``OnnxGridFeatures``)."""

    def __init__(self, network: Callable[[Tensor], Tensor], image_size: int, device: torch.device) -> None:
        self.network, self.image_size, self.device = network, image_size, device

    def prepare(self, image: ImageInput) -> Tensor:
        """uint8 ``(S, S, 3)``: resized without keeping the aspect ratio, as ``grid_features`` does."""
        resized = as_rgb(image).resize((self.image_size, self.image_size), Image.Resampling.BICUBIC)
        return torch.from_numpy(np.array(resized, dtype=np.uint8))

    @torch.no_grad()
    def features(self, pixels: Tensor) -> Tensor:
        """``(B, S, S, 3)`` uint8 -> ``(B, h * w, C)`` float32 holding float16 values."""
        return self.network(pixels.to(self.device))


class Retriever:
    """Encodes images and captions with a trained model (eval mode, no gradients) on ``device``.

    ``sha256`` identifies the model (a checkpoint file's bytes, or a model directory's ``config.json``; indexes
    record it) and ``identities`` every sha256 whose embeddings are this model's (a model directory's also names
    the checkpoint it was exported from); ``dim`` is the embedding width.
    """

    def __init__(self, model: DualEncoder | OnnxEncoders, tokenizer: TextTokenizer, cfg: RetrievalTrainConfig,
                 sha256: str, source: str, device: torch.device, grid: GridFeaturePipeline | None,
                 transform: ImageTransform | None, teacher: CLIPTeacher | None,
                 aliases: tuple[str, ...] = ()) -> None:
        self.model, self.tokenizer, self.cfg = model.eval(), tokenizer, cfg
        self.sha256, self.source, self.device = sha256, source, device
        self.identities = (sha256, *aliases)
        self.grid, self.transform, self.teacher = grid, transform, teacher
        self.dim = cfg.model.embed_dim

    @classmethod
    def load(cls, path: Path | str, device: str | torch.device = "auto", *, runtime: str = "torch", threads: int = 1,
             backbone: str | None = None, backbone_weights: str | None = None, image_size: int | None = None,
             clip_path: str | None = None, text_model: str | None = None,
             allow_mismatch: bool = False) -> "Retriever":
        """The retriever of a training checkpoint, a model directory or a shipped model's name (see the module
        docstring). ``runtime``: ``"torch"``, or ``"onnx"`` / ``"onnx-int8"``: the ONNX graphs of a model directory
        exported with ``--onnx`` (``--quantize int8``) under ONNX Runtime on ``threads`` threads, on the CPU.
        ``backbone`` / ``backbone_weights`` / ``image_size`` override what the features manifest records (a moved
        weights file, say); a result that differs from the manifest is refused unless ``allow_mismatch``.
        ``clip_path`` overrides the CGE teacher's recorded path and ``text_model`` the frozen text model's directory
        (each must still hash to the recorded one)."""
        check_runtime(runtime)
        saved = open_saved_model(path)
        state, where = saved.state, str(saved.path)
        if runtime == "torch":
            torch_device = resolve_device(device)
            model, tokenizer, cfg = model_from_state(state, where, torch_device, with_text_model=True,
                                                     text_model=text_model)
        else:
            torch_device = torch.device("cpu")
            model, tokenizer, cfg, graphs = load_onnx_encoders(saved.path, saved.state, saved.manifest,
                                                               runtime == "onnx-int8", threads)
        grid, transform = None, None
        if cfg.model.image_input == "regions" and runtime == "torch":
            grid = _grid_pipeline(state, where, cfg.model.region_dim, backbone, backbone_weights, image_size,
                                  allow_mismatch, torch_device)
        elif cfg.model.image_input == "regions":
            grid = GridFeaturePipeline(OnnxGridFeatures(saved.path, threads), graphs["image_size"], torch_device)
        else:
            if image_size and image_size != cfg.data.image_size and not allow_mismatch:
                raise CheckpointError(f"model {where} was trained on {cfg.data.image_size}-px images, not "
                                      f"{image_size}; pass {MISMATCH_FLAG} to encode at {image_size} px anyway")
            transform = ImageTransform(image_size or cfg.data.image_size, model.image_normalization, train=False)
        teacher = _teacher(state, cfg, where, clip_path, torch_device)
        return cls(model, tokenizer, cfg, saved.sha256, str(saved.path.resolve()), torch_device, grid, transform,
                   teacher, saved.aliases)

    # ---------------------------------------------------------------------------------------------- images
    def prepare(self, image: ImageInput) -> dict[str, Tensor]:
        """One decoded, preprocessed image: ``pixels`` for the image tower (and ``clip`` pixels with CGE).
        ``DataError`` naming the file when it cannot be decoded."""
        rgb = as_rgb(image)
        item = {"pixels": self.grid.prepare(rgb) if self.grid is not None else self.transform(rgb)}
        if self.teacher is not None and self.cfg.model.cge:
            item["clip"] = self.teacher.preprocess(rgb)
        return item

    @torch.no_grad()
    def encode_prepared(self, batch: dict[str, Tensor]) -> Tensor:
        """A batch of stacked ``prepare`` outputs -> ``(B, dim)`` float32 unit embeddings (on the CPU)."""
        guides = None
        if "clip" in batch:
            guides = self.teacher.encode_pixels(batch["clip"]).half().float()
        if self.grid is not None:
            inputs = self.grid.features(batch["pixels"])
        else:
            inputs = batch["pixels"].to(self.device)
        return self.model.encode_images(inputs, None, guides).float().cpu()

    def encode_images(self, images: Sequence[ImageInput], batch_size: int = 32) -> Tensor:
        """Image files / PIL images / uint8 arrays -> ``(B, dim)`` float32 unit embeddings."""
        out = []
        for start in range(0, len(images), batch_size):
            items = [self.prepare(image) for image in images[start: start + batch_size]]
            out.append(self.encode_prepared({key: torch.stack([it[key] for it in items]) for key in items[0]}))
        return torch.cat(out) if out else torch.zeros((0, self.dim))

    # ------------------------------------------------------------------------------------------------ text
    def vocabulary_warning(self, text: str) -> str | None:
        """A warning when most of the query's words are unknown to the model's vocabulary (its embedding then
        says little), else None; only a vocabulary model (BiGRU) has unknown words."""
        words = [w for w in word_tokenize(text) if any(c.isalnum() for c in w)]
        unknown = [w for w in self.tokenizer.unknown_words(text) if any(c.isalnum() for c in w)]
        if not words or 2 * len(unknown) <= len(words):
            return None
        shown = ", ".join(dict.fromkeys(unknown[:8]))
        return (f"{len(unknown)} of the query's {len(words)} words are unknown to this model's vocabulary ({shown}): "
                f"it was trained on {self.cfg.data.path}, and its results for this query are close to chance")

    @torch.no_grad()
    def encode_texts(self, texts: Sequence[str], batch_size: int = 256) -> Tensor:
        """Captions -> ``(M, dim)`` float32 unit embeddings; an empty caption is a ``DataError``."""
        out = []
        for start in range(0, len(texts), batch_size):
            chunk = list(texts[start: start + batch_size])
            for text in chunk:
                if not isinstance(text, str) or not text.strip():
                    raise DataError("a caption to encode is empty")
            ids, lengths = collate_tokens([self.tokenizer.encode(text) for text in chunk], self.tokenizer.pad_id)
            guides = None
            if self.teacher is not None and self.cfg.model.text_cge:
                guides = self.teacher.encode_texts(chunk).half().float()
            out.append(self.model.encode_texts(ids.to(self.device), lengths, guides).float().cpu())
        return torch.cat(out) if out else torch.zeros((0, self.dim))


def _grid_pipeline(state: dict, where: str, region_dim: int, backbone: str | None, weights: str | None,
                   image_size: int | None, allow_mismatch: bool, device: torch.device) -> GridFeaturePipeline:
    recorded = recorded_features(state, where)
    if recorded is None and not (backbone and weights and image_size):
        raise CheckpointError(f"checkpoint {where} was trained on region features without a features manifest "
                              f"(made before manifests, or by another tool), so it does not know how to encode a raw "
                              f"image: give --backbone, --backbone-weights and --image-size of the network that made "
                              f"its features, with {MISMATCH_FLAG}")
    name = backbone or recorded.backbone
    given = weights or recorded.weights
    if given == "none":
        raise CheckpointError(f"checkpoint {where} was trained on features of a randomly initialised {name} whose "
                              f"weights were never saved; give --backbone-weights of the network that made them")
    try:
        network = build_image_backbone(name, given)
    except CheckpointError as error:
        raise CheckpointError(f"{error} (the backbone of checkpoint {where}'s features; give --backbone-weights "
                              f"where the file is now)") from None
    if network.out_channels != region_dim:
        raise CheckpointError(f"backbone {network.name} gives {network.out_channels}-d cells but model {where} reads "
                              f"{region_dim}-d region features")
    size = image_size or recorded.image_size
    built = FeaturesManifest.of(network, given, size)
    if recorded is not None:
        check_features_match(recorded, built, f"checkpoint {where}", f"the backbone asked for ({name}, {given}, "
                             f"{size} px)", allow_mismatch, MISMATCH_FLAG)
    return GridFeaturePipeline(StoredGrid(network).to(device).eval().requires_grad_(False), size, device)


def _teacher(state: dict, cfg: RetrievalTrainConfig, where: str, clip_path: str | None,
             device: torch.device) -> CLIPTeacher | None:
    if not (cfg.model.cge or cfg.model.text_cge):
        return None
    record = (state.get("inputs") or {}).get("clip") or {}
    path = clip_path or record.get("path") or cfg.model.clip_path
    trained = record.get("sha256") or state.get("clip_sha256")
    if not path or not Path(path).exists():
        raise CheckpointError(f"checkpoint {where} uses CLIP-guided enhancement, and its CLIP teacher "
                              f"{path or '(not recorded)'} is not there: give --clip-path")
    teacher = load_clip_teacher(path, device, activation=record.get("activation", "quick_gelu"))
    if trained and teacher.sha256 != trained:
        raise CheckpointError(f"CLIP {path} (sha256 {teacher.sha256[:12]}...) is not the teacher checkpoint {where} "
                              f"was trained with (sha256 {trained[:12]}...)")
    return teacher
