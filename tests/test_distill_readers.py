"""KITTI and nuScenes readers on the real frames in shared/ and on tiny files written here; the "kitti" source.

The box checks use independent box maths written below: a point inside an annotated 3D box
must project inside that object's annotated 2D box.
"""

import json
import re
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy.spatial.transform import Rotation

from xmcl.distill.geometry import project_points
from xmcl.distill.readers.kitti import KittiReader, read_kitti_calibration, read_kitti_objects
from xmcl.distill.readers.nuscenes import NuScenesReader
from xmcl.distill.readers.sources import open_scans
from xmcl.distill.scene import PointLimits, read_points_bin
from xmcl.errors import DataError
from xmcl.runtime.log import read_jsonl
from xmcl.training.distill_trainer import pretrain_distill

from helpers import distill_config

FRAMES = Path(__file__).resolve().parents[2] / "shared" / "data" / "lidar_frames"
needs_frames = pytest.mark.skipif(not FRAMES.is_dir(), reason="shared lidar frames not available")


def inside_kitti_box(cam_xyz: np.ndarray, location, dims_lhw, rotation_y: float) -> np.ndarray:
    """Camera-frame points inside a KITTI box (bottom centre ``location``, y down, yaw about y)."""
    length, height, width = dims_lhw
    rel = cam_xyz - np.asarray(location)
    c, s = np.cos(rotation_y), np.sin(rotation_y)
    along = c * rel[:, 0] - s * rel[:, 2]
    across = s * rel[:, 0] + c * rel[:, 2]
    return (np.abs(along) <= length / 2) & (np.abs(across) <= width / 2) & (rel[:, 1] <= 0) & (rel[:, 1] >= -height)


def kitti_box_corners(location, dims_lhw, rotation_y: float) -> np.ndarray:
    length, height, width = dims_lhw
    x = np.array([1, 1, -1, -1, 1, 1, -1, -1]) * length / 2
    z = np.array([1, -1, 1, -1, 1, -1, 1, -1]) * width / 2
    y = np.array([0, 0, 0, 0, -1, -1, -1, -1]) * height
    c, s = np.cos(rotation_y), np.sin(rotation_y)
    return np.stack([c * x + s * z, y, -s * x + c * z], axis=1) + np.asarray(location)


def in_bbox(uv: np.ndarray, bbox, margin: float = 2.0) -> np.ndarray:
    left, top, right, bottom = bbox
    return (uv[:, 0] >= left - margin) & (uv[:, 0] <= right + margin) & (uv[:, 1] >= top - margin) \
        & (uv[:, 1] <= bottom + margin)


def to_camera(points: np.ndarray, transform: np.ndarray) -> np.ndarray:
    return points[:, :3].astype(np.float64) @ transform[:3, :3].T + transform[:3, 3]


# ----------------------------------------------------------------------------- KITTI


@pytest.fixture
def kitti_000008(tmp_path: Path) -> Path:
    """The real frame 000008 laid out as a KITTI object directory, with a calib file in the real format
    written from 000008.txt (P2) and the info file's R0_rect and Tr_velo_to_cam."""
    src = FRAMES / "kitti_000008"
    info = json.loads((src / "info.json").read_text())["data_list"][0]
    for folder in ("velodyne", "image_2", "calib"):
        (tmp_path / folder).mkdir()
    (tmp_path / "velodyne" / "000008.bin").symlink_to(src / "000008.bin")
    (tmp_path / "image_2" / "000008.png").symlink_to(src / "000008.png")
    p2 = np.array((src / "000008.txt").read_text().split(), dtype=float).reshape(4, 4)[:3]
    r0 = np.array(info["images"]["R0_rect"])[:3, :3]
    tr = np.array(info["lidar_points"]["Tr_velo_to_cam"])[:3]

    def row(key: str, m: np.ndarray) -> str:
        return f"{key}: " + " ".join(f"{v:.12e}" for v in m.ravel())

    zeros = np.zeros(12)
    lines = [row("P0", zeros), row("P1", zeros), row("P2", p2), row("P3", zeros), row("R0_rect", r0),
             row("Tr_velo_to_cam", tr), row("Tr_imu_to_velo", zeros)]
    (tmp_path / "calib" / "000008.txt").write_text("\n".join(lines) + "\n")
    return tmp_path


