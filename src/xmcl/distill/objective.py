"""The ST-SLidR objective of one batch: points -> 3D U-Net -> per-point features (unit norm); each camera image
-> frozen backbone -> 1x1 head -> per-pixel features (unit norm); both sides averaged per SLIC superpixel over the
point-pixel pairs (``pooling``); z = the superpixel mean of the frozen backbone features; the loss is
``xmcl.contrast.STSlidrLoss`` (SLidR, semantically tolerant, or tolerant + class-agnostic balancing). In a
data-parallel run with ``loss.gather: global`` the superpixel features of every rank are gathered before the loss
(``gather_uneven``: ranks' superpixel counts differ), in rank order, as one process with all the scenes has them.
"""

from __future__ import annotations

import torch
from torch import Tensor

from xmcl.contrast import STSlidrLoss
from xmcl.distill.config import DistillConfig, VoxelConfig
from xmcl.distill.image_head import ImageFeatureHead
from xmcl.distill.pooling import build_superpixel_pooling
from xmcl.distill.preparation import PreparedScene, voxelize_scenes
from xmcl.distill.voxel_net import SparseUNet
from xmcl.runtime.distributed import SINGLE_PROCESS, World, gather_uneven


def build_distill_loss(cfg: DistillConfig) -> STSlidrLoss:
    """The loss ``cfg.loss`` describes."""
    c = cfg.loss
    return STSlidrLoss(tau=c.tau, tolerance=c.tolerance, quantile_variant=c.quantile_variant, q=c.q,
                       balance=c.balance, threshold=c.threshold)


def distillation_loss(net: SparseUNet, head: ImageFeatureHead, loss_fn: STSlidrLoss, batch: list[PreparedScene],
                      cfg: VoxelConfig, generator: torch.Generator | None,
                      gather: World = SINGLE_PROCESS) -> tuple[Tensor, int]:
    """Loss of one batch of prepared scenes and its number of superpixels K (this rank's). ``gather``: the world
    whose ranks' superpixels are contrasted together (``SINGLE_PROCESS``: this batch's alone)."""
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
        z = gather_uneven(torch.cat([s.semantic for s in batch])[pooling.superpixel_ids], gather, with_grad=False)
    return loss_fn(gather_uneven(f, gather), gather_uneven(g, gather), z), pooling.num_superpixels
