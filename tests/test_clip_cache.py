"""The CLIP feature cache: contents against the teacher, resume, refusal of stale or mismatched caches, and
the guides the trainer and the evaluator get from it."""

import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from xmcl.data.open import open_split
from xmcl.data.precomputed import PrecomputedWriter
from xmcl.data.shapes import generate_shapes_world
from xmcl.errors import CheckpointError, ConfigError, DataError
from xmcl.retrieval.clip.cache import ClipCache, SplitGuides, build_clip_cache, split_guides
from xmcl.retrieval.clip.config import ClipModelConfig
from xmcl.retrieval.clip.small import new_clip_model, save_clip
from xmcl.retrieval.clip.teacher import CLIPTeacher, load_clip_teacher
from xmcl.retrieval.clip.tokenizer import train_bpe
from xmcl.retrieval.config import RetrievalModelConfig

TINY = ClipModelConfig(image_size=32, patch_size=8, width=64, layers=1, heads=1, embed_dim=16, context_length=24)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes") / "world"
    generate_shapes_world(root, num_images=20, seed=0, image_size=64, progress=False)
    return root


def make_clip(directory, captions, seed):
    torch.manual_seed(seed)
    vocab, merges = train_bpe(captions, 600)
    return save_clip(new_clip_model(TINY, len(vocab)), vocab, merges, directory)


@pytest.fixture(scope="module")
def clips(shapes, tmp_path_factory):
    """Two random tiny CLIPs (different weights, same shapes)."""
    captions = open_split(shapes, "train").captions
    root = tmp_path_factory.mktemp("clips")
    return make_clip(root / "a", captions, 0), make_clip(root / "b", captions, 1)


@pytest.fixture(scope="module")
def built(shapes, clips, tmp_path_factory):
    out = tmp_path_factory.mktemp("cache") / "c"
    build_clip_cache(clips[0], shapes, out, splits=("train", "val"), batch_size=4, shard_size=5, device="cpu",
                     progress=False)
    return out


def guide_config(cache=None, clip=None, **extra):
    return RetrievalModelConfig(cge=True, text_cge=True, clip_dim=TINY.embed_dim, clip_cache=None if cache is None else
                       str(cache), clip_path=None if clip is None else str(clip), **extra)


def test_cache_holds_the_teachers_embeddings_by_image_id(shapes, clips, built):
    teacher = load_clip_teacher(clips[0])
    manifest = json.loads((built / "manifest.json").read_text())
    assert manifest["checkpoint_sha256"] == teacher.sha256 and manifest["dim"] == TINY.embed_dim
    assert manifest["splits"]["train"] == {"num_images": 12, "num_captions": 60, "image_shards": 3,
                                           "text_shards": 12, "complete": True,
                                           "corpus": str((shapes / "dataset_shapes.json").resolve())}
    assert np.load(built / "train" / "images_00002.npy").dtype == np.float16
    val = open_split(shapes, "val")
    shuffled = val.subset(np.array([3, 0, 2]))  # other order, fewer images: rows follow the ids
    found = ClipCache.open(built).lookup(shuffled)
    assert found.image_found.all() and found.text_found.all()
    expected_img = teacher.encode_images(shuffled.image_paths).numpy()
    expected_txt = teacher.encode_texts(shuffled.captions).numpy()
    assert np.allclose(found.image, expected_img, atol=2e-3) and np.allclose(found.text, expected_txt, atol=2e-3)


def test_interrupted_build_resumes_where_it_stopped(shapes, clips, built, tmp_path, monkeypatch):
    original = CLIPTeacher.encode_pixels
    calls = {"n": 0}

    def failing(self, pixels):
        calls["n"] += 1
        if calls["n"] > 2:
            raise RuntimeError("stopped")
        return original(self, pixels)

    monkeypatch.setattr(CLIPTeacher, "encode_pixels", failing)
    out = tmp_path / "c"
    with pytest.raises(RuntimeError, match="stopped"):
        build_clip_cache(clips[0], shapes, out, splits=("train",), batch_size=5, shard_size=5, device="cpu",
                         progress=False)
    entry = json.loads((out / "manifest.json").read_text())["splits"]["train"]
    assert (entry["image_shards"], entry["complete"]) == (2, False)
    with pytest.raises(CheckpointError, match="have no CLIP embedding"):  # an unfinished split is not read
        split_guides(guide_config(out), open_split(shapes, "train"))

    def counting(self, pixels):
        calls["n"] += 1
        return original(self, pixels)

    calls["n"] = 0
    monkeypatch.setattr(CLIPTeacher, "encode_pixels", counting)
    build_clip_cache(clips[0], shapes, out, splits=("train",), batch_size=5, shard_size=5, device="cpu",
                     progress=False)
    assert calls["n"] == 1  # only the third image shard was left
    for name in ("images_00000.npy", "images_00002.npy", "texts_00011.npy"):
        assert np.array_equal(np.load(out / "train" / name), np.load(built / "train" / name))


