"""Training-step throughput of USER against the VSE++ and InfoNCE baselines, each as the project configures it.

The models are the shipped variants ``vsepp``, ``infonce`` and ``user`` (``configs/variants/``, as
``benchmarks/retrieval_quality.py`` trains them) on the same shapes: region features -> projection -> GPO, a text encoder, ``--embed-dim``. The baselines
have neither SGE nor momentum encoders and queues (VSE++: hinge, hardest negative; InfoNCE: symmetric, learnable
temperature); USER adds SGE on the image regions, the key encoders' forward passes, the queue terms (UTO, id
mask), the momentum update and the enqueue. One step = forward, backward, gradient clipping, AdamW step, momentum
update (a no-op without queues), on random batches; the losses are timed past their warm-up epochs. The three
models take turns step by step (``--warmup`` untimed rounds, then ``--steps`` timed ones) and each figure is the
median of its steps, so that other work on shared cores weighs on all three alike.

  python benchmarks/train_throughput.py                       # BiGRU text encoder, 36 x 2048 regions
  python benchmarks/train_throughput.py --text-encoder bert   # the installed MiniLM
Figures in OUT/figures.json; prints their block of docs/results.md (USER's step time over each baseline's: target
<= 1.6x).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from figures import command_lines, conditions, options, parse_with_out, table, write_figures
from retrieval_quality import variant_config
from timing import gflop

from xmcl.retrieval.model import USERModel
from xmcl.runtime.device import resolve_device

MEASURED = {"vsepp": "VSE++ baseline (hinge)", "infonce": "InfoNCE baseline", "user": "USER (SGE, queues, UTO)"}
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
        self.optimizer = torch.optim.AdamW(model.parameter_groups(2e-4))
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
    return parse_with_out(parser, "train_throughput", naming=["text_encoder"], argv=argv)


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


def main() -> None:
    args = parse_args()
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
