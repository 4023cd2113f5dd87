"""The authors' augmentations keep images, superpixels and point-pixel pairs consistent; the factorised z equals the
upsample-then-average one; the per-step inputs are reproducible and recompute the backbone on the augmented images."""

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from xmcl.config import load_config
from xmcl.distill.augment import (
    CameraInputs,
    augment_points,
    crop_box,
    drop_cuboid,
    flip_horizontal,
    random_resized_crop,
    resized_crop,
)
from xmcl.distill.config import AugmentationConfig, DistillConfig
from xmcl.distill.networks import build_image_head, build_voxel_net
from xmcl.distill.objective import build_distill_loss, distillation_loss
from xmcl.distill.pooling import averaging_matrix, upsampled_superpixel_means
from xmcl.distill.preparation import DistillInputs, prepare_scene
from xmcl.distill.readers.sources import open_scans
from xmcl.distill.superpixels import SuperpixelCache

H, W = 60, 90


def ramp_camera(num_pairs: int = 500, seed: int = 0) -> CameraInputs:
    """An image whose red channel is 2 * row and green channel 2 * column, one superpixel id per pixel
    (row * W + col), and pairs at random pixels."""
    rows, cols = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
    image = torch.stack([2.0 * rows, 2.0 * cols, torch.full_like(rows, 7.0, dtype=torch.float32)], dim=2).float()
    g = torch.Generator().manual_seed(seed)
    return CameraInputs(image=image, superpixels=rows * W + cols, pair_point=torch.arange(num_pairs),
                        pair_row=torch.randint(H, (num_pairs,), generator=g),
                        pair_col=torch.randint(W, (num_pairs,), generator=g))


def test_point_augmentation_is_a_rotation_about_z_then_axis_flips() -> None:
    xyz = torch.randn(50, 3, dtype=torch.float64)
    flips_seen = set()
    for seed in range(12):
        out = augment_points(xyz, torch.Generator().manual_seed(seed))
        draws = torch.rand(3, generator=torch.Generator().manual_seed(seed), dtype=torch.float32).tolist()
        angle = draws[0] * 2 * math.pi
        # rotate as complex numbers, then negate the axes whose draw fell under 1/2
        turned = torch.view_as_real(torch.view_as_complex(xyz[:, :2].contiguous()) * complex(math.cos(angle),
                                                                                            math.sin(angle)))
        expected = torch.cat([turned, xyz[:, 2:]], dim=1) * torch.tensor(
            [-1.0 if draws[1] < 0.5 else 1.0, -1.0 if draws[2] < 0.5 else 1.0, 1.0], dtype=torch.float64)
        torch.testing.assert_close(out, expected)
        flips_seen.add((draws[1] < 0.5, draws[2] < 0.5))
    assert len(flips_seen) == 4  # all four flip combinations occur over these seeds


def test_crop_box_stays_inside_and_respects_scale_and_ratio() -> None:
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        top, left, h, w = crop_box(900, 1600, (0.3, 1.0), (14 / 9, 17 / 9), g)
        assert 0 <= top and top + h <= 900 and 0 <= left and left + w <= 1600
        assert 0.3 - 0.01 <= h * w / (900 * 1600) <= 1.0
        assert 14 / 9 - 0.02 <= w / h <= 17 / 9 + 0.02
    # no box of this shape fits a square image: the centre crop of the nearest allowed aspect ratio
    assert crop_box(100, 100, (0.99, 1.0), (2.0, 3.0), g) == (25, 0, 50, 100)


def test_pure_crop_moves_pairs_onto_the_same_pixels_and_superpixels() -> None:
    cam = ramp_camera()
    out = resized_crop(cam, (10, 20, 30, 40), (30, 40))  # crop without resizing
    assert out.image.shape == (30, 40, 3)
    inside = (cam.pair_row >= 10) & (cam.pair_row < 40) & (cam.pair_col >= 20) & (cam.pair_col < 60)
    assert torch.equal(out.pair_point, cam.pair_point[inside])
    assert torch.equal(out.pair_row, cam.pair_row[inside] - 10)
    assert torch.equal(out.pair_col, cam.pair_col[inside] - 20)
    source_ids = cam.superpixels[cam.pair_row[inside], cam.pair_col[inside]]
    assert torch.equal(out.superpixels[out.pair_row, out.pair_col], source_ids)
    torch.testing.assert_close(out.image[out.pair_row, out.pair_col], cam.image[cam.pair_row[inside],
                                                                               cam.pair_col[inside]])


