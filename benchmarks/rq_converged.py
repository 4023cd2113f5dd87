"""The converged comparison of USER against its baselines: locked text, one tower size for all, seeds, the paper's
schedule (20 epochs, lr x0.1 at epoch 10).

Variants: the shipped overlays ``configs/variants/NAME.yaml`` (each says what it changes) written over ``--config``
(default ``flickr8k_locked``): by default ``infonce``, ``vsepp``, ``user_noqueue``, ``user``, ``user_authors`` (the
authors' key encoder modes, init and weight decay), ``user_tolerant`` and ``infonce_tolerant`` (semantically
tolerant negatives and balancing: our extension, not the paper's).

``--sweep``: UTO's gamma in {0.2, 0.3, 0.5} x mu in {30, 90} for ``user`` on seed 0 only; ``--points G:M ...``
sweeps those (gamma, mu) points instead (e.g. past the grid's best corner). ``--retune`` (with ``--keep``, after the
sweep): user and user_tolerant at the grid's best point (val rSum) on ``--seeds`` beside infonce, vsepp and user, a
re-tuning of the authors' constants.

One training run at a time, each into OUT/VARIANT/seedS (resumed from its last.pt; a run whose result.json exists
is skipped; with ``--keep DIR`` finished results are also copied to DIR/VARIANT/seedS.json and read from there, so
the comparison resumes in a fresh checkout, and a kept run of another name with the very same configuration is
read too: the sweep's point at the config's own gamma and mu is user's seed 0). Each run's result.json:
best-validation-checkpoint R@1/5/10 both ways and rSum on --split, best epoch, per-epoch val rSum, train seconds,
the code commit, threads and the whole configuration. Prints the block of docs/results.md (mean ± std per variant,
every seed, the best variant against the baselines), writes OUT/figures.json and OUT/curves.png (per-epoch val rSum,
one line per run; with --keep also DIR/curves_seeds0-1-2.png).

  python benchmarks/rq_converged.py --data runs/f8k_feats --seeds 0 1 2
  python benchmarks/rq_converged.py --data runs/f8k_feats --sweep --keep docs/figures/rq_converged_runs
  python benchmarks/rq_converged.py --data runs/f8k_feats --retune --keep docs/figures/rq_converged_runs
  python benchmarks/rq_converged.py --data runs/f8k_feats --sweep --points 0.5:30 0.7:30 0.5:15 --keep DIR
  python benchmarks/rq_converged.py --data runs/f8k_feats --estimate-steps 20  # step time and FLOP bound, no run

``--lane K/N`` runs only every N-th of the command's runs, from the K-th, in the command's own folder: N processes
side by side (``OMP_NUM_THREADS=1`` each; on 2 cores two one-thread runs give 1.4-2.2x the throughput of one
two-thread run) then the command without ``--lane`` collects the figures.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import statistics
from pathlib import Path
from typing import NamedTuple

import torch
from figures import (CODE_VERSION, RECALL_HEADER, RECALLS, add_lane_option, command_lines, in_lane, options,
                     parse_with_out, signed, table, write_figures)
from retrieval_quality import VARIANTS, train_and_score, variant_config
from timing import gemm_gflops, gflop

from xmcl.config import current_names, load_config
from xmcl.errors import TrainingStalled
from xmcl.retrieval.config import RetrievalTrainConfig
from xmcl.retrieval.model import USERModel
from xmcl.runtime.files import atomic_write_json
from xmcl.runtime.log import read_jsonl
from xmcl.training.retrieval_trainer import train_retrieval

DEFAULT_VARIANTS = ["infonce", "vsepp", "user_noqueue", "user", "user_authors", "user_tolerant", "infonce_tolerant"]
SWEEP = [(gamma, mu) for gamma in (0.2, 0.3, 0.5) for mu in (30.0, 90.0)]
RESULT = "result.json"
RETUNE_BESIDE = ("infonce", "vsepp", "user")
RETUNE_AT_BEST = ("user", "user_tolerant")  # run at the best point


class Run(NamedTuple):
    """One training run: its name (the variant's, or a sweep point's), seed, shipped variant and the overrides written
    over that variant."""

    name: str
    seed: int
    variant: str
    overrides: tuple[str, ...] = ()


def sweep_point(gamma: float, mu: float, variant: str = "user", seed: int = 0) -> Run:
    """``variant`` at UTO margin ``gamma`` and scale ``mu``, named ``user_g0.3_mu30``."""
    return Run(f"{variant}_g{gamma}_mu{mu:g}", seed, variant, (f"loss.gamma={gamma}", f"loss.mu={mu}"))


def best_sweep_point(args: argparse.Namespace) -> tuple[float, float]:
    """The sweep's ``(gamma, mu)`` of highest val rSum among its seed-0 results kept in ``args.keep`` (under its own
    name, or a twin's: ``kept_result``)."""
    scores = {}
    for gamma, mu in SWEEP:
        run = sweep_point(gamma, mu)
        path = args.keep / run.name / "seed0.json"
        result = kept_result(args, run_config(args, run), path)
        if result is None:
            raise SystemExit(f"--retune: {path} is missing; run the sweep first (--sweep --keep {args.keep})")
        if "metrics" in result:
            scores[gamma, mu] = float(result["metrics"]["rsum"])
    if not scores:
        raise SystemExit(f"--retune: every sweep run in {args.keep} stalled")
    return max(scores, key=scores.__getitem__)


