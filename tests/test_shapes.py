"""Shapes world: determinism, captions true to the stored scenes, pixels true to the scenes, splits, hardness."""

from __future__ import annotations

import json
import re
from collections import Counter
from itertools import combinations
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from xmcl.data import shapes
from xmcl.data.shapes import generate_shapes_world, split_sizes
from xmcl.errors import ConfigError

# The test's own vocabulary: word -> canonical value.
COLOUR_WORDS = {c: c for c in ("red", "green", "blue", "yellow", "purple", "orange", "white", "black")}
SHAPE_SINGULAR = {"circle": "circle", "disc": "circle", "square": "square", "triangle": "triangle", "star": "star",
                  "diamond": "diamond", "rhombus": "diamond", "hexagon": "hexagon", "cross": "cross"}
SHAPE_PLURAL = {"circles": "circle", "discs": "circle", "squares": "square", "triangles": "triangle",
                "stars": "star", "diamonds": "diamond", "rhombuses": "diamond", "hexagons": "hexagon",
                "crosses": "cross"}
SIZE_WORDS = {"small": "small", "little": "small", "tiny": "small", "large": "large", "big": "large"}
COUNTS = {"two": 2, "three": 3, "four": 4}
RELATION = {"left of": "left", "right of": "right", "above": "above", "over": "above", "below": "below",
            "under": "below", "beneath": "below"}

_C = "|".join(COLOUR_WORDS)
_S1 = "|".join(SHAPE_SINGULAR)
_SP = "|".join(SHAPE_PLURAL)
_Z = "|".join(SIZE_WORDS)
SINGLE = re.compile(rf"\b(?:a|an|single) (?:({_Z}) )?({_C}) ({_S1})\b")
PLURAL = re.compile(rf"\b(two|three|four) (?:({_Z}) )?({_C}) ({_SP})\b")
REL = re.compile(rf"\b(?:a|an) (?:(?:{_Z}) )?({_C}) ({_S1}) (?:is )?(?:to the |on the )?"
                 rf"(left of|right of|above|over|below|under|beneath) (?:a|an) (?:(?:{_Z}) )?({_C}) ({_S1})\b")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("shapes") / "world"
    world = generate_shapes_world(out, 200, seed=11, image_size=64, progress=False)
    return out, json.loads(world.json_path.read_text())


def _kinds(obj_list) -> Counter:
    return Counter((o["colour"], o["shape"]) for o in obj_list)


def test_split_sizes_follow_fractions_and_minimum():
    assert split_sizes(2000, 0.1, 0.1, 250) == {"train": 1500, "val": 250, "test": 250}
    assert split_sizes(10000, 0.1, 0.1, 250) == {"train": 8000, "val": 1000, "test": 1000}
    assert split_sizes(100, 0.1, 0.0, 250) == {"train": 80, "val": 20, "test": 0}
    with pytest.raises(ConfigError, match="test_fraction"):
        split_sizes(100, 0.1, 1.0, 250)
    with pytest.raises(ConfigError, match="no training"):
        split_sizes(4, 0.5, 0.4, 250)


def test_json_layout_splits_and_files(corpus):
    out, data = corpus
    images = data["images"]
    assert data["dataset"] == "shapes" and len(images) == 200
    assert [e["imgid"] for e in images] == list(range(200))
    assert Counter(e["split"] for e in images) == {"train": 120, "val": 40, "test": 40}
    assert sorted(p.name for p in (out / "images").iterdir()) == sorted(e["filename"] for e in images)
    with Image.open(out / "images" / images[0]["filename"]) as im:
        assert im.size == (64, 64) and im.mode == "RGB"
    for e in images:
        assert len(e["sentences"]) == 5
        for s in e["sentences"]:
            assert s["tokens"] == re.findall(r"[a-z]+", s["raw"].lower())
    # a family of near-duplicates never straddles two splits
    family_splits = {}
    for e in images:
        family_splits.setdefault(e["family"], set()).add(e["split"])
    assert all(len(s) == 1 for s in family_splits.values())


