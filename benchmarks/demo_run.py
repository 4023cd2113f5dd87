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
import resource
import time

from figures import parse_with_out, write_figures

from xmcl.demo import DEMO_RUNS, run_demo, run_folder
from xmcl.retrieval.inference import evaluate_checkpoint


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The options (``argv``, default the command line), ``out`` resolved."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    return parse_with_out(parser, "demo_run", argv=argv)


def main() -> None:
    args = parse_args()
    demo = args.out / "demo"
    fresh = not demo.exists()
    began = time.perf_counter()
    table = run_demo(demo)
    wall = time.perf_counter() - began
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
    print(table)
    print(f"demo: {wall / 60:.1f} min wall ({'fresh folder' if fresh else 'resumed'}), peak RSS {peak_mib:.0f} MiB")
    results = {}
    for name in DEMO_RUNS:
        metrics = evaluate_checkpoint(run_folder(demo, name) / "best.pt", demo / "features", "test", ("all",))["all"]
        results[name] = metrics.as_dict()
    write_figures(args.out, "demo_run", args, {"wall_s": wall, "fresh": fresh, "peak_rss_mib": peak_mib,
                                               "split": "test", "runs": results})


if __name__ == "__main__":
    main()
