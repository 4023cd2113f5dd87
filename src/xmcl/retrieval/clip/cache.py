"""The CLIP feature cache: a frozen CLIP's global image and caption embeddings, computed once.

Layout of a cache folder::

    manifest.json          {"format", "checkpoint", "checkpoint_sha256", "activation", "dim", "dtype",
                            "shard_size", "splits": {name: {"num_images", "num_captions", "image_shards", "text_shards",
                                              "complete", "corpus"}}}
    {split}/keys.json      {"image_ids", "caption_image", "image_digest"}: what each row is
    {split}/images_00000.npy, ...   float16 (<= shard_size, dim) unit embeddings of the split's images, in order
    {split}/texts_00000.npy, ...    the same for its captions

Image rows are keyed by image id, caption rows by (image id, k) = the k-th caption of that image; the digest of
each image's captions tells a cache built from another corpus with the same ids. Building is resumable: shards
are written atomically one by one and the manifest, rewritten after each, records how many are done; a second
process building into the same folder is refused at once (``xmcl.runtime.lock``). A cache is refused
(``CheckpointError``) when its checkpoint hash is not the CLIP's asked for (stale), when a split's images or
captions differ from the corpus, or when its embedding width is not the model's ``clip_dim``.

``corpus`` is the absolute path of the raw corpus (Karpathy JSON) a split was built from. At evaluation, images the
cache lacks are encoded by the CLIP teacher from their files: a raw-image split names them; for a split of region
features (``xmcl features`` keeps the corpus' image ids and captions), each is found by id in the split of the same
name of a corpus the cache records, its captions checked against the features' (``raw_image_files``).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from xmcl.data.corpus import CaptionSplit
from xmcl.data.open import open_split
from xmcl.errors import CheckpointError, ConfigError, DataError
from xmcl.retrieval.clip.preprocess import ClipImagePreprocess
from xmcl.retrieval.clip.teacher import CLIPTeacher, checkpoint_sha256, load_clip_teacher
from xmcl.retrieval.config import RetrievalModelConfig
from xmcl.runtime.device import resolve_device
from xmcl.runtime.files import atomic_save_npy, atomic_write_json
from xmcl.runtime.lock import RunLock

CACHE_FORMAT = "xmcl-clip-cache/1"
MANIFEST = "manifest.json"
MANIFEST_KEYS = ("checkpoint_sha256", "activation", "dim", "shard_size", "splits")


def image_digests(split: CaptionSplit) -> list[str]:
    """Per image, a short hash of its captions in order (whitespace-normalised, newline-joined)."""
    digests = []
    for captions in _captions_of_images(split.caption_image, split.num_images):
        text = "\n".join(" ".join(split.captions[m].split()) for m in captions)
        digests.append(hashlib.blake2b(text.encode("utf-8"), digest_size=8).hexdigest())
    return digests


def _captions_of_images(caption_image: np.ndarray, num_images: int) -> list[np.ndarray]:
    """For each image, the indices of its captions in caption order."""
    order = np.argsort(caption_image, kind="stable")
    bounds = np.searchsorted(caption_image[order], np.arange(num_images + 1))
    return [order[bounds[n]: bounds[n + 1]] for n in range(num_images)]


def _split_keys(split: CaptionSplit) -> dict:
    return {"image_ids": list(split.image_ids), "caption_image": split.caption_image.tolist(),
            "image_digest": image_digests(split)}


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path} does not exist") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{path} cannot be read: {error}") from None


def _read_manifest(directory: Path) -> dict:
    manifest = _read_json(directory / MANIFEST)
    if manifest.get("format") != CACHE_FORMAT:
        raise CheckpointError(f"{directory / MANIFEST} is not a CLIP cache manifest "
                              f"(format {manifest.get('format')!r})")
    missing = [key for key in MANIFEST_KEYS if key not in manifest]
    if missing:
        raise CheckpointError(f"{directory / MANIFEST} lacks {missing}; rebuild the cache with `xmcl clip-cache`")
    return manifest


def _stale(directory: Path, cached: str, wanted: str, wanted_from: str) -> CheckpointError:
    return CheckpointError(f"the CLIP cache {directory} is stale: it was computed with checkpoint sha256 "
                           f"{cached[:12]}..., but {wanted_from} has {wanted[:12]}...; rebuild it with "
                           f"`xmcl clip-cache` into a new folder")


# ------------------------------------------------------------------------------------------------ building
class _Pixels(Dataset):
    def __init__(self, paths: Sequence[Path], preprocess: ClipImagePreprocess) -> None:
        self.paths, self.preprocess = paths, preprocess

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.preprocess(self.paths[index])


def _shard_rows(total: int, shard_size: int, shard: int) -> slice:
    return slice(shard * shard_size, min(total, (shard + 1) * shard_size))


def build_clip_cache(clip: Path | str, data: Path | str, out: Path | str, splits: Sequence[str] = ("train", "val"),
                     batch_size: int = 64, shard_size: int = 1024, device: str = "auto", num_workers: int = 0,
                     activation: str = "quick_gelu", progress: bool = True) -> Path:
    """Compute (or finish) the cache of ``splits`` of the corpus ``data`` with the CLIP at ``clip``; return the
    manifest's path. A rerun skips finished shards; a cache of another checkpoint or corpus is refused. An
    existing cache keeps its own shard size and activation (``activation``: see ``load_clip_teacher``; kept in
    the manifest so that images the cache lacks are later encoded alike)."""
    out = Path(out)
    if shard_size < 1 or batch_size < 1:
        raise ConfigError(f"shard_size and batch_size must be positive, got {shard_size} and {batch_size}")
    with RunLock(out, "CLIP cache folder"):
        return _build_cache(clip, data, out, splits, batch_size, shard_size, device, num_workers, activation,
                            progress)


def _build_cache(clip: Path | str, data: Path | str, out: Path, splits: Sequence[str], batch_size: int,
                 shard_size: int, device: str, num_workers: int, activation: str, progress: bool) -> Path:
    if (out / MANIFEST).exists():
        manifest = _read_manifest(out)
        teacher = load_clip_teacher(clip, resolve_device(device), activation=manifest["activation"])
        if manifest["checkpoint_sha256"] != teacher.sha256:
            raise _stale(out, manifest["checkpoint_sha256"], teacher.sha256, str(clip))
    else:
        teacher = load_clip_teacher(clip, resolve_device(device), activation=activation)
        manifest = {"format": CACHE_FORMAT, "checkpoint": str(clip), "checkpoint_sha256": teacher.sha256,
                    "activation": activation, "dim": teacher.dim, "dtype": "float16", "shard_size": shard_size,
                    "splits": {}}
    for name in splits:
        split = open_split(data, name)
        if split.image_paths is None:
            raise DataError(f"{split.source} (split '{name}') holds region features; the CLIP cache needs the raw "
                            f"images (give the corpus folder or its dataset_*.json)")
        _build_split(teacher, split, name, out, manifest, batch_size, num_workers, progress)
    return out / MANIFEST


def _build_split(teacher: CLIPTeacher, split: CaptionSplit, name: str, out: Path, manifest: dict,
                 batch_size: int, num_workers: int, progress: bool) -> None:
    folder, keys, size = out / name, _split_keys(split), manifest["shard_size"]
    entry = manifest["splits"].get(name)
    if entry is not None and _read_json(folder / "keys.json") != keys:
        raise CheckpointError(f"the CLIP cache {out} holds a split '{name}' with other images or captions than "
                              f"{split.source}; use another output folder")
    if entry is None:
        atomic_write_json(folder / "keys.json", keys)
        entry = {"num_images": split.num_images, "num_captions": split.num_captions, "image_shards": 0,
                 "text_shards": 0, "complete": False, "corpus": str(Path(split.source).resolve())}
        manifest["splits"][name] = entry
        atomic_write_json(out / MANIFEST, manifest)
    jobs = (("image", "images", split.num_images), ("text", "texts", split.num_captions))
    done_rows = sum(min(total, entry[f"{kind}_shards"] * size) for kind, _, total in jobs)
    total_rows = split.num_images + split.num_captions
    with tqdm(total=total_rows, initial=done_rows, unit="item", desc=f"clip-cache {name}",
              disable=not progress) as bar:
        for kind, stem, total in jobs:
            for shard in range(entry[f"{kind}_shards"], math.ceil(total / size)):
                rows = _shard_rows(total, size, shard)
                if kind == "image":
                    loader = DataLoader(_Pixels(split.image_paths[rows], teacher.preprocess), batch_size=batch_size,
                                        num_workers=num_workers)
                    embeddings = torch.cat([teacher.encode_pixels(pixels).cpu() for pixels in loader])
                else:
                    embeddings = teacher.encode_texts(split.captions[rows], batch_size).cpu()
                atomic_save_npy(folder / f"{stem}_{shard:05d}.npy", embeddings.numpy().astype(np.float16))
                entry[f"{kind}_shards"] = shard + 1
                atomic_write_json(out / MANIFEST, manifest)
                bar.update(rows.stop - rows.start)
    entry["complete"] = True
    atomic_write_json(out / MANIFEST, manifest)


# ------------------------------------------------------------------------------------------------ reading
@dataclass
class CacheLookup:
    """Embeddings aligned with a split (float32; rows not found are zero) and which rows were found."""

    image: np.ndarray
    image_found: np.ndarray
    text: np.ndarray
    text_found: np.ndarray

    @classmethod
    def empty(cls, split: CaptionSplit, dim: int) -> "CacheLookup":
        """Nothing found: zero rows for every image and caption of ``split``."""
        return cls(np.zeros((split.num_images, dim), np.float32), np.zeros(split.num_images, bool),
                   np.zeros((split.num_captions, dim), np.float32), np.zeros(split.num_captions, bool))


class ClipCache:
    """A finished-or-not cache folder, read only. ``open`` refuses a stale or mismatched cache."""

    def __init__(self, directory: Path, manifest: dict) -> None:
        self.directory, self.manifest = directory, manifest
        self.sha256: str = manifest["checkpoint_sha256"]
        self.dim: int = int(manifest["dim"])
        self.complete_splits = [name for name, entry in manifest["splits"].items() if entry["complete"]]

    @classmethod
    def open(cls, directory: Path | str, expected_sha256: str | None = None, expected_from: str = "",
             expected_dim: int | None = None) -> "ClipCache":
        """The cache at ``directory``; ``CheckpointError`` if its checkpoint hash is not ``expected_sha256``
        (named by ``expected_from``), ``ConfigError`` if its width is not ``expected_dim``."""
        directory = Path(directory)
        if not directory.is_dir():
            raise CheckpointError(f"CLIP cache {directory} does not exist; build it with `xmcl clip-cache`")
        cache = cls(directory, _read_manifest(directory))
        if expected_sha256 is not None and cache.sha256 != expected_sha256:
            raise _stale(directory, cache.sha256, expected_sha256, expected_from or "the expected checkpoint")
        if expected_dim is not None and cache.dim != expected_dim:
            raise ConfigError(f"model.clip_dim is {expected_dim}, but the CLIP cache {directory} holds {cache.dim}-d "
                              f"embeddings")
        return cache

    def _split_arrays(self, name: str, stem: str, shards: int) -> np.ndarray:
        parts = [np.load(self.directory / name / f"{stem}_{shard:05d}.npy", allow_pickle=False)
                 for shard in range(shards)]
        array = np.concatenate(parts) if parts else np.zeros((0, self.dim), np.float16)
        if array.ndim != 2 or array.shape[1] != self.dim:
            raise CheckpointError(f"CLIP cache {self.directory / name}: {stem} shards are {array.shape}, not (n, "
                                  f"{self.dim})")
        return array

    def lookup(self, split: CaptionSplit) -> CacheLookup:
        """The cached embeddings of ``split``'s images (by id) and captions (by id and rank within the image).

        ``CheckpointError`` if a cached image's captions differ from the split's (another corpus)."""
        found = CacheLookup.empty(split, self.dim)
        wanted = {image_id: n for n, image_id in enumerate(split.image_ids)}
        digests = image_digests(split)
        captions = _captions_of_images(split.caption_image, split.num_images)
        for name in self.complete_splits:
            keys = _read_json(self.directory / name / "keys.json")
            hits = [(row, wanted[i]) for row, i in enumerate(keys["image_ids"]) if i in wanted]
            if not hits:
                continue
            for row, n in hits:
                if keys["image_digest"][row] != digests[n]:
                    raise CheckpointError(f"the CLIP cache {self.directory} (split '{name}') holds image "
                                          f"'{split.image_ids[n]}' with other captions than {split.source}: it was "
                                          f"built from another corpus")
            entry = self.manifest["splits"][name]
            cached_image = self._split_arrays(name, "images", entry["image_shards"])
            cached_text = self._split_arrays(name, "texts", entry["text_shards"])
            cached_captions = _captions_of_images(np.asarray(keys["caption_image"]), len(keys["image_ids"]))
            rows, targets = np.array([h[0] for h in hits]), np.array([h[1] for h in hits])
            found.image[targets], found.image_found[targets] = cached_image[rows], True
            for row, n in hits:
                found.text[captions[n]] = cached_text[cached_captions[row]]
                found.text_found[captions[n]] = True
        return found

    def corpora(self) -> list[str]:
        """The raw corpora (Karpathy JSON paths) the cache's splits were built from, first seen first."""
        recorded = (entry.get("corpus") for entry in self.manifest["splits"].values())
        return list(dict.fromkeys(corpus for corpus in recorded if corpus))


