"""Reader of SemanticKITTI (with the KITTI odometry colour images and calibration beside it).

::

    root/sequences/NN/velodyne/MMMMMM.bin   float32 x 4 (x, y, z, reflectance 0..1), velodyne frame
    root/sequences/NN/labels/MMMMMM.label   uint32 per point: semantic id in the low 16 bits, instance id above
    root/sequences/NN/calib.txt             "P0: <12>" ... "P3: <12>", "Tr: <12>" (velodyne -> rectified camera 0)
    root/sequences/NN/image_2/MMMMMM.png    left colour camera

The camera is projected through ``P2 @ Tr``. Raw semantic ids map to the 19 classes of the benchmark's learning
map (semantic-kitti-api ``config/semantic-kitti.yaml``; SLidR's ``dataloader_kitti.py`` uses the same table):
moving objects join their static class, lane markings join road, bus / on-rails / other vehicles are
"other-vehicle", and unlabeled, outlier, other-structure and other-object are ignored (label -1 here). Splits:
train = sequences 00-07, 09, 10; val = 08; test = 11-21 (no labels).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from xmcl.distill.config import DistillDataConfig
from xmcl.distill.geometry import pad_to_4x4
from xmcl.distill.readers.kitti import frame_stem, read_calibration_matrices
from xmcl.distill.scanset import ScanSet
from xmcl.distill.scene import CameraView, Scene, read_points_bin, read_rgb_image
from xmcl.errors import DataError

RAW_CLASSES = {
    0: "unlabeled", 1: "outlier", 10: "car", 11: "bicycle", 13: "bus", 15: "motorcycle", 16: "on-rails",
    18: "truck", 20: "other-vehicle", 30: "person", 31: "bicyclist", 32: "motorcyclist", 40: "road", 44: "parking",
    48: "sidewalk", 49: "other-ground", 50: "building", 51: "fence", 52: "other-structure", 60: "lane-marking",
    70: "vegetation", 71: "trunk", 72: "terrain", 80: "pole", 81: "traffic-sign", 99: "other-object",
    252: "moving-car", 253: "moving-bicyclist", 254: "moving-person", 255: "moving-motorcyclist",
    256: "moving-on-rails", 257: "moving-bus", 258: "moving-truck", 259: "moving-other-vehicle",
}
CLASS_NAMES = ("car", "bicycle", "motorcycle", "truck", "other-vehicle", "person", "bicyclist", "motorcyclist",
               "road", "parking", "sidewalk", "other-ground", "building", "fence", "vegetation", "trunk", "terrain",
               "pole", "traffic-sign")
MERGED_INTO = {
    "moving-car": "car", "moving-bicyclist": "bicyclist", "moving-person": "person",
    "moving-motorcyclist": "motorcyclist", "moving-truck": "truck", "bus": "other-vehicle",
    "on-rails": "other-vehicle", "moving-on-rails": "other-vehicle", "moving-bus": "other-vehicle",
    "moving-other-vehicle": "other-vehicle", "lane-marking": "road",
}
TRAIN_SEQUENCES = (0, 1, 2, 3, 4, 5, 6, 7, 9, 10)
VAL_SEQUENCES = (8,)
SEMANTIC_MASK = 0xFFFF
ODOMETRY_CALIB_SHAPES = {"P2": (3, 4), "Tr": (3, 4)}  # camera 2; velodyne -> rectified camera 0


def learning_lut() -> np.ndarray:
    """(65536,) int64: raw semantic id -> class index into ``CLASS_NAMES``, -1 for ignored and unknown ids."""
    lut = np.full(SEMANTIC_MASK + 1, -1, dtype=np.int64)
    for raw, name in RAW_CLASSES.items():
        name = MERGED_INTO.get(name, name)
        if name in CLASS_NAMES:
            lut[raw] = CLASS_NAMES.index(name)
    return lut


LEARNING_LUT = learning_lut()


def read_semantickitti_labels(path: Path | str, num_points: int) -> np.ndarray:
    """(P,) int64 class indices (-1 = ignored) of a ``.label`` file of ``num_points`` uint32 records."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: label file not found")
    size = path.stat().st_size
    if size != 4 * num_points:
        raise DataError(f"{path}: {size} bytes, expected {4 * num_points} (one uint32 per point of its "
                        f"{num_points}-point scan)")
    raw = np.fromfile(path, dtype="<u4") & SEMANTIC_MASK
    return LEARNING_LUT[raw]


class SemanticKittiReader:
    """Scans of a SemanticKITTI root: ``SemanticKittiReader(root).scene(8, 0)``."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)
        if not (self.root / "sequences").is_dir():
            raise DataError(f"{self.root}: not a SemanticKITTI folder (no 'sequences/' folder)")

    def _sequence(self, sequence: int) -> Path:
        return self.root / "sequences" / f"{sequence:02d}"

    def frame_ids(self, sequence: int) -> list[str]:
        """Sorted file stems of the sequence's point files (none when the sequence is absent)."""
        return sorted(p.stem for p in (self._sequence(sequence) / "velodyne").glob("*.bin"))

    def scene(self, sequence: int, frame: str | int, cameras: bool = True, labels: bool = True) -> Scene:
        """Scan ``frame`` of ``sequence``: points, labels (when ``labels``) and camera 2 (when ``cameras``)."""
        folder = self._sequence(sequence)
        stem = frame_stem(frame)
        points = read_points_bin(folder / "velodyne" / f"{stem}.bin", num_fields=4)
        classes = read_semantickitti_labels(folder / "labels" / f"{stem}.label", len(points)) if labels else None
        views = []
        if cameras:
            calib = read_calibration_matrices(folder / "calib.txt", ODOMETRY_CALIB_SHAPES)
            matrix = pad_to_4x4(calib["P2"]) @ pad_to_4x4(calib["Tr"])
            image = read_rgb_image(folder / "image_2" / f"{stem}.png")
            views.append(CameraView(image=image, lidar_to_image=matrix, name="image_2"))
        return Scene(points=points, cameras=views, labels=classes, class_names=CLASS_NAMES,
                     name=f"semantickitti/{sequence:02d}/{stem}")


def semantickitti_scans(data: DistillDataConfig, split: str, cameras: bool) -> ScanSet:
    """The scans of ``split`` in sequence then frame order (train sequences for "pretrain" and "probe_train",
    val for "eval"); the authors' label fraction keeps every k-th of them."""
    reader = SemanticKittiReader(data.root)
    sequences = VAL_SEQUENCES if split == "eval" else TRAIN_SEQUENCES
    frames = [(seq, stem) for seq in sequences for stem in reader.frame_ids(seq)]
    return ScanSet(f"{data.root}/{split}", len(frames), lambda i: reader.scene(*frames[i], cameras=cameras),
                   CLASS_NAMES, sequences=[seq for seq, _ in frames])
