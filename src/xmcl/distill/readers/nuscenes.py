"""Reader of nuScenes keyframes from the devkit's JSON tables, and the table helpers the nuScenes readers share.

Tables (``root/<version>/``): ``sample.json``, ``sample_data.json``, ``calibrated_sensor.json``,
``ego_pose.json`` and ``sensor.json`` (channel names); files under ``root/samples/``. Each
camera is projected through the full chain at its own timestamp (see
:func:`xmcl.distill.geometry.nuscenes_lidar_to_image`): lidar -> ego(t_lidar) -> global ->
ego(t_camera) -> camera -> image.

nuScenes ``.pcd.bin`` points are float32 x 5 (x, y, z, intensity 0..255, ring); scenes keep
x, y, z and intensity / 255. No per-point classes are read: ``labels=None``. Point files are checked against the
readers' ``PointLimits`` (size against the layout, empty, finite, plausible ranges) and nuScenes' ring column.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from xmcl.distill.geometry import nuscenes_lidar_to_image, rigid_transform
from xmcl.distill.scene import CameraView, PointLimits, Scene, read_points_bin, read_rgb_image
from xmcl.errors import DataError

NUSCENES_POINT_FIELDS = 5
NUSCENES_MAX_INTENSITY = 255.0
NUSCENES_MAX_RING = 128  # ring (laser) indices lie in [0, 128): 32 on nuScenes' LIDAR_TOP
TABLES = ("sample", "sample_data", "calibrated_sensor", "ego_pose", "sensor")


def read_table(path: Path, hint: str = "") -> list[dict[str, Any]]:
    """The records of a nuScenes JSON table (a JSON list); DataError naming the file when it is missing (with
    ``hint``), not JSON or not a list."""
    if not path.is_file():
        raise DataError(f"{path}: file not found{f' ({hint})' if hint else ''}")
    try:
        rows = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: invalid JSON ({exc})") from exc
    if not isinstance(rows, list):
        raise DataError(f"{path}: expected a JSON list of records")
    return rows


def field(record: dict, key: str, where: str) -> Any:
    """``record[key]``; DataError "``where``: missing field" when absent."""
    if key not in record:
        raise DataError(f"{where}: missing field '{key}'")
    return record[key]


def _intrinsic(value: Any, where: str) -> np.ndarray:
    """A camera's (3, 3) intrinsic matrix, float64."""
    try:
        m = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise DataError(f"{where}: not a numeric matrix ({exc})") from exc
    if m.shape != (3, 3):
        raise DataError(f"{where}: expected a matrix of shape (3, 3), got {m.shape}")
    return m


def _read_sweep(path: Path, limits: PointLimits) -> np.ndarray:
    """(P, 4) x, y, z, intensity / 255 of a nuScenes ``.pcd.bin`` (checked against ``limits``); its fifth column, the
    ring index, must be a whole number in [0, NUSCENES_MAX_RING) (a strong check that the file has this layout)."""
    points = read_points_bin(path, NUSCENES_POINT_FIELDS, limits)
    rings = points[:, 4]
    bad = (rings != np.round(rings)) | (rings < 0) | (rings >= NUSCENES_MAX_RING)
    if bad.any():
        raise DataError(f"{path}: {int(bad.sum())} of {len(points)} points have a ring index that is not a "
                        f"whole number in [0, {NUSCENES_MAX_RING}) (first: {float(rings[bad][0]):.4g}); the "
                        f"file is not nuScenes' {NUSCENES_POINT_FIELDS} float32 fields per point")
    points = points[:, :4].copy()
    points[:, 3] *= 1.0 / NUSCENES_MAX_INTENSITY
    return points


class NuScenesReader:
    """Keyframes of a nuScenes release read from its JSON tables: ``NuScenesReader(root, "v1.0-mini")``."""

    def __init__(self, root: Path | str, version: str = "v1.0-mini", limits: PointLimits = PointLimits()) -> None:
        self.root, self.limits = Path(root), limits
        table_dir = self.root / version
        if not table_dir.is_dir():
            raise DataError(f"{table_dir}: nuScenes table folder not found")
        tables = {}
        for name in TABLES:
            path = table_dir / f"{name}.json"
            tables[name] = {field(row, "token", f"{path} (a record)"): row for row in read_table(path)}
        self._tables = tables
        self._table_dir = table_dir
        self._keyframes: dict[str, dict[str, dict]] = {token: {} for token in tables["sample"]}
        for token, row in tables["sample_data"].items():
            where = f"{table_dir / 'sample_data.json'} (token {token})"
            if not field(row, "is_key_frame", where):
                continue
            sample = field(row, "sample_token", where)
            if sample not in self._keyframes:
                raise DataError(f"{where}: refers to sample '{sample}', which sample.json does not have")
            self._keyframes[sample][self._channel(row, where)] = row

    def _lookup(self, table: str, token: str, where: str) -> dict:
        if token not in self._tables[table]:
            raise DataError(f"{where}: refers to {table} '{token}', which {table}.json does not have")
        return self._tables[table][token]

    def _channel(self, sample_data: dict, where: str) -> str:
        calib = self._lookup("calibrated_sensor", field(sample_data, "calibrated_sensor_token", where), where)
        sensor = self._lookup("sensor", field(calib, "sensor_token", where), where)
        return field(sensor, "channel", where)

    def _pose(self, table: str, token: str, where: str) -> np.ndarray:
        record = self._lookup(table, token, where)
        return rigid_transform(field(record, "translation", where), field(record, "rotation", where))

    def scene(self, sample_token: str, cameras: Sequence[str] | None = None, lidar: str = "LIDAR_TOP") -> Scene:
        """The sample's lidar keyframe and the keyframe images of ``cameras`` (default: all CAM_* channels, sorted)."""
        if sample_token not in self._keyframes:
            raise DataError(f"{self._table_dir / 'sample.json'}: no sample with token '{sample_token}'")
        frames = self._keyframes[sample_token]
        if lidar not in frames:
            raise DataError(f"sample '{sample_token}': no {lidar} keyframe in sample_data.json")
        lidar_row = frames[lidar]
        where = f"sample_data '{lidar_row['token']}'"
        lidar_to_ego = self._pose("calibrated_sensor", lidar_row["calibrated_sensor_token"], where)
        ego_at_lidar = self._pose("ego_pose", field(lidar_row, "ego_pose_token", where), where)
        points = _read_sweep(self.root / field(lidar_row, "filename", where), self.limits)
        names = sorted(c for c in frames if c.startswith("CAM")) if cameras is None else list(cameras)
        views = []
        for name in names:
            if name not in frames:
                raise DataError(f"sample '{sample_token}': no {name} keyframe in sample_data.json")
            row = frames[name]
            where = f"sample_data '{row['token']}'"
            calib = self._lookup("calibrated_sensor", row["calibrated_sensor_token"], where)
            intrinsic = _intrinsic(field(calib, "camera_intrinsic", where), f"{where} camera_intrinsic")
            matrix = nuscenes_lidar_to_image(
                lidar_to_ego, ego_at_lidar,
                self._pose("ego_pose", field(row, "ego_pose_token", where), where),
                rigid_transform(field(calib, "translation", where), field(calib, "rotation", where)),
                intrinsic,
            )
            image = read_rgb_image(self.root / field(row, "filename", where))
            views.append(CameraView(image=image, lidar_to_image=matrix, name=name))
        return Scene(points=points, cameras=views, labels=None, name=f"nuscenes/{sample_token}")
