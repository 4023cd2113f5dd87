"""The search service under load: mixed queries from several clients, and /healthz while huge uploads decode.

    python benchmarks/serve_load.py [--model flickr8k] [--images 300] [--clients 8] [--rounds 3] [--seconds 20]

``--images`` Flickr8K val photos (with their captions) are indexed by ``--model``; ``xmcl serve --runtime RUNTIME``
runs on 127.0.0.1 (a subprocess; nothing else is reached). Each of ``--rounds`` rounds runs ``--clients`` clients for
``--seconds`` seconds, each client sending, in turn, a text query (a val caption), an image upload (a val photo), an
item query and a thumbnail request; the round reports errors (any status but 200), p50 / p95 / p99 latency per kind,
requests/s, and the server's resident memory before and after. Then four 49-megapixel PNG uploads (solid colour, a
few hundred KB each) are sent at once while /healthz is polled every 50 ms: its p50 / p99 latency while they are
processed. Targets: 0 errors; /healthz p99 <= 100 ms during the huge uploads; no RSS growth between rounds; server
RSS <= 1 GB under load with one index.
"""

from __future__ import annotations

import argparse
import io
import json
import random
import shutil
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

from figures import command_lines, options, parse_with_out, table, write_figures
from PIL import Image
from search_latency import FLICKR, flickr_val, start_serve
from timing import quantiles_ms

HUGE_SIDE = 7000  # 49 megapixels


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def request(url: str, body: bytes | None = None, content_type: str | None = None, timeout: float = 120.0
            ) -> tuple[int, float]:
    """Status and seconds of one request (a connection failure counts as status 0)."""
    headers = {"Content-Type": content_type} if content_type else {}
    began = time.perf_counter()
    try:
        with urllib.request.urlopen(urllib.request.Request(url, body, headers), timeout=timeout) as response:
            response.read()
            status = response.status
    except urllib.error.HTTPError as error:
        status = error.code
    except OSError:
        status = 0
    return status, time.perf_counter() - began


