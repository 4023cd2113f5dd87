"""Shapes world: a seeded image-caption corpus of coloured shapes, written in the Karpathy layout.

``generate_shapes_world(out_dir, num_images, seed)`` writes ``out_dir/dataset_shapes.json`` and
``out_dir/images/*.png``, so ``xmcl.data.karpathy.read_karpathy`` reads it like COCO or Flickr. Each image shows
1-4 objects (7 shapes, 8 colours, small/large, anywhere) on a light or dark grey, softly textured background and
has five captions from varied templates (lists, counts such as "two red circles", relations "left of / right of /
above / below", left-to-right order, positions such as "in the top left corner", the background).

Retrieval is made hard on purpose: scenes come in *families* of near-duplicates of one base scene (the same
objects re-arranged or mirrored, the colours of two objects swapped, one object recoloured or resized), and every
member of a family draws its captions from the same template choices. A re-arranged member has the very same
objects; a swapped member has the same bag of colour and shape words but bound differently, so only a model that
knows which colour goes with which shape, and where, can tell family members apart. Families never straddle splits.

Each image's ground truth is stored in the JSON as ``images[].scene`` (background, and per object its shape,
colour, size class, centre ``x, y`` and radius as fractions of the image side, rotation in degrees, and RGB),
with ``images[].family`` and ``images[].variant`` ("base", "rearrange", "mirror", "swap", "recolour", "resize").
The same seed gives byte-identical JSON and images; the corpus is built in a temporary sibling directory and
renamed into place only when complete.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from xmcl.errors import ConfigError
from xmcl.runtime.files import atomic_directory

JSON_NAME = "dataset_shapes.json"
GENERATOR_VERSION = 1

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 40, 40),
    "green": (40, 165, 60),
    "blue": (45, 85, 225),
    "yellow": (240, 215, 35),
    "purple": (145, 55, 185),
    "orange": (245, 135, 25),
    "white": (245, 245, 245),
    "black": (25, 25, 25),
}
SHAPES = ("circle", "square", "triangle", "star", "diamond", "hexagon", "cross")
# (singular, plural) words for each shape; the first pair is the canonical name.
SHAPE_WORDS: dict[str, tuple[tuple[str, str], ...]] = {
    "circle": (("circle", "circles"), ("disc", "discs")),
    "square": (("square", "squares"),),
    "triangle": (("triangle", "triangles"),),
    "star": (("star", "stars"),),
    "diamond": (("diamond", "diamonds"), ("rhombus", "rhombuses")),
    "hexagon": (("hexagon", "hexagons"),),
    "cross": (("cross", "crosses"),),
}
SIZE_WORDS = {"small": ("small", "little", "tiny"), "large": ("large", "big")}
BACKGROUNDS = {"light grey": (160, 186), "dark grey": (84, 110)}  # tone range (inclusive, exclusive)
RELATION_WORDS = {
    "left of": ("to the left of", "left of", "on the left of"),
    "right of": ("to the right of", "right of", "on the right of"),
    "above": ("above", "over"),
    "below": ("below", "under", "beneath"),
}
NUMBER_WORDS = {1: "one", 2: "two", 3: "three", 4: "four"}

_RADIUS = {"small": (0.075, 0.095), "large": (0.13, 0.16)}  # circumradius, fraction of the image side
_EDGE_GAP = 0.03  # free space between an object and the border
_OBJECT_GAP = 0.05  # free space between two objects
_CLEAR_RELATION = 2.0  # a relation is "clear" when its axis offset is at least this times the other one
_SUPERSAMPLE = 2

Pair = tuple[dict, dict] | None  # the two objects a relation caption describes, if any


@dataclass(frozen=True)
class ShapesWorld:
    """Where a generated corpus lies and how many images each split holds."""

    json_path: Path
    image_dir: Path
    split_sizes: dict[str, int]


def relation(a: dict, b: dict) -> str:
    """Relation of object ``a`` to object ``b`` along the axis of their larger offset (image y grows downwards)."""
    dx, dy = b["x"] - a["x"], b["y"] - a["y"]
    if abs(dx) >= abs(dy):
        return "left of" if dx > 0 else "right of"
    return "above" if dy > 0 else "below"


def region(obj: dict) -> str:
    """The ninth of the image holding the object's centre, e.g. "top left corner", "centre", "right side"."""
    col = "left" if obj["x"] < 1 / 3 else "right" if obj["x"] > 2 / 3 else "centre"
    row = "top" if obj["y"] < 1 / 3 else "bottom" if obj["y"] > 2 / 3 else "middle"
    if row == "middle":
        return "centre" if col == "centre" else f"{col} side"
    return row if col == "centre" else f"{row} {col} corner"


