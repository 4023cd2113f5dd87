"""What a locked-text USER run (``configs/flickr8k_locked.yaml``) spends outside its training steps, on the real
Flickr8K features (``runs/f8k_feats``: see the config's header for the command that makes them).

- ``batch data``: a training batch's items and collation (``CaptionPairs.__getitems__`` and ``Collate``, the work
  the loop's DataLoader does with ``data.num_workers: 0``), median over batches of an epoch whose caption ids the
  tokenizer already holds, as from the second epoch on;
- ``validation``: one validation (``encode_split`` and ``evaluate_embeddings`` over the val split, as at each
  epoch's end) on cells projected by the PCA beforehand, as the trainer now does, and on the raw 1280-d cells, which
  the tower projects batch by batch (median of ``--repeats`` after an untimed one, which tokenises the captions);
- ``curves drawing``: one ``plot_curves`` of a 20-epoch run's log (235 steps an epoch, each logged with the
  trainer's keys, and each epoch's validation record; the values drawn at random), median of ``--repeats`` after
  an untimed one.

The PCA is fitted on the first 100 training images (the times do not depend on its values) and the model is
freshly initialised.

  python benchmarks/loop_overheads.py --data runs/f8k_feats
"""

from __future__ import annotations

import os

os.environ.setdefault("GOMP_SPINCOUNT", "3000")  # as the command line sets it, before torch loads OpenMP

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from figures import command_lines, options, parse_with_out, runs_root, table, write_figures  # noqa: E402
from timing import repeat_seconds  # noqa: E402

from xmcl.config import load_config  # noqa: E402
from xmcl.data.batches import CaptionPairs, Collate  # noqa: E402
from xmcl.data.open import open_split  # noqa: E402
from xmcl.metrics.retrieval import evaluate_embeddings  # noqa: E402
from xmcl.retrieval.config import RetrievalTrainConfig  # noqa: E402
from xmcl.retrieval.inference import build_tokenizer, encode_split  # noqa: E402
from xmcl.retrieval.model import USERModel  # noqa: E402
from xmcl.retrieval.token_features import attach_token_features  # noqa: E402
from xmcl.runtime.log import plot_curves  # noqa: E402
from xmcl.training.retrieval_trainer import epoch_batches, project_regions, region_rows  # noqa: E402

CONFIG = Path(__file__).resolve().parent.parent / "configs" / "flickr8k_locked.yaml"
PCA_IMAGES = 100
EPOCHS, STEPS_PER_EPOCH = 20, 235  # Flickr8K's 30,000 training captions in batches of 128
STEP_KEYS = ("loss", "grad_norm", "lr", "loss_batch", "loss_queue_i2t", "loss_queue_t2i")
EPOCH_KEYS = ("train_loss_mean", "samples_per_s", "peak_memory_mib", *(f"val_{d}_{m}" for d in ("i2t", "t2i")
                                                                        for m in ("r1", "r5", "r10", "medr", "meanr")),
              "val_rsum", "val_images")


def write_run_log(path: Path) -> int:
    """A 20-epoch retrieval run's ``log.jsonl`` with the trainer's keys and random values; returns its records."""
    rng = np.random.default_rng(0)
    records = []
    for epoch in range(1, EPOCHS + 1):
        for step in range((epoch - 1) * STEPS_PER_EPOCH + 1, epoch * STEPS_PER_EPOCH + 1):
            records.append({"step": step, "epoch": epoch, **dict(zip(STEP_KEYS, rng.random(len(STEP_KEYS)).tolist()))})
        records.append({"step": epoch * STEPS_PER_EPOCH, "epoch": epoch,
                        **dict(zip(EPOCH_KEYS, rng.random(len(EPOCH_KEYS)).tolist()))})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return len(records)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The options (``argv``, default the command line), ``out`` resolved."""
    parser = options(__doc__)
    parser.add_argument("--data", type=Path, default=runs_root() / "f8k_feats")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batches", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    return parse_with_out(parser, "loop_overheads", naming=["threads"], argv=argv)


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    cfg = load_config(RetrievalTrainConfig, CONFIG, [f"data.path={args.data}"])
    train, val = attach_token_features([open_split(args.data, cfg.data.train_split),
                                        open_split(args.data, cfg.data.val_split)], args.data, cfg.model.text_model)
    tokenizer = build_tokenizer(cfg.model, cfg.data.max_caption_tokens, None)
    model = USERModel(cfg.model, cfg.loss, vocab_size=tokenizer.vocab_size)
    model.fit_region_reduction(region_rows(train.subset(np.arange(PCA_IMAGES))))
    reduction = model.image_encoder.reduction
    train = project_regions(train, reduction)

    dataset, collate = CaptionPairs(train, tokenizer), Collate(tokenizer.pad_id)
    batches = epoch_batches(len(dataset), cfg.optim.batch_size, cfg.run.seed, 0, args.batches)
    for indices in batches:  # the tokenizer keeps each caption's ids, as after a first epoch
        dataset.__getitems__(indices)
    data_s = []
    for indices in batches:
        began = time.perf_counter()
        collate(dataset.__getitems__(indices))
        data_s.append(time.perf_counter() - began)

    def validation(split) -> None:
        img, txt = encode_split(model, split, tokenizer, None, torch.device("cpu"))
        evaluate_embeddings(img, txt, split.caption_image, protocols=("all",))

    projected = project_regions(val, reduction)
    log = args.out / "log.jsonl"
    records = write_run_log(log)
    figures = {
        "batch_data_ms": 1000 * statistics.median(data_s),
        "validation_projected_s": statistics.median(repeat_seconds(lambda: validation(projected), args.repeats)),
        "validation_raw_cells_s": statistics.median(repeat_seconds(lambda: validation(val), args.repeats)),
        "curves_drawing_s": statistics.median(repeat_seconds(lambda: plot_curves(log, args.out / "curves.png"),
                                                             args.repeats)),
        "log_records": records,
    }
    write_figures(args.out, "loop_overheads", args, figures, show=render)


def render(record: dict) -> str:
    """The block of docs/results.md: the command and each figure."""
    f = record["figures"]
    return f"{command_lines(record)}\n\n" + table(["outside the step", "time"], [
        ["a batch's data (items and collation)", f"{f['batch_data_ms']:.2f} ms"],
        ["a validation, cells projected beforehand", f"{f['validation_projected_s']:.2f} s"],
        ["a validation, raw cells projected batch by batch", f"{f['validation_raw_cells_s']:.2f} s"],
        [f"a curves drawing ({f['log_records']} log records)", f"{f['curves_drawing_s']:.2f} s"]])


if __name__ == "__main__":
    main()
