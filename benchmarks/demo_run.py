"""Wall time, peak memory and recall table of the demo (what `make demo` runs: `xmcl demo --out DIR`).

    python benchmarks/demo_run.py [--out runs/bench/demo_run/default]

Runs ``xmcl.demo.run_demo`` (1,500-image shapes world, EfficientNet-Lite0 grid features, USER and VSE++ trained
8 epochs each) into OUT/demo, timed from start to table, and records the process's peak resident set size
(``resource.getrusage``). The demo resumes whatever OUT/demo already holds, so the time is the whole demo's only
in a fresh folder; ``fresh`` in OUT/figures.json says which it was. The two best checkpoints are then evaluated on
the test split as the demo does, for the recall table.
"""

from __future__ import annotations

import argparse
import time

from figures import RECALL_HEADER, command_lines, conditions, options, parse_with_out, recall_rows, table, write_figures
from timing import peak_rss_mib

from xmcl.demo import DEMO_RUNS, run_demo, run_folder
from xmcl.retrieval.inference import evaluate_checkpoint


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The options (``argv``, default the command line), ``out`` resolved."""
    return parse_with_out(options(__doc__), "demo_run", argv=argv)


def render(d: dict) -> str:
    """The block of docs/results.md: wall time, peak RSS and the recall table of the demo's runs."""
    f = d["figures"]
    minutes, seconds = divmod(round(f["wall_s"]), 60)
    fresh = "a fresh folder" if f["fresh"] else "a folder that already held part of the demo (resumed)"
    return (f"{command_lines(d)}\n\nIn {fresh} the demo took **{minutes}:{seconds:02d} wall** with "
            f"{f['peak_rss_mib']:.0f} MiB peak RSS. It generates 1,500 images, extracts features, trains a small CLIP "
            f"teacher and caches its embeddings, then trains {' and '.join(f['runs'])} for 8 epochs each.\n\n"
            f"Shapes-world {f['split']} split:\n\n"
            f"{table(['run', *RECALL_HEADER], recall_rows(f['runs']))}")


def summary(d: dict) -> str:
    """README's line."""
    f = d["figures"]
    rsums = ", ".join(f"{name} {m['rsum']:.1f}" for name, m in f["runs"].items())
    return (f"- `{d['command']}` (what `make demo` runs): {f['wall_s'] / 60:.0f} minutes wall ({conditions(d)}); "
            f"test rSum {rsums}.")


def main() -> None:
    args = parse_args()
    demo = args.out / "demo"
    fresh = not demo.exists()
    began = time.perf_counter()
    run_demo(demo)
    wall = time.perf_counter() - began
    peak_mib = peak_rss_mib()
    results = {}
    for name in DEMO_RUNS:
        metrics = evaluate_checkpoint(run_folder(demo, name) / "best.pt", demo / "features", "test", ("all",))["all"]
        results[name] = metrics.as_dict()
    write_figures(args.out, "demo_run", args, {"wall_s": wall, "fresh": fresh, "peak_rss_mib": peak_mib,
                                               "split": "test", "runs": results}, show=render)


if __name__ == "__main__":
    main()
