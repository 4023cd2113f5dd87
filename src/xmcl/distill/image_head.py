"""The 2D side of the distillation: a frozen image backbone and a trainable 1x1 projection head.

For images (B, H, W, 3) uint8 the backbone gives a map ``m`` (B, C, h, w) (never trained, BatchNorm in eval), from
the normalised image resized by ``input_scale`` (bilinear; > 1 gives a finer map from a stride-32 backbone);
``pixel_features(m, (H, W)) = normalise_per_pixel(upsample_bilinear(conv1x1(m), (H, W)))`` (B, out_dim, H, W), and
``semantic_features(m, (H, W)) = upsample_bilinear(m, (H, W))`` (B, C, H, W) feeds the semantic similarity z of the
tolerant loss. Splitting the backbone pass from the head lets a caller compute ``m`` once per image and reuse it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from xmcl.errors import ConfigError, DataError
from xmcl.nn.backbones import ImageBackbone, set_trainable


def _upsample(x: Tensor, size: tuple[int, int]) -> Tensor:
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


class ImageFeatureHead(nn.Module):
    """Frozen ``backbone`` + trainable ``Conv2d(backbone.out_channels, out_dim, 1)``."""

    def __init__(self, backbone: ImageBackbone, out_dim: int = 64, input_scale: float = 1.0) -> None:
        super().__init__()
        if input_scale <= 0:
            raise ConfigError(f"image input_scale must be positive, got {input_scale}")
        self.backbone = backbone
        self.input_scale = float(input_scale)
        set_trainable(backbone, "frozen")
        self.head = nn.Conv2d(backbone.out_channels, out_dim, kernel_size=1)

    def train(self, mode: bool = True) -> "ImageFeatureHead":
        super().train(mode)
        self.backbone.eval()  # frozen: its BatchNorm statistics never move
        return self

    @torch.no_grad()
    def backbone_map(self, images: Tensor) -> Tensor:
        """(B, H, W, 3) uint8 or 0..255 float images -> (B, C, h, w) frozen backbone features."""
        if images.ndim != 4 or images.shape[-1] != 3:
            raise DataError(f"images must be (B, H, W, 3), got {tuple(images.shape)}")
        self.backbone.eval()
        x = self.backbone.preprocess(images)
        if self.input_scale != 1.0:
            x = F.interpolate(x, scale_factor=self.input_scale, mode="bilinear", align_corners=False)
        return self.backbone(x)

    def pixel_features(self, backbone_map: Tensor, size: tuple[int, int]) -> Tensor:
        """(B, out_dim, H, W): the head's output upsampled to ``size``, unit L2 norm per pixel."""
        return F.normalize(_upsample(self.head(backbone_map), size), dim=1)

    @staticmethod
    @torch.no_grad()
    def semantic_features(backbone_map: Tensor, size: tuple[int, int]) -> Tensor:
        """(B, C, H, W): the frozen backbone map upsampled to ``size`` (no gradient)."""
        return _upsample(backbone_map, size)
