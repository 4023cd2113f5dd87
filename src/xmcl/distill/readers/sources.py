"""The scans of each split, whatever ``data.source`` is: ``open_scans(data, split)``.

A ``ScanSet`` is a lazy sequence of ``Scene``s (a scan is read or generated when indexed) with the class names of
its labels and the authors' label-fraction rule (``every_kth``). Splits: "pretrain", "probe_train" and "eval"; what
they hold per source and ``data.splits`` mode is described on ``DistillDataConfig``; the "kitti" source (a folder in
the KITTI object layout, ``readers.kitti``) holds the "pretrain" split alone.
"""

from __future__ import annotations

from xmcl.distill.config import DistillDataConfig
from xmcl.distill.readers.kitti import kitti_scans
from xmcl.distill.readers.nuscenes_lidarseg import nuscenes_scans
from xmcl.distill.readers.semantickitti import semantickitti_scans
from xmcl.distill.scanset import ScanSet
from xmcl.distill.scene import Scene
from xmcl.distill.synthetic import CLASS_NAMES, SyntheticScenes
from xmcl.errors import ConfigError, DataError

SPLITS = ("pretrain", "probe_train", "eval")


def _synthetic(data: DistillDataConfig, split: str) -> ScanSet:
    counts = {"pretrain": data.pretrain_scenes, "probe_train": data.probe_train_scenes, "eval": data.eval_scenes}
    seed = data.seed + 1 if split == "eval" else data.seed
    scenes = SyntheticScenes(counts[split], seed=seed, num_points_target=data.num_points,
                             image_size=tuple(data.image_size), num_cameras=data.num_cameras)
    generated: dict[int, Scene] = {}  # ray casting is the slow part: each scene is generated once

    def load(index: int) -> Scene:
        if index not in generated:
            generated[index] = scenes[index]
        return generated[index]

    return ScanSet(f"synthetic/{split}", len(scenes), load, CLASS_NAMES)


def open_scans(data: DistillDataConfig, split: str, cameras: bool = True) -> ScanSet:
    """The scans of ``split`` ("pretrain", "probe_train" or "eval") of ``data.source``; ``cameras=False`` reads
    points and labels only (real sources; generated scenes always carry their cameras)."""
    if split not in SPLITS:
        raise ConfigError(f"unknown scan split {split!r}; one of {list(SPLITS)}")
    if data.source == "synthetic":
        return _synthetic(data, split)
    if data.source == "nuscenes":
        scans = nuscenes_scans(data, split, cameras)
    elif data.source == "semantickitti":
        scans = semantickitti_scans(data, split, cameras)
    elif data.source == "kitti":
        scans = kitti_scans(data, split, cameras)
    else:
        raise ConfigError(f"data.source {data.source!r} is not one of synthetic, nuscenes, semantickitti, kitti")
    if data.max_scans is not None and len(scans) > data.max_scans:
        limit = data.max_scans
        scans = ScanSet(scans.name, limit, scans.__getitem__, scans.class_names, scans.sequences[:limit],
                        scans.skip_sequences)
    if len(scans) == 0:
        raise DataError(f"{scans.name}: the {split} split holds no scan")
    return scans