@needs_frames
def test_kitti_reader_on_frame_000008(kitti_000008: Path) -> None:
    reader = KittiReader(kitti_000008)
    assert reader.frame_ids() == ["000008"]
    scene = reader.scene(8)
    assert scene.points.shape == (17238, 4) and scene.labels is None
    camera, = scene.cameras
    assert camera.image.shape == (375, 1242, 3)
    info = json.loads((FRAMES / "kitti_000008" / "info.json").read_text())["data_list"][0]
    np.testing.assert_allclose(camera.lidar_to_image, info["images"]["CAM2"]["lidar2img"], rtol=1e-5, atol=1e-4)
    uv, mask = project_points(scene.points[:, :3], camera.lidar_to_image, camera.image_hw)
    assert mask.mean() > 0.95  # this frame's points were already cut to the camera's view

    cam_xyz = to_camera(scene.points, reader.calibration(8).lidar_to_camera)
    boxes = [inst for inst in info["instances"] if inst["bbox_label_3d"] >= 0]
    assert len(boxes) == 6
    for inst in boxes:
        x, y, z, length, height, width, ry = inst["bbox_3d"]
        inside = inside_kitti_box(cam_xyz, (x, y, z), (length, height, width), ry)
        # the annotation's own count of points in the box (ground points at the box bottom add a few)
        assert abs(int(inside.sum()) - inst["num_lidar_pts"]) <= 0.1 * inst["num_lidar_pts"] + 3
        seen = inside & mask
        assert in_bbox(uv[seen], inst["bbox"]).mean() >= 0.9


@needs_frames
def test_kitti_layout_argoverse_frames_project_with_their_own_calibration() -> None:
    root = FRAMES / "argoverse_kitti_layout"
    reader = KittiReader(root)
    assert reader.frame_ids() == ["000000", "000001", "000002"]
    for frame in reader.frame_ids():
        calib = reader.calibration(frame)
        assert calib.p2[0, 0] == pytest.approx(973.5085, abs=1e-3)
        scene = reader.scene(frame)
        camera, = scene.cameras
        uv, mask = project_points(scene.points[:, :3], camera.lidar_to_image, camera.image_hw)
        assert 0.02 < mask.mean() < 0.5  # a full sweep; one forward camera sees a slice of it
        cam_xyz = to_camera(scene.points, calib.lidar_to_camera)
        boxes_with_points, in_2d, total = 0, 0, 0
        for obj in reader.objects(frame):
            h, w, length = obj.dimensions
            inside = inside_kitti_box(cam_xyz, obj.location, (length, h, w), obj.rotation_y) & mask
            if inside.sum() < 10:
                continue
            boxes_with_points += 1
            corners = kitti_box_corners(obj.location, (length, h, w), obj.rotation_y)
            assert (corners[:, 2] > 0).all()
            corner_uv = (corners @ calib.p2[:, :3].T + calib.p2[:, 3])
            corner_uv = corner_uv[:, :2] / corner_uv[:, 2:]
            lo, hi = corner_uv.min(axis=0) - 1.0, corner_uv.max(axis=0) + 1.0
            assert ((uv[inside] >= lo) & (uv[inside] <= hi)).all()
            left, top, right, bottom = obj.bbox
            if right - left > 5 and bottom - top > 5:  # boxes clipped to zero width carry no 2D extent
                in_2d += int(in_bbox(uv[inside], obj.bbox, margin=5.0).sum())
                total += int(inside.sum())
        assert boxes_with_points >= 10, frame
        # crowds of far pedestrians share points, so count over all boxes
        assert in_2d >= 0.95 * total, frame


