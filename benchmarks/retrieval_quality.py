"""Retrieval quality of USER against its baselines, each trained with the same budget and seed.

Each variant is a shipped overlay, ``configs/variants/NAME.yaml`` (which says what it changes), written over the
defaults and the options below (``variant_config``). One harness, one table:

* the comparison (the default): ``infonce``, ``vsepp`` (the baselines: GPO encoders, no SGE, no queue),
  ``user_noqueue`` (+ SGE, UTO in-batch), ``user_keep`` (+ momentum encoders and queues; queued keys of the query's
  own image count as negatives, as in the authors' code), ``user`` (the id mask keeps them out);
* the enhancement ablation: ``--variants user_plain user user_cge user_sge_cge`` (CGE needs ``--clip-cache``);
* the loss ablation: ``user_uto_plain`` (UTO alone: no SGE, no queue) against ``vsepp`` and ``infonce``;
* ``user_keys_train``, ``user_tolerant``, ``user_cge_tolerant``, ...: any other shipped variant, by name.

Usage (features from `xmcl features`):
  python benchmarks/retrieval_quality.py --data runs/shapes_feats --epochs 8 --out runs/rq_shapes
  python benchmarks/retrieval_quality.py --data runs/f8k_feats --text-encoder bert --epochs 3 --lambda-batch 20
  python benchmarks/retrieval_quality.py --data runs/shapes_feats --clip-cache runs/clip_shapes_cache \
      --variants user_plain user user_cge user_sge_cge
``--lane K/N`` trains only every N-th variant, from the K-th, for N processes side by side in the same OUT; the
command without it then collects (each run's checkpoint keeps its train time).
Each variant trains into OUT/VARIANT (resumed if interrupted); OUT defaults to
runs/bench/retrieval_quality/<data folder>[-h<hash of the other options>]. Prints the block of docs/results.md:
R@1/5/10 both directions and rSum of each variant's best-validation checkpoint on --split, each variant's
validation rSum per epoch and train time, written with the full configurations to OUT/figures.json. With
--clip-cache, the CLIP teacher's own figures on --split (its cached embeddings ranked by the same protocol) are
added.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from figures import (RECALL_HEADER, add_lane_option, command_lines, in_lane, options, parse_with_out, recall_rows,
                     signed, table, write_figures)

from xmcl.config import SHIPPED_CONFIGS, apply_overrides, compose, config_from_dict
from xmcl.data.open import open_split
from xmcl.metrics.retrieval import evaluate_embeddings
from xmcl.retrieval.clip.cache import ClipCache
from xmcl.retrieval.config import RetrievalTrainConfig
from xmcl.retrieval.inference import evaluate_checkpoint
from xmcl.training.retrieval_trainer import train_retrieval

VARIANTS_DIR = SHIPPED_CONFIGS / "variants"
VARIANTS = sorted(path.stem for path in VARIANTS_DIR.glob("*.yaml"))  # the shipped variants, by name
DEFAULT_VARIANTS = ["infonce", "vsepp", "user_noqueue", "user_keep", "user"]


def variant_config(base: Path | str | None, variant: str, overrides: list[str]) -> RetrievalTrainConfig:
    """The config file ``base`` (a path or a shipped config's name; None: the defaults) with the shipped variant
    ``variant`` written over it, then ``overrides``."""
    data = compose(*([] if base is None else [base]), VARIANTS_DIR / f"{variant}.yaml")
    return config_from_dict(RetrievalTrainConfig, apply_overrides(data, overrides),
                            f"{base or 'the defaults'} with variant {variant}")


def teacher_metrics(cache_dir: Path, data: Path, split: str) -> dict:
    """The CLIP teacher's own figures on ``split`` of ``data``: its cached image and caption embeddings, ranked
    (empty when the cache does not hold the whole split)."""
    corpus = open_split(data, split)
    cache = ClipCache.open(cache_dir)
    found = cache.lookup(corpus)
    if not (found.image_found.all() and found.text_found.all()):
        return {}
    metrics = evaluate_embeddings(found.image, found.text, corpus.caption_image, ("all",))["all"]
    return {"checkpoint": cache.manifest["checkpoint"], **metrics.as_dict()}


def train_and_score(cfg: RetrievalTrainConfig, run_dir: Path, data: Path, split: str) -> dict:
    """Train (resuming) into ``run_dir``, then score its best-validation checkpoint on ``split`` of ``data``: the run's
    record ``{"metrics", "best_epoch", "val_rsum_per_epoch", "train_seconds"}`` (the training loop's wall time over
    every session; None for a run whose checkpoints predate that record)."""
    summary = train_retrieval(cfg, run_dir)
    metrics = evaluate_checkpoint(run_dir / "best.pt", data, split, ("all",))["all"]
    return {"metrics": metrics.as_dict(), "best_epoch": summary["best_epoch"],
            "val_rsum_per_epoch": summary["val_rsum_by_epoch"], "train_seconds": summary["train_seconds"]}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The options (``argv``, default the command line), ``out`` resolved."""
    parser = options(__doc__)
    parser.add_argument("--data", type=Path, required=True, help="precomputed-feature folder (train + val splits)")
    parser.add_argument("--split", default="val", help="split to report")
    parser.add_argument("--val-split", default="val", help="split whose rSum picks each variant's best epoch")
    parser.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS, choices=VARIANTS)
    parser.add_argument("--epochs", type=int, default=8, help="budget: epochs per variant")
    parser.add_argument("--max-steps-per-epoch", type=int, default=None, help="budget: steps per epoch")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--text-encoder", choices=["bigru", "bert"], default="bigru",
                        help="bigru (vocabulary from the training captions) or bert (the installed MiniLM by default)")
    parser.add_argument("--text-model", default=None, help="BERT-family model directory (text-encoder bert)")
    parser.add_argument("--embed-dim", type=int, default=1024)
    parser.add_argument("--queue-size", type=int, default=4096)
    parser.add_argument("--lambda-batch", type=float, default=1.0, help="UTO in-batch weight (paper: 20 on Flickr)")
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--clip-cache", type=Path, default=None,
                        help="CLIP feature cache (`xmcl clip-cache`) of the raw corpus, for the CGE variants")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="extra config override applied to every variant")
    add_lane_option(parser, "variant")
    args = parse_with_out(parser, "retrieval_quality", naming=["data"], argv=argv)
    if not args.clip_cache and any(variant_config(None, name, []).model.cge for name in args.variants):
        parser.error("the CGE variants need --clip-cache")
    return args


