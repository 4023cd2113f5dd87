"""Precomputed region features in the VSE-infinity / SCAN layout: reader and resumable writer.

A split ``S`` in ``data_dir`` is:

- ``S_ims.npy``: image features, rows x R x D, any float dtype (read memory-mapped);
- ``S_caps.txt``: one caption per line (M lines);
- ``S_ids.txt`` (optional): image ids, one per line;
- ``S_cap_image.txt`` (optional): for each caption, the row of its image;
- ``S_ims.progress.json`` (written by ``PrecomputedWriter``): a split still being extracted is refused.

Supported caption-to-image layouts, tried in this order:

1. ``S_cap_image.txt``: caption m describes row ``cap_image[m]``; images are the rows.
2. Rows == M and ``S_ids.txt`` has M lines repeating each id k > 1 times in a row ("5x duplicated rows"):
   the images are every k-th row (a strided view, still memory-mapped) and caption m describes image m // k.
3. M a multiple of the row count N (ids, if given, one per row): k = M / N consecutive captions per image.
4. ``S_ids.txt`` with M lines (one image id per caption) whose distinct ids, in order of first appearance,
   number the rows: caption m describes the row of its id.

Without ``S_ids.txt`` image ids are ``S/<row>``.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from xmcl.data.corpus import CaptionSplit
from xmcl.data.files import read_text
from xmcl.errors import CheckpointError, DataError
from xmcl.runtime.files import atomic_write_text


def split_files(data_dir: Path, split: str) -> dict[str, Path]:
    """The paths of a split's files (they need not exist)."""
    return {
        "ims": data_dir / f"{split}_ims.npy",
        "caps": data_dir / f"{split}_caps.txt",
        "ids": data_dir / f"{split}_ids.txt",
        "cap_image": data_dir / f"{split}_cap_image.txt",
        "progress": data_dir / f"{split}_ims.progress.json",
    }


def _read_lines(path: Path) -> list[str]:
    lines = read_text(path).split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return [line.rstrip("\r") for line in lines]


def _load_features(path: Path) -> np.ndarray:
    try:
        features = np.load(path, mmap_mode="r", allow_pickle=False)
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except (OSError, ValueError) as err:
        raise DataError(f"{path}: not a readable .npy array ({err})") from None
    if not isinstance(features, np.ndarray) or features.ndim != 3:
        raise DataError(f"{path}: expected an array of rank 3 (images x regions x dim), got shape "
                        f"{getattr(features, 'shape', None)}")
    if not np.issubdtype(features.dtype, np.floating):
        raise DataError(f"{path}: expected floating-point features, got dtype {features.dtype}")
    return features


