"""A locked-text USER epoch's batches read ahead on the side thread (``runtime.threads.fetched_ahead``, as ``train``
does with ``data.num_workers: 0``) against read in turn, on real Flickr8K batches.

Each round trains ``--steps`` steps twice through a DataLoader over ``train_throughput.flickr8k_pairs`` (2,000
training images), once reading in turn and once ahead, in alternating order; the figure is the median of the paired
ratios of ms per batch (data and step). The tokenizer holds every caption's ids first, as from a run's second epoch.

  python benchmarks/read_ahead.py --data runs/f8k_feats
"""

from __future__ import annotations

import os

os.environ.setdefault("GOMP_SPINCOUNT", "3000")  # as the command line sets it, before torch loads OpenMP

import statistics  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from figures import options, parse_with_out, runs_root, write_figures  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402
from train_throughput import Stepper, flickr8k_pairs, locked_config  # noqa: E402

from xmcl.retrieval.model import USERModel  # noqa: E402
from xmcl.runtime.allocator import keep_freed_memory  # noqa: E402
from xmcl.runtime.threads import fetched_ahead  # noqa: E402
from xmcl.training.retrieval_trainer import epoch_batches  # noqa: E402


def main() -> None:
    parser = options(__doc__)
    parser.add_argument("--data", type=Path, default=runs_root() / "f8k_feats")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--rounds", type=int, default=12)
    args = parse_with_out(parser, "read_ahead", naming=["threads"])
    keep_freed_memory()
    torch.set_num_threads(args.threads)
    cfg = locked_config("user")
    dataset, collate = flickr8k_pairs(cfg, args.data, images=2000)
    batches = epoch_batches(len(dataset), cfg.optim.batch_size, cfg.run.seed, 0, args.steps + 1)
    for indices in batches:
        dataset.__getitems__(indices)
    torch.manual_seed(0)
    step = Stepper(USERModel(cfg.model, cfg.loss))
    step(collate(dataset.__getitems__(batches[-1])))  # warm-up
    ms: dict[str, list[float]] = {"ahead": [], "in_turn": []}
    for round_ in range(args.rounds):
        for name in (("in_turn", "ahead") if round_ % 2 == 0 else ("ahead", "in_turn")):
            loader = DataLoader(dataset, batch_sampler=batches[:args.steps], collate_fn=collate, num_workers=0)
            began = time.perf_counter()
            for batch in fetched_ahead(loader, name == "ahead"):
                step(batch)
            ms[name].append(1000 * (time.perf_counter() - began) / args.steps)
    figures = {name: {"ms_per_batch_median": statistics.median(values), "ms_per_batch": values}
               for name, values in ms.items()}
    figures["paired_ratio_median"] = statistics.median(a / b for a, b in zip(ms["ahead"], ms["in_turn"]))
    write_figures(args.out, "read_ahead", args, figures, show=lambda record: (
        f"{args.threads} thread(s), {args.rounds} rounds of {args.steps} batches: read ahead "
        f"{figures['ahead']['ms_per_batch_median']:.1f} ms a batch, in turn "
        f"{figures['in_turn']['ms_per_batch_median']:.1f} (medians); "
        f"paired ratio {figures['paired_ratio_median']:.3f}x"))


if __name__ == "__main__":
    main()