def raw_image_files(split: CaptionSplit, rows: np.ndarray, corpora: Sequence[str]) -> list[Path]:
    """The image files of images ``rows`` of a region-feature ``split``: found by id in the split of the same name
    of the first of ``corpora`` (raw Karpathy corpora) that holds them all, their captions checked.

    ``CheckpointError`` if that corpus gives one of them other captions (the features come from another corpus);
    ``DataError`` naming every corpus tried when none holds them all."""
    tried = []
    for corpus in corpora:
        if not Path(corpus).exists():
            tried.append(f"{corpus} (not found)")
            continue
        try:
            raw = open_split(corpus, split.name)
        except DataError as error:
            tried.append(f"{corpus} ({error})")
            continue
        index = {image_id: n for n, image_id in enumerate(raw.image_ids)}
        absent = [split.image_ids[r] for r in rows if split.image_ids[r] not in index]
        if absent:
            tried.append(f"{corpus} (split '{split.name}' lacks image '{absent[0]}' and {len(absent) - 1} more)")
            continue
        raw_digests, digests = image_digests(raw), image_digests(split)
        for r in rows:
            if raw_digests[index[split.image_ids[r]]] != digests[r]:
                raise CheckpointError(f"{split.source} (split '{split.name}') gives image '{split.image_ids[r]}' "
                                      f"other captions than {corpus}: its features come from another corpus")
        return [raw.image_paths[index[split.image_ids[r]]] for r in rows]
    raise DataError(f"{split.source} (split '{split.name}') holds region features, and {len(rows)} of its images "
                    f"have no cached CLIP embedding: the CLIP teacher needs their raw images, looked for by id in the "
                    f"corpora the cache was built from: {'; '.join(tried) or 'none recorded'}; build their "
                    f"embeddings with `xmcl clip-cache --data RAW_IMAGE_CORPUS --split {split.name}`")


