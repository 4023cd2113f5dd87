"""What ST-SLidR trains on: the scenes of a split, their fixed per-scene inputs, the scene order, and the
point augmentation.

What does not change during training is computed once per scene (``prepare_scene``): the point-pixel pairs, the
superpixel maps (SLIC, disk-cached), the frozen backbone's feature maps and the per-superpixel z. The scenes of
step ``s`` (``batch_indices``) and its augmentation are drawn from generators seeded by ``(seed, purpose, s)``, so a
run that resumes at step ``s`` sees the same batches as one that never stopped.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from xmcl.distill.config import DistillDataConfig, VoxelConfig
from xmcl.distill.geometry import point_pixel_pairs
from xmcl.distill.image_head import ImageFeatureHead
from xmcl.distill.pooling import averaging_matrix
from xmcl.distill.scene import Scene
from xmcl.distill.superpixels import SuperpixelCache
from xmcl.distill.synthetic import SyntheticScenes
from xmcl.distill.voxel_net import VoxelBatch, voxelize_clouds
from xmcl.errors import ConfigError
from xmcl.runtime.rng import seeded_generator


def load_scenes(data: DistillDataConfig, split: str) -> list[Scene]:
    """The scenes of ``split``: "pretrain", "probe_train" (the first scenes of the pretraining set) or "eval"."""
    counts = {"pretrain": data.pretrain_scenes, "probe_train": data.probe_train_scenes, "eval": data.eval_scenes}
    if split not in counts:
        raise ConfigError(f"unknown scene split {split!r}; one of {sorted(counts)}")
    seed = data.seed + 1 if split == "eval" else data.seed
    scenes = SyntheticScenes(counts[split], seed=seed, num_points_target=data.num_points,
                             image_size=tuple(data.image_size), num_cameras=data.num_cameras)
    return [scenes[i] for i in range(len(scenes))]


def scene_points(scene: Scene, device: torch.device) -> Tensor:
    """The scene's points (N, 4: x, y, z, intensity) as a tensor on ``device``."""
    return torch.from_numpy(scene.points).to(device)


def voxelize_scenes(clouds: list[Tensor], cfg: VoxelConfig, generator: torch.Generator | None) -> VoxelBatch:
    """Voxelise clouds together; with a ``generator``, each is first rotated by a random angle about z and mirrored
    (y -> -y) with probability 1/2."""
    if generator is not None:
        moved = []
        for cloud in clouds:
            angle = float(torch.rand((), generator=generator)) * 2 * math.pi
            flip = -1.0 if float(torch.rand((), generator=generator)) < 0.5 else 1.0
            c, s = math.cos(angle), math.sin(angle)
            rot = torch.tensor([[c, -s, 0.0], [flip * s, flip * c, 0.0], [0.0, 0.0, 1.0]], device=cloud.device)
            moved.append(torch.cat([cloud[:, :3] @ rot.T, cloud[:, 3:]], dim=1))
        clouds = moved
    return voxelize_clouds(clouds, cfg.voxel_size, cfg.coordinates, cfg.angular_resolution_deg)


@dataclass
class PreparedScene:
    """The fixed, per-scene inputs of the distillation (on the training device).

    ``pair_point``/``pair_pixel`` (Q,): projected point and its flat pixel index over the scene's images
    (camera-major, row-major); ``pixel_superpixel`` (M,): scene-local superpixel id of each flat pixel;
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


def prepare_scene(scene: Scene, head: ImageFeatureHead, superpixels: SuperpixelCache, device: torch.device,
                  with_semantic: bool) -> PreparedScene:
    """Pairs, superpixels, frozen backbone maps and (optionally) per-superpixel z of one scene."""
    pair_point, pair_pixel, pixel_sp, maps, sizes, semantic = [], [], [], [], [], []
    pixel_offset = sp_offset = 0
    for camera, (idx, uv) in zip(scene.cameras, point_pixel_pairs(scene)):
        height, width = camera.image_hw
        sp = torch.from_numpy(superpixels(camera.image)).long().reshape(-1).to(device)
        pair_point.append(torch.from_numpy(idx))
        pair_pixel.append(torch.from_numpy(pixel_offset + uv[:, 1] * width + uv[:, 0]))
        pixel_sp.append(sp + sp_offset)
        backbone_map = head.backbone_map(torch.from_numpy(camera.image)[None].to(device))
        maps.append(backbone_map)
        sizes.append((height, width))
        if with_semantic:
            upsampled = head.semantic_features(backbone_map, (height, width))[0].flatten(1).T  # (H*W, C)
            n_sp = int(sp.max()) + 1
            cols = torch.arange(sp.shape[0], device=device)
            semantic.append(torch.sparse.mm(averaging_matrix(sp, cols, n_sp, sp.shape[0]), upsampled))
        pixel_offset += height * width
        sp_offset += int(sp.max()) + 1
    return PreparedScene(
        points=scene_points(scene, device),
        pair_point=torch.cat(pair_point).to(device),
        pair_pixel=torch.cat(pair_pixel).to(device),
        pixel_superpixel=torch.cat(pixel_sp),
        backbone_maps=maps,
        image_sizes=sizes,
        semantic=torch.cat(semantic) if with_semantic else None,
    )


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
