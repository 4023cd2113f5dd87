"""nuScenes-lidarseg: per-point labels of the lidar keyframes, the 32 -> 16 class mapping, and SLidR's scene splits.

Beside the tables ``xmcl.distill.readers.nuscenes.NuScenesReader`` reads, a lidarseg release has in ``root/<version>/``:
``lidarseg.json`` (``sample_data_token`` -> ``filename`` of ``lidarseg/<version>/<token>_lidarseg.bin``, one uint8
class index per point of that sweep), ``category.json`` (each category's ``name`` and lidarseg ``index``) and
``scene.json`` (``name``, ``first_sample_token``; samples chain through ``next``).

Classes: the 16 of the nuScenes-lidarseg challenge (nuscenes-devkit ``LidarsegClassMapper``), by category name;
noise, animal, personal mobility, stroller, wheelchair, debris, pushable/pullable, bicycle rack, ambulance,
police vehicle, static.other and the ego vehicle are ignored (label -1 here).

Splits (``nuscenes_splits.json``): the devkit's train / val / mini_train / mini_val scene names, and SLidR's 100
"verifying" train scenes; "parametrizing" = train minus verifying. Scans come in ``scene.json`` order, then time.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np

from xmcl.distill.config import DistillDataConfig
from xmcl.distill.readers.nuscenes import NuScenesReader, field, read_table
from xmcl.distill.scanset import ScanSet
from xmcl.distill.scene import Scene
from xmcl.errors import DataError

CLASS_NAMES = ("barrier", "bicycle", "bus", "car", "construction_vehicle", "motorcycle", "pedestrian", "traffic_cone",
               "trailer", "truck", "driveable_surface", "other_flat", "sidewalk", "terrain", "manmade", "vegetation")
GENERAL_TO_CLASS = {
    "human.pedestrian.adult": "pedestrian", "human.pedestrian.child": "pedestrian",
    "human.pedestrian.police_officer": "pedestrian", "human.pedestrian.construction_worker": "pedestrian",
    "vehicle.car": "car", "vehicle.motorcycle": "motorcycle", "vehicle.bicycle": "bicycle",
    "vehicle.bus.bendy": "bus", "vehicle.bus.rigid": "bus", "vehicle.truck": "truck",
    "vehicle.construction": "construction_vehicle", "vehicle.trailer": "trailer",
    "movable_object.barrier": "barrier", "movable_object.trafficcone": "traffic_cone",
    "flat.driveable_surface": "driveable_surface", "flat.sidewalk": "sidewalk", "flat.terrain": "terrain",
    "flat.other": "other_flat", "static.manmade": "manmade", "static.vegetation": "vegetation",
}
IGNORED_CATEGORIES = (
    "noise", "animal", "human.pedestrian.personal_mobility", "human.pedestrian.stroller",
    "human.pedestrian.wheelchair", "movable_object.debris", "movable_object.pushable_pullable",
    "static_object.bicycle_rack", "vehicle.emergency.ambulance", "vehicle.emergency.police", "static.other",
    "vehicle.ego",
)
SPLITS_FILE = Path(__file__).with_name("nuscenes_splits.json")
LIDARSEG_HINT = "a nuScenes-lidarseg release has it"
SPLIT_OF = {  # data.splits -> (pretrain, probe_train, eval) scene splits
    "validate": ("parametrizing", "train", "val"),
    "parametrize": ("parametrizing", "parametrizing", "verifying"),
    "mini": ("mini_train", "mini_train", "mini_val"),
}


@cache
def scene_splits() -> dict[str, tuple[str, ...]]:
    """Scene names of "train", "val", "mini_train", "mini_val", "verifying" and "parametrizing"."""
    splits = {k: tuple(v) for k, v in json.loads(SPLITS_FILE.read_text()).items() if not k.startswith("_")}
    verifying = set(splits["verifying"])
    splits["parametrizing"] = tuple(name for name in splits["train"] if name not in verifying)
    return splits


def category_lut(categories: list[dict[str, Any]], where: Path) -> np.ndarray:
    """(256,) int64: lidarseg index -> index into ``CLASS_NAMES`` (-1 ignored), from the category names."""
    lut = np.full(256, -1, dtype=np.int64)
    for row in categories:
        if "index" not in row:
            raise DataError(f"{where}: category '{row.get('name')}' has no 'index'; use the category.json of "
                            f"nuScenes-lidarseg")
        name, index = field(row, "name", f"{where} (a record)"), int(row["index"])
        if not 0 <= index < 256:
            raise DataError(f"{where}: category '{name}' has index {index}, outside 0..255")
        if name in GENERAL_TO_CLASS:
            lut[index] = CLASS_NAMES.index(GENERAL_TO_CLASS[name])
        elif name not in IGNORED_CATEGORIES:
            raise DataError(f"{where}: unknown lidarseg category '{name}'")
    return lut


class NuScenesLidarsegReader(NuScenesReader):
    """Keyframes of a nuScenes-lidarseg release with their point labels: ``reader.scene(token)``; scans of a scene
    split in order: ``reader.split_samples("val")``."""

    def __init__(self, root: Path | str, version: str = "v1.0-trainval") -> None:
        super().__init__(root, version)
        table_dir = self.root / version
        labels = table_dir / "lidarseg.json"
        where = f"{labels} (a record)"
        self._labels = {field(row, "sample_data_token", where): field(row, "filename", where)
                        for row in read_table(labels, LIDARSEG_HINT)}
        self._lut = category_lut(read_table(table_dir / "category.json", LIDARSEG_HINT), table_dir / "category.json")
        self._scenes = read_table(table_dir / "scene.json", LIDARSEG_HINT)
        self._scene_table = table_dir / "scene.json"

    def sequences(self) -> list[tuple[str, list[str]]]:
        """(scene name, its sample tokens in time order) for every scene, in ``scene.json`` order."""
        out = []
        samples = self._tables["sample"]
        for row in self._scenes:
            where = f"{self._scene_table} (a record)"
            name, token = field(row, "name", where), field(row, "first_sample_token", where)
            tokens = []
            while token:
                if token not in samples or len(tokens) > len(samples):
                    raise DataError(f"{self._scene_table}: scene '{name}' chains to sample '{token}', which "
                                    f"sample.json does not have (or the chain loops)")
                tokens.append(token)
                token = samples[token].get("next", "")
            out.append((name, tokens))
        return out

    def split_samples(self, split: str) -> list[tuple[int, str]]:
        """(sequence rank, sample token) of every keyframe of the scenes of ``split`` present in this release."""
        names = set(scene_splits()[split])
        kept = [(name, tokens) for name, tokens in self.sequences() if name in names]
        return [(rank, token) for rank, (_, tokens) in enumerate(kept) for token in tokens]

    def labels(self, sample_token: str, num_points: int) -> np.ndarray:
        """(P,) int64 class indices of the sample's LIDAR_TOP sweep (-1 = ignored)."""
        lidar = self._keyframes[sample_token].get("LIDAR_TOP")
        if lidar is None or lidar["token"] not in self._labels:
            raise DataError(f"sample '{sample_token}': its LIDAR_TOP keyframe has no lidarseg.json entry")
        path = self.root / self._labels[lidar["token"]]
        if not path.is_file():
            raise DataError(f"{path}: lidarseg label file not found")
        if path.stat().st_size != num_points:
            raise DataError(f"{path}: {path.stat().st_size} labels for a sweep of {num_points} points")
        return self._lut[np.fromfile(path, dtype=np.uint8)]

    def labelled_scene(self, sample_token: str, cameras: bool = True) -> Scene:
        """The sample's sweep with its labels and (when ``cameras``) its six keyframe images."""
        scene = self.scene(sample_token, cameras=None if cameras else [])
        return Scene(points=scene.points, cameras=scene.cameras, labels=self.labels(sample_token, scene.num_points),
                     class_names=CLASS_NAMES, name=scene.name)


def nuscenes_scans(data: DistillDataConfig, split: str, cameras: bool) -> ScanSet:
    """The keyframes of ``split`` ("pretrain", "probe_train", "eval") under ``data.splits`` (``SPLIT_OF``); the
    authors' label fraction 1/k keeps the scenes whose rank is a multiple of k."""
    reader = NuScenesLidarsegReader(data.root, data.version)
    scene_split = SPLIT_OF[data.splits][("pretrain", "probe_train", "eval").index(split)]
    samples = reader.split_samples(scene_split)
    return ScanSet(f"{data.root}/{data.version}/{scene_split}", len(samples),
                   lambda i: reader.labelled_scene(samples[i][1], cameras), CLASS_NAMES,
                   sequences=[rank for rank, _ in samples], skip_sequences=True)
