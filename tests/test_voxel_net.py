"""Sparse convolutions against dense torch convolutions on the zero-filled grid; U-Net equivariance and gradients."""

import math

import pytest
import torch
import torch.nn.functional as F

from xmcl.distill.res16unet import Res16UNet
from xmcl.distill.voxel_net import VoxelUNet
from xmcl.errors import DataError
from xmcl.nn.sparse_conv import (
    OFFSETS_2X2X2,
    OFFSETS_3X3X3,
    CoordinateMap,
    SparseTensor,
    StridedConv3d,
    SubmanifoldConv3d,
    TransposedConv3d,
    grid_coordinates,
    hash_coordinates,
    unhash_keys,
    voxelize,
)


def _random_sites(gen: torch.Generator, batch: int, side: int, fill: float, shift: int) -> torch.Tensor:
    """Sorted unique (b, i, j, k) with i, j, k in [shift, shift + side)."""
    grid = torch.stack(torch.meshgrid(*[torch.arange(side)] * 3, indexing="ij"), dim=-1).reshape(-1, 3)
    rows = []
    for b in range(batch):
        keep = torch.rand(grid.shape[0], generator=gen) < fill
        rows.append(torch.cat([torch.full((int(keep.sum()), 1), b), grid[keep] + shift], dim=1))
    coords = torch.cat(rows)
    return unhash_keys(torch.sort(hash_coordinates(coords)).values)


def _dense(coords: torch.Tensor, feats: torch.Tensor, batch: int, side: int, shift: int) -> torch.Tensor:
    grid = feats.new_zeros(batch, feats.shape[1], side, side, side)
    c = coords[:, 1:] - shift
    grid[coords[:, 0], :, c[:, 0], c[:, 1], c[:, 2]] = feats
    return grid


def _read(grid: torch.Tensor, coords: torch.Tensor, shift: int) -> torch.Tensor:
    c = coords[:, 1:] - shift
    return grid[coords[:, 0], :, c[:, 0], c[:, 1], c[:, 2]]


def test_hash_round_trip_with_negative_coordinates() -> None:
    coords = torch.tensor([[0, -5, 3, 0], [3, 100, -200, 7], [1, -32000, 32000, -1]])
    assert torch.equal(unhash_keys(hash_coordinates(coords)), coords)
    keys = hash_coordinates(coords)
    assert keys[0] < keys[2] < keys[1]  # sorted by batch index first


def test_submanifold_conv_equals_dense_conv_at_active_sites() -> None:
    gen = torch.Generator().manual_seed(0)
    side, shift, batch = 7, -3, 2
    coords = _random_sites(gen, batch, side, 0.35, shift)
    feats = torch.randn(coords.shape[0], 3, generator=gen, dtype=torch.float64)
    conv = SubmanifoldConv3d(3, 5, bias=True).double()
    with torch.no_grad():
        conv.bias.normal_()
    out = conv(SparseTensor(feats, CoordinateMap(coords))).features

    weight = torch.zeros(5, 3, 3, 3, 3, dtype=torch.float64)
    for k, (dx, dy, dz) in enumerate(OFFSETS_3X3X3):
        weight[:, :, dx + 1, dy + 1, dz + 1] = conv.weight[k].detach().T
    dense = F.conv3d(_dense(coords, feats, batch, side, shift), weight, conv.bias.detach(), padding=1)
    torch.testing.assert_close(out, _read(dense, coords, shift))


