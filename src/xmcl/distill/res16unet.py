"""The authors' 3D network, Res16UNet (MinkowskiEngine's MinkUNet layout; Res16UNet34C by default), built from the
sparse layers of ``xmcl.nn.sparse_conv`` on the U-Net walk of ``xmcl.distill.voxel_net.SparseUNet``.

With ``p`` = ``planes`` and ``n`` = ``layers`` (8 each) and stem width ``d`` = ``init_dim``::

    x0 = relu(bn(subm3(input -> d)))                                    stride 1
    e1 = blocks(n[0], p[0])(relu(bn(down2(x0))))                        stride 2
    e2 = blocks(n[1], p[1])(relu(bn(down2(e1))))                        stride 4
    e3 = blocks(n[2], p[2])(relu(bn(down2(e2))))                        stride 8
    e4 = blocks(n[3], p[3])(relu(bn(down2(e3))))                        stride 16
    d4 = blocks(n[4], p[4])(cat(relu(bn(up2(e4 -> p[4]))), e3))         stride 8
    d3 = blocks(n[5], p[5])(cat(relu(bn(up2(d4 -> p[5]))), e2))         stride 4
    d2 = blocks(n[6], p[6])(cat(relu(bn(up2(d3 -> p[6]))), e1))         stride 2
    d1 = blocks(n[7], p[7])(cat(relu(bn(up2(d2 -> p[7]))), x0))         stride 1

``down2`` keeps the width (as theirs: conv1p1s2 ... conv4p8s2 map ``inplanes -> inplanes``), ``blocks`` are residual
blocks of two 3x3x3 convolutions (the first of a stage projects its input with a 1x1x1 conv + BN when the width
changes), ``up2`` is the 2x2x2 transposed convolution. ``features`` = d1 per point (``p[7]``-d, what the probes
read); ``forward`` = the final 1x1x1 layer to ``out_dim``, L2-normalised (what the distillation reads).
"""

from __future__ import annotations

from typing import Iterable, Sequence

from torch import nn

from xmcl.distill.voxel_net import SparseUNet
from xmcl.errors import ConfigError
from xmcl.nn.sparse_conv import (
    BatchNormReLU,
    SparseTensor,
    StridedConv3d,
    SubmanifoldConv3d,
    TransposedConv3d,
    residual_blocks,
)
from xmcl.nn.spconv_map import SparseBackend

RES16UNET34C_PLANES = (32, 64, 128, 256, 256, 128, 96, 96)
RES16UNET34_LAYERS = (2, 3, 4, 6, 2, 2, 2, 2)


class Res16UNet(SparseUNet):
    """Res16UNet over sparse voxels (see the module docstring); ``head`` is the final 1x1x1 layer."""

    def __init__(self, in_channels: int, planes: Sequence[int] = RES16UNET34C_PLANES,
                 layers: Sequence[int] = RES16UNET34_LAYERS, init_dim: int = 32, out_dim: int = 64,
                 bn_momentum: float = 0.1, sparse_backend: SparseBackend = "auto") -> None:
        super().__init__()
        self.sparse_backend = sparse_backend
        planes, layers = list(planes), list(layers)
        if len(planes) != 8 or len(layers) != 8 or min(planes + layers) < 1 or init_dim < 1 or out_dim < 1:
            raise ConfigError(f"Res16UNet: need 8 positive planes and 8 positive layer counts, a positive init_dim "
                              f"and out_dim; got planes={planes}, layers={layers}, init_dim={init_dim}, "
                              f"out_dim={out_dim}")
        self.in_channels = in_channels
        self.planes = planes
        m = bn_momentum
        self.stem = SubmanifoldConv3d(in_channels, init_dim)
        self.stem_norm = BatchNormReLU(init_dim, momentum=m)
        self.down = nn.ModuleList()
        self.down_norm = nn.ModuleList()
        self.enc_blocks = nn.ModuleList()
        width = init_dim
        for stage in range(4):
            self.down.append(StridedConv3d(width, width))
            self.down_norm.append(BatchNormReLU(width, momentum=m))
            self.enc_blocks.append(residual_blocks(width, planes[stage], layers[stage], m))
            width = planes[stage]
        skips = [planes[2], planes[1], planes[0], init_dim]
        self.up = nn.ModuleList()
        self.up_norm = nn.ModuleList()
        self.dec_blocks = nn.ModuleList()
        for stage, skip in zip(range(4, 8), skips):
            self.up.append(TransposedConv3d(width, planes[stage]))
            self.up_norm.append(BatchNormReLU(planes[stage], momentum=m))
            self.dec_blocks.append(residual_blocks(planes[stage] + skip, planes[stage], layers[stage], m))
            width = planes[stage]
        self.head = nn.Linear(planes[7], out_dim)

    def _level0(self, x: SparseTensor) -> SparseTensor:
        return self.stem_norm(self.stem(x))

    def _decoder_stages(self) -> Iterable[tuple[TransposedConv3d, BatchNormReLU, nn.ModuleList]]:
        return zip(self.up, self.up_norm, self.dec_blocks)
