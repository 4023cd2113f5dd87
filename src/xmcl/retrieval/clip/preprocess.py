"""CLIP's image preprocessing, written out (no torchvision)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from xmcl.data.images import CLIP, open_image
from xmcl.errors import ConfigError, DataError


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