@needs_frames
def test_kitti_source_pretrains_on_the_argoverse_frames(tmp_path: Path) -> None:
    """``data.source`` "kitti": the frames of a KITTI-object-layout folder, as its reader reads them, pretrain two
    steps; the probe's splits are refused (the layout has no point labels)."""
    root = FRAMES / "argoverse_kitti_layout"
    cfg = distill_config("optim.steps=2", "augmentation.crop_size=[64,112]", "augmentation.min_pairs=50",
                         "data.source=kitti", f"data.root={root}")
    scans, reader = open_scans(cfg.data, "pretrain"), KittiReader(root)
    assert len(scans) == 3 and scans.class_names == ()
    for index, frame in enumerate(reader.frame_ids()):
        scan, expected = scans[index], reader.scene(frame)
        assert scan.name == expected.name == f"argoverse_kitti_layout/{frame}" and scan.labels is None
        np.testing.assert_array_equal(scan.points, expected.points)
        np.testing.assert_array_equal(scan.cameras[0].lidar_to_image, expected.cameras[0].lidar_to_image)
    assert open_scans(cfg.data, "pretrain", cameras=False)[0].cameras == []
    assert len(open_scans(replace(cfg.data, max_scans=2), "pretrain")) == 2
    for split in ("probe_train", "eval"):
        with pytest.raises(DataError, match=rf"argoverse_kitti_layout: .*not point labels, so they hold no {split} "):
            open_scans(cfg.data, split)
    pretrain_distill(cfg, tmp_path / "run", progress=False)
    last = read_jsonl(tmp_path / "run" / "log.jsonl")[-1]
    assert last["step"] == 2 and np.isfinite(last["loss"]) and last["superpixels"] > 5


def test_kitti_errors_name_the_file_and_key(tmp_path: Path) -> None:
    calib = tmp_path / "calib.txt"
    calib.write_text("P2: " + " ".join(["1"] * 12) + "\nR0_rect: " + " ".join(["1"] * 9) + "\n")
    with pytest.raises(DataError, match=r"calib\.txt.*Tr_velo_to_cam"):
        read_kitti_calibration(calib)
    calib.write_text("P2: 1 2 3\nR0_rect: 1 0 0 0 1 0 0 0 1\nTr_velo_to_cam: " + " ".join(["0"] * 12) + "\n")
    with pytest.raises(DataError, match="'P2' needs 12 numbers, got 3"):
        read_kitti_calibration(calib)
    with pytest.raises(DataError, match="missing.txt"):
        read_kitti_calibration(tmp_path / "missing.txt")
    bad_bin = tmp_path / "bad.bin"
    bad_bin.write_bytes(np.zeros(7, np.float32).tobytes())
    with pytest.raises(DataError, match=r"bad\.bin.*28 bytes is not a multiple of 16"):
        read_points_bin(bad_bin, 4)
    labels = tmp_path / "label.txt"
    labels.write_text("Car 0 0 0 1 2 3 4 1.5 1.6 4.0 1 2 10 0.1\nCar 0 0\n")
    with pytest.raises(DataError, match=r"label\.txt:2"):
        read_kitti_objects(labels)
    with pytest.raises(DataError, match="velodyne"):
        KittiReader(tmp_path)


def test_kitti_objects_parse_fields(tmp_path: Path) -> None:
    labels = tmp_path / "000001.txt"
    labels.write_text("  Pedestrian 0.5 1 -2.38 10.0 296.0 20.0 494.0 1.91 0.6 0.65 -7.82 1.27 9.78 -3.06 \n\n")
    obj, = read_kitti_objects(labels)
    assert obj.type == "Pedestrian" and obj.occluded == 1
    assert obj.bbox == (10.0, 296.0, 20.0, 494.0)
    assert obj.dimensions == (1.91, 0.6, 0.65) and obj.location == (-7.82, 1.27, 9.78)
    assert obj.rotation_y == -3.06