def runs_to_do(args: argparse.Namespace) -> list[Run]:
    """Every run the options ask for, in the order they run."""
    if args.sweep:
        return [sweep_point(gamma, mu) for gamma, mu in args.points or SWEEP]
    if args.retune:
        best = best_sweep_point(args)
        return ([Run(variant, seed, variant) for variant in RETUNE_BESIDE for seed in args.seeds]
                + [sweep_point(*best, variant, seed) for variant in RETUNE_AT_BEST for seed in args.seeds])
    return [Run(name, seed, name) for name in args.variants for seed in args.seeds]


def run_config(args: argparse.Namespace, run: Run) -> RetrievalTrainConfig:
    """``--config`` with ``run``'s variant written over it, then the options' budget, ``run``'s overrides and
    ``--set``."""
    common = [f"data.path={args.data}", f"run.seed={run.seed}", f"optim.epochs={args.epochs}",
              f"optim.lr_decay_epochs=[{args.decay_epoch}]"]
    if args.max_steps_per_epoch:
        common.append(f"optim.max_steps_per_epoch={args.max_steps_per_epoch}")
    return variant_config(args.config, run.variant, common + list(run.overrides) + args.overrides)


def kept_result(args: argparse.Namespace, cfg: RetrievalTrainConfig, kept: Path) -> dict | None:
    """The finished result kept at ``kept``, else that of a kept run with ``cfg``'s configuration under another name
    in the same folder (``kept_twin``), else None."""
    if kept.is_file():
        return json.loads(kept.read_text(encoding="utf-8"))
    base = dataclasses.asdict(load_config(RetrievalTrainConfig, args.config, []))
    as_kept = json.loads(json.dumps([dataclasses.asdict(cfg), base]))  # as a kept file has them
    return kept_twin(kept.parent.parent, *as_kept)


def one_run(args: argparse.Namespace, cfg: RetrievalTrainConfig, run_dir: Path, kept: Path | None) -> dict:
    """Train (resuming) into ``run_dir`` and write its ``result.json`` (and a copy to ``kept`` when given); a run whose
    result is in either place, or kept under another name (``kept_result``), is read, not rerun. Its wall time as
    ``train_and_score`` gives it."""
    result_path = run_dir / RESULT
    if result_path.is_file():
        return json.loads(result_path.read_text(encoding="utf-8"))
    if kept is not None and (found := kept_result(args, cfg, kept)) is not None:
        return found
    record = {"code": CODE_VERSION, "threads": torch.get_num_threads(), "config": dataclasses.asdict(cfg)}
    try:
        scored = train_and_score(cfg, run_dir, args.data, args.split)
    except TrainingStalled as error:  # UTO without a warm-up can fail to start from an init: reported per seed
        result = {"stalled": str(error), **record}
    else:
        result = {**scored, **record}
    atomic_write_json(result_path, result)
    if kept is not None:
        kept.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(kept, result)
    return result


