"""Sparse 3D convolutions in plain PyTorch: voxelisation, hashed coordinates, kernel maps and the sparse layers
(submanifold, strided and transposed convolutions, BatchNorm + ReLU, residual blocks) that sparse U-Nets are built of.

Sparse tensors
--------------
Points are voxelised (cubic voxels of side ``voxel_size``, or cylindrical cells over (rho, phi, z)); each voxel's
input feature is the mean of its points' features. Voxel coordinates ``(b, i, j, k)`` (``b`` = cloud index in the
batch) are hashed to one int64 key each: ``key = b << 48 | (i + 2^15) << 32 | (j + 2^15) << 16 | (k + 2^15)``, so
the key of a neighbour at offset ``(di, dj, dk)`` is ``key + (di << 32) + (dj << 16) + dk``. Keys are kept sorted
and neighbours are found with ``torch.searchsorted``.

Convolutions (weights stored per kernel offset, ``(n_offsets, C_in, C_out)``)
* submanifold 3x3x3: ``out[x] = sum_o W_o^T in[x + o]`` over the 27 offsets ``o`` with ``x + o`` active; output
  sites = input sites (= a dense ``conv3d(padding=1)`` on the zero-filled grid, read at the active sites);
* strided 2x2x2, stride 2 (downsampling): coarse site ``p = floor(x / 2)``, ``out[p] = sum_{x: floor(x/2)=p}
  W_{x - 2p}^T in[x]`` (= dense ``conv3d(kernel=2, stride=2)``);
* transposed 2x2x2, stride 2 (upsampling onto the finer level's known sites): ``out[x] = W_{x - 2p}^T in[p]``.
The neighbour and parent maps of each level are computed once per batch (``CoordinateMap``) and shared by layers.
The layers ask their input's map for the convolution (``KernelMap``), so the same layers and weights also run on
spconv's kernels (``xmcl.nn.spconv_map``).

BatchNorm is ``GlobalBatchNorm1d`` (``nn.BatchNorm1d`` in one process): given a data-parallel world
(``xmcl.nn.global_batchnorm.set_world``), its training statistics span every rank's active sites.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Literal, Protocol, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from xmcl.errors import ConfigError, DataError
from xmcl.nn.global_batchnorm import GlobalBatchNorm1d

_COORD_BITS = 16
_COORD_SHIFT = 1 << (_COORD_BITS - 1)
_COORD_LIMIT = _COORD_SHIFT - 2  # a margin of 2 keeps every neighbour's key components in range
_BATCH_LIMIT = 1 << 14

OFFSETS_3X3X3 = tuple(itertools.product((-1, 0, 1), repeat=3))
OFFSETS_2X2X2 = tuple(itertools.product((0, 1), repeat=3))


def hash_coordinates(coords: Tensor) -> Tensor:
    """int64 key of each ``(b, i, j, k)`` row; keys sort by batch, then i, j, k."""
    c = coords.long()
    return ((c[:, 0] << 48) | ((c[:, 1] + _COORD_SHIFT) << 32)
            | ((c[:, 2] + _COORD_SHIFT) << 16) | (c[:, 3] + _COORD_SHIFT))


def unhash_keys(keys: Tensor) -> Tensor:
    """Inverse of ``hash_coordinates``: (N, 4) int64 ``(b, i, j, k)``."""
    mask = (1 << _COORD_BITS) - 1
    return torch.stack([keys >> 48, ((keys >> 32) & mask) - _COORD_SHIFT,
                        ((keys >> 16) & mask) - _COORD_SHIFT, (keys & mask) - _COORD_SHIFT], dim=1)


def _offset_key(offset: Sequence[int]) -> int:
    return (offset[0] << 32) + (offset[1] << 16) + offset[2]


def grid_coordinates(xyz: Tensor, voxel_size: float, coordinates: Literal["cubic", "cylindrical"] = "cubic",
                     angular_resolution_deg: float = 1.0) -> Tensor:
    """Integer cell of each point (P, 3) int64.

    cubic: ``floor(xyz / voxel_size)``; cylindrical: ``floor((rho / voxel_size, phi_deg / angular_resolution_deg,
    z / voxel_size))`` with ``rho = sqrt(x^2 + y^2)``, ``phi_deg = atan2(y, x)`` in degrees (no wrap-around at +-180).
    """
    if voxel_size <= 0:
        raise ConfigError(f"voxel_size must be positive, got {voxel_size}")
    if coordinates == "cubic":
        scaled = xyz / voxel_size
    elif coordinates == "cylindrical":
        if angular_resolution_deg <= 0:
            raise ConfigError(f"angular_resolution_deg must be positive, got {angular_resolution_deg}")
        rho = torch.sqrt(xyz[:, 0] ** 2 + xyz[:, 1] ** 2) / voxel_size
        phi = torch.rad2deg(torch.atan2(xyz[:, 1], xyz[:, 0])) / angular_resolution_deg
        scaled = torch.stack([rho, phi, xyz[:, 2] / voxel_size], dim=1)
    else:
        raise ConfigError(f"coordinates must be 'cubic' or 'cylindrical', got {coordinates!r}")
    return torch.floor(scaled).long()


@dataclass
class VoxelBatch:
    """Several point clouds voxelised together.

    ``coords`` (N, 4) int64 ``(b, i, j, k)`` of the unique voxels, sorted by key; ``features`` (N, C) the mean of the
    features of the points in each voxel; ``inverse`` (P,) the voxel of each point (points of all clouds concatenated).
    """

    coords: Tensor
    features: Tensor
    inverse: Tensor


def voxelize(cells: Tensor, batch_index: Tensor, point_features: Tensor) -> VoxelBatch:
    """Unique voxels of integer cells (P, 3) tagged with their cloud index (P,); voxel feature = mean point feature."""
    if cells.shape[0] == 0:
        raise DataError("cannot voxelise an empty point cloud")
    if cells.shape[0] != batch_index.shape[0] or cells.shape[0] != point_features.shape[0]:
        raise DataError(f"voxelize: {cells.shape[0]} cells, {batch_index.shape[0]} batch indices and "
                        f"{point_features.shape[0]} feature rows must match")
    extent = int(cells.abs().max())
    if extent > _COORD_LIMIT:
        raise DataError(f"a point lies {extent} voxels from the origin; at most {_COORD_LIMIT} fit the voxel hash "
                        f"(increase voxel_size or crop the cloud)")
    if int(batch_index.min()) < 0 or int(batch_index.max()) >= _BATCH_LIMIT:
        raise DataError(f"batch indices must lie in [0, {_BATCH_LIMIT}), got {int(batch_index.min())}.."
                        f"{int(batch_index.max())}")
    coords = torch.cat([batch_index.long()[:, None], cells.long()], dim=1)
    keys, inverse = torch.unique(hash_coordinates(coords), sorted=True, return_inverse=True)
    counts = torch.bincount(inverse, minlength=keys.shape[0]).to(point_features.dtype)
    sums = point_features.new_zeros(keys.shape[0], point_features.shape[1]).index_add_(0, inverse, point_features)
    return VoxelBatch(unhash_keys(keys), sums / counts[:, None], inverse)


class CoordinateMap:
    """The active sites of one resolution level, their neighbour map and the map to the next coarser level.

    Built once per batch; every layer at this level reuses the cached maps.
    """

    def __init__(self, coords: Tensor) -> None:
        self.coords = coords
        self.keys = hash_coordinates(coords)
        if self.keys.numel() > 1 and not bool((self.keys[1:] > self.keys[:-1]).all()):
            raise DataError("CoordinateMap needs unique coordinates sorted by key (as voxelize returns them)")
        self._neighbours: tuple[Tensor, Tensor, list[int]] | None = None
        self._coarser: tuple[CoordinateMap, Tensor, Tensor, list[int]] | None = None

    @property
    def num_sites(self) -> int:
        return int(self.coords.shape[0])

    def neighbours(self) -> tuple[Tensor, Tensor, list[int]]:
        """Index pairs ``(src, dst)`` with ``coords[src] = coords[dst] + o``, concatenated over the 26 non-centre
        offsets ``o`` in OFFSETS_3X3X3 order, and the number of pairs of each of the 27 offsets (centre: 0).

        Offsets ``o`` and ``-o`` have mirrored pairs, so only 13 searches are made.
        """
        if self._neighbours is None:
            arange = torch.arange(self.num_sites, device=self.keys.device)
            pairs: list[tuple[Tensor, Tensor]] = [(arange[:0], arange[:0])] * len(OFFSETS_3X3X3)
            centre = len(OFFSETS_3X3X3) // 2
            for k in range(centre):  # OFFSETS_3X3X3[26 - k] == -OFFSETS_3X3X3[k]
                query = self.keys + _offset_key(OFFSETS_3X3X3[k])
                pos = torch.searchsorted(self.keys, query).clamp_(max=self.num_sites - 1)
                found = torch.nonzero(self.keys[pos] == query).squeeze(1)
                src = pos[found]
                pairs[k] = (src, found)
                pairs[len(OFFSETS_3X3X3) - 1 - k] = (found, src)
            self._neighbours = (torch.cat([p[0] for p in pairs]), torch.cat([p[1] for p in pairs]),
                                [int(p[0].numel()) for p in pairs])
        return self._neighbours

    def coarser(self) -> tuple["CoordinateMap", Tensor, Tensor, list[int]]:
        """``(coarse map, parent index of each site, sites ordered by child offset x - 2p (OFFSETS_2X2X2 order),
        number of sites of each child offset)``."""
        if self._coarser is None:
            spatial = self.coords[:, 1:]
            parent_spatial = torch.div(spatial, 2, rounding_mode="floor")
            child = spatial - 2 * parent_spatial
            parent_coords = torch.cat([self.coords[:, :1], parent_spatial], dim=1)
            keys, parent = torch.unique(hash_coordinates(parent_coords), sorted=True, return_inverse=True)
            offset_id = child[:, 0] * 4 + child[:, 1] * 2 + child[:, 2]
            order = torch.argsort(offset_id, stable=True)
            sizes = torch.bincount(offset_id, minlength=len(OFFSETS_2X2X2)).tolist()
            self._coarser = (CoordinateMap(unhash_keys(keys)), parent, order, sizes)
        return self._coarser

    def submanifold_conv(self, features: Tensor, weight: Tensor) -> Tensor:
        """3x3x3 submanifold convolution of ``features`` (N, C_in) on these sites, ``weight`` (27, C_in, C_out)."""
        src, dst, sizes = self.neighbours()
        out = features @ weight[len(OFFSETS_3X3X3) // 2]
        if src.numel():
            out = out.index_add(0, dst, _per_offset_matmul(features.index_select(0, src), sizes, weight))
        return out

    def strided_conv(self, features: Tensor, weight: Tensor) -> tuple[Tensor, "CoordinateMap"]:
        """2x2x2 stride-2 convolution onto the coarser level, ``weight`` (8, C_in, C_out): (its features, its map)."""
        coarse, parent, order, sizes = self.coarser()
        contributions = _per_offset_matmul(features.index_select(0, order), sizes, weight)
        out = features.new_zeros(coarse.num_sites, weight.shape[2]).index_add(0, parent[order], contributions)
        return out, coarse

    def transposed_conv(self, coarse_features: Tensor, coarse: "CoordinateMap", weight: Tensor) -> Tensor:
        """2x2x2 stride-2 transposed convolution from ``coarse`` (this map's coarser level) onto these sites."""
        level, parent, order, sizes = self.coarser()
        if level is not coarse:
            raise ValueError("TransposedConv3d: the input does not live on the coarser level of the target map")
        ordered = _per_offset_matmul(coarse_features.index_select(0, parent[order]), sizes, weight)
        return torch.empty_like(ordered).index_copy(0, order, ordered)


class KernelMap(Protocol):
    """The active sites of one resolution level and the convolutions on them, with weights as the layers store them
    (``(n_offsets, C_in, C_out)``): ``CoordinateMap`` in plain PyTorch, ``xmcl.nn.spconv_map.SpconvMap`` through
    spconv. The two compute the same function; the site order of coarser levels may differ between them."""

    coords: Tensor  # (N, 4) int64 (b, i, j, k) of the sites, in this map's order

    @property
    def num_sites(self) -> int: ...

    def submanifold_conv(self, features: Tensor, weight: Tensor) -> Tensor: ...

    def strided_conv(self, features: Tensor, weight: Tensor) -> tuple[Tensor, "KernelMap"]: ...

    def transposed_conv(self, coarse_features: Tensor, coarse: "KernelMap", weight: Tensor) -> Tensor: ...


@dataclass
class SparseTensor:
    """Features (N, C) on the active sites of ``cmap``."""

    features: Tensor
    cmap: KernelMap

    def with_features(self, features: Tensor) -> "SparseTensor":
        return SparseTensor(features, self.cmap)


def _per_offset_matmul(rows: Tensor, sizes: list[int], weight: Tensor) -> Tensor:
    """Rows grouped by offset (``sizes[k]`` rows for offset k, in order) times that offset's weight."""
    parts = [chunk @ w for chunk, w, n in zip(rows.split(sizes), weight.unbind(0), sizes) if n]
    return torch.cat(parts) if parts else rows.new_zeros(0, weight.shape[2])


class _OffsetConv3d(nn.Module):
    """A sparse convolution with one weight per kernel offset of ``OFFSETS``: ``weight`` (len(OFFSETS), C_in,
    C_out), He-uniform over the fan-in of the whole kernel; ``bias`` (C_out) or None."""

    OFFSETS: tuple[tuple[int, ...], ...] = ()

    def __init__(self, in_channels: int, out_channels: int, bias: bool = False) -> None:
        super().__init__()
        bound = math.sqrt(6.0 / (len(self.OFFSETS) * in_channels))
        self.weight = nn.Parameter(torch.empty(len(self.OFFSETS), in_channels, out_channels).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None

    def _with_bias(self, out: Tensor) -> Tensor:
        return out if self.bias is None else out + self.bias


class SubmanifoldConv3d(_OffsetConv3d):
    """3x3x3 convolution whose output sites are its input sites. ``weight`` (27, C_in, C_out), offsets OFFSETS_3X3X3."""

    OFFSETS = OFFSETS_3X3X3

    def forward(self, x: SparseTensor) -> SparseTensor:
        return x.with_features(self._with_bias(x.cmap.submanifold_conv(x.features, self.weight)))


class StridedConv3d(_OffsetConv3d):
    """2x2x2 convolution with stride 2 onto the coarser level. ``weight`` (8, C_in, C_out), offsets OFFSETS_2X2X2."""

    OFFSETS = OFFSETS_2X2X2

    def forward(self, x: SparseTensor) -> SparseTensor:
        out, coarse = x.cmap.strided_conv(x.features, self.weight)
        return SparseTensor(self._with_bias(out), coarse)


class TransposedConv3d(_OffsetConv3d):
    """2x2x2 transposed convolution, stride 2, from a coarse level back onto the sites of ``fine`` (its finer map)."""

    OFFSETS = OFFSETS_2X2X2

    def forward(self, x: SparseTensor, fine: KernelMap) -> SparseTensor:
        return SparseTensor(self._with_bias(fine.transposed_conv(x.features, x.cmap, self.weight)), fine)


class BatchNormReLU(nn.Module):
    """BatchNorm over the active sites, then ReLU (optional)."""

    def __init__(self, channels: int, relu: bool = True, momentum: float = 0.1) -> None:
        super().__init__()
        self.norm = GlobalBatchNorm1d(channels, momentum=momentum)
        self.relu = relu

    def forward(self, x: SparseTensor) -> SparseTensor:
        y = self.norm(x.features)
        return x.with_features(F.relu(y) if self.relu else y)


class ResidualBlock(nn.Module):
    """``relu(bn(conv(relu(bn(conv(x))))) + shortcut(x))``, shortcut = identity or a linear map (1x1x1 conv)."""

    def __init__(self, in_channels: int, out_channels: int, momentum: float = 0.1) -> None:
        super().__init__()
        self.conv1 = SubmanifoldConv3d(in_channels, out_channels)
        self.bn1 = BatchNormReLU(out_channels, momentum=momentum)
        self.conv2 = SubmanifoldConv3d(out_channels, out_channels)
        self.bn2 = BatchNormReLU(out_channels, relu=False, momentum=momentum)
        self.shortcut = (nn.Sequential(nn.Linear(in_channels, out_channels, bias=False),
                                       GlobalBatchNorm1d(out_channels, momentum=momentum))
                         if in_channels != out_channels else nn.Identity())

    def forward(self, x: SparseTensor) -> SparseTensor:
        y = self.bn2(self.conv2(self.bn1(self.conv1(x))))
        return y.with_features(F.relu(y.features + self.shortcut(x.features)))


def residual_blocks(in_channels: int, out_channels: int, count: int, momentum: float = 0.1) -> nn.ModuleList:
    """``count`` residual blocks, the first from ``in_channels``, all to ``out_channels``."""
    return nn.ModuleList(ResidualBlock(in_channels if i == 0 else out_channels, out_channels, momentum)
                         for i in range(count))
