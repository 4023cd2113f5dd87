"""The figures file every benchmark writes beside what it prints (imported as ``figures``: scripts run from
``benchmarks/``).

``OUT/figures.json``::

    {"format": "xmcl-figures/1", "benchmark": NAME, "argv": [...], "command": "python benchmarks/NAME.py ...",
     "config": {every option, resolved, plus what the benchmark adds}, "date": ISO-8601 UTC,
     "machine": {"commit", "dirty", "changed", "cores", "cores_usable", "torch_threads", "load_average_start",
                 "load_average", "nice", "torch", "python", "platform", "runs_root"},
     "figures": {what the benchmark measured}}

``OUT`` defaults to ``runs/bench/NAME/VARIANT``: VARIANT is built from the options that name the variant (each
benchmark chooses them), plus a short hash of every other option that differs from its default, so two
commands that differ in any option never share a folder. The ``runs`` root moves with ``XMCL_RUNS``
(``benchmarks/reproduce.py`` sets it to rerun every documented command into fresh folders); ``argv`` and
``command`` name paths under that root as ``runs/...``, so a rerun records the command as documented.
Each benchmark renders its figures file as the Markdown block it documents (a function beside its ``main``, built
from the helpers below), prints that block when it writes the file, and ``benchmarks/report.py`` splices the blocks
into ``docs/results.md`` and README.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import hashlib
import json
import os
import platform
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from xmcl.runtime.files import atomic_write_text

FORMAT = "xmcl-figures/1"
DOCUMENTS = ("docs/", "README.md")  # changes to these do not change a figure
FILE_NAME = "figures.json"
RUNS_ENV = "XMCL_RUNS"
REPO = Path(__file__).resolve().parent.parent


def runs_root() -> Path:
    """Where documented ``runs/...`` paths live: ``$XMCL_RUNS`` if set, else ``runs``."""
    return Path(os.environ.get(RUNS_ENV) or "runs")


def as_documented(argv: Sequence[str]) -> list[str]:
    """``argv`` with paths under the runs root spelt ``runs/...`` again (identity without ``XMCL_RUNS``)."""
    root = str(runs_root()).rstrip("/") + "/"
    return [f"runs/{arg[len(root):]}" if root != "runs/" and arg.startswith(root) else arg for arg in argv]


def jsonable(value: Any) -> Any:
    """``value`` with paths as strings, dataclasses as dicts, tuples and arrays as lists (for ``json.dumps``)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return jsonable(dataclasses.asdict(value))
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (np.generic, np.ndarray)):
        return jsonable(value.tolist())
    if isinstance(value, float) and value != value:
        return None  # NaN has no JSON spelling
    return value


def _slug(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return "+".join(_slug(v) for v in value)
    text = Path(value).name if isinstance(value, Path) else str(value)
    return re.sub(r"[^A-Za-z0-9._+=-]+", "_", text).strip("_") or "x"


def default_out(benchmark: str, args: argparse.Namespace, parser: argparse.ArgumentParser,
                naming: Sequence[str] = ()) -> Path:
    """``runs/bench/BENCHMARK/VARIANT``: the values of the ``naming`` options, then ``h`` + 8 hex digits of the
    other options that differ from their defaults (``out`` and ``lane`` excluded: a lane works in the folder of
    the whole command); ``default`` when there is neither."""
    parts = [_slug(getattr(args, name)) for name in naming]
    others = {name: jsonable(value) for name, value in sorted(vars(args).items())
              if name not in naming and name not in ("out", "lane") and value != parser.get_default(name)}
    if others:
        parts.append("h" + hashlib.sha256(json.dumps(others, sort_keys=True).encode()).hexdigest()[:8])
    return runs_root() / "bench" / benchmark / ("-".join(parts) or "default")


def options(doc: str) -> argparse.ArgumentParser:
    """An argument parser whose help is the benchmark's docstring ``doc``, as written."""
    return argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)