# ----------------------------------------------------------------------------- nuScenes tables


def quat_wxyz(matrix: np.ndarray) -> list[float]:
    x, y, z, w = Rotation.from_matrix(matrix).as_quat()
    return [w, x, y, z]


@pytest.fixture
def tiny_nuscenes(tmp_path: Path) -> dict:
    """One sample in the real table schema: LIDAR_TOP (x right, y forward, like nuScenes) and CAM_FRONT.

    The ego moves 0.5 m forward and turns by 1 degree between the lidar and the camera timestamps.
    """
    version = tmp_path / "v1.0-tiny"
    version.mkdir()
    (tmp_path / "samples" / "LIDAR_TOP").mkdir(parents=True)
    (tmp_path / "samples" / "CAM_FRONT").mkdir(parents=True)
    lidar_rot = np.array([[0.0, 1, 0], [-1, 0, 0], [0, 0, 1]])  # lidar x = ego -y, lidar y = ego x
    lidar_t = np.array([0.9, 0.0, 1.8])
    cam_rot = np.array([[0.0, 0, 1], [-1, 0, 0], [0, -1, 0]])   # columns: camera x, y, z in ego coordinates
    cam_t = np.array([1.7, 0.0, 1.5])
    yaw0 = np.radians(30.0)
    ego_lidar_t = np.array([100.0, 200.0, 0.0])
    ego_cam_rot = Rotation.from_euler("z", yaw0 + np.radians(1.0)).as_matrix()
    ego_cam_t = ego_lidar_t + 0.5 * np.array([np.cos(yaw0), np.sin(yaw0), 0.0])
    k = [[200.0, 0.0, 64.0], [0.0, 200.0, 48.0], [0.0, 0.0, 1.0]]
    tables = {
        "sensor": [{"token": "s-lidar", "channel": "LIDAR_TOP", "modality": "lidar"},
                   {"token": "s-cam", "channel": "CAM_FRONT", "modality": "camera"}],
        "calibrated_sensor": [
            {"token": "c-lidar", "sensor_token": "s-lidar", "translation": lidar_t.tolist(),
             "rotation": quat_wxyz(lidar_rot), "camera_intrinsic": []},
            {"token": "c-cam", "sensor_token": "s-cam", "translation": cam_t.tolist(),
             "rotation": quat_wxyz(cam_rot), "camera_intrinsic": k}],
        "ego_pose": [
            {"token": "e-lidar", "timestamp": 1_000_050, "translation": ego_lidar_t.tolist(),
             "rotation": quat_wxyz(Rotation.from_euler("z", yaw0).as_matrix())},
            {"token": "e-cam", "timestamp": 1_000_000, "translation": ego_cam_t.tolist(),
             "rotation": quat_wxyz(ego_cam_rot)}],
        "sample": [{"token": "sample-b", "timestamp": 2_000_000, "prev": "sample-a", "next": "", "scene_token": "x"},
                   {"token": "sample-a", "timestamp": 1_000_050, "prev": "", "next": "sample-b", "scene_token": "x"}],
        "sample_data": [
            {"token": "sd-lidar", "sample_token": "sample-a", "ego_pose_token": "e-lidar",
             "calibrated_sensor_token": "c-lidar", "timestamp": 1_000_050, "fileformat": "pcd", "is_key_frame": True,
             "height": 0, "width": 0, "filename": "samples/LIDAR_TOP/sweep.pcd.bin", "prev": "", "next": ""},
            {"token": "sd-cam", "sample_token": "sample-a", "ego_pose_token": "e-cam",
             "calibrated_sensor_token": "c-cam", "timestamp": 1_000_000, "fileformat": "jpg", "is_key_frame": True,
             "height": 96, "width": 128, "filename": "samples/CAM_FRONT/img.jpg", "prev": "", "next": ""}],
    }
    for name, rows in tables.items():
        (version / f"{name}.json").write_text(json.dumps(rows))
    # global points on the camera's optical axis (10 m ahead) and 1 m to its left, taken back to the lidar frame
    cam_global = ego_cam_rot @ cam_t + ego_cam_t
    forward, left = ego_cam_rot @ [1.0, 0, 0], ego_cam_rot @ [0, 1.0, 0]
    targets = np.array([cam_global + 10 * forward, cam_global + 10 * forward + left])
    ego = (targets - ego_lidar_t) @ Rotation.from_euler("z", yaw0).as_matrix()  # inverse rotation, row vectors
    lidar_xyz = (ego - lidar_t) @ lidar_rot
    raw = np.c_[lidar_xyz, [51.0, 255.0], [3, 4]].astype(np.float32)
    raw.tofile(tmp_path / "samples" / "LIDAR_TOP" / "sweep.pcd.bin")
    Image.fromarray(np.full((96, 128, 3), 90, np.uint8)).save(tmp_path / "samples" / "CAM_FRONT" / "img.jpg")
    return {"root": tmp_path, "version": "v1.0-tiny"}


