"""Data-parallel scaling on CPU: training samples/s of 1 process x 2 threads against 2 processes x 1 thread (gloo on
127.0.0.1) for the same global batch, with 1 process x 1 thread as the reference, and where the 2-process step's
time goes.

    python benchmarks/scaling.py [--batch-size 128] [--steps 12] [--warmup 3] [--out runs/bench/scaling/default]

The model is USER as ``configs/shapes_user.yaml`` configures it (SGE, GPO, BiGRU, momentum encoders, queues, UTO) on
random batches shaped like the shapes world's cached features (4 x 4 grids of 1280-d, captions of ``--tokens``
tokens); 2 ranks take the two halves of each global batch, gather the embeddings and keys (with gradient where the
loss needs it) and train under DistributedDataParallel, which averages the gradients bucket by bucket during the
backward, as ``xmcl train`` under torchrun does. One step = forward, backward (with the all-reduce), clipping,
AdamW, momentum update. Every mode runs in fresh spawned processes, one mode after another; each figure is the
median over the timed steps (rank 0's: the ranks wait for each other at every collective). Measured per step: the
backward, and on 2 ranks the same all-reduce alone right after a barrier (transfer only). Per mode, rank 0's CPU
seconds per wall second of a step (at most its thread count): below that, its threads waited for a core or for
each other. Prints the block of docs/results.md: samples/s of each mode, the ratio 2x1 / 1x2, the backward and the
all-reduce, the CPU shares.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from figures import command_lines, conditions, options, parse_with_out, table, write_figures
from timing import free_port
from train_throughput import make_batch

from xmcl.config import load_config
from xmcl.retrieval.config import RetrievalTrainConfig
from xmcl.retrieval.model import USERModel
from xmcl.runtime.distributed import SINGLE_PROCESS, close_world, data_parallel, init_world

REGIONS, VOCAB = 16, 200  # the shapes world: 4 x 4 grid features; a small vocabulary
MODES = {"1x1": (1, 1), "1x2": (1, 2), "2x1": (2, 1)}  # processes x threads each
MODE_LABELS = {"1x1": "1 process × 1 thread", "1x2": "1 process × 2 threads", "2x1": "2 processes × 1 thread"}


def _rank(rank: int, size: int, threads: int, port: int, args: argparse.Namespace, out: str) -> None:
    """One rank's timed steps, written to ``out/rank{rank}.json``."""
    torch.set_num_threads(threads)
    world = SINGLE_PROCESS
    if size > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(size), RANK=str(rank),
                          LOCAL_RANK=str(rank))
        world = init_world(torch.device("cpu"), timeout_s=120)
    try:
        cfg = load_config(RetrievalTrainConfig, "shapes_user", [])
        torch.manual_seed(0)
        model = USERModel(cfg.model, cfg.loss, VOCAB).train()
        model.set_world(world)
        optimizer = torch.optim.AdamW(model.parameter_groups(cfg.optim.lr), fused=True)
        params = [p for group in optimizer.param_groups for p in group["params"]]
        train_step = data_parallel(model, world, torch.device("cpu"))  # as xmcl train under torchrun
        share = args.batch_size // size
        batches = [{k: v[rank * share: (rank + 1) * share] for k, v in
                    make_batch(args.batch_size, REGIONS, cfg.model.region_dim, args.tokens, VOCAB,
                               torch.device("cpu"), seed).items()} for seed in range(4)]
        steps, backward, alone, cpu = [], [], [], []
        for i in range(args.warmup + args.steps):
            began, cpu_began = time.perf_counter(), time.process_time()
            loss = train_step(batches[i % len(batches)])["loss"]
            optimizer.zero_grad(set_to_none=True)
            backward_began = time.perf_counter()
            loss.backward()  # on 2 ranks, DDP's all-reduce runs bucket by bucket inside it
            backward_ended = time.perf_counter()
            torch.nn.utils.clip_grad_norm_(params, cfg.optim.grad_clip)
            optimizer.step()
            model.momentum_step()
            ended, cpu_ended = time.perf_counter(), time.process_time()
            if world.distributed:  # the same all-reduce with both ranks already there: the transfer alone
                flat = torch.cat([p.grad.reshape(-1) for p in params if p.grad is not None])
                dist.barrier()
                tic = time.perf_counter()
                dist.all_reduce(flat)
                alone.append(time.perf_counter() - tic)
            if i >= args.warmup:
                steps.append(ended - began)
                backward.append(backward_ended - backward_began)
                cpu.append((cpu_ended - cpu_began) / (ended - began))
        gradient_floats = sum(p.numel() for p in params if p.requires_grad)
        (Path(out) / f"rank{rank}.json").write_text(json.dumps({
            "step_s": steps, "backward_s": backward, "allreduce_alone_s": alone[args.warmup:], "cpu_per_wall": cpu,
            "gradient_floats": gradient_floats}))
    finally:
        close_world(world)