def same_config(kept: dict, config: dict, base: dict) -> bool:
    """Whether a kept run's ``kept`` configuration is ``config``: every field equal, where a field the kept one lacks
    (added to the code since) must be at ``base``'s value (the config file's own, no overrides)."""
    for key, value in config.items():
        if key not in kept:
            if value != base[key]:
                return False
        elif isinstance(value, dict):
            if not isinstance(kept[key], dict) or not same_config(kept[key], value, base[key]):
                return False
        elif kept[key] != value:
            return False
    return True


def kept_twin(keep: Path, config: dict, base: dict) -> dict | None:
    """A finished result kept in ``keep`` (any ``VARIANT/seedS.json``) whose run had ``config`` (``same_config``, on
    the kept configuration under today's key names, ``config.current_names``), ``data.path`` aside: a kept run may
    have reached the same features folder from another working directory."""
    for path in sorted(keep.glob("*/seed*.json")):
        result = json.loads(path.read_text(encoding="utf-8"))
        kept = result.get("config")
        if not kept:
            continue
        kept = current_names(RetrievalTrainConfig, {**kept, "data": {**kept["data"], "path": config["data"]["path"]}})
        if same_config(kept, config, base):
            return result
    return None


def step_gflop(cfg: RetrievalTrainConfig, cells: int, tokens: int) -> float:
    """GFLOP of one training step's forward and backward (``torch.utils.flop_counter``) on a batch of the run's
    shapes: ``optim.batch_size`` images of ``cells`` region rows (already through the frozen PCA where the run has
    one, as the trainer hands them over) and captions of ``tokens`` cached token states."""
    torch.manual_seed(0)
    model = USERModel(cfg.model, cfg.loss).train()
    width = cfg.model.region_pca_dim or cfg.model.region_dim
    size = cfg.optim.batch_size
    batch = {"regions": torch.randn(size, cells, width), "region_lengths": torch.full((size,), cells),
             "token_features": torch.randn(size, tokens, cfg.model.text_feature_dim),
             "token_lengths": torch.full((size,), tokens), "image_ids": torch.arange(size)}
    if cfg.model.region_pca_dim:
        model.fit_region_reduction([torch.randn(2 * cfg.model.region_dim, cfg.model.region_dim)])
    return gflop(lambda: model(batch)["loss"].backward())


def loop_seconds_per_step(log: Path, batch_size: int) -> float:
    """Seconds per step inside a run's training loop (data, step and logging; no start-up, no validation): the batch
    over the ``samples_per_s`` of its (one) epoch record in ``log.jsonl``."""
    return batch_size / next(r["samples_per_s"] for r in read_jsonl(log) if "samples_per_s" in r)