def parse_with_out(parser: argparse.ArgumentParser, benchmark: str, naming: Sequence[str] = (),
                   argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse ``argv`` (default ``sys.argv[1:]``) with an ``--out`` option added, defaulting to ``default_out``."""
    parser.add_argument("--out", type=Path, default=None,
                        help=f"folder for {FILE_NAME} (default: runs/bench/{benchmark}/<variant>)")
    args = parser.parse_args(argv)
    if args.out is None:
        args.out = default_out(benchmark, args, parser, naming)
    return args


def lane(text: str) -> tuple[int, int]:
    """``K/N`` (1 <= K <= N) as ``(K, N)``: the ``--lane`` option's type."""
    match = re.fullmatch(r"(\d+)/(\d+)", text.strip())
    if not match or not 1 <= int(match[1]) <= int(match[2]):
        raise argparse.ArgumentTypeError(f"--lane {text!r}: expected K/N with 1 <= K <= N, e.g. 1/2")
    return int(match[1]), int(match[2])


def add_lane_option(parser: argparse.ArgumentParser, unit: str) -> None:
    """``--lane K/N``: run only the K-th of N interleaved shares of the ``unit``s, so that N processes side by side
    share one command's work in its own folder; a lane writes no figures (rerun without ``--lane`` to collect)."""
    parser.add_argument("--lane", type=lane, default=None, metavar="K/N",
                        help=f"run only every N-th {unit}, from the K-th (N processes side by side, e.g. one torch "
                             f"thread each); writes no figures: rerun without --lane to collect them")


def in_lane(index: int, share: tuple[int, int] | None) -> bool:
    """Whether the ``index``-th unit of work (from 0) is in lane ``share = (K, N)``: ``index % N == K - 1``
    (every unit when ``share`` is None)."""
    return share is None or index % share[1] == share[0] - 1


def _git(*command: str) -> str | None:
    try:
        return subprocess.run(["git", *command], cwd=REPO, capture_output=True, text=True, check=True,
                              timeout=30).stdout.rstrip()  # a status line may begin with a space
    except (OSError, subprocess.SubprocessError):
        return None


def changed_paths(porcelain: str) -> list[str]:
    """The paths of ``git status --porcelain`` lines (``XY PATH``: two status letters, either may be a space)."""
    return [line[3:] for line in porcelain.splitlines() if line.strip()]


def _code_version() -> dict[str, Any]:
    """The git commit and the tracked files that differ from it, when the benchmark started (this import)."""
    status = _git("status", "--porcelain", "--untracked-files=no")
    changed = None if status is None else changed_paths(status)
    return {"commit": _git("rev-parse", "HEAD"), "dirty": None if changed is None else bool(changed),
            "changed": changed}


CODE_VERSION = _code_version()
START_LOAD = [round(x, 2) for x in os.getloadavg()]


def machine() -> dict[str, Any]:
    """The code version the benchmark started from (``CODE_VERSION``), cores, torch threads, the load average when
    the benchmark started and when it wrote its figures, the process's niceness (others' work on shared cores
    slows timings), versions."""
    return {
        **CODE_VERSION,
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average_start": START_LOAD,
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "nice": os.nice(0),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "runs_root": str(runs_root()),
    }


def figures_record(benchmark: str, args: argparse.Namespace, figures: dict[str, Any],
                   config: dict[str, Any] | None = None, argv: Sequence[str] | None = None) -> dict[str, Any]:
    """The figures file of ``benchmark`` run with ``args`` (plus ``config``, what the run resolved beyond its
    options) and command-line arguments ``argv`` (default ``sys.argv[1:]``), as written (see the module
    docstring)."""
    argv = as_documented(sys.argv[1:] if argv is None else argv)
    return {
        "format": FORMAT,
        "benchmark": benchmark,
        "argv": argv,
        "command": shlex.join(["python", f"benchmarks/{benchmark}.py", *argv]),
        "config": jsonable({**vars(args), **(config or {})}),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
        "figures": jsonable(figures),
    }


def write_figures(out: Path, benchmark: str, args: argparse.Namespace, figures: dict[str, Any],
                  config: dict[str, Any] | None = None, argv: Sequence[str] | None = None,
                  show: Callable[[dict], str] | None = None) -> Path:
    """Write ``figures_record(...)`` to ``out/figures.json`` (atomically); print ``show(record)`` (the benchmark's
    block) and where the file went; return its path."""
    record = figures_record(benchmark, args, figures, config, argv)
    path = Path(out) / FILE_NAME
    atomic_write_text(path, json.dumps(record, indent=1) + "\n")
    if show is not None:
        print(f"\n{show(record)}\n")
    print(f"wrote {path}")
    return path


# ------------------------------------------------------------------------------- figures files as Markdown
RECALLS = ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10")
RECALL_HEADER = ["i2t R@1", "R@5", "R@10", "t2i R@1", "R@5", "R@10", "rSum"]


def provenance(data: dict) -> str:
    """``commit 1234567, 2026-12-02, 2 torch threads, 2 cores, load average 3.1 → 2.9``: where and when a figures
    file was made."""
    m = data["machine"]
    code_changed = m.get("dirty") and any(not path.startswith(DOCUMENTS) for path in m.get("changed") or ["?"])
    commit = (m.get("commit") or "unknown")[:7] + (" with uncommitted code changes" if code_changed else "")
    threads = f"{m['torch_threads']} torch thread{'s' if m['torch_threads'] != 1 else ''}"
    return f"commit {commit}, {data['date'][:10]}, {threads}, {conditions(data)}"


def conditions(data: dict) -> str:
    """``2 cores, load average 7.1 → 6.5, nice 10``: what a timing shared the machine with (the 1-minute load
    average when the benchmark started and when it wrote its figures)."""
    m = data["machine"]
    load = m["load_average"][0]
    if "load_average_start" in m:
        load = f"{m['load_average_start'][0]} → {load}"
    nice = f", nice {m['nice']}" if m.get("nice") else ""
    return f"{m['cores_usable']} cores, load average {load}{nice}"


def command_lines(*datas: dict) -> str:
    """Each figures file's command in a code block, with its ``provenance``."""
    return "\n".join(f"```\n{d['command']}\n```\n({provenance(d)})" for d in datas)


def table(header: list[str], rows: list[list[str]]) -> str:
    """A Markdown table."""
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def f2(value: float) -> str:
    return f"{value:.2f}"


def signed(value: float, digits: int = 1) -> str:
    """``+1.5`` / ``−1.5`` (a real minus sign)."""
    return f"{value:+.{digits}f}".replace("-", "−")


def gib(n_bytes: float) -> str:
    return f"{n_bytes / 2**30:.2f} GiB"


def recall_rows(runs: dict[str, dict], labels: dict[str, str] | None = None) -> list[list[str]]:
    """One row per run (R@1/5/10 both ways, rSum), the best rSum in bold."""
    best = max(m["rsum"] for m in runs.values())
    rows = []
    for name, m in runs.items():
        rsum = f"**{f2(m['rsum'])}**" if m["rsum"] == best and len(runs) > 1 else f2(m["rsum"])
        rows.append([(labels or {}).get(name, name), *(f2(m[k]) for k in RECALLS), rsum])
    return rows
