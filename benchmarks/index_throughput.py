"""Indexing throughput from raw image files per runtime, beside the image path's FLOP floor, and the size of an
index per million images.

    python benchmarks/index_throughput.py [--model flickr8k] [--runtimes torch onnx onnx-int8] [--images 500]
        [--workers 0 1] [--threads 2] [--out DIR]

``--images`` real Flickr8K val photos (224 x 224 JPEGs) are copied into a folder and indexed with ``build_index``
(the ``xmcl index`` path) by ``--model`` (default: the shipped Flickr8K model: EfficientNet-Lite0 ImageNet grid
features at 224 px -> 7 x 7 x 1280 cells -> PCA, SGE, GPO, 256-d), exported once with ``--onnx --quantize int8``,
once per runtime and ``--workers`` setting (image decoding processes), each into a fresh index, without captions.
Prints images/s of the encoding pass beside the floor the image path's FLOPs set (GFLOP per image, from
``torch.utils.flop_counter``, over the rate of a 1024^3 float32 GEMM on ``--threads`` threads measured in the same
run), then the index's bytes per image on disk (float16 shards, SQLite store, FAISS index) scaled to a million
images; the FAISS part at a million is ``choose_index``'s estimate for that size (the index kind changes with the
size). Target: >= 60 images/s.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from figures import parse_with_out, write_figures
from query_latency import RUNTIMES, gemm_gflops
from timing import gflop

from xmcl.retrieval.export import export_model_dir
from xmcl.retrieval.index.build import IndexOptions, build_index
from xmcl.retrieval.index.vectors import choose_index, index_bytes
from xmcl.retrieval.retriever import Retriever

ROOT = Path(__file__).resolve().parents[1]
FLICKR = ROOT.parent / "shared" / "data" / "flickr8k"


def folder_bytes(folder: Path, pattern: str) -> int:
    return sum(p.stat().st_size for p in folder.glob(pattern))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="flickr8k", help="a checkpoint, model directory or shipped model's name")
    parser.add_argument("--runtimes", nargs="+", choices=RUNTIMES, default=list(RUNTIMES))
    parser.add_argument("--images", type=int, default=500)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    return parse_with_out(parser, "index_throughput", naming=("model", "images"), argv=argv)


def image_gflop(retriever: Retriever, photo: Path) -> float:
    """GFLOP of encoding one photo by the torch model (backbone and image tower)."""
    item = retriever.prepare(photo)
    return gflop(lambda: retriever.encode_prepared({key: value[None] for key, value in item.items()}))


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    names = [im["filename"] for im in json.loads((FLICKR / "dataset_flickr8k.json").read_text())["images"]
             if im["split"] == "val"][: args.images]
    model_dir = export_model_dir(args.model, args.out / "model", overwrite=True, onnx=True, quantize=True)
    rate = gemm_gflops()
    with tempfile.TemporaryDirectory() as tmp:
        photos = Path(tmp) / "photos"
        photos.mkdir()
        for name in names:
            shutil.copy(FLICKR / "images" / name, photos / name)
        cost = image_gflop(Retriever.load(model_dir, "cpu"), photos / names[0])
        floor = rate / cost
        print(f"{len(names)} Flickr8K val photos, {os.cpu_count()} cores, {args.threads} threads, batch "
              f"{args.batch_size}; model {args.model}; {cost:.3f} GFLOP per image, GEMM {rate:.1f} GFLOP/s on "
              f"{args.threads} threads: FLOP floor {floor:.0f} images/s")
        rates = []
        for runtime in args.runtimes:
            retriever = Retriever.load(model_dir, "cpu", runtime=runtime, threads=args.threads)
            for workers in args.workers:
                out = Path(tmp) / f"index_{runtime}_w{workers}"
                report = build_index(retriever, photos, out, options=IndexOptions(
                    batch_size=args.batch_size, num_workers=workers, progress=False))
                rates.append({"runtime": runtime, "workers": workers, "images_per_second": report["images_per_second"],
                              "encode_seconds": report["encode_seconds"]})
                print(f"  {runtime}, {workers} decoding workers: {report['images_per_second']:.1f} images/s "
                      f"({report['images']} images in {report['encode_seconds']:.1f} s; "
                      f"{report['images_per_second'] / floor:.2f} of the FLOP floor)")
        n, dim = report["images"], retriever.dim
        shards = folder_bytes(out / "shards", "*.npy") / n
        store = folder_bytes(out, "items.sqlite*") / n
        plan = choose_index(1_000_000, dim)
        faiss_bytes = index_bytes(plan, 1_000_000, dim)
        print(f"per image on disk: shards {shards:.0f} B (float16 x {dim}), SQLite store {store:.0f} B, "
              f"FAISS {report['indexes']['images']['bytes'] / n:.0f} B ({report['indexes']['images']['factory']})")
        total = (shards + store) * 1_000_000 + faiss_bytes
        print(f"per million images: shards {shards * 1e6 / 2**30:.2f} GiB + store {store * 1e6 / 2**30:.2f} GiB + "
              f"FAISS {plan.factory(dim)} {faiss_bytes / 2**30:.2f} GiB (estimate) = {total / 2**30:.2f} GiB")
    write_figures(args.out, "index_throughput", args, {
        "images": n, "dim": dim, "rates": rates, "gflop_per_image": cost, "gemm_gflops": rate,
        "flop_floor_images_per_second": floor, "shard_bytes_per_image": shards, "store_bytes_per_image": store,
        "million": {"factory": plan.factory(dim), "faiss_bytes": faiss_bytes, "total_bytes": total}}, argv=argv)


if __name__ == "__main__":
    main()
