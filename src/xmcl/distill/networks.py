"""The networks a distillation config describes, and the pretraining checkpoint that stores the 3D one."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from xmcl.config import config_from_dict
from xmcl.distill.config import DistillConfig, VoxelConfig
from xmcl.distill.image_head import ImageFeatureHead
from xmcl.distill.res16unet import Res16UNet
from xmcl.distill.voxel_net import VoxelUNet
from xmcl.errors import CheckpointError, brief
from xmcl.nn.backbones import build_image_backbone
from xmcl.nn.spconv_map import SparseBackend
from xmcl.runtime.checkpoint import load_checkpoint

DISTILL_CHECKPOINT = ("xmcl.distill.pretrain", 3)  # kind and version of the pretraining checkpoints (3: safe)
PointNet = VoxelUNet | Res16UNet


def build_voxel_net(cfg: VoxelConfig) -> PointNet:
    """The 3D network of ``cfg`` (one input channel: intensity)."""
    if cfg.architecture == "res16unet":
        return Res16UNet(1, planes=cfg.planes, layers=cfg.layers, init_dim=cfg.init_dim, out_dim=cfg.out_dim,
                         bn_momentum=cfg.bn_momentum, sparse_backend=cfg.sparse_backend)
    return VoxelUNet(1, widths=cfg.widths, blocks=cfg.blocks, out_dim=cfg.out_dim, bn_momentum=cfg.bn_momentum,
                     sparse_backend=cfg.sparse_backend)


def build_image_head(cfg: DistillConfig) -> ImageFeatureHead:
    """The frozen 2D backbone of ``cfg.image`` under a trainable 1x1 head to ``cfg.voxel.out_dim`` channels."""
    backbone = build_image_backbone(cfg.image.backbone, cfg.image.weights, resnet_width=cfg.image.resnet_width,
                                    weights_format=cfg.image.weights_format)
    return ImageFeatureHead(backbone, cfg.voxel.out_dim, cfg.image.input_scale)


def load_pretrained_backbone(checkpoint: Path, device: torch.device,
                             sparse_backend: SparseBackend = "auto") -> tuple[PointNet, VoxelConfig]:
    """The 3D network stored by distillation pretraining and the voxel config it was trained with, running on
    ``sparse_backend`` (the caller's choice: the weights do not depend on it)."""
    state = load_checkpoint(checkpoint, *DISTILL_CHECKPOINT, map_location=device)
    missing = [key for key in ("config", "voxel_net") if key not in state]
    if missing:
        raise CheckpointError(f"{checkpoint}: the checkpoint has no {' or '.join(repr(k) for k in missing)} entry")
    voxel_cfg = dataclasses.replace(config_from_dict(DistillConfig, state["config"], where=str(checkpoint)).voxel,
                                    sparse_backend=sparse_backend)
    net = build_voxel_net(voxel_cfg)
    try:
        net.load_state_dict(state["voxel_net"])
    except (RuntimeError, TypeError, AttributeError) as error:
        raise CheckpointError(f"{checkpoint}: the 3D network weights do not fit its config: "
                              f"{brief(error)}") from None
    return net.to(device), voxel_cfg
