"""Image loading and the tensor transform: exact pixels, normalisation formulas, crops, flips, bad files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from xmcl.data.images import EFFICIENTNET_LITE, ImageTransform, load_image
from xmcl.errors import ConfigError, DataError


def _pixels(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def _chw(pixels: np.ndarray) -> np.ndarray:
    return pixels.astype(np.float64).transpose(2, 0, 1)


def test_load_image_exact_pixels_rgb_and_resize(tmp_path):
    pixels = _pixels(6, 9)
    Image.fromarray(pixels).save(tmp_path / "a.png")
    assert np.array_equal(load_image(tmp_path / "a.png"), pixels)
    assert load_image(tmp_path / "a.png", 4).shape == (4, 4, 3)
    assert load_image(tmp_path / "a.png", (5, 7)).shape == (5, 7, 3)
    Image.fromarray(pixels[:, :, 0]).save(tmp_path / "grey.png")
    grey = load_image(tmp_path / "grey.png")
    assert grey.dtype == np.uint8 and np.array_equal(grey, np.repeat(pixels[:, :, :1], 3, axis=2))


@pytest.mark.parametrize("write, message", [
    (lambda p: None, "no such image file"),
    (lambda p: p.write_bytes(b"this is not an image"), "cannot decode"),
    (lambda p: p.write_bytes((Path(p).parent / "good.png").read_bytes()[:60]), "cannot decode"),
])
def test_unreadable_images_raise_data_error_naming_the_file(tmp_path, write, message):
    Image.fromarray(_pixels(32, 32)).save(tmp_path / "good.png")
    path = tmp_path / "bad.png"
    write(path)
    with pytest.raises(DataError, match=message) as info:
        load_image(path)
    assert str(path) in str(info.value)
    with pytest.raises(DataError, match=message):
        ImageTransform(8)(path)


def test_eval_transform_normalises_by_the_formula(tmp_path):
    pixels = _pixels(8, 8)
    lite = ImageTransform(8, EFFICIENTNET_LITE)(pixels)
    assert lite.dtype == torch.float32 and lite.shape == (3, 8, 8)
    assert np.allclose(lite.numpy(), (_chw(pixels) - 127.0) / 128.0, atol=1e-6)
    mean = np.array([0.485, 0.456, 0.406]).reshape(3, 1, 1)
    std = np.array([0.229, 0.224, 0.225]).reshape(3, 1, 1)
    Image.fromarray(pixels).save(tmp_path / "x.png")
    imagenet = ImageTransform(8, "imagenet")(tmp_path / "x.png")
    assert np.allclose(imagenet.numpy(), (_chw(pixels) / 255.0 - mean) / std, atol=1e-5)


def test_eval_transform_takes_the_centred_square(tmp_path):
    pixels = _pixels(8, 12)
    out = ImageTransform(8, EFFICIENTNET_LITE)(Image.fromarray(pixels))
    assert np.allclose(out.numpy(), (_chw(pixels[:, 2:10]) - 127) / 128, atol=1e-6)


def test_train_crop_is_a_window_of_the_image_and_varies():
    pixels = _pixels(16, 16, seed=4)
    transform = ImageTransform(8, EFFICIENTNET_LITE, train=True, scale=(0.25, 0.25), ratio=(1.0, 1.0))
    offsets = set()
    for seed in range(12):
        out = transform(pixels, torch.Generator().manual_seed(seed)).numpy() * 128 + 127
        windows = [(t, l) for t in range(9) for l in range(9)
                   if np.allclose(out, _chw(pixels[t:t + 8, l:l + 8]), atol=1e-3)]
        assert len(windows) == 1
        offsets.add(windows[0])
    assert len(offsets) >= 6
    again = transform(pixels, torch.Generator().manual_seed(3))
    assert torch.equal(again, transform(pixels, torch.Generator().manual_seed(3)))


def test_train_flip_mirrors_about_half_the_time_only_when_asked():
    pixels = _pixels(8, 8, seed=2)
    whole = dict(train=True, scale=(1.0, 1.0), ratio=(1.0, 1.0))
    plain, mirrored = (_chw(pixels) - 127) / 128, (_chw(pixels[:, ::-1]) - 127) / 128
    flips = 0
    for seed in range(40):
        out = ImageTransform(8, EFFICIENTNET_LITE, hflip=True, **whole)(pixels, torch.Generator().manual_seed(seed))
        is_plain, is_mirrored = np.allclose(out, plain, atol=1e-6), np.allclose(out, mirrored, atol=1e-6)
        assert is_plain != is_mirrored
        flips += is_mirrored
    assert 8 <= flips <= 32
    for seed in range(10):
        out = ImageTransform(8, EFFICIENTNET_LITE, **whole)(pixels, torch.Generator().manual_seed(seed))
        assert np.allclose(out, plain, atol=1e-6)


def test_bad_settings_raise_config_error():
    with pytest.raises(ConfigError, match="normalization"):
        ImageTransform(8, "unknown")
    with pytest.raises(ConfigError, match="scale"):
        ImageTransform(8, train=True, scale=(0.0, 1.0))
    with pytest.raises(ConfigError, match="size"):
        ImageTransform((0, 8))
