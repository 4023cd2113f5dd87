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
import shutil
import tempfile
from pathlib import Path

import torch
from figures import command_lines, conditions, f2, gib, options, parse_with_out, table, write_figures
from query_latency import RUNTIMES
from search_latency import FLICKR, flickr_val
from timing import gemm_gflops, gflop

from xmcl.retrieval.export import export_model_dir
from xmcl.retrieval.index.build import IndexOptions, build_index
from xmcl.retrieval.index.vectors import choose_index, index_bytes
from xmcl.retrieval.retriever import Retriever

def folder_bytes(folder: Path, pattern: str) -> int:
    return sum(p.stat().st_size for p in folder.glob(pattern))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = options(__doc__)
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


def render(d: dict) -> str:
    """The block of docs/results.md: images/s per runtime and workers against the FLOP floor, bytes on disk."""
    f = d["figures"]
    floor = f["flop_floor_images_per_second"]
    rows = [[r["runtime"], str(r["workers"]), f"{r['images_per_second']:.1f}", f2(r["images_per_second"] / floor)]
            for r in f["rates"]]
    million = f["million"]
    shards, store = f["shard_bytes_per_image"] * 1e6, f["store_bytes_per_image"] * 1e6
    return (f"{command_lines(d)}\n\n{f['images']} Flickr8K val photos through `build_index` (the `xmcl index` "
            f"path) with model `{d['config']['model']}` ({f['dim']}-d), {d['config']['threads']} threads, batch "
            f"{d['config']['batch_size']}. The image path costs {f['gflop_per_image']:.3f} GFLOP per image; at the "
            f"{f['gemm_gflops']:.1f} GFLOP/s of a 1024^3 GEMM on those threads, its FLOP floor is {floor:.0f} "
            f"images/s.\n\n" + table(["runtime", "decoding workers", "images/s", "of the floor"], rows)
            + f"\n\n- On disk per image: {f['shard_bytes_per_image']:,.0f} B of float16 shard, "
            f"{f['store_bytes_per_image']:,.0f} B of SQLite metadata; a million images take {gib(shards)} of shards "
            f"+ {gib(store)} of store + {gib(million['faiss_bytes'])} for the {million['factory']} index that size "
            f"gets (estimate) = {gib(million['total_bytes'])}.")


def summary(d: dict) -> str:
    """README's line."""
    f = d["figures"]
    best = max(f["rates"], key=lambda r: r["images_per_second"])
    return (f"- `{d['command']}`: {best['images_per_second']:.1f} images/s from raw 224-px photos ({best['runtime']}; "
            f"FLOP floor {f['flop_floor_images_per_second']:.0f}; {conditions(d)}); an index of a million "
            f"{f['dim']}-d images takes about {gib(f['million']['total_bytes'])} (float16 shards, SQLite, "
            f"{f['million']['factory']}).")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    names = [image["filename"] for image in flickr_val(args.images)]
    model_dir = export_model_dir(args.model, args.out / "model", overwrite=True, onnx=True, quantize=True)
    rate = gemm_gflops()
    with tempfile.TemporaryDirectory() as tmp:
        photos = Path(tmp) / "photos"
        photos.mkdir()
        for name in names:
            shutil.copy(FLICKR / "images" / name, photos / name)
        cost = image_gflop(Retriever.load(model_dir, "cpu"), photos / names[0])
        floor = rate / cost
        rates = []
        for runtime in args.runtimes:
            retriever = Retriever.load(model_dir, "cpu", runtime=runtime, threads=args.threads)
            for workers in args.workers:
                out = Path(tmp) / f"index_{runtime}_w{workers}"
                report = build_index(retriever, photos, out, options=IndexOptions(
                    batch_size=args.batch_size, num_workers=workers, progress=False))
                rates.append({"runtime": runtime, "workers": workers, "images_per_second": report["images_per_second"],
                              "encode_seconds": report["encode_seconds"]})
        n, dim = report["images"], retriever.dim
        shards = folder_bytes(out / "shards", "*.npy") / n
        store = folder_bytes(out, "items.sqlite*") / n
        plan = choose_index(1_000_000, dim)
        faiss_bytes = index_bytes(plan, 1_000_000, dim)
        total = (shards + store) * 1_000_000 + faiss_bytes
    write_figures(args.out, "index_throughput", args, {
        "images": n, "dim": dim, "rates": rates, "gflop_per_image": cost, "gemm_gflops": rate,
        "flop_floor_images_per_second": floor, "shard_bytes_per_image": shards, "store_bytes_per_image": store,
        "million": {"factory": plan.factory(dim), "faiss_bytes": faiss_bytes, "total_bytes": total}}, argv=argv,
        show=render)


if __name__ == "__main__":
    main()