def test_nuscenes_tables_reader_projects_through_both_ego_poses(tiny_nuscenes: dict) -> None:
    reader = NuScenesReader(tiny_nuscenes["root"], tiny_nuscenes["version"])
    scene = reader.scene("sample-a")
    assert scene.points.shape == (2, 4)
    np.testing.assert_allclose(scene.points[:, 3], [0.2, 1.0], rtol=1e-6)
    camera, = scene.cameras
    assert camera.name == "CAM_FRONT" and camera.image.shape == (96, 128, 3)
    uv, mask = project_points(scene.points[:, :3], camera.lidar_to_image, camera.image_hw)
    assert mask.all()
    # on the optical axis: the principal point; 1 m left at 10 m: 200 * 1 / 10 = 20 px left of it
    np.testing.assert_allclose(uv, [[64.0, 48.0], [44.0, 48.0]], atol=1e-3)


def test_nuscenes_tables_errors(tiny_nuscenes: dict) -> None:
    root, version = tiny_nuscenes["root"], tiny_nuscenes["version"]
    reader = NuScenesReader(root, version)
    with pytest.raises(DataError, match="no sample with token 'nope'"):
        reader.scene("nope")
    with pytest.raises(DataError, match="no LIDAR_TOP keyframe"):
        reader.scene("sample-b")
    with pytest.raises(DataError, match="no CAM_BACK keyframe"):
        reader.scene("sample-a", cameras=["CAM_BACK"])
    sweep = root / "samples" / "LIDAR_TOP" / "sweep.pcd.bin"
    sweep.write_bytes(sweep.read_bytes()[:-4])
    with pytest.raises(DataError, match=r"sweep\.pcd\.bin.*not a multiple of 20"):
        reader.scene("sample-a")
    (root / version / "ego_pose.json").unlink()
    with pytest.raises(DataError, match=r"ego_pose\.json: file not found"):
        NuScenesReader(root, version)
    shutil.rmtree(root / version)
    with pytest.raises(DataError, match="table folder not found"):
        NuScenesReader(root, version)