def estimate(args: argparse.Namespace) -> dict:
    """Seconds per training step of each variant over a run of ``--estimate-steps`` steps (``loop_seconds_per_step``)
    and the implied wall time of a full run of ``--estimate-captions`` // batch x epochs steps (validation not
    counted). Beside it the FLOP bound: the step's GFLOP (``step_gflop``, 49 cells and ``--estimate-tokens`` tokens)
    over the measured bare GEMM rate."""
    rate = gemm_gflops(2048)
    print(f"bare GEMM rate {rate:.1f} GFLOP/s on {torch.get_num_threads()} threads", flush=True)
    out = {"gemm_gflops": rate, "threads": torch.get_num_threads()}
    for name in args.variants:
        cfg = run_config(args, Run(name, 0, name, (f"optim.max_steps_per_epoch={args.estimate_steps}", "optim.epochs=1",
                                                   "data.val_max_images=8", "run.checkpoint_every=0")))
        train_retrieval(cfg, args.out / "estimate" / name, overwrite=True, resume=False, progress=False)
        per_step = loop_seconds_per_step(args.out / "estimate" / name / "log.jsonl", cfg.optim.batch_size)
        steps = args.estimate_captions // cfg.optim.batch_size * args.epochs
        gflop = step_gflop(cfg, 49, args.estimate_tokens)
        out[name] = {"seconds_per_step": per_step, "steps": steps, "run_minutes": per_step * steps / 60,
                     "step_gflop": gflop, "flop_bound_seconds": gflop / rate}
        print(f"{name}: {per_step:.3f} s/step (FLOP bound {gflop / rate:.3f} s: {gflop:.1f} GFLOP) -> "
              f"{per_step * steps / 60:.1f} min for {steps} steps", flush=True)
    return out


def curves_name(args: argparse.Namespace) -> str:
    """``curves_seeds0-1-2.png`` (``curves_sweep.png``, ``curves_retune_seeds0-1-2.png``): the kept curves of one
    command's runs."""
    if args.sweep:
        return "curves_sweep.png" if args.points is None else f"curves_sweep_{'_'.join(map(point_tag, args.points))}.png"
    kind = "retune_seeds" if args.retune else "seeds"
    return f"curves_{kind}{'-'.join(map(str, args.seeds))}.png"


def point_tag(point: tuple[float, float]) -> str:
    """``g0.7mu30``: one (gamma, mu) point in a file name."""
    return f"g{point[0]}mu{point[1]:g}"


def uto_point(text: str) -> tuple[float, float]:
    """``G:M`` as ``(gamma, mu)``: the ``--points`` option's type (mu > 0)."""
    try:
        gamma, mu = (float(part) for part in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--points {text!r}: expected GAMMA:MU, e.g. 0.7:30") from None
    if mu <= 0:
        raise argparse.ArgumentTypeError(f"--points {text!r}: mu must be > 0")
    return gamma, mu


def plot_curves(results: dict[str, dict], path: Path) -> None:
    """Val rSum per epoch of every run (``VARIANT/seedS`` keys) into ``path``: one colour per variant, one line
    style per seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    variants = list(dict.fromkeys(run.split("/seed")[0] for run in results))
    styles = ["-", "--", ":", "-."]
    for run, result in results.items():
        if "stalled" in result:
            continue
        variant, seed = run.split("/seed")
        curve = result["val_rsum_per_epoch"]
        ax.plot([int(e) for e in curve], list(curve.values()), color=f"C{variants.index(variant) % 10}",
                linestyle=styles[int(seed) % len(styles)], linewidth=1, label=run)
    ax.set_xlabel("epoch")
    ax.set_ylabel("val rSum")
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def summarise(results: dict[str, dict], runs: list[Run]) -> dict[str, dict]:
    """Mean and standard deviation (n - 1; 0 for one run) over seeds of each variant's figures, and the seeds whose
    run stalled at its first step (``stalled_seeds``, left out of the figures)."""
    table: dict[str, dict] = {}
    for name in dict.fromkeys(run.name for run in runs):
        done = {run.seed: results[f"{name}/seed{run.seed}"] for run in runs if run.name == name}
        metrics = [result["metrics"] for result in done.values() if "metrics" in result]
        table[name] = {"stalled_seeds": [seed for seed, result in done.items() if "stalled" in result]}
        for key in ("rsum", *RECALLS):
            values = [float(m[key]) for m in metrics if key in m]
            if values:
                table[name][key] = {"mean": statistics.fmean(values),
                                    "std": statistics.stdev(values) if len(values) > 1 else 0.0, "n": len(values)}
    return table


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The options (``argv``, default the command line), ``out`` resolved."""
    parser = options(__doc__)
    parser.add_argument("--data", type=Path, required=True, help="features folder with grid and token features")
    parser.add_argument("--config", default="flickr8k_locked", help="shipped config name or YAML path")
    parser.add_argument("--split", default="val", help="split to report")
    parser.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS, choices=VARIANTS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--sweep", action="store_true", help="the UTO gamma x mu sweep of user on seed 0")
    parser.add_argument("--points", nargs="+", type=uto_point, default=None, metavar="G:M",
                        help="with --sweep: these (gamma, mu) points instead of the grid")
    parser.add_argument("--retune", action="store_true",
                        help="the sweep's best point (read from --keep) on --seeds, beside infonce, vsepp and user")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--decay-epoch", type=int, default=10, help="lr x0.1 at this epoch")
    parser.add_argument("--max-steps-per-epoch", type=int, default=None, help="budget cap (smoke tests)")
    parser.add_argument("--estimate-steps", type=int, default=0,
                        help="only time this many steps per variant and print the full run's wall time")
    parser.add_argument("--estimate-captions", type=int, default=30000,
                        help="training captions of the full run (Flickr8K train: 30,000)")
    parser.add_argument("--estimate-tokens", type=int, default=14,
                        help="caption length of the FLOP count (Flickr8K captions: about 12 words, 14 tokens)")
    parser.add_argument("--keep", type=Path, default=None,
                        help="also copy each finished run's result here (a tracked folder), and read finished runs "
                             "from it: the comparison then resumes in a fresh checkout")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="extra config override applied to every run")
    add_lane_option(parser, "run")
    args = parse_with_out(parser, "rq_converged", naming=["data"], argv=argv)
    if args.retune and (args.sweep or args.keep is None):
        parser.error("--retune reads the sweep's kept results: give --keep, and not --sweep")
    if args.points is not None and not args.sweep:
        parser.error("--points names the points of a sweep: give --sweep")
    return args


