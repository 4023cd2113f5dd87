"""Rigid transforms, calibration chains and the lidar-to-pixel projection.

Every camera ends up as one 4x4 matrix ``M`` (see :class:`xmcl.distill.scene.CameraView`):
``M @ [x, y, z, 1]^T = [u*d, v*d, d, 1]^T`` for a lidar-frame point, ``d`` the depth along the
optical axis. Pixel centres sit at integer ``(u, v)`` (the KITTI / nuScenes / OpenCV
convention), so a point falls on pixel ``(row, col) = (round(v), round(u))`` and is inside an
``H x W`` image when ``-0.5 <= u < W - 0.5`` and ``-0.5 <= v < H - 0.5``.
"""

from __future__ import annotations

import numpy as np

from xmcl.distill.scene import Scene
from xmcl.errors import DataError

DEFAULT_MIN_DEPTH = 1.0
"""Points nearer than this (metres) are not projected: at such range a lidar mostly sees the
ego vehicle itself (the nuScenes devkit uses the same 1 m cut)."""


def quaternion_to_matrix(q_wxyz: np.ndarray | list[float]) -> np.ndarray:
    """(3, 3) rotation of the unit quaternion ``q = (w, x, y, z)`` (normalised here).

    ``R = [[1-2(y²+z²), 2(xy-wz), 2(xz+wy)], [2(xy+wz), 1-2(x²+z²), 2(yz-wx)],
    [2(xz-wy), 2(yz+wx), 1-2(x²+y²)]]`` (Hamilton convention, as nuScenes stores it).
    """
    q = np.asarray(q_wxyz, dtype=np.float64)
    if q.shape != (4,):
        raise DataError(f"a quaternion needs 4 values (w, x, y, z), got shape {q.shape}")
    norm = float(np.linalg.norm(q))
    if not np.isfinite(norm) or norm < 1e-8:
        raise DataError(f"quaternion {q.tolist()} has no direction (norm {norm})")
    w, x, y, z = q / norm
    return np.array([
        [1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)],
        [2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)],
        [2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)],
    ])


def rigid_transform(translation: np.ndarray | list[float], rotation_wxyz: np.ndarray | list[float]) -> np.ndarray:
    """(4, 4) ``[[R, t], [0, 1]]`` mapping child-frame points into the parent frame."""
    t = np.asarray(translation, dtype=np.float64)
    if t.shape != (3,):
        raise DataError(f"a translation needs 3 values, got shape {t.shape}")
    out = np.eye(4)
    out[:3, :3] = quaternion_to_matrix(rotation_wxyz)
    out[:3, 3] = t
    return out


def invert_rigid(transform: np.ndarray) -> np.ndarray:
    """Inverse of a rigid 4x4 ``[[R, t], [0, 1]]``: ``[[R^T, -R^T t], [0, 1]]``."""
    r = transform[:3, :3]
    out = np.eye(4)
    out[:3, :3] = r.T
    out[:3, 3] = -r.T @ transform[:3, 3]
    return out


def pad_to_4x4(matrix: np.ndarray) -> np.ndarray:
    """Embed a 3x3 or 3x4 (or pass through a 4x4) matrix in the top-left of a 4x4 identity."""
    m = np.asarray(matrix, dtype=np.float64)
    if m.shape not in ((3, 3), (3, 4), (4, 4)):
        raise DataError(f"expected a 3x3, 3x4 or 4x4 matrix, got shape {m.shape}")
    out = np.eye(4)
    out[: m.shape[0], : m.shape[1]] = m
    return out


def kitti_lidar_to_image(p2: np.ndarray, r0_rect: np.ndarray, tr_velo_to_cam: np.ndarray) -> np.ndarray:
    """KITTI chain ``P2 @ R0_rect @ Tr_velo_to_cam`` (each padded to 4x4): velodyne -> image 2."""
    return pad_to_4x4(p2) @ pad_to_4x4(r0_rect) @ pad_to_4x4(tr_velo_to_cam)


def nuscenes_lidar_to_image(
    lidar_to_ego: np.ndarray,
    ego_to_global_at_lidar: np.ndarray,
    ego_to_global_at_camera: np.ndarray,
    camera_to_ego: np.ndarray,
    intrinsic: np.ndarray,
) -> np.ndarray:
    """nuScenes chain lidar -> ego(t_lidar) -> global -> ego(t_camera) -> camera -> image.

    ``K @ inv(cam2ego) @ inv(ego2global_cam) @ ego2global_lidar @ lidar2ego`` with ``K`` the 3x3
    intrinsic padded to 4x4. When the camera and the lidar share one ego pose (a single
    keyframe pose, as in info files), pass the same matrix twice and the global hop cancels.
    """
    return (
        pad_to_4x4(intrinsic)
        @ invert_rigid(camera_to_ego)
        @ invert_rigid(ego_to_global_at_camera)
        @ ego_to_global_at_lidar
        @ lidar_to_ego
    )


def project_points(
    points_xyz: np.ndarray,
    lidar_to_image: np.ndarray,
    image_hw: tuple[int, int],
    min_depth: float = DEFAULT_MIN_DEPTH,
) -> tuple[np.ndarray, np.ndarray]:
    """Project lidar-frame points into an image.

    Returns ``uv`` (P, 2) float64 (column u, row v; undefined where not masked) and ``mask`` (P,)
    bool: depth ``d > min_depth`` and ``-0.5 <= u < W - 0.5``, ``-0.5 <= v < H - 0.5``.
    """
    xyz = np.asarray(points_xyz, dtype=np.float64)
    if xyz.ndim != 2 or xyz.shape[1] != 3:
        raise DataError(f"points must be (P, 3) x, y, z, got shape {xyz.shape}")
    m = np.asarray(lidar_to_image, dtype=np.float64)
    if m.shape != (4, 4):
        raise DataError(f"lidar_to_image must be 4x4, got shape {m.shape}")
    height, width = image_hw
    projected = xyz @ m[:3, :3].T + m[:3, 3]
    depth = projected[:, 2]
    in_front = depth > min_depth
    uv = np.full((xyz.shape[0], 2), np.nan)
    uv[in_front] = projected[in_front, :2] / depth[in_front, None]
    with np.errstate(invalid="ignore"):
        inside = (
            (uv[:, 0] >= -0.5) & (uv[:, 0] < width - 0.5) & (uv[:, 1] >= -0.5) & (uv[:, 1] < height - 0.5)
        )
    return uv, in_front & inside


def point_pixel_pairs(scene: Scene, min_depth: float = DEFAULT_MIN_DEPTH) -> list[tuple[np.ndarray, np.ndarray]]:
    """For each camera, ``(point_idx (K,) int64, pixel_uv (K, 2) int64)`` of the points it sees.

    ``pixel_uv[:, 0]`` is the column and ``pixel_uv[:, 1]`` the row, so the pixel is
    ``image[pixel_uv[:, 1], pixel_uv[:, 0]]``. A point may appear in several cameras.
    """
    pairs = []
    for camera in scene.cameras:
        uv, mask = project_points(scene.points[:, :3], camera.lidar_to_image, camera.image_hw, min_depth)
        idx = np.flatnonzero(mask)
        pixels = np.rint(uv[idx]).astype(np.int64)
        pairs.append((idx.astype(np.int64), pixels))
    return pairs
