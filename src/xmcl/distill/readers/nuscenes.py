"""Readers of nuScenes keyframes: the devkit's JSON tables, and the mmdet3d-style "info file".

Tables (``root/<version>/``): ``sample.json``, ``sample_data.json``, ``calibrated_sensor.json``,
``ego_pose.json`` and ``sensor.json`` (channel names); files under ``root/samples/``. Each
camera is projected through the full chain at its own timestamp (see
:func:`xmcl.distill.geometry.nuscenes_lidar_to_image`): lidar -> ego(t_lidar) -> global ->
ego(t_camera) -> camera -> image.

Info file (``{"metainfo": ..., "data_list": [...]}``): per frame ``lidar_points`` (``lidar_path``,
``num_pts_feats``, ``lidar2ego``), one ``ego2global`` and per camera ``img_path``, ``cam2img``,
``cam2ego`` and usually ``lidar2cam``. When ``lidar2cam`` is given it is used (the converter
built it with each camera's own ego pose); otherwise the cameras are taken to share the
frame's single ego pose, so the chain reduces to ``cam2img @ inv(cam2ego) @ lidar2ego``.
KITTI info files have the same layout and are read the same way.

nuScenes ``.pcd.bin`` points are float32 x 5 (x, y, z, intensity 0..255, ring); scenes keep
x, y, z and intensity / 255. No per-point classes are read: ``labels=None``. Point files are checked against the
readers' ``PointLimits`` (size against the layout, empty, finite, plausible ranges) and nuScenes' ring column.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from xmcl.distill.geometry import nuscenes_lidar_to_image, pad_to_4x4, rigid_transform
from xmcl.distill.scene import CameraView, PointLimits, Scene, read_points_bin, read_rgb_image
from xmcl.errors import DataError

NUSCENES_POINT_FIELDS = 5
NUSCENES_MAX_INTENSITY = 255.0
NUSCENES_MAX_RING = 128  # ring (laser) indices lie in [0, 128): 32 on nuScenes' LIDAR_TOP
TABLES = ("sample", "sample_data", "calibrated_sensor", "ego_pose", "sensor")


def _load_json(path: Path) -> Any:
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: invalid JSON ({exc})") from exc


def _field(record: dict, key: str, where: str) -> Any:
    if key not in record:
        raise DataError(f"{where}: missing field '{key}'")
    return record[key]


def _matrix(value: Any, shapes: tuple[tuple[int, int], ...], where: str) -> np.ndarray:
    try:
        m = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise DataError(f"{where}: not a numeric matrix ({exc})") from exc
    if m.shape not in shapes:
        raise DataError(f"{where}: expected a matrix of shape {' or '.join(map(str, shapes))}, got {m.shape}")
    return m


def _read_xyzi(path: Path, num_fields: int, intensity_scale: float, limits: PointLimits,
               ring: bool = False) -> np.ndarray:
    """(P, 4) x, y, z, intensity * intensity_scale from a float32 point file of ``num_fields`` columns (checked
    against ``limits``); ``ring``: the fifth column is nuScenes' ring index, which must be a whole number in
    [0, NUSCENES_MAX_RING) (a strong check that the file has this layout)."""
    points = read_points_bin(path, num_fields, limits)
    if ring and num_fields >= 5:
        rings = points[:, 4]
        bad = (rings != np.round(rings)) | (rings < 0) | (rings >= NUSCENES_MAX_RING)
        if bad.any():
            raise DataError(f"{path}: {int(bad.sum())} of {len(points)} points have a ring index that is not a "
                            f"whole number in [0, {NUSCENES_MAX_RING}) (first: {float(rings[bad][0]):.4g}); the "
                            f"file is not nuScenes' {num_fields} float32 fields per point")
    points = points[:, :4].copy()
    points[:, 3] *= intensity_scale
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
            rows = _load_json(path)
            if not isinstance(rows, list):
                raise DataError(f"{path}: expected a JSON list of records")
            tables[name] = {_field(row, "token", f"{path} (a record)"): row for row in rows}
        self._tables = tables
        self._table_dir = table_dir
        self._keyframes: dict[str, dict[str, dict]] = {token: {} for token in tables["sample"]}
        for token, row in tables["sample_data"].items():
            where = f"{table_dir / 'sample_data.json'} (token {token})"
            if not _field(row, "is_key_frame", where):
                continue
            sample = _field(row, "sample_token", where)
            if sample not in self._keyframes:
                raise DataError(f"{where}: refers to sample '{sample}', which sample.json does not have")
            self._keyframes[sample][self._channel(row, where)] = row

    def _lookup(self, table: str, token: str, where: str) -> dict:
        if token not in self._tables[table]:
            raise DataError(f"{where}: refers to {table} '{token}', which {table}.json does not have")
        return self._tables[table][token]

    def _channel(self, sample_data: dict, where: str) -> str:
        calib = self._lookup("calibrated_sensor", _field(sample_data, "calibrated_sensor_token", where), where)
        sensor = self._lookup("sensor", _field(calib, "sensor_token", where), where)
        return _field(sensor, "channel", where)

    def sample_tokens(self) -> list[str]:
        """Sample tokens in time order."""
        samples = self._tables["sample"]
        return sorted(samples, key=lambda t: _field(samples[t], "timestamp", f"sample '{t}'"))

    def _pose(self, table: str, token: str, where: str) -> np.ndarray:
        record = self._lookup(table, token, where)
        return rigid_transform(_field(record, "translation", where), _field(record, "rotation", where))

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
        ego_at_lidar = self._pose("ego_pose", _field(lidar_row, "ego_pose_token", where), where)
        points = _read_xyzi(self.root / _field(lidar_row, "filename", where), NUSCENES_POINT_FIELDS,
                            1.0 / NUSCENES_MAX_INTENSITY, self.limits, ring=True)
        names = sorted(c for c in frames if c.startswith("CAM")) if cameras is None else list(cameras)
        views = []
        for name in names:
            if name not in frames:
                raise DataError(f"sample '{sample_token}': no {name} keyframe in sample_data.json")
            row = frames[name]
            where = f"sample_data '{row['token']}'"
            calib = self._lookup("calibrated_sensor", row["calibrated_sensor_token"], where)
            intrinsic = _matrix(_field(calib, "camera_intrinsic", where), ((3, 3),), f"{where} camera_intrinsic")
            matrix = nuscenes_lidar_to_image(
                lidar_to_ego, ego_at_lidar,
                self._pose("ego_pose", _field(row, "ego_pose_token", where), where),
                rigid_transform(_field(calib, "translation", where), _field(calib, "rotation", where)),
                intrinsic,
            )
            image = read_rgb_image(self.root / _field(row, "filename", where))
            views.append(CameraView(image=image, lidar_to_image=matrix, name=name))
        return Scene(points=points, cameras=views, labels=None, name=f"nuscenes/{sample_token}")


class InfoFileReader:
    """Frames of an mmdet3d-style info file (nuScenes or KITTI): ``InfoFileReader(path).scene(0)``.

    Files are looked up as ``data_root/<path>`` and then ``data_root/samples/<channel>/<name>``
    (the nuScenes layout); ``data_root`` defaults to the info file's folder.
    """

    def __init__(self, info_path: Path | str, data_root: Path | str | None = None,
                 limits: PointLimits = PointLimits()) -> None:
        self.info_path, self.limits = Path(info_path), limits
        self.data_root = self.info_path.parent if data_root is None else Path(data_root)
        content = _load_json(self.info_path)
        if not isinstance(content, dict) or not isinstance(content.get("data_list"), list):
            raise DataError(f"{self.info_path}: expected an object with a 'data_list' list")
        self.frames: list[dict] = content["data_list"]
        metainfo = content.get("metainfo", {})
        dataset = str(metainfo.get("dataset", metainfo.get("DATASET", ""))).lower()
        self.is_nuscenes = dataset == "nuscenes"
        self.intensity_scale = 1.0 / NUSCENES_MAX_INTENSITY if self.is_nuscenes else 1.0

    def __len__(self) -> int:
        return len(self.frames)

    def _file(self, name: str, channel: str, where: str) -> Path:
        candidates = [self.data_root / name, self.data_root / "samples" / channel / Path(name).name]
        for path in candidates:
            if path.is_file():
                return path
        raise DataError(f"{where}: file '{name}' not found (looked in {', '.join(str(p) for p in candidates)})")

    def scene(self, index: int, cameras: Sequence[str] | None = None) -> Scene:
        """Frame ``index`` with the cameras that have an image (default: all, in file order)."""
        if not 0 <= index < len(self.frames):
            raise DataError(f"{self.info_path}: frame {index} requested, the file has {len(self.frames)}")
        frame = self.frames[index]
        where = f"{self.info_path} (frame {index})"
        lidar = _field(frame, "lidar_points", where)
        num_fields = int(lidar.get("num_pts_feats", NUSCENES_POINT_FIELDS))
        points = _read_xyzi(self._file(_field(lidar, "lidar_path", where), "LIDAR_TOP", where), num_fields,
                            self.intensity_scale, self.limits, ring=self.is_nuscenes)
        images = _field(frame, "images", where)
        if cameras is None:  # KITTI infos also keep non-camera entries (R0_rect) and image-less cameras here
            names = [n for n, v in images.items() if isinstance(v, dict) and v.get("img_path")]
        else:
            names = list(cameras)
        views = []
        for name in names:
            cam = _field(images, name, where)
            cam_where = f"{where} camera {name}"
            intrinsic = pad_to_4x4(_matrix(_field(cam, "cam2img", cam_where), ((3, 3), (3, 4), (4, 4)),
                                           f"{cam_where} cam2img"))
            if "lidar2cam" in cam:
                lidar_to_camera = _matrix(cam["lidar2cam"], ((4, 4),), f"{cam_where} lidar2cam")
                matrix = intrinsic @ lidar_to_camera
            else:
                ego = _matrix(_field(frame, "ego2global", where), ((4, 4),), f"{where} ego2global")
                matrix = nuscenes_lidar_to_image(
                    _matrix(_field(lidar, "lidar2ego", where), ((4, 4),), f"{where} lidar2ego"), ego, ego,
                    _matrix(_field(cam, "cam2ego", cam_where), ((4, 4),), f"{cam_where} cam2ego"), intrinsic,
                )
            image = read_rgb_image(self._file(_field(cam, "img_path", cam_where), name, cam_where))
            views.append(CameraView(image=image, lidar_to_image=matrix, name=name))
        token = frame.get("token", frame.get("sample_idx", frame.get("sample_id", index)))
        return Scene(points=points, cameras=views, labels=None, name=f"{self.info_path.parent.name}/{token}")
