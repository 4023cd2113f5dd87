"""The authors' augmentations (SLidR / ST-SLidR ``utils/transforms.py``), written here for our tensors.

Points (pretraining and fine-tuning), ``augment_points``: rotation about z by an angle uniform in [0, 2 pi)
(``p @ R^T``, ``R = [[c, -s, 0], [s, c, 0], [0, 0, 1]]``), then x and y each negated with probability 1/2.

Points + images + pairs together (pretraining), on ``CameraInputs`` (one image, its superpixel map and its pairs
``(point, row, col)``), in the authors' order:

* ``drop_cuboids``: ``u ~ U[0, 0.2)``, half-extent ``h = u * (max - min) / 2`` per axis of the cloud, centre a random
  point ``c``; points with ``c - h < p < c + h`` on all three axes are removed and the pairs renumbered, unless an
  image would keep fewer than ``min_pairs`` pairs (then nothing is dropped, as theirs).
* ``resized_crop``: ``crop_box`` draws (top, left, height, width) as torchvision's ``RandomResizedCrop.get_params``
  (area share ``U(scale)``, aspect ratio w/h log-uniform in ``ratio``, 10 tries, then a centre crop); the crop is
  resized to ``crop_size`` (image: bilinear with antialiasing; superpixels: nearest pixel centre). A pair at pixel
  ``(r, c)`` moves to the output pixel holding the source pixel's centre, ``floor((r + 0.5 - top) * H' / height)``
  (theirs rounds ``(r - top) * H' / height``, up to half a source pixel off); pairs leaving the crop are dropped.
  The box is drawn again until more than ``min_pairs`` pairs or more than ``min_pair_share`` of them stay (theirs
  loops without bound; here at most ``MAX_CROP_DRAWS``, then the whole image is resized).
* ``flip_horizontal``: with probability 1/2 the image and superpixels are mirrored and ``c -> W - 1 - c``.

Every draw comes from the ``torch.Generator`` passed in, so a step's augmentation is reproducible.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor

from xmcl.distill.config import AugmentationConfig

MAX_CROP_DRAWS = 100
DROP_CUBOID_MAX_SHARE = 0.2


def _uniform(generator: torch.Generator, low: float = 0.0, high: float = 1.0) -> float:
    return low + (high - low) * float(torch.rand((), generator=generator))


def _randint(generator: torch.Generator, high: int) -> int:
    """Uniform integer in [0, high)."""
    return int(torch.randint(high, (), generator=generator))


def augment_points(xyz: Tensor, generator: torch.Generator) -> Tensor:
    """(P, 3) points rotated about z by a uniform angle, then x and y each negated with probability 1/2."""
    angle = _uniform(generator) * 2 * math.pi
    flip_x = -1.0 if _uniform(generator) < 0.5 else 1.0
    flip_y = -1.0 if _uniform(generator) < 0.5 else 1.0
    c, s = math.cos(angle), math.sin(angle)
    matrix = torch.tensor([[flip_x * c, -flip_x * s, 0.0], [flip_y * s, flip_y * c, 0.0], [0.0, 0.0, 1.0]],
                          dtype=xyz.dtype, device=xyz.device)  # diag(fx, fy, 1) @ R
    return xyz @ matrix.T


@dataclass
class CameraInputs:
    """One camera of a scan as the distillation sees it.

    ``image`` (H, W, 3) uint8 or 0..255 float; ``superpixels`` (H, W) int64 ids >= 0; ``pair_point`` (Q,) index of
    the projected point, ``pair_row`` / ``pair_col`` (Q,) its pixel.
    """

    image: Tensor
    superpixels: Tensor
    pair_point: Tensor
    pair_row: Tensor
    pair_col: Tensor

    @property
    def size(self) -> tuple[int, int]:
        return int(self.image.shape[0]), int(self.image.shape[1])

    @property
    def num_pairs(self) -> int:
        return int(self.pair_point.shape[0])


def drop_cuboid(points: Tensor, cameras: list[CameraInputs], min_pairs: int,
                generator: torch.Generator) -> tuple[Tensor, list[CameraInputs]]:
    """The authors' DropCuboids: remove the points of one random box (see the module docstring)."""
    xyz = points[:, :3]
    extent = xyz.max(0).values - xyz.min(0).values
    half = extent * (_uniform(generator) * DROP_CUBOID_MAX_SHARE) / 2.0
    centre = xyz[_randint(generator, xyz.shape[0])]
    inside = ((xyz < centre + half) & (xyz > centre - half)).all(dim=1)
    keep = ~inside
    new_index = torch.cumsum(keep.long(), 0) - 1
    moved = []
    for cam in cameras:
        kept = keep[cam.pair_point]
        if int(kept.sum()) < min_pairs:
            return points, cameras
        moved.append(replace(cam, pair_point=new_index[cam.pair_point[kept]], pair_row=cam.pair_row[kept],
                             pair_col=cam.pair_col[kept]))
    return points[keep], moved


