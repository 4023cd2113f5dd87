"""SLIC superpixels and their disk cache."""

from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from xmcl.distill.superpixels import SuperpixelCache, superpixels
from xmcl.distill.synthetic import generate_scene
from xmcl.errors import ConfigError, DataError


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    return generate_scene(2, num_points_target=1000).cameras[0].image  # 160 x 320 street view


def test_segment_count_near_target_and_ids_consecutive(image: np.ndarray) -> None:
    for target in (150, 40):
        labels = superpixels(image, n_segments=target)
        assert labels.shape == image.shape[:2] and labels.dtype == np.int32
        count = int(labels.max()) + 1
        assert np.array_equal(np.unique(labels), np.arange(count))
        assert 0.6 * target <= count <= 1.3 * target, (target, count)
    # SLIC enforces connectivity: each id is one 4-connected region
    for k in range(count):
        _, pieces = ndimage.label(labels == k)
        assert pieces == 1


def test_compactness_trades_colour_for_regular_shapes(image: np.ndarray) -> None:
    def boundary_per_sqrt_count(labels: np.ndarray) -> float:
        """Total boundary length / sqrt(K): for K equal squares tiling a fixed area this is the smallest."""
        edges = (labels[1:, :] != labels[:-1, :]).sum() + (labels[:, 1:] != labels[:, :-1]).sum()
        return edges / np.sqrt(labels.max() + 1)

    loose = superpixels(image, n_segments=100, compactness=10.0, sigma=0.0)
    tight = superpixels(image, n_segments=100, compactness=100.0, sigma=0.0)
    assert boundary_per_sqrt_count(tight) < 0.85 * boundary_per_sqrt_count(loose)


def test_cache_hit_returns_identical_labels(tmp_path: Path, image: np.ndarray) -> None:
    cache = SuperpixelCache(tmp_path / "sp", n_segments=80)
    first = cache(image)
    assert (cache.hits, cache.misses) == (0, 1)
    np.testing.assert_array_equal(first, superpixels(image, n_segments=80))
    stored = cache.path(image)
    assert stored.is_file() and stored.parent.parent == tmp_path / "sp"
    again = SuperpixelCache(tmp_path / "sp", n_segments=80)
    second = again(image)
    assert (again.hits, again.misses) == (1, 0)
    np.testing.assert_array_equal(first, second)
    assert not list((tmp_path / "sp").rglob(".tmp-*"))  # no temp files left behind
    # the key covers the parameters and the pixels
    assert SuperpixelCache(tmp_path / "sp", n_segments=80, compactness=3.0).path(image) != stored
    changed = image.copy()
    changed[0, 0, 0] ^= 1
    assert cache.path(changed) != stored


def test_cache_replaces_a_corrupt_entry(tmp_path: Path, image: np.ndarray) -> None:
    cache = SuperpixelCache(tmp_path, n_segments=60)
    good = cache(image)
    cache.path(image).write_bytes(b"not an npy file")
    np.testing.assert_array_equal(cache(image), good)
    assert cache.misses == 2
    np.testing.assert_array_equal(np.load(cache.path(image)), good)


def test_bad_input() -> None:
    with pytest.raises(DataError, match="uint8"):
        superpixels(np.zeros((8, 8, 3), np.float32))
    with pytest.raises(DataError, match=r"\(H, W, 3\)"):
        superpixels(np.zeros((8, 8), np.uint8))
    with pytest.raises(ConfigError, match="n_segments"):
        superpixels(np.zeros((8, 8, 3), np.uint8), n_segments=0)
