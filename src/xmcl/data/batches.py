"""Readers -> batches: torch datasets over a ``CaptionSplit`` and the collate functions that pad them.

A training item is one caption with its image (raw pixels or region features) and its image index, which the
losses use to keep captions of the same image out of each other's negatives. Caption augmentation draws from a
generator seeded by (seed, epoch, caption index), so an epoch replays identically after a resume.
With CLIP-guided enhancement, items also carry ``clip_image`` (row n of an (N, c) array aligned with the split's
images) and ``clip_text`` (row m of an (M, c) array aligned with its captions), read from the CLIP cache.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor
from torch.nn.utils.rnn import pad_sequence
from torch.utils.data import Dataset

from xmcl.data.corpus import CaptionSplit
from xmcl.data.images import ImageTransform
from xmcl.data.text import TextTokenizer, collate_tokens
from xmcl.errors import DataError


def _image_item(split: CaptionSplit, image: int, transform: ImageTransform | None,
                generator: torch.Generator | None) -> dict[str, Tensor]:
    if split.region_features is not None:
        return {"regions": torch.from_numpy(np.array(split.region_features[image], dtype=np.float32))}
    if transform is None:
        raise ValueError(f"{split.source}: raw images need an image transform")
    return {"images": transform(split.image_paths[image], generator)}


def _text_item(split: CaptionSplit, caption: int, tokenizer: TextTokenizer,
               rng: np.random.Generator | None) -> dict[str, Any]:
    """``tokens`` of caption m and, when the split carries them, its cached ``token_features`` (n_tokens, H)."""
    tokens = tokenizer.encode(split.captions[caption], rng)
    item: dict[str, Any] = {"tokens": tokens}
    if split.token_features is not None:
        if rng is not None:
            raise DataError(f"{split.source} (split '{split.name}'): cached token features are of the captions as "
                            f"written; switch caption augmentation off (data.augment_captions=false)")
        item["token_features"] = float_rows(np.array(split.token_features[caption, :len(tokens)]))
    return item


def _text_items(split: CaptionSplit, tokenizer: TextTokenizer, captions: np.ndarray) -> list[dict[str, Any]]:
    """``_text_item(split, m, tokenizer, None)`` for each caption m of ``captions`` (int64), the cached token
    features read with one gather for the batch (converted up to its longest caption) instead of one read each."""
    items: list[dict[str, Any]] = [{"tokens": tokenizer.encode(split.captions[m], None)} for m in captions.tolist()]
    if split.token_features is not None:
        longest = max(len(item["tokens"]) for item in items)
        states = float_rows(split.token_features[captions, :longest])
        for row, item in enumerate(items):
            item["token_features"] = states[row, :len(item["tokens"])]
    return items


def float_rows(rows: np.ndarray) -> Tensor:
    """Rows copied out of stored features (so owned and writable) as a float32 tensor: half-precision caches are
    widened by torch, whose vectorised conversion took 0.2 ms for a batch's token states where numpy's cast took
    3.5 ms."""
    return torch.from_numpy(rows).float()


def _guide_rows(guides: np.ndarray | None, rows: int, what: str, split: CaptionSplit) -> np.ndarray | None:
    if guides is not None and (guides.ndim != 2 or guides.shape[0] != rows):
        raise DataError(f"{split.source} (split '{split.name}'): CLIP {what} embeddings of shape {guides.shape} do "
                        f"not give one row per {what} ({rows})")
    return guides


def _add_guides(item: dict[str, Any], image_guides: np.ndarray | None, image: int,
                text_guides: np.ndarray | None = None, caption: int = 0) -> dict[str, Any]:
    if image_guides is not None:
        item["clip_image"] = torch.from_numpy(np.asarray(image_guides[image], dtype=np.float32))
    if text_guides is not None:
        item["clip_text"] = torch.from_numpy(np.asarray(text_guides[caption], dtype=np.float32))
    return item


class CaptionPairs(Dataset):
    """Item m: caption m's tokens (augmented when ``augment_captions``), its image, and the image index; with
    ``clip_image`` (N, c) / ``clip_text`` (M, c), the CLIP embeddings of its image / caption."""

    def __init__(self, split: CaptionSplit, tokenizer: TextTokenizer, image_transform: ImageTransform | None = None,
                 augment_captions: bool = False, seed: int = 0, clip_image: np.ndarray | None = None,
                 clip_text: np.ndarray | None = None) -> None:
        self.split, self.tokenizer, self.transform = split, tokenizer, image_transform
        self.augment_captions, self.seed, self.epoch = augment_captions, seed, 0
        self.clip_image = _guide_rows(clip_image, split.num_images, "image", split)
        self.clip_text = _guide_rows(clip_text, split.num_captions, "caption", split)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.split.num_captions

    def __getitem__(self, caption: int) -> dict[str, Any]:
        image = int(self.split.caption_image[caption])
        rng = np.random.default_rng([self.seed, self.epoch, caption]) if self.augment_captions else None
        generator = None
        if self.split.region_features is None:  # only raw images are augmented
            image_seed = int(np.random.SeedSequence([self.seed, self.epoch, caption]).generate_state(1)[0])
            generator = torch.Generator().manual_seed(image_seed)
        item = _image_item(self.split, image, self.transform, generator)
        item.update(_text_item(self.split, caption, self.tokenizer, rng))
        item["image_id"] = image
        return _add_guides(item, self.clip_image, image, self.clip_text, caption)

    def __getitems__(self, captions: Sequence[int]) -> list[dict[str, Any]]:
        """The items of ``captions``, equal to ``[self[m] for m in captions]``; on a region-feature split without
        caption augmentation the region and cached token features are read with one gather per batch (the
        DataLoader calls this with a whole batch), not one read per item."""
        if self.split.region_features is None or self.augment_captions:
            return [self[int(m)] for m in captions]
        captions = np.asarray(captions, dtype=np.int64)
        images = self.split.caption_image[captions]
        regions = float_rows(self.split.region_features[images])  # one gather
        items = _text_items(self.split, self.tokenizer, captions)
        for row, (item, caption, image) in enumerate(zip(items, captions.tolist(), images.tolist())):
            item["regions"] = regions[row]
            item["image_id"] = image
            _add_guides(item, self.clip_image, image, self.clip_text, caption)
        return items


class SplitImages(Dataset):
    """Item n: image n (no augmentation), for encoding a split's images once each; its CLIP embedding too when
    ``clip_image`` (N, c) is given."""

    def __init__(self, split: CaptionSplit, image_transform: ImageTransform | None = None,
                 clip_image: np.ndarray | None = None) -> None:
        self.split, self.transform = split, image_transform
        self.clip_image = _guide_rows(clip_image, split.num_images, "image", split)

    def __len__(self) -> int:
        return self.split.num_images

    def __getitem__(self, image: int) -> dict[str, Any]:
        return _add_guides(_image_item(self.split, image, self.transform, None), self.clip_image, image)

    def __getitems__(self, images: Sequence[int]) -> list[dict[str, Any]]:
        """The items of ``images``, equal to ``[self[n] for n in images]`` (region features read with one gather)."""
        if self.split.region_features is None:
            return [self[int(n)] for n in images]
        regions = float_rows(self.split.region_features[np.asarray(images, dtype=np.int64)])
        return [_add_guides({"regions": rows}, self.clip_image, int(n)) for rows, n in zip(regions, images)]


class SplitCaptions(Dataset):
    """Item m: caption m's tokens (no augmentation), for encoding a split's captions; its CLIP embedding too
    when ``clip_text`` (M, c) is given."""

    def __init__(self, split: CaptionSplit, tokenizer: TextTokenizer, clip_text: np.ndarray | None = None) -> None:
        self.split, self.tokenizer = split, tokenizer
        self.clip_text = _guide_rows(clip_text, split.num_captions, "caption", split)

    def __len__(self) -> int:
        return self.split.num_captions

    def __getitem__(self, caption: int) -> dict[str, Any]:
        item = _text_item(self.split, caption, self.tokenizer, None)
        return _add_guides(item, None, 0, self.clip_text, caption)

    def __getitems__(self, captions: Sequence[int]) -> list[dict[str, Any]]:
        """The items of ``captions``, equal to ``[self[m] for m in captions]`` (token features read with one gather)."""
        captions = np.asarray(captions, dtype=np.int64)
        items = _text_items(self.split, self.tokenizer, captions)
        return [_add_guides(item, None, 0, self.clip_text, caption) for item, caption in zip(items, captions.tolist())]


def pad_regions(regions: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """Stack (R_i, D) region sets into (B, R_max, D) zero-padded, with lengths (B,)."""
    counts = [r.shape[0] for r in regions]
    lengths = torch.tensor(counts, dtype=torch.long)
    if min(counts) == max(counts):  # complete grids: one stack, no padding
        return torch.stack(list(regions)), lengths
    return pad_sequence(list(regions), batch_first=True), lengths  # zero-padded, the row loop in C++


class Collate:
    """Items -> batch dict: ``images`` (B, 3, H, W) or ``regions`` + ``region_lengths``; ``tokens`` +
    ``token_lengths`` (padded with ``pad_id``), ``token_features`` (B, L, H) zero-padded when the items carry them;
    ``image_ids`` (B,), ``clip_image`` and ``clip_text`` (B, c)
    when the items carry them."""

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, Tensor]:
        batch: dict[str, Tensor] = {}
        first = items[0]
        if "images" in first:
            batch["images"] = torch.stack([it["images"] for it in items])
        if "regions" in first:
            batch["regions"], batch["region_lengths"] = pad_regions([it["regions"] for it in items])
        if "tokens" in first:
            batch["tokens"], batch["token_lengths"] = collate_tokens([it["tokens"] for it in items], self.pad_id)
        if "token_features" in first:
            batch["token_features"], _ = pad_regions([it["token_features"] for it in items])
        if "image_id" in first:
            batch["image_ids"] = torch.tensor([it["image_id"] for it in items], dtype=torch.long)
        for key in ("clip_image", "clip_text"):
            if key in first:
                batch[key] = torch.stack([it[key] for it in items])
        return batch