def test_stale_or_mismatched_cache_is_refused(shapes, clips, built, tmp_path):
    other = load_clip_teacher(clips[1])
    with pytest.raises(CheckpointError, match="is stale"):
        build_clip_cache(clips[1], shapes, built, splits=("val",), device="cpu", progress=False)
    with pytest.raises(CheckpointError, match="is stale"):
        ClipCache.open(built, expected_sha256=other.sha256)
    with pytest.raises(CheckpointError, match="is stale"):
        split_guides(guide_config(built, clips[1]), open_split(shapes, "val"))
    with pytest.raises(ConfigError, match="model.clip_dim is 32, but the CLIP cache .* holds 16-d"):
        split_guides(replace(guide_config(built), clip_dim=32), open_split(shapes, "val"))
    val = open_split(shapes, "val")
    val.captions[0] = "a caption from another corpus"
    with pytest.raises(CheckpointError, match="other captions .* another corpus"):
        ClipCache.open(built).lookup(val)
    with pytest.raises(CheckpointError, match="does not exist"):
        ClipCache.open(tmp_path / "nowhere")


def test_guides_for_training_and_for_new_images(shapes, clips, built, tmp_path):
    train, test = open_split(shapes, "train"), open_split(shapes, "test")
    assert split_guides(RetrievalModelConfig(), train) == SplitGuides(None, None, None)  # CGE off: nothing to read
    guides = split_guides(guide_config(built, clips[0]), train)
    found = ClipCache.open(built).lookup(train)
    assert np.array_equal(guides.image, found.image) and np.array_equal(guides.text, found.text)
    image_only = split_guides(replace(guide_config(built), text_cge=False), train)
    assert image_only.text is None and image_only.image.shape == (12, TINY.embed_dim)
    # "test" is not cached: training refuses, evaluation computes it with the teacher
    with pytest.raises(CheckpointError, match="4 images and 20 captions .*`xmcl clip-cache --clip .* --split test"):
        split_guides(guide_config(built, clips[0]), test)
    computed = split_guides(guide_config(built, clips[0]), test, compute_missing=True)
    teacher = load_clip_teacher(clips[0])
    assert np.allclose(computed.image, teacher.encode_images(test.image_paths).numpy(), atol=2e-3)
    assert np.allclose(computed.text, teacher.encode_texts(test.captions).numpy(), atol=2e-3)
    assert computed.sha256 == teacher.sha256
    with pytest.raises(CheckpointError, match="not the CLIP this model was trained with"):
        split_guides(guide_config(built, clips[1]), train, trained_sha256=teacher.sha256)
    with pytest.raises(ConfigError, match="need model.clip_cache"):
        split_guides(guide_config(), train)


def region_features_of(split, out, captions=None, image_ids=None):
    """A precomputed split as `xmcl features` writes it: the corpus' image ids and captions, random features."""
    with PrecomputedWriter(out, split.name, image_ids or split.image_ids, captions or split.captions,
                           split.caption_image, regions=4, dim=8) as writer:
        writer.write(0, np.random.default_rng(0).standard_normal((split.num_images, 4, 8)))
    return open_split(out, split.name)


def test_region_feature_split_finds_missing_images_in_the_caches_corpus(shapes, clips, built, tmp_path):
    """The cache holds train and val; the features' test split is encoded from the raw corpus' test images."""
    raw_test = open_split(shapes, "test")
    features = region_features_of(raw_test, tmp_path / "feats")
    assert features.image_paths is None and ClipCache.open(built).corpora() == [
        str((shapes / "dataset_shapes.json").resolve())]
    computed = split_guides(replace(guide_config(built, clips[0]), text_cge=False), features, compute_missing=True)
    expected = load_clip_teacher(clips[0]).encode_images(raw_test.image_paths).numpy()
    assert np.allclose(computed.image, expected, atol=2e-3)
    # features of another corpus: other captions for the same ids, or ids the corpus does not hold
    relabelled = region_features_of(raw_test, tmp_path / "other", captions=["a red square"] * raw_test.num_captions)
    with pytest.raises(CheckpointError, match="other captions than .*dataset_shapes.json"):
        split_guides(guide_config(built, clips[0]), relabelled, compute_missing=True)
    renamed = region_features_of(raw_test, tmp_path / "renamed", image_ids=[f"x{n}.png" for n in range(4)])
    with pytest.raises(DataError, match="4 of its images have no cached CLIP embedding.*lacks image 'x0.png'"):
        split_guides(guide_config(built, clips[0]), renamed, compute_missing=True)
