"""Query latency of a trained model per runtime: in-process text encoding beside its compute floor, the quality each
runtime keeps, and HTTP over a million-vector index.

    python benchmarks/query_latency.py [--model flickr8k] [--data runs/f8k_feats] [--queries 500] [--n 1000000]

The model (default: the shipped Flickr8K model) is exported once with ``--onnx --quantize int8`` into the output
folder; then, for each runtime (torch float32, ONNX Runtime float32, ONNX Runtime dynamic int8):

- **encode**: ``--queries`` Flickr8K val captions, one at a time, raw text to unit embedding
  (``Retriever.encode_texts``: tokenising, the frozen text model, the trained tower) on one thread; p50 / p95.
- **compute floor** (measured in the same run): the text path's GFLOP for the median-length caption
  (``torch.utils.flop_counter``) over the rate of a 1024^3 float32 GEMM on one thread.
- **quality**: val rSum of the model on ``--data`` under that runtime (``xmcl evaluate --runtime``); torch reads the
  cached float16 token states, the ONNX graphs the captions' token ids.
- **HTTP**: ``xmcl serve --runtime`` over an index of ``--n`` clustered unit vectors at the model's width (the
  index ``xmcl index`` chooses, tuned to recall@10 0.95), one client (``--http-queries`` sequential text queries),
  then ``--clients`` concurrent clients; p50 / p95.

Targets: ONNX Runtime float32 >= 2.5x faster than torch and <= 8 ms p50; int8 <= 5 ms; HTTP one-client p95 <= 15 ms
with the fastest runtime whose val rSum loss is <= 0.5.
"""

from __future__ import annotations

import argparse
import itertools
import os
import tempfile
from pathlib import Path

import torch
from figures import command_lines, conditions, f2, options, parse_with_out, table, write_figures
from search_latency import clustered, flickr_captions, http_benchmark, write_index_folder
from timing import gemm_gflops, gflop, quantiles_ms, repeat_seconds

from xmcl.data.text import collate_tokens
from xmcl.retrieval.export import export_model_dir
from xmcl.retrieval.index import vectors
from xmcl.retrieval.inference import evaluate_checkpoint
from xmcl.retrieval.retriever import Retriever

RUNTIMES = ("torch", "onnx", "onnx-int8")


def text_gflop(retriever: Retriever, caption: str) -> float:
    """GFLOP of encoding one caption by the torch model (frozen text model and tower)."""
    ids, lengths = collate_tokens([retriever.tokenizer.encode(caption)], retriever.tokenizer.pad_id)
    return gflop(lambda: retriever.model.encode_texts(ids, lengths))


def encode_latency(retriever: Retriever, captions: list[str], queries: int) -> dict[str, float]:
    """p50 / p95 / p99 ms of encoding ``queries`` captions one at a time, in turn (after 20 untimed)."""
    for caption in captions[:20]:
        retriever.encode_texts([caption])
    turn = itertools.cycle(captions)
    return quantiles_ms(repeat_seconds(lambda: retriever.encode_texts([next(turn)]), queries))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = options(__doc__)
    parser.add_argument("--model", default="flickr8k", help="a checkpoint, model directory or shipped model's name")
    parser.add_argument("--data", type=Path, default=Path("runs/f8k_feats"),
                        help="the features folder the model's val rSum is measured on (skipped when absent)")
    parser.add_argument("--queries", type=int, default=500)
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--clusters", type=int, default=1000)
    parser.add_argument("--spread", type=float, default=0.3)
    parser.add_argument("--http-queries", type=int, default=300)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    return parse_with_out(parser, "query_latency", naming=("model",), argv=argv)


