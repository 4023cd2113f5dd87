"""A frozen CLIP that gives global image and text embeddings (the guide of USER's CGE).

Two checkpoint forms load into ``transformers.CLIPModel``:

- a transformers directory (``config.json`` + ``model.safetensors`` / ``pytorch_model.bin``), read with
  ``from_pretrained(..., local_files_only=True)``; every weight must be present (none initialised at random);
- an OpenAI / open_clip ``.pt`` file: a TorchScript archive (OpenAI's release), a plain state dict, or a training
  checkpoint ``{"state_dict": ...}`` (a ``module.`` prefix is dropped). Its ViT keys are mapped by
  :func:`openai_to_transformers`; shapes give the configuration (heads = width / 64, OpenAI's rule;
  ``activation`` is QuickGELU for OpenAI's weights, ``"gelu"`` for most open_clip ones). ResNet towers are refused.

Images: :class:`ClipImagePreprocess` resizes the short side to the model's input size (bicubic), centre-crops,
and normalises with CLIP's mean/std, as CLIP's own transform does. Text: :class:`ClipTokenizer`, CLIP's byte-level
BPE (lower-cased, whitespace collapsed, HTML entities unescaped; ftfy's mojibake repair is not applied), between
``<|startoftext|>`` and ``<|endoftext|>``, cut to the context length. Its vocabulary comes from a directory's
``vocab.json`` + ``merges.txt`` (or ``tokenizer.json``), else from ``bpe_simple_vocab_16e6.txt.gz`` inside the
``open_clip_torch`` wheel (``pip install --no-deps open_clip_torch``), or a file given explicitly.
Embeddings are L2-normalised float32; the teacher never trains.
"""

from __future__ import annotations

import gzip
import hashlib
import html
import importlib.util
import json
import zipfile
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from xmcl.data.images import CLIP, open_image
from xmcl.errors import CheckpointError, ConfigError, DataError

START, END = "<|startoftext|>", "<|endoftext|>"
END_OF_WORD = "</w>"
BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"
OPENAI_MERGES = 49152 - 256 - 2  # merges CLIP uses from the BPE file (vocabulary 49408 = 2 * 256 + merges + 2)
SPLIT_PATTERN = r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
ACTIVATIONS = ("quick_gelu", "gelu")  # OpenAI's weights / most open_clip ones
HEAD_WIDTH = 64  # OpenAI CLIP: attention heads = width / 64
IGNORED_OPENAI_KEYS = ("input_resolution", "context_length", "vocab_size")  # TorchScript scalars, not weights