LABELS = {
    "user_uto_plain": "user_uto_plain (UTO alone: no SGE, no queues)",
    "user_noqueue": "user_noqueue (SGE, UTO)",
    "user_keep": "user_keep (+queues, authors' false negatives)",
    "user": "user (+queues, id mask)",
    "user_plain": "user_plain (queues, no SGE/CGE)",
    "user_cge": "user_cge (queues, CGE, no SGE)",
    "user_sge_cge": "user_sge_cge (queues, SGE, CGE)",
    "user_tolerant": "user_tolerant (user + tolerant queues)",
    "user_cge_tolerant": "user_cge_tolerant (user_cge + tolerant queues, CLIP similarity)",
}
DIFFERENCES = (  # what changes from the second variant to the first, one component at a time
    ("UTO instead of the hinge (neither has SGE or queues)", "user_uto_plain", "vsepp"),
    ("UTO instead of InfoNCE (neither has SGE or queues)", "user_uto_plain", "infonce"),
    ("SGE, without queues", "user_noqueue", "user_uto_plain"),
    ("momentum queues with the id mask, with SGE", "user", "user_noqueue"),
    ("the id mask instead of the authors' false negatives", "user", "user_keep"),
    ("SGE, with queues", "user", "user_plain"),
    ("CGE, with queues", "user_cge", "user_plain"),
    ("SGE + CGE, with queues", "user_sge_cge", "user_plain"),
    ("tolerant queues, with SGE", "user_tolerant", "user"),
    ("tolerant queues, with CGE", "user_cge_tolerant", "user_cge"),
)


def train_minutes(run: dict) -> str:
    """``12.5 min`` (not recorded for a run whose checkpoints predate the record of train time)."""
    seconds = run["train_seconds"]
    return "not recorded" if seconds is None else f"{seconds / 60:.1f} min"


def budget(config: dict) -> str:
    """``8 epochs`` or ``4 epochs × 50 steps``."""
    steps = config["max_steps_per_epoch"]
    return f"{config['epochs']} epochs" + (f" × {steps} steps" if steps else "")


