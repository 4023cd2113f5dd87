"""Search latency: exact search against the index ``xmcl index`` chooses, then end to end over HTTP.

    python benchmarks/search_latency.py [--n 1000000] [--dims 1024 256] [--queries 1000] [--http] [--out DIR]

Vectors: ``--n`` clustered synthetic unit vectors per dimension (``--clusters`` centres, unit Gaussian noise of
scale ``--spread`` around each, then L2-normalised), generated from ``--seed``; queries are fresh draws from the same
distribution. For exact search (``IndexFlatIP``) and for the index ``choose_index`` picks at that size under
``--memory-budget``: build time (training included), memory (serialised size), recall@10 against exact on the
queries, single-query latency p50/p95/p99 on one thread, and batched throughput (all ``--queries`` at once, every
thread). Targets: the chosen index's p95 <= 5 ms at recall@10 >= 0.95.

``--http`` (1024-d only): the chosen index is written as an xmcl index folder (a SQLite store of ``--n`` items)
for an untrained model of ``configs/flickr8k_user.yaml`` (MiniLM text tower: the cost does not depend on the
weights), ``xmcl serve`` runs it on 127.0.0.1, and Flickr8K val captions are sent as ``POST /search`` text queries
(encode -> search -> JSON): one client (``--http-queries`` sequential requests), then ``--clients`` concurrent
clients; p50/p95 and queries/s. Target: one-client p95 <= 25 ms. The same queries are first timed in process
(text encoding alone, then encode + search + metadata) to show the model's share.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import faiss
import numpy as np
from figures import parse_with_out, write_figures
from untrained import untrained_checkpoint

from xmcl.retrieval.index import vectors
from xmcl.retrieval.index.build import INDEX_FORMAT, MANIFEST, REPORT
from xmcl.retrieval.index.store import MetadataStore
from xmcl.retrieval.model_dir import file_sha256
from xmcl.runtime.files import atomic_save_npy, atomic_write_json

ROOT = Path(__file__).resolve().parents[1]


def clustered(n: int, dim: int, clusters: int, spread: float, seed: int, draw: int = 0) -> np.ndarray:
    """``n`` unit vectors around ``clusters`` random centres (drawn from ``seed``); ``draw`` seeds the points, so
    another ``draw`` gives fresh points of the same distribution (float32, generated in blocks)."""
    centres = np.random.default_rng(seed).standard_normal((clusters, dim), dtype=np.float32)
    rng = np.random.default_rng([seed, draw])
    out = np.empty((n, dim), np.float32)
    for start in range(0, n, 100_000):
        rows = min(100_000, n - start)
        block = centres[rng.integers(0, clusters, rows)] + spread * rng.standard_normal((rows, dim), dtype=np.float32)
        out[start: start + rows] = block / np.linalg.norm(block, axis=1, keepdims=True)
    return out


def quantiles_ms(seconds: list[float]) -> dict[str, float]:
    """p50, p95 and p99 of ``seconds``, in milliseconds."""
    ms = np.array(seconds) * 1000
    return {f"p{q}": float(np.percentile(ms, q)) for q in (50, 95, 99)}


def spelt(quantiles: dict[str, float]) -> str:
    return ", ".join(f"{name} {value:.2f} ms" for name, value in quantiles.items())


def single_query_latency(index: faiss.Index, queries: np.ndarray, k: int = 10) -> list[float]:
    vectors.set_search_threads(1)
    index.search(queries[:1], k)
    times = []
    for q in queries:
        began = time.perf_counter()
        index.search(q[None], k)
        times.append(time.perf_counter() - began)
    return times


def batched_qps(index: faiss.Index, queries: np.ndarray, k: int = 10) -> float:
    vectors.set_search_threads(os.cpu_count() or 1)
    began = time.perf_counter()
    index.search(queries, k)
    return len(queries) / (time.perf_counter() - began)


def recall(found: np.ndarray, truth: np.ndarray, k: int = 10) -> float:
    return float(np.mean([len(set(f[:k]) & set(t[:k])) / k for f, t in zip(found, truth)]))


def write_index_folder(folder: Path, index: faiss.Index, report: dict, model: Path, sha256: str, dim: int) -> None:
    """An xmcl index folder around an already built vector index of the model at ``model`` (identity ``sha256``):
    manifest, a store of ``ntotal`` items, the index."""
    folder.mkdir(parents=True)
    atomic_write_json(folder / MANIFEST, {"format": INDEX_FORMAT, "checkpoint": str(model),
                                          "checkpoint_sha256": sha256, "dim": dim, "root": str(folder / "images")})
    store = MetadataStore(folder)
    n = index.ntotal
    store.ingest({"kind": "images", "file": "synthetic.npy", "failures": [],
                  "rows": [{"path": f"synthetic/{i:08d}.jpg", "size": 0, "mtime_ns": 0, "caption": f"vector {i}"}
                           for i in range(n)]})
    store.close()
    vectors.save_index(index, folder / "images.faiss")
    atomic_save_npy(folder / "images.ids.npy", np.arange(1, n + 1, dtype=np.int64))
    atomic_write_json(folder / REPORT, {"indexes": {"images": report, "captions": {"count": 0}}})


def in_process(folder: Path, texts: list[str], queries: int) -> dict[str, dict[str, float]]:
    """The same text queries through ``Searcher`` in this process (one torch and FAISS thread): encode alone, and
    encode + search + metadata, to tell the model's share of the HTTP latency from the server's."""
    import torch

    from xmcl.retrieval.index.search import Searcher

    torch.set_num_threads(1)
    vectors.set_search_threads(1)
    searcher = Searcher.open(folder, device="cpu")
    for text in texts[:20]:
        searcher.search(text=text, k=10)
    encode, whole = [], []
    for i in range(queries):
        text = texts[i % len(texts)]
        began = time.perf_counter()
        searcher.retriever.encode_texts([text])
        encode.append(time.perf_counter() - began)
        began = time.perf_counter()
        searcher.search(text=text, k=10)
        whole.append(time.perf_counter() - began)
    figures = {"encode_ms": quantiles_ms(encode), "encode_search_metadata_ms": quantiles_ms(whole)}
    print(f"  in process, {queries} text queries: encode alone {spelt(figures['encode_ms'])}; encode + search + "
          f"metadata {spelt(figures['encode_search_metadata_ms'])}")
    return figures


def start_serve(folder: Path, *options: str) -> tuple[subprocess.Popen, str]:
    """``xmcl serve FOLDER --device cpu OPTIONS`` on a free port of 127.0.0.1, once its /healthz answers (at most
    600 s): the process and its address."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "xmcl", "serve", str(folder), "--port", str(port),
                               "--device", "cpu", *options], env={**os.environ, "PYTHONPATH": str(ROOT / "src")},
                              stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(url + "/healthz", timeout=2).read()
            return server, url
        except OSError:
            time.sleep(0.5)
    server.kill()
    raise SystemExit("xmcl serve did not start within 600 s")


