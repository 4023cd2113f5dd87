"""What ST-SLidR trains on: the scans of a split, their per-step inputs, the scan order, and the point augmentation.

Per scan, what never changes is computed once (``camera_inputs``): each camera's image, its SLIC superpixels
(disk-cached) and the point-pixel pairs. A step's inputs (``PreparedScene``) add the frozen backbone's map of each
image and, for the tolerant loss, the per-superpixel mean z of the upsampled map (``upsampled_superpixel_means``,
without forming the upsampled map). Without image augmentation they are fixed and ``DistillInputs`` keeps them;
with the authors' mixed augmentations (``xmcl.distill.augment``) the images, superpixels and pairs change every step,
so the backbone maps and z are recomputed for the augmented images (the fixed part stays cached). The scans of step
``s`` (``batch_indices``) and its augmentations are drawn from generators seeded by ``(seed, purpose, s)``, so a run
that resumes at step ``s`` sees the same batches as one that never stopped.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor
from tqdm import tqdm

from xmcl.distill.augment import CameraInputs, augment_points, augment_scan
from xmcl.distill.config import AugmentationConfig, DistillDataConfig, VoxelConfig
from xmcl.distill.geometry import point_pixel_pairs
from xmcl.distill.image_head import ImageFeatureHead
from xmcl.distill.pooling import upsampled_superpixel_means
from xmcl.distill.readers.sources import open_scans
from xmcl.distill.scene import Scene
from xmcl.distill.superpixels import SuperpixelCache
from xmcl.distill.voxel_net import voxelize_clouds
from xmcl.errors import ConfigError
from xmcl.nn.sparse_conv import VoxelBatch
from xmcl.runtime.rng import seeded_generator

MIXED_AUGMENTATION_STREAM = 3  # purpose id of the generator of a step's mixed (points + images) augmentation


def load_scenes(data: DistillDataConfig, split: str) -> list[Scene]:
    """All scans of ``split`` ("pretrain", "probe_train" or "eval") in memory (small sets: the built-in scenes)."""
    scans = open_scans(data, split)
    return [scans[i] for i in range(len(scans))]


def scene_points(scene: Scene, device: torch.device) -> Tensor:
    """The scene's points (N, 4: x, y, z, intensity) as a tensor on ``device``."""
    return torch.from_numpy(scene.points).to(device)


def voxelize_scenes(clouds: list[Tensor], cfg: VoxelConfig, generator: torch.Generator | None) -> VoxelBatch:
    """Voxelise clouds together; with a ``generator``, each is first augmented as the authors' cloud transforms
    (``augment_points``: rotation about z, x and y flips)."""
    if generator is not None:
        clouds = [torch.cat([augment_points(c[:, :3], generator), c[:, 3:]], dim=1) for c in clouds]
    return voxelize_clouds(clouds, cfg.voxel_size, cfg.coordinates, cfg.angular_resolution_deg)


@dataclass
class PreparedScene:
    """The inputs of one scan at one step (on the training device).

    ``pair_point``/``pair_pixel`` (Q,): projected point and its flat pixel index over the scan's images
    (camera-major, row-major); ``pixel_superpixel`` (M,): scan-local superpixel id of each flat pixel;
    ``backbone_maps``: per camera (1, C, h, w); ``semantic`` (S, C) mean upsampled backbone feature of each
    superpixel, or None when the loss does not use it.
    """

    points: Tensor
    pair_point: Tensor
    pair_pixel: Tensor
    pixel_superpixel: Tensor
    backbone_maps: list[Tensor]
    image_sizes: list[tuple[int, int]]
    semantic: Tensor | None

    @property
    def num_superpixels(self) -> int:
        return int(self.pixel_superpixel.max()) + 1


def camera_inputs(scene: Scene, superpixels: SuperpixelCache, device: torch.device) -> list[CameraInputs]:
    """Each camera's image, SLIC superpixels and point-pixel pairs (the fixed part of a scan's inputs)."""
    cams = []
    for camera, (idx, uv) in zip(scene.cameras, point_pixel_pairs(scene)):
        cams.append(CameraInputs(
            image=torch.tensor(camera.image, device=device),  # a copy: decoded images can be read-only
            superpixels=torch.from_numpy(superpixels(camera.image)).long().to(device),
            pair_point=torch.from_numpy(idx).to(device),
            pair_row=torch.from_numpy(uv[:, 1]).to(device),
            pair_col=torch.from_numpy(uv[:, 0]).to(device)))
    return cams


def _compact(superpixels: Tensor) -> tuple[Tensor, int]:
    """Ids renumbered 0..S-1 in increasing order (a crop leaves some ids out), and S."""
    ids, inverse = torch.unique(superpixels, return_inverse=True)
    return inverse.reshape(superpixels.shape), int(ids.shape[0])


def _backbone_maps(head: ImageFeatureHead, cams: list[CameraInputs]) -> list[Tensor]:
    """(1, C, h, w) per camera; cameras of one size go through the backbone as one batch."""
    if len({cam.size for cam in cams}) == 1:
        maps = head.backbone_map(torch.stack([cam.image for cam in cams]))
        return [maps[i:i + 1] for i in range(len(cams))]
    return [head.backbone_map(cam.image[None]) for cam in cams]