def _check_complete(progress_path: Path) -> None:
    if not progress_path.exists():
        return
    try:
        progress = json.loads(progress_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise DataError(f"{progress_path}: unreadable progress file ({err})") from None
    if not progress.get("complete", False):
        raise DataError(f"{progress_path}: the extraction of this split is incomplete "
                        f"({progress.get('done')} of {progress.get('shape', ['?'])[0]} images); resume the extraction")


def _duplicated_rows(ids: list[str]) -> int:
    """k > 1 if ``ids`` is a run of k equal ids, then k of the next id, and so on (all distinct); else 1."""
    k = 1
    while k < len(ids) and ids[k] == ids[0]:
        k += 1
    if k == 1 or len(ids) % k:
        return 1
    runs = np.asarray(ids, dtype=object).reshape(-1, k)
    if (runs == runs[:, :1]).all() and len(set(runs[:, 0])) == len(runs):
        return k
    return 1


def read_precomputed(data_dir: Path | str, split: str) -> CaptionSplit:
    """The split's memory-mapped region features with its captions (layouts in the module docstring)."""
    data_dir = Path(data_dir)
    files = split_files(data_dir, split)
    _check_complete(files["progress"])
    features = _load_features(files["ims"])
    captions = _read_lines(files["caps"])
    if not captions:
        raise DataError(f"{files['caps']}: no captions; the split '{split}' is empty")
    for m, caption in enumerate(captions):
        if not caption.strip():
            raise DataError(f"{files['caps']}: line {m + 1} is an empty caption")
    rows, num_captions = features.shape[0], len(captions)
    if rows == 0:
        raise DataError(f"{files['ims']}: no images; the split '{split}' is empty")
    ids = _read_lines(files["ids"]) if files["ids"].exists() else None

    if files["cap_image"].exists():
        caption_image = _read_cap_image(files["cap_image"], num_captions, rows)
        ids = _row_ids(ids, rows, split, files["ids"])
    elif ids is not None and rows == num_captions == len(ids) and _duplicated_rows(ids) > 1:
        k = _duplicated_rows(ids)
        features, ids = features[::k], ids[::k]
        caption_image = np.arange(num_captions) // k
    elif num_captions % rows == 0 and (ids is None or len(ids) == rows):
        caption_image = np.arange(num_captions) // (num_captions // rows)
        ids = _row_ids(ids, rows, split, files["ids"])
    elif ids is not None and len(ids) == num_captions:
        order = {image_id: n for n, image_id in enumerate(dict.fromkeys(ids))}
        if len(order) != rows:
            raise DataError(f"{files['ids']}: {len(order)} distinct image ids for {rows} rows in {files['ims']}")
        caption_image = np.array([order[i] for i in ids], dtype=np.int64)
        ids = list(order)
    else:
        given = f"{files['ids']} has {len(ids)} lines" if ids is not None else f"there is no {files['ids'].name}"
        raise DataError(f"{files['caps']}: {num_captions} captions do not match the {rows} image rows of "
                        f"{files['ims'].name} ({given}; add {files['cap_image'].name} to map captions to rows)")
    if len(set(ids)) != len(ids):
        raise DataError(f"{files['ids']}: image ids repeat; expected one distinct id per image")
    return CaptionSplit(
        name=split,
        source=str(data_dir),
        image_ids=ids,
        captions=captions,
        caption_image=caption_image,
        region_features=features,
        extra={"format": "precomputed"},
    )


def _row_ids(ids: list[str] | None, rows: int, split: str, ids_path: Path) -> list[str]:
    if ids is None:
        return [f"{split}/{n}" for n in range(rows)]
    if len(ids) != rows:
        raise DataError(f"{ids_path}: {len(ids)} ids for {rows} image rows")
    return ids


def _read_cap_image(path: Path, num_captions: int, rows: int) -> np.ndarray:
    lines = _read_lines(path)
    if len(lines) != num_captions:
        raise DataError(f"{path}: {len(lines)} lines for {num_captions} captions")
    values = []
    for m, line in enumerate(lines):
        try:
            values.append(int(line))
        except ValueError:
            raise DataError(f"{path}: line {m + 1} is not an integer image row: {line!r}") from None
    caption_image = np.array(values, dtype=np.int64)
    out = np.flatnonzero((caption_image < 0) | (caption_image >= rows))
    if out.size:
        raise DataError(f"{path}: line {out[0] + 1} names row {caption_image[out[0]]}, but there are {rows} rows")
    return caption_image


def discard_incomplete(data_dir: Path | str, split: str, image_ids: list[str]) -> bool:
    """Remove an unfinished extraction of ``split`` in ``data_dir`` whose rows are ``image_ids`` (e.g. one that
    stopped at an unreadable image, before a rerun that leaves such images out); True when one was removed. A
    finished split, or one of other images, is left alone."""
    files = split_files(Path(data_dir), split)
    try:
        progress = json.loads(files["progress"].read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if progress.get("complete", True) or progress.get("ids_sha256") != _ids_sha256(image_ids):
        return False
    for key in ("ims", "ids", "caps", "cap_image", "progress"):
        files[key].unlink(missing_ok=True)
    return True


def _ids_sha256(image_ids: list[str]) -> str:
    return hashlib.sha256("\n".join(image_ids).encode("utf-8")).hexdigest()


class PrecomputedWriter:
    """Writes a split's region features row block by row block, resumable after a crash.

    The text files are written at once; ``{split}_ims.npy`` is created with ``open_memmap`` (or reopened to
    resume) and ``{split}_ims.progress.json`` = ``{"done", "complete", "shape", "dtype", "meta", "ids_sha256"}``
    is replaced atomically after each flushed block. Resuming with another shape, dtype, meta or list of image ids
    raises ``CheckpointError``. Captions have their newlines replaced by spaces.
    """

    def __init__(self, out_dir: Path, split: str, image_ids: list[str], captions: list[str],
                 caption_image: np.ndarray, regions: int, dim: int, dtype=np.float16, meta: dict | None = None):
        self.files = split_files(Path(out_dir), split)
        caption_image = np.asarray(caption_image, dtype=np.int64)
        if not image_ids or not captions:
            raise DataError(f"{self.files['ims']}: split '{split}' needs at least one image and one caption")
        if caption_image.shape != (len(captions),):
            raise DataError(f"{self.files['cap_image']}: {caption_image.shape} caption-to-image entries for "
                            f"{len(captions)} captions")
        if caption_image.min() < 0 or caption_image.max() >= len(image_ids):
            raise DataError(f"{self.files['cap_image']}: caption-to-image rows must lie in [0, {len(image_ids)})")
        for m, caption in enumerate(captions):
            if not caption.strip():
                raise DataError(f"{self.files['caps']}: caption {m} is empty")
        for image_id in image_ids:
            if not image_id or "\n" in image_id or "\r" in image_id:
                raise DataError(f"{self.files['ids']}: image id {image_id!r} is empty or holds a line break")
        self.shape = (len(image_ids), int(regions), int(dim))
        self.dtype = np.dtype(dtype)
        self._identity = {  # what a resumed extraction must share with the one it continues
            "shape": list(self.shape),
            "dtype": self.dtype.name,
            "meta": json.loads(json.dumps(meta or {})),
            "ids_sha256": _ids_sha256(image_ids),
        }
        self.files["ims"].parent.mkdir(parents=True, exist_ok=True)
        self._done = self._resume_point()
        atomic_write_text(self.files["ids"], "".join(f"{i}\n" for i in image_ids))
        atomic_write_text(self.files["caps"], "".join(" ".join(c.splitlines()) + "\n" for c in captions))
        atomic_write_text(self.files["cap_image"], "".join(f"{n}\n" for n in caption_image))
        if self._done == 0:
            self._save_progress(complete=False)  # before the array, so an array without progress is never ours
        self._array = np.lib.format.open_memmap(self.files["ims"], mode="r+" if self._done else "w+",
                                                dtype=self.dtype, shape=self.shape)
        if self._array.shape != self.shape or self._array.dtype != self.dtype:
            raise CheckpointError(f"{self.files['ims']}: holds {self._array.shape} {self._array.dtype.name}, but its "
                                  f"progress file says {self.shape} {self.dtype.name}; remove both to extract again")

    def _resume_point(self) -> int:
        progress_path, ims = self.files["progress"], self.files["ims"]
        if not progress_path.exists():
            if ims.exists():
                raise CheckpointError(f"{ims} exists without {progress_path.name}; it was not written by this "
                                      f"writer or its progress is lost: remove it to extract again")
            return 0
        try:
            progress = json.loads(progress_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise CheckpointError(f"{progress_path}: unreadable progress file ({err}); remove it and {ims.name}") \
                from None
        for key, value in self._identity.items():
            if progress.get(key) != value:
                raise CheckpointError(f"{progress_path}: '{key}' is {progress.get(key)!r} but this extraction has "
                                      f"{value!r}; use another directory or remove the split's files")
        if not ims.exists():
            return 0
        return int(progress.get("done", 0))

    def _save_progress(self, complete: bool) -> None:
        record = {"done": self._done, "complete": complete, **self._identity}
        atomic_write_text(self.files["progress"], json.dumps(record, indent=1))

    @property
    def done(self) -> int:
        """Number of leading image rows already written (the resume point)."""
        return self._done

    def write(self, start: int, features: np.ndarray) -> None:
        """Store rows ``[start, start + len(features))``; ``start`` must equal ``done``."""
        features = np.asarray(features)
        if start != self._done:
            raise ValueError(f"{self.files['ims']}: write at row {start}, but the next row to write is {self._done}")
        if features.ndim != 3 or features.shape[1:] != self.shape[1:] or start + len(features) > self.shape[0]:
            raise ValueError(f"{self.files['ims']}: features of shape {features.shape} do not fit rows "
                             f"[{start}, {start + len(features)}) of {self.shape}")
        with np.errstate(over="ignore", invalid="ignore"):
            block = features.astype(self.dtype)
        if not np.isfinite(block).all():
            raise DataError(f"{self.files['ims']}: rows [{start}, {start + len(features)}) hold non-finite values "
                            f"once stored as {self.dtype.name}")
        self._array[start:start + len(block)] = block
        self._array.flush()
        self._done = start + len(block)
        self._save_progress(complete=False)

    def close(self) -> None:
        """Flush; the progress file says complete once every row is written (else the split stays resumable)."""
        self._array.flush()
        self._save_progress(complete=self._done == self.shape[0])

    def __enter__(self) -> "PrecomputedWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
