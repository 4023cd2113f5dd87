"""Readers of the labelled lidar data sets (nuScenes-lidarseg, SemanticKITTI) on the real frames in shared/, laid
out in each data set's real format with label files written here from the frames' 3D boxes; their class maps
against the published tables; their splits; and ``data.source`` reaching them from the config and the CLI."""

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from scipy.spatial.transform import Rotation

from xmcl.cli import main as cli
from xmcl.config import load_config
from xmcl.distill.config import DistillConfig
from xmcl.distill.geometry import project_points
from xmcl.distill.readers.nuscenes_lidarseg import CLASS_NAMES as NUSCENES_CLASSES
from xmcl.distill.readers.nuscenes_lidarseg import NuScenesLidarsegReader, category_lut, scene_splits
from xmcl.distill.probe import select_labels
from xmcl.distill.readers.semantickitti import CLASS_NAMES as KITTI_CLASSES
from xmcl.distill.readers.semantickitti import LEARNING_LUT, SemanticKittiReader, read_semantickitti_labels
from xmcl.distill.readers.sources import open_scans
from xmcl.errors import ConfigError, DataError

FRAMES = Path(__file__).resolve().parents[2] / "shared" / "data" / "lidar_frames"
needs_frames = pytest.mark.skipif(not FRAMES.is_dir(), reason="shared lidar frames not available")

# ------------------------------------------------------------------ the published tables, as their sources print them

# nuScenes-lidarseg category.json: lidarseg index -> general category name
NUSCENES_CATEGORY_INDEX = [
    "noise", "animal", "human.pedestrian.adult", "human.pedestrian.child", "human.pedestrian.construction_worker",
    "human.pedestrian.personal_mobility", "human.pedestrian.police_officer", "human.pedestrian.stroller",
    "human.pedestrian.wheelchair", "movable_object.barrier", "movable_object.debris",
    "movable_object.pushable_pullable", "movable_object.trafficcone", "static_object.bicycle_rack", "vehicle.bicycle",
    "vehicle.bus.bendy", "vehicle.bus.rigid", "vehicle.car", "vehicle.construction", "vehicle.emergency.ambulance",
    "vehicle.emergency.police", "vehicle.motorcycle", "vehicle.trailer", "vehicle.truck", "flat.driveable_surface",
    "flat.other", "flat.sidewalk", "flat.terrain", "static.manmade", "static.other", "static.vegetation",
    "vehicle.ego",
]
# SLidR / ST-SLidR downstream/dataloader_nuscenes.py eval_labels (0 = ignore, 1..16 the challenge classes)
SLIDR_NUSCENES_LABELS = {
    0: 0, 1: 0, 2: 7, 3: 7, 4: 7, 5: 0, 6: 7, 7: 0, 8: 0, 9: 1, 10: 0, 11: 0, 12: 8, 13: 0, 14: 2, 15: 3, 16: 3,
    17: 4, 18: 5, 19: 0, 20: 0, 21: 6, 22: 9, 23: 10, 24: 11, 25: 12, 26: 13, 27: 14, 28: 15, 29: 0, 30: 16, 31: 0,
}
# nuscenes-devkit LidarsegClassMapper.get_coarse2idx
NUSCENES_CHALLENGE = ["barrier", "bicycle", "bus", "car", "construction_vehicle", "motorcycle", "pedestrian",
                      "traffic_cone", "trailer", "truck", "driveable_surface", "other_flat", "sidewalk", "terrain",
                      "manmade", "vegetation"]
# semantic-kitti-api config/semantic-kitti.yaml learning_map (0 = unlabeled / ignored) and learning_map_inv names
SEMANTICKITTI_LEARNING_MAP = {
    0: 0, 1: 0, 10: 1, 11: 2, 13: 5, 15: 3, 16: 5, 18: 4, 20: 5, 30: 6, 31: 7, 32: 8, 40: 9, 44: 10, 48: 11, 49: 12,
    50: 13, 51: 14, 52: 0, 60: 9, 70: 15, 71: 16, 72: 17, 80: 18, 81: 19, 99: 0, 252: 1, 253: 7, 254: 6, 255: 8,
    256: 5, 257: 5, 258: 4, 259: 5,
}
SEMANTICKITTI_CLASSES = ["car", "bicycle", "motorcycle", "truck", "other-vehicle", "person", "bicyclist",
                         "motorcyclist", "road", "parking", "sidewalk", "other-ground", "building", "fence",
                         "vegetation", "trunk", "terrain", "pole", "traffic-sign"]