def prepare_cameras(points: Tensor, cams: list[CameraInputs], head: ImageFeatureHead,
                    with_semantic: bool) -> PreparedScene:
    """A step's inputs from the scan's points and (possibly augmented) cameras."""
    pair_point, pair_pixel, pixel_sp, sizes, semantic = [], [], [], [], []
    maps = _backbone_maps(head, cams)
    pixel_offset = sp_offset = 0
    for cam, backbone_map in zip(cams, maps):
        height, width = cam.size
        sp, count = _compact(cam.superpixels)
        pair_point.append(cam.pair_point)
        pair_pixel.append(pixel_offset + cam.pair_row * width + cam.pair_col)
        pixel_sp.append(sp.reshape(-1) + sp_offset)
        sizes.append((height, width))
        if with_semantic:
            semantic.append(upsampled_superpixel_means(backbone_map[0], sp, count))
        pixel_offset += height * width
        sp_offset += count
    return PreparedScene(points=points, pair_point=torch.cat(pair_point), pair_pixel=torch.cat(pair_pixel),
                         pixel_superpixel=torch.cat(pixel_sp), backbone_maps=maps, image_sizes=sizes,
                         semantic=torch.cat(semantic) if with_semantic else None)


def prepare_scene(scene: Scene, head: ImageFeatureHead, superpixels: SuperpixelCache, device: torch.device,
                  with_semantic: bool) -> PreparedScene:
    """Pairs, superpixels, frozen backbone maps and (optionally) per-superpixel z of one scan, not augmented."""
    return prepare_cameras(scene_points(scene, device), camera_inputs(scene, superpixels, device), head,
                           with_semantic)


class DistillInputs:
    """The per-step inputs of pretraining over ``scans``: ``inputs.batch(indices, step)``.

    ``augmentation`` None or without a mixed augmentation: each scan's ``PreparedScene`` is fixed (computed once
    and, when ``keep_in_memory``, kept). Otherwise step ``step``'s scans are augmented (``augment_scan``, generator
    ``(seed, MIXED_AUGMENTATION_STREAM, step)``) and their backbone maps recomputed; the fixed camera inputs are
    kept when ``keep_in_memory`` (else each scan is read again, its superpixels from the disk cache).
    """

    def __init__(self, scans: Sequence[Scene], head: ImageFeatureHead, superpixels: SuperpixelCache,
                 device: torch.device, with_semantic: bool, augmentation: AugmentationConfig | None, seed: int,
                 keep_in_memory: bool) -> None:
        self.scans = scans
        self.head = head
        self.superpixels = superpixels
        self.device = device
        self.with_semantic = with_semantic
        self.augmentation = augmentation if augmentation is not None and augmentation.mixes_images else None
        self.seed = seed
        self.keep_in_memory = keep_in_memory
        self._fixed: dict[int, tuple[Tensor, list[CameraInputs]]] = {}
        self._prepared: dict[int, PreparedScene] = {}

    def __len__(self) -> int:
        return len(self.scans)

    def fixed_inputs(self, index: int) -> tuple[Tensor, list[CameraInputs]]:
        """Scan ``index``'s points and un-augmented camera inputs (kept when ``keep_in_memory``)."""
        if index in self._fixed:
            return self._fixed[index]
        scene = self.scans[index]
        fixed = (scene_points(scene, self.device), camera_inputs(scene, self.superpixels, self.device))
        if self.keep_in_memory:
            self._fixed[index] = fixed
        return fixed

    def _unaugmented(self, index: int) -> PreparedScene:
        if index in self._prepared:
            return self._prepared[index]
        points, cams = self.fixed_inputs(index)
        prepared = prepare_cameras(points, cams, self.head, self.with_semantic)
        if self.keep_in_memory:
            self._prepared[index] = prepared
        return prepared

    def warm(self, progress: bool) -> None:
        """Compute (and keep) the fixed part of every scan now, behind a progress bar (``keep_in_memory`` only)."""
        if not self.keep_in_memory:
            return
        for index in tqdm(range(len(self.scans)), desc="preparing scans", disable=not progress):
            if self.augmentation is None:
                self._unaugmented(index)
            else:
                self.fixed_inputs(index)

    def batch(self, indices: list[int], step: int, rank: int = 0) -> list[PreparedScene]:
        """The inputs of step ``step``'s scans; ``rank`` > 0 (a data-parallel rank) draws its augmentation from a
        stream of its own, ``(seed, MIXED_AUGMENTATION_STREAM, step, rank)``, so no two ranks augment alike."""
        if self.augmentation is None:
            return [self._unaugmented(i) for i in indices]
        generator = seeded_generator(self.seed, MIXED_AUGMENTATION_STREAM, step, *([rank] if rank else []))
        out = []
        for index in indices:
            points, cams = augment_scan(*self.fixed_inputs(index), self.augmentation, generator)
            out.append(prepare_cameras(points, cams, self.head, self.with_semantic))
        return out


def batch_indices(num_scenes: int, batch_scenes: int, seed: int, step: int) -> list[int]:
    """Scenes of step ``step``: consecutive slices of a permutation drawn per epoch (the last partial slice of an
    epoch is dropped)."""
    if not 1 <= batch_scenes <= num_scenes:
        raise ConfigError(f"optim.batch_scenes must be in [1, {num_scenes}] (the number of scenes), got "
                          f"{batch_scenes}")
    per_epoch = num_scenes // batch_scenes
    epoch, position = divmod(step, per_epoch)
    order = torch.randperm(num_scenes, generator=seeded_generator(seed, 1, epoch))
    return order[position * batch_scenes:(position + 1) * batch_scenes].tolist()