# ------------------------------------------------------------------------------------------------ tokenizer
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
        from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers

        missing = [token for token in (START, END) if token not in vocab]
        if missing:
            raise ConfigError(f"CLIP tokenizer {source}: the vocabulary lacks {missing}")
        if context_length < 3:
            raise ConfigError(f"CLIP tokenizer {source}: context length must be >= 3, got {context_length}")
        bpe = models.BPE(vocab=dict(vocab), merges=[tuple(pair) for pair in merges], unk_token=END,
                         end_of_word_suffix=END_OF_WORD, continuing_subword_prefix="", fuse_unk=False)
        tokenizer = Tokenizer(bpe)
        tokenizer.normalizer = normalizers.Sequence(
            [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
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


# ------------------------------------------------------------------------------------------------ images
class ClipImagePreprocess:
    """Image -> float32 ``(3, size, size)``: the short side resized to ``size`` (bicubic, the long side to
    ``int(size * long / short)``), a centred ``size`` square cut (offset ``round((side - size) / 2)``), then
    ``(pixel - mean) / std`` with CLIP's statistics on the 0-255 scale."""

    def __init__(self, size: int) -> None:
        if size < 1:
            raise ConfigError(f"CLIP input size must be positive, got {size}")
        self.size = size
        self.mean = np.asarray(CLIP.mean, dtype=np.float32)
        self.std = np.asarray(CLIP.std, dtype=np.float32)

    def __call__(self, image: Image.Image | np.ndarray | Path | str) -> Tensor:
        if isinstance(image, (str, Path)):
            image = open_image(image)
        elif isinstance(image, np.ndarray):
            if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
                raise DataError(f"expected a uint8 H x W x 3 image array, got {image.dtype} {image.shape}")
            image = Image.fromarray(image)
        image = image.convert("RGB")
        width, height = image.size
        short, long = min(width, height), max(width, height)
        if short != self.size:
            new_long = int(self.size * long / short)
            image = image.resize((self.size, new_long) if width <= height else (new_long, self.size),
                                 Image.Resampling.BICUBIC)
            width, height = image.size
        left, top = int(round((width - self.size) / 2.0)), int(round((height - self.size) / 2.0))
        pixels = np.asarray(image.crop((left, top, left + self.size, top + self.size)), dtype=np.float32)
        return torch.from_numpy((pixels - self.mean) / self.std).permute(2, 0, 1).contiguous()


# ------------------------------------------------------------------------------------------------ weights
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


def load_openai_state_dict(path: Path | str) -> dict[str, Tensor]:
    """The weights of an OpenAI / open_clip ``.pt`` file (TorchScript archive, plain or wrapped state dict)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"CLIP checkpoint {path} does not exist")
    try:
        is_torchscript = zipfile.is_zipfile(path) and any(
            name.endswith("constants.pkl") for name in zipfile.ZipFile(path).namelist())
        if is_torchscript:
            state = torch.jit.load(str(path), map_location="cpu").state_dict()
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types for a truncated or foreign file
        raise CheckpointError(f"CLIP checkpoint {path} cannot be read: {error}") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise CheckpointError(f"CLIP checkpoint {path} does not hold a state dict of tensors")
    if state and all(key.startswith("module.") for key in state):
        state = {key[len("module."):]: value for key, value in state.items()}
    return {key: value.float() if value.is_floating_point() else value for key, value in state.items()}


def _layer_count(state: dict[str, Tensor], prefix: str) -> int:
    return len({key[len(prefix):].split(".")[0] for key in state if key.startswith(prefix)})


def _map_tower(state: dict[str, Tensor], src: str, dst: str, layers: int, out: dict[str, Tensor],
               used: set[str]) -> None:
    """One transformer stack: ``{src}{i}.attn.in_proj_*`` split into q/k/v, the rest renamed."""
    renames = {"attn.out_proj": "self_attn.out_proj", "ln_1": "layer_norm1", "ln_2": "layer_norm2",
               "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
    for i in range(layers):
        block, target = f"{src}{i}.", f"{dst}{i}."
        for kind in ("weight", "bias"):
            q, k, v = _take(state, f"{block}attn.in_proj_{kind}", used).chunk(3, dim=0)
            out.update({f"{target}self_attn.q_proj.{kind}": q, f"{target}self_attn.k_proj.{kind}": k,
                        f"{target}self_attn.v_proj.{kind}": v})
            for old, new in renames.items():
                out[f"{target}{new}.{kind}"] = _take(state, f"{block}{old}.{kind}", used)


def _take(state: dict[str, Tensor], key: str, used: set[str]) -> Tensor:
    if key not in state:
        raise CheckpointError(f"the CLIP state dict lacks '{key}'")
    used.add(key)
    return state[key]


def openai_to_transformers(state: dict[str, Tensor], activation: str = "quick_gelu"):
    """``(CLIPConfig, state dict of transformers.CLIPModel)`` from OpenAI-layout ViT CLIP weights.

    Text: ``token_embedding``, ``positional_embedding``, ``transformer.resblocks.i``, ``ln_final``,
    ``text_projection`` (width x dim, transposed into a linear layer); vision: ``visual.conv1``,
    ``visual.class_embedding``, ``visual.positional_embedding``, ``visual.ln_pre``,
    ``visual.transformer.resblocks.i``, ``visual.ln_post``, ``visual.proj``; ``logit_scale``. Any other key
    raises ``CheckpointError`` naming it. The end-of-text id is the last vocabulary id, as in CLIP.
    """
    from transformers import CLIPConfig

    if "visual.proj" not in state and any(key.startswith("visual.layer1.") for key in state):
        raise CheckpointError("this CLIP state dict has a ResNet image tower (visual.layer1...); only ViT towers "
                              "map onto transformers.CLIPModel")
    used: set[str] = set()
    text_width = _take(state, "ln_final.weight", used).shape[0]
    vision_width = _take(state, "visual.conv1.weight", used).shape[0]
    for name, width in (("text", text_width), ("vision", vision_width)):
        if width % HEAD_WIDTH:
            raise CheckpointError(f"the CLIP {name} tower is {width} wide, not a multiple of the {HEAD_WIDTH}-wide "
                                  f"heads OpenAI's layout implies")
    text_layers = _layer_count(state, "transformer.resblocks.")
    vision_layers = _layer_count(state, "visual.transformer.resblocks.")
    vocab_size = _take(state, "token_embedding.weight", used).shape[0]
    context = _take(state, "positional_embedding", used).shape[0]
    patch = state["visual.conv1.weight"].shape[-1]
    grid = round((_take(state, "visual.positional_embedding", used).shape[0] - 1) ** 0.5)
    config = CLIPConfig(
        text_config=dict(vocab_size=vocab_size, hidden_size=text_width, num_hidden_layers=text_layers,
                         num_attention_heads=text_width // HEAD_WIDTH, max_position_embeddings=context,
                         intermediate_size=_take(state, "transformer.resblocks.0.mlp.c_fc.weight", used).shape[0],
                         hidden_act=activation, bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1,
                         pad_token_id=0),
        vision_config=dict(hidden_size=vision_width, num_hidden_layers=vision_layers,
                           num_attention_heads=vision_width // HEAD_WIDTH, patch_size=patch, image_size=patch * grid,
                           intermediate_size=_take(state, "visual.transformer.resblocks.0.mlp.c_fc.weight",
                                                    used).shape[0],
                           hidden_act=activation),
        projection_dim=_take(state, "text_projection", used).shape[1],
    )
    out = {
        "text_model.embeddings.token_embedding.weight": state["token_embedding.weight"],
        "text_model.embeddings.position_embedding.weight": state["positional_embedding"],
        "text_model.final_layer_norm.weight": state["ln_final.weight"],
        "text_model.final_layer_norm.bias": _take(state, "ln_final.bias", used),
        "text_projection.weight": state["text_projection"].T.contiguous(),
        "vision_model.embeddings.patch_embedding.weight": state["visual.conv1.weight"],
        "vision_model.embeddings.class_embedding": _take(state, "visual.class_embedding", used),
        "vision_model.embeddings.position_embedding.weight": state["visual.positional_embedding"],
        "vision_model.post_layernorm.weight": _take(state, "visual.ln_post.weight", used),
        "vision_model.post_layernorm.bias": _take(state, "visual.ln_post.bias", used),
        "visual_projection.weight": _take(state, "visual.proj", used).T.contiguous(),
        "logit_scale": _take(state, "logit_scale", used).reshape(()),
    }
    # the transformers name keeps its historical spelling "pre_layrnorm"
    out["vision_model.pre_layrnorm.weight"] = _take(state, "visual.ln_pre.weight", used)
    out["vision_model.pre_layrnorm.bias"] = _take(state, "visual.ln_pre.bias", used)
    _map_tower(state, "transformer.resblocks.", "text_model.encoder.layers.", text_layers, out, used)
    _map_tower(state, "visual.transformer.resblocks.", "vision_model.encoder.layers.", vision_layers, out, used)
    unknown = sorted(set(state) - used - set(IGNORED_OPENAI_KEYS))
    if unknown:
        more = f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""
        raise CheckpointError(f"the CLIP state dict has keys the OpenAI ViT layout does not know: "
                              f"{', '.join(unknown[:5])}{more}")
    return config, out


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
    except (OSError, ValueError, KeyError, RuntimeError) as error:
        raise CheckpointError(f"cannot load the CLIP model in {path}: {error}") from None
    missing = sorted(info.get("missing_keys", []))
    if missing:
        raise CheckpointError(f"CLIP directory {path}: the weights lack {len(missing)} tensors "
                              f"(e.g. {', '.join(missing[:3])})")
    return model.float()


# ------------------------------------------------------------------------------------------------ teacher
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
