"""Evaluation of a (pre)trained 3D backbone by semantic segmentation: linear probe or fine-tuning.

* ``linear``: the backbone is frozen (BatchNorm statistics optionally re-estimated on the training scenes, see
  ``ProbeConfig.recalibrate_bn``); a linear layer on its per-point decoder features is trained full-batch with
  cross-entropy on the labelled points of the training scenes.
* ``finetune``: backbone and linear layer are trained together on batches of (augmented) training scenes.
Either way only a ``label_fraction`` of the training labels is used (whole scenes or single points, per
``ProbeConfig.label_unit``), and the model is scored on the evaluation scenes: per-class IoU and mIoU (``metrics``).
Without a checkpoint the backbone is randomly initialised (the lower bound every pretraining must beat).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from xmcl.distill.config import DistillConfig, DistillOptimConfig, VoxelConfig
from xmcl.distill.networks import build_voxel_net, load_pretrained_backbone
from xmcl.distill.preparation import batch_indices, load_scenes, scene_points, voxelize_scenes
from xmcl.distill.scene import Scene
from xmcl.distill.schedule import build_optimizer
from xmcl.distill.voxel_net import VoxelUNet
from xmcl.errors import ConfigError, DataError
from xmcl.metrics.segmentation import confusion_matrix, segmentation_scores
from xmcl.runtime.device import resolve_device
from xmcl.runtime.files import atomic_write_text, check_output_dir
from xmcl.runtime.rng import seed_everything, seeded_generator

MODES = ("linear", "finetune")


def select_labels(scenes: list[Scene], fraction: float, unit: str, seed: int) -> list[tuple[Scene, np.ndarray]]:
    """The training scenes and the labels kept of each (others set to -1).

    "scenes": ``max(1, round(fraction * n))`` whole scenes drawn at random; "points": each labelled point kept with
    probability ``fraction``.
    """
    if not 0.0 < fraction <= 1.0:
        raise ConfigError(f"label fraction must be in (0, 1], got {fraction}")
    for scene in scenes:
        if scene.labels is None:
            raise DataError(f"scene '{scene.name}' has no point labels; the probe needs labelled scenes")
    rng = np.random.default_rng([seed, 7])
    if unit == "scenes":
        keep = max(1, round(fraction * len(scenes)))
        chosen = sorted(rng.permutation(len(scenes))[:keep].tolist())
        return [(scenes[i], scenes[i].labels) for i in chosen]
    if unit == "points":
        return [(s, np.where(rng.random(s.num_points) < fraction, s.labels, -1)) for s in scenes]
    raise ConfigError(f"probe.label_unit must be 'scenes' or 'points', got {unit!r}")


@torch.no_grad()
def recalibrate_batchnorm(net: VoxelUNet, clouds: list[Tensor], cfg: VoxelConfig, batch_scenes: int) -> None:
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


def _train_linear(net: VoxelUNet, classifier: nn.Linear, clouds: list[Tensor], labels: list[Tensor],
                  voxel_cfg: VoxelConfig, cfg: DistillConfig) -> None:
    net.eval()
    if cfg.probe.recalibrate_bn:
        recalibrate_batchnorm(net, clouds, voxel_cfg, cfg.probe.batch_scenes)
    with torch.no_grad():
        features = torch.cat([net.features(voxelize_scenes([c], voxel_cfg, None)) for c in clouds])
    target = torch.cat(labels)
    keep = target >= 0
    features, target = features[keep], target[keep]
    optimizer = torch.optim.AdamW(classifier.parameters(), lr=cfg.probe.linear_lr, weight_decay=1e-4)
    for _ in tqdm(range(cfg.probe.linear_steps), desc="linear probe", disable=not cfg.run.progress):
        loss = F.cross_entropy(classifier(features), target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()


def _finetune(net: VoxelUNet, classifier: nn.Linear, clouds: list[Tensor], labels: list[Tensor],
              voxel_cfg: VoxelConfig, cfg: DistillConfig) -> None:
    p = cfg.probe
    optim_cfg = DistillOptimConfig(optimizer="adamw", lr=p.finetune_lr, steps=p.finetune_steps,
                            batch_scenes=min(p.batch_scenes, len(clouds)))
    optimizer, scheduler = build_optimizer(list(net.parameters()) + list(classifier.parameters()), optim_cfg)
    net.train()
    for step in tqdm(range(p.finetune_steps), desc="fine-tune", disable=not cfg.run.progress):
        chosen = batch_indices(len(clouds), optim_cfg.batch_scenes, p.seed, step)
        target = torch.cat([labels[i] for i in chosen])
        if not bool((target >= 0).any()):
            continue
        generator = seeded_generator(p.seed, 2, step) if cfg.data.augment else None
        features = net.features(voxelize_scenes([clouds[i] for i in chosen], voxel_cfg, generator))
        loss = F.cross_entropy(classifier(features), target, ignore_index=-1)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()


@torch.no_grad()
def evaluate_segmentation(net: VoxelUNet, classifier: nn.Linear, scenes: list[Scene], voxel_cfg: VoxelConfig,
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


def run_probe(cfg: DistillConfig, checkpoint: Path | None, out_dir: Path, mode: str = "linear",
              label_fraction: float = 1.0) -> dict:
    """Train a segmentation head (``mode`` "linear" or "finetune") and score it on the evaluation scenes.

    Returns (and writes to ``out_dir/probe_<mode>.json``) ``{"mode", "label_fraction", "label_unit",
    "checkpoint", "train_scenes", "labelled_points", "iou": {class: IoU or None}, "miou", "accuracy", "points"}``.
    """
    if mode not in MODES:
        raise ConfigError(f"probe mode must be one of {MODES}, got {mode!r}")
    if not 0.0 < label_fraction <= 1.0:
        raise ConfigError(f"label fraction must be in (0, 1], got {label_fraction}")
    check_output_dir(Path(out_dir), "--out")  # before the training, not after it
    device = resolve_device(cfg.run.device)
    seed_everything(cfg.probe.seed)
    if checkpoint is not None:
        net, voxel_cfg = load_pretrained_backbone(Path(checkpoint), device)
    else:
        voxel_cfg = cfg.voxel
        net = build_voxel_net(voxel_cfg).to(device)
    train_scenes = load_scenes(cfg.data, "probe_train")
    eval_scenes = load_scenes(cfg.data, "eval")
    class_names = train_scenes[0].class_names
    if not class_names or any(s.class_names != class_names for s in train_scenes + eval_scenes):
        raise DataError("probe scenes must all name the same, non-empty list of classes")
    selected = select_labels(train_scenes, label_fraction, cfg.probe.label_unit, cfg.probe.seed)
    clouds = [scene_points(s, device) for s, _ in selected]
    labels = [torch.from_numpy(y).to(device) for _, y in selected]
    labelled = int(sum(int((y >= 0).sum()) for y in labels))
    if labelled == 0:
        raise DataError(f"label fraction {label_fraction} leaves no labelled training point")
    classifier = nn.Linear(net.feature_dim, len(class_names)).to(device)
    if mode == "linear":
        _train_linear(net, classifier, clouds, labels, voxel_cfg, cfg)
    else:
        _finetune(net, classifier, clouds, labels, voxel_cfg, cfg)
    conf = evaluate_segmentation(net, classifier, eval_scenes, voxel_cfg, device)
    result = {
        "mode": mode, "label_fraction": label_fraction, "label_unit": cfg.probe.label_unit,
        "checkpoint": str(checkpoint) if checkpoint is not None else None,
        "train_scenes": len(selected), "labelled_points": labelled,
        **segmentation_scores(conf, class_names),
    }
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / f"probe_{mode}.json", json.dumps(result, indent=2))
    return result


def format_probe(result: dict) -> str:
    """A short table: one line per class (IoU in %, "-" if undefined) and the mIoU."""
    lines = [f"{result['mode']} probe, label fraction {result['label_fraction']} ({result['label_unit']}): "
             f"{result['train_scenes']} training scenes, {result['labelled_points']} labelled points"]
    for name, iou in result["iou"].items():
        lines.append(f"  {name:<12} {'-' if iou is None else f'{100 * iou:5.1f}'}")
    lines.append(f"  {'mIoU':<12} {100 * result['miou']:5.1f}")
    return "\n".join(lines)
