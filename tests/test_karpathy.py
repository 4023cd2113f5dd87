"""Karpathy-style JSON reader: real Flickr8K files, COCO's filepath/restval, caption mapping and every error."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pytest

from xmcl.data import karpathy
from xmcl.data.karpathy import read_karpathy
from xmcl.data.open import open_split
from xmcl.data.shapes import generate_shapes_world
from xmcl.errors import DataError

FLICKR8K = Path(__file__).resolve().parents[2] / "shared" / "data" / "flickr8k"
needs_flickr8k = pytest.mark.skipif(not (FLICKR8K / "dataset_flickr8k.json").exists(),
                                    reason="shared Flickr8K data not present")


def _write(tmp_path: Path, images: list, name: str = "dataset_coco.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps({"dataset": "coco", "images": images}))
    return path


def _entry(filename: str, split: str, captions: list[str], filepath: str | None = None) -> dict:
    entry = {"filename": filename, "split": split, "sentences": [{"raw": c, "tokens": c.split()} for c in captions]}
    if filepath is not None:
        entry["filepath"] = filepath
    return entry


def _touch(folder: Path, *names: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / name).write_bytes(b"")


@needs_flickr8k
def test_real_flickr8k_splits_fast_and_faithful():
    raw = json.loads((FLICKR8K / "dataset_flickr8k.json").read_text())["images"]
    start = time.perf_counter()
    train = read_karpathy(FLICKR8K / "dataset_flickr8k.json", None, "train")
    seconds = time.perf_counter() - start
    val = read_karpathy(FLICKR8K / "dataset_flickr8k.json", FLICKR8K / "images", "val")
    assert (train.num_images, train.num_captions) == (6000, 30000)
    assert (val.num_images, val.num_captions) == (1000, 5000)
    expected_val = [e for e in raw if e["split"] == "val"]
    assert val.image_ids == [e["filename"] for e in expected_val]
    assert val.captions[5 * 7 + 2] == expected_val[7]["sentences"][2]["raw"].strip()
    assert np.array_equal(val.caption_image, np.repeat(np.arange(1000), 5))
    assert train.image_paths[0] == FLICKR8K / "images" / train.image_ids[0]
    assert all(p.is_file() for p in val.image_paths[:50])
    assert seconds < 2.0, f"reading the Flickr8K train split took {seconds:.2f} s"  # ~0.2 s measured
    with pytest.raises(DataError, match=r"split 'test'.*\['train', 'val'\]"):
        read_karpathy(FLICKR8K / "dataset_flickr8k.json", None, "test")


def test_coco_filepath_restval_and_any_caption_count(tmp_path):
    images = [
        _entry("a.jpg", "train", ["one"], "train2014"),
        _entry("b.jpg", "restval", ["two", "three", "four"], "val2014"),
        _entry("c.jpg", "val", ["five"], "val2014"),
        _entry("d.jpg", "train", ["six", "seven", "eight", "nine", "ten", "eleven", "twelve"], "train2014"),
    ]
    path = _write(tmp_path, images)
    _touch(tmp_path / "images" / "train2014", "a.jpg", "d.jpg")
    _touch(tmp_path / "images" / "val2014", "b.jpg", "c.jpg")

    train = read_karpathy(path, None, "train")
    assert train.image_ids == ["train2014/a.jpg", "train2014/d.jpg"]
    assert train.image_paths == [tmp_path / "images" / "train2014" / "a.jpg", tmp_path / "images/train2014/d.jpg"]
    assert train.captions == ["one", "six", "seven", "eight", "nine", "ten", "eleven", "twelve"]
    assert train.caption_image.tolist() == [0] + [1] * 7

    both = read_karpathy(path, tmp_path / "images", "train", include_restval=True)
    assert both.image_ids == ["train2014/a.jpg", "val2014/b.jpg", "train2014/d.jpg"]
    assert np.bincount(both.caption_image).tolist() == [1, 3, 7]
    # brute force: every caption belongs to the image whose sentence list holds it
    for m, caption in enumerate(both.captions):
        owner = [e for e in images if caption in [s["raw"] for s in e["sentences"]]][0]
        assert both.image_ids[both.caption_image[m]] == f"{owner['filepath']}/{owner['filename']}"


def test_images_beside_the_json_when_there_is_no_images_folder(tmp_path):
    path = _write(tmp_path, [_entry("x.png", "test", ["a caption"])], "dataset_flickr30k.json")
    _touch(tmp_path, "x.png")
    split = read_karpathy(path, None, "test")
    assert split.image_paths == [tmp_path / "x.png"]


def test_missing_images_are_counted_with_one_listing_per_folder(tmp_path, monkeypatch):
    images = [_entry(f"{i}.jpg", "test", ["c"], "f1" if i < 4 else "f2") for i in range(7)]
    path = _write(tmp_path, images)
    _touch(tmp_path / "images" / "f1", "0.jpg", "2.jpg", "3.jpg")
    _touch(tmp_path / "images" / "f2", "4.jpg", "5.jpg", "6.jpg")
    listings = []
    real_listdir = os.listdir
    monkeypatch.setattr(karpathy.os, "listdir", lambda p: listings.append(p) or real_listdir(p))
    with pytest.raises(DataError, match=r"1 of 7 images .*first missing: .*f1/1\.jpg"):
        read_karpathy(path, None, "test")
    assert len(listings) == 2
    (tmp_path / "images" / "f1" / "1.jpg").write_bytes(b"")
    (tmp_path / "images" / "f2" / "6.jpg").unlink()
    (tmp_path / "images" / "f2" / "5.jpg").unlink()
    with pytest.raises(DataError, match=r"2 of 7 images .*first missing: .*f2/5\.jpg"):
        read_karpathy(path, None, "test")


def test_shapes_world_reads_back(tmp_path):
    world = generate_shapes_world(tmp_path / "w", 20, seed=1, image_size=64, progress=False)
    data = json.loads(world.json_path.read_text())
    val = read_karpathy(world.json_path, None, "val")
    expected = [e for e in data["images"] if e["split"] == "val"]
    assert val.image_ids == [e["filename"] for e in expected] and val.num_images == world.split_sizes["val"]
    assert val.captions == [s["raw"] for e in expected for s in e["sentences"]]


@pytest.mark.parametrize("content, message", [
    (None, "no such caption file"),
    ("{not json", "invalid JSON"),
    (json.dumps({"dataset": "x"}), "no 'images' list"),
    (json.dumps({"images": [{"filename": "a.jpg", "split": "test"}]}), "image 'a.jpg' has no 'sentences'"),
    (json.dumps({"images": [{"filename": "a.jpg", "split": "test", "sentences": []}]}),
     "image 'a.jpg' has no 'sentences'"),
    (json.dumps({"images": [{"filename": "a.jpg", "split": "test", "sentences": [{"raw": " "}]}]}),
     "image 'a.jpg' sentence 0 has no 'raw'"),
    (json.dumps({"images": [{"filename": "a.jpg", "sentences": [{"raw": "x"}]}]}), r"images\[0\] has no 'split'"),
    (json.dumps({"images": [_entry("a.jpg", "train", ["x"]), _entry("b.jpg", "val", ["y"])]}),
     r"no images in split 'test'; splits present: \['train', 'val'\]"),
    (json.dumps({"images": [_entry("a.jpg", "test", ["x"]), _entry("a.jpg", "test", ["y"])]}),
     "image 'a.jpg' is listed twice"),
])
def test_errors_name_the_file_and_the_fault(tmp_path, content, message):
    path = tmp_path / "dataset_bad.json"
    if content is not None:
        path.write_text(content)
    _touch(tmp_path, "a.jpg")
    with pytest.raises(DataError, match=message) as info:
        read_karpathy(path, None, "test")
    assert str(path) in str(info.value)


def test_open_split_detects_karpathy_by_file_or_directory(tmp_path):
    path = _write(tmp_path, [_entry("x.png", "val", ["one", "two"])], "dataset_shapes.json")
    _touch(tmp_path / "images", "x.png")
    by_file, by_dir = open_split(path, "val"), open_split(tmp_path, "val")
    assert by_file.image_paths == by_dir.image_paths == [tmp_path / "images" / "x.png"]
    assert by_dir.captions == ["one", "two"]
    _touch(tmp_path / "elsewhere", "x.png")
    assert open_split(tmp_path, "val", image_dir=tmp_path / "elsewhere").image_paths == [tmp_path / "elsewhere/x.png"]


def test_open_split_explains_what_it_looked_for(tmp_path):
    with pytest.raises(DataError, match="no such file or directory"):
        open_split(tmp_path / "absent", "val")
    with pytest.raises(DataError, match=r"looked for dataset_\*\.json \(Karpathy\) and val_ims\.npy"):
        open_split(tmp_path, "val")
    np.save(tmp_path / "train_ims.npy", np.zeros((1, 1, 1), np.float32))
    with pytest.raises(DataError, match="precomputed splits present: train"):
        open_split(tmp_path, "val")
    _write(tmp_path, [], "dataset_a.json")
    _write(tmp_path, [], "dataset_b.json")
    with pytest.raises(DataError, match="several caption files"):
        open_split(tmp_path, "val")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(DataError, match="not a caption file"):
        open_split(tmp_path / "notes.txt", "val")