def run_mode(size: int, threads: int, args: argparse.Namespace) -> dict:
    """``size`` spawned processes of ``threads`` threads each; rank 0's figures (medians, in ms)."""
    with tempfile.TemporaryDirectory() as out:
        mp.start_processes(_rank, args=(size, threads, free_port(), args, out), nprocs=size, join=True,
                           start_method="spawn")
        result = json.loads((Path(out) / "rank0.json").read_text())
    step = statistics.median(result["step_s"])
    figures = {"processes": size, "threads_each": threads, "samples_per_s": args.batch_size / step,
               "ms_per_step": 1000 * step, "ms_per_step_all": [1000 * t for t in result["step_s"]],
               "gradient_mb": result["gradient_floats"] * 4 / 2 ** 20,
               "cpu_per_wall": statistics.median(result["cpu_per_wall"]),
               "backward_ms": 1000 * statistics.median(result["backward_s"])}
    if size > 1:
        figures["allreduce_alone_ms"] = 1000 * statistics.median(result["allreduce_alone_s"])
    return figures


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The options (``argv``, default the command line), ``out`` resolved."""
    parser = options(__doc__)
    parser.add_argument("--batch-size", type=int, default=128, help="the global batch (2 ranks: half each)")
    parser.add_argument("--tokens", type=int, default=12)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=3)
    return parse_with_out(parser, "scaling", argv=argv)


def render(d: dict) -> str:
    """The block of docs/results.md: each mode's throughput and CPU share, the ratio, where a 2-process step goes."""
    f = d["figures"]
    modes = f["modes"]
    rows = [[label, f"{modes[name]['samples_per_s']:.1f}", f"{modes[name]['ms_per_step']:.0f}",
             f"{modes[name]['cpu_per_wall']:.2f} of {modes[name]['threads_each']}"
             if "cpu_per_wall" in modes[name] else "not measured"] for name, label in MODE_LABELS.items()]
    two = modes["2x1"]
    return (f"{command_lines(d)}\n\nUSER of `configs/shapes_user.yaml` on random batches shaped like the shapes "
            f"features, global batch {d['config']['batch_size']}; 2 processes: gloo on 127.0.0.1, half the batch "
            f"each.\n\n" + table(["mode", "samples/s", "ms/step (median)", "CPU s per wall s (rank 0)"], rows)
            + f"\n\n2 processes × 1 thread / 1 process × 2 threads: **{f['ratio_2x1_over_1x2']:.2f}x**. Of a "
            f"2-process step of {two['ms_per_step']:.0f} ms, the backward takes {two['backward_ms']:.0f} ms (1 process "
            f"× 1 thread on the whole batch: {modes['1x1']['backward_ms']:.0f} ms); DistributedDataParallel averages "
            f"the gradients ({two['gradient_mb']:.1f} MB) inside it, bucket by bucket; the same all-reduce alone "
            f"after a barrier takes {two['allreduce_alone_ms']:.1f} ms.")


def summary(d: dict) -> str:
    """README's line."""
    f = d["figures"]
    modes = f["modes"]
    return (f"- `{d['command']}`: for one global batch, 2 processes × 1 thread train "
            f"{modes['2x1']['samples_per_s']:.1f} samples/s, 1 process × 2 threads {modes['1x2']['samples_per_s']:.1f} "
            f"({f['ratio_2x1_over_1x2']:.2f}x), 1 × 1 {modes['1x1']['samples_per_s']:.1f}; DDP's gradient all-reduce "
            f"alone is {modes['2x1']['allreduce_alone_ms']:.0f} ms of a {modes['2x1']['ms_per_step']:.0f} ms step "
            f"({conditions(d)}).")


def main() -> None:
    args = parse_args()
    modes = {name: run_mode(size, threads, args) for name, (size, threads) in MODES.items()}
    two = modes["2x1"]
    write_figures(args.out, "scaling", args, {
        "modes": modes, "ratio_2x1_over_1x2": two["samples_per_s"] / modes["1x2"]["samples_per_s"],
        "load_average_end": os.getloadavg()[0]}, show=render)


if __name__ == "__main__":
    main()
