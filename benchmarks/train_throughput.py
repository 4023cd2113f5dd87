"""Training-step throughput of USER (momentum encoders + queues + UTO) against the VSE++ baseline.

Both use the same encoders (region features -> SGE -> projection -> GPO; a text encoder) and the same batch;
USER adds the key-encoder forward passes, the queue terms, the momentum update and the enqueue. One step =
forward, backward, gradient clipping, AdamW step (and, for USER, the momentum update).

  python benchmarks/train_throughput.py                       # BiGRU text encoder, 36 x 2048 regions
  python benchmarks/train_throughput.py --text-encoder bert   # the installed MiniLM
Last line: the overhead ratio (target <= 1.6x).
"""

from __future__ import annotations

import argparse
import time

import torch

from xmcl.retrieval.config import RetrievalLossConfig, RetrievalModelConfig
from xmcl.retrieval.model import USERModel
from xmcl.runtime.device import resolve_device


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


def steps_per_second(model: USERModel, batches: list[dict], steps: int, warmup: int, device: torch.device) -> float:
    optimizer = torch.optim.AdamW(model.parameter_groups(2e-4))
    params = [p for group in optimizer.param_groups for p in group["params"]]
    model.train()

    def step(batch: dict) -> None:
        loss = model(batch)["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 2.0)
        optimizer.step()
        model.momentum_step()

    for i in range(warmup):
        step(batches[i % len(batches)])
    if device.type == "cuda":
        torch.cuda.synchronize()
    tic = time.perf_counter()
    for i in range(steps):
        step(batches[i % len(batches)])
    if device.type == "cuda":
        torch.cuda.synchronize()
    return steps / (time.perf_counter() - tic)


def main() -> None:
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
    args = parser.parse_args()
    device = resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    shared = dict(embed_dim=args.embed_dim, image_input="regions", region_dim=args.region_dim,
                  text_encoder=args.text_encoder, word_dim=300, pooling="gpo", sge=True, queue_size=args.queue_size)
    vocab = 30522 if args.text_encoder == "bert" else 10000
    models = {
        "VSE++ baseline": USERModel(RetrievalModelConfig(**shared, use_queue=False),
                                    RetrievalLossConfig(name="hinge"), vocab),
        "USER (momentum + queues + UTO)": USERModel(RetrievalModelConfig(**shared, use_queue=True),
                                                    RetrievalLossConfig(name="uto"), vocab),
    }
    batches = [make_batch(args.batch_size, args.regions, args.region_dim, args.tokens, vocab, device, s)
               for s in range(4)]
    print(f"device {device}, threads {torch.get_num_threads()}, batch {args.batch_size}, "
          f"{args.regions} x {args.region_dim} regions, {args.tokens} tokens, text {args.text_encoder}, "
          f"queue {args.queue_size}")
    rates = {}
    for name, model in models.items():
        rate = steps_per_second(model.to(device), batches, args.steps, args.warmup, device)
        rates[name] = rate * args.batch_size
        print(f"{name:32s} {rates[name]:9.1f} samples/s  ({1000 / rate:.0f} ms/step)")
    base, user = rates.values()
    print(f"overhead: USER step time / baseline step time = {base / user:.2f}x (target <= 1.6x)")


if __name__ == "__main__":
    main()
