"""Reader of the KITTI object layout (also used by other data sets converted to it).

::

    root/velodyne/NNNNNN.bin   float32 x 4 (x, y, z, reflectance) in the velodyne frame
    root/image_2/NNNNNN.png    left colour camera
    root/calib/NNNNNN.txt      "P0: ...", ..., "P2: <12>", "R0_rect: <9>", "Tr_velo_to_cam: <12>"
    root/label_2/NNNNNN.txt    optional 3D boxes, one object per line (camera coordinates)

The camera's projection is ``P2 @ R0_rect @ Tr_velo_to_cam``. KITTI object frames carry boxes,
not per-point classes, so scenes have ``labels=None``: as ``data.source`` "kitti" (``kitti_scans``) the frames of
``data.root`` serve pretraining, not the probe.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from xmcl.distill.config import DistillDataConfig
from xmcl.distill.geometry import kitti_lidar_to_image, pad_to_4x4
from xmcl.distill.scanset import ScanSet
from xmcl.distill.scene import CameraView, PointLimits, Scene, read_points_bin, read_rgb_image
from xmcl.errors import DataError

CALIB_SHAPES = {"P2": (3, 4), "R0_rect": (3, 3), "Tr_velo_to_cam": (3, 4)}


@dataclass(frozen=True)
class KittiCalibration:
    """The three matrices of a KITTI calib file that map velodyne points onto image 2."""

    p2: np.ndarray
    r0_rect: np.ndarray
    tr_velo_to_cam: np.ndarray

    @property
    def lidar_to_image(self) -> np.ndarray:
        """(4, 4) ``P2 @ R0_rect @ Tr_velo_to_cam``."""
        return kitti_lidar_to_image(self.p2, self.r0_rect, self.tr_velo_to_cam)

    @property
    def lidar_to_camera(self) -> np.ndarray:
        """(4, 4) velodyne -> rectified camera 0 frame (the frame of label_2 boxes): ``R0_rect @ Tr_velo_to_cam``."""
        return pad_to_4x4(self.r0_rect) @ pad_to_4x4(self.tr_velo_to_cam)


@dataclass(frozen=True)
class KittiObject:
    """One line of a label_2 file.

    ``bbox`` = (left, top, right, bottom) pixels in image 2; ``dimensions`` = (height, width,
    length) metres; ``location`` = bottom centre (x, y, z) in the rectified camera frame
    (y points down); ``rotation_y`` = yaw about the camera y axis.
    """

    type: str
    truncated: float
    occluded: int
    alpha: float
    bbox: tuple[float, float, float, float]
    dimensions: tuple[float, float, float]
    location: tuple[float, float, float]
    rotation_y: float


def read_calibration_matrices(path: Path | str, shapes: dict[str, tuple[int, int]]) -> dict[str, np.ndarray]:
    """The matrices ``shapes`` names (key -> (rows, columns)), float64, from a KITTI calibration file of
    "KEY: numbers" lines (an object ``calib/*.txt`` or an odometry ``calib.txt``); DataError naming the file and the
    key at fault."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: calibration file not found")
    values: dict[str, str] = {}
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        key, sep, rest = line.partition(":")
        if not sep:
            raise DataError(f"{path}:{number}: expected 'KEY: numbers', got {line.strip()[:60]!r}")
        values[key.strip()] = rest
    matrices = {}
    for key, shape in shapes.items():
        if key not in values:
            raise DataError(f"{path}: calibration has no '{key}' entry (found {sorted(values)})")
        try:
            numbers = np.array([float(v) for v in values[key].split()], dtype=np.float64)
        except ValueError as exc:
            raise DataError(f"{path}: '{key}' has a non-numeric value ({exc})") from exc
        if numbers.size != shape[0] * shape[1]:
            raise DataError(f"{path}: '{key}' needs {shape[0] * shape[1]} numbers, got {numbers.size}")
        matrices[key] = numbers.reshape(shape)
    return matrices


def read_kitti_calibration(path: Path | str) -> KittiCalibration:
    """Parse a KITTI object ``calib/*.txt``; raises DataError naming the file and the key at fault."""
    matrices = read_calibration_matrices(path, CALIB_SHAPES)
    return KittiCalibration(matrices["P2"], matrices["R0_rect"], matrices["Tr_velo_to_cam"])


def read_kitti_objects(path: Path | str) -> list[KittiObject]:
    """Parse a KITTI ``label_2/*.txt`` (15 fields per line, an optional 16th score is ignored)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: label file not found")
    objects = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) not in (15, 16):
            raise DataError(f"{path}:{number}: a KITTI object line has 15 fields, got {len(fields)}")
        try:
            v = [float(f) for f in fields[1:15]]
        except ValueError as exc:
            raise DataError(f"{path}:{number}: non-numeric field ({exc})") from exc
        objects.append(KittiObject(
            type=fields[0], truncated=v[0], occluded=int(v[1]), alpha=v[2],
            bbox=(v[3], v[4], v[5], v[6]), dimensions=(v[7], v[8], v[9]),
            location=(v[10], v[11], v[12]), rotation_y=v[13],
        ))
    return objects


def frame_stem(frame_id: str | int) -> str:
    """File stem of a frame: ints are zero-padded to six digits (8 -> '000008')."""
    return f"{frame_id:06d}" if isinstance(frame_id, int) else str(frame_id)


class KittiReader:
    """Frames of a KITTI-object-layout directory: ``KittiReader(root).scene("000008")``; point files are checked
    against ``limits`` (see ``PointLimits``)."""

    def __init__(self, root: Path | str, limits: PointLimits = PointLimits()) -> None:
        self.root, self.limits = Path(root), limits
        if not (self.root / "velodyne").is_dir():
            raise DataError(f"{self.root}: not a KITTI object directory (no 'velodyne/' folder)")

    def frame_ids(self) -> list[str]:
        """Sorted ids (file stems) of the frames that have a point file."""
        return sorted(p.stem for p in (self.root / "velodyne").glob("*.bin"))

    def _path(self, folder: str, frame_id: str | int, suffix: str) -> Path:
        return self.root / folder / f"{frame_stem(frame_id)}{suffix}"

    def calibration(self, frame_id: str | int) -> KittiCalibration:
        return read_kitti_calibration(self._path("calib", frame_id, ".txt"))

    def objects(self, frame_id: str | int) -> list[KittiObject]:
        """The frame's label_2 boxes; DataError if the layout has no label_2 file for it."""
        return read_kitti_objects(self._path("label_2", frame_id, ".txt"))

    def scene(self, frame_id: str | int, cameras: bool = True) -> Scene:
        """Points (full sweep, reflectance as intensity) and, when ``cameras``, camera 2 (``name='image_2'``)."""
        points = read_points_bin(self._path("velodyne", frame_id, ".bin"), num_fields=4, limits=self.limits)
        views = []
        if cameras:
            image = read_rgb_image(self._path("image_2", frame_id, ".png"))
            views.append(CameraView(image=image, lidar_to_image=self.calibration(frame_id).lidar_to_image,
                                    name="image_2"))
        return Scene(points=points, cameras=views, labels=None, name=f"{self.root.name}/{frame_stem(frame_id)}")


def kitti_scans(data: DistillDataConfig, split: str, cameras: bool) -> ScanSet:
    """The "pretrain" split: every frame of the KITTI-object-layout folder ``data.root``, in frame id order. The
    probe's splits are refused (DataError): the layout has no point labels."""
    if split != "pretrain":
        raise DataError(f"{data.root}: KITTI object frames carry boxes, not point labels, so they hold no {split} "
                        f"split; probe on a labelled source (synthetic, nuscenes or semantickitti)")
    reader = KittiReader(data.root)
    frames = reader.frame_ids()
    return ScanSet(f"{data.root}/{split}", len(frames), lambda i: reader.scene(frames[i], cameras=cameras), ())
