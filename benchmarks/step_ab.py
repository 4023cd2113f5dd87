"""A locked-regime training step of this working tree against another commit's, side by side in one process.

On a shared machine the step time drifts by a quarter within an hour, more than most step changes move it, so two
trees timed in separate processes compare poorly. Here the other commit's ``src/xmcl`` is exported (``git archive``)
as the package ``xmcl_base``, its imports rewritten to it; both models are built from the same seed on the same
batches and take turns step by step (``train_throughput.step_seconds``), so a drift falls on both alike. The figure
is the median of the paired ratios (this tree's step over the base's).

  python benchmarks/step_ab.py --base 84af0d9                      # USER, 2 threads, 40 steps each
  python benchmarks/step_ab.py --base HEAD~3 --variant infonce --threads 1
  python benchmarks/step_ab.py --base HEAD --data runs/f8k_feats    # on real Flickr8K batches

The batches are random ones shaped as ``train_throughput --locked`` makes them (captions of 7-14 tokens) or, with
``--data``, the first 8 of an epoch over 1,000 Flickr8K training images (``train_throughput.flickr8k_batches``:
captions of 14 tokens on average, each batch padded to its longest, 24-38).
"""

from __future__ import annotations

import os

os.environ.setdefault("GOMP_SPINCOUNT", "3000")  # as the command line sets it, before torch loads OpenMP

import importlib  # noqa: E402
import io  # noqa: E402
import re  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tarfile  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from figures import options, parse_with_out, write_figures  # noqa: E402
from train_throughput import LOCKED, Stepper, flickr8k_batches, locked_batch, locked_config, step_seconds  # noqa: E402

from xmcl.runtime.allocator import keep_freed_memory  # noqa: E402

BASE_PACKAGE = "xmcl_base"
_IMPORT = re.compile(r"\b(from|import) xmcl\b|\bxmcl\.(?=[A-Za-z_])")


def export_package(revision: str, into: Path) -> None:
    """``src/xmcl`` of git ``revision`` written under ``into`` as the package ``xmcl_base``, every ``xmcl`` import
    in it (``from xmcl...``, ``import xmcl...``, ``xmcl.`` module paths) rewritten to ``xmcl_base``."""
    archive = subprocess.run(["git", "archive", "--format=tar", revision, "src/xmcl"], check=True,
                             capture_output=True, cwd=Path(__file__).resolve().parent.parent).stdout
    prefix = "src/xmcl/"
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        for member in tar.getmembers():
            if not member.isfile() or not member.name.startswith(prefix):
                continue
            target = into / BASE_PACKAGE / member.name[len(prefix):]
            target.parent.mkdir(parents=True, exist_ok=True)
            data = tar.extractfile(member).read()
            if target.suffix == ".py":
                data = _IMPORT.sub(_renamed, data.decode()).encode()
            target.write_bytes(data)


def _renamed(match: re.Match) -> str:
    return f"{match[1]} {BASE_PACKAGE}" if match[1] else f"{BASE_PACKAGE}."


def main() -> None:
    parser = options(__doc__)
    parser.add_argument("--base", required=True, help="the git revision to compare against")
    parser.add_argument("--variant", choices=sorted(LOCKED), default="user")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--data", type=Path, default=None, help="Flickr8K features: real batches instead of random")
    args = parse_with_out(parser, "step_ab", naming=["variant", "threads"])
    keep_freed_memory()
    torch.set_num_threads(args.threads)
    cfg = locked_config(args.variant)
    with tempfile.TemporaryDirectory() as folder:
        export_package(args.base, Path(folder))
        sys.path.insert(0, folder)
        trees = {"base": importlib.import_module(f"{BASE_PACKAGE}.retrieval.model"),
                 "this": importlib.import_module("xmcl.retrieval.model")}
        steppers = {}
        for name, module in trees.items():
            torch.manual_seed(0)
            steppers[name] = Stepper(module.USERModel(cfg.model, cfg.loss))
        batches = (flickr8k_batches(cfg, args.data, 8) if args.data
                   else [locked_batch(cfg, seed) for seed in range(4)])
        times = step_seconds(steppers, batches, args.steps, args.warmup, torch.device("cpu"))
    ratios = [this / base for base, this in zip(times["base"], times["this"])]
    figures = {name: {"ms_median": 1000 * statistics.median(spent), "ms_min": 1000 * min(spent)}
               for name, spent in times.items()}
    figures["paired_ratio_median"] = statistics.median(ratios)
    write_figures(args.out, "step_ab", args, figures, show=lambda record: (
        f"{LOCKED[args.variant][2]}, {args.threads} thread(s), {args.steps} steps each"
        f"{' on Flickr8K batches' if args.data else ''}: this tree "
        f"{figures['this']['ms_median']:.1f} ms, base {args.base} {figures['base']['ms_median']:.1f} ms (medians); "
        f"paired ratio {figures['paired_ratio_median']:.3f}x"))


if __name__ == "__main__":
    main()