def render(d: dict) -> str:
    """The block of docs/results.md: the recall table, the differences one component at a time, the validation
    curves, the train times and the CLIP teacher's own figures."""
    f = d["figures"]
    runs = {name: v["metrics"] for name, v in f["variants"].items()}
    c = d["config"]
    parts = [command_lines(d),
             f"{c['data']} / {f['split']} ({f['num_images']:,} images, {f['num_captions']:,} captions), best epoch by "
             f"{f['val_split']} rSum; {budget(c)} of batch {c['batch_size']}, seed {c['seed']}, text encoder "
             f"{c['text_encoder']}:",
             table(["variant", *RECALL_HEADER], recall_rows(runs, LABELS))]
    diffs = [f"- {what}: {signed(runs[a]['rsum'] - runs[b]['rsum'])} rSum ({a} against {b})"
             for what, a, b in DIFFERENCES if a in runs and b in runs]
    if diffs:
        parts.append("One component at a time, from the table:\n\n" + "\n".join(diffs))
    epochs = sorted({int(e) for v in f["variants"].values() for e in v["val_rsum_per_epoch"]})
    curve_rows = [[name, *(f"{v['val_rsum_per_epoch'].get(str(e), float('nan')):.1f}" for e in epochs)]
                  for name, v in f["variants"].items()]
    parts.append(f"{f['val_split'].capitalize()} rSum per epoch:\n\n"
                 + table(["variant", *(f"epoch {e}" for e in epochs)], curve_rows))
    times = ", ".join(f"{name} {train_minutes(v)}" for name, v in f["variants"].items())
    parts.append(f"Train time per variant: {times}.")
    teacher = f.get("teacher")
    if teacher:
        parts.append(f"The CLIP teacher itself (`{teacher['checkpoint']}`, its cached embeddings ranked by the same "
                     f"protocol): rSum {teacher['rsum']:.2f} (R@1 {teacher['i2t_r1']:.1f} / {teacher['t2i_r1']:.1f}).")
    return "\n\n".join(parts)


def summary(d: dict) -> str:
    """README's line: each variant's rSum."""
    f = d["figures"]
    rsums = ", ".join(f"{name} {v['metrics']['rsum']:.1f}" for name, v in f["variants"].items())
    c = d["config"]
    return f"- `benchmarks/retrieval_quality.py` on `{c['data']}` ({budget(c)}), {f['split']} rSum: {rsums}."


def budget_overrides(args: argparse.Namespace, region_dim: int, clip_dim: int | None) -> list[str]:
    """What every variant is trained with: the data, the options' budget and sizes (features of ``region_dim``; the
    CLIP cache's embeddings of ``clip_dim``, when given), then ``--set``."""
    common = [
        f"data.path={args.data}", f"data.val_split={args.val_split}", f"run.seed={args.seed}",
        f"model.region_dim={region_dim}", f"model.embed_dim={args.embed_dim}",
        f"model.text_encoder={args.text_encoder}", f"model.queue_size={args.queue_size}",
        f"loss.batch_weight={args.lambda_batch}", f"optim.epochs={args.epochs}", f"optim.batch_size={args.batch_size}",
        f"optim.lr={args.lr}", f"optim.lr_decay_epochs=[{max(1, int(args.epochs * 0.75))}]",
    ]
    if args.text_model:
        common.append(f"model.text_model={args.text_model}")
    if clip_dim is not None:
        common += [f"model.clip_cache={args.clip_cache}", f"model.clip_dim={clip_dim}"]
    if args.max_steps_per_epoch:
        common.append(f"optim.max_steps_per_epoch={args.max_steps_per_epoch}")
    return common + args.overrides


def main() -> None:
    args = parse_args()

    region_dim = int(open_split(args.data, "train").region_features.shape[-1])
    common = budget_overrides(args, region_dim, ClipCache.open(args.clip_cache).dim if args.clip_cache else None)
    runs, configs = {}, {}
    for index, name in enumerate(args.variants):
        if not in_lane(index, args.lane):
            continue
        configs[name] = variant_config(None, name, common)
        runs[name] = {**train_and_score(configs[name], args.out / name, args.data, args.split),
                      "checkpoint": args.out / name / "best.pt"}
        print(f"{name}: best epoch {runs[name]['best_epoch']}, rSum {runs[name]['metrics']['rsum']:.2f}", flush=True)
    if args.lane:
        print(f"lane {args.lane[0]}/{args.lane[1]} done; rerun without --lane to collect the figures")
        return

    split = open_split(args.data, args.split)
    figures = {"split": args.split, "val_split": args.val_split, "num_images": split.num_images,
               "num_captions": split.num_captions, "variants": runs}
    if args.clip_cache:
        figures["teacher"] = teacher_metrics(args.clip_cache, args.data, args.split)
    write_figures(args.out, "retrieval_quality", args, figures, config={"variant_configs": configs}, show=render)


if __name__ == "__main__":
    main()