# ------------------------------------------------------------------------------------ garbage point files
@needs_frames
def test_garbage_point_files_are_refused_naming_the_file(tmp_path: Path) -> None:
    """Real KITTI points made into the garbage a reader meets: empty, a byte cut mid-point, float64, random bytes,
    and nuScenes' 5-field file read with KITTI's 4 fields."""
    points = np.fromfile(FRAMES / "kitti_000008" / "000008.bin", "<f4").reshape(-1, 4)
    empty = tmp_path / "empty.bin"
    empty.write_bytes(b"")
    with pytest.raises(DataError, match=r"empty\.bin: the file holds no points"):
        read_points_bin(empty, 4)
    cut = tmp_path / "cut.bin"
    cut.write_bytes(points.tobytes()[:-6])
    with pytest.raises(DataError, match=rf"cut\.bin: {points.nbytes - 6} bytes is not a multiple of 16"):
        read_points_bin(cut, 4)
    doubles = tmp_path / "doubles.bin"
    doubles.write_bytes(points.astype(np.float64).tobytes())  # 32 bytes a point: a multiple of 16, so it parses
    as_float32 = np.frombuffer(doubles.read_bytes(), "<f4").reshape(-1, 4)
    assert np.isfinite(as_float32).all()  # what float64 looks like as float32 here: finite, but absurd
    largest = float(np.abs(as_float32[:, :3]).max())
    assert largest > 1e6
    with pytest.raises(DataError, match=rf"doubles\.bin: coordinates reach {re.escape(f'{largest:.3g}')} m, beyond "
                                        rf"the plausible 500 m; .*float64"):
        read_points_bin(doubles, 4)
    noise = tmp_path / "noise.bin"
    noise.write_bytes(np.random.default_rng(0).integers(0, 256, 16 * 4096, dtype=np.uint8).tobytes())
    with pytest.raises(DataError, match=r"noise\.bin: \d+ of 4096 points hold NaN or infinite values"):
        read_points_bin(noise, 4)
    nuscenes = next((FRAMES / "nuscenes_keyframe").glob("*LIDAR_TOP*.pcd.bin"))
    with pytest.raises(DataError, match=rf"{re.escape(nuscenes.name)}: intensities span \[-\S+, \S+\], outside the plausible"):
        read_points_bin(nuscenes, 4)  # 5 fields read as 4: coordinates land in the intensity column


@needs_frames
def test_a_file_of_another_layout_fails_the_nuscenes_checks(tiny_nuscenes: dict) -> None:
    """A KITTI file (4 fields) whose size 5 fields also divide is refused; so is a 5-field file whose ring column
    is not nuScenes' (whole laser indices)."""
    sweep = tiny_nuscenes["root"] / "samples" / "LIDAR_TOP" / "sweep.pcd.bin"
    reader = NuScenesReader(tiny_nuscenes["root"], tiny_nuscenes["version"])
    points = np.fromfile(FRAMES / "kitti_000008" / "000008.bin", "<f4")
    points[: len(points) // 20 * 20].tofile(sweep)
    with pytest.raises(DataError, match=r"sweep\.pcd\.bin: .*wrong layout"):
        reader.scene("sample-a")
    np.array([[1.0, 2.0, 0.5, 30.0, 3.0], [4.0, 5.0, 0.5, 40.0, 3.5]], np.float32).tofile(sweep)
    with pytest.raises(DataError, match=r"sweep\.pcd\.bin: 1 of 2 points have a ring index that is not a whole "
                                        r"number in \[0, 128\) \(first: 3\.5\)"):
        reader.scene("sample-a")


def test_point_limits_are_configurable(tmp_path: Path) -> None:
    far = tmp_path / "far.bin"
    np.array([[600.0, 0.0, 0.0, 0.5], [1.0, 2.0, 0.0, 0.25]], np.float32).tofile(far)
    with pytest.raises(DataError, match=r"far\.bin: coordinates reach 600 m, beyond the plausible 500 m"):
        read_points_bin(far, 4)
    points = read_points_bin(far, 4, PointLimits(max_abs_coordinate=1000.0))
    np.testing.assert_array_equal(points[:, 0], [600.0, 1.0])
    with pytest.raises(DataError, match=r"far\.bin: 2 points, fewer than the 10 a sweep must hold"):
        read_points_bin(far, 4, PointLimits(max_abs_coordinate=1000.0, min_points=10))
    with pytest.raises(DataError, match=r"intensities span \[0\.25, 0\.5\], outside the plausible \[0, 0\.3\]"):
        read_points_bin(far, 4, PointLimits(max_abs_coordinate=1000.0, max_intensity=0.3))