def render(d: dict) -> str:
    """The block of docs/results.md: per runtime, encoding latency, speed-up, val rSum and HTTP latency."""
    f = d["figures"]
    rsum = f.get("val_rsum") or {}
    torch_p50 = f["encode_p50_ms"]["torch"]
    rows = []
    for runtime, encode in f["encode_ms"].items():
        http = f["http"][runtime]
        quality = f"{rsum[runtime]:.2f}" if runtime in rsum else "-"
        change = f"{rsum[runtime] - rsum['torch']:+.2f}" if runtime in rsum and "torch" in rsum else "-"
        rows.append([runtime, f2(encode["p50"]), f2(encode["p95"]), f2(torch_p50 / encode["p50"]), quality, change,
                     f2(http["one_client"]["p50"]), f2(http["one_client"]["p95"]),
                     f2(http["concurrent"]["p50"]), f2(http["concurrent"]["p95"])])
    clients = next(iter(f["http"].values()))["concurrent"]["clients"]
    return (f"{command_lines(d)}\n\nModel `{d['config']['model']}`; text queries are Flickr8K val captions, raw text "
            f"to unit embedding on one thread. The text path costs {f['text_gflop']:.3f} GFLOP for the median caption: "
            f"at {f['gemm_gflops']:.1f} GFLOP/s (a 1024^3 GEMM on one thread) its compute floor is "
            f"**{f['compute_floor_ms']:.2f} ms**. HTTP: `xmcl serve --runtime` over {f['index']['n']:,} "
            f"{f['index']['dim']}-d vectors ({f['index']['factory']}).\n\n"
            + table(["runtime", "encode p50 ms", "p95", "x torch", "val rSum", "vs torch", "HTTP 1 client p50",
                     "p95", f"{clients} clients p50", "p95"], rows))


def summary(d: dict) -> str:
    """README's line."""
    f = d["figures"]
    parts = [f"{runtime} {p50:.1f} ms" for runtime, p50 in f["encode_p50_ms"].items()]
    http = ", ".join(f"{runtime} {p95:.1f} ms" for runtime, p95 in f["http_p95_ms"].items())
    return (f"- `{d['command']}` ({conditions(d)}): query encoding p50 {', '.join(parts)} (compute floor "
            f"{f['compute_floor_ms']:.1f} ms); HTTP one-client p95 {http} over {f['index']['n']:,} vectors.")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(1)
    captions = flickr_captions()
    model_dir = export_model_dir(args.model, args.out / "model", overwrite=True, onnx=True, quantize=True)
    rate = gemm_gflops()
    median_caption = sorted(captions[:1000], key=len)[500]
    retrievers = {runtime: Retriever.load(model_dir, "cpu", runtime=runtime, threads=1) for runtime in RUNTIMES}
    cost = text_gflop(retrievers["torch"], median_caption)
    floor_ms = cost / rate * 1000
    encode, rsum = {}, {}
    for runtime, retriever in retrievers.items():
        encode[runtime] = encode_latency(retriever, captions, args.queries)
        if args.data.is_dir():
            rsum[runtime] = evaluate_checkpoint(model_dir, args.data, "val", ["all"], device="cpu",
                                                runtime=runtime)["all"].rsum
    dim = retrievers["torch"].dim
    data = clustered(args.n, dim, args.clusters, args.spread, args.seed)
    plan = vectors.choose_index(args.n, dim)
    vectors.set_search_threads(os.cpu_count() or 1)
    index, report = vectors.build_and_tune(data, plan, target=0.95, sample=500, seed=args.seed)
    del data
    http = {}
    with tempfile.TemporaryDirectory() as tmp:
        write_index_folder(Path(tmp) / "index", index, report, model_dir, retrievers["torch"].sha256, dim)
        del index
        for runtime in RUNTIMES:
            http[runtime] = http_benchmark(Path(tmp) / "index", captions, args.http_queries, args.clients, runtime)
    write_figures(args.out, "query_latency", args, {
        "gemm_gflops": rate, "text_gflop": cost, "compute_floor_ms": floor_ms,
        "encode_ms": encode, "encode_p50_ms": {r: q["p50"] for r, q in encode.items()},
        "val_rsum": rsum, "http": http, "http_p95_ms": {r: h["one_client"]["p95"] for r, h in http.items()},
        "index": {"n": args.n, "dim": dim, "factory": report["factory"], "tuning": report["tuning"]}}, argv=argv,
        show=render)


if __name__ == "__main__":
    main()
