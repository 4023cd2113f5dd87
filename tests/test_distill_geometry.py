"""Rigid transforms, calibration chains and projection, against hand computations and scipy."""

import json
from pathlib import Path

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from xmcl.distill.geometry import (
    invert_rigid,
    kitti_lidar_to_image,
    nuscenes_lidar_to_image,
    pad_to_4x4,
    point_pixel_pairs,
    project_points,
    quaternion_to_matrix,
    rigid_transform,
)
from xmcl.distill.scene import CameraView, Scene
from xmcl.errors import DataError

FRAMES = Path(__file__).resolve().parents[2] / "shared" / "data" / "lidar_frames"
needs_frames = pytest.mark.skipif(not FRAMES.is_dir(), reason="shared lidar frames not available")


def test_quaternion_matches_scipy_and_a_quarter_turn() -> None:
    rng = np.random.default_rng(0)
    for q in rng.normal(size=(20, 4)):
        expected = Rotation.from_quat([q[1], q[2], q[3], q[0]]).as_matrix()  # scipy takes (x, y, z, w)
        np.testing.assert_allclose(quaternion_to_matrix(q), expected, atol=1e-12)
    quarter_z = quaternion_to_matrix([np.cos(np.pi / 4), 0, 0, np.sin(np.pi / 4)])
    np.testing.assert_allclose(quarter_z @ [1, 0, 0], [0, 1, 0], atol=1e-12)
    with pytest.raises(DataError, match="norm"):
        quaternion_to_matrix([0, 0, 0, 0])


def test_rigid_transform_and_inverse() -> None:
    t = rigid_transform([1.0, 2.0, 3.0], [np.cos(0.3), 0.0, np.sin(0.3), 0.0])
    np.testing.assert_allclose(invert_rigid(t), np.linalg.inv(t), atol=1e-12)
    # the child origin lands on the translation
    np.testing.assert_allclose(t @ [0, 0, 0, 1], [1, 2, 3, 1])


def test_project_points_by_hand() -> None:
    k = np.array([[100.0, 0, 49.5], [0, 100, 20], [0, 0, 1]])
    m = pad_to_4x4(k)  # camera at the lidar origin, looking down +z
    points = np.array([
        [0.0, 0.0, 10.0],     # principal point (49.5, 20)
        [1.0, -0.5, 5.0],     # (69.5, 10)
        [-5.0, 0.0, 10.0],    # u = -0.5: the first column's left edge, inside
        [5.0, 0.0, 10.0],     # u = 99.5: the right edge of a 100-wide image, outside
        [0.0, 0.0, -10.0],    # behind
        [0.0, 0.0, 0.5],      # in front but nearer than min_depth
    ])
    uv, mask = project_points(points, m, (40, 100), min_depth=1.0)
    np.testing.assert_allclose(uv[[0, 1, 2]], [[49.5, 20], [69.5, 10], [-0.5, 20]])
    assert mask.tolist() == [True, True, True, False, False, False]


def test_point_pixel_pairs_round_to_the_nearest_pixel_centre() -> None:
    m = pad_to_4x4(np.array([[100.0, 0, 50], [0, 100, 20], [0, 0, 1]]))
    points = np.array([[0.0, 0, 10, 0], [2.0, 1.0, 10, 0], [1.2, -1.3, 8, 0], [0.0, 0, -10, 0]])
    cameras = [CameraView(np.zeros((40, 100, 3), np.uint8), m, "a"),
               CameraView(np.zeros((10, 10, 3), np.uint8), m, "b")]
    (idx_a, px_a), (idx_b, px_b) = point_pixel_pairs(Scene(points=points, cameras=cameras, labels=None))
    # u = 100 x / z + 50, v = 100 y / z + 20: (50, 20), (70, 30), (65, 3.75 -> 4); the last is behind
    assert idx_a.tolist() == [0, 1, 2]
    assert px_a.tolist() == [[50, 20], [70, 30], [65, 4]]
    assert idx_b.size == 0 and px_b.shape == (0, 2)


def test_nuscenes_chain_with_ego_motion_by_hand() -> None:
    # lidar frame = ego frame; the ego drives 2 m along global x between the lidar and the camera;
    # the camera sits at the ego origin looking along ego +x (camera z), right = ego -y, down = ego -z.
    cam_axes = np.array([[0.0, 0, 1], [-1, 0, 0], [0, -1, 0]])  # columns: camera x, y, z in ego coordinates
    cam_to_ego = np.eye(4)
    cam_to_ego[:3, :3] = cam_axes
    ego_lidar = np.eye(4)
    ego_camera = np.eye(4)
    ego_camera[0, 3] = 2.0
    k = np.array([[10.0, 0, 5], [0, 10, 5], [0, 0, 1]])
    m = nuscenes_lidar_to_image(np.eye(4), ego_lidar, ego_camera, cam_to_ego, k)
    # a point 12 m ahead and 1 m to the left of the lidar is 10 m ahead of the camera: u = 5 - 10 * 1 / 10
    uv, mask = project_points(np.array([[12.0, 1.0, 0.0]]), m, (10, 10))
    assert mask[0]
    np.testing.assert_allclose(uv[0], [4.0, 5.0])


@needs_frames
def test_kitti_chain_equals_the_info_files_lidar2img() -> None:
    info = json.loads((FRAMES / "kitti_000008" / "info.json").read_text())["data_list"][0]
    p2 = np.array((FRAMES / "kitti_000008" / "000008.txt").read_text().split(), dtype=float).reshape(4, 4)[:3]
    r0 = np.array(info["images"]["R0_rect"])[:3, :3]
    tr = np.array(info["lidar_points"]["Tr_velo_to_cam"])[:3]
    expected = np.array(info["images"]["CAM2"]["lidar2img"])
    np.testing.assert_allclose(kitti_lidar_to_image(p2, r0, tr), expected, rtol=1e-5, atol=1e-4)


@needs_frames
def test_nuscenes_shared_pose_chain_is_within_ego_motion_of_the_info_lidar2cam() -> None:
    info = json.loads((FRAMES / "nuscenes_keyframe" / "info.json").read_text())["data_list"][0]
    lidar_to_ego = np.array(info["lidar_points"]["lidar2ego"])
    ego = np.array(info["ego2global"])
    for name, cam in info["images"].items():
        chain = nuscenes_lidar_to_image(lidar_to_ego, ego, ego, np.array(cam["cam2ego"]), np.eye(3))
        given = np.array(cam["lidar2cam"])
        seconds = abs(cam["timestamp"] - info["timestamp"])
        # the info's lidar2cam includes the ego's motion between the two timestamps (< 15 m/s here)
        assert np.linalg.norm(chain[:3, 3] - given[:3, 3]) <= 15.0 * seconds + 0.01, name
        angle = np.degrees(np.arccos(np.clip((np.trace(chain[:3, :3].T @ given[:3, :3]) - 1) / 2, -1, 1)))
        assert angle < 0.5, name