@pytest.mark.parametrize("box,size", [((5, 8, 40, 70), (80, 140)), ((0, 0, H, W), (24, 36)),
                                      ((3, 30, 50, 55), (50, 90))])
def test_resized_crop_keeps_each_pair_on_its_source_position(box, size) -> None:
    cam = ramp_camera()
    out = resized_crop(cam, box, size)
    top, left, h, w = box
    sy, sx = h / size[0], w / size[1]  # source pixels per output pixel
    src_row = cam.pair_row[out.pair_point]
    src_col = cam.pair_col[out.pair_point]
    # the output pixel's centre maps back within half an output pixel of the source pixel's centre
    back_row = top + (out.pair_row.double() + 0.5) * sy - 0.5
    back_col = left + (out.pair_col.double() + 0.5) * sx - 0.5
    assert ((back_row - src_row).abs() <= sy / 2 + 1e-9).all() and ((back_col - src_col).abs() <= sx / 2 + 1e-9).all()
    # the image and the superpixel map moved with them: the ramp's value and the id's pixel are where the pair is
    tolerance = 2.0 * (max(sy, sx) / 2 + 1.0)
    assert ((out.image[out.pair_row, out.pair_col, 0] - 2.0 * src_row).abs() <= tolerance).all()
    ids = out.superpixels[out.pair_row, out.pair_col]
    assert ((ids // W - src_row).abs() <= sy / 2 + 1).all() and ((ids % W - src_col).abs() <= sx / 2 + 1).all()
    # every pair whose source pixel lies inside the crop stays
    inside = ((cam.pair_row >= top) & (cam.pair_row < top + h) & (cam.pair_col >= left) & (cam.pair_col < left + w))
    assert out.num_pairs == int(inside.sum())


def test_random_crop_keeps_enough_pairs() -> None:
    cam = ramp_camera(num_pairs=2000)
    cfg = AugmentationConfig(crop_size=[40, 72], min_pairs=1024, min_pair_share=0.75)
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        out = random_resized_crop(cam, cfg, g)
        assert out.image.shape == (40, 72, 3)
        assert out.num_pairs > 1024 or out.num_pairs / cam.num_pairs > 0.75


def test_horizontal_flip_mirrors_image_superpixels_and_pairs() -> None:
    cam = ramp_camera()
    out = flip_horizontal(cam)
    assert torch.equal(out.pair_col, W - 1 - cam.pair_col) and torch.equal(out.pair_row, cam.pair_row)
    assert torch.equal(out.image[out.pair_row, out.pair_col], cam.image[cam.pair_row, cam.pair_col])
    assert torch.equal(out.superpixels[out.pair_row, out.pair_col], cam.superpixels[cam.pair_row, cam.pair_col])


def test_drop_cuboid_removes_one_box_and_renumbers_the_pairs() -> None:
    g0 = torch.Generator().manual_seed(0)
    points = torch.cat([torch.rand(3000, 3, generator=g0) * 20, torch.rand(3000, 1, generator=g0)], dim=1)
    cams = [CameraInputs(torch.zeros(8, 8, 3), torch.zeros(8, 8, dtype=torch.long), idx, idx % 8, idx // 8 % 8)
            for idx in (torch.arange(0, 3000, 2), torch.arange(1, 3000, 3))]
    dropped_any = False
    for seed in range(10):
        kept_points, moved = drop_cuboid(points, cams, min_pairs=10, generator=torch.Generator().manual_seed(seed))
        removed = ~torch.isin(points, kept_points).all(dim=1)
        if removed.any():
            dropped_any = True
            low, high = points[removed, :3].min(0).values, points[removed, :3].max(0).values
            strictly_inside = ((kept_points[:, :3] > low) & (kept_points[:, :3] < high)).all(dim=1)
            assert not strictly_inside.any()  # what was removed is the content of one box
        for before, after in zip(cams, moved):
            keep = ~removed[before.pair_point]
            assert torch.equal(kept_points[after.pair_point], points[before.pair_point[keep]])
            assert torch.equal(after.pair_row, before.pair_row[keep])
    assert dropped_any
    # an image that would keep fewer than min_pairs pairs: nothing is dropped, as the authors' loader
    same, untouched = drop_cuboid(points, cams, min_pairs=10_000, generator=torch.Generator().manual_seed(0))
    assert same is points and untouched is cams


def test_factorised_superpixel_means_equal_upsample_then_average() -> None:
    g = torch.Generator().manual_seed(0)
    for (h, w), (big_h, big_w) in (((6, 12), (96, 192)), ((5, 7), (37, 51)), ((14, 26), (56, 104))):
        feature_map = torch.randn(9, h, w, generator=g, dtype=torch.float64)
        sp = torch.randint(20, (big_h, big_w), generator=g)
        up = F.interpolate(feature_map[None], size=(big_h, big_w), mode="bilinear", align_corners=False)[0]
        cols = torch.arange(big_h * big_w)
        expected = torch.sparse.mm(averaging_matrix(sp.reshape(-1), cols, 20, big_h * big_w).double(),
                                   up.reshape(9, -1).T)
        torch.testing.assert_close(upsampled_superpixel_means(feature_map, sp, 20), expected)


TINY = ["data.pretrain_scenes=2", "data.num_points=1500", "data.image_size=[32,64]", "voxel.widths=[4,8]",
        "voxel.out_dim=8", "voxel.voxel_size=0.2", "image.backbone=resnet18", "image.weights=null",
        "image.resnet_width=8", "superpixels.n_segments=12", "run.device=cpu", "augmentation.crop_size=[24,40]",
        "augmentation.min_pairs=50"]


def test_augmented_inputs_are_reproducible_and_recomputed_per_step(tmp_path: Path) -> None:
    cfg = load_config(DistillConfig, None, TINY)
    torch.manual_seed(0)
    head = build_image_head(cfg)
    cache = SuperpixelCache(tmp_path, n_segments=12)
    scans = open_scans(cfg.data, "pretrain")
    inputs = DistillInputs(scans, head, cache, torch.device("cpu"), True, cfg.augmentation, seed=3,
                           keep_in_memory=True)
    a, b, c = inputs.batch([0, 1], 5), inputs.batch([0, 1], 5), inputs.batch([0, 1], 6)
    for x, y in zip(a, b):
        assert torch.equal(x.pair_pixel, y.pair_pixel) and torch.equal(x.backbone_maps[0], y.backbone_maps[0])
    assert any(not torch.equal(x.pair_pixel, y.pair_pixel) for x, y in zip(a, c))
    plain = prepare_scene(scans[0], head, cache, torch.device("cpu"), True)
    for scene in a:
        assert scene.image_sizes == [(24, 40)] * len(scene.image_sizes)
        assert scene.backbone_maps[0].shape[-2:] != plain.backbone_maps[0].shape[-2:]  # the cropped image's map
        assert int(scene.pair_pixel.max()) < scene.pixel_superpixel.shape[0]
        assert int(scene.pair_point.max()) < scene.points.shape[0] <= plain.points.shape[0]
        assert scene.semantic.shape[0] == scene.num_superpixels
    net, loss_fn = build_voxel_net(cfg.voxel), build_distill_loss(cfg)
    loss, k = distillation_loss(net, head, loss_fn, a, cfg.voxel, torch.Generator().manual_seed(0))
    assert torch.isfinite(loss) and k > 0
    # with the mixed augmentations off, the fixed inputs are those of prepare_scene
    off = AugmentationConfig(drop_cuboids=False, resized_crop=False, flip_horizontal=False)
    fixed = DistillInputs(scans, head, cache, torch.device("cpu"), True, off, seed=3, keep_in_memory=True)
    first = fixed.batch([0], 0)[0]
    assert fixed.batch([0], 9)[0] is first
    assert torch.equal(first.pair_pixel, plain.pair_pixel)
    np.testing.assert_allclose(first.semantic.numpy(), plain.semantic.numpy())