def test_captions_name_only_what_the_scene_holds(corpus):
    _, data = corpus
    checked = Counter()
    for e in data["images"]:
        objects = e["scene"]["objects"]
        kinds = _kinds(objects)
        mentioned = set()
        for s in e["sentences"]:
            text = s["raw"].lower()
            words = set(s["tokens"])
            assert {COLOUR_WORDS[w] for w in words & COLOUR_WORDS.keys()} <= {o["colour"] for o in objects}, text
            shape_words = words & (SHAPE_SINGULAR.keys() | SHAPE_PLURAL.keys())
            named = {SHAPE_SINGULAR.get(w) or SHAPE_PLURAL[w] for w in shape_words}
            assert named <= {o["shape"] for o in objects}, text
            for size, colour, shape in SINGLE.findall(text):
                kind = (colour, SHAPE_SINGULAR[shape])
                assert any((o["colour"], o["shape"]) == kind and (not size or o["size"] == SIZE_WORDS[size])
                           for o in objects), text
                mentioned.add(kind)
            for count, size, colour, shape in PLURAL.findall(text):
                kind = (colour, SHAPE_PLURAL[shape])
                assert kinds[kind] == COUNTS[count], text
                if size:
                    assert all(o["size"] == SIZE_WORDS[size] for o in objects if (o["colour"], o["shape"]) == kind)
                mentioned.add(kind)
                checked["count"] += 1
            for ca, sa, rel, cb, sb in REL.findall(text):
                a = [o for o in objects if (o["colour"], o["shape"]) == (ca, SHAPE_SINGULAR[sa])]
                b = [o for o in objects if (o["colour"], o["shape"]) == (cb, SHAPE_SINGULAR[sb])]
                assert len(a) == 1 and len(b) == 1, text  # relations only between objects unique of their kind
                dx, dy = b[0]["x"] - a[0]["x"], b[0]["y"] - a[0]["y"]
                truth = (("left" if dx > 0 else "right") if abs(dx) >= abs(dy) else ("above" if dy > 0 else "below"))
                assert RELATION[rel] == truth, (text, a, b)
                checked["relation"] += 1
            if text.startswith("from left to right:") or text.startswith("from top to bottom:"):
                axis = "x" if "left to right" in text else "y"
                listed = [(c, SHAPE_SINGULAR[sh]) for _, c, sh in SINGLE.findall(text)]
                assert listed == [(o["colour"], o["shape"]) for o in sorted(objects, key=lambda o: o[axis])], text
                checked["order"] += 1
            if "background" in text:
                assert e["scene"]["background"]["name"] in text
                checked["background"] += 1
        assert mentioned == set(kinds), e["filename"]  # every kind of object is named somewhere
    assert min(checked[k] for k in ("count", "relation", "order", "background")) >= 10, checked


def test_pixels_show_the_scene(corpus):
    out, data = corpus
    palette = {name: np.array(rgb, dtype=float) for name, rgb in shapes.COLOURS.items()}
    for e in data["images"][:60]:
        pixels = np.asarray(Image.open(out / "images" / e["filename"]).convert("RGB"), dtype=float)
        size = pixels.shape[0]
        objects = e["scene"]["objects"]
        for o in objects:
            centre = pixels[int(o["y"] * size), int(o["x"] * size)]
            nearest = min(palette, key=lambda c: np.abs(palette[c] - centre).sum())
            assert nearest == o["colour"], (e["filename"], o, centre)
        # a pixel far from every object shows the grey background at its tone (+- texture)
        ys, xs = np.mgrid[0:size, 0:size] / size
        far = np.ones((size, size), bool)
        for o in objects:
            far &= np.hypot(xs - o["x"], ys - o["y"]) > o["radius"] + 0.05
        y, x = np.argwhere(far)[0]
        grey = pixels[y, x]
        assert np.ptp(grey) <= 1 and abs(grey[0] - e["scene"]["background"]["tone"]) <= 10


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    a = generate_shapes_world(tmp_path / "a", 30, seed=5, image_size=64, progress=False)
    b = generate_shapes_world(tmp_path / "b", 30, seed=5, image_size=64, progress=False)
    c = generate_shapes_world(tmp_path / "c", 30, seed=6, image_size=64, progress=False)
    assert a.json_path.read_bytes() == b.json_path.read_bytes()
    names = sorted(p.name for p in a.image_dir.iterdir())
    assert len(names) == 30
    assert all((a.image_dir / n).read_bytes() == (b.image_dir / n).read_bytes() for n in names)
    assert a.json_path.read_bytes() != c.json_path.read_bytes()


def test_near_duplicates_defeat_bag_of_words(corpus):
    _, data = corpus
    train = [e for e in data["images"] if e["split"] == "train"]
    same_objects_moved = 0
    same_words_other_binding = 0
    for p, q in combinations(train, 2):
        po, qo = p["scene"]["objects"], q["scene"]["objects"]
        if _kinds(po) == _kinds(qo) and [(o["x"], o["y"]) for o in po] != [(o["x"], o["y"]) for o in qo]:
            same_objects_moved += 1
        p_words = Counter(t for s in p["sentences"] for t in s["tokens"])
        q_words = Counter(t for s in q["sentences"] for t in s["tokens"])
        if p_words == q_words and _kinds(po) != _kinds(qo):
            same_words_other_binding += 1
    assert same_objects_moved >= 20
    assert same_words_other_binding >= 3


def test_refuses_existing_directory_and_overwrites_on_request(tmp_path):
    out = tmp_path / "world"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="already exists"):
        generate_shapes_world(out, 10, seed=0, image_size=64, progress=False)
    world = generate_shapes_world(out, 10, seed=0, image_size=64, overwrite=True, progress=False)
    assert not (out / "notes.txt").exists() and world.json_path.exists()
    with pytest.raises(ConfigError, match="image_size"):
        generate_shapes_world(tmp_path / "big", 10, seed=0, image_size=256, progress=False)


def test_a_crash_leaves_no_corpus_behind(tmp_path, monkeypatch):
    calls = []
    real_render = shapes.render

    def failing_render(*args):
        calls.append(1)
        if len(calls) == 7:
            raise KeyboardInterrupt
        return real_render(*args)

    monkeypatch.setattr(shapes, "render", failing_render)
    with pytest.raises(KeyboardInterrupt):
        generate_shapes_world(tmp_path / "world", 20, seed=0, image_size=64, progress=False)
    assert list(tmp_path.iterdir()) == []
