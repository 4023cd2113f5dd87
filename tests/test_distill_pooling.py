"""Superpixel pooling against a Python loop over superpixels."""

import pytest
import torch

from xmcl.distill.pooling import build_superpixel_pooling, global_superpixel_ids
from xmcl.errors import DataError


def test_pooling_matches_loop_and_drops_superpixels_without_points() -> None:
    gen = torch.Generator().manual_seed(0)
    maps = [torch.randint(0, 6, (5, 7), generator=gen), torch.randint(0, 4, (4, 6), generator=gen)]
    pixel_sp, offsets = global_superpixel_ids(maps)
    assert offsets == [0, int(maps[0].max()) + 1]
    num_pixels, num_points = pixel_sp.shape[0], 40
    pair_point = torch.randint(0, num_points, (25,), generator=gen)
    pair_point[-1] = pair_point[0]  # one point seen by both images
    pair_pixel = torch.randint(0, num_pixels, (25,), generator=gen)
    pair_pixel[0], pair_pixel[-1] = 3, num_pixels - 2
    point_feats = torch.randn(num_points, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    pixel_feats = torch.randn(num_pixels, 2, generator=gen, dtype=torch.float64)

    pooling = build_superpixel_pooling(pair_point, pair_pixel, num_points, pixel_sp)
    f, g = pooling.pool_points(point_feats), pooling.pool_pixels(pixel_feats)

    seen = sorted({int(pixel_sp[p]) for p in pair_pixel})
    assert pooling.superpixel_ids.tolist() == seen
    assert len(seen) < int(pixel_sp.max()) + 1  # some superpixels got no point and were dropped
    for k, sp in enumerate(seen):
        members = [int(pair_point[i]) for i in range(25) if int(pixel_sp[pair_pixel[i]]) == sp]
        torch.testing.assert_close(f[k], point_feats[members].mean(0))
        torch.testing.assert_close(g[k], pixel_feats[pixel_sp == sp].mean(0))
    f.sum().backward()
    counts = torch.bincount(pair_point, minlength=num_points)
    assert torch.equal(point_feats.grad[:, 0] != 0, counts > 0)  # gradient reaches exactly the paired points


def test_pooling_rejects_empty_and_out_of_range_pairs() -> None:
    pixel_sp = torch.zeros(10, dtype=torch.long)
    empty = torch.zeros(0, dtype=torch.long)
    with pytest.raises(DataError, match="no point projects"):
        build_superpixel_pooling(empty, empty, 5, pixel_sp)
    with pytest.raises(DataError, match="pixel index"):
        build_superpixel_pooling(torch.tensor([0]), torch.tensor([10]), 5, pixel_sp)
