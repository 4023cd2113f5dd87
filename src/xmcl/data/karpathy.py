"""Reader of Karpathy-style caption files (``dataset_coco.json``, ``dataset_flickr30k.json``,
``dataset_flickr8k.json``, ``dataset_shapes.json``).

The file holds ``images[]`` with ``filename``, ``split`` and ``sentences[].raw`` (COCO adds ``filepath``, a
sub-folder such as ``val2014``, and the split ``restval``). An image's id is ``filepath/filename`` (or
``filename``), its file ``image_dir/filepath/filename``. No image is opened; every listed file of the split
must exist (checked with one directory listing per folder).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from xmcl.data.corpus import CaptionSplit
from xmcl.data.files import read_text
from xmcl.errors import DataError


def default_image_dir(json_path: Path) -> Path:
    """``images/`` beside the JSON file when that folder exists, else the JSON file's own folder."""
    images = json_path.parent / "images"
    return images if images.is_dir() else json_path.parent


def load_karpathy_json(json_path: Path) -> list[dict]:
    """The ``images`` list of a Karpathy-style file; ``DataError`` naming the file if it is missing or malformed."""
    text = read_text(json_path, "caption file")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(f"{json_path}: invalid JSON ({err})") from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise DataError(f"{json_path}: no 'images' list; not a Karpathy-style caption file")
    return data["images"]


def _image_id(json_path: Path, index: int, entry: dict) -> str:
    filename = entry.get("filename")
    if not isinstance(filename, str) or not filename:
        raise DataError(f"{json_path}: images[{index}] has no 'filename'")
    filepath = entry.get("filepath")
    return f"{filepath}/{filename}" if filepath else filename


def _captions(json_path: Path, image_id: str, entry: dict) -> list[str]:
    sentences = entry.get("sentences")
    if not isinstance(sentences, list) or not sentences:
        raise DataError(f"{json_path}: image '{image_id}' has no 'sentences'")
    out = []
    for j, sentence in enumerate(sentences):
        raw = sentence.get("raw") if isinstance(sentence, dict) else None
        if not isinstance(raw, str) or not raw.strip():
            raise DataError(f"{json_path}: image '{image_id}' sentence {j} has no 'raw' text")
        out.append(" ".join(raw.split()))
    return out


def _check_files_exist(json_path: Path, image_dir: Path, split: str, paths: list[str]) -> None:
    """One ``os.listdir`` per folder; ``DataError`` naming the first missing file and how many are missing."""
    listings: dict[str, set[str]] = {}
    missing = []
    for path in paths:
        folder, name = os.path.split(path)
        if folder not in listings:
            try:
                listings[folder] = set(os.listdir(folder))
            except (FileNotFoundError, NotADirectoryError):
                listings[folder] = set()
        if name not in listings[folder]:
            missing.append(path)
    if missing:
        raise DataError(f"{json_path}: {len(missing)} of {len(paths)} images of split '{split}' are missing under "
                        f"{image_dir}; first missing: {missing[0]}")


def read_karpathy(json_path: Path | str, image_dir: Path | str | None, split: str, *,
                  include_restval: bool = False) -> CaptionSplit:
    """The images of ``split`` with all their captions (``raw``, whitespace runs collapsed), in file order.

    ``image_dir=None`` uses ``default_image_dir``. ``include_restval=True`` adds COCO's ``restval`` images to
    ``split="train"``. Unknown or empty splits raise ``DataError`` listing the splits present.
    """
    json_path = Path(json_path)
    image_dir = default_image_dir(json_path) if image_dir is None else Path(image_dir)
    entries = load_karpathy_json(json_path)
    wanted = {split, "restval"} if include_restval and split == "train" else {split}
    present: set[str] = set()
    image_ids: list[str] = []
    paths: list[str] = []
    captions: list[str] = []
    caption_image: list[int] = []
    for index, entry in enumerate(entries):
        entry_split = entry.get("split") if isinstance(entry, dict) else None
        if not isinstance(entry_split, str):
            raise DataError(f"{json_path}: images[{index}] has no 'split'")
        present.add(entry_split)
        if entry_split not in wanted:
            continue
        image_id = _image_id(json_path, index, entry)
        texts = _captions(json_path, image_id, entry)
        captions.extend(texts)
        caption_image.extend([len(image_ids)] * len(texts))
        image_ids.append(image_id)
        paths.append(os.path.join(image_dir, entry.get("filepath") or "", entry["filename"]))
    if not image_ids:
        raise DataError(f"{json_path}: no images in split '{split}'; splits present: {sorted(present) or 'none'}")
    if len(set(image_ids)) != len(image_ids):
        seen: set[str] = set()
        for image_id in image_ids:
            if image_id in seen:
                raise DataError(f"{json_path}: image '{image_id}' is listed twice in split '{split}'")
            seen.add(image_id)
    _check_files_exist(json_path, image_dir, split, paths)
    return CaptionSplit(
        name=split,
        source=str(json_path),
        image_ids=image_ids,
        captions=captions,
        caption_image=caption_image,
        image_paths=[Path(p) for p in paths],
        extra={"format": "karpathy", "image_dir": str(image_dir)},
    )
