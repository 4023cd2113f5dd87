"""Speed of the retrieval protocol against the bare similarity GEMM and against the classic per-query argsort loop.

    python benchmarks/eval_speed.py [--images 5000] [--captions-per-image 5] [--dim 1024] [--seed 0] [--threads 0]
        [--out runs/bench/eval_speed/default]

Random unit embeddings (N images, 5N captions stored image by image, as COCO 5K). Measures, from one run:
(1) the GEMM ``img @ txt.T``; (2) the full protocol (``"all"`` + ``"fold5"``, GEMM included); (3) the ranking
alone ("all", GEMM excluded) of ``xmcl.metrics.retrieval`` and of the classic loop (``np.argsort(d)[::-1]`` per
image row and per caption row, then ``np.where(inds == i)[0][0]``, numpy's default sort as the classic code has it)
on the same similarity, and whether their ranks agree; writes them to OUT/figures.json and prints its block of
docs/results.md.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from figures import command_lines, conditions, options, parse_with_out, table, write_figures

from xmcl.metrics.retrieval import RECALL_KS, Ranks, evaluate_embeddings, retrieval_ranks


def classic_ranks(sim: np.ndarray, caption_image: np.ndarray) -> tuple[Ranks, float]:
    """The classic ``i2t``/``t2i`` loops: one full argsort per query, then the position of the ground truth.

    Returns the ranks and the seconds the loops took.

    ``sim_t`` (captions x images) stands for the classic code's per-caption product ``captions @ images.T``.
    """
    captions_of = [np.flatnonzero(caption_image == n) for n in range(sim.shape[0])]
    sim_t = np.ascontiguousarray(sim.T)
    start = time.perf_counter()
    i2t = np.zeros(sim.shape[0], dtype=np.int64)
    for index in range(sim.shape[0]):
        inds = np.argsort(sim[index])[::-1]
        i2t[index] = min(np.where(inds == i)[0][0] for i in captions_of[index])
    t2i = np.zeros(sim.shape[1], dtype=np.int64)
    for index in range(sim.shape[1]):
        inds = np.argsort(sim_t[index])[::-1]
        t2i[index] = np.where(inds == caption_image[index])[0][0]
    return Ranks(i2t=i2t, t2i=t2i), time.perf_counter() - start


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The options (``argv``, default the command line), ``out`` resolved."""
    parser = options(__doc__)
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--captions-per-image", type=int, default=5)
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    return parse_with_out(parser, "eval_speed", argv=argv)


def render(d: dict) -> str:
    """The block of docs/results.md: the four timings, both ratios against their targets, the rankings' agreement."""
    f = d["figures"]
    rows = [["bare GEMM", f"{f['gemm_s']:.3f} s"],
            [f"full protocol ({' + '.join(f['protocols'])}, GEMM included)", f"{f['protocol_s']:.3f} s"],
            ["ranking alone, ours", f"{f['ranking_ours_s']:.3f} s"],
            ["ranking alone, classic per-query argsort loop", f"{f['ranking_classic_s']:.3f} s"]]
    same = "the same" if f["same_recalls"] else "different"
    return (f"{command_lines(d)}\n\n{f['num_images']:,} × {f['num_captions']:,} unit embeddings, dim "
            f"{d['config']['dim']}:\n\n{table(['what', 'time'], rows)}\n\n"
            f"- protocol / GEMM = **{f['protocol_over_gemm']:.2f}x** (target ≤ 1.5).\n"
            f"- loop / ours = **{f['classic_over_ours']:.1f}x** (target ≥ 20).\n"
            f"- The two rankings give {same} R@K; ranks differing: i2t {f['ranks_differing']['i2t']}, t2i "
            f"{f['ranks_differing']['t2i']} (only exact ties can differ, which numpy's unstable default sort orders "
            f"as it likes).")


def summary(d: dict) -> str:
    """README's line."""
    f = d["figures"]
    return (f"- `{d['command']}`: for {f['num_images']:,} × {f['num_captions']:,} similarities, the full protocol "
            f"takes {f['protocol_over_gemm']:.2f}x the bare GEMM, and ranking is {f['classic_over_ours']:.1f}x "
            f"faster than the classic per-query argsort loop ({conditions(d)}).")


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    generator = torch.Generator().manual_seed(args.seed)
    images = torch.nn.functional.normalize(torch.randn(args.images, args.dim, generator=generator), dim=1)
    num_captions = args.images * args.captions_per_image
    texts = torch.nn.functional.normalize(torch.randn(num_captions, args.dim, generator=generator), dim=1)
    caption_image = np.repeat(np.arange(args.images), args.captions_per_image)
    _ = images[:64] @ texts[:64].T  # load the BLAS kernels outside the timings

    start = time.perf_counter()
    sim = images @ texts.T
    gemm = time.perf_counter() - start
    protocols = ("all", "fold5") if args.images % 5 == 0 else ("all",)
    start = time.perf_counter()
    evaluate_embeddings(images, texts, caption_image, protocols)
    protocol = time.perf_counter() - start
    start = time.perf_counter()
    ours = retrieval_ranks(sim, caption_image)
    ours_seconds = time.perf_counter() - start
    classic, classic_seconds = classic_ranks(sim.numpy(), caption_image)

    ours_m, classic_m = ours.metrics(), classic.metrics()
    same = all(getattr(ours_m, f"{d}_r{k}") == getattr(classic_m, f"{d}_r{k}") for d in ("i2t", "t2i")
               for k in RECALL_KS)
    differing = {"i2t": int((ours.i2t != classic.i2t).sum()), "t2i": int((ours.t2i != classic.t2i).sum())}
    write_figures(args.out, "eval_speed", args, {
        "num_images": args.images, "num_captions": num_captions, "protocols": list(protocols),
        "gemm_s": gemm, "protocol_s": protocol, "ranking_ours_s": ours_seconds, "ranking_classic_s": classic_seconds,
        "protocol_over_gemm": protocol / gemm, "classic_over_ours": classic_seconds / ours_seconds,
        "same_recalls": same, "ranks_differing": differing}, show=render)


if __name__ == "__main__":
    main()