def http_benchmark(folder: Path, texts: list[str], queries: int, clients: int, runtime: str = "torch"
                   ) -> dict[str, dict]:
    """``xmcl serve --runtime RUNTIME`` on 127.0.0.1 over ``folder``: one client's ``queries`` sequential text
    queries, then ``clients`` concurrent clients; latency quantiles (ms) and queries/s of each."""
    server, url = start_serve(folder, "--runtime", runtime)
    try:
        def ask(text: str) -> float:
            body = json.dumps({"text": text, "k": 10}).encode()
            request = urllib.request.Request(url + "/search", body, {"Content-Type": "application/json"})
            began = time.perf_counter()
            with urllib.request.urlopen(request, timeout=60) as response:
                json.loads(response.read())
            return time.perf_counter() - began

        for text in texts[:20]:
            ask(text)  # warm-up
        one = [ask(texts[i % len(texts)]) for i in range(queries)]
        figures = {"one_client": {"queries": len(one), **quantiles_ms(one), "qps": len(one) / sum(one)}}
        print(f"  HTTP, one client, {queries} text queries (encode -> search -> JSON): {spelt(quantiles_ms(one))}, "
              f"{figures['one_client']['qps']:.1f} queries/s")
        times: list[float] = []
        lock = threading.Lock()

        def client(offset: int) -> None:
            for i in range(queries // clients):
                took = ask(texts[(offset + i) % len(texts)])
                with lock:
                    times.append(took)

        began = time.perf_counter()
        threads = [threading.Thread(target=client, args=(c * 97,)) for c in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - began
        figures["concurrent"] = {"clients": clients, "queries": len(times), **quantiles_ms(times),
                                 "qps": len(times) / wall}
        print(f"  HTTP, {clients} concurrent clients, {len(times)} queries: {spelt(quantiles_ms(times))}, "
              f"{figures['concurrent']['qps']:.1f} queries/s")
        return figures
    finally:
        server.terminate()
        server.wait(timeout=30)


def flickr_captions(limit: int = 5000) -> list[str]:
    path = ROOT.parent / "shared" / "data" / "flickr8k" / "dataset_flickr8k.json"
    data = json.loads(path.read_text())
    return [s["raw"] for im in data["images"] if im["split"] == "val" for s in im["sentences"]][:limit]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--dims", type=int, nargs="+", default=[1024, 256])
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--exact-queries", type=int, default=50, help="single queries timed on the exact index")
    parser.add_argument("--clusters", type=int, default=1000)
    parser.add_argument("--spread", type=float, default=0.3)
    parser.add_argument("--memory-budget", default="12G")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--http", action="store_true")
    parser.add_argument("--http-queries", type=int, default=300)
    parser.add_argument("--clients", type=int, default=4)
    return parse_with_out(parser, "search_latency", naming=("n", "dims"), argv=argv)


def measure_dimension(args: argparse.Namespace, dim: int, budget: int) -> dict:
    """Exact search and the chosen index over ``args.n`` clustered vectors of ``dim``; HTTP too when asked."""
    print(f"\n== {args.n:,} x {dim} clustered unit vectors ({args.clusters} clusters, spread {args.spread})")
    began = time.perf_counter()
    data = clustered(args.n, dim, args.clusters, args.spread, args.seed)
    queries = clustered(args.queries, dim, args.clusters, args.spread, args.seed, draw=1)
    print(f"  generated in {time.perf_counter() - began:.1f} s")

    began = time.perf_counter()
    exact = vectors.build(data, vectors.IndexPlan("exact"))
    exact_build = time.perf_counter() - began
    vectors.set_search_threads(os.cpu_count() or 1)
    began = time.perf_counter()
    truth = exact.search(queries, 10)[1]
    truth_seconds = time.perf_counter() - began
    lat = single_query_latency(exact, queries[: args.exact_queries])
    result: dict = {"n": args.n, "dim": dim, "exact": {
        "build_seconds": exact_build, "bytes": data.nbytes, "recall_at_10": 1.0, "queries": len(lat),
        "one_thread_ms": quantiles_ms(lat), "batched_qps": len(queries) / truth_seconds}}
    print(f"  exact (Flat): build {exact_build:.1f} s, memory {data.nbytes / 2**30:.2f} GiB, recall@10 1.000, "
          f"one thread {spelt(quantiles_ms(lat))}, batched {result['exact']['batched_qps']:.0f} queries/s")
    del exact

    plan = vectors.choose_index(args.n, dim, budget)
    vectors.set_search_threads(os.cpu_count() or 1)  # the build trains on every thread (the timing above set one)
    index, report = vectors.build_and_tune(data, plan, target=0.95, sample=500, seed=args.seed)
    tuning = report["tuning"]
    vectors.set_search_threads(os.cpu_count() or 1)
    found = index.search(queries, 10)[1]
    lat = single_query_latency(index, queries)
    chosen = result["chosen"] = {
        "factory": report["factory"], "tuning": tuning, "build_seconds": report["build_seconds"],
        "bytes": report["bytes"], "bytes_per_million": report["bytes_per_million"],
        "recall_at_10": recall(found, truth), "queries": len(lat), "one_thread_ms": quantiles_ms(lat),
        "batched_qps": batched_qps(index, queries)}
    print(f"  chosen {report['factory']} ({tuning['parameter']}={tuning['value']}, tuned on 500 held-out "
          f"vectors to recall {tuning['recall']:.3f}): build {report['build_seconds']:.1f} s, memory "
          f"{report['bytes'] / 2**30:.2f} GiB ({report['bytes_per_million'] / 2**30:.2f} GiB per million), "
          f"recall@10 on {len(queries)} fresh queries {chosen['recall_at_10']:.3f}, one thread "
          f"{spelt(chosen['one_thread_ms'])}, batched {chosen['batched_qps']:.0f} queries/s")
    del data
    if args.http and dim == 1024:
        with tempfile.TemporaryDirectory() as tmp:
            checkpoint = untrained_checkpoint("flickr8k_user", Path(tmp) / "untrained.pt")
            began = time.perf_counter()
            write_index_folder(Path(tmp) / "index", index, report, checkpoint, file_sha256(checkpoint), dim)
            del index
            print(f"  index folder with {args.n:,} items written in {time.perf_counter() - began:.1f} s")
            result["in_process"] = in_process(Path(tmp) / "index", flickr_captions(), args.http_queries)
            result["http"] = http_benchmark(Path(tmp) / "index", flickr_captions(), args.http_queries, args.clients)
    return result


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    budget = vectors.parse_size(args.memory_budget)
    print(f"{os.cpu_count()} CPU cores, faiss {faiss.__version__}, n = {args.n:,} vectors per dimension")
    results = [measure_dimension(args, dim, budget) for dim in args.dims]
    write_figures(args.out, "search_latency", args, {"dims": results}, config={"faiss": faiss.__version__},
                  argv=argv)


if __name__ == "__main__":
    main()
