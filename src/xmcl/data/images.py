"""Image loading and preprocessing with PIL and numpy (no torchvision).

``load_image`` decodes a file to a uint8 H x W x 3 RGB array. ``ImageTransform`` turns a file, PIL image or
uint8 array into a float tensor (3, H, W) = (pixel - mean) / std on the 0-255 scale: at evaluation the largest
centred square is resized to ``size``; at training time a random resized crop (area fraction in ``scale``,
aspect ratio log-uniform in ``ratio``) and, if ``hflip``, a horizontal flip with probability 1/2 (off by
default: a flip turns "left of" into "right of", which captions such as the shapes world's describe).
Randomness comes from a ``torch.Generator`` if given, else torch's global one (DataLoader seeds it per worker).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from xmcl.errors import ConfigError, DataError


@dataclass(frozen=True)
class Normalization:
    """Per-channel ``mean`` and ``std`` on the 0-255 pixel scale: x -> (x - mean) / std."""

    mean: tuple[float, float, float]
    std: tuple[float, float, float]


IMAGENET = Normalization(mean=(123.675, 116.28, 103.53), std=(58.395, 57.12, 57.375))
CLIP = Normalization(mean=(122.770938, 116.7460125, 104.09373615), std=(68.5005327, 66.6321579, 70.32316305))
EFFICIENTNET_LITE = Normalization(mean=(127.0, 127.0, 127.0), std=(128.0, 128.0, 128.0))
NORMALIZATIONS = {"imagenet": IMAGENET, "clip": CLIP, "efficientnet_lite": EFFICIENTNET_LITE}


def open_image(path: Path | str) -> Image.Image:
    """The decoded image in RGB; ``DataError`` naming the file if it is missing or cannot be decoded."""
    try:
        with Image.open(path) as image:
            image.load()
            return image.convert("RGB")
    except FileNotFoundError:
        raise DataError(f"{path}: no such image file") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise DataError(f"{path}: cannot decode the image ({err})") from None


def _hw(size: int | tuple[int, int]) -> tuple[int, int]:
    height, width = (size, size) if isinstance(size, int) else size
    if height < 1 or width < 1:
        raise ConfigError(f"image size must be positive, got {size}")
    return int(height), int(width)


def load_image(path: Path | str, size: int | tuple[int, int] | None = None) -> np.ndarray:
    """uint8 array H x W x 3; resized (bicubic, aspect ratio not kept) to ``size`` = side or (height, width)."""
    image = open_image(path)
    if size is not None:
        height, width = _hw(size)
        image = image.resize((width, height), Image.Resampling.BICUBIC)
    return np.asarray(image, dtype=np.uint8)


class ImageTransform:
    """Image -> float32 tensor (3, H, W), normalised; optional training-time augmentation (module docstring)."""

    def __init__(self, size: int | tuple[int, int], normalization: Normalization | str = "imagenet", *,
                 train: bool = False, scale: tuple[float, float] = (0.5, 1.0),
                 ratio: tuple[float, float] = (3 / 4, 4 / 3), hflip: bool = False):
        if isinstance(normalization, str):
            if normalization not in NORMALIZATIONS:
                raise ConfigError(f"normalization must be one of {sorted(NORMALIZATIONS)}, got {normalization!r}")
            normalization = NORMALIZATIONS[normalization]
        if not 0.0 < scale[0] <= scale[1] <= 1.0:
            raise ConfigError(f"crop scale must satisfy 0 < low <= high <= 1, got {scale}")
        if not 0.0 < ratio[0] <= ratio[1]:
            raise ConfigError(f"crop ratio must satisfy 0 < low <= high, got {ratio}")
        self.height, self.width = _hw(size)
        self.train, self.scale, self.ratio, self.hflip = train, scale, ratio, hflip
        self.mean = torch.tensor(normalization.mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(normalization.std, dtype=torch.float32).view(3, 1, 1)

    def crop_box(self, width: int, height: int, generator: torch.Generator | None = None) -> tuple[int, int, int, int]:
        """(left, top, right, bottom) of the region resized to the output size."""
        if self.train:
            area = width * height
            log_low, log_high = math.log(self.ratio[0]), math.log(self.ratio[1])
            for _ in range(10):
                u = torch.rand(3, generator=generator).tolist()
                target = area * (self.scale[0] + u[0] * (self.scale[1] - self.scale[0]))
                aspect = math.exp(log_low + u[1] * (log_high - log_low))
                w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
                if 0 < w <= width and 0 < h <= height:
                    left = int(torch.randint(0, width - w + 1, (1,), generator=generator))
                    top = int(torch.randint(0, height - h + 1, (1,), generator=generator))
                    return left, top, left + w, top + h
        side = min(width, height)  # evaluation, or no random crop fitted: the largest centred square
        left, top = (width - side) // 2, (height - side) // 2
        return left, top, left + side, top + side

    def __call__(self, image: Image.Image | np.ndarray | Path | str,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        if isinstance(image, (str, Path)):
            image = open_image(image)
        elif isinstance(image, np.ndarray):
            if image.dtype != np.uint8:
                raise ValueError(f"expected a uint8 image array, got dtype {image.dtype}")
            image = Image.fromarray(image).convert("RGB")
        else:
            image = image.convert("RGB")
        box = self.crop_box(image.width, image.height, generator)
        image = image.resize((self.width, self.height), Image.Resampling.BICUBIC, box=box)
        pixels = np.array(image, dtype=np.uint8)  # a writable copy, as torch.from_numpy wants
        if self.train and self.hflip and bool(torch.rand(1, generator=generator) < 0.5):
            pixels = pixels[:, ::-1]
        tensor = torch.from_numpy(np.ascontiguousarray(pixels)).permute(2, 0, 1).float()
        return (tensor - self.mean) / self.std