LABELS = {
    "infonce": "InfoNCE", "vsepp": "VSE++ (hinge)", "user_noqueue": "USER without queue (SGE, UTO)",
    "user": "USER (SGE, UTO, queues)", "user_authors": "USER, the authors' key modes, init and decay",
    "user_tolerant": "USER + tolerant queues", "infonce_tolerant": "InfoNCE + tolerance",
}
POINT_LABELS = {"user": "USER", "user_tolerant": "USER + tolerant queues"}  # a variant at another UTO point
BASELINES = ("infonce", "vsepp")
R1_TARGET = {"i2t_r1": 33.0, "t2i_r1": 24.0}  # the target of the best variant at convergence


def label(name: str) -> str:
    """The table label of a run name; a point ``user_g0.3_mu30`` is USER at γ 0.3, μ 30 (``user_tolerant_g0.3_mu30``:
    USER + tolerant queues there)."""
    point = re.fullmatch(r"(user\w*?)_g([\d.]+)_mu([\d.]+)", name)
    if point is None:
        return LABELS.get(name, name)
    return f"{POINT_LABELS.get(point[1], point[1])}, UTO γ {point[2]}, μ {point[3]}"


def mean_std(cell: dict, digits: int = 1) -> str:
    return f"{cell['mean']:.{digits}f} ± {cell['std']:.{digits}f}" if cell["n"] > 1 else f"{cell['mean']:.{digits}f}"


def run_threads(run: dict) -> str:
    """``, 1 thread``: the torch threads a kept run trained with (empty when it does not say)."""
    threads = run.get("threads")
    return "" if threads is None else f", {threads} thread{'s' if threads != 1 else ''}"


