"""ST-SLidR pretraining: distil a frozen 2D backbone into the sparse-voxel 3D network by superpixel contrast.

Per batch of scenes: points -> ``VoxelUNet`` -> per-point features (unit norm); each camera image -> frozen backbone ->
1x1 head -> per-pixel features (unit norm); projected points are paired with their pixels; both sides are averaged
per SLIC superpixel (``pooling``); z = the superpixel mean of the frozen backbone features; the loss is
``xmcl.contrast.STSlidrLoss`` (SLidR, semantically tolerant, or tolerant + class-agnostic balancing).

What does not change during training is computed once per scene (``prepare_scene``): the point-pixel pairs, the
superpixel maps (SLIC, disk-cached), the frozen backbone's feature maps and the per-superpixel z.

Run folder: ``last.pt`` (model, head, optimiser, scheduler, RNG, step; written atomically every
``train.checkpoint_every`` steps and at the end), ``config.yaml``, ``pretrain_log.jsonl``, ``pretrain_curves.png``.
Resuming restarts from ``last.pt`` and reproduces the uninterrupted run exactly on the same device: the scene order
and augmentation of step ``s`` are drawn from generators seeded by ``(train.seed, s)``.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn
from tqdm import tqdm

from xmcl.config import config_to_dict, save_config
from xmcl.contrast import STSlidrLoss
from xmcl.device import resolve_device
from xmcl.distill.config import DataConfig, DistillConfig, OptimConfig, VoxelConfig
from xmcl.distill.geometry import point_pixel_pairs
from xmcl.distill.image_head import ImageFeatureHead
from xmcl.distill.pooling import averaging_matrix, build_superpixel_pooling
from xmcl.distill.scene import Scene
from xmcl.distill.superpixels import SuperpixelCache
from xmcl.distill.synthetic import SyntheticScenes
from xmcl.distill.voxel_net import VoxelBatch, VoxelUNet, voxelize_clouds
from xmcl.errors import CheckpointError, ConfigError, TrainingDiverged
from xmcl.nn.backbones import build_image_backbone
from xmcl.training.checkpoint import (
    capture_rng_state,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
    seed_everything,
)
from xmcl.training.logging import JsonlLogger, plot_curves

CHECKPOINT_KIND = "xmcl.distill.pretrain"


def load_scenes(data: DataConfig, split: str) -> list[Scene]:
    """The scenes of ``split``: "pretrain", "probe_train" (the first scenes of the pretraining set) or "eval"."""
    counts = {"pretrain": data.pretrain_scenes, "probe_train": data.probe_train_scenes, "eval": data.eval_scenes}
    if split not in counts:
        raise ConfigError(f"unknown scene split {split!r}; one of {sorted(counts)}")
    if counts[split] < 1:
        raise ConfigError(f"data.{split}_scenes must be at least 1, got {counts[split]}")
    if len(data.image_size) != 2:
        raise ConfigError(f"data.image_size must be [height, width], got {data.image_size}")
    seed = data.seed + 1 if split == "eval" else data.seed
    scenes = SyntheticScenes(counts[split], seed=seed, num_points_target=data.num_points,
                             image_size=tuple(data.image_size), num_cameras=data.num_cameras)
    return [scenes[i] for i in range(len(scenes))]


def build_voxel_net(cfg: VoxelConfig) -> VoxelUNet:
    """The 3D network of ``cfg`` (one input channel: intensity)."""
    return VoxelUNet(1, widths=cfg.widths, blocks=cfg.blocks, out_dim=cfg.out_dim)


def scene_points(scene: Scene, device: torch.device) -> Tensor:
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


def distillation_loss(net: VoxelUNet, head: ImageFeatureHead, loss_fn: STSlidrLoss, batch: list[PreparedScene],
                      cfg: VoxelConfig, generator: torch.Generator | None) -> tuple[Tensor, int]:
    """Loss of one batch of prepared scenes and its number of superpixels K."""
    voxels = voxelize_scenes([s.points for s in batch], cfg, generator)
    point_features = net(voxels)
    pair_point, pair_pixel, pixel_sp, pixel_features = [], [], [], []
    point_offset = pixel_offset = sp_offset = 0
    for scene in batch:
        pair_point.append(scene.pair_point + point_offset)
        pair_pixel.append(scene.pair_pixel + pixel_offset)
        pixel_sp.append(scene.pixel_superpixel + sp_offset)
        for backbone_map, size in zip(scene.backbone_maps, scene.image_sizes):
            pixel_features.append(head.pixel_features(backbone_map, size)[0].flatten(1).T)
        point_offset += scene.points.shape[0]
        pixel_offset += scene.pixel_superpixel.shape[0]
        sp_offset += scene.num_superpixels
    pooling = build_superpixel_pooling(torch.cat(pair_point), torch.cat(pair_pixel), point_offset, torch.cat(pixel_sp))
    f = pooling.pool_points(point_features)
    g = pooling.pool_pixels(torch.cat(pixel_features))
    z = None
    if loss_fn.needs_semantic:
        z = torch.cat([s.semantic for s in batch])[pooling.superpixel_ids]
    return loss_fn(f, g, z), pooling.num_superpixels


def build_loss(cfg: DistillConfig) -> STSlidrLoss:
    c = cfg.loss
    return STSlidrLoss(tau=c.tau, tolerance=c.tolerance, quantile_variant=c.quantile_variant, q=c.q,
                       balance=c.balance, threshold=c.threshold)


def build_image_head(cfg: DistillConfig) -> ImageFeatureHead:
    backbone = build_image_backbone(cfg.image.backbone, cfg.image.weights, resnet_width=cfg.image.resnet_width)
    return ImageFeatureHead(backbone, cfg.voxel.out_dim, cfg.image.input_scale)


def build_optimizer(params: list[nn.Parameter], cfg: OptimConfig) -> tuple[torch.optim.Optimizer,
                                                                          torch.optim.lr_scheduler.LambdaLR]:
    """AdamW or SGD (momentum, weight decay) and the warm-up + cosine schedule ``lr_s = lr * factor(s)``."""
    if cfg.steps < 1 or cfg.lr <= 0 or cfg.warmup_steps < 0:
        raise ConfigError(f"optim: need steps >= 1, lr > 0, warmup_steps >= 0; got steps={cfg.steps}, lr={cfg.lr}, "
                          f"warmup_steps={cfg.warmup_steps}")
    if cfg.optimizer == "adamw":
        optimizer: torch.optim.Optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    else:
        optimizer = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)

    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def seeded_generator(*entropy: int) -> torch.Generator:
    """A CPU generator seeded from non-negative integers (independent of the global RNG)."""
    return torch.Generator().manual_seed(int(np.random.SeedSequence(list(entropy)).generate_state(1)[0]))


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


def _check_resumable(saved: dict, cfg: DistillConfig, path: Path) -> None:
    """A checkpoint resumes only a run of the same network, backbone, superpixels, loss and pretraining scenes."""
    current = config_to_dict(cfg)
    ignored = {("data", "probe_train_scenes"), ("data", "eval_scenes"), ("superpixels", "cache_dir")}
    for section in ("data", "voxel", "image", "superpixels", "loss"):
        before, now = saved.get(section, {}), current[section]
        for key in sorted(set(before) | set(now)):
            if (section, key) not in ignored and before.get(key) != now.get(key):
                raise CheckpointError(f"{path} was written with {section}.{key} = {before.get(key)!r}, but the config "
                                      f"now says {now.get(key)!r}; use another --out or --no-resume")


def run_pretrain(cfg: DistillConfig, out_dir: Path, resume: bool = True) -> Path:
    """Pretrain the 3D network of ``cfg`` into ``out_dir``; returns the final checkpoint (``out_dir/last.pt``)."""
    if cfg.train.log_every < 1 or cfg.train.checkpoint_every < 1:
        raise ConfigError(f"train.log_every and train.checkpoint_every must be at least 1, got "
                          f"{cfg.train.log_every} and {cfg.train.checkpoint_every}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = resolve_device(cfg.train.device)
    seed_everything(cfg.train.seed)
    net = build_voxel_net(cfg.voxel).to(device)
    head = build_image_head(cfg).to(device)
    loss_fn = build_loss(cfg)
    trainable = list(net.parameters()) + list(head.head.parameters())
    optimizer, scheduler = build_optimizer(trainable, cfg.optim)
    checkpoint_path = out_dir / "last.pt"
    start = 0
    if resume and checkpoint_path.is_file():
        state = load_checkpoint(checkpoint_path, map_location=device)
        if state.get("kind") != CHECKPOINT_KIND:
            raise CheckpointError(f"{checkpoint_path} is not a distillation pretraining checkpoint")
        _check_resumable(state["config"], cfg, checkpoint_path)
        net.load_state_dict(state["voxel_net"])
        head.head.load_state_dict(state["image_head"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        restore_rng_state(state["rng"])
        start = int(state["step"])
    save_config(cfg, out_dir / "config.yaml")

    def save(step: int, last_loss: float) -> None:
        save_checkpoint(checkpoint_path, {
            "kind": CHECKPOINT_KIND, "config": config_to_dict(cfg), "step": step, "loss": last_loss,
            "voxel_net": net.state_dict(), "image_head": head.head.state_dict(),
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": capture_rng_state(),
        })

    if start >= cfg.optim.steps:
        return checkpoint_path
    sp_dir = cfg.superpixels.cache_dir if cfg.superpixels.cache_dir is not None else out_dir / "superpixels"
    superpixels = SuperpixelCache(sp_dir, cfg.superpixels.n_segments, cfg.superpixels.compactness,
                                  cfg.superpixels.sigma)
    scenes = load_scenes(cfg.data, "pretrain")
    prepared = [prepare_scene(s, head, superpixels, device, loss_fn.needs_semantic)
                for s in tqdm(scenes, desc="preparing scenes", disable=not cfg.train.progress)]
    logger = JsonlLogger(out_dir / "pretrain_log.jsonl")
    net.train()
    head.train()
    bar = tqdm(range(start, cfg.optim.steps), initial=start, total=cfg.optim.steps, desc="pretrain",
               disable=not cfg.train.progress)
    for step in bar:
        began = time.perf_counter()
        generator = seeded_generator(cfg.train.seed, 0, step)
        batch = [prepared[i] for i in batch_indices(len(prepared), cfg.optim.batch_scenes, cfg.train.seed, step)]
        loss, num_superpixels = distillation_loss(net, head, loss_fn, batch, cfg.voxel,
                                                  generator if cfg.train.augment else None)
        loss_value = loss.item()
        if not math.isfinite(loss_value):
            raise TrainingDiverged(f"pretraining loss became {loss_value} at step {step}; the last good checkpoint "
                                   f"is {checkpoint_path if checkpoint_path.is_file() else 'not written yet'}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        scenes_per_s = len(batch) / (time.perf_counter() - began)
        bar.set_postfix(loss=f"{loss_value:.4f}", scenes_per_s=f"{scenes_per_s:.2f}")
        done = step + 1
        if done % cfg.train.log_every == 0 or done == cfg.optim.steps:
            logger.log({"step": done, "loss": loss_value, "lr": scheduler.get_last_lr()[0],
                        "superpixels": num_superpixels, "scenes_per_s": scenes_per_s})
        if done % cfg.train.checkpoint_every == 0 or done == cfg.optim.steps:
            save(done, loss_value)
    plot_curves(out_dir / "pretrain_log.jsonl", out_dir / "pretrain_curves.png")
    return checkpoint_path
