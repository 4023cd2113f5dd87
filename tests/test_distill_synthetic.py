"""Built-in driving scenes: determinism, class balance, lidar/camera agreement, real occlusion.

Solid membership is checked with inside-tests written here, independent of the ray caster.
"""

import numpy as np
import pytest

from xmcl.distill.geometry import point_pixel_pairs, project_points
from xmcl.distill.synthetic import (
    BUILDING,
    CLASS_NAMES,
    PEDESTRIAN,
    ROAD,
    SyntheticScenes,
    generate_scene,
    random_layout,
)
from xmcl.errors import ConfigError


@pytest.fixture(scope="module")
def scene_and_layout():
    return generate_scene(7, num_points_target=12000), random_layout(7)


def inside_solids(layout, xyz: np.ndarray, grow: float = 0.0) -> np.ndarray:
    """(N, K) membership of points in every solid of the layout (boxes, cylinders, spheres), grown by ``grow``."""
    if len(xyz) > 4096:
        return np.concatenate([inside_solids(layout, xyz[i:i + 4096], grow) for i in range(0, len(xyz), 4096)])
    b = layout.boxes
    rel = xyz[:, None, :] - b.centre[None]
    c, s = np.cos(b.yaw), np.sin(b.yaw)
    local = np.stack([c * rel[..., 0] + s * rel[..., 1], -s * rel[..., 0] + c * rel[..., 1], rel[..., 2]], -1)
    in_box = (np.abs(local) <= b.half + grow).all(axis=-1)
    cy = layout.cylinders
    radial = np.linalg.norm(xyz[:, None, :2] - cy.centre_xy[None], axis=-1)
    in_cyl = (radial <= cy.radius + grow) & (xyz[:, None, 2] >= cy.z_range[:, 0] - grow) \
        & (xyz[:, None, 2] <= cy.z_range[:, 1] + grow)
    sp = layout.spheres
    in_sph = np.linalg.norm(xyz[:, None, :] - sp.centre[None], axis=-1) <= sp.radius + grow
    return np.concatenate([in_box, in_cyl, in_sph], axis=1)


def solid_labels(layout) -> np.ndarray:
    return np.concatenate([layout.boxes.label, layout.cylinders.label, layout.spheres.label])


def test_same_seed_same_scene_other_seed_other_scene() -> None:
    a, b, c = generate_scene(3, 4000), generate_scene(3, 4000), generate_scene(4, 4000)
    np.testing.assert_array_equal(a.points, b.points)
    np.testing.assert_array_equal(a.labels, b.labels)
    for ca, cb in zip(a.cameras, b.cameras):
        np.testing.assert_array_equal(ca.image, cb.image)
        np.testing.assert_array_equal(ca.lidar_to_image, cb.lidar_to_image)
    assert a.points.shape != c.points.shape or not np.array_equal(a.points, c.points)
    assert not np.array_equal(a.cameras[0].image, c.cameras[0].image)


def test_scene_shapes_and_point_count(scene_and_layout) -> None:
    scene, _ = scene_and_layout
    assert scene.class_names == CLASS_NAMES
    assert abs(scene.num_points - 12000) <= 0.1 * 12000
    assert scene.points.dtype == np.float32 and scene.labels.shape == (scene.num_points,)
    assert ((scene.points[:, 3] >= 0) & (scene.points[:, 3] <= 1)).all()
    ranges = np.linalg.norm(scene.points[:, :3], axis=1)
    assert ranges.min() >= 0.9 and ranges.max() <= 70.1
    assert [c.image.shape for c in scene.cameras] == [(160, 320, 3)] * 2
    small = generate_scene(1, num_points_target=3000, image_size=(48, 64), num_cameras=3)
    assert abs(small.num_points - 3000) <= 300
    assert [c.image.shape for c in small.cameras] == [(48, 64, 3)] * 3