def render(d: dict) -> str:
    """The block of docs/results.md: mean ± std over seeds per variant, per-seed rSum, the best variant against the
    baselines, the curves."""
    f = d["figures"]
    runs, by_variant = f["runs"], f["summary"]
    cfg = next(r["config"] for r in runs.values())
    model, optim = cfg["model"], cfg["optim"]
    rows = []
    for name, row in by_variant.items():
        if "rsum" not in row:
            continue
        rows.append([label(name), str(row["rsum"]["n"]), *(mean_std(row[k]) for k in RECALLS),
                     mean_std(row["rsum"], 2)])
    seeds = []
    for name in by_variant:
        done = [(key.split("/seed")[1], r) for key, r in runs.items() if key.split("/seed")[0] == name]
        cells = [f"seed {seed}: " + (f"{r['metrics']['rsum']:.1f} (best epoch {r['best_epoch']}{run_threads(r)})"
                                     if "metrics" in r else "stalled at its first step") for seed, r in done]
        seeds.append(f"- {name}: " + "; ".join(cells))
    width = f"a frozen {model['region_dim']} → {model['region_pca_dim']} PCA" if model.get("region_pca_dim") else \
        f"{model['region_dim']}-d cells"
    return "\n\n".join(part for part in [
        command_lines(d),
        f"Flickr8K {f['split']}, best-validation checkpoint of each run. Every variant alike: locked text (the frozen "
        f"MiniLM's cached token states), frozen EfficientNet-Lite0 grid features through {width}, embed "
        f"{model['embed_dim']}, MLP {model['head_hidden_dim']}, queue {model['queue_size']}, momentum "
        f"{model['momentum']}, batch {optim['batch_size']}, {optim['epochs']} epochs, lr {optim['lr']:g} × 0.1 at "
        f"epoch {optim['lr_decay_epochs'][0]}, no hinge warm-up. Mean ± std over seeds:",
        table(["variant", "seeds", *RECALL_HEADER], rows),
        "Per seed (rSum, best epoch, torch threads; a one-thread run shared the 2 cores with another one-thread "
        "run, which gives more runs an hour than one run on two threads):\n\n" + "\n".join(seeds),
        best_against_baselines(runs, by_variant),
        f"Val rSum per epoch, every run: ![curves](figures/rq_converged_runs/{f['kept_curves']})"
        if f.get("kept_curves") else "",
    ] if part)


def best_against_baselines(runs: dict[str, dict], by_variant: dict[str, dict]) -> str:
    """The best variant by mean rSum against each baseline, paired by seed (rSum difference per seed, its mean and
    how many seeds it is positive on, beside both spreads), and its mean R@1 against ``R1_TARGET``; empty when
    the baselines were not run (the sweep)."""
    scored = {name: row for name, row in by_variant.items() if "rsum" in row}
    baselines = [name for name in BASELINES if name in scored]
    if not baselines:
        return ""
    best = max(scored, key=lambda name: scored[name]["rsum"]["mean"])
    rsum: dict[str, dict[str, float]] = {}  # variant -> seed -> rSum of the finished runs
    for key, run in runs.items():
        if "metrics" in run:
            variant, seed = key.split("/seed")
            rsum.setdefault(variant, {})[seed] = run["metrics"]["rsum"]
    lines = []
    for base in baselines:
        if base == best:
            continue
        pairs = [(seed, value - rsum[base][seed]) for seed, value in rsum.get(best, {}).items() if seed in rsum[base]]
        if not pairs:
            continue
        diffs = [diff for _, diff in pairs]
        lines.append(f"- against {label(base)}: " + ", ".join(
            f"seed {seed} {signed(diff)}" for seed, diff in pairs) + f" (mean {signed(sum(diffs) / len(diffs))}, "
            f"positive on {sum(diff > 0 for diff in diffs)} of {len(diffs)} seeds; std over seeds "
            f"{scored[best]['rsum']['std']:.1f} and {scored[base]['rsum']['std']:.1f})")
    r1 = ", ".join(f"{key[:3]} {scored[best][key]['mean']:.1f} (target ≥ {target:g}: "
                   f"{'met' if scored[best][key]['mean'] >= target else 'not met'})" for key, target in R1_TARGET.items())
    return (f"The best variant by mean rSum, {label(best)}, paired by seed (rSum difference):\n\n" + "\n".join(lines)
            + f"\n\nIts mean R@1: {r1}.")


