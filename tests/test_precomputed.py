"""Precomputed region features: every caption layout, memory mapping, errors, and the resumable writer."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from xmcl.data.open import open_split
from xmcl.data.precomputed import PrecomputedWriter, read_precomputed
from xmcl.errors import CheckpointError, ConfigError, DataError


def _features(rows: int, regions: int = 3, dim: int = 5, dtype=np.float32, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((rows, regions, dim)).astype(dtype)


def _split(tmp_path: Path, ims: np.ndarray, caps: list[str], ids: list[str] | None = None,
           cap_image: list | None = None, split: str = "test") -> Path:
    np.save(tmp_path / f"{split}_ims.npy", ims)
    (tmp_path / f"{split}_caps.txt").write_text("".join(c + "\n" for c in caps))
    if ids is not None:
        (tmp_path / f"{split}_ids.txt").write_text("".join(f"{i}\n" for i in ids))
    if cap_image is not None:
        (tmp_path / f"{split}_cap_image.txt").write_text("".join(f"{i}\n" for i in cap_image))
    return tmp_path


def test_classic_layout_k_consecutive_captions_memory_mapped(tmp_path):
    ims = _features(4, regions=7, dim=6, dtype=np.float16)
    caps = [f"caption {m}" for m in range(20)]
    split = read_precomputed(_split(tmp_path, ims, caps, ids=["10", "11", "12", "13"]), "test")
    assert isinstance(split.region_features, np.memmap)
    assert split.region_features.dtype == np.float16 and np.array_equal(split.region_features, ims)
    assert split.image_ids == ["10", "11", "12", "13"] and split.captions == caps
    assert split.caption_image.tolist() == [m // 5 for m in range(20)]


def test_without_ids_file_rows_are_the_ids(tmp_path):
    split = read_precomputed(_split(tmp_path, _features(3), ["a", "b", "c", "d", "e", "f"], split="dev"), "dev")
    assert split.image_ids == ["dev/0", "dev/1", "dev/2"] and split.caption_image.tolist() == [0, 0, 1, 1, 2, 2]


def test_cap_image_file_maps_each_caption(tmp_path):
    ims = _features(3)
    mapping = [2, 0, 0, 1, 2, 2, 1]
    split = read_precomputed(_split(tmp_path, ims, list("abcdefg"), ids=["x", "y", "z"], cap_image=mapping), "test")
    assert split.caption_image.tolist() == mapping and np.array_equal(split.region_features, ims)


def test_five_times_duplicated_rows_are_deduplicated_by_stride(tmp_path):
    distinct = _features(3)
    ims = np.repeat(distinct, 5, axis=0)  # row per caption
    ids = [i for i in ("p", "q", "r") for _ in range(5)]
    split = read_precomputed(_split(tmp_path, ims, [f"c{m}" for m in range(15)], ids=ids, split="testall"), "testall")
    assert split.image_ids == ["p", "q", "r"]
    assert isinstance(split.region_features, np.memmap) and np.array_equal(split.region_features, distinct)
    assert split.caption_image.tolist() == [m // 5 for m in range(15)]


def test_one_id_per_caption_groups_by_id(tmp_path):
    ims = _features(3)
    ids = ["u", "v", "u", "w", "v", "w", "w"]
    split = read_precomputed(_split(tmp_path, ims, list("abcdefg"), ids=ids), "test")
    assert split.image_ids == ["u", "v", "w"]
    assert [split.image_ids[n] for n in split.caption_image] == ids


@pytest.mark.parametrize("make, message", [
    (lambda d: d, "test_ims.npy: no such file"),
    (lambda d: np.save(d / "test_ims.npy", np.zeros((2, 3), np.float32)), "rank 3"),
    (lambda d: np.save(d / "test_ims.npy", np.zeros((2, 3, 4), np.int32)), "floating-point"),
    (lambda d: (d / "test_ims.npy").write_bytes(b"garbage"), "not a readable .npy"),
    (lambda d: _split(d, _features(2), ["a", "b", "c"], ids=["x", "y"]), r"test_caps.txt: 3 captions .* 2 image rows"),
    (lambda d: _split(d, _features(2), []), "no captions; the split 'test' is empty"),
    (lambda d: _split(d, _features(0), ["a"]), "no images; the split 'test' is empty"),
    (lambda d: _split(d, _features(2), ["a", "", "c", "d"]), "line 2 is an empty caption"),
    (lambda d: _split(d, _features(2), ["a", "b"], cap_image=[0, "one"]), r"test_cap_image.txt: line 2 .*'one'"),
    (lambda d: _split(d, _features(2), ["a", "b"], cap_image=[0, 2]), "line 2 names row 2, but there are 2 rows"),
    (lambda d: _split(d, _features(2), ["a", "b"], cap_image=[0]), "1 lines for 2 captions"),
    (lambda d: _split(d, _features(2), ["a", "b"], ids=["x", "y", "z", "x", "w"]), "test_ids.txt has 5 lines"),
    (lambda d: _split(d, _features(2), ["a", "b", "c", "d"], ids=["x", "x"]), "image ids repeat"),
])
def test_errors_name_the_file(tmp_path, make, message):
    make(tmp_path)
    with pytest.raises(DataError, match=message):
        read_precomputed(tmp_path, "test")


def test_writer_round_trip_with_meta_and_newlines(tmp_path):
    ims = _features(5, regions=4, dim=3)
    caps = ["first\nline", "second", "third", "fourth", "fifth", "sixth"]
    mapping = np.array([0, 1, 2, 3, 4, 4])
    with PrecomputedWriter(tmp_path, "train", [f"img{i}" for i in range(5)], caps, mapping, regions=4, dim=3,
                           meta={"backbone": "lite0", "size": 224}) as writer:
        writer.write(0, ims[:2])
        writer.write(2, ims[2:])
    split = read_precomputed(tmp_path, "train")
    assert split.region_features.dtype == np.float16
    assert np.array_equal(split.region_features, ims.astype(np.float16))
    assert split.captions[0] == "first line" and split.caption_image.tolist() == mapping.tolist()
    progress = json.loads((tmp_path / "train_ims.progress.json").read_text())
    assert progress["complete"] and progress["done"] == 5 and progress["shape"] == [5, 4, 3]
    assert progress["meta"] == {"backbone": "lite0", "size": 224}


def test_writer_resumes_after_a_crash_and_reader_refuses_the_partial_split(tmp_path):
    ims = _features(6, regions=2, dim=4, seed=3)
    ids, caps, mapping = [f"i{n}" for n in range(6)], [f"c{n}" for n in range(6)], np.arange(6)
    first = PrecomputedWriter(tmp_path, "dev", ids, caps, mapping, regions=2, dim=4, dtype=np.float32)
    first.write(0, ims[:2])
    first.write(2, ims[2:4])
    del first  # crash: never closed
    with pytest.raises(DataError, match="incomplete .*resume the extraction"):
        read_precomputed(tmp_path, "dev")
    second = PrecomputedWriter(tmp_path, "dev", ids, caps, mapping, regions=2, dim=4, dtype=np.float32)
    assert second.done == 4
    with pytest.raises(ValueError, match="next row to write is 4"):
        second.write(2, ims[2:4])
    second.write(4, ims[4:])
    second.close()
    assert np.array_equal(read_precomputed(tmp_path, "dev").region_features, ims)


@pytest.mark.parametrize("change, key", [
    ({"dim": 5}, "shape"),
    ({"meta": {"backbone": "other"}}, "meta"),
    ({"dtype": np.float32}, "dtype"),
    ({"image_ids": ["a", "b", "z"]}, "ids_sha256"),
])
def test_writer_refuses_to_resume_something_else(tmp_path, change, key):
    args = dict(image_ids=["a", "b", "c"], captions=["x", "y", "z"], caption_image=np.arange(3), regions=2, dim=4,
                meta={"backbone": "lite0"})
    PrecomputedWriter(tmp_path, "train", **args).write(0, _features(1, 2, 4))
    with pytest.raises(CheckpointError, match=key):
        PrecomputedWriter(tmp_path, "train", **{**args, **change})


def test_writer_rejects_values_that_overflow_the_dtype(tmp_path):
    writer = PrecomputedWriter(tmp_path, "train", ["a"], ["x"], np.zeros(1), regions=1, dim=2)
    with pytest.raises(DataError, match="non-finite"):
        writer.write(0, np.array([[[1.0, 1e6]]]))
    assert writer.done == 0


def test_writer_refuses_an_array_it_did_not_start(tmp_path):
    np.save(tmp_path / "train_ims.npy", _features(1, 1, 2))
    with pytest.raises(CheckpointError, match="without train_ims.progress.json"):
        PrecomputedWriter(tmp_path, "train", ["a"], ["x"], np.zeros(1), regions=1, dim=2)


def test_open_split_detects_precomputed_features(tmp_path):
    ims = _features(2)
    _split(tmp_path, ims, ["a", "b"], split="dev")
    split = open_split(tmp_path, "dev")
    assert np.array_equal(split.region_features, ims) and split.captions == ["a", "b"]
    with pytest.raises(ConfigError, match="image_dir"):
        open_split(tmp_path, "dev", image_dir=tmp_path)
    (tmp_path / "dataset_coco.json").write_text('{"images": []}')
    with pytest.raises(DataError, match="holds both dataset_coco.json and dev_ims.npy"):
        open_split(tmp_path, "dev")
