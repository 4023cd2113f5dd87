"""Linear-probe mIoU of a random 3D backbone and of SLidR, semantically tolerant and ST-SLidR pretraining.

    python benchmarks/distill_probe.py [--config configs/distill_synthetic.yaml] [--seeds 0 1 2] [--quick]
        [--methods random slidr tolerant st_slidr st_authors st_soft] [--set KEY=VALUE ...] [--threads 1]
        [--out runs/bench/distill_probe/<methods>[-h<hash of the other options>]]

One harness, the same budget for every method: for each seed s (``run.seed = probe.seed = s``; the scenes are the
same for all seeds), pretrain with the method's loss, then train a linear layer on the frozen backbone's per-point
features (``xmcl.distill.probe``, label fraction 1) and score it on the evaluation scenes. ``random`` skips the
pretraining. Prints the mIoU of each run and the mean and sample standard deviation per method, then the mean
per-class IoU; writes everything to OUT/figures.json. Each run (method, seed) pretrains into OUT/METHOD_seedS and
resumes there, so two commands with other methods never share a pretraining. ``--quick`` shrinks the budget
(fewer scenes and steps).
``st_authors`` (the authors' zeroed logits instead of removed negatives) and ``st_soft`` (weights 1 - s) compare the
tolerance rules under ST-SLidR; they run only when named.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from figures import parse_with_out, write_figures

from xmcl.config import load_config
from xmcl.distill.config import DistillConfig
from xmcl.distill.probe import run_probe
from xmcl.training.distill_trainer import pretrain_distill

METHODS = {
    "random": None,
    "slidr": ["loss.tolerance=none", "loss.balance=false"],
    "tolerant": ["loss.tolerance=quantile", "loss.balance=false"],
    "st_slidr": ["loss.tolerance=quantile", "loss.balance=true"],
    # the tolerance rules compared (not run by default): the authors' code zeroes the dropped negatives' logits
    # (each still adds exp(0) = 1 to the denominator) instead of removing them; the soft rule weights every
    # negative by 1 - s
    "st_authors": ["loss.tolerance=quantile", "loss.quantile_variant=authors", "loss.balance=true"],
    "st_soft": ["loss.tolerance=soft", "loss.balance=true"],
}
DEFAULT_METHODS = ["random", "slidr", "tolerant", "st_slidr"]
QUICK = ["data.pretrain_scenes=16", "data.probe_train_scenes=8", "data.eval_scenes=8", "optim.steps=80",
         "probe.linear_steps=200"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The options (``argv``, default the command line), ``out`` resolved."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=Path("configs/distill_synthetic.yaml"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", choices=sorted(METHODS), default=DEFAULT_METHODS)
    parser.add_argument("--quick", action="store_true", help="small budget: " + " ".join(QUICK))
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (1 avoids the slowdown of oversubscribed shared cores)")
    return parse_with_out(parser, "distill_probe", naming=["methods"], argv=argv)


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)

    base = (QUICK if args.quick else []) + args.overrides + ["run.progress=false",
                                                              f"superpixels.cache_dir={args.out / 'superpixels'}"]
    cfg0 = load_config(DistillConfig, args.config, base)
    print(f"config {args.config} + {' '.join(base)}")
    print(f"pretrain: {cfg0.data.pretrain_scenes} scenes x {cfg0.data.num_points} points, {cfg0.optim.steps} steps "
          f"of {cfg0.optim.batch_scenes} scenes; probe: {cfg0.data.probe_train_scenes} train / "
          f"{cfg0.data.eval_scenes} eval scenes, {cfg0.probe.linear_steps} linear steps; seeds {args.seeds}")
    results: dict[str, list[dict]] = {m: [] for m in args.methods}
    for seed in args.seeds:
        for method in args.methods:
            cfg = load_config(DistillConfig, args.config,
                              base + (METHODS[method] or []) + [f"run.seed={seed}", f"probe.seed={seed}"])
            run_dir = args.out / f"{method}_seed{seed}"
            began = time.perf_counter()
            checkpoint = None if METHODS[method] is None else pretrain_distill(cfg, run_dir, resume=True)
            result = run_probe(cfg, checkpoint, run_dir, mode="linear", label_fraction=1.0)
            result["seconds"] = time.perf_counter() - began
            results[method].append(result)
            print(f"  seed {seed} {method:<10} mIoU {100 * result['miou']:5.1f}  ({result['seconds']:.0f} s)",
                  flush=True)

    print(f"\n{'method':<10} {'mIoU mean':>9} {'std':>5}  per seed")
    summary = {}
    for method, runs in results.items():
        values = [100 * r["miou"] for r in runs]
        spread = statistics.stdev(values) if len(values) > 1 else float("nan")
        summary[method] = {"miou_mean": statistics.mean(values), "miou_std": spread, "miou_per_seed": values}
        print(f"{method:<10} {statistics.mean(values):9.1f} {spread:5.1f}  {' '.join(f'{v:.1f}' for v in values)}")
    names = list(next(iter(results.values()))[0]["iou"])
    print("\nmean IoU per class (%)\n" + f"{'method':<10} " + " ".join(f"{n[:8]:>8}" for n in names))
    for method, runs in results.items():
        cells, per_class = [], {}
        for name in names:
            values = [r["iou"][name] for r in runs if r["iou"][name] is not None]
            per_class[name] = 100 * statistics.mean(values) if values else None
            cells.append(f"{per_class[name]:8.1f}" if values else f"{'-':>8}")
        summary[method]["iou_per_class"] = per_class
        print(f"{method:<10} " + " ".join(cells))
    write_figures(args.out, "distill_probe", args, {
        "seeds": args.seeds, "methods": summary, "runs": results,
        "budget": {"pretrain_scenes": cfg0.data.pretrain_scenes, "num_points": cfg0.data.num_points,
                   "steps": cfg0.optim.steps, "batch_scenes": cfg0.optim.batch_scenes,
                   "probe_train_scenes": cfg0.data.probe_train_scenes, "eval_scenes": cfg0.data.eval_scenes,
                   "linear_steps": cfg0.probe.linear_steps}},
        config={"distill_config": cfg0, "method_overrides": {m: METHODS[m] for m in args.methods}})


if __name__ == "__main__":
    main()