def test_camera_calibration_by_hand(scene_and_layout) -> None:
    scene, _ = scene_and_layout
    front, back = scene.cameras
    # camera 0 sits at (0.3, 0, -0.3) looking along +x; camera 1 at (-0.3, 0, -0.3) looking along -x;
    # 90 degree field of view on 320 columns: f = 160; pixel centres: cx = 159.5, cy = 79.5
    ahead = np.array([[10.3, 0.0, -0.3], [10.3, 1.0, -0.3], [-10.3, 1.0, 0.7]])
    uv, mask = project_points(ahead[:2], front.lidar_to_image, front.image_hw)
    assert mask.all()
    np.testing.assert_allclose(uv, [[159.5, 79.5], [159.5 - 16.0, 79.5]], atol=1e-9)
    uv, mask = project_points(ahead[2:], back.lidar_to_image, back.image_hw)
    assert mask.all()
    np.testing.assert_allclose(uv, [[159.5 + 16.0, 79.5 - 16.0]], atol=1e-9)


def test_class_imbalance_is_street_like() -> None:
    labels = np.concatenate([generate_scene(seed, 8000, image_size=(16, 32), num_cameras=1).labels
                             for seed in range(4)])
    fraction = np.bincount(labels, minlength=len(CLASS_NAMES)) / labels.size
    assert fraction[ROAD] > 0.2 and fraction[BUILDING] > 0.1
    assert fraction[ROAD] > 10 * fraction[PEDESTRIAN] and fraction[BUILDING] > 10 * fraction[PEDESTRIAN]
    assert (labels >= 0).all() and (fraction > 0).sum() >= 7


def test_points_project_onto_pixels_of_their_own_class(scene_and_layout) -> None:
    scene, _ = scene_and_layout
    for camera, (idx, pixels) in zip(scene.cameras, point_pixel_pairs(scene)):
        assert idx.size > 0.15 * scene.num_points
        pixel_class = camera.labels[pixels[:, 1], pixels[:, 0]]
        assert (pixel_class == scene.labels[idx]).mean() > 0.9, camera.name
        # colour carries the classes (most colour variance lies between classes) but regions are textured
        image = camera.image.reshape(-1, 3).astype(float)
        pixel_labels = camera.labels.ravel()
        total = ((image - image.mean(axis=0)) ** 2).sum()
        within = sum(((image[pixel_labels == k] - image[pixel_labels == k].mean(axis=0)) ** 2).sum()
                     for k in np.unique(pixel_labels))
        assert 1 - within / total > 0.5
        assert image[pixel_labels == ROAD].std(axis=0).min() > 2.0


def test_points_lie_on_a_surface_of_their_class_with_nothing_in_front(scene_and_layout) -> None:
    scene, layout = scene_and_layout
    rng = np.random.default_rng(0)
    pick = rng.choice(scene.num_points, 600, replace=False)
    xyz = scene.points[pick, :3].astype(np.float64)
    labels = scene.labels[pick]
    # on a surface: within 10 cm (6 noise sigmas) of a solid of the point's class, or of the ground
    near = inside_solids(layout, xyz, grow=0.1) & (solid_labels(layout)[None] == labels[:, None])
    on_ground = np.isin(labels, [ROAD, CLASS_NAMES.index("terrain")]) & (np.abs(xyz[:, 2] - layout.ground_z) < 0.1)
    assert (near.any(axis=1) | on_ground).all()
    # occlusion: samples along the ray up to 15 cm before the return are in free space
    ranges = np.linalg.norm(xyz, axis=1)
    fractions = np.linspace(0.02, 1.0, 120)
    samples = (xyz / ranges[:, None])[:, None, :] * (fractions[None, :, None] * (ranges[:, None, None] - 0.15))
    flat = samples.reshape(-1, 3)
    blocked = inside_solids(layout, flat).any(axis=1) | (flat[:, 2] < layout.ground_z)
    assert not blocked.any()


def test_synthetic_scenes_dataset() -> None:
    data = SyntheticScenes(3, seed=5, num_points_target=2000, image_size=(24, 48), num_cameras=1)
    assert len(data) == 3
    first = data[0]
    np.testing.assert_array_equal(first.points, data[0].points)
    np.testing.assert_array_equal(data[-1].points, data[2].points)
    assert not np.array_equal(first.points[:100], data[1].points[:100])
    other = SyntheticScenes(3, seed=6, num_points_target=2000, image_size=(24, 48), num_cameras=1)
    assert other.scene_seed(0) != data.scene_seed(0)
    with pytest.raises(IndexError):
        data[3]
    with pytest.raises(ConfigError, match="num_points_target"):
        generate_scene(0, num_points_target=10)
