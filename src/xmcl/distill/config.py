"""Typed configuration of ST-SLidR pretraining and its evaluation (loaded from YAML by ``xmcl.config``).

One ``DistillConfig`` serves both commands: ``pretrain`` reads ``run``, ``data``, ``voxel``, ``image``,
``superpixels``, ``loss`` and ``optim``; ``probe`` reads ``run``, ``data`` and ``probe`` (and ``voxel`` only when no
checkpoint is given: a checkpoint carries the shape of its network). Ranges are checked at load.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from xmcl.config import require
from xmcl.errors import ConfigError
from xmcl.runtime.run_config import RunConfig


@dataclass
class DistillDataConfig:
    """Built-in synthetic driving scenes (``xmcl.distill.synthetic``).

    Pretraining uses scenes ``0..pretrain_scenes-1`` of the set drawn from ``seed``; the probe trains on the first
    ``probe_train_scenes`` of the same set (labels of scenes seen unlabelled in pretraining, as SLidR's protocol on
    nuScenes' train split) and evaluates on ``eval_scenes`` scenes of the disjoint set drawn from ``seed + 1``.
    ``augment``: random rotation about z and random mirroring of the points fed to the 3D net (the point-pixel
    pairing is fixed before it), in pretraining and fine-tuning.
    """

    source: Literal["synthetic"] = "synthetic"
    seed: int = 0
    pretrain_scenes: int = 48
    probe_train_scenes: int = 16
    eval_scenes: int = 16
    num_points: int = 8000
    image_size: list[int] = field(default_factory=lambda: [96, 192])
    num_cameras: int = 4
    augment: bool = True

    def __post_init__(self) -> None:
        require(self, "seed", ge=0)
        for name in ("pretrain_scenes", "probe_train_scenes", "eval_scenes", "num_cameras"):
            require(self, name, ge=1)
        require(self, "num_points", ge=100)
        require(self, "image_size", ge=16)
        if len(self.image_size) != 2:
            raise ConfigError(f"'image_size' must be [height, width], got {self.image_size}")


@dataclass
class VoxelConfig:
    """The 3D network (``xmcl.distill.voxel_net.VoxelUNet``) and how points become voxels.

    ``coordinates``: "cubic" voxels of side ``voxel_size`` metres, or "cylindrical" cells of ``voxel_size`` in
    radius and height and ``angular_resolution_deg`` in azimuth. Input feature per point: its intensity.
    """

    voxel_size: float = 0.1
    coordinates: Literal["cubic", "cylindrical"] = "cubic"
    angular_resolution_deg: float = 1.0
    widths: list[int] = field(default_factory=lambda: [32, 64, 96, 128])
    blocks: int = 1
    out_dim: int = 64

    def __post_init__(self) -> None:
        require(self, "voxel_size", gt=0.0, le=100.0)
        require(self, "angular_resolution_deg", gt=0.0, le=360.0)
        require(self, "widths", ge=1)
        require(self, "blocks", ge=1)
        require(self, "out_dim", ge=1)
        if not self.widths:
            raise ConfigError("'widths' must list at least one width")


@dataclass
class ImageConfig:
    """The frozen 2D backbone (``xmcl.nn.backbones``) whose features are distilled; its 1x1 head maps to
    ``voxel.out_dim``. ``weights``: "imagenet", a local state-dict path, or null (random). ``input_scale``: the
    backbone sees the image resized by this factor (2 = a map of stride 16 instead of 32 for small images)."""

    backbone: str = "efficientnet_lite0"
    weights: str | None = "imagenet"
    resnet_width: int = 64
    input_scale: float = 2.0

    def __post_init__(self) -> None:
        require(self, "resnet_width", ge=1)
        require(self, "input_scale", gt=0.0, le=16.0)


@dataclass
class SuperpixelConfig:
    """SLIC parameters (``xmcl.distill.superpixels``); maps are cached in ``cache_dir`` (default: OUT/superpixels)."""

    n_segments: int = 60
    compactness: float = 10.0
    sigma: float = 3.0
    cache_dir: Path | None = None

    def __post_init__(self) -> None:
        require(self, "n_segments", ge=1)
        require(self, "compactness", gt=0.0)
        require(self, "sigma", ge=0.0, le=100.0)


@dataclass
class DistillLossConfig:
    """``xmcl.contrast.STSlidrLoss``: SLidR = tolerance "none", balance false; semantically tolerant = tolerance
    "quantile" (or "soft"); ST-SLidR = tolerant + ``balance`` true."""

    tau: float = 0.07
    tolerance: Literal["none", "quantile", "soft"] = "quantile"
    quantile_variant: Literal["remove", "authors"] = "remove"
    q: float = 0.05
    balance: bool = True
    threshold: float = 0.5

    def __post_init__(self) -> None:
        require(self, "tau", gt=0.0, le=10.0)
        require(self, "q", ge=0.0, lt=1.0)
        require(self, "threshold", ge=-1.0, le=1.0)


@dataclass
class DistillOptimConfig:
    """Optimiser of the 3D network and the 2D head; cosine decay to 0 after ``warmup_steps`` of linear warm-up."""

    optimizer: Literal["adamw", "sgd"] = "adamw"
    lr: float = 2e-3
    weight_decay: float = 1e-4
    momentum: float = 0.9
    warmup_steps: int = 10
    steps: int = 300
    batch_scenes: int = 2

    def __post_init__(self) -> None:
        require(self, "lr", gt=0.0, le=10.0)
        require(self, "weight_decay", ge=0.0, le=1.0)
        require(self, "momentum", ge=0.0, lt=1.0)
        require(self, "warmup_steps", ge=0)
        require(self, "steps", ge=1)
        require(self, "batch_scenes", ge=1)


@dataclass
class ProbeConfig:
    """Evaluation by 3D semantic segmentation.

    ``linear``: frozen backbone, a linear layer on its per-point features (decoder output), trained full-batch for
    ``linear_steps`` AdamW steps at ``linear_lr``. ``finetune``: backbone and linear layer trained together for
    ``finetune_steps`` steps of ``batch_scenes`` scenes at ``finetune_lr``. ``label_unit``: the label fraction keeps
    that share of the probe's training "scenes" (at least one) or of their labelled "points". ``recalibrate_bn``:
    re-estimate the backbone's BatchNorm statistics on the training scenes before a linear probe (the same
    treatment for pretrained and random networks).
    """

    seed: int = 0
    linear_steps: int = 300
    linear_lr: float = 1e-2
    finetune_steps: int = 200
    finetune_lr: float = 2e-3
    batch_scenes: int = 2
    label_unit: Literal["scenes", "points"] = "scenes"
    recalibrate_bn: bool = True

    def __post_init__(self) -> None:
        require(self, "seed", ge=0)
        require(self, "linear_steps", ge=1)
        require(self, "finetune_steps", ge=1)
        require(self, "linear_lr", gt=0.0, le=10.0)
        require(self, "finetune_lr", gt=0.0, le=10.0)
        require(self, "batch_scenes", ge=1)


def _distill_run() -> RunConfig:
    return RunConfig(checkpoint_every=100, log_every=10)


@dataclass
class DistillConfig:
    """Everything ST-SLidR pretraining and its probe need (``run`` defaults: a checkpoint every 100 steps, a log
    line every 10)."""

    run: RunConfig = field(default_factory=_distill_run)
    data: DistillDataConfig = field(default_factory=DistillDataConfig)
    voxel: VoxelConfig = field(default_factory=VoxelConfig)
    image: ImageConfig = field(default_factory=ImageConfig)
    superpixels: SuperpixelConfig = field(default_factory=SuperpixelConfig)
    loss: DistillLossConfig = field(default_factory=DistillLossConfig)
    optim: DistillOptimConfig = field(default_factory=DistillOptimConfig)
    probe: ProbeConfig = field(default_factory=ProbeConfig)