def test_nuscenes_class_map_is_the_challenge_table() -> None:
    assert list(NUSCENES_CLASSES) == NUSCENES_CHALLENGE
    categories = [{"token": f"c{i}", "name": name, "index": i} for i, name in enumerate(NUSCENES_CATEGORY_INDEX)]
    lut = category_lut(categories, Path("category.json"))
    assert [int(lut[i]) + 1 for i in range(32)] == [SLIDR_NUSCENES_LABELS[i] for i in range(32)]
    assert (lut[32:] == -1).all()
    with pytest.raises(DataError, match="has no 'index'"):
        category_lut([{"name": "vehicle.car"}], Path("category.json"))
    with pytest.raises(DataError, match="unknown lidarseg category 'vehicle.tank'"):
        category_lut([{"name": "vehicle.tank", "index": 3}], Path("category.json"))


def test_semantickitti_class_map_is_the_learning_map() -> None:
    assert list(KITTI_CLASSES) == SEMANTICKITTI_CLASSES
    for raw in range(1 << 16):
        assert int(LEARNING_LUT[raw]) == SEMANTICKITTI_LEARNING_MAP.get(raw, 0) - 1, raw


def test_scene_splits_are_the_devkit_and_slidr_ones() -> None:
    splits = scene_splits()
    assert len(splits["train"]) == 700 and len(splits["val"]) == 150 and not set(splits["train"]) & set(splits["val"])
    assert len(splits["verifying"]) == 100 and set(splits["verifying"]) <= set(splits["train"])
    assert len(splits["parametrizing"]) == 600 and not set(splits["parametrizing"]) & set(splits["verifying"])
    assert splits["mini_val"] == ("scene-0103", "scene-0916") and len(splits["mini_train"]) == 8
    assert {"scene-0001", "scene-0008", "scene-1107"} <= set(splits["train"]) and "scene-0003" in splits["val"]


# ------------------------------------------------------------------ SemanticKITTI on the real KITTI frame 000008

def inside_camera_box(cam_xyz: np.ndarray, box: list[float]) -> np.ndarray:
    """Rectified-camera points inside a KITTI box (x, y, z bottom centre, l, h, w, yaw about y; y points down)."""
    x, y, z, length, height, width, ry = box
    rel = cam_xyz - [x, y, z]
    c, s = np.cos(ry), np.sin(ry)
    along, across = c * rel[:, 0] - s * rel[:, 2], s * rel[:, 0] + c * rel[:, 2]
    return (np.abs(along) <= length / 2) & (np.abs(across) <= width / 2) & (rel[:, 1] <= 0) & (rel[:, 1] >= -height)


def _matrix_line(key: str, m: np.ndarray) -> str:
    return f"{key}: " + " ".join(f"{v:.12e}" for v in np.asarray(m).ravel())


