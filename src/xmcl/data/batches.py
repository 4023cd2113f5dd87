"""Readers -> batches: torch datasets over a ``CaptionSplit`` and the collate functions that pad them.

A training item is one caption with its image (raw pixels or region features) and its image index, which the
losses use to keep captions of the same image out of each other's negatives. Caption augmentation draws from a
generator seeded by (seed, epoch, caption index), so an epoch replays identically after a resume.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from xmcl.data.corpus import CaptionSplit
from xmcl.data.images import ImageTransform
from xmcl.data.text import TextTokenizer, collate_tokens


def _image_item(split: CaptionSplit, image: int, transform: ImageTransform | None,
                generator: torch.Generator | None) -> dict[str, Tensor]:
    if split.region_features is not None:
        return {"regions": torch.from_numpy(np.array(split.region_features[image], dtype=np.float32))}
    if transform is None:
        raise ValueError(f"{split.source}: raw images need an image transform")
    return {"images": transform(split.image_paths[image], generator)}


class CaptionPairs(Dataset):
    """Item m: caption m's tokens (augmented when ``augment_captions``), its image, and the image index."""

    def __init__(self, split: CaptionSplit, tokenizer: TextTokenizer, image_transform: ImageTransform | None = None,
                 augment_captions: bool = False, seed: int = 0) -> None:
        self.split, self.tokenizer, self.transform = split, tokenizer, image_transform
        self.augment_captions, self.seed, self.epoch = augment_captions, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.split.num_captions

    def __getitem__(self, caption: int) -> dict[str, Any]:
        image = int(self.split.caption_image[caption])
        rng = np.random.default_rng([self.seed, self.epoch, caption]) if self.augment_captions else None
        image_seed = int(np.random.SeedSequence([self.seed, self.epoch, caption]).generate_state(1)[0])
        generator = torch.Generator().manual_seed(image_seed)
        item = _image_item(self.split, image, self.transform, generator)
        item["tokens"] = self.tokenizer.encode(self.split.captions[caption], rng)
        item["image_id"] = image
        return item


class SplitImages(Dataset):
    """Item n: image n (no augmentation), for encoding a split's images once each."""

    def __init__(self, split: CaptionSplit, image_transform: ImageTransform | None = None) -> None:
        self.split, self.transform = split, image_transform

    def __len__(self) -> int:
        return self.split.num_images

    def __getitem__(self, image: int) -> dict[str, Any]:
        return _image_item(self.split, image, self.transform, None)


class SplitCaptions(Dataset):
    """Item m: caption m's tokens (no augmentation), for encoding a split's captions."""

    def __init__(self, split: CaptionSplit, tokenizer: TextTokenizer) -> None:
        self.split, self.tokenizer = split, tokenizer

    def __len__(self) -> int:
        return self.split.num_captions

    def __getitem__(self, caption: int) -> dict[str, Any]:
        return {"tokens": self.tokenizer.encode(self.split.captions[caption])}


def pad_regions(regions: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """Stack (R_i, D) region sets into (B, R_max, D) zero-padded, with lengths (B,)."""
    lengths = torch.tensor([r.shape[0] for r in regions], dtype=torch.long)
    out = regions[0].new_zeros((len(regions), int(lengths.max()), regions[0].shape[1]))
    for row, r in enumerate(regions):
        out[row, : r.shape[0]] = r
    return out, lengths


class Collate:
    """Items -> batch dict: ``images`` (B, 3, H, W) or ``regions`` + ``region_lengths``; ``tokens`` +
    ``token_lengths`` (padded with ``pad_id``); ``image_ids`` (B,) when the items carry them."""

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
        if "image_id" in first:
            batch["image_ids"] = torch.tensor([it["image_id"] for it in items], dtype=torch.long)
        return batch
