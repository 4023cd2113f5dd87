"""The one in-memory form every image-caption reader returns and every consumer takes."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from xmcl.errors import DataError


@dataclass
class CaptionSplit:
    """One split of an image-caption corpus.

    Images are indexed 0..N-1 (``image_ids[n]`` is a stable id), captions 0..M-1, and
    ``caption_image[m]`` is the index of the image caption ``m`` describes. Any number of
    captions per image is allowed (at least one). Exactly one image source is set:
    ``image_paths`` (raw photos) or ``region_features`` (N x R x D, possibly memory-mapped). ``token_features``
    (M x L x H, optional, possibly memory-mapped): a frozen text model's cached token states of each caption.
    """

    name: str
    source: str
    image_ids: list[str]
    captions: list[str]
    caption_image: np.ndarray
    image_paths: list[Path] | None = None
    region_features: np.ndarray | None = None
    extra: dict = field(default_factory=dict)
    token_features: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.caption_image = np.asarray(self.caption_image, dtype=np.int64)
        where = f"{self.source} (split '{self.name}')"
        if not self.image_ids:
            raise DataError(f"{where}: the split is empty (no images)")
        if not self.captions:
            raise DataError(f"{where}: the split has no captions")
        if self.caption_image.shape != (len(self.captions),):
            raise DataError(
                f"{where}: {len(self.captions)} captions but {self.caption_image.shape[0]} caption-to-image entries"
            )
        bad = (self.caption_image < 0) | (self.caption_image >= len(self.image_ids))
        if bad.any():
            m = int(np.flatnonzero(bad)[0])
            raise DataError(f"{where}: caption {m} refers to image {int(self.caption_image[m])}, "
                            f"but there are {len(self.image_ids)} images")
        counts = np.bincount(self.caption_image, minlength=len(self.image_ids))
        if (counts == 0).any():
            n = int(np.flatnonzero(counts == 0)[0])
            raise DataError(f"{where}: image '{self.image_ids[n]}' has no caption")
        if (self.image_paths is None) == (self.region_features is None):
            raise DataError(f"{where}: exactly one of image paths or region features must be given")
        n_source = len(self.image_paths) if self.image_paths is not None else self.region_features.shape[0]
        if n_source != len(self.image_ids):
            raise DataError(f"{where}: {len(self.image_ids)} image ids but {n_source} images")
        if self.token_features is not None and self.token_features.shape[0] != len(self.captions):
            raise DataError(f"{where}: {len(self.captions)} captions but {self.token_features.shape[0]} rows of "
                            f"token features")

    @property
    def num_images(self) -> int:
        return len(self.image_ids)

    @property
    def num_captions(self) -> int:
        return len(self.captions)

    def subset(self, image_indices: np.ndarray | list[int]) -> "CaptionSplit":
        """The split restricted to the given images (in that order) and their captions."""
        image_indices = np.asarray(image_indices, dtype=np.int64)
        new_index = np.full(self.num_images, -1, dtype=np.int64)
        new_index[image_indices] = np.arange(len(image_indices))
        keep = np.flatnonzero(new_index[self.caption_image] >= 0)
        return CaptionSplit(
            name=self.name,
            source=self.source,
            image_ids=[self.image_ids[i] for i in image_indices],
            captions=[self.captions[m] for m in keep],
            caption_image=new_index[self.caption_image[keep]],
            image_paths=None if self.image_paths is None else [self.image_paths[i] for i in image_indices],
            region_features=None if self.region_features is None else self.region_features[image_indices],
            extra=dict(self.extra),
            token_features=None if self.token_features is None else self.token_features[keep],
        )