@pytest.fixture
def semantickitti_root(tmp_path: Path) -> tuple[Path, np.ndarray]:
    """Frame 000008 as scan 000000 of sequence 08 (and 000001, a copy), in the SemanticKITTI layout: an odometry
    calib.txt (Tr = R0_rect @ Tr_velo_to_cam, as odometry frames are rectified) and a .label file from the boxes:
    cars alternate static / moving car (10 / 252) with instance ids in the high bits, pedestrians 30, cyclists 31,
    other points vegetation (70) or unlabeled (0) by parity. Returns the root and the expected class indices."""
    src = FRAMES / "kitti_000008"
    info = json.loads((src / "info.json").read_text())["data_list"][0]
    seq = tmp_path / "sequences" / "08"
    for folder in ("velodyne", "labels", "image_2"):
        (seq / folder).mkdir(parents=True)
    p2 = np.array((src / "000008.txt").read_text().split(), dtype=float).reshape(4, 4)[:3]
    r0 = np.array(info["images"]["R0_rect"])[:3, :3]
    tr = np.array(info["lidar_points"]["Tr_velo_to_cam"])
    velo_to_rect = np.eye(4)
    velo_to_rect[:3, :3] = r0
    velo_to_rect = velo_to_rect @ tr
    zeros = np.zeros(12)
    (seq / "calib.txt").write_text("\n".join([_matrix_line("P0", zeros), _matrix_line("P1", zeros),
                                              _matrix_line("P2", p2), _matrix_line("P3", zeros),
                                              _matrix_line("Tr", velo_to_rect[:3])]) + "\n")
    points = np.fromfile(src / "000008.bin", dtype=np.float32).reshape(-1, 4)
    cam_xyz = points[:, :3].astype(np.float64) @ velo_to_rect[:3, :3].T + velo_to_rect[:3, 3]
    raw = np.where(np.arange(len(points)) % 2 == 0, 70, 0).astype(np.uint32)
    expected = np.where(raw == 70, SEMANTICKITTI_CLASSES.index("vegetation"), -1)
    cars = 0
    for k, inst in enumerate(info["instances"]):
        label = inst["bbox_label_3d"]  # KITTI metainfo: 0 Pedestrian, 1 Cyclist, 2 Car
        if label < 0:
            continue
        inside = inside_camera_box(cam_xyz, inst["bbox_3d"])
        if label == 2:
            raw[inside] = (k + 1) << 16 | (10 if cars % 2 == 0 else 252)
            expected[inside] = SEMANTICKITTI_CLASSES.index("car")
            cars += 1
        else:
            raw[inside] = (k + 1) << 16 | (30 if label == 0 else 31)
            expected[inside] = SEMANTICKITTI_CLASSES.index("person" if label == 0 else "bicyclist")
    assert cars >= 2
    for stem in ("000000", "000001"):
        (seq / "velodyne" / f"{stem}.bin").symlink_to(src / "000008.bin")
        (seq / "image_2" / f"{stem}.png").symlink_to(src / "000008.png")
        raw.astype("<u4").tofile(seq / "labels" / f"{stem}.label")
    return tmp_path, expected


@needs_frames
def test_semantickitti_reader_on_frame_000008(semantickitti_root, tmp_path: Path) -> None:
    root, expected = semantickitti_root
    reader = SemanticKittiReader(root)
    assert reader.frame_ids(8) == ["000000", "000001"] and reader.frame_ids(0) == []
    scene = reader.scene(8, 0)
    assert scene.points.shape == (17238, 4) and scene.class_names == tuple(SEMANTICKITTI_CLASSES)
    np.testing.assert_array_equal(scene.labels, expected)
    assert (scene.labels == SEMANTICKITTI_CLASSES.index("car")).sum() > 1000
    camera, = scene.cameras
    info = json.loads((FRAMES / "kitti_000008" / "info.json").read_text())["data_list"][0]
    np.testing.assert_allclose(camera.lidar_to_image, info["images"]["CAM2"]["lidar2img"], rtol=1e-5, atol=1e-4)
    # labelled cars project inside the annotated 2D boxes of the cars
    uv, mask = project_points(scene.points[:, :3], camera.lidar_to_image, camera.image_hw)
    car_boxes = [inst["bbox"] for inst in info["instances"] if inst["bbox_label_3d"] == 2]
    seen = mask & (scene.labels == SEMANTICKITTI_CLASSES.index("car"))
    in_some = np.zeros(len(uv), bool)
    for left, top, right, bottom in car_boxes:
        in_some |= (uv[:, 0] >= left - 2) & (uv[:, 0] <= right + 2) & (uv[:, 1] >= top - 2) & (uv[:, 1] <= bottom + 2)
    assert in_some[seen].mean() > 0.95
    assert reader.scene(8, "000001", cameras=False).cameras == []
    # errors name the file
    label = root / "sequences" / "08" / "labels" / "000001.label"
    label.write_bytes(label.read_bytes()[:-4])
    with pytest.raises(DataError, match=r"000001\.label: 68948 bytes, expected 68952"):
        reader.scene(8, 1)
    with pytest.raises(DataError, match="not a SemanticKITTI folder"):
        SemanticKittiReader(tmp_path / "nowhere")
    (root / "sequences" / "08" / "calib.txt").write_text(_matrix_line("P2", np.ones(12)) + "\n")
    with pytest.raises(DataError, match=r"calib\.txt: calibration has no 'Tr'"):
        reader.scene(8, 0)


