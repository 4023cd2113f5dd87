"""Run logs: one JSON object per line (append, flushed each record) and a PNG of the curves."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any


class JsonlLogger:
    """Append-only JSONL log; each ``log`` call writes and flushes one line, so a crash loses nothing logged."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def log(self, record: dict[str, Any]) -> None:
        with self.path.open("a") as handle:
            handle.write(json.dumps(record, default=float) + "\n")


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
    fig.savefig(png_path, dpi=90)
    plt.close(fig)
    return png_path
