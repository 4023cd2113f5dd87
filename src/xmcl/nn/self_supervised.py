"""Self-supervised ResNet-50 checkpoints, as their authors publish them, read into the torchvision layout.

The image networks ST-SLidR distils come from these files (read from local paths; nothing is downloaded):

* MoCo-v2 (``moco_v2_800ep_pretrain.pth.tar``): ``{"state_dict": {"module.encoder_q.<name>": ...}, ...}``; the
  query encoder is kept, its MLP head (``module.encoder_q.fc.*``), the key encoder and the queue are not;
* SwAV (``swav_800ep_pretrain.pth.tar``): ``{"module.<name>": ...}`` (possibly under "state_dict"); the projection
  head and prototypes (``module.projection_head.*``, ``module.prototypes.*``) are dropped;
* DINO (``dino_resnet50_pretrain.pth``): a plain state dict of the backbone, without ``fc``.

``read_self_supervised(path, fmt)`` returns the backbone's tensors under torchvision names with no classifier:
load them with ``allow_missing=("fc.",)``, since none of these files has an ImageNet classifier.
"""

from __future__ import annotations

from pathlib import Path

import torch

from xmcl.errors import CheckpointError

SELF_SUPERVISED_FORMATS = ("moco_v2", "swav", "dino")
MOCO_PREFIX = "module.encoder_q."
SWAV_PREFIX = "module."
SWAV_HEADS = ("projection_head.", "prototypes.")


def _load(path: Path) -> object:
    if not path.is_file():
        raise CheckpointError(f"backbone weights {path} do not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types for a foreign or truncated file
        raise CheckpointError(f"backbone weights {path} cannot be read: {error}") from None


def _tensors(state: object, path: Path, what: str) -> dict[str, torch.Tensor]:
    if not isinstance(state, dict) or not state:
        raise CheckpointError(f"backbone weights {path}: expected {what}, found {type(state).__name__}")
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}


def read_self_supervised(path: Path | str, fmt: str) -> dict[str, torch.Tensor]:
    """The ResNet-50 backbone tensors of a ``fmt`` ("moco_v2", "swav" or "dino") checkpoint, torchvision names,
    no ``fc``; ``CheckpointError`` naming the file when it is not of that format."""
    path = Path(path)
    content = _load(path)
    if fmt == "moco_v2":
        if not isinstance(content, dict) or not isinstance(content.get("state_dict"), dict):
            raise CheckpointError(f"backbone weights {path}: a MoCo-v2 checkpoint holds a 'state_dict' mapping")
        state = _tensors(content["state_dict"], path, "a MoCo-v2 state dict")
        out = {k[len(MOCO_PREFIX):]: v for k, v in state.items()
               if k.startswith(MOCO_PREFIX) and not k.startswith(MOCO_PREFIX + "fc.")}
        prefix = MOCO_PREFIX
    elif fmt == "swav":
        if isinstance(content, dict) and isinstance(content.get("state_dict"), dict):
            content = content["state_dict"]
        state = _tensors(content, path, "a SwAV state dict")
        out = {k[len(SWAV_PREFIX):]: v for k, v in state.items()
               if k.startswith(SWAV_PREFIX) and not k[len(SWAV_PREFIX):].startswith(SWAV_HEADS)}
        prefix = SWAV_PREFIX
    elif fmt == "dino":
        out = {k: v for k, v in _tensors(content, path, "a DINO state dict").items() if not k.startswith("fc.")}
        prefix = ""
    else:
        raise CheckpointError(f"unknown self-supervised format {fmt!r}; one of {', '.join(SELF_SUPERVISED_FORMATS)}")
    if not out:
        raise CheckpointError(f"backbone weights {path}: no tensor named '{prefix}<layer>' as a {fmt} checkpoint has")
    return out