def test_semantickitti_labels_file_keeps_the_low_16_bits(tmp_path: Path) -> None:
    raw = np.array([(7 << 16) | 10, 252, (3 << 16) | 60, 99, 1 << 16, 81, 259, 12345], dtype="<u4")
    raw.tofile(tmp_path / "x.label")
    names = [SEMANTICKITTI_CLASSES[i] if i >= 0 else None for i in read_semantickitti_labels(tmp_path / "x.label", 8)]
    assert names == ["car", "car", "road", None, None, "traffic-sign", "other-vehicle", None]


@needs_frames
def test_semantickitti_source_splits_and_label_skip(semantickitti_root) -> None:
    root, expected = semantickitti_root
    seq0 = root / "sequences" / "00"
    (seq0 / "velodyne").mkdir(parents=True)
    (seq0 / "labels").mkdir()
    for stem in range(3):
        (seq0 / "velodyne" / f"{stem:06d}.bin").symlink_to(FRAMES / "kitti_000008" / "000008.bin")
        (seq0 / "labels" / f"{stem:06d}.label").symlink_to(root / "sequences" / "08" / "labels" / "000000.label")
    cfg = load_config(DistillConfig, None, ["data.source=semantickitti", f"data.root={root}"])
    train = open_scans(cfg.data, "probe_train", cameras=False)
    evaluation = open_scans(cfg.data, "eval", cameras=False)
    assert len(train) == 3 and len(evaluation) == 2  # sequences 00 (train) and 08 (val)
    assert train[2].name.endswith("00/000002") and evaluation[1].name.endswith("08/000001")
    np.testing.assert_array_equal(evaluation[0].labels, expected)
    assert select_labels(train, 0.5, "skip", seed=0).indices == [0, 2]  # every 2nd scan, from the first
    with pytest.raises(ConfigError, match="'root' must name the data folder"):
        load_config(DistillConfig, None, ["data.source=semantickitti"])


# ------------------------------------------------------------------ nuScenes-lidarseg on the real keyframe

NUSCENES_DETECTION_TO_GENERAL = {  # the info file's detection classes -> a lidarseg general category
    0: "vehicle.car", 1: "vehicle.truck", 2: "vehicle.trailer", 3: "vehicle.bus.rigid", 4: "vehicle.construction",
    5: "vehicle.bicycle", 6: "vehicle.motorcycle", 7: "human.pedestrian.adult", 8: "movable_object.trafficcone",
    9: "movable_object.barrier",
}
NUSCENES_DETECTION_TO_CLASS = {0: "car", 1: "truck", 2: "trailer", 3: "bus", 4: "construction_vehicle",
                               5: "bicycle", 6: "motorcycle", 7: "pedestrian", 8: "traffic_cone", 9: "barrier"}


def inside_lidar_box(xyz: np.ndarray, box: list[float]) -> np.ndarray:
    """Lidar-frame points inside an (x, y, z centre, l, w, h, yaw) box."""
    x, y, z, length, width, height, yaw = box
    rel = xyz - [x, y, z]
    c, s = np.cos(yaw), np.sin(yaw)
    along, across = c * rel[:, 0] + s * rel[:, 1], -s * rel[:, 0] + c * rel[:, 1]
    return (np.abs(along) <= length / 2) & (np.abs(across) <= width / 2) & (np.abs(rel[:, 2]) <= height / 2)


def _pose(matrix: np.ndarray) -> dict:
    x, y, z, w = Rotation.from_matrix(np.asarray(matrix)[:3, :3]).as_quat()
    return {"translation": np.asarray(matrix)[:3, 3].tolist(), "rotation": [w, x, y, z]}


