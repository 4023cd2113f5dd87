"""What a collection holds: its image files (found recursively) and, optionally, their captions and user fields.

``scan_images(root)``: every ``.jpg / .jpeg / .png / .webp`` regular file under ``root`` (suffix case ignored),
with its size and modification time, by path relative to ``root`` (POSIX separators), and the image-named entries it
skipped, each with the reason: a name that is not valid UTF-8 (it could not be stored or served), something that is
not a regular file (a FIFO, socket or device, which would block or never end), a dangling link, and a symbolic link
whose target lies outside ``root`` (an index never reaches a file outside the folder it was given unless
``follow_links``).

``read_captions(path)`` reads, by the file's suffix:

- ``.json``: a Karpathy file (``images[].filename``, optional ``filepath``, ``sentences[].raw``); the image's path
  is ``filepath/filename``, its scalar fields (``split``, ``cocoid``, ...) become user fields;
- ``.jsonl``: one object per line with the image's ``path`` (or ``file`` / ``filename`` / ``image``), a
  ``caption`` string or ``captions`` list (optional), and any other fields as user fields;
- anything else: a text file of ``path<TAB>caption`` lines (a path may have several lines; blank lines skipped).
"""

from __future__ import annotations

import json
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from xmcl.data.files import read_text
from xmcl.data.karpathy import load_karpathy_json
from xmcl.errors import DataError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
PATH_KEYS = ("path", "file", "filename", "image")


@dataclass(frozen=True)
class ImageFile:
    """An image file of the collection: ``path`` relative to the root (POSIX), ``size`` in bytes, ``mtime_ns``."""

    path: str
    size: int
    mtime_ns: int


@dataclass
class Annotation:
    """The captions and user fields given for one image."""

    captions: list[str] = field(default_factory=list)
    fields: dict = field(default_factory=dict)


@dataclass
class Scan:
    """What ``scan_images`` found: the image ``files`` and the ``skipped`` entries (``{"path", "reason"}``)."""

    files: list[ImageFile]
    skipped: list[dict]


def _inside(path: Path, root: Path) -> bool:
    try:
        path.resolve().relative_to(root)
        return True
    except (ValueError, OSError):
        return False


def printable(path: str) -> str:
    """A path as text that can be printed and stored: bytes that are not UTF-8 shown as ``\\xff``."""
    return path.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _skip_reason(path: Path, relative: str, root: Path, follow_links: bool) -> str | None:
    try:
        relative.encode("utf-8")
    except UnicodeEncodeError:
        return "the file name is not valid UTF-8: rename the file"
    try:
        mode = path.stat().st_mode
    except OSError:
        return "a dangling link, or the file vanished"
    if path.is_symlink() and not follow_links and not _inside(path, root):
        return "a link to a file outside the folder (pass --follow-links to index it)"
    if not stat.S_ISREG(mode):
        return "not a regular file"
    return None


def scan_images(root: Path | str, follow_links: bool = False) -> Scan:
    """The collection's image files, sorted by relative path, and what was skipped (see the module docstring)."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: no such image folder")
    resolved = root.resolve()
    found, skipped = [], []
    for folder, dirs, names in os.walk(root, followlinks=follow_links):
        dirs[:] = sorted(d for d in dirs
                         if follow_links or not Path(folder, d).is_symlink() or _inside(Path(folder, d), resolved))
        for name in names:
            if not name.lower().endswith(IMAGE_SUFFIXES):
                continue
            path = Path(folder, name)
            relative = path.relative_to(root).as_posix()
            reason = _skip_reason(path, relative, resolved, follow_links)
            if reason is not None:
                skipped.append({"path": printable(relative), "reason": reason})
                continue
            stat_result = path.stat()
            found.append(ImageFile(relative, stat_result.st_size, stat_result.st_mtime_ns))
    return Scan(sorted(found, key=lambda f: f.path), sorted(skipped, key=lambda f: f["path"]))


def normalise_key(path: str) -> str:
    """An image path as a collection key: POSIX separators, no leading ``./``."""
    return PurePosixPath(path.replace("\\", "/")).as_posix().removeprefix("./")


def _add(annotations: dict[str, Annotation], path: str, captions: list[str], fields: dict) -> None:
    entry = annotations.setdefault(normalise_key(path), Annotation())
    entry.captions.extend(" ".join(c.split()) for c in captions if c.strip())
    entry.fields.update(fields)


def _scalars(entry: dict, skip: tuple[str, ...]) -> dict:
    return {k: v for k, v in entry.items() if k not in skip and isinstance(v, (str, int, float, bool))}


def _read_karpathy(path: Path) -> dict[str, Annotation]:
    annotations: dict[str, Annotation] = {}
    for n, entry in enumerate(load_karpathy_json(path)):
        if not isinstance(entry, dict) or not isinstance(entry.get("filename"), str):
            raise DataError(f"{path}: images[{n}] has no 'filename'")
        key = f"{entry['filepath']}/{entry['filename']}" if entry.get("filepath") else entry["filename"]
        sentences = entry.get("sentences") or []
        captions = [s["raw"] for s in sentences if isinstance(s, dict) and isinstance(s.get("raw"), str)]
        _add(annotations, key, captions, _scalars(entry, ("filename", "filepath", "sentences")))
    return annotations


def _read_jsonl(path: Path) -> dict[str, Annotation]:
    annotations: dict[str, Annotation] = {}
    for number, line in enumerate(read_text(path, "caption file").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as error:
            raise DataError(f"{path}: line {number} is not JSON ({error})") from None
        key = next((k for k in PATH_KEYS if isinstance(entry, dict) and isinstance(entry.get(k), str)), None)
        if key is None:
            raise DataError(f"{path}: line {number} has no image path (one of {', '.join(PATH_KEYS)})")
        captions = entry.get("captions", [])
        if isinstance(entry.get("caption"), str):
            captions = [entry["caption"], *captions]
        if not isinstance(captions, list) or not all(isinstance(c, str) for c in captions):
            raise DataError(f"{path}: line {number}: 'captions' must be a list of strings")
        fields = {k: v for k, v in entry.items() if k not in (key, "caption", "captions")}
        _add(annotations, entry[key], captions, fields)
    return annotations


def _read_tsv(path: Path) -> dict[str, Annotation]:
    annotations: dict[str, Annotation] = {}
    for number, line in enumerate(read_text(path, "caption file").splitlines(), start=1):
        if not line.strip():
            continue
        image, tab, caption = line.partition("\t")
        if not tab or not image.strip() or not caption.strip():
            raise DataError(f"{path}: line {number} is not 'path<TAB>caption': {line[:80]!r}")
        _add(annotations, image.strip(), [caption], {})
    return annotations


def read_captions(path: Path | str) -> dict[str, Annotation]:
    """Annotations by image key (``normalise_key``), from a Karpathy JSON, a JSONL or a ``path<TAB>caption`` file."""
    path = Path(path)
    if path.suffix.lower() == ".json":
        return _read_karpathy(path)
    if path.suffix.lower() == ".jsonl":
        return _read_jsonl(path)
    return _read_tsv(path)
