"""The sparse-voxel 3D U-Nets that ST-SLidR distils into, built of the layers of ``xmcl.nn.sparse_conv``: the
encoder-decoder walk they share (``SparseUNet``), the MinkUNet-like ``VoxelUNet``, and ``voxelize_clouds`` (the
clouds of a batch -> one ``VoxelBatch``). The authors' Res16UNet is ``xmcl.distill.res16unet``.
"""

from __future__ import annotations

from typing import Iterable, Literal, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from xmcl.errors import ConfigError, DataError
from xmcl.nn.sparse_conv import (
    BatchNormReLU,
    SparseTensor,
    StridedConv3d,
    SubmanifoldConv3d,
    TransposedConv3d,
    VoxelBatch,
    grid_coordinates,
    residual_blocks,
    voxelize,
)
from xmcl.nn.spconv_map import SparseBackend, level_zero_map, resolve_sparse_backend


def _blocks(blocks: nn.ModuleList, x: SparseTensor) -> SparseTensor:
    """``x`` through each block of ``blocks`` in turn."""
    for block in blocks:
        x = block(x)
    return x


class SparseUNet(nn.Module):
    """The walk of a sparse U-Net with skip connections; a subclass builds the layers.

    ``_level0(input)`` (the stem) gives level 0; encoder stage ``s`` (``down[s]``, ``down_norm[s]``,
    ``enc_blocks[s]``) maps level ``s`` to ``s + 1``; each decoder stage of ``_decoder_stages()`` (coarsest first)
    upsamples onto the next finer level's sites, concatenates that level's encoder output and runs its blocks.
    ``head`` is the final 1x1x1 layer: ``features`` = last decoder output per point (``head.in_features``-d, what the
    probes read), ``forward`` = the head's output, L2-normalised per point (what the distillation reads).
    ``sparse_backend`` picks the convolutions' kernels (``xmcl.nn.spconv_map``); the weights are the same for all.
    """

    in_channels: int
    sparse_backend: SparseBackend = "auto"
    down: nn.ModuleList
    down_norm: nn.ModuleList
    enc_blocks: nn.ModuleList
    head: nn.Linear

    def _level0(self, x: SparseTensor) -> SparseTensor:
        """The stem: the input voxels -> level 0."""
        raise NotImplementedError

    def _decoder_stages(self) -> Iterable[tuple[TransposedConv3d, BatchNormReLU, nn.ModuleList]]:
        """``(up, norm, blocks)`` of each decoder stage, coarsest first."""
        raise NotImplementedError

    @property
    def feature_dim(self) -> int:
        return self.head.in_features

    def voxel_features(self, batch: VoxelBatch) -> SparseTensor:
        """Last decoder output on the input voxels (N, feature_dim)."""
        if batch.features.shape[1] != self.in_channels:
            raise DataError(f"{type(self).__name__} expects {self.in_channels} input features per point, "
                            f"got {batch.features.shape[1]}")
        backend = resolve_sparse_backend(self.sparse_backend, batch.coords.device)
        x = self._level0(SparseTensor(batch.features, level_zero_map(batch.coords, backend)))
        skips = [x]
        for down, norm, blocks in zip(self.down, self.down_norm, self.enc_blocks):
            x = _blocks(blocks, norm(down(x)))
            skips.append(x)
        for (up, norm, blocks), skip in zip(self._decoder_stages(), reversed(skips[:-1])):
            x = norm(up(x, skip.cmap))
            x = _blocks(blocks, x.with_features(torch.cat([x.features, skip.features], dim=1)))
        return x

    def features(self, batch: VoxelBatch) -> Tensor:
        """Per-point decoder features (P, feature_dim) (voxel -> point through ``batch.inverse``)."""
        return self.voxel_features(batch).features[batch.inverse]

    def forward(self, batch: VoxelBatch) -> Tensor:
        """Per-point projected features (P, out_dim), unit L2 norm."""
        return F.normalize(self.head(self.voxel_features(batch).features), dim=1)[batch.inverse]


