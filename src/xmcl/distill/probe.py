"""The probe's library pieces (its loops: ``xmcl.training.probe_trainer``): which training labels a label fraction
keeps (``select_labels``), the labelled scans as tensors, BatchNorm statistics re-estimated on the training scans,
the confusion matrix on the evaluation scans, and the result as a short table.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from torch import Tensor, nn

from xmcl.distill.config import VoxelConfig
from xmcl.distill.networks import PointNet
from xmcl.distill.preparation import scene_points, voxelize_scenes
from xmcl.distill.scene import Scene
from xmcl.errors import ConfigError, DataError
from xmcl.metrics.segmentation import confusion_matrix


@dataclass
class LabelSelection:
    """The training scans a label fraction keeps (``indices``) and, for the "points" unit, the share of each scan's
    labelled points kept (drawn per scan from ``(seed, 7, index)``)."""

    indices: list[int]
    point_fraction: float | None
    seed: int

    def labels(self, index: int, scene: Scene) -> np.ndarray:
        """The labels of training scan ``index`` that the probe sees (others set to -1)."""
        if scene.labels is None:
            raise DataError(f"scene '{scene.name}' has no point labels; the probe needs labelled scenes")
        if self.point_fraction is None:
            return scene.labels
        rng = np.random.default_rng([self.seed, 7, index])
        return np.where(rng.random(scene.num_points) < self.point_fraction, scene.labels, -1)


def select_labels(scans: Sequence[Scene], fraction: float, unit: str, seed: int) -> LabelSelection:
    """Which training labels a ``fraction`` keeps.

    "scenes": ``max(1, round(fraction * n))`` whole scans drawn at random; "points": each labelled point kept with
    probability ``fraction``; "skip" (the authors'): every k-th scan, ``k = round(1 / fraction)``, as
    ``scans.every_kth(k)`` counts them (every k-th sequence on nuScenes).
    """
    if not 0.0 < fraction <= 1.0:
        raise ConfigError(f"label fraction must be in (0, 1], got {fraction}")
    n = len(scans)
    if unit == "scenes":
        keep = max(1, round(fraction * n))
        chosen = sorted(np.random.default_rng([seed, 7]).permutation(n)[:keep].tolist())
        return LabelSelection(chosen, None, seed)
    if unit == "points":
        return LabelSelection(list(range(n)), fraction, seed)
    if unit == "skip":
        k = max(1, round(1.0 / fraction))
        every_kth = getattr(scans, "every_kth", None)
        chosen = every_kth(k) if every_kth is not None else list(range(0, n, k))
        if not chosen:
            raise DataError(f"label fraction {fraction} (every {k}th) keeps none of the {n} training scans")
        return LabelSelection(chosen, None, seed)
    raise ConfigError(f"probe.label_unit must be 'scenes', 'points' or 'skip', got {unit!r}")


@torch.no_grad()
def recalibrate_batchnorm(net: PointNet, clouds: list[Tensor], cfg: VoxelConfig, batch_scenes: int) -> None:
    """Replace every BatchNorm's running mean/variance by their average over batches of ``clouds``."""
    norms = [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average
    net.train()
    for start in range(0, len(clouds), batch_scenes):
        net.voxel_features(voxelize_scenes(clouds[start:start + batch_scenes], cfg, None))
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
    net.eval()


@torch.no_grad()
def evaluate_segmentation(net: PointNet, classifier: nn.Linear, scenes: Sequence[Scene], voxel_cfg: VoxelConfig,
                          device: torch.device) -> Tensor:
    """Confusion matrix (C x C, rows = ground truth) of the network's predictions on ``scenes``."""
    net.eval()
    num_classes = classifier.out_features
    conf = torch.zeros(num_classes, num_classes, dtype=torch.long)
    for scene in scenes:
        if scene.labels is None:
            raise DataError(f"evaluation scene '{scene.name}' has no point labels")
        logits = classifier(net.features(voxelize_scenes([scene_points(scene, device)], voxel_cfg, None)))
        conf += confusion_matrix(logits.argmax(1).cpu(), torch.from_numpy(scene.labels), num_classes)
    return conf


def labelled_batch(scans: Sequence[Scene], selection: LabelSelection, chosen: list[int],
                   device: torch.device) -> tuple[list[Tensor], Tensor]:
    """The clouds of training scans ``chosen`` on ``device`` and their labels as the selection keeps them,
    concatenated in the same order."""
    clouds, labels = [], []
    for index in chosen:
        scene = scans[index]
        clouds.append(scene_points(scene, device))
        labels.append(torch.from_numpy(selection.labels(index, scene)).to(device))
    return clouds, torch.cat(labels)


def format_probe(result: dict) -> str:
    """A short table: one line per class (IoU in %, "-" if undefined), the mIoU and the authors' mIoU."""
    points = "" if result["labelled_points"] is None else f", {result['labelled_points']} labelled points"
    lines = [f"{result['mode']} probe ({result['protocol']} protocol), label fraction {result['label_fraction']} "
             f"({result['label_unit']}): {result['train_scenes']} training scans{points}"]
    for name, iou in result["iou"].items():
        lines.append(f"  {name:<12} {'-' if iou is None else f'{100 * iou:5.1f}'}")
    lines.append(f"  {'mIoU':<12} {100 * result['miou']:5.1f}")
    lines.append(f"  {'mIoU (authors: absent classes = 1)':<12} {100 * result['miou_authors']:5.1f}")
    return "\n".join(lines)
