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
import os
import tempfile
import time
from pathlib import Path

import torch
from figures import parse_with_out, write_figures
from search_latency import clustered, flickr_captions, http_benchmark, quantiles_ms, spelt, write_index_folder
from timing import gflop

from xmcl.data.text import collate_tokens
from xmcl.retrieval.export import export_model_dir
from xmcl.retrieval.index import vectors
from xmcl.retrieval.inference import evaluate_checkpoint
from xmcl.retrieval.retriever import Retriever

RUNTIMES = ("torch", "onnx", "onnx-int8")


def gemm_gflops(size: int = 1024, repeats: int = 5) -> float:
    """GFLOP/s of a ``size``^3 float32 matrix product on the current torch threads (best of ``repeats``)."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    best = min(_seconds(lambda: a @ b) for _ in range(repeats))
    return 2 * size ** 3 / best / 1e9


def _seconds(fn) -> float:
    began = time.perf_counter()
    fn()
    return time.perf_counter() - began


def text_gflop(retriever: Retriever, caption: str) -> float:
    """GFLOP of encoding one caption by the torch model (frozen text model and tower)."""
    ids, lengths = collate_tokens([retriever.tokenizer.encode(caption)], retriever.tokenizer.pad_id)
    return gflop(lambda: retriever.model.encode_texts(ids, lengths))


def encode_latency(retriever: Retriever, captions: list[str], queries: int) -> dict[str, float]:
    for caption in captions[:20]:
        retriever.encode_texts([caption])
    times = [_seconds(lambda: retriever.encode_texts([captions[i % len(captions)]])) for i in range(queries)]
    return quantiles_ms(times)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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
    print(f"{os.cpu_count()} cores, 1 thread; model {args.model}; one-thread GEMM {rate:.1f} GFLOP/s; the text path "
          f"costs {cost:.3f} GFLOP for a {len(median_caption)}-character caption: compute floor {floor_ms:.2f} ms")
    encode, rsum = {}, {}
    for runtime, retriever in retrievers.items():
        encode[runtime] = encode_latency(retriever, captions, args.queries)
        if args.data.is_dir():
            rsum[runtime] = evaluate_checkpoint(model_dir, args.data, "val", ["all"], device="cpu",
                                                runtime=runtime)["all"].rsum
        speed = encode["torch"]["p50"] / encode[runtime]["p50"]
        quality = f"; val rSum {rsum[runtime]:.2f}" if runtime in rsum else ""
        print(f"  {runtime}: encode {spelt(encode[runtime])} ({speed:.2f}x torch's p50){quality}")
    dim = retrievers["torch"].dim
    print(f"\n{args.n:,} x {dim} clustered unit vectors for the HTTP runs")
    data = clustered(args.n, dim, args.clusters, args.spread, args.seed)
    plan = vectors.choose_index(args.n, dim)
    vectors.set_search_threads(os.cpu_count() or 1)
    index, report = vectors.build_and_tune(data, plan, target=0.95, sample=500, seed=args.seed)
    del data
    print(f"  {report['factory']} tuned to recall@10 {report['tuning']['recall']:.3f}")
    http = {}
    with tempfile.TemporaryDirectory() as tmp:
        write_index_folder(Path(tmp) / "index", index, report, model_dir, retrievers["torch"].sha256, dim)
        del index
        for runtime in RUNTIMES:
            print(f"  runtime {runtime}:")
            http[runtime] = http_benchmark(Path(tmp) / "index", captions, args.http_queries, args.clients, runtime)
    write_figures(args.out, "query_latency", args, {
        "gemm_gflops": rate, "text_gflop": cost, "compute_floor_ms": floor_ms,
        "encode_ms": encode, "encode_p50_ms": {r: q["p50"] for r, q in encode.items()},
        "val_rsum": rsum, "http": http, "http_p95_ms": {r: h["one_client"]["p95"] for r, h in http.items()},
        "index": {"n": args.n, "dim": dim, "factory": report["factory"], "tuning": report["tuning"]}}, argv=argv)


if __name__ == "__main__":
    main()