class VoxelUNet(SparseUNet):
    """Encoder-decoder over sparse voxels with skip connections.

    Encoder level 0 = stem (submanifold conv, BN, ReLU, residual blocks) at width ``widths[0]``; level l > 0 =
    strided conv (``widths[l-1] -> widths[l]``), BN, ReLU, ``blocks`` residual blocks. Decoder, from the coarsest
    level up: transposed conv to ``widths[l-1]``, BN, ReLU, concatenation with the encoder's level-(l-1) output,
    residual blocks back to ``widths[l-1]``. ``features`` is ``widths[0]``-d; ``forward`` projects to ``out_dim``.
    """

    def __init__(self, in_channels: int, widths: Sequence[int] = (16, 32, 64, 128), blocks: int = 1,
                 out_dim: int = 64, bn_momentum: float = 0.1, sparse_backend: SparseBackend = "auto") -> None:
        super().__init__()
        self.sparse_backend = sparse_backend
        widths = list(widths)
        if len(widths) < 1 or any(w <= 0 for w in widths) or blocks < 1 or in_channels < 1 or out_dim < 1:
            raise ConfigError(f"VoxelUNet: need positive in_channels, widths, blocks and out_dim, got in_channels="
                              f"{in_channels}, widths={widths}, blocks={blocks}, out_dim={out_dim}")
        self.in_channels = in_channels
        self.widths = widths
        self.out_dim = out_dim
        m = bn_momentum
        self.stem = nn.ModuleList([SubmanifoldConv3d(in_channels, widths[0]), BatchNormReLU(widths[0], momentum=m)])
        self.stem_blocks = residual_blocks(widths[0], widths[0], blocks, m)
        self.down = nn.ModuleList()
        self.down_norm = nn.ModuleList()
        self.enc_blocks = nn.ModuleList()
        for lo, hi in zip(widths[:-1], widths[1:]):
            self.down.append(StridedConv3d(lo, hi))
            self.down_norm.append(BatchNormReLU(hi, momentum=m))
            self.enc_blocks.append(residual_blocks(hi, hi, blocks, m))
        self.up = nn.ModuleList()
        self.up_norm = nn.ModuleList()
        self.dec_blocks = nn.ModuleList()
        for lo, hi in zip(widths[:-1], widths[1:]):  # index l-1 serves the step from level l to level l-1
            self.up.append(TransposedConv3d(hi, lo))
            self.up_norm.append(BatchNormReLU(lo, momentum=m))
            self.dec_blocks.append(residual_blocks(2 * lo, lo, blocks, m))
        self.head = nn.Linear(widths[0], out_dim)

    def _level0(self, x: SparseTensor) -> SparseTensor:
        for layer in self.stem:
            x = layer(x)
        return _blocks(self.stem_blocks, x)

    def _decoder_stages(self) -> Iterable[tuple[TransposedConv3d, BatchNormReLU, nn.ModuleList]]:
        return reversed(list(zip(self.up, self.up_norm, self.dec_blocks)))


def voxelize_clouds(clouds: Sequence[Tensor], voxel_size: float,
                    coordinates: Literal["cubic", "cylindrical"] = "cubic",
                    angular_resolution_deg: float = 1.0) -> VoxelBatch:
    """Voxelise (P_b, 4) x, y, z, intensity clouds together (cloud b gets batch index b); input feature = intensity.

    ``inverse`` follows the clouds concatenated in order.
    """
    points = torch.cat(list(clouds))
    batch_index = torch.cat([torch.full((c.shape[0],), b, dtype=torch.long, device=points.device)
                             for b, c in enumerate(clouds)])
    cells = grid_coordinates(points[:, :3], voxel_size, coordinates, angular_resolution_deg)
    return voxelize(cells, batch_index, points[:, 3:4])
