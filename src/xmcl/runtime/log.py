"""Run logs: one JSON object per line (append, flushed each record) and a PNG of the curves (written atomically)."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path
from typing import Any

from xmcl.errors import WriteError
from xmcl.runtime.files import atomic_write_bytes


class JsonlLogger:
    """Append-only JSONL log; each ``log`` call writes and flushes one line, so a crash loses nothing logged.

    A run records ``size()`` in each checkpoint and, when it resumes from one, calls ``truncate(size)``: the
    records written after that checkpoint (steps the resumed run redoes) are dropped, so no step appears twice.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def log(self, record: dict[str, Any]) -> None:
        try:
            with self.path.open("a") as handle:
                handle.write(json.dumps(record, default=float) + "\n")
        except OSError as error:
            raise WriteError(f"cannot append to the log {self.path}: {error.strerror or error}") from None

    def size(self) -> int:
        """Bytes written so far (0 when there is no log yet)."""
        return self.path.stat().st_size if self.path.exists() else 0

    def truncate(self, size: int) -> None:
        """Keep the first ``size`` bytes of the log (everything, if it is shorter)."""
        if self.path.exists() and self.path.stat().st_size > size:
            with self.path.open("r+b") as handle:
                handle.truncate(size)


def read_jsonl(path: Path) -> list[dict]:
    """All records of a JSONL log (a torn last line, from a crash mid-write, is skipped)."""
    records = []
    for line in Path(path).read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def plot_curves(jsonl_path: Path, png_path: Path, x_key: str = "step") -> Path | None:
    """One panel per numeric key of the log (excluding ``x_key``), plotted against ``x_key``; None if nothing to plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [r for r in read_jsonl(jsonl_path) if x_key in r]
    keys = sorted({k for r in records for k, v in r.items()
                   if k != x_key and isinstance(v, (int, float)) and not isinstance(v, bool)})
    if not keys:
        return None
    cols = min(3, len(keys))
    rows = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.5 * cols, 3 * rows), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        points = [(r[x_key], r[key]) for r in records if isinstance(r.get(key), (int, float))]
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="." if len(points) < 50 else None)
        ax.set_title(key)
        ax.set_xlabel(x_key)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    fig.tight_layout()
    png_path = Path(png_path)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90)
    plt.close(fig)
    atomic_write_bytes(png_path, lambda handle: handle.write(buffer.getvalue()))
    return png_path
