"""The probe's training loops, written out: evaluation of a (pre)trained 3D backbone by semantic segmentation,
linear probe or fine-tuning, by our protocol or the authors' (``ProbeConfig.protocol``); ``run_probe`` drives them
(the library pieces they use: ``xmcl.distill.probe``).

* ours, ``linear``: the backbone is frozen (BatchNorm statistics optionally re-estimated on the training scans, see
  ``ProbeConfig.recalibrate_bn``); a linear layer on its per-point decoder features is trained full-batch with
  cross-entropy on the labelled points of the training scans (all held in memory: meant for the built-in scenes).
* ours, ``finetune``: backbone and linear layer are trained together on batches of (augmented) training scans.
* authors (SLidR's downstream code): cross-entropy + Lovasz-softmax, SGD with a separate learning rate for the last
  layer, cosine annealing per epoch, batches of augmented scans read per step; ``linear`` freezes all but the last
  layer and keeps BatchNorm in eval mode, ``finetune`` trains everything. Two differences remain: the loss runs over
  every labelled point (theirs over voxels, each labelled as its first point), and the classifier has no output
  for the ignored class (theirs keeps one, trains it down and masks it at evaluation).
Either way only a ``label_fraction`` of the training labels is used (``select_labels``), and the model is scored on
the evaluation scans: per-class IoU, mIoU, and the authors' mIoU (``metrics``). Without a checkpoint the backbone is
randomly initialised (the lower bound every pretraining must beat).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from xmcl.distill.config import DistillConfig, DistillOptimConfig, VoxelConfig
from xmcl.distill.networks import PointNet, build_voxel_net, load_pretrained_backbone
from xmcl.distill.preparation import batch_indices, voxelize_scenes
from xmcl.distill.probe import (
    LabelSelection,
    evaluate_segmentation,
    labelled_batch,
    recalibrate_batchnorm,
    select_labels,
)
from xmcl.distill.readers.sources import open_scans
from xmcl.distill.scene import Scene
from xmcl.distill.segmentation_loss import cross_entropy_lovasz
from xmcl.errors import ConfigError, DataError
from xmcl.metrics.segmentation import segmentation_scores
from xmcl.nn.spconv_map import resolve_sparse_backend
from xmcl.runtime.device import resolve_device
from xmcl.runtime.files import atomic_write_text, check_output_dir
from xmcl.runtime.rng import seed_everything, seeded_generator
from xmcl.training.schedule import build_optimizer

MODES = ("linear", "finetune")
AUTHORS_ORDER_STREAM = 4  # purpose id of the generator of the authors' per-epoch scan order


def _train_linear(net: PointNet, classifier: nn.Linear, clouds: list[Tensor], labels: list[Tensor],
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


def _finetune(net: PointNet, classifier: nn.Linear, clouds: list[Tensor], labels: list[Tensor],
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


def _train_authors(net: PointNet, classifier: nn.Linear, scans: Sequence[Scene], selection: LabelSelection,
                   voxel_cfg: VoxelConfig, cfg: DistillConfig, mode: str, device: torch.device) -> None:
    """SLidR's downstream training: CE + Lovasz, SGD (last layer at ``sgd_lr_head``), cosine annealing per epoch."""
    p = cfg.probe
    linear = mode == "linear"
    groups = [{"params": list(classifier.parameters()), "lr": p.sgd_lr_head}]
    if linear:
        net.requires_grad_(False)
    else:
        groups.append({"params": list(net.parameters()), "lr": p.sgd_lr})
    optimizer = torch.optim.SGD(groups, lr=p.sgd_lr, momentum=p.sgd_momentum, dampening=p.sgd_dampening,
                                weight_decay=p.sgd_weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=p.epochs)
    n = len(selection.indices)
    batch = min(p.batch_scenes, n)
    per_epoch = n // batch  # the last partial batch is dropped, as their loader does
    bar = tqdm(total=p.epochs * per_epoch, desc=f"{mode} (authors)", disable=not cfg.run.progress)
    step = 0
    for epoch in range(p.epochs):
        order = torch.randperm(n, generator=seeded_generator(p.seed, AUTHORS_ORDER_STREAM, epoch)).tolist()
        for b in range(per_epoch):
            chosen = [selection.indices[j] for j in order[b * batch:(b + 1) * batch]]
            clouds, target = labelled_batch(scans, selection, chosen, device)
            generator = seeded_generator(p.seed, 2, step) if cfg.data.augment else None
            voxels = voxelize_scenes(clouds, voxel_cfg, generator)
            if linear:
                net.eval()  # frozen: BatchNorm keeps its statistics
                with torch.no_grad():
                    features = net.features(voxels)
            else:
                net.train()
                features = net.features(voxels)
            loss = cross_entropy_lovasz(classifier(features), target)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            bar.update()
        scheduler.step()
    bar.close()


