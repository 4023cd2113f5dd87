"""Open one split of any supported corpus, detecting its format from the path.

- a ``dataset_*.json`` file, or a directory holding exactly one: Karpathy layout (``xmcl.data.karpathy``);
- a directory holding ``{split}_ims.npy``: precomputed region features (``xmcl.data.precomputed``).
"""

from __future__ import annotations

from pathlib import Path

from xmcl.data.corpus import CaptionSplit
from xmcl.data.karpathy import read_karpathy
from xmcl.data.precomputed import read_precomputed
from xmcl.errors import ConfigError, DataError


def karpathy_json_in(directory: Path) -> Path | None:
    """The one ``dataset_*.json`` in ``directory``, ``None`` if there is none; ``DataError`` if several."""
    found = sorted(directory.glob("dataset_*.json"))
    if len(found) > 1:
        raise DataError(f"{directory}: several caption files ({', '.join(p.name for p in found)}); "
                        f"give the path of the one to use")
    return found[0] if found else None


def open_split(path: Path | str, split: str, *, image_dir: Path | str | None = None,
               include_restval: bool = False, key: str | None = None) -> CaptionSplit:
    """The split ``split`` of the corpus at ``path``.

    ``image_dir`` and ``include_restval`` apply to Karpathy corpora (see ``read_karpathy``); images default to
    ``images/`` beside the JSON file, else its folder. ``key``: the config key ``path`` comes from (e.g.
    "data.path"), named when the path does not exist.
    """
    path = Path(path)
    if key is not None and not path.exists():
        where = "" if path.is_absolute() else f" (a relative path is read from the current folder, {Path.cwd()})"
        raise ConfigError(f"{key} = '{path}' does not exist{where}")
    if path.is_file():
        if path.suffix != ".json":
            raise DataError(f"{path}: not a caption file; expected a dataset_*.json file or a corpus directory")
        return read_karpathy(path, image_dir, split, include_restval=include_restval)
    if not path.is_dir():
        raise DataError(f"{path}: no such file or directory")
    json_path = karpathy_json_in(path)
    features = path / f"{split}_ims.npy"
    if json_path is not None and features.exists():
        raise DataError(f"{path}: holds both {json_path.name} and {features.name}; give the JSON file's path for "
                        f"the images, or keep precomputed features in a directory of their own")
    if json_path is not None:
        return read_karpathy(json_path, image_dir, split, include_restval=include_restval)
    if features.exists():
        if image_dir is not None or include_restval:
            raise ConfigError(f"{path}: image_dir and include_restval apply to Karpathy corpora, not to the "
                              f"precomputed features found here")
        return read_precomputed(path, split)
    others = sorted(p.name[: -len("_ims.npy")] for p in path.glob("*_ims.npy"))
    hint = f" (precomputed splits present: {', '.join(others)})" if others else ""
    raise DataError(f"{path}: no corpus found; looked for dataset_*.json (Karpathy) and {features.name} "
                    f"(precomputed features){hint}")