def split_sizes(num_images: int, val_fraction: float, test_fraction: float, min_eval_images: int) -> dict[str, int]:
    """Images per split: ``round(N * fraction)`` for val and test, raised to ``min(min_eval_images, N // 5)``
    when the fraction is positive; train takes the rest and must keep at least one image."""
    if num_images < 1:
        raise ConfigError(f"shapes world: num_images must be at least 1, got {num_images}")
    sizes = {}
    for name, fraction in (("val", val_fraction), ("test", test_fraction)):
        if not 0.0 <= fraction < 1.0:
            raise ConfigError(f"shapes world: {name}_fraction must be in [0, 1), got {fraction}")
        n = round(num_images * fraction)
        sizes[name] = max(n, min(min_eval_images, num_images // 5)) if fraction > 0 else 0
    train = num_images - sizes["val"] - sizes["test"]
    if train < 1:
        raise ConfigError(f"shapes world: val ({sizes['val']}) and test ({sizes['test']}) leave no training "
                          f"image out of {num_images}; lower val_fraction/test_fraction")
    return {"train": train, **sizes}


# ----------------------------------------------------------------------------------------------- scenes


def _fits(objects: list[dict]) -> bool:
    for i, a in enumerate(objects):
        for b in objects[:i]:
            if math.hypot(a["x"] - b["x"], a["y"] - b["y"]) < a["radius"] + b["radius"] + _OBJECT_GAP:
                return False
    return True


def _place(rng: np.random.Generator, objects: list[dict]) -> list[dict]:
    """Copies of ``objects`` at random non-overlapping centres (rejection sampling, whole layout retried)."""
    for _ in range(200):
        placed: list[dict] = []
        for obj in objects:
            r = obj["radius"]
            for _ in range(50):
                low, high = r + _EDGE_GAP, 1.0 - r - _EDGE_GAP
                cand = dict(obj, x=round(float(rng.uniform(low, high)), 4), y=round(float(rng.uniform(low, high)), 4))
                if _fits(placed + [cand]):
                    placed.append(cand)
                    break
            else:
                break
        if len(placed) == len(objects):
            return placed
    raise RuntimeError("shapes world: could not place the objects without overlap")  # sizes make this unreachable


def _new_object(rng: np.random.Generator, shape: str, colour: str, size: str) -> dict:
    jitter = rng.integers(-12, 13, size=3)
    rgb = [int(np.clip(c + j, 0, 255)) for c, j in zip(COLOURS[colour], jitter)]
    return {
        "shape": shape,
        "colour": colour,
        "size": size,
        "x": 0.5,
        "y": 0.5,
        "radius": round(float(rng.uniform(*_RADIUS[size])), 4),
        "rotation": 0.0 if shape == "circle" else round(float(rng.uniform(-15.0, 15.0)), 1),
        "rgb": rgb,
    }


def _base_scene(rng: np.random.Generator) -> dict:
    count = int(rng.choice([1, 2, 3, 4], p=[0.15, 0.3, 0.3, 0.25]))
    colours, shapes = list(COLOURS), list(SHAPES)
    objects = []
    for i in range(count):
        if i > 0 and rng.random() < 0.25:  # a second object of an existing kind, so counts ("two red circles") occur
            twin = objects[int(rng.integers(len(objects)))]
            shape, colour = twin["shape"], twin["colour"]
        else:
            shape, colour = shapes[int(rng.integers(len(shapes)))], colours[int(rng.integers(len(colours)))]
        objects.append(_new_object(rng, shape, colour, "small" if rng.random() < 0.5 else "large"))
    name = list(BACKGROUNDS)[int(rng.integers(len(BACKGROUNDS)))]
    background = {"name": name, "tone": int(rng.integers(*BACKGROUNDS[name]))}
    return {"background": background, "objects": _place(rng, objects)}


def _variant(rng: np.random.Generator, base: dict) -> tuple[str, dict]:
    """A near-duplicate of ``base``: re-arranged, mirrored, two colours swapped, one object recoloured or resized."""
    objects = base["objects"]
    options = ["rearrange", "mirror", "recolour", "resize"]
    swappable = [(i, j) for i in range(len(objects)) for j in range(i)
                 if objects[i]["colour"] != objects[j]["colour"] and objects[i]["shape"] != objects[j]["shape"]]
    if swappable:
        options += ["swap", "swap"]  # the binding-only difference is the one bag-of-words cannot see
    kind = options[int(rng.integers(len(options)))]
    new = [dict(o) for o in objects]
    if kind == "rearrange":
        new = _place(rng, new)
    elif kind == "mirror":
        axis = "x" if rng.random() < 0.5 else "y"
        for o in new:
            o[axis] = round(1.0 - o[axis], 4)
            o["rotation"] = -o["rotation"]
    elif kind == "swap":
        i, j = swappable[int(rng.integers(len(swappable)))]
        for key in ("colour", "rgb"):
            new[i][key], new[j][key] = objects[j][key], objects[i][key]
    elif kind == "recolour":
        k = int(rng.integers(len(new)))
        others = [c for c in COLOURS if c != objects[k]["colour"]]
        fresh = _new_object(rng, new[k]["shape"], others[int(rng.integers(len(others)))], new[k]["size"])
        new[k].update(colour=fresh["colour"], rgb=fresh["rgb"])
    else:  # resize; a grown object that would touch another moves elsewhere
        k = int(rng.integers(len(new)))
        size = "large" if objects[k]["size"] == "small" else "small"
        new[k].update(size=size, radius=round(float(rng.uniform(*_RADIUS[size])), 4))
        if not _fits(new):
            others = new[:k] + new[k + 1:]
            for _ in range(100):
                moved = _place(rng, [new[k]])[0]
                if _fits(others + [moved]):
                    new[k] = moved
                    break
            else:
                return "rearrange", {"background": base["background"], "objects": _place(rng, new)}
    return kind, {"background": base["background"], "objects": new}


# --------------------------------------------------------------------------------------------- captions


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _shape_word(rng: np.random.Generator, shape: str, plural: bool) -> str:
    options = SHAPE_WORDS[shape]
    return options[int(rng.integers(len(options)))][1 if plural else 0]


def _size_word(rng: np.random.Generator, size: str) -> str:
    options = SIZE_WORDS[size]
    return options[int(rng.integers(len(options)))]


def _noun(rng: np.random.Generator, objs: list[dict], with_size: bool) -> str:
    """Objects of one kind without number or article: "small red circle", "blue stars"."""
    size = _size_word(rng, objs[0]["size"])
    shape = _shape_word(rng, objs[0]["shape"], len(objs) > 1)
    same_size = len({o["size"] for o in objs}) == 1
    return " ".join(([size] if with_size and same_size else []) + [objs[0]["colour"], shape])


def _phrase(rng: np.random.Generator, objs: list[dict], with_size: bool) -> str:
    """Noun phrase for objects of one kind: "a small red circle", "two blue stars", "an orange disc"."""
    noun = _noun(rng, objs, with_size)
    return f"{NUMBER_WORDS[len(objs)] if len(objs) > 1 else _article(noun)} {noun}"


def _join(phrases: list[str]) -> str:
    return phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]


def _groups(objects: list[dict]) -> list[list[dict]]:
    """Objects grouped by (colour, shape), in order of first appearance."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for o in objects:
        groups.setdefault((o["colour"], o["shape"]), []).append(o)
    return list(groups.values())


def _listing(rng: np.random.Generator, objects: list[dict], with_size: bool) -> str:
    return _join([_phrase(rng, g, with_size) for g in _groups(objects)])


def _relation_pair(rng: np.random.Generator, objects: list[dict]) -> tuple[dict, dict] | None:
    """Two objects each unique of its kind, preferring a clear relation; ``None`` if there are no such two."""
    kinds = [(o["colour"], o["shape"]) for o in objects]
    unique = [o for o, k in zip(objects, kinds) if kinds.count(k) == 1]
    pairs = [(a, b) for a in unique for b in unique if a is not b]
    if not pairs:
        return None

    def clarity(pair: tuple[dict, dict]) -> float:
        dx, dy = abs(pair[1]["x"] - pair[0]["x"]), abs(pair[1]["y"] - pair[0]["y"])
        return max(dx, dy) / max(min(dx, dy), 1e-6)

    clear = [p for p in pairs if clarity(p) >= _CLEAR_RELATION]
    if not clear:
        clear = [max(pairs, key=clarity)]
    return clear[int(rng.integers(len(clear)))]


def _caption_list(rng: np.random.Generator, scene: dict, pair: Pair) -> str:
    first_plural = len(_groups(scene["objects"])[0]) > 1
    prefix = ["", "there are " if first_plural else "there is ", "an image of ", "a picture of ",
              "a picture showing ", "a view of "][int(rng.integers(6))]
    return prefix + _listing(rng, scene["objects"], rng.random() < 0.5)


def _caption_count(rng: np.random.Generator, scene: dict, pair: Pair) -> str:
    objects, background = scene["objects"], scene["background"]["name"]
    if len(objects) == 1:
        return f"a single {_noun(rng, objects, True)} on a {background} background"
    noun = ["shapes", "objects", "figures"][int(rng.integers(3))]
    return f"{NUMBER_WORDS[len(objects)]} {noun} on a {background} background: {_listing(rng, objects, True)}"


def _relation_words(rng: np.random.Generator, name: str) -> str:
    options = RELATION_WORDS[name]
    return options[int(rng.integers(len(options)))]


def _caption_relation(rng: np.random.Generator, scene: dict, pair: Pair) -> str:
    a, b = pair
    with_size = rng.random() < 0.5
    text = f"{_phrase(rng, [a], with_size)} {_relation_words(rng, relation(a, b))} {_phrase(rng, [b], with_size)}"
    rest = [o for o in scene["objects"] if o is not a and o is not b]
    if rest:
        text += [", as well as ", " and also ", ", plus "][int(rng.integers(3))] + _listing(rng, rest, with_size)
    return text


def _caption_relation_is(rng: np.random.Generator, scene: dict, pair: Pair) -> str:
    a, b = pair
    lead = [f"{_phrase(rng, [a], False)} is", f"there is {_phrase(rng, [a], False)}"][int(rng.integers(2))]
    return f"{lead} {_relation_words(rng, relation(a, b))} {_phrase(rng, [b], False)}"


def _caption_relation_inverse(rng: np.random.Generator, scene: dict, pair: Pair) -> str:
    a, b = pair
    with_size = rng.random() < 0.5
    return f"{_phrase(rng, [b], with_size)} {_relation_words(rng, relation(b, a))} {_phrase(rng, [a], with_size)}"


def _caption_order(rng: np.random.Generator, scene: dict, pair: Pair) -> str:
    axis = "x" if rng.random() < 0.5 else "y"
    ordered = sorted(scene["objects"], key=lambda o: o[axis])
    words = "from left to right" if axis == "x" else "from top to bottom"
    return f"{words}: " + _join([_phrase(rng, [o], False) for o in ordered])


_REGION_PREPOSITION = {"top": "at the", "bottom": "at the", "centre": "in the"}


def _caption_position(rng: np.random.Generator, scene: dict, pair: Pair) -> str:
    objects = scene["objects"]
    obj = objects[int(rng.integers(len(objects)))]
    where = region(obj)
    place = f"{_REGION_PREPOSITION.get(where, 'on the' if where.endswith('side') else 'in the')} {where}"
    if rng.random() < 0.5:
        return f"{_phrase(rng, [obj], True)} {place} of the image"
    return f"{place} there is {_phrase(rng, [obj], True)}"


def _caption_background(rng: np.random.Generator, scene: dict, pair: Pair) -> str:
    background = scene["background"]["name"]
    if rng.random() < 0.5:
        return f"{_listing(rng, scene['objects'], False)} on a {background} background"
    return f"a {background} background with {_listing(rng, scene['objects'], False)}"


_ALWAYS = (_caption_list, _caption_count, _caption_position, _caption_background)
_WITH_PAIR = (_caption_relation, _caption_relation_is, _caption_relation_inverse)


def captions(rng: np.random.Generator, scene: dict, count: int = 5) -> list[str]:
    """``count`` captions of the scene from distinct templates where enough apply (sentence case, final full stop)."""
    pair = _relation_pair(rng, scene["objects"])
    templates = list(_ALWAYS)
    if len(scene["objects"]) > 1:
        templates.append(_caption_order)
    if pair is not None:
        templates.extend(_WITH_PAIR)
    order = rng.permutation(len(templates))
    chosen = [templates[int(order[i % len(order)])] for i in range(count)]
    out = []
    for template in chosen:
        text = template(rng, scene, pair)
        out.append(text[0].upper() + text[1:] + ".")
    return out


def tokens(caption: str) -> list[str]:
    """Karpathy-style tokens: lower-case words without punctuation."""
    return "".join(c if c.isalnum() else " " for c in caption.lower()).split()


# -------------------------------------------------------------------------------------------- rendering


def _outline(obj: dict, scale: float) -> list[tuple[float, float]]:
    """Polygon vertices (pixels) of a non-circle object inscribed in its circle of radius ``obj['radius']``."""
    cx, cy, r = obj["x"] * scale, obj["y"] * scale, obj["radius"] * scale
    shape = obj["shape"]
    if shape == "star":
        polar = [(r if k % 2 == 0 else 0.45 * r, -90 + 36 * k) for k in range(10)]
    elif shape == "triangle":
        polar = [(r, -90 + 120 * k) for k in range(3)]
    elif shape == "square":
        polar = [(r, 45 + 90 * k) for k in range(4)]
    elif shape == "hexagon":
        polar = [(r, 60 * k) for k in range(6)]
    elif shape == "diamond":
        polar = [(r, -90), (0.62 * r, 0), (r, 90), (0.62 * r, 180)]
    else:  # cross: a plus sign of arms 0.6 r wide
        half, arm = 0.3 * r, 0.95 * r
        corners = [(half, -arm), (half, -half), (arm, -half), (arm, half), (half, half), (half, arm),
                   (-half, arm), (-half, half), (-arm, half), (-arm, -half), (-half, -half), (-half, -arm)]
        polar = [(math.hypot(x, y), math.degrees(math.atan2(y, x))) for x, y in corners]
    turn = obj["rotation"]
    return [(cx + d * math.cos(math.radians(a + turn)), cy + d * math.sin(math.radians(a + turn))) for d, a in polar]


def render(scene: dict, size: int, rng: np.random.Generator) -> Image.Image:
    """The scene as a ``size`` x ``size`` RGB image; ``rng`` draws the background texture (a soft +-8 grey ripple)."""
    big = size * _SUPERSAMPLE
    ripple = rng.uniform(-8.0, 8.0, size=(5, 5)).astype(np.float32)
    texture = np.asarray(Image.fromarray(ripple).resize((big, big), Image.Resampling.BICUBIC))
    grey = np.rint(scene["background"]["tone"] + np.clip(texture, -8.0, 8.0)).astype(np.uint8)
    image = Image.fromarray(np.repeat(grey[:, :, None], 3, axis=2))
    draw = ImageDraw.Draw(image)
    for obj in scene["objects"]:
        fill = tuple(obj["rgb"])
        if obj["shape"] == "circle":
            cx, cy, r = obj["x"] * big, obj["y"] * big, 0.9 * obj["radius"] * big
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        else:
            draw.polygon(_outline(obj, big), fill=fill)
    return image.resize((size, size), Image.Resampling.LANCZOS)


# -------------------------------------------------------------------------------------------- the corpus


def _scenes(seed: int, sizes: dict[str, int]) -> Iterator[tuple[str, int, str, dict, list[int], list[int]]]:
    """Yield (split, family, variant, scene, caption-style seed, texture seed) image by image, split by split."""
    family = 0
    for split_index, (split, count) in enumerate(sizes.items()):
        made = 0
        while made < count:
            rng = np.random.default_rng([seed, split_index, family])
            members = int(rng.choice([1, 2, 3, 4], p=[0.1, 0.3, 0.3, 0.3]))
            base = _base_scene(rng)
            for member in range(min(members, count - made)):
                kind, scene = ("base", base) if member == 0 else _variant(rng, base)
                yield split, family, kind, scene, [seed, split_index, family, 1], [seed, split_index, family, 2, member]
                made += 1
            family += 1


def generate_shapes_world(out_dir: Path | str, num_images: int, seed: int, image_size: int = 96, *,
                          val_fraction: float = 0.1, test_fraction: float = 0.1, min_eval_images: int = 250,
                          image_format: str = "png", overwrite: bool = False, progress: bool = True) -> ShapesWorld:
    """Write a shapes-world corpus of ``num_images`` images to ``out_dir`` (see the module docstring).

    Split sizes follow ``split_sizes``. ``image_format`` is "png" or "jpeg". An existing non-empty ``out_dir``
    is replaced only with ``overwrite=True``; the new corpus is complete before it takes the old one's place.
    """
    out_dir = Path(out_dir)
    if not 64 <= image_size <= 128:
        raise ConfigError(f"shapes world: image_size must be between 64 and 128 pixels, got {image_size}")
    if image_format not in ("png", "jpeg"):
        raise ConfigError(f"shapes world: image_format must be 'png' or 'jpeg', got {image_format!r}")
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())) and not overwrite:
        raise ConfigError(f"shapes world: {out_dir} already exists and is not empty; choose another directory "
                          f"or pass --overwrite to replace it")
    sizes = split_sizes(num_images, val_fraction, test_fraction, min_eval_images)
    with atomic_directory(out_dir, replace=True) as tmp:
        (tmp / "images").mkdir()
        entries = []
        extension = "png" if image_format == "png" else "jpg"
        scenes = _scenes(seed, sizes)
        for imgid, (split, family, kind, scene, style_seed, texture_seed) in enumerate(
                tqdm(scenes, total=num_images, desc="shapes world", unit="img", disable=not progress)):
            filename = f"shapes_{imgid:06d}.{extension}"
            image = render(scene, image_size, np.random.default_rng(texture_seed))
            if image_format == "png":
                image.save(tmp / "images" / filename, format="PNG")
            else:
                image.save(tmp / "images" / filename, format="JPEG", quality=92)
            texts = captions(np.random.default_rng(style_seed), scene)
            sentids = list(range(5 * imgid, 5 * imgid + len(texts)))
            entries.append({
                "filename": filename,
                "imgid": imgid,
                "split": split,
                "family": family,
                "variant": kind,
                "sentids": sentids,
                "sentences": [{"raw": t, "tokens": tokens(t), "imgid": imgid, "sentid": s}
                              for t, s in zip(texts, sentids)],
                "scene": scene,
            })
        corpus = {
            "dataset": "shapes",
            "generator": {"name": "xmcl.data.shapes", "version": GENERATOR_VERSION, "seed": seed,
                          "image_size": image_size, "image_format": image_format, "split_sizes": sizes},
            "images": entries,
        }
        (tmp / JSON_NAME).write_text(json.dumps(corpus, indent=1), encoding="utf-8")
    return ShapesWorld(json_path=out_dir / JSON_NAME, image_dir=out_dir / "images", split_sizes=sizes)
