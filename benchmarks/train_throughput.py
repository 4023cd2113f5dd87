"""Training-step throughput of USER against the VSE++ and InfoNCE baselines, each as the project configures it.

The models are the variants ``vsepp``, ``infonce`` and ``user`` of ``benchmarks/retrieval_quality.py`` (the same
overrides) on the same shapes: region features -> projection -> GPO, a text encoder, ``--embed-dim``. The baselines
have neither SGE nor momentum encoders and queues (VSE++: hinge, hardest negative; InfoNCE: symmetric, learnable
temperature); USER adds SGE on the image regions, the key encoders' forward passes, the queue terms (UTO, id
mask), the momentum update and the enqueue. One step = forward, backward, gradient clipping, AdamW step, momentum
update (a no-op without queues), on random batches; the losses are timed past their warm-up epochs. The three
models take turns step by step (``--warmup`` untimed rounds, then ``--steps`` timed ones) and each figure is the
median of its steps, so that other work on shared cores weighs on all three alike.

  python benchmarks/train_throughput.py                       # BiGRU text encoder, 36 x 2048 regions
  python benchmarks/train_throughput.py --text-encoder bert   # the installed MiniLM
Last lines: USER's step time over each baseline's (target <= 1.6x); figures in OUT/figures.json.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from figures import parse_with_out, write_figures
from retrieval_quality import VARIANTS
from timing import gflop

from xmcl.config import load_config
from xmcl.retrieval.config import RetrievalTrainConfig
from xmcl.retrieval.model import USERModel
from xmcl.runtime.device import resolve_device

MEASURED = {"vsepp": "VSE++ baseline (hinge)", "infonce": "InfoNCE baseline", "user": "USER (SGE, queues, UTO)"}


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
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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


def main() -> None:
    args = parse_args()
    device = resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)

    shared = [f"model.embed_dim={args.embed_dim}", "model.image_input=regions", f"model.region_dim={args.region_dim}",
              f"model.text_encoder={args.text_encoder}", "model.word_dim=300", "model.pooling=gpo",
              f"model.queue_size={args.queue_size}"]
    vocab = 30522 if args.text_encoder == "bert" else 10000
    configs = {name: load_config(RetrievalTrainConfig, None, shared + VARIANTS[name]) for name in MEASURED}
    batches = [make_batch(args.batch_size, args.regions, args.region_dim, args.tokens, vocab, device, s)
               for s in range(4)]
    print(f"device {device}, threads {torch.get_num_threads()}, batch {args.batch_size}, "
          f"{args.regions} x {args.region_dim} regions, {args.tokens} tokens, text {args.text_encoder}, "
          f"queue {args.queue_size}")
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
                          "ms_per_step_all": [1000 * t for t in times[name]], "overrides": VARIANTS[name],
                          "gflop_per_step": flops[name]}
        print(f"{label:32s} {args.batch_size / seconds:9.1f} samples/s  ({1000 * seconds:.0f} ms/step, median; "
              f"{flops[name]:.1f} GFLOP)")
    ratios = {base: measured["user"]["ms_per_step"] / measured[base]["ms_per_step"] for base in ("vsepp", "infonce")}
    flop_ratios = {base: flops["user"] / flops[base] for base in ("vsepp", "infonce")}
    for base, ratio in ratios.items():
        print(f"USER step time / {MEASURED[base]} step time = {ratio:.2f}x (target <= 1.6x; "
              f"FLOP ratio {flop_ratios[base]:.2f}x)")
    write_figures(args.out, "train_throughput", args, {"device": str(device), "models": measured,
                                                       "user_over": ratios, "user_over_flops": flop_ratios},
                  config={"models": {name: {"model": cfg.model, "loss": cfg.loss} for name, cfg in configs.items()}})


if __name__ == "__main__":
    main()