def crop_box(height: int, width: int, scale: tuple[float, float], ratio: tuple[float, float],
             generator: torch.Generator) -> tuple[int, int, int, int]:
    """(top, left, crop height, crop width) as ``RandomResizedCrop.get_params``: area share ``U(scale)``, aspect
    w/h ``exp(U(log ratio))``, ten tries; otherwise the largest centred crop whose aspect lies in ``ratio``."""
    area = height * width
    log_low, log_high = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target = area * _uniform(generator, scale[0], scale[1])
        aspect = math.exp(_uniform(generator, log_low, log_high))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return _randint(generator, height - h + 1), _randint(generator, width - w + 1), h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        h, w = height, width
    return (height - h) // 2, (width - w) // 2, h, w


def _map_pairs(index: Tensor, start: int, length: int, out: int) -> Tensor:
    """Output pixel holding the centre of source pixel ``index`` for a crop [start, start + length) resized to
    ``out`` pixels (may fall outside [0, out))."""
    return torch.floor((index.double() + 0.5 - start) * out / length).long()


def resized_crop(cam: CameraInputs, box: tuple[int, int, int, int], size: tuple[int, int]) -> CameraInputs:
    """The camera cropped to ``box`` = (top, left, height, width) and resized to ``size``, pairs moved along."""
    top, left, h, w = box
    out_h, out_w = size
    region = cam.image[top:top + h, left:left + w].permute(2, 0, 1)[None].float()
    image = F.interpolate(region, size=size, mode="bilinear", align_corners=False, antialias=True)[0]
    rows = top + torch.floor((torch.arange(out_h, device=cam.image.device) + 0.5) * h / out_h).long()
    cols = left + torch.floor((torch.arange(out_w, device=cam.image.device) + 0.5) * w / out_w).long()
    superpixels = cam.superpixels[rows[:, None], cols[None, :]]
    new_row = _map_pairs(cam.pair_row, top, h, out_h)
    new_col = _map_pairs(cam.pair_col, left, w, out_w)
    inside = (new_row >= 0) & (new_row < out_h) & (new_col >= 0) & (new_col < out_w)
    return CameraInputs(image.permute(1, 2, 0).clamp(0.0, 255.0), superpixels, cam.pair_point[inside],
                        new_row[inside], new_col[inside])


def random_resized_crop(cam: CameraInputs, cfg: AugmentationConfig, generator: torch.Generator) -> CameraInputs:
    """``resized_crop`` with a box drawn until it keeps enough pairs (see the module docstring)."""
    height, width = cam.size
    size = (int(cfg.crop_size[0]), int(cfg.crop_size[1]))
    for _ in range(MAX_CROP_DRAWS):
        out = resized_crop(cam, crop_box(height, width, tuple(cfg.crop_scale), tuple(cfg.crop_ratio), generator),
                           size)
        if out.num_pairs > cfg.min_pairs or (cam.num_pairs and out.num_pairs / cam.num_pairs > cfg.min_pair_share):
            return out
    return resized_crop(cam, (0, 0, height, width), size)


def flip_horizontal(cam: CameraInputs) -> CameraInputs:
    """The camera mirrored left-right: image and superpixels flipped, ``col -> W - 1 - col``."""
    width = cam.size[1]
    return replace(cam, image=cam.image.flip(1), superpixels=cam.superpixels.flip(1),
                   pair_col=width - 1 - cam.pair_col)


def augment_scan(points: Tensor, cameras: list[CameraInputs], cfg: AugmentationConfig,
                 generator: torch.Generator) -> tuple[Tensor, list[CameraInputs]]:
    """DropCuboids, then per camera ResizedCrop and horizontal flip, as ``cfg`` enables them."""
    if cfg.drop_cuboids:
        points, cameras = drop_cuboid(points, cameras, cfg.min_pairs, generator)
    out = []
    for cam in cameras:
        if cfg.resized_crop:
            cam = random_resized_crop(cam, cfg, generator)
        if cfg.flip_horizontal and _uniform(generator) < 0.5:
            cam = flip_horizontal(cam)
        out.append(cam)
    return points, out