def write_nuscenes_release(root: Path, scenes: dict[str, int], version: str = "v1.0-mini",
                           cameras: tuple[str, ...] | None = None) -> np.ndarray:
    """A nuScenes-lidarseg release whose every sample is the real keyframe: ``scenes`` = scene name -> number of
    samples, with the keyframe's ``cameras`` (default all six). Tables are written from the info file (each
    camera's ego pose solved from its lidar2cam, so the table chain reproduces it), and one lidarseg .bin per sweep
    from the 3D boxes (detection class -> a lidarseg category; other points driveable surface below -1.4 m, noise
    for every 10th, else manmade). Returns the expected class indices."""
    src = FRAMES / "nuscenes_keyframe"
    info = json.loads((src / "info.json").read_text())["data_list"][0]
    if cameras is not None:
        info["images"] = {name: info["images"][name] for name in cameras}
    tables = {name: [] for name in ("sensor", "calibrated_sensor", "ego_pose", "sample", "sample_data", "scene",
                                    "lidarseg", "category")}
    tables["category"] = [{"token": f"cat{i}", "name": n, "description": "", "index": i}
                          for i, n in enumerate(NUSCENES_CATEGORY_INDEX)]
    lidar_file = info["lidar_points"]["lidar_path"]
    points = np.fromfile(src / lidar_file, dtype=np.float32).reshape(-1, 5)
    lidar2ego, ego2global = np.array(info["lidar_points"]["lidar2ego"]), np.array(info["ego2global"])
    index = np.where(points[:, 2] < -1.4, 24, 28)
    index[::10] = 0
    expected = np.where(index == 24, NUSCENES_CHALLENGE.index("driveable_surface"),
                        NUSCENES_CHALLENGE.index("manmade"))
    expected[::10] = -1
    for inst in info["instances"]:
        if inst["bbox_label_3d"] >= 0:
            inside = inside_lidar_box(points[:, :3].astype(np.float64), inst["bbox_3d"])
            index[inside] = NUSCENES_CATEGORY_INDEX.index(NUSCENES_DETECTION_TO_GENERAL[inst["bbox_label_3d"]])
            expected[inside] = NUSCENES_CHALLENGE.index(NUSCENES_DETECTION_TO_CLASS[inst["bbox_label_3d"]])
    channels = ["LIDAR_TOP"] + list(info["images"])
    for channel in channels:
        (root / "samples" / channel).mkdir(parents=True)
        tables["sensor"].append({"token": f"s-{channel}", "channel": channel})
    tables["calibrated_sensor"].append({"token": "c-LIDAR_TOP", "sensor_token": "s-LIDAR_TOP", **_pose(lidar2ego),
                                        "camera_intrinsic": []})
    tables["ego_pose"].append({"token": "e-LIDAR_TOP", "timestamp": 0, **_pose(ego2global)})
    (root / "samples" / "LIDAR_TOP" / lidar_file).symlink_to(src / lidar_file)
    for name, cam in info["images"].items():
        cam2ego, lidar2cam = np.array(cam["cam2ego"]), np.array(cam["lidar2cam"])
        global_to_ego_cam = cam2ego @ lidar2cam @ np.linalg.inv(lidar2ego) @ np.linalg.inv(ego2global)
        tables["calibrated_sensor"].append({"token": f"c-{name}", "sensor_token": f"s-{name}", **_pose(cam2ego),
                                            "camera_intrinsic": np.array(cam["cam2img"])[:3, :3].tolist()})
        tables["ego_pose"].append({"token": f"e-{name}", "timestamp": 0, **_pose(np.linalg.inv(global_to_ego_cam))})
        (root / "samples" / name / cam["img_path"]).symlink_to(src / cam["img_path"])
    (root / "lidarseg" / version).mkdir(parents=True)
    count = 0
    for scene_name, num_samples in scenes.items():
        tokens = [f"{scene_name}-{k}" for k in range(num_samples)]
        tables["scene"].append({"token": f"scene-token-{scene_name}", "name": scene_name,
                                "first_sample_token": tokens[0], "last_sample_token": tokens[-1]})
        for k, token in enumerate(tokens):
            tables["sample"].append({"token": token, "timestamp": count, "scene_token": f"scene-token-{scene_name}",
                                     "prev": tokens[k - 1] if k else "", "next": tokens[k + 1] if k + 1 < len(tokens)
                                     else ""})
            for channel in channels:
                folder = "samples/" + channel + "/"
                filename = folder + (lidar_file if channel == "LIDAR_TOP" else info["images"][channel]["img_path"])
                tables["sample_data"].append({
                    "token": f"{token}-{channel}", "sample_token": token, "ego_pose_token": f"e-{channel}",
                    "calibrated_sensor_token": f"c-{channel}", "filename": filename, "is_key_frame": True})
            bin_name = f"lidarseg/{version}/{token}-LIDAR_TOP_lidarseg.bin"
            index.astype(np.uint8).tofile(root / bin_name)
            tables["lidarseg"].append({"token": f"ls-{token}", "sample_data_token": f"{token}-LIDAR_TOP",
                                       "filename": bin_name})
            count += 1
    (root / version).mkdir()
    for name, rows in tables.items():
        (root / version / f"{name}.json").write_text(json.dumps(rows))
    return expected