def run_probe(cfg: DistillConfig, checkpoint: Path | None, out_dir: Path, mode: str = "linear",
              label_fraction: float = 1.0) -> dict:
    """Train a segmentation head (``mode`` "linear" or "finetune") and score it on the evaluation scans.

    Returns (and writes to ``out_dir/probe_<mode>.json``, ``probe_<mode>_authors.json`` under the authors'
    protocol) ``{"mode", "protocol", "label_fraction", "label_unit", "checkpoint", "train_scenes",
    "labelled_points", "iou": {class: IoU or None}, "miou", "miou_authors", "accuracy", "points"}``.
    """
    if mode not in MODES:
        raise ConfigError(f"probe mode must be one of {MODES}, got {mode!r}")
    if not 0.0 < label_fraction <= 1.0:
        raise ConfigError(f"label fraction must be in (0, 1], got {label_fraction}")
    check_output_dir(Path(out_dir), "--out")  # before the training, not after it
    device = resolve_device(cfg.run.device)
    resolve_sparse_backend(cfg.voxel.sparse_backend, device)  # refuse "spconv" without spconv before any work
    seed_everything(cfg.probe.seed)
    if checkpoint is not None:
        net, voxel_cfg = load_pretrained_backbone(Path(checkpoint), device, cfg.voxel.sparse_backend)
    else:
        voxel_cfg = cfg.voxel
        net = build_voxel_net(voxel_cfg).to(device)
    train_scans = open_scans(cfg.data, "probe_train", cameras=False)
    eval_scans = open_scans(cfg.data, "eval", cameras=False)
    class_names = train_scans.class_names
    if not class_names or eval_scans.class_names != class_names:
        raise DataError("probe scans must all name the same, non-empty list of classes")
    selection = select_labels(train_scans, label_fraction, cfg.probe.label_unit, cfg.probe.seed)
    classifier = nn.Linear(net.feature_dim, len(class_names)).to(device)
    if cfg.probe.protocol == "authors":
        _train_authors(net, classifier, train_scans, selection, voxel_cfg, cfg, mode, device)
        labelled = None
    else:
        clouds, labels = [], []
        for index in selection.indices:
            cloud, target = labelled_batch(train_scans, selection, [index], device)
            clouds.append(cloud[0])
            labels.append(target)
        labelled = int(sum(int((y >= 0).sum()) for y in labels))
        if labelled == 0:
            raise DataError(f"label fraction {label_fraction} leaves no labelled training point")
        if mode == "linear":
            _train_linear(net, classifier, clouds, labels, voxel_cfg, cfg)
        else:
            _finetune(net, classifier, clouds, labels, voxel_cfg, cfg)
    conf = evaluate_segmentation(net, classifier, eval_scans, voxel_cfg, device)
    result = {
        "mode": mode, "protocol": cfg.probe.protocol, "label_fraction": label_fraction,
        "label_unit": cfg.probe.label_unit, "checkpoint": str(checkpoint) if checkpoint is not None else None,
        "train_scenes": len(selection.indices), "labelled_points": labelled,
        **segmentation_scores(conf, class_names),
    }
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    suffix = "_authors" if cfg.probe.protocol == "authors" else ""
    atomic_write_text(out_dir / f"probe_{mode}{suffix}.json", json.dumps(result, indent=2))
    return result