def multipart(image: bytes) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    body = (f'--{boundary}\r\nContent-Disposition: form-data; name="k"\r\n\r\n10\r\n'
            f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="q.png"\r\n'
            f"Content-Type: image/png\r\n\r\n").encode() + image + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def load_round(url: str, clients: int, seconds: float, captions: list[str], photos: list[bytes], items: int,
               seed: int) -> dict:
    """``clients`` clients for ``seconds`` seconds of mixed requests; latency per kind, errors, requests/s."""
    times: dict[str, list[float]] = {"text": [], "image": [], "item": [], "thumb": []}
    errors: list[int] = []
    lock = threading.Lock()
    stop_at = time.monotonic() + seconds

    def client(number: int) -> None:
        rng = random.Random(seed * 1000 + number)
        kinds = ["text", "image", "item", "thumb"]
        turn = number
        while time.monotonic() < stop_at:
            kind = kinds[turn % len(kinds)]
            turn += 1
            if kind == "text":
                body = json.dumps({"text": rng.choice(captions), "k": 10}).encode()
                status, took = request(url + "/search", body, "application/json")
            elif kind == "image":
                status, took = request(url + "/search", *multipart(rng.choice(photos)))
            elif kind == "item":
                body = json.dumps({"item": rng.randint(1, items), "k": 10}).encode()
                status, took = request(url + "/search", body, "application/json")
            else:
                status, took = request(f"{url}/thumbs/{rng.randint(1, items)}?size=256")
            with lock:
                times[kind].append(took)
                if status != 200:
                    errors.append(status)

    began = time.perf_counter()
    threads = [threading.Thread(target=client, args=(n,)) for n in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - began
    total = sum(len(v) for v in times.values())
    return {"requests": total, "errors": len(errors), "error_statuses": sorted(set(errors)),
            "requests_per_second": total / wall, "latency_ms": {k: quantiles_ms(v) for k, v in times.items()}}


def health_during_huge_uploads(url: str, uploads: int = 4) -> dict:
    """/healthz latency, polled every 50 ms, while ``uploads`` 49-megapixel PNGs are searched at once."""
    buffer = io.BytesIO()
    Image.new("RGB", (HUGE_SIDE, HUGE_SIDE), (120, 90, 60)).save(buffer, format="PNG")
    png = buffer.getvalue()
    statuses: list[int] = []

    def upload() -> None:
        statuses.append(request(url + "/search", *multipart(png), timeout=300)[0])

    senders = [threading.Thread(target=upload) for _ in range(uploads)]
    for sender in senders:
        sender.start()
    polls: list[float] = []
    while any(sender.is_alive() for sender in senders):
        status, took = request(url + "/healthz", timeout=30)
        polls.append(took if status == 200 else float("inf"))
        time.sleep(0.05)
    for sender in senders:
        sender.join()
    return {"upload_bytes": len(png), "uploads": uploads, "upload_statuses": sorted(statuses), "polls": len(polls),
            "healthz_ms": quantiles_ms([p for p in polls if p != float("inf")]),
            "healthz_failures": sum(p == float("inf") for p in polls)}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = options(__doc__)
    parser.add_argument("--model", default="flickr8k", help="a checkpoint, model directory or shipped model's name")
    parser.add_argument("--runtime", default="torch", choices=["torch", "onnx", "onnx-int8"])
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    return parse_with_out(parser, "serve_load", naming=("model", "runtime"), argv=argv)


def render(d: dict) -> str:
    """The block of docs/results.md: each round's requests, errors and latency per kind, then /healthz during the
    huge uploads."""
    f, c = d["figures"], d["config"]
    rows = []
    for number, r in enumerate(f["rounds"], start=1):
        latency = r["latency_ms"]
        rows.append([str(number), f"{r['requests']:,}", str(r["errors"]), f"{r['requests_per_second']:.1f}",
                     *[f"{latency[kind]['p50']:.0f} / {latency[kind]['p99']:.0f}" for kind in
                       ("text", "image", "item", "thumb")],
                     f"{r['rss_before_mib']:.0f} → {r['rss_after_mib']:.0f}"])
    huge = f["huge_uploads"]
    return (f"{command_lines(d)}\n\n`xmcl serve` (model `{c['model']}`, runtime {c['runtime']}, {c['workers']} query "
            f"workers) over {c['images']} Flickr8K val photos and their captions; each round {c['clients']} clients "
            f"for {c['seconds']:.0f} s, each sending in turn a text query, an image upload, an item query and a "
            f"thumbnail request:\n\n"
            + table(["round", "requests", "errors", "requests/s", "text p50 / p99 ms", "image", "item", "thumb",
                     "server RSS MiB"], rows)
            + f"\n\n- While {huge['uploads']} uploads of a {HUGE_SIDE} x {HUGE_SIDE} (49-megapixel) PNG "
            f"({huge['upload_bytes'] / 1024:.0f} KB each; answered {huge['upload_statuses']}) were processed, /healthz "
            f"answered in p50 {huge['healthz_ms']['p50']:.1f} ms, p99 **{huge['healthz_ms']['p99']:.1f} ms** over "
            f"{huge['polls']} polls ({huge['healthz_failures']} failed); server RSS after them "
            f"{huge['rss_after_mib']:.0f} MiB.")


def main(argv: list[str] | None = None) -> None:
    from xmcl.retrieval.index.build import IndexOptions, build_index
    from xmcl.retrieval.retriever import Retriever

    args = parse_args(argv)
    val = flickr_val(args.images)
    captions = [s["raw"] for im in val for s in im["sentences"]]
    with tempfile.TemporaryDirectory() as tmp:
        photos_dir = Path(tmp) / "photos"
        photos_dir.mkdir()
        for im in val:
            shutil.copy(FLICKR / "images" / im["filename"], photos_dir / im["filename"])
        (Path(tmp) / "captions.tsv").write_text("".join(f"{im['filename']}\t{s['raw']}\n" for im in val
                                                       for s in im["sentences"]))
        runtime_model = args.model
        if args.runtime != "torch":
            from xmcl.retrieval.export import export_model_dir

            runtime_model = export_model_dir(args.model, Path(tmp) / "model", onnx=True,
                                             quantize=args.runtime == "onnx-int8")
        build_index(Retriever.load(runtime_model, "cpu", runtime=args.runtime), photos_dir, Path(tmp) / "index",
                    Path(tmp) / "captions.tsv", IndexOptions(progress=False))
        photos = [(photos_dir / im["filename"]).read_bytes() for im in val[:50]]
        server, url = start_serve(Path(tmp) / "index", "--runtime", args.runtime, "--workers", str(args.workers),
                                  "--max-upload-mb", "20")
        try:
            rounds = []
            for number in range(args.rounds):
                before = rss_mib(server.pid)
                result = load_round(url, args.clients, args.seconds, captions, photos, len(val), args.seed + number)
                result.update(rss_before_mib=before, rss_after_mib=rss_mib(server.pid))
                rounds.append(result)
            huge = health_during_huge_uploads(url)
            huge["rss_after_mib"] = rss_mib(server.pid)
        finally:
            server.terminate()
            server.wait(timeout=30)
    write_figures(args.out, "serve_load", args, {"rounds": rounds, "huge_uploads": huge}, argv=argv, show=render)


if __name__ == "__main__":
    main()