@needs_frames
def test_nuscenes_lidarseg_reader_on_the_real_keyframe(tmp_path: Path) -> None:
    expected = write_nuscenes_release(tmp_path, {"scene-0061": 1})
    reader = NuScenesLidarsegReader(tmp_path, "v1.0-mini")
    assert reader.sequences() == [("scene-0061", ["scene-0061-0"])]
    scene = reader.labelled_scene("scene-0061-0")
    assert scene.points.shape == (34688, 4) and scene.class_names == tuple(NUSCENES_CHALLENGE)
    np.testing.assert_array_equal(scene.labels, expected)
    assert (scene.labels == NUSCENES_CHALLENGE.index("car")).sum() > 50
    info = json.loads((FRAMES / "nuscenes_keyframe" / "info.json").read_text())["data_list"][0]
    assert sorted(c.name for c in scene.cameras) == sorted(info["images"])
    for camera in scene.cameras:  # the tables' chain reproduces the info file's per-camera projection
        cam = info["images"][camera.name]
        intrinsic = np.eye(4)
        intrinsic[:3, :3] = np.array(cam["cam2img"])[:3, :3]
        np.testing.assert_allclose(camera.lidar_to_image, intrinsic @ np.array(cam["lidar2cam"]), rtol=1e-6,
                                   atol=1e-3)
    # labelled pedestrians and cars land in the front camera's annotated 2D boxes of that class
    front = next(c for c in scene.cameras if c.name == "CAM_FRONT")
    uv, mask = project_points(scene.points[:, :3], front.lidar_to_image, front.image_hw)
    for label in (0, 7):
        boxes = [i["bbox"] for i in info["cam_instances"]["CAM_FRONT"] if i["bbox_label_3d"] == label]
        seen = mask & (scene.labels == NUSCENES_CHALLENGE.index(NUSCENES_DETECTION_TO_CLASS[label]))
        in_some = np.zeros(len(uv), bool)
        for left, top, right, bottom in boxes:
            in_some |= ((uv[:, 0] >= left - 2) & (uv[:, 0] <= right + 2) & (uv[:, 1] >= top - 2)
                        & (uv[:, 1] <= bottom + 2))
        assert seen.sum() >= 5 and in_some[seen].mean() > 0.9, label
    assert reader.labelled_scene("scene-0061-0", cameras=False).cameras == []
    bin_path = tmp_path / "lidarseg" / "v1.0-mini" / "scene-0061-0-LIDAR_TOP_lidarseg.bin"
    bin_path.write_bytes(bin_path.read_bytes()[:-1])
    with pytest.raises(DataError, match=r"_lidarseg\.bin: 34687 labels for a sweep of 34688 points"):
        reader.labelled_scene("scene-0061-0")
    (tmp_path / "v1.0-mini" / "lidarseg.json").unlink()
    with pytest.raises(DataError, match=r"lidarseg\.json: file not found"):
        NuScenesLidarsegReader(tmp_path, "v1.0-mini")


