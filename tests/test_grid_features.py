"""Grid-feature extraction: values and region order against a direct forward pass, interruption and resume,
refusal to resume with another backbone or image size, and reading the result back."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from xmcl.data.karpathy import read_karpathy
from xmcl.data.precomputed import PrecomputedWriter, read_precomputed
from xmcl.errors import CheckpointError, DataError
from xmcl.nn.backbones import build_image_backbone
from xmcl.retrieval.grid_features import extract_grid_features

SIZE = 64  # tiny ResNet-18 (width 8) at 64 px: a 2 x 2 grid of 64 channels


class Interrupted(Exception):
    pass


@pytest.fixture()
def corpus(tmp_path: Path):
    rng = np.random.default_rng(0)
    images = tmp_path / "corpus" / "images"
    images.mkdir(parents=True)
    entries = []
    for n in range(6):
        pixels = rng.integers(0, 256, size=(30 + n, 40, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(images / f"im{n}.png")
        entries.append({"filename": f"im{n}.png", "split": "val",
                        "sentences": [{"raw": f"picture number {n}"}, {"raw": f"another caption of {n}"}]})
    entries.append({"filename": "unused.png", "split": "train", "sentences": [{"raw": "not in val"}]})
    Image.fromarray(rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)).save(images / "unused.png")
    json_path = tmp_path / "corpus" / "dataset_tiny.json"
    json_path.write_text(json.dumps({"images": entries}))
    return read_karpathy(json_path, None, "val")


def backbone(seed: int = 0):
    torch.manual_seed(seed)
    return build_image_backbone("resnet18", None, resnet_width=8)


def expected_grid(split, net) -> np.ndarray:
    """(N, 4, 64): each image resized with PIL, normalised by hand, cells listed row by row."""
    mean = np.array([0.485, 0.456, 0.406]) * 255
    std = np.array([0.229, 0.224, 0.225]) * 255
    rows = []
    for path in split.image_paths:
        pixels = np.asarray(Image.open(path).convert("RGB").resize((SIZE, SIZE), Image.Resampling.BICUBIC))
        x = torch.tensor((pixels - mean) / std, dtype=torch.float32).permute(2, 0, 1)[None]
        with torch.no_grad():
            fmap = net.eval()(x)[0]  # (64, 2, 2)
        rows.append(np.stack([fmap[:, r, c].numpy() for r in range(2) for c in range(2)]))
    return np.stack(rows)


def test_one_shot_extraction_matches_a_direct_forward_pass(corpus, tmp_path):
    net = backbone()
    path = extract_grid_features(corpus, net, tmp_path / "out", "val", image_size=SIZE, batch_size=4,
                                 progress=False)
    assert path == tmp_path / "out" / "val_ims.npy"
    stored = np.load(path)
    assert stored.dtype == np.float16 and stored.shape == (6, 4, 64)
    np.testing.assert_allclose(stored.astype(np.float32), expected_grid(corpus, net), rtol=2e-3, atol=2e-3)


def test_interrupted_extraction_resumes_to_the_one_shot_result(corpus, tmp_path, monkeypatch):
    one_shot = np.load(extract_grid_features(corpus, backbone(), tmp_path / "once", "val", image_size=SIZE,
                                             batch_size=4, progress=False))
    original_write = PrecomputedWriter.write

    def write_then_crash(self, start, features):
        if start > 0:
            raise Interrupted
        original_write(self, start, features)

    monkeypatch.setattr(PrecomputedWriter, "write", write_then_crash)
    with pytest.raises(Interrupted):
        extract_grid_features(corpus, backbone(), tmp_path / "out", "val", image_size=SIZE, batch_size=4,
                              progress=False)
    monkeypatch.setattr(PrecomputedWriter, "write", original_write)
    progress = json.loads((tmp_path / "out" / "val_ims.progress.json").read_text())
    assert progress["done"] == 4 and not progress["complete"]
    with pytest.raises(DataError, match="incomplete"):
        read_precomputed(tmp_path / "out", "val")

    with pytest.raises(CheckpointError, match="meta"):  # other weights
        extract_grid_features(corpus, backbone(seed=1), tmp_path / "out", "val", image_size=SIZE, batch_size=4,
                              progress=False)
    with pytest.raises(CheckpointError):  # other image size (another grid, another meta)
        extract_grid_features(corpus, backbone(), tmp_path / "out", "val", image_size=2 * SIZE, batch_size=4,
                              progress=False)

    net = backbone()
    batches = []
    original_forward = net.forward
    monkeypatch.setattr(net, "forward", lambda x: batches.append(x.shape[0]) or original_forward(x))
    resumed = extract_grid_features(corpus, net, tmp_path / "out", "val", image_size=SIZE, batch_size=4,
                                    progress=False)
    assert batches == [1, 2]  # the grid-shape probe, then only the two images not yet written
    np.testing.assert_array_equal(np.load(resumed), one_shot)

    read_back = read_precomputed(tmp_path / "out", "val")
    np.testing.assert_array_equal(np.asarray(read_back.region_features), one_shot)
    assert read_back.image_ids == corpus.image_ids
    assert read_back.captions == corpus.captions
    np.testing.assert_array_equal(read_back.caption_image, corpus.caption_image)


def test_a_split_without_raw_images_is_refused(corpus, tmp_path):
    features_only = read_precomputed(
        extract_grid_features(corpus, backbone(), tmp_path / "out", "val", image_size=SIZE, progress=False).parent,
        "val")
    with pytest.raises(DataError, match="need raw images"):
        extract_grid_features(features_only, backbone(), tmp_path / "again", "val", progress=False)


def test_every_unreadable_image_is_listed_in_one_pass_and_a_rerun_continues(corpus, tmp_path):
    """Images 1 and 4 of 6 are corrupt: one run lists both (in the error and in val_unreadable.txt), keeps the row
    before the first; once they are fixed, the rerun gives the one-shot result."""
    good = {n: corpus.image_paths[n].read_bytes() for n in (1, 4)}
    one_shot = np.load(extract_grid_features(corpus, backbone(), tmp_path / "once", "val", image_size=SIZE,
                                             batch_size=4, progress=False))
    corpus.image_paths[1].write_bytes(b"not an image")
    corpus.image_paths[4].write_bytes(good[4][: len(good[4]) // 2])  # a truncated PNG
    out = tmp_path / "out"
    with pytest.raises(DataError, match=r"2 of 6 images .* cannot be read, all listed in .*val_unreadable\.txt: "
                                        r".*im1\.png.*; .*im4\.png.*the 1 images before the first are kept.*"
                                        r"--skip-unreadable"):
        extract_grid_features(corpus, backbone(), out, "val", image_size=SIZE, batch_size=4, progress=False)
    listed = (out / "val_unreadable.txt").read_text().splitlines()
    assert [Path(line.split(":")[0]).name for line in listed] == ["im1.png", "im4.png"]
    assert json.loads((out / "val_ims.progress.json").read_text())["done"] == 1

    for n, data in good.items():
        corpus.image_paths[n].write_bytes(data)
    resumed = extract_grid_features(corpus, backbone(), out, "val", image_size=SIZE, batch_size=4, progress=False)
    # other batch compositions than the one-shot run's: equal up to float16 rounding of the kernels' differences
    np.testing.assert_allclose(np.load(resumed).astype(np.float32), one_shot.astype(np.float32), rtol=2e-3,
                               atol=2e-3)
    assert not (out / "val_unreadable.txt").exists()


def test_unreadable_images_are_left_out_with_the_flag(corpus, tmp_path):
    """After a run that stopped at the unreadable image, a rerun with the flag leaves it and its captions out."""
    one_shot = np.load(extract_grid_features(corpus, backbone(), tmp_path / "once", "val", image_size=SIZE,
                                             batch_size=4, progress=False))
    corpus.image_paths[2].write_bytes(b"\x89PNG garbage")
    with pytest.raises(DataError, match="1 of 6 images"):
        extract_grid_features(corpus, backbone(), tmp_path / "out", "val", image_size=SIZE, batch_size=4,
                              progress=False)
    out = extract_grid_features(corpus, backbone(), tmp_path / "out", "val", image_size=SIZE, batch_size=4,
                                progress=False, skip_unreadable=True).parent
    kept = read_precomputed(out, "val")
    assert kept.image_ids == [corpus.image_ids[n] for n in (0, 1, 3, 4, 5)]
    assert kept.captions == [c for c, n in zip(corpus.captions, corpus.caption_image) if n != 2]
    np.testing.assert_allclose(np.asarray(kept.region_features, np.float32), one_shot[[0, 1, 3, 4, 5]].astype(
        np.float32), rtol=2e-3, atol=2e-3)
    assert "im2.png" in (out / "val_unreadable.txt").read_text()
