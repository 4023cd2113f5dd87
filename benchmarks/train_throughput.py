"""Training-step throughput of USER against the VSE++ and InfoNCE baselines, each as the project configures it.

The models are the shipped variants ``vsepp``, ``infonce`` and ``user`` (``configs/variants/``, as
``benchmarks/retrieval_quality.py`` trains them) on the same shapes: region features -> projection -> GPO, a text
encoder, ``--embed-dim``. The baselines have neither SGE nor momentum encoders and queues (VSE++: hinge, hardest
negative; InfoNCE: symmetric, learnable temperature); USER adds SGE on the image regions, the key encoders' forward
passes, the queue terms (UTO, id mask), the momentum update and the enqueue. One step = forward, backward, gradient
clipping, AdamW step, momentum update (a no-op without queues), on random batches; the losses are timed past their
warm-up epochs. The three models take turns step by step (``--warmup`` untimed rounds, then ``--steps`` timed ones)
and each figure is the median of its steps, so that other work on shared cores weighs on all three alike.

  python benchmarks/train_throughput.py                       # BiGRU text encoder, 36 x 2048 regions
  python benchmarks/train_throughput.py --text-encoder bert   # the installed MiniLM
Figures in OUT/figures.json; prints their block of docs/results.md (USER's step time over each baseline's: target
<= 1.6x).

  python benchmarks/train_throughput.py --locked              # the locked-text Flickr8K regime, against the hardware
``--locked``: the variants of the shipped model's regime (``configs/flickr8k_locked.yaml``: 128 images of 7 x 7 cells
through the frozen 256-d PCA, cached 384-d MiniLM token states): USER, USER with tolerant queues
(``flickr8k_locked_tolerant``), InfoNCE (``variants/infonce`` over it) and USER with its towers compiled
(``run.compile: true``; its untimed warm-up steps compile). For each: the median step on 2 threads
and on 1, the FLOP bound (its GFLOP over the GEMM rate on the same threads, the best of its measurements before
and after each variant) and the step's ratio to it, the 2-thread over 1-thread speed-up, and the throughput beside
one busy-looping process (the threads chosen as ``run.threads: 0`` does, with the command line's OpenMP spin) over
the idle 2-thread throughput. Targets: USER's step <= 2x its bound; 2 threads >= 1.7x one; beside a busy process
>= 0.45x of idle.
"""

from __future__ import annotations

import os

os.environ.setdefault("GOMP_SPINCOUNT", "3000")  # as the command line sets it, before torch loads OpenMP

import argparse  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from figures import command_lines, conditions, options, parse_with_out, table, write_figures  # noqa: E402
from retrieval_quality import variant_config  # noqa: E402
from timing import gemm_gflops, gflop  # noqa: E402

from xmcl.config import load_config  # noqa: E402
from xmcl.retrieval.config import RetrievalTrainConfig  # noqa: E402
from xmcl.retrieval.model import USERModel  # noqa: E402
from xmcl.runtime.allocator import keep_freed_memory  # noqa: E402
from xmcl.runtime.device import resolve_device  # noqa: E402
from xmcl.runtime.threads import ThreadBudget  # noqa: E402

MEASURED = {"vsepp": "VSE++ baseline (hinge)", "infonce": "InfoNCE baseline", "user": "USER (SGE, queues, UTO)"}
LOCKED = {"user": ("flickr8k_locked", None, "USER", []),  # name: (config, variant over it, label, overrides)
          "user_tolerant": ("flickr8k_locked_tolerant", None, "USER, tolerant queues", []),
          "infonce": ("flickr8k_locked", "infonce", "InfoNCE", []),
          "user_compiled": ("flickr8k_locked", None, "USER, towers compiled (`run.compile`)", ["run.compile=true"])}
CELLS, TOKENS = 49, 14  # a 7 x 7 grid; a caption's cached token states
TEXT_ENCODERS = {"bigru": "BiGRU", "bert": "MiniLM"}