def test_strided_and_transposed_conv_equal_dense_convs() -> None:
    gen = torch.Generator().manual_seed(1)
    side, shift, batch = 8, -4, 2  # even shift: the 2x2x2 cells of the sparse and dense grids coincide
    coords = _random_sites(gen, batch, side, 0.2, shift)
    feats = torch.randn(coords.shape[0], 4, generator=gen, dtype=torch.float64)
    fine = CoordinateMap(coords)
    down = StridedConv3d(4, 6).double()
    coarse = down(SparseTensor(feats, fine))

    expected_sites = {(int(b), i // 2, j // 2, k // 2) for b, i, j, k in coords.tolist()}
    assert {tuple(r) for r in coarse.cmap.coords.tolist()} == expected_sites
    weight = torch.zeros(6, 4, 2, 2, 2, dtype=torch.float64)
    for k, (dx, dy, dz) in enumerate(OFFSETS_2X2X2):
        weight[:, :, dx, dy, dz] = down.weight[k].detach().T
    dense = F.conv3d(_dense(coords, feats, batch, side, shift), weight, stride=2)
    torch.testing.assert_close(coarse.features, _read(dense, coarse.cmap.coords, shift // 2))

    up = TransposedConv3d(6, 4).double()
    coarse_feats = torch.randn(coarse.cmap.num_sites, 6, generator=gen, dtype=torch.float64)
    out = up(SparseTensor(coarse_feats, coarse.cmap), fine).features
    weight_t = torch.zeros(6, 4, 2, 2, 2, dtype=torch.float64)
    for k, (dx, dy, dz) in enumerate(OFFSETS_2X2X2):
        weight_t[:, :, dx, dy, dz] = up.weight[k].detach()
    dense_up = F.conv_transpose3d(_dense(coarse.cmap.coords, coarse_feats, batch, side // 2, shift // 2), weight_t,
                                  stride=2)
    torch.testing.assert_close(out, _read(dense_up, coords, shift))


def test_voxelize_means_point_features_per_voxel() -> None:
    gen = torch.Generator().manual_seed(2)
    xyz = torch.rand(300, 3, generator=gen) * 4 - 2
    batch_index = torch.randint(0, 2, (300,), generator=gen)
    feats = torch.randn(300, 2, generator=gen, dtype=torch.float64)
    vb = voxelize(grid_coordinates(xyz, 0.5), batch_index, feats)
    groups: dict[tuple, list[int]] = {}
    for p in range(300):
        cell = tuple(math.floor(v / 0.5) for v in xyz[p].tolist())
        groups.setdefault((int(batch_index[p]),) + cell, []).append(p)
    assert vb.coords.shape[0] == len(groups)
    for v, key in enumerate(map(tuple, vb.coords.tolist())):
        members = groups[key]
        torch.testing.assert_close(vb.features[v], feats[members].mean(0))
        assert all(int(vb.inverse[p]) == v for p in members)


def test_cylindrical_cells_and_range_check() -> None:
    xyz = torch.tensor([[3.0, 4.0, 1.05], [0.0, -2.0, -0.3]])
    cells = grid_coordinates(xyz, 0.25, "cylindrical", angular_resolution_deg=2.0)
    assert cells.tolist() == [[20, math.floor(math.degrees(math.atan2(4, 3)) / 2), 4], [8, -45, -2]]
    with pytest.raises(DataError, match="voxel_size"):
        voxelize(torch.tensor([[40000, 0, 0]]), torch.zeros(1, dtype=torch.long), torch.zeros(1, 1))


def _cloud(gen: torch.Generator, n: int = 600) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    xyz = torch.randn(n, 3, generator=gen) * torch.tensor([3.0, 3.0, 0.7])
    batch_index = (torch.arange(n) >= n // 2).long()
    return xyz, batch_index, torch.randn(n, 2, generator=gen)


def test_unet_is_translation_equivariant_and_batches_independently() -> None:
    gen = torch.Generator().manual_seed(3)
    torch.manual_seed(0)
    net = VoxelUNet(2, widths=(4, 8, 8), blocks=1, out_dim=6).double().eval()
    xyz, batch_index, feats = _cloud(gen)
    feats = feats.double()
    cells = grid_coordinates(xyz, 0.25)
    out = net(voxelize(cells, batch_index, feats))
    assert out.shape == (600, 6)
    torch.testing.assert_close(out.norm(dim=1), torch.ones(600, dtype=torch.float64))
    shift = torch.tensor([4, -8, 12])  # multiples of 2^(levels-1) keep every coarse cell's content
    torch.testing.assert_close(net(voxelize(cells + shift, batch_index, feats)), out)
    first = batch_index == 0
    alone = net(voxelize(cells[first], batch_index[first], feats[first]))
    torch.testing.assert_close(alone, out[first])


def test_unet_gradients_reach_every_parameter() -> None:
    gen = torch.Generator().manual_seed(4)
    torch.manual_seed(0)
    net = VoxelUNet(2, widths=(4, 8, 16), blocks=2, out_dim=5)
    xyz, batch_index, feats = _cloud(gen)
    out = net(voxelize(grid_coordinates(xyz, 0.3), batch_index, feats))
    (out * torch.randn(out.shape, generator=gen)).sum().backward()
    for name, p in net.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def _res16unet_parameters(in_channels: int, init_dim: int, planes, layers, out_dim: int) -> int:
    """Parameter count of MinkowskiEngine's Res16UNet by hand, from its layout (3x3x3 kernels = 27 weights per
    channel pair, 2x2x2 = 8, no conv biases, BatchNorm weight + bias, a 1x1x1 conv + BN shortcut where a block
    changes width, a final 1x1x1 layer with bias)."""
    def blocks(c_in: int, c_out: int, count: int) -> int:
        total = 0
        for i in range(count):
            c = c_in if i == 0 else c_out
            total += 27 * c * c_out + 2 * c_out + 27 * c_out * c_out + 2 * c_out
            total += c * c_out + 2 * c_out if c != c_out else 0
        return total

    total = 27 * in_channels * init_dim + 2 * init_dim
    width = init_dim
    for s in range(4):
        total += 8 * width * width + 2 * width + blocks(width, planes[s], layers[s])
        width = planes[s]
    for s, skip in zip(range(4, 8), (planes[2], planes[1], planes[0], init_dim)):
        total += 8 * width * planes[s] + 2 * planes[s] + blocks(planes[s] + skip, planes[s], layers[s])
        width = planes[s]
    return total + planes[7] * out_dim + out_dim


def test_res16unet34c_has_the_authors_layout() -> None:
    net = Res16UNet(1, out_dim=64)
    assert net.feature_dim == 96
    assert [len(b) for b in net.enc_blocks] + [len(b) for b in net.dec_blocks] == [2, 3, 4, 6, 2, 2, 2, 2]
    # decoder inputs: upsampled width + the skip's width, as MinkUNet's block5..block8 inplanes
    assert [b[0].conv1.weight.shape[1] for b in net.dec_blocks] == [256 + 128, 128 + 64, 96 + 32, 96 + 32]
    expected = _res16unet_parameters(1, 32, (32, 64, 128, 256, 256, 128, 96, 96), (2, 3, 4, 6, 2, 2, 2, 2), 64)
    assert sum(p.numel() for p in net.parameters()) == expected
    small = Res16UNet(2, planes=(4, 8, 8, 12, 8, 8, 6, 6), layers=(1, 2, 1, 1, 1, 1, 1, 2), init_dim=4, out_dim=3)
    assert sum(p.numel() for p in small.parameters()) == _res16unet_parameters(
        2, 4, (4, 8, 8, 12, 8, 8, 6, 6), (1, 2, 1, 1, 1, 1, 1, 2), 3)


def test_res16unet_is_translation_equivariant_and_batches_independently() -> None:
    gen = torch.Generator().manual_seed(5)
    torch.manual_seed(0)
    net = Res16UNet(2, planes=(4, 8, 8, 8, 8, 8, 6, 6), layers=(1, 1, 1, 1, 1, 1, 1, 1), init_dim=4,
                    out_dim=5).double().eval()
    xyz, batch_index, feats = _cloud(gen)
    cells = grid_coordinates(xyz, 0.2)
    out = net(voxelize(cells, batch_index, feats.double()))
    assert out.shape == (600, 5) and net.features(voxelize(cells, batch_index, feats.double())).shape == (600, 6)
    shift = torch.tensor([16, -32, 48])  # four stride-2 levels: multiples of 16 keep every coarse cell's content
    torch.testing.assert_close(net(voxelize(cells + shift, batch_index, feats.double())), out)
    first = batch_index == 0
    torch.testing.assert_close(net(voxelize(cells[first], batch_index[first], feats[first].double())), out[first])
    odd = torch.tensor([1, 0, 0])  # a shift the coarse grid does not absorb changes the output
    assert not torch.allclose(net(voxelize(cells + odd, batch_index, feats.double())), out)


def test_res16unet_gradients_reach_every_parameter() -> None:
    gen = torch.Generator().manual_seed(6)
    torch.manual_seed(0)
    net = Res16UNet(2, planes=(4, 8, 8, 8, 8, 8, 6, 6), layers=(1, 2, 1, 1, 1, 1, 1, 1), init_dim=4, out_dim=3)
    xyz, batch_index, feats = _cloud(gen)
    out = net(voxelize(grid_coordinates(xyz, 0.2), batch_index, feats))
    (out * torch.randn(out.shape, generator=gen)).sum().backward()
    for name, p in net.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