def summary(d: dict) -> str:
    """README's line: mean ± std val rSum per variant, and the best variant's R@1 both ways (the command's
    ``--retune`` named where it ran with it)."""
    rows = {name: row for name, row in d["figures"]["summary"].items() if "rsum" in row}
    best = max(rows, key=lambda name: rows[name]["rsum"]["mean"])
    seeds = "-".join(map(str, d["config"]["seeds"]))
    rsums = ", ".join(f"{label(name)} {mean_std(row['rsum'])}" for name, row in rows.items())
    retune = " --retune" if d["config"].get("retune") else ""
    return (f"- `benchmarks/rq_converged.py{retune}` (Flickr8K, locked text, 20 epochs, seeds {seeds}), val rSum mean ± std: "
            f"{rsums}; the best, {label(best)}, has R@1 "
            f"{rows[best]['i2t_r1']['mean']:.1f} / {rows[best]['t2i_r1']['mean']:.1f}.")


def render_estimate(reduced: dict, full: dict) -> str:
    """The block of docs/results.md: step time against the FLOP bound of each variant, with the PCA and on the
    1280-d cells."""
    rows = []
    for cells, d in (("256-d (PCA)", reduced), ("1280-d cells", full)):
        f = d["figures"]["estimate"]
        for name, v in f.items():
            if isinstance(v, dict):
                rows.append([cells, label(name), f"{v['step_gflop']:.1f}",
                             f"{v['flop_bound_seconds']:.3f} s", f"{v['seconds_per_step']:.3f} s",
                             f"{v['seconds_per_step'] / v['flop_bound_seconds']:.1f}x", f"{v['run_minutes']:.0f} min"])
    rate = reduced["figures"]["estimate"]["gemm_gflops"]
    return (f"{command_lines(reduced, full)}\n\nBare GEMM rate {rate:.0f} GFLOP/s. GFLOP: one step's forward and "
            f"backward (`torch.utils.flop_counter`, 49 cells, 14 tokens); bound: GFLOP over the GEMM rate; step: "
            f"measured inside the training loop (data included); run: a 20-epoch run's steps at that time "
            f"(validation not counted). Target: a run in ≤ 15 min.\n\n"
            + table(["cells", "variant", "GFLOP", "FLOP bound", "step", "step / bound", "20-epoch run"], rows))


def main() -> None:
    args = parse_args()
    if args.estimate_steps:
        write_figures(args.out / "estimate", "rq_converged", args, {"estimate": estimate(args)})
        return
    runs = runs_to_do(args)
    results: dict[str, dict] = {}
    for index, run in enumerate(runs):
        if not in_lane(index, args.lane):
            continue
        key = f"{run.name}/seed{run.seed}"
        kept = args.keep / run.name / f"seed{run.seed}.json" if args.keep else None
        results[key] = one_run(args, run_config(args, run), args.out / run.name / f"seed{run.seed}", kept)
        if "stalled" in results[key]:
            print(f"{key}: stalled at its first step ({results[key]['stalled']})", flush=True)
            continue
        m = results[key]["metrics"]
        print(f"{key}: rSum {m['rsum']:.1f} (best epoch {results[key]['best_epoch']})", flush=True)
    if args.lane:
        print(f"lane {args.lane[0]}/{args.lane[1]} done; rerun without --lane to collect the figures")
        return
    plot_curves(results, args.out / "curves.png")
    if args.keep:  # beside the kept results, for the document
        plot_curves(results, args.keep / curves_name(args))
    write_figures(args.out, "rq_converged", args, {"split": args.split, "sweep": args.sweep, "runs": results,
                                                   "summary": summarise(results, runs),
                                                   "kept_curves": curves_name(args) if args.keep else None},
                  show=render)


if __name__ == "__main__":
    main()
