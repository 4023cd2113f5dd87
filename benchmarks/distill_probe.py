"""Linear-probe mIoU of a random 3D backbone and of SLidR, semantically tolerant and ST-SLidR pretraining, scored by
our probe and by the authors' probe.

    python benchmarks/distill_probe.py [--config configs/distill_synthetic.yaml] [--seeds 0 1 2 3 4] [--quick]
        [--methods random slidr tolerant st_slidr st_authors st_soft] [--probes ours authors]
        [--set KEY=VALUE ...] [--threads 1] [--out runs/bench/distill_probe/<methods>[-h<hash>]] [--report-only]
        [--keep DIR] [--lane K/N]

One harness, the same budget for every method: for each seed s (``run.seed = probe.seed = s``; the scenes are the
same for all seeds), pretrain with the method's loss (``random`` skips it), then train a linear layer on the frozen
backbone's per-point features and score it on the evaluation scans, once per probe (label fraction 1):

* ``ours``: ``probe.protocol=ours`` (BatchNorm re-estimated, full-batch AdamW on cross-entropy);
* ``authors``: ``probe.protocol=authors probe.label_unit=skip`` (BatchNorm frozen in eval mode, CE + Lovasz, SGD with
  the head at ``probe.sgd_lr_head``, cosine over ``probe.epochs``, augmented batches).

Resumable: each pretraining run lives in ``OUT/<method>_seed<s>`` and resumes from its ``last.pt``; each probe
writes ``OUT/<method>_seed<s>/result_<probe>.json`` when done, and a finished result whose recorded overrides match
is not run again, so the command can be stopped and started again at will; with ``--keep DIR`` each finished result
is also copied to ``DIR/<method>_seed<s>/result_<probe>.json`` and read from there (a tracked folder: the harness
then resumes in a fresh checkout). ``--lane K/N`` runs only every N-th (seed, method) pretraining run, from the
K-th, for N processes side by side in the command's folder; the command without it then collects. Prints per run, then per probe the mIoU
mean and sample standard deviation per method with every seed, the per-seed paired difference ST-SLidR minus SLidR
(mean, std, and how many seeds it is positive on), the authors' mIoU (absent classes counted as 1), and the mean
per-class IoU; writes everything to ``OUT/results.json`` and the summary to ``OUT/figures.json`` (read by
``benchmarks/report.py``). ``--report-only`` runs nothing: it prints the tables over
the seeds whose every method has finished (a run still under way can be reported this way). ``--quick`` shrinks the
budget (fewer scenes and steps).
``st_authors`` (the authors' zeroed logits instead of removed negatives) and ``st_soft`` (weights 1 - s) compare the
tolerance rules under ST-SLidR; they run only when named.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from figures import add_lane_option, in_lane, parse_with_out, write_figures

from xmcl.config import load_config
from xmcl.distill.config import DistillConfig
from xmcl.runtime.files import atomic_write_text
from xmcl.training.distill_trainer import pretrain_distill
from xmcl.training.probe_trainer import run_probe

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
PROBES = {
    "ours": ["probe.protocol=ours"],
    "authors": ["probe.protocol=authors", "probe.label_unit=skip"],
}
QUICK = ["data.pretrain_scenes=16", "data.probe_train_scenes=8", "data.eval_scenes=8", "optim.steps=80",
         "probe.linear_steps=200", "probe.epochs=10"]


def _settings(overrides: list[str], method: str, seed: int, probe: str) -> list[str]:
    return overrides + (METHODS[method] or []) + [f"run.seed={seed}", f"probe.seed={seed}"] + PROBES[probe]


def _result_name(method: str, seed: int, probe: str) -> Path:
    return Path(f"{method}_seed{seed}") / f"result_{probe}.json"


def finished(overrides: list[str], method: str, seed: int, probe: str, out: Path,
             keep: Path | None = None) -> dict | None:
    """The stored result of one (method, seed, probe) in ``out`` (or ``keep``) if it finished with these overrides,
    else None."""
    for folder in (out, keep) if keep is not None else (out,):
        result_path = folder / _result_name(method, seed, probe)
        if result_path.is_file():
            stored = json.loads(result_path.read_text())
            if stored.get("overrides") == _settings(overrides, method, seed, probe):
                return stored
    return None


def run_one(config: Path, overrides: list[str], method: str, seed: int, probe: str, out: Path,
            keep: Path | None = None) -> dict:
    """The result of one (method, seed, probe), from its JSON when already finished with these overrides; a new
    result is written to ``out`` and, given ``keep``, copied there."""
    stored = finished(overrides, method, seed, probe, out, keep)
    if stored is not None:
        return stored
    run_dir = out / f"{method}_seed{seed}"
    result_name = _result_name(method, seed, probe)
    result_path = out / result_name
    settings = _settings(overrides, method, seed, probe)
    cfg = load_config(DistillConfig, config, settings)
    began = time.perf_counter()
    checkpoint = None if METHODS[method] is None else pretrain_distill(cfg, run_dir, resume=True)
    result = run_probe(cfg, checkpoint, run_dir, mode="linear", label_fraction=1.0)
    result.update(method=method, seed=seed, probe=probe, overrides=settings,
                  seconds=time.perf_counter() - began)
    text = json.dumps(result, indent=2)
    atomic_write_text(result_path, text)
    if keep is not None:
        (keep / result_name.parent).mkdir(parents=True, exist_ok=True)
        atomic_write_text(keep / result_name, text)
    return result


def _mean_std(values: list[float]) -> str:
    spread = statistics.stdev(values) if len(values) > 1 else float("nan")
    return f"{statistics.mean(values):5.1f} +- {spread:4.1f}"


def summarise(by_method: dict[str, list[dict]]) -> dict[str, dict]:
    """Per method: mIoU mean, sample std (None for one seed) and per-seed values, and mean IoU per class (in %)."""
    summary = {}
    for method, runs in by_method.items():
        values = [100 * r["miou"] for r in runs]
        per_class = {}
        for name in runs[0]["iou"]:
            defined = [r["iou"][name] for r in runs if r["iou"][name] is not None]
            per_class[name] = 100 * statistics.mean(defined) if defined else None
        summary[method] = {"miou_mean": statistics.mean(values),
                           "miou_std": statistics.stdev(values) if len(values) > 1 else None,
                           "miou_per_seed": values, "iou_per_class": per_class}
    return summary


def report(results: dict[str, dict[str, list[dict]]], seeds: list[int]) -> None:
    """Print the tables of one harness run (every figure in % mIoU)."""
    for probe, by_method in results.items():
        print(f"\n== {probe} probe ==\n{'method':<10} {'mIoU mean +- std':>16}  per seed {seeds}   "
              f"{'authors mIoU':>14}")
        for method, runs in by_method.items():
            values = [100 * r["miou"] for r in runs]
            authors = [100 * r["miou_authors"] for r in runs]
            print(f"{method:<10} {_mean_std(values):>16}  {' '.join(f'{v:.1f}' for v in values)}   "
                  f"{_mean_std(authors):>14}")
        if "slidr" in by_method and "st_slidr" in by_method:
            diffs = [100 * (b["miou"] - a["miou"]) for a, b in zip(by_method["slidr"], by_method["st_slidr"])]
            positive = sum(d > 0 for d in diffs)
            print(f"ST-SLidR - SLidR, paired by seed: {' '.join(f'{d:+.1f}' for d in diffs)}  "
                  f"(mean {_mean_std(diffs)}, positive on {positive} of {len(diffs)} seeds)")
        names = list(next(iter(by_method.values()))[0]["iou"])
        print(f"mean IoU per class (%)\n{'method':<10} " + " ".join(f"{n[:8]:>8}" for n in names))
        for method, runs in by_method.items():
            cells = []
            for name in names:
                values = [r["iou"][name] for r in runs if r["iou"][name] is not None]
                cells.append(f"{100 * statistics.mean(values):8.1f}" if values else f"{'-':>8}")
            print(f"{method:<10} " + " ".join(cells))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The options (``argv``, default the command line), ``out`` resolved."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=Path("configs/distill_synthetic.yaml"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--methods", nargs="+", choices=sorted(METHODS), default=DEFAULT_METHODS)
    parser.add_argument("--probes", nargs="+", choices=sorted(PROBES), default=["ours", "authors"])
    parser.add_argument("--quick", action="store_true", help="small budget: " + " ".join(QUICK))
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (1 avoids the slowdown of oversubscribed shared cores)")
    parser.add_argument("--report-only", action="store_true", help="print the tables of the finished runs only")
    parser.add_argument("--keep", type=Path, default=None,
                        help="also copy each finished probe result here (a tracked folder), and read finished "
                             "results from it: the harness then resumes in a fresh checkout")
    add_lane_option(parser, "(seed, method) pretraining run")
    return parse_with_out(parser, "distill_probe", naming=["methods"], argv=argv)


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)

    base = (QUICK if args.quick else []) + args.overrides + ["run.progress=false",
                                                              f"superpixels.cache_dir={args.out / 'superpixels'}"]
    cfg0 = load_config(DistillConfig, args.config, base)
    print(f"config {args.config} + {' '.join(base)}")
    print(f"pretrain: {cfg0.data.pretrain_scenes} scenes x {cfg0.data.num_points} points, {cfg0.optim.steps} steps "
          f"of {cfg0.optim.batch_scenes} scenes, q = {cfg0.loss.q}, {cfg0.voxel.coordinates} voxels, 2D "
          f"{cfg0.image.backbone} ({cfg0.image.weights} weights; the authors distil self-supervised ResNet-50s, "
          f"which cannot be fetched here); augment {cfg0.data.augment}; probe: {cfg0.data.probe_train_scenes} train /"
          f" {cfg0.data.eval_scenes} eval scenes, ours {cfg0.probe.linear_steps} steps, authors {cfg0.probe.epochs} "
          f"epochs of {cfg0.probe.batch_scenes}; seeds {args.seeds}", flush=True)
    if args.report_only:
        for probe in args.probes:
            complete = [s for s in args.seeds
                        if all(finished(base, m, s, probe, args.out, args.keep) for m in args.methods)]
            print(f"{probe} probe: seeds finished for every method: {complete}")
            if complete:
                report({probe: {m: [finished(base, m, s, probe, args.out, args.keep) for s in complete]
                                for m in args.methods}}, complete)
        return
    results: dict[str, dict[str, list[dict]]] = {p: {m: [] for m in args.methods} for p in args.probes}
    units = [(seed, method) for seed in args.seeds for method in args.methods]
    for index, (seed, method) in enumerate(units):
        if not in_lane(index, args.lane):
            continue
        for probe in args.probes:
            result = run_one(args.config, base, method, seed, probe, args.out, args.keep)
            results[probe][method].append(result)
            print(f"  seed {seed} {method:<10} {probe:<7} mIoU {100 * result['miou']:5.1f}  "
                  f"({result['seconds']:.0f} s when run)", flush=True)
    if args.lane:
        print(f"lane {args.lane[0]}/{args.lane[1]} done; rerun without --lane to collect the figures")
        return
    report(results, args.seeds)
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out / "results.json", json.dumps(results, indent=2))
    print(f"\nwrote {args.out / 'results.json'}")
    summaries = {probe: summarise(by_method) for probe, by_method in results.items()}
    write_figures(args.out, "distill_probe", args, {
        "seeds": args.seeds, "probes": summaries,
        "budget": {"pretrain_scenes": cfg0.data.pretrain_scenes, "num_points": cfg0.data.num_points,
                   "steps": cfg0.optim.steps, "batch_scenes": cfg0.optim.batch_scenes,
                   "probe_train_scenes": cfg0.data.probe_train_scenes, "eval_scenes": cfg0.data.eval_scenes,
                   "linear_steps": cfg0.probe.linear_steps}},
        config={"distill_config": cfg0, "method_overrides": {m: METHODS[m] for m in args.methods}})


if __name__ == "__main__":
    main()
