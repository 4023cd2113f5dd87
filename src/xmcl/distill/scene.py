"""The one in-memory form of a lidar + camera frame that every reader and generator returns,
and the two raw-file loaders (point ``.bin`` files, RGB images) that every reader shares.

Conventions
-----------
* ``points`` are in the lidar frame, metres: columns x, y, z, intensity (float32); readers
  scale intensity to [0, 1] where the source uses another range.
* A camera is one 4x4 matrix ``M`` with ``M @ [x, y, z, 1]^T = [u*d, v*d, d, 1]^T`` for a
  lidar-frame point, ``d`` the depth along the optical axis, ``u`` the column and ``v`` the row;
  pixel centres are at integer ``(u, v)`` (see :mod:`xmcl.distill.geometry`).
* ``labels[i]`` is the semantic class of point ``i`` (an index into ``class_names``), ``-1``
  when unlabelled or ignored; ``CameraView.labels`` is the same for pixels, where known.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from xmcl.errors import DataError


@dataclass
class CameraView:
    """One camera image with its lidar-to-pixel projection.

    ``image`` (H, W, 3) uint8; ``lidar_to_image`` (4, 4) float64:
    ``[u*z, v*z, z, 1]^T = M @ [x, y, z, 1]^T``; ``labels`` optional (H, W) int64 per-pixel
    class (``-1`` = none, e.g. sky), given by generators that know it.
    """

    image: np.ndarray
    lidar_to_image: np.ndarray
    name: str = ""
    labels: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.image = np.asarray(self.image)
        self.lidar_to_image = np.asarray(self.lidar_to_image, dtype=np.float64)
        where = f"camera '{self.name}'"
        if self.image.ndim != 3 or self.image.shape[2] != 3 or self.image.dtype != np.uint8:
            raise DataError(f"{where}: image must be (H, W, 3) uint8, got {self.image.shape} {self.image.dtype}")
        if self.lidar_to_image.shape != (4, 4):
            raise DataError(f"{where}: lidar_to_image must be 4x4, got {self.lidar_to_image.shape}")
        if not np.isfinite(self.lidar_to_image).all():
            raise DataError(f"{where}: lidar_to_image has non-finite entries")
        if self.labels is not None:
            self.labels = np.asarray(self.labels, dtype=np.int64)
            if self.labels.shape != self.image.shape[:2]:
                raise DataError(f"{where}: pixel labels {self.labels.shape} do not match image {self.image.shape[:2]}")

    @property
    def image_hw(self) -> tuple[int, int]:
        return int(self.image.shape[0]), int(self.image.shape[1])


@dataclass
class Scene:
    """A lidar sweep with its cameras and optional per-point semantic labels.

    ``points`` (P, 4) float32 x, y, z, intensity in the lidar frame; ``labels`` (P,) int64 or None.
    """

    points: np.ndarray
    cameras: list[CameraView]
    labels: np.ndarray | None
    class_names: tuple[str, ...] = ()
    name: str = ""

    def __post_init__(self) -> None:
        self.points = np.ascontiguousarray(self.points, dtype=np.float32)
        where = f"scene '{self.name}'"
        if self.points.ndim != 2 or self.points.shape[1] != 4:
            raise DataError(f"{where}: points must be (P, 4) x, y, z, intensity, got {self.points.shape}")
        if not np.isfinite(self.points).all():
            raise DataError(f"{where}: points contain non-finite values")
        self.class_names = tuple(self.class_names)
        if self.labels is not None:
            self.labels = np.asarray(self.labels, dtype=np.int64)
            if self.labels.shape != (self.points.shape[0],):
                raise DataError(f"{where}: {self.points.shape[0]} points but labels of shape {self.labels.shape}")
            if self.class_names:
                bad = (self.labels < -1) | (self.labels >= len(self.class_names))
                if bad.any():
                    i = int(np.flatnonzero(bad)[0])
                    raise DataError(f"{where}: point {i} has label {int(self.labels[i])}, "
                                    f"but there are {len(self.class_names)} classes (and -1 = ignore)")

    @property
    def num_points(self) -> int:
        return int(self.points.shape[0])


@dataclass(frozen=True)
class PointLimits:
    """What a plausible lidar sweep holds, checked by ``read_points_bin``: at least ``min_points`` points, every
    value finite, coordinates within ``max_abs_coordinate`` metres of the sensor on each axis, and the raw
    intensity (the file's own scale: KITTI reflectance 0..1, nuScenes 0..255) within
    ``[min_intensity, max_intensity]``. Readers take one to accept other sensors."""

    min_points: int = 1
    max_abs_coordinate: float = 500.0
    min_intensity: float = 0.0
    max_intensity: float = 255.0


def read_points_bin(path: Path | str, num_fields: int, limits: PointLimits = PointLimits()) -> np.ndarray:
    """(P, num_fields) float32 from a raw little-endian float32 point file (KITTI ``.bin``, nuScenes ``.pcd.bin``):
    x, y, z, intensity, then any other fields. ``DataError`` naming the file when its size does not fit the
    layout, it is empty, or its values are not finite or fall outside ``limits`` (a file of another layout or
    dtype, e.g. float64, read as float32 gives such values)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: point file not found")
    size = path.stat().st_size
    record = 4 * num_fields
    if size % record != 0:
        raise DataError(f"{path}: {size} bytes is not a multiple of {record} "
                        f"({num_fields} float32 fields per point); wrong file or field count")
    points = np.fromfile(path, dtype="<f4").reshape(-1, num_fields)
    if len(points) < limits.min_points:
        raise DataError(f"{path}: {len(points)} points, fewer than the {limits.min_points} a sweep must hold"
                        if len(points) else f"{path}: the file holds no points")
    finite = np.isfinite(points).all(axis=1)
    if not finite.all():
        row = int(np.flatnonzero(~finite)[0])
        raise DataError(f"{path}: {int((~finite).sum())} of {len(points)} points hold NaN or infinite values "
                        f"(first: point {row}); the file is corrupt or not {num_fields} float32 fields per point")
    largest = float(np.abs(points[:, :3]).max())
    if largest > limits.max_abs_coordinate:
        raise DataError(f"{path}: coordinates reach {largest:.3g} m, beyond the plausible "
                        f"{limits.max_abs_coordinate:g} m; the file is not {num_fields} float32 fields per point "
                        f"(float64? another layout?) or is corrupt (PointLimits.max_abs_coordinate sets the bound)")
    low, high = float(points[:, 3].min()), float(points[:, 3].max())
    if low < limits.min_intensity or high > limits.max_intensity:
        raise DataError(f"{path}: intensities span [{low:.3g}, {high:.3g}], outside the plausible "
                        f"[{limits.min_intensity:g}, {limits.max_intensity:g}]; wrong layout or a corrupt file "
                        f"(PointLimits sets the range)")
    return points


def read_rgb_image(path: Path | str) -> np.ndarray:
    """(H, W, 3) uint8 RGB pixels of an image file (PNG, JPEG, ...)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: image file not found")
    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"), dtype=np.uint8)
    except (UnidentifiedImageError, OSError) as exc:
        raise DataError(f"{path}: not a readable image ({exc})") from exc
