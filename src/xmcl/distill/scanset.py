"""``ScanSet``: the scans of one split as a lazy sequence, with their class names and the authors' label-fraction
rule. Every source (``xmcl.distill.readers.sources``) returns one."""

from __future__ import annotations

from typing import Callable

from xmcl.distill.scene import Scene
from xmcl.errors import ConfigError, DataError


class ScanSet:
    """``len(scans)`` scans, ``scans[i]`` the i-th as a ``Scene`` (``load(i)``), labels over ``class_names``.

    ``sequences[i]`` is the sequence (drive) scan i belongs to, in the data set's order; ``every_kth(k)`` keeps the
    scans the authors' loaders keep for a label fraction 1/k: every k-th scan (``scans[::k]``), or, when
    ``skip_sequences``, the scans of every k-th sequence counted from one (SLidR's nuScenes loader keeps the
    sequences whose 1-based rank is a multiple of k).
    """

    def __init__(self, name: str, size: int, load: Callable[[int], Scene], class_names: tuple[str, ...],
                 sequences: list[int] | None = None, skip_sequences: bool = False) -> None:
        self.name = name
        self._size = size
        self._load = load
        self.class_names = tuple(class_names)
        self.sequences = list(range(size)) if sequences is None else list(sequences)
        self.skip_sequences = skip_sequences
        if len(self.sequences) != size:
            raise DataError(f"{name}: {size} scans but {len(self.sequences)} sequence ids")

    def __len__(self) -> int:
        return self._size

    def __getitem__(self, index: int) -> Scene:
        if not 0 <= index < self._size:
            raise IndexError(f"{self.name}: scan {index} requested, the split has {self._size}")
        return self._load(index)

    def every_kth(self, k: int) -> list[int]:
        """Indices of the scans kept for label fraction 1/k (see the class docstring)."""
        if k < 1:
            raise ConfigError(f"label skip must be >= 1, got {k}")
        if not self.skip_sequences:
            return list(range(0, self._size, k))
        order = list(dict.fromkeys(self.sequences))  # sequences in first-seen order
        kept = {seq for rank, seq in enumerate(order, start=1) if rank % k == 0}
        return [i for i, seq in enumerate(self.sequences) if seq in kept]
