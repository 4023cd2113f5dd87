"""Inference cost per image of USER's image tower with CLIP-guided enhancement (cache hit, cache miss) vs without.

    python benchmarks/cge_inference.py --data runs/shapes --clip runs/clip_shapes [--images 128] [--image-size 96]
    python benchmarks/cge_inference.py --data ../shared/data/flickr8k --vit-b32 --image-size 224

The image tower is the one of ``configs/shapes_user.yaml`` on raw images (EfficientNet-Lite0 ImageNet backbone,
SGE, GPO, 256-d), timed from image file to embedding on ``--images`` images of ``--split``:

- without CGE: preprocessing + backbone + SGE + head + pooling;
- CGE, cache hit: the same with CGE, plus reading the images' CLIP embeddings from a cache (``ClipCache.lookup``);
- CGE, cache miss: the same with CGE, plus the CLIP teacher (its preprocessing and image tower) on every image.

``--vit-b32`` replaces ``--clip`` by a ViT-B/32-sized image tower (224 px, 12 x 768, patch 32) with random weights,
for the cost of a real CLIP miss without its weights. Each figure is the median of ``--repeats`` runs after a
warm-up, the three ways taken in turn (one run of each per round); ms per image at each ``--batch-sizes``;
``--threads`` torch threads (default 1). Figures in OUT/figures.json (OUT defaults to runs/bench/cge_inference/<data folder>[-h<hash of the other options>]).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import numpy as np
import torch
from figures import command_lines, options, parse_with_out, table, write_figures
from timing import interleaved_seconds

from xmcl.data.images import ImageTransform
from xmcl.data.open import open_split
from xmcl.retrieval.clip.cache import ClipCache, build_clip_cache
from xmcl.retrieval.clip.small import save_clip
from xmcl.retrieval.clip.teacher import load_clip_teacher
from xmcl.retrieval.clip.tokenizer import clip_vocabulary
from xmcl.retrieval.config import RetrievalLossConfig, RetrievalModelConfig
from xmcl.retrieval.model import USERModel


def random_vit_b32(out: Path) -> Path:
    """A CLIP directory with a ViT-B/32-sized image tower (random weights) and a minimal text tower."""
    from transformers import CLIPConfig, CLIPModel

    vocab = clip_vocabulary([])
    config = CLIPConfig(
        vision_config=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                           image_size=224, patch_size=32, hidden_act="quick_gelu"),
        text_config=dict(vocab_size=len(vocab), hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                         num_attention_heads=1, max_position_embeddings=77, bos_token_id=len(vocab) - 2,
                         eos_token_id=len(vocab) - 1, pad_token_id=0),
        projection_dim=512)
    return save_clip(CLIPModel(config), vocab, [], out)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The options (``argv``, default the command line), ``out`` resolved."""
    parser = options(__doc__)
    parser.add_argument("--data", type=Path, default=Path("runs/shapes"), help="corpus with raw images")
    parser.add_argument("--split", default="val")
    parser.add_argument("--clip", type=Path, default=Path("runs/clip_shapes"), help="CLIP checkpoint (teacher)")
    parser.add_argument("--vit-b32", action="store_true", help="time a random ViT-B/32-sized teacher instead")
    parser.add_argument("--images", type=int, default=128)
    parser.add_argument("--image-size", type=int, default=96, help="USER's input size")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    return parse_with_out(parser, "cge_inference", naming=["data"], argv=argv)


def render(d: dict) -> str:
    """The block of docs/results.md: ms per image without CGE, with a cache hit and with a miss, per batch size."""
    f = d["figures"]
    c = d["config"]
    rows = [[str(batch), *(f"{r[k]:.2f}" for k in ("without_ms", "hit_ms", "miss_ms")),
             f"{r['hit_over_without']:.2f}x", f"{r['miss_over_without']:.2f}x"]
            for batch, r in f["ms_per_image"].items()]
    return (f"{command_lines(d)}\n\n{f['num_images']} {f['split']} images of `{c['data']}`, USER at "
            f"{c['image_size']} px, teacher {f['teacher']} at {f['teacher_image_size']} px ({f['teacher_dim']}-d), "
            f"ms per image:\n\n"
            + table(["batch", "without CGE", "CGE, cache hit", "CGE, cache miss", "hit / without",
                     "miss / without"], rows))


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)

    split = open_split(args.data, args.split)
    split = split.subset(np.arange(min(args.images, split.num_images)))
    with tempfile.TemporaryDirectory() as tmp:
        clip_path = random_vit_b32(Path(tmp) / "vit_b32") if args.vit_b32 else args.clip
        teacher = load_clip_teacher(clip_path)
        cache_dir = Path(tmp) / "cache"
        build_clip_cache(clip_path, args.data, cache_dir, splits=(args.split,), device="cpu", progress=False)
        common = dict(embed_dim=256, image_input="images", backbone="efficientnet_lite0", backbone_weights="imagenet",
                      text_encoder="bigru", sge=True, clip_dim=teacher.dim, use_queue=False)
        torch.manual_seed(0)
        plain = USERModel(RetrievalModelConfig(**common), RetrievalLossConfig(), vocab_size=10).eval()
        torch.manual_seed(0)
        guided = USERModel(RetrievalModelConfig(**common, cge=True, clip_cache=str(cache_dir)), RetrievalLossConfig(),
                           vocab_size=10).eval()
        transform = ImageTransform(args.image_size, plain.image_encoder.backbone.normalization)
        paths = split.image_paths
        rows = {}
        for batch_size in args.batch_sizes:
            chunks = [slice(i, min(i + batch_size, len(paths))) for i in range(0, len(paths), batch_size)]

            def without() -> None:
                for rows in chunks:
                    plain.encode_images(torch.stack([transform(p) for p in paths[rows]]))

            def hit() -> None:
                guides = torch.from_numpy(ClipCache.open(cache_dir).lookup(split).image)
                for rows in chunks:
                    guided.encode_images(torch.stack([transform(p) for p in paths[rows]]), None, guides[rows])

            def miss() -> None:
                for rows in chunks:
                    clip = teacher.encode_images(paths[rows], batch_size)
                    guided.encode_images(torch.stack([transform(p) for p in paths[rows]]), None, clip)

            with torch.inference_mode():
                seconds = [statistics.median(t) for t in interleaved_seconds([without, hit, miss], args.repeats)]
            ms = [1000 * s / len(paths) for s in seconds]
            rows[batch_size] = {"without_ms": ms[0], "hit_ms": ms[1], "miss_ms": ms[2],
                                "hit_over_without": ms[1] / ms[0], "miss_over_without": ms[2] / ms[0]}

        write_figures(args.out, "cge_inference", args, {
            "num_images": split.num_images, "source": split.source, "split": args.split,
            "teacher": "random ViT-B/32" if args.vit_b32 else str(clip_path), "teacher_image_size": teacher.image_size,
            "teacher_dim": teacher.dim, "ms_per_image": rows}, show=render)


if __name__ == "__main__":
    main()
