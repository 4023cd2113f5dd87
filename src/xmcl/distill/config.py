"""Typed configuration of ST-SLidR pretraining and its evaluation (loaded from YAML by ``xmcl.config``).

One ``DistillConfig`` serves both commands: ``pretrain`` reads ``run``, ``data``, ``augmentation``, ``voxel``,
``image``, ``superpixels``, ``loss`` and ``optim``; ``probe`` reads ``run``, ``data`` and ``probe`` (and ``voxel`` only
when no checkpoint is given: a checkpoint carries the shape of its network). Ranges are checked at load.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from xmcl.config import FieldRangeError, require, require_optimiser
from xmcl.errors import ConfigError
from xmcl.runtime.run_config import RunConfig


@dataclass
class DistillDataConfig:
    """Where the scans come from and how they split.

    ``source``: "synthetic" (built-in driving scenes, ``xmcl.distill.synthetic``), "nuscenes" (a nuScenes release
    with lidarseg under ``root``, tables in ``root/<version>``), "semantickitti" (``root/sequences/NN``) or "kitti"
    (a folder in the KITTI object layout, ``root/velodyne``, ``image_2``, ``calib``: pretraining only, its frames
    have no point labels). The three splits (``xmcl.distill.readers.sources``):

    * synthetic: pretraining uses scenes ``0..pretrain_scenes-1`` of the set drawn from ``seed``; the probe trains
      on the first ``probe_train_scenes`` of the same set (labels of scenes seen unlabelled in pretraining, as
      SLidR's protocol) and scores on ``eval_scenes`` scenes of the disjoint set drawn from ``seed + 1``
      (``num_points``, ``image_size``, ``num_cameras`` shape the generated scenes).
    * real data, ``splits`` as the authors' ``dataset.training``: "validate" = pretrain on nuScenes' parametrizing
      scenes (train minus SLidR's 100 verifying scenes), probe trains on train and scores on val; "parametrize" =
      pretrain and probe-train on parametrizing, score on verifying; "mini" = v1.0-mini's mini_train / mini_val.
      SemanticKITTI: train = sequences 00-07, 09, 10 and val = 08 in every mode. ``max_scans`` keeps the first
      scans of each split (smoke runs; null = all).

    ``augment``: the augmentations of the ``augmentation`` section, in pretraining and fine-tuning.
    """

    source: Literal["synthetic", "nuscenes", "semantickitti", "kitti"] = "synthetic"
    root: Path | None = None
    version: str = "v1.0-trainval"
    splits: Literal["validate", "parametrize", "mini"] = "validate"
    max_scans: int | None = None
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
        require(self, "max_scans", ge=1)
        if len(self.image_size) != 2:
            raise ConfigError(f"'image_size' must be [height, width], got {self.image_size}")
        if self.source != "synthetic" and self.root is None:
            raise ConfigError(f"'root' must name the data folder when 'source' is {self.source!r}")


@dataclass
class AugmentationConfig:
    """The authors' augmentations (SLidR / ST-SLidR ``utils/transforms.py``), applied when ``data.augment`` is true.

    Points, in pretraining and fine-tuning, always (``xmcl.distill.augment.augment_points``): rotation about z by an
    angle uniform in [0, 2 pi), then x and y each negated with probability 1/2. Pretraining only, on the points,
    each image, its superpixels and the point-pixel pairs together, in this order:

    * ``drop_cuboids``: the points inside a box centred on a random point, of half-extent ``u * range / 2`` per axis
      (``u`` uniform in [0, 0.2), ``range`` the cloud's extent), are removed, unless an image would keep fewer than
      ``min_pairs`` pairs (then nothing is dropped);
    * ``resized_crop``: a crop of area share uniform in ``crop_scale`` and aspect ratio (width / height)
      log-uniform in ``crop_ratio`` is resized to ``crop_size`` [H, W]; it is drawn again until it keeps more than
      ``min_pairs`` pairs or more than ``min_pair_share`` of the camera's pairs (at most 100 draws, then the whole
      image);
    * ``flip_horizontal``: each image, with its superpixels and pairs, mirrored with probability 1/2.
    """

    drop_cuboids: bool = True
    resized_crop: bool = True
    crop_size: list[int] = field(default_factory=lambda: [224, 416])
    crop_scale: list[float] = field(default_factory=lambda: [0.3, 1.0])
    crop_ratio: list[float] = field(default_factory=lambda: [14.0 / 9.0, 17.0 / 9.0])
    flip_horizontal: bool = True
    min_pairs: int = 1024
    min_pair_share: float = 0.75

    def __post_init__(self) -> None:
        require(self, "crop_size", ge=8)
        require(self, "crop_scale", gt=0.0, le=1.0)
        require(self, "crop_ratio", gt=0.0)
        require(self, "min_pairs", ge=0)
        require(self, "min_pair_share", ge=0.0, le=1.0)
        if len(self.crop_size) != 2:
            raise ConfigError(f"'crop_size' must be [height, width], got {self.crop_size}")
        for name in ("crop_scale", "crop_ratio"):
            values = getattr(self, name)
            if len(values) != 2 or values[0] > values[1]:
                raise ConfigError(f"'{name}' must be [low, high] with low <= high, got {values}")

    @property
    def mixes_images(self) -> bool:
        """True when an augmentation changes the images or pairs (the backbone maps are then recomputed per step)."""
        return self.drop_cuboids or self.resized_crop or self.flip_horizontal


@dataclass
class VoxelConfig:
    """The 3D network and how points become voxels.

    ``coordinates``: "cylindrical" cells of ``voxel_size`` in radius and height and ``angular_resolution_deg`` in
    azimuth (the authors' default), or "cubic" voxels of side ``voxel_size`` metres. Input feature per point: its
    intensity. ``architecture``: "unet" (``xmcl.distill.voxel_net.VoxelUNet``: ``widths`` per level, ``blocks``
    residual blocks at each) or "res16unet" (``xmcl.distill.res16unet.Res16UNet``, the authors' MinkUNet layout:
    a stem of ``init_dim`` channels, then ``planes`` / ``layers`` for its four encoder and four decoder stages; the
    defaults are Res16UNet34C). ``bn_momentum``: of every BatchNorm (the authors pretrain with 0.05).
    ``sparse_backend``: the sparse convolutions' kernels, "torch" (plain PyTorch), "spconv" (``pip install
    xmcl[spconv]``) or "auto" (spconv on CUDA when installed, else torch); the same weights and function for all
    three (``xmcl.nn.spconv_map``), so it may change when a run resumes or a pretrained network is probed.
    """

    voxel_size: float = 0.1
    coordinates: Literal["cubic", "cylindrical"] = "cylindrical"
    angular_resolution_deg: float = 1.0
    architecture: Literal["unet", "res16unet"] = "unet"
    widths: list[int] = field(default_factory=lambda: [32, 64, 96, 128])
    blocks: int = 1
    init_dim: int = 32
    planes: list[int] = field(default_factory=lambda: [32, 64, 128, 256, 256, 128, 96, 96])
    layers: list[int] = field(default_factory=lambda: [2, 3, 4, 6, 2, 2, 2, 2])
    bn_momentum: float = 0.1
    out_dim: int = 64
    sparse_backend: Literal["auto", "torch", "spconv"] = "auto"

    def __post_init__(self) -> None:
        require(self, "voxel_size", gt=0.0, le=100.0)
        require(self, "angular_resolution_deg", gt=0.0, le=360.0)
        require(self, "widths", ge=1)
        require(self, "blocks", ge=1)
        require(self, "init_dim", ge=1)
        require(self, "planes", ge=1)
        require(self, "layers", ge=1)
        require(self, "bn_momentum", gt=0.0, le=1.0)
        require(self, "out_dim", ge=1)
        if not self.widths:
            raise ConfigError("'widths' must list at least one width")
        if len(self.planes) != 8 or len(self.layers) != 8:
            raise ConfigError(f"'planes' and 'layers' must hold 8 values each (4 encoder + 4 decoder stages), got "
                              f"{len(self.planes)} and {len(self.layers)}")


@dataclass
class ImageConfig:
    """The frozen 2D backbone (``xmcl.nn.backbones``) whose features are distilled; its 1x1 head maps to
    ``voxel.out_dim``. ``weights``: "imagenet" (EfficientNet-Lite0's packaged file), a local checkpoint path, or
    null (random); ``weights_format`` says how a path is laid out: "torchvision" (a plain or ``module.``-prefixed
    state dict), "moco_v2", "swav" or "dino" (the self-supervised ResNet-50 files the authors distil, see
    ``xmcl.nn.self_supervised``). ``input_scale``: the backbone sees the image resized by this factor (2 = a map of
    stride 16 instead of 32 for small images; 1 for the authors' ``resnet50_dilated``, stride 4)."""

    backbone: str = "efficientnet_lite0"
    weights: str | None = "imagenet"
    weights_format: Literal["torchvision", "moco_v2", "swav", "dino"] = "torchvision"
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
    "quantile" (or "soft"); ST-SLidR = tolerant + ``balance`` true.

    ``gather`` (data-parallel runs only): "local" = each rank contrasts the superpixels of its own scenes, and its
    BatchNorm statistics are its own sites' (as each GPU of the authors' runs does); "global" = the superpixel
    features of every rank are gathered (with gradient; the semantic features without), so negatives, tolerance
    and balancing span the global batch, and BatchNorm spans every rank's sites: the step of one process with the
    whole global batch."""

    tau: float = 0.07
    tolerance: Literal["none", "quantile", "soft"] = "quantile"
    quantile_variant: Literal["remove", "authors"] = "remove"
    q: float = 0.01
    balance: bool = True
    threshold: float = 0.5
    gather: Literal["local", "global"] = "local"

    def __post_init__(self) -> None:
        require(self, "tau", gt=0.0, le=10.0)
        require(self, "q", ge=0.0, lt=1.0)
        require(self, "threshold", ge=-1.0, le=1.0)


@dataclass
class DistillOptimConfig:
    """Optimiser of the 3D network and the 2D head; cosine decay to 0 after ``warmup_steps`` of linear warm-up.
    ``momentum`` and ``dampening`` are SGD's (the authors pretrain with SGD, lr 0.5, momentum 0.9, dampening 0.1)."""

    optimizer: Literal["adamw", "sgd"] = "adamw"
    lr: float = 2e-3
    weight_decay: float = 1e-4
    momentum: float = 0.9
    dampening: float = 0.0
    warmup_steps: int = 10
    steps: int = 300
    batch_scenes: int = 2

    def __post_init__(self) -> None:
        require_optimiser(self)
        require(self, "warmup_steps", ge=0)
        require(self, "batch_scenes", ge=1)


@dataclass
class ProbeConfig:
    """Evaluation by 3D semantic segmentation (``xmcl.distill.probe``).

    ``protocol`` "ours": ``linear`` = frozen backbone (BatchNorm statistics re-estimated on the training scans when
    ``recalibrate_bn``), a linear layer on its per-point decoder features trained full-batch with cross-entropy for
    ``linear_steps`` AdamW steps at ``linear_lr``; ``finetune`` = backbone and layer trained together for
    ``finetune_steps`` steps of ``batch_scenes`` scans at ``finetune_lr`` (AdamW, warm-up + cosine).
    ``protocol`` "authors" (SLidR's downstream code): cross-entropy + Lovasz-softmax, SGD (momentum ``sgd_momentum``,
    dampening ``sgd_dampening``, weight decay ``sgd_weight_decay``) at ``sgd_lr`` for the backbone and
    ``sgd_lr_head`` for the last layer, cosine annealing per epoch over ``epochs`` epochs of batches of
    ``batch_scenes`` augmented scans; ``linear`` freezes all but the last layer and keeps BatchNorm in eval mode
    (no re-estimation). ``label_unit``: the label fraction keeps that share of the training "scenes" (random, at
    least one), of their labelled "points", or ("skip", the authors') every k-th scan with k = round(1 / fraction)
    (every k-th sequence on nuScenes, as their loader counts scenes).
    """

    seed: int = 0
    protocol: Literal["ours", "authors"] = "ours"
    linear_steps: int = 300
    linear_lr: float = 1e-2
    finetune_steps: int = 200
    finetune_lr: float = 2e-3
    batch_scenes: int = 2
    label_unit: Literal["scenes", "points", "skip"] = "scenes"
    recalibrate_bn: bool = True
    epochs: int = 50
    sgd_lr: float = 0.02
    sgd_lr_head: float = 2.0
    sgd_momentum: float = 0.9
    sgd_dampening: float = 0.1
    sgd_weight_decay: float = 1e-4

    def __post_init__(self) -> None:
        require(self, "seed", ge=0)
        require(self, "linear_steps", ge=1)
        require(self, "finetune_steps", ge=1)
        require(self, "linear_lr", gt=0.0, le=10.0)
        require(self, "finetune_lr", gt=0.0, le=10.0)
        require(self, "batch_scenes", ge=1)
        require(self, "epochs", ge=1)
        require(self, "sgd_lr", gt=0.0)
        require(self, "sgd_lr_head", gt=0.0)
        require(self, "sgd_momentum", ge=0.0, lt=1.0)
        require(self, "sgd_dampening", ge=0.0, lt=1.0)
        require(self, "sgd_weight_decay", ge=0.0)


def _distill_run() -> RunConfig:
    return RunConfig(checkpoint_every=100, log_every=10)


@dataclass
class DistillConfig:
    """Everything ST-SLidR pretraining and its probe need (``run`` defaults: a checkpoint every 100 steps, a log
    line every 10)."""

    run: RunConfig = field(default_factory=_distill_run)
    data: DistillDataConfig = field(default_factory=DistillDataConfig)
    augmentation: AugmentationConfig = field(default_factory=AugmentationConfig)
    voxel: VoxelConfig = field(default_factory=VoxelConfig)
    image: ImageConfig = field(default_factory=ImageConfig)
    superpixels: SuperpixelConfig = field(default_factory=SuperpixelConfig)
    loss: DistillLossConfig = field(default_factory=DistillLossConfig)
    optim: DistillOptimConfig = field(default_factory=DistillOptimConfig)
    probe: ProbeConfig = field(default_factory=ProbeConfig)

    def __post_init__(self) -> None:
        if self.run.compile:
            raise FieldRangeError("run.compile", True, "false for ST-SLidR: its sparse 3D networks change shape with "
                                  "every sweep, so a compiled graph would be rebuilt at every step")