@needs_frames
def test_nuscenes_source_uses_slidr_splits_and_skips_by_scene(tmp_path: Path) -> None:
    # scene-0001, -0002 and -0004: parametrizing (train); scene-0008: verifying (train); scene-0003: val
    write_nuscenes_release(tmp_path, {"scene-0001": 2, "scene-0008": 1, "scene-0003": 2, "scene-0002": 1,
                                      "scene-0004": 3}, version="v1.0-trainval")
    cfg = load_config(DistillConfig, None, ["data.source=nuscenes", f"data.root={tmp_path}"])
    pretrain = open_scans(cfg.data, "pretrain", cameras=False)
    train = open_scans(cfg.data, "probe_train", cameras=False)
    val = open_scans(cfg.data, "eval", cameras=False)
    assert [pretrain[i].name.split("/")[1] for i in range(len(pretrain))] == [
        "scene-0001-0", "scene-0001-1", "scene-0002-0", "scene-0004-0", "scene-0004-1", "scene-0004-2"]
    assert len(train) == 7 and [val[i].name.split("/")[1] for i in range(len(val))] == ["scene-0003-0",
                                                                                         "scene-0003-1"]
    # label fraction 1/2 the authors' way: the scans of every 2nd scene (ranks 2 and 4 of 1..4)
    kept = select_labels(train, 0.5, "skip", seed=0).indices
    assert [train[i].name.split("/")[1] for i in kept] == ["scene-0008-0", "scene-0004-0", "scene-0004-1",
                                                           "scene-0004-2"]
    verifying = load_config(DistillConfig, None, ["data.source=nuscenes", f"data.root={tmp_path}",
                                                  "data.splits=parametrize", "data.max_scans=2"])
    assert [open_scans(verifying.data, "eval")[0].name.split("/")[1]] == ["scene-0008-0"]
    assert len(open_scans(verifying.data, "probe_train")) == 2


@needs_frames
def test_cli_probe_reaches_nuscenes(tmp_path: Path) -> None:
    """``xmcl distill probe --set data.source=nuscenes --set data.root=...`` trains and scores on the release."""
    expected = write_nuscenes_release(tmp_path / "data", {"scene-0001": 1, "scene-0003": 1}, version="v1.0-trainval")
    config = tmp_path / "tiny.yaml"
    config.write_text("voxel:\n  widths: [4, 8]\n  out_dim: 8\n  voxel_size: 0.3\nrun:\n  device: cpu\n"
                      "  progress: false\nprobe:\n  protocol: authors\n  label_unit: skip\n  epochs: 2\n"
                      "  batch_scenes: 1\n")
    result = CliRunner().invoke(cli, ["distill", "probe", "--config", str(config), "--set", "data.source=nuscenes",
                                      "--set", f"data.root={tmp_path / 'data'}", "--mode", "linear",
                                      "--out", str(tmp_path / "probe")])
    assert result.exit_code == 0, result.output
    stored = json.loads((tmp_path / "probe" / "probe_linear_authors.json").read_text())
    assert stored["protocol"] == "authors" and set(stored["iou"]) == set(NUSCENES_CHALLENGE)
    assert stored["points"] == int((expected >= 0).sum())  # every labelled point of the val scan is scored


@needs_frames
def test_cli_pretrain_reaches_nuscenes(tmp_path: Path) -> None:
    """``xmcl distill pretrain --set data.source=nuscenes ...``: two augmented steps on the real keyframe (one camera,
    SLIC on its full 1600 x 900 image, cropped to 64 x 112) write a checkpoint the probe then reads."""
    write_nuscenes_release(tmp_path / "data", {"scene-0001": 1, "scene-0003": 1}, version="v1.0-trainval",
                           cameras=("CAM_FRONT",))
    config = tmp_path / "tiny.yaml"
    config.write_text("voxel:\n  widths: [4, 8]\n  out_dim: 8\n  voxel_size: 0.3\nimage:\n  backbone: resnet18\n"
                      "  weights: null\n  resnet_width: 8\n  input_scale: 1.0\nsuperpixels:\n  n_segments: 30\n"
                      "augmentation:\n  crop_size: [64, 112]\n  min_pairs: 50\noptim:\n  steps: 2\n"
                      "  batch_scenes: 1\n  warmup_steps: 0\nrun:\n  device: cpu\n  progress: false\n")
    overrides = ["--set", "data.source=nuscenes", "--set", f"data.root={tmp_path / 'data'}"]
    result = CliRunner().invoke(cli, ["distill", "pretrain", "--config", str(config), *overrides,
                                      "--out", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert lines[-1]["step"] == 2 and np.isfinite(lines[-1]["loss"]) and lines[-1]["superpixels"] > 5
    probe = CliRunner().invoke(cli, ["distill", "probe", "--config", str(config), *overrides, "--checkpoint",
                                     str(tmp_path / "run" / "last.pt"), "--out", str(tmp_path / "probe")])
    assert probe.exit_code == 0, probe.output