# ------------------------------------------------------------------------------------------------ guides
def _as_cached(embeddings: torch.Tensor) -> np.ndarray:
    """Rounded through float16 as the cache stores them, so a cache miss gives what a hit would."""
    return embeddings.cpu().numpy().astype(np.float16).astype(np.float32)


@dataclass
class SplitGuides:
    """CGE guides aligned with a split: ``image (N, c)`` / ``text (M, c)`` float32 (None when not needed) and
    the sha256 of the CLIP checkpoint they come from."""

    image: np.ndarray | None
    text: np.ndarray | None
    sha256: str | None


def split_guides(cfg: RetrievalModelConfig, split: CaptionSplit, device: torch.device | str = "cpu",
                 compute_missing: bool = False, trained_sha256: str | None = None) -> SplitGuides:
    """The CLIP embeddings the model of ``cfg`` needs for ``split`` (none when CGE is off).

    Read from ``cfg.clip_cache``; with ``cfg.clip_path`` the cache must come from that checkpoint. What the cache
    lacks is computed by the teacher when ``compute_missing`` (evaluation: new images), else refused (training).
    ``trained_sha256``: the checkpoint the model was trained with; any other is refused.
    """
    if not (cfg.cge or cfg.text_cge):
        return SplitGuides(None, None, None)
    if not cfg.clip_cache and not cfg.clip_path:
        raise ConfigError("model.cge / model.text_cge need model.clip_cache (from `xmcl clip-cache`) or "
                          "model.clip_path (a CLIP checkpoint)")
    teacher_sha = checkpoint_sha256(cfg.clip_path) if cfg.clip_path and Path(cfg.clip_path).exists() else None
    if cfg.clip_path and teacher_sha is None:
        raise CheckpointError(f"model.clip_path: CLIP checkpoint {cfg.clip_path} does not exist")
    if trained_sha256 and teacher_sha and teacher_sha != trained_sha256:
        raise CheckpointError(f"model.clip_path {cfg.clip_path} (sha256 {teacher_sha[:12]}...) is not the CLIP this "
                              f"model was trained with (sha256 {trained_sha256[:12]}...)")
    source_sha = teacher_sha or trained_sha256
    corpora: list[str] = []
    if cfg.clip_cache:
        cache = ClipCache.open(cfg.clip_cache, source_sha, cfg.clip_path or "the trained model's CLIP",
                               cfg.clip_dim)
        found, corpora = cache.lookup(split), cache.corpora()
        source_sha, activation = cache.sha256, cache.manifest["activation"]
    else:
        found, activation = CacheLookup.empty(split, cfg.clip_dim), "quick_gelu"
    missing_images = np.flatnonzero(~found.image_found) if cfg.cge else np.zeros(0, np.int64)
    missing_texts = np.flatnonzero(~found.text_found) if cfg.text_cge else np.zeros(0, np.int64)
    if missing_images.size or missing_texts.size:
        where = f"{split.source} (split '{split.name}')"
        if not compute_missing or not cfg.clip_path:
            raise CheckpointError(
                f"{missing_images.size} images and {missing_texts.size} captions of {where} have no CLIP embedding "
                f"in {cfg.clip_cache or 'any cache'}; build them with "
                f"`xmcl clip-cache --clip {cfg.clip_path or 'CLIP'} "
                f"--data {split.source if split.image_paths is not None else (corpora or ['RAW_IMAGE_CORPUS'])[0]} "
                f"--split {split.name} --out {cfg.clip_cache or 'FOLDER'}`")
        teacher = load_clip_teacher(cfg.clip_path, device, activation=activation)
        if teacher.dim != cfg.clip_dim:
            raise ConfigError(f"model.clip_dim is {cfg.clip_dim}, but the CLIP {cfg.clip_path} embeds in "
                              f"{teacher.dim} dimensions")
        if missing_images.size:
            if split.image_paths is None:
                paths = raw_image_files(split, missing_images, corpora)
            else:
                paths = [split.image_paths[n] for n in missing_images]
            found.image[missing_images] = _as_cached(teacher.encode_images(paths))
        if missing_texts.size:
            texts = [split.captions[m] for m in missing_texts]
            found.text[missing_texts] = _as_cached(teacher.encode_texts(texts))
        source_sha = teacher.sha256
    return SplitGuides(found.image if cfg.cge else None, found.text if cfg.text_cge else None, source_sha)
