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
K-th, for N processes side by side in the command's folder; the command without it then collects. Prints each
result as it comes, then the block of docs/results.md: per probe the mIoU mean and sample standard deviation per
method with every seed, the per-seed paired difference ST-SLidR minus SLidR (mean, std, and how many seeds it is
positive on) and the mean per-class IoU; writes every result to ``OUT/results.json`` (the authors' mIoU too, absent
classes counted as 1) and the figures to ``OUT/figures.json``. ``--report-only`` runs nothing: it prints the block
over the seeds whose every method and probe has finished (a run still under way can be reported this way).
``--quick`` shrinks the budget (fewer scenes and steps).
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
from figures import (add_lane_option, command_lines, figures_record, in_lane, options, parse_with_out, table,
                     write_figures)

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


def figures_of(results: dict[str, dict[str, list[dict]]], seeds: list[int], cfg: DistillConfig) -> dict:
    """The figures of the finished ``results`` (probe -> method -> one result per seed of ``seeds``) under the
    budget of ``cfg``."""
    return {"seeds": seeds, "probes": {probe: summarise(by_method) for probe, by_method in results.items()},
            "budget": {"pretrain_scenes": cfg.data.pretrain_scenes, "num_points": cfg.data.num_points,
                       "steps": cfg.optim.steps, "batch_scenes": cfg.optim.batch_scenes,
                       "probe_train_scenes": cfg.data.probe_train_scenes, "eval_scenes": cfg.data.eval_scenes,
                       "linear_steps": cfg.probe.linear_steps}}


METHOD_LABELS = {"random": "random init", "slidr": "SLidR", "tolerant": "tolerant only",
                 "st_slidr": "ST-SLidR (tolerant + balancing)",
                 "st_authors": "ST-SLidR, the authors' rule (dropped logits zeroed)",
                 "st_soft": "ST-SLidR, soft weights 1 − s"}
PROBE_LABELS = {"ours": "our probe (BatchNorm re-estimated, AdamW on cross-entropy)",
                "authors": "the authors' probe (BatchNorm frozen, CE + Lovasz, SGD)"}


def setting(d: dict) -> str:
    """The pretraining setting the figures come from: q, voxels, 3D network, 2D backbone and its weights."""
    c = d["config"]["distill_config"]
    voxel, image = c["voxel"], c["image"]
    network = (f"Res16UNet34C-shaped ({', '.join(map(str, voxel['planes']))})" if voxel["architecture"] == "res16unet"
               else f"sparse U-Net ({', '.join(map(str, voxel['widths']))}, {voxel['blocks']} block per level)")
    return (f"q = {c['loss']['q']} ({c['loss']['quantile_variant']}), {voxel['coordinates']} voxels, 3D network "
            f"{network}, 2D {image['backbone']} with {image['weights']} weights (the authors distil self-supervised "
            f"ResNet-50s, which cannot be fetched here), augmentations {'on' if c['data']['augment'] else 'off'}")


def render(d: dict) -> str:
    """The block of docs/results.md, per probe: mIoU mean ± std per method with every seed, ST-SLidR − SLidR paired
    by seed, IoU per class."""
    f = d["figures"]
    b = f["budget"]
    seeds = " / ".join(str(s) for s in f["seeds"])
    parts = [f"{command_lines(d)}\n\n{b['pretrain_scenes']} pretraining scenes × {b['num_points']:,} points, "
             f"{b['steps']} steps of {b['batch_scenes']} scenes; the probe trains on {b['probe_train_scenes']} scenes "
             f"and scores on {b['eval_scenes']}. {setting(d)}."]
    for probe_name, methods in f["probes"].items():
        rows = [[METHOD_LABELS[name], f"{m['miou_mean']:.1f}",
                 f"{m['miou_std']:.1f}" if m["miou_std"] is not None else "-",
                 " / ".join(f"{v:.1f}" for v in m["miou_per_seed"])] for name, m in methods.items()]
        classes = list(next(iter(methods.values()))["iou_per_class"])
        class_rows = [[METHOD_LABELS[name],
                       *("-" if m["iou_per_class"][c] is None else f"{m['iou_per_class'][c]:.1f}" for c in classes)]
                      for name, m in methods.items()]
        parts.append(f"**{PROBE_LABELS[probe_name]}**, mIoU (%):\n\n"
                     + table(["method", "mIoU mean", "std", f"seeds {seeds}"], rows))
        if "slidr" in methods and "st_slidr" in methods:
            diffs = [b - a for a, b in zip(methods["slidr"]["miou_per_seed"], methods["st_slidr"]["miou_per_seed"])]
            spread = f" ± {statistics.stdev(diffs):.1f}" if len(diffs) > 1 else ""
            parts.append(f"ST-SLidR − SLidR, paired by seed: {' / '.join(f'{x:+.1f}' for x in diffs)} (mean "
                         f"{statistics.mean(diffs):+.1f}{spread}, positive on {sum(x > 0 for x in diffs)} of "
                         f"{len(diffs)} seeds).")
        parts.append("Mean IoU per class:\n\n" + table(["method", *classes], class_rows))
    return "\n\n".join(parts)


def summary(d: dict) -> str:
    """README's line: each probe's mIoU per method."""
    f = d["figures"]
    per_probe = "; ".join(
        f"{name} probe " + ", ".join(f"{METHOD_LABELS[m]} {v['miou_mean']:.1f}" for m, v in methods.items())
        for name, methods in f["probes"].items())
    return (f"- `{d['command']}` (built-in scenes, seeds {', '.join(map(str, f['seeds']))}), linear-probe mIoU: "
            f"{per_probe}.")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The options (``argv``, default the command line), ``out`` resolved."""
    parser = options(__doc__)
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
    config = {"distill_config": cfg0, "method_overrides": {m: METHODS[m] for m in args.methods}}
    if args.report_only:
        complete = [s for s in args.seeds if all(finished(base, m, s, probe, args.out, args.keep)
                                                 for m in args.methods for probe in args.probes)]
        print(f"seeds finished for every method and probe: {complete}")
        if complete:
            results = {probe: {m: [finished(base, m, s, probe, args.out, args.keep) for s in complete]
                               for m in args.methods} for probe in args.probes}
            print(render(figures_record("distill_probe", args, figures_of(results, complete, cfg0), config)))
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
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out / "results.json", json.dumps(results, indent=2))
    write_figures(args.out, "distill_probe", args, figures_of(results, args.seeds, cfg0), config=config, show=render)


if __name__ == "__main__":
    main()