def make_batch(batch: int, regions: int, region_dim: int, tokens: int, vocab: int, device: torch.device,
               seed: int) -> dict[str, torch.Tensor]:
    """Random region features and token ids; 5 captions per image as in the real corpora."""
    g = torch.Generator().manual_seed(seed)
    return {
        "regions": torch.randn(batch, regions, region_dim, generator=g).abs().to(device),
        "region_lengths": torch.full((batch,), regions, dtype=torch.long, device=device),
        "tokens": torch.randint(5, vocab, (batch, tokens), generator=g).to(device),
        "token_lengths": torch.randint(tokens // 2, tokens + 1, (batch,), generator=g).to(device),
        "image_ids": (torch.arange(batch) // 5 + seed * batch).to(device),
    }


class Stepper:
    """One model's training step: forward, backward, gradient clipping, AdamW step, momentum update."""

    def __init__(self, model: USERModel) -> None:
        self.model = model.train()
        self.optimizer = torch.optim.AdamW(model.parameter_groups(2e-4), fused=True)  # as the trainer
        self.params = [p for group in self.optimizer.param_groups for p in group["params"]]

    def __call__(self, batch: dict) -> None:
        loss = self.model(batch)["loss"]
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 2.0)
        self.optimizer.step()
        self.model.momentum_step()


def step_seconds(steppers: dict[str, Stepper], batches: list[dict], steps: int, warmup: int,
                 device: torch.device) -> dict[str, list[float]]:
    """Seconds of each model's timed steps, the models taking turns step by step (round-robin), so that a change in
    what else runs on shared cores falls on every model alike; ``warmup`` untimed rounds first."""
    times: dict[str, list[float]] = {name: [] for name in steppers}
    for i in range(warmup + steps):
        for name, step in steppers.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
            tic = time.perf_counter()
            step(batches[i % len(batches)])
            if device.type == "cuda":
                torch.cuda.synchronize()
            if i >= warmup:
                times[name].append(time.perf_counter() - tic)
    return times


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The options (``argv``, default the command line), ``out`` resolved."""
    parser = options(__doc__)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--regions", type=int, default=36)
    parser.add_argument("--region-dim", type=int, default=2048)
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--embed-dim", type=int, default=1024)
    parser.add_argument("--queue-size", type=int, default=4096)
    parser.add_argument("--text-encoder", choices=["bigru", "bert"], default="bigru")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    parser.add_argument("--locked", action="store_true", help="the locked-text regime against the hardware")
    return parse_with_out(parser, "train_throughput", naming=["text_encoder", "locked"], argv=argv)


def render(*datas: dict) -> str:
    """The block of docs/results.md: samples/s and ms/step of each model per text encoder (one row per figures file),
    USER's step time over each baseline's."""
    rows = []
    for d in datas:
        models = d["figures"]["models"]
        cells = [f"{m['samples_per_s']:.1f} samples/s ({m['ms_per_step']:.0f} ms/step)" for m in models.values()]
        ratios = d["figures"]["user_over"]
        rows.append([TEXT_ENCODERS[d["config"]["text_encoder"]], *cells, f"{ratios['vsepp']:.2f}x",
                     f"{ratios['infonce']:.2f}x"])
    c = datas[0]["config"]
    labels = [m["label"] for m in datas[0]["figures"]["models"].values()]
    return (f"{command_lines(*datas)}\n\nBatch {c['batch_size']}, {c['regions']} × {c['region_dim']} regions, "
            f"queue {c['queue_size']}, embed {c['embed_dim']}. Each model is its `retrieval_quality.py` variant: "
            f"the baselines without SGE or queues, USER with SGE, momentum encoders, queues and UTO. Target: USER "
            f"step time ≤ 1.6x the baseline's.\n\n"
            f"{table(['text encoder', *labels, 'USER / VSE++', 'USER / InfoNCE'], rows)}")


def summary(bigru: dict, bert: dict) -> str:
    """README's line: USER's step time over each baseline's, with each text encoder."""
    r = [d["figures"]["user_over"] for d in (bigru, bert)]
    return (f"- `python benchmarks/train_throughput.py [--text-encoder bert]`: a USER step (SGE, momentum encoders, "
            f"queues, UTO) takes {r[0]['vsepp']:.2f}x the VSE++ baseline's step (no SGE, no queues) with BiGRU, "
            f"{r[1]['vsepp']:.2f}x with MiniLM ({r[0]['infonce']:.2f}x and {r[1]['infonce']:.2f}x InfoNCE's; "
            f"{conditions(bigru)}).")


def render_flickr8k(two: dict, one: dict) -> str:
    """The fine-tuned regime on Flickr8K's shapes: step times on 2 threads and 1, their FLOP counts and ratios."""
    rows = []
    for d in (two, one):
        models = d["figures"]["models"]
        rows.append([str(d["machine"]["torch_threads"]),
                     *(f"{m['ms_per_step']:.0f} ms ({m['gflop_per_step']:.0f} GFLOP)" for m in models.values()),
                     f"{d['figures']['user_over']['infonce']:.2f}x", f"{d['figures']['user_over_flops']['infonce']:.2f}x"])
    speedups = ", ".join(f"{m['label']} {one['figures']['models'][k]['ms_per_step'] / m['ms_per_step']:.2f}x"
                         for k, m in two["figures"]["models"].items())
    labels = [m["label"] for m in two["figures"]["models"].values()]
    c = two["config"]
    return (f"{command_lines(two, one)}\n\nBatch {c['batch_size']}, {c['regions']} × {c['region_dim']} cells, MiniLM "
            f"fine-tuned, queue {c['queue_size']}, embed {c['embed_dim']}; each model as its `retrieval_quality.py` "
            f"variant (median step; GFLOP of one forward and backward, `torch.utils.flop_counter`). Target: USER ≤ 1.6x "
            f"InfoNCE.\n\n"
            + table(["threads", *labels, "USER / InfoNCE", "FLOP ratio"], rows)
            + f"\n\n2 threads over 1 (speed-up): {speedups}.")


def locked_config(name: str) -> RetrievalTrainConfig:
    """The config of a ``LOCKED`` variant."""
    base, variant, _, overrides = LOCKED[name]
    return (load_config(RetrievalTrainConfig, base, overrides) if variant is None
            else variant_config(base, variant, overrides))


def locked_batch(cfg: RetrievalTrainConfig, seed: int) -> dict[str, torch.Tensor]:
    """A random batch shaped as the trainer hands it over: cells already through the PCA, cached token states."""
    g = torch.Generator().manual_seed(seed)
    batch = cfg.optim.batch_size
    return {"regions": torch.randn(batch, CELLS, cfg.model.region_pca_dim, generator=g),
            "region_lengths": torch.full((batch,), CELLS),
            "token_features": torch.randn(batch, TOKENS, cfg.model.text_feature_dim, generator=g),
            "token_lengths": torch.randint(TOKENS // 2, TOKENS + 1, (batch,), generator=g),
            "image_ids": torch.arange(batch) // 5 + seed * batch}


def flickr8k_pairs(cfg: RetrievalTrainConfig, data: Path, images: int = 1000):
    """The trainer's dataset and collation over the first ``images`` training images of the Flickr8K features in
    ``data`` (``runs/f8k_feats``): cells through a PCA fitted on those images, cached token states; returns
    ``(CaptionPairs, Collate)``."""
    from xmcl.data.batches import CaptionPairs, Collate
    from xmcl.data.open import open_split
    from xmcl.retrieval.inference import build_tokenizer
    from xmcl.retrieval.token_features import attach_token_features
    from xmcl.training.retrieval_trainer import project_regions, region_rows

    train, = attach_token_features([open_split(data, cfg.data.train_split)], data, cfg.model.text_model)
    train = train.subset(np.arange(min(images, train.num_images)))
    model = USERModel(cfg.model, cfg.loss)
    model.fit_region_reduction(region_rows(train))
    tokenizer = build_tokenizer(cfg.model, cfg.data.max_caption_tokens, None)
    return CaptionPairs(project_regions(train, model.image_encoder.reduction), tokenizer), Collate(tokenizer.pad_id)


def flickr8k_batches(cfg: RetrievalTrainConfig, data: Path, count: int, images: int = 1000) -> list[dict]:
    """The first ``count`` batches of an epoch over ``flickr8k_pairs``, as the trainer's loader hands them over: each
    padded to its longest caption (about twice the mean length)."""
    from xmcl.training.retrieval_trainer import epoch_batches

    dataset, collate = flickr8k_pairs(cfg, data, images)
    return [collate(dataset.__getitems__(indices))
            for indices in epoch_batches(len(dataset), cfg.optim.batch_size, cfg.run.seed, 0, count)]


def busy_loop(seconds: float) -> subprocess.Popen:
    """Another process that keeps one core busy for at most ``seconds``."""
    spin = f"import time\nend = time.time() + {seconds}\nwhile time.time() < end: pass"
    return subprocess.Popen([sys.executable, "-c", spin])


def measure_locked(args: argparse.Namespace) -> None:
    """Each ``LOCKED`` variant's step on 2 threads and 1, against its FLOP bound, and beside a busy process."""
    steppers, batches, flops = {}, {}, {}
    for name in LOCKED:
        cfg = locked_config(name)
        torch.manual_seed(0)
        model = USERModel(cfg.model, cfg.loss)
        model.fit_region_reduction(iter([torch.randn(4096, cfg.model.region_dim)]))
        batches[name] = [locked_batch(cfg, seed) for seed in range(4)]
        flops[name] = gflop(lambda: model(batches[name][0])["loss"].backward())
        if cfg.run.compile:  # as the trainer does; the warm-up steps compile
            model.compile_towers()
        steppers[name] = Stepper(model)
    medians, rates = {}, {}
    for threads in (2, 1):
        torch.set_num_threads(threads)
        rate_samples, medians[threads] = [gemm_gflops()], {}
        for name, stepper in steppers.items():
            medians[threads][name] = statistics.median(step_seconds({name: stepper}, batches[name], args.steps,
                                                                    args.warmup, torch.device("cpu"))[name])
            rate_samples.append(gemm_gflops())
        rates[threads] = max(rate_samples)  # the hardware's rate: shared cores only ever lower a measurement
    spinner = busy_loop(600)
    try:
        time.sleep(0.5)
        budget = ThreadBudget(0)
        busy_threads = budget.threads
        busy = {name: statistics.median(step_seconds({name: stepper}, batches[name], args.steps, args.warmup,
                                                     torch.device("cpu"))[name])
                for name, stepper in steppers.items()}
    finally:
        spinner.kill()
        spinner.wait()
    variants = {}
    for name, (_, _, label, _) in LOCKED.items():
        bound = flops[name] / rates[2]
        variants[name] = {"label": label, "gflop_per_step": flops[name], "ms_2_threads": 1000 * medians[2][name],
                          "ms_1_thread": 1000 * medians[1][name], "bound_ms": 1000 * bound,
                          "step_over_bound": medians[2][name] / bound,
                          "speedup_2_over_1": medians[1][name] / medians[2][name],
                          "ms_beside_busy": 1000 * busy[name], "busy_over_idle": medians[2][name] / busy[name]}
    write_figures(args.out, "train_throughput", args, {
        "variants": variants, "gemm_gflops": rates, "threads_beside_busy": busy_threads},
        config={name: {"model": locked_config(name).model, "loss": locked_config(name).loss} for name in LOCKED},
        show=render_locked)


def render_locked(d: dict) -> str:
    """The locked-text regime's block: each variant's step against the hardware."""
    f = d["figures"]
    rows = [[v["label"], f"{v['ms_2_threads']:.0f}", f"{v['bound_ms']:.0f} ({v['gflop_per_step']:.1f} GFLOP)",
             f"**{v['step_over_bound']:.2f}x**", f"{v['ms_1_thread']:.0f}", f"{v['speedup_2_over_1']:.2f}x",
             f"{v['ms_beside_busy']:.0f}", f"{v['busy_over_idle']:.2f}x"] for v in f["variants"].values()]
    rates = f["gemm_gflops"]
    return (f"{command_lines(d)}\n\nMedian ms per step of 128 pairs; the bound is the step's GFLOP at the GEMM rate "
            f"of the same 2 threads ({rates['2']:.0f} GFLOP/s; 1 thread: {rates['1']:.0f}); beside one busy-looping "
            f"process the run took {f['threads_beside_busy']} thread(s), as `run.threads: 0` chooses. Targets: "
            f"USER ≤ 2x its bound, 2 threads ≥ 1.7x one, beside a busy process ≥ 0.45x of idle.\n\n"
            + table(["variant", "ms, 2 threads", "bound ms", "step / bound", "ms, 1 thread", "2 / 1 threads",
                     "ms beside a busy process", "busy / idle"], rows))


def main() -> None:
    args = parse_args()
    keep_freed_memory()  # as every training loop does (start_run)
    if args.locked:
        measure_locked(args)
        return
    device = resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)

    shared = [f"model.embed_dim={args.embed_dim}", "model.image_input=regions", f"model.region_dim={args.region_dim}",
              f"model.text_encoder={args.text_encoder}", "model.word_dim=300", "model.pooling=gpo",
              f"model.queue_size={args.queue_size}"]
    vocab = 30522 if args.text_encoder == "bert" else 10000
    configs = {name: variant_config(None, name, shared) for name in MEASURED}
    batches = [make_batch(args.batch_size, args.regions, args.region_dim, args.tokens, vocab, device, s)
               for s in range(4)]
    steppers = {}
    for name in MEASURED:
        torch.manual_seed(0)
        model = USERModel(configs[name].model, configs[name].loss, vocab).to(device)
        model.set_epoch(max(configs[name].loss.warmup_epochs, configs[name].loss.uto_warmup_epochs))
        steppers[name] = Stepper(model)
    flops = {name: gflop(lambda: step.model(batches[0])["loss"].backward()) for name, step in steppers.items()}
    times = step_seconds(steppers, batches, args.steps, args.warmup, device)
    measured = {}
    for name, label in MEASURED.items():
        seconds = statistics.median(times[name])
        measured[name] = {"label": label, "samples_per_s": args.batch_size / seconds, "ms_per_step": 1000 * seconds,
                          "ms_per_step_all": [1000 * t for t in times[name]],
                          "gflop_per_step": flops[name]}
    ratios = {base: measured["user"]["ms_per_step"] / measured[base]["ms_per_step"] for base in ("vsepp", "infonce")}
    flop_ratios = {base: flops["user"] / flops[base] for base in ("vsepp", "infonce")}
    write_figures(args.out, "train_throughput", args, {"device": str(device), "models": measured,
                                                       "user_over": ratios, "user_over_flops": flop_ratios},
                  config={"models": {name: {"model": cfg.model, "loss": cfg.loss} for name, cfg in configs.items()}},
                  show=render)


if __name__ == "__main__":
    main()
