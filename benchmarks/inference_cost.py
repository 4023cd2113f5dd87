"""USER's efficiency claim, reproduced in kind: scoring every image of a 1,000-image test set against every one of its
5,000 captions with the dual encoder against a cross-attention matcher over the same local features.

    python benchmarks/inference_cost.py [--images 1000] [--captions 5000] [--encode-captions 500]
                                        [--scan-captions 50] [--threads 1] [--out DIR]

The model is ``configs/flickr8k_user.yaml``'s (49 x 1280 grid cells -> 1024-d joint space with SGE and GPO; the
pretrained MiniLM text tower), untrained: the cost does not depend on the weights. Images are random grid features
of the real shape; captions are Flickr8K val's. Both scorers start from the same local features in the joint space
(image cells after SGE and the projection head, caption tokens after MiniLM and its projection), whose computation
is timed once and shared (MiniLM is timed on the first ``--encode-captions`` captions and scaled to all; their
token features are repeated to make up the 5,000, which costs the scorers what distinct captions would):

- dual encoder: GPO pooling of each side once, L2, then one GEMM (1,000 x 1,024) @ (1,024 x 5,000);
- cross-attention: SCAN's text-to-image attention (Lee et al. 2018, as its ``xattn_score_t2i``): for each caption
  and image, region-word cosine -> LeakyReLU(0.1) -> L2 over the words -> softmax over regions at temperature 9 ->
  attended image vector per word -> cosine with the word, averaged over words. It is timed on ``--scan-captions``
  captions against all images and scaled linearly to all captions (its cost is exactly linear in the pairs).

Prints each part, the scoring-only ratio and the ratio including the shared encoding (the block of
docs/results.md). The paper's figure (over 60x
against NAAF, a heavier cross-attention matcher than SCAN) is for its own setting; this reproduces the kind.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from figures import command_lines, options, parse_with_out, table, write_figures
from search_latency import flickr_captions

from xmcl.config import load_config
from xmcl.data.text import HFTokenizer, collate_tokens, resolve_text_model_dir
from xmcl.retrieval.config import RetrievalTrainConfig
from xmcl.retrieval.model import USERModel

LAMBDA = 9.0


@torch.no_grad()
def image_locals(model: USERModel, regions: torch.Tensor, batch: int = 100) -> tuple[torch.Tensor, torch.Tensor]:
    """Joint-space cells (N, R, d) and lengths: SGE, then the projection head (the image tower before pooling)."""
    encoder, out = model.image_encoder, []
    lengths = torch.full((regions.shape[0],), regions.shape[1], dtype=torch.long)
    for start in range(0, len(regions), batch):
        local, length = encoder.local_features(regions[start: start + batch])
        if encoder.sge is not None:
            local = encoder.sge(local, length)
        out.append(encoder.head(local, length))
    return torch.cat(out), lengths


@torch.no_grad()
def text_locals(model: USERModel, tokenizer: HFTokenizer, captions: list[str], batch: int = 250
                ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per batch: joint-space token features (B, L, d) and lengths (the text tower before pooling)."""
    encoder, out = model.text_encoder, []
    for start in range(0, len(captions), batch):
        ids, lengths = collate_tokens([tokenizer.encode(c) for c in captions[start: start + batch]],
                                      tokenizer.pad_id)
        local = encoder.projection(encoder.sequence(ids, lengths))
        if encoder.sge is not None:
            local = encoder.sge(local, lengths)
        out.append((local, lengths))
    return out


@torch.no_grad()
def dual_scores(model: USERModel, cells: torch.Tensor, cell_lengths: torch.Tensor,
                words: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """GPO pooling of each side, L2, one GEMM: (N, M) similarities."""
    images = F.normalize(model.image_encoder.pooling(cells, cell_lengths), dim=-1)
    texts = torch.cat([F.normalize(model.text_encoder.pooling(local, lengths), dim=-1) for local, lengths in words])
    return images @ texts.T


@torch.no_grad()
def scan_t2i(cells: torch.Tensor, words: torch.Tensor) -> torch.Tensor:
    """SCAN text-to-image scores of one caption's words (L, d) against every image's cells (N, R, d): (N,)."""
    attn = torch.einsum("nrd,ld->nrl", cells, words)                    # (N, R, L)
    attn = F.normalize(F.leaky_relu(attn, 0.1), dim=2)                   # clipped_l2norm over the words
    attn = torch.softmax(attn.transpose(1, 2) * LAMBDA, dim=2)           # (N, L, R): over the regions
    attended = torch.bmm(attn, cells)                                     # (N, L, d)
    return F.cosine_similarity(words.unsqueeze(0).expand_as(attended), attended, dim=2).mean(dim=1)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = options(__doc__)
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--captions", type=int, default=5000)
    parser.add_argument("--encode-captions", type=int, default=500)
    parser.add_argument("--scan-captions", type=int, default=50)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    return parse_with_out(parser, "inference_cost", argv=argv)


def render(d: dict) -> str:
    """The block of docs/results.md: each part's seconds and both ratios."""
    f = d["figures"]
    rows = [[f"shared local features: {f['images']:,} images (SGE + projection on 49 x 1280 cells)",
             f"{f['image_locals_seconds']:.1f}"],
            [f"shared local features: {f['captions']:,} captions (MiniLM + projection; timed on "
             f"{d['config']['encode_captions']}, scaled)", f"{f['caption_locals_seconds']:.1f}"],
            [f"dual encoder: GPO pooling of both sides + one GEMM -> {f['images']:,} x {f['captions']:,} scores",
             f"{f['dual_seconds']:.1f}"],
            [f"SCAN t2i cross-attention, lambda 9 (timed on {f['scan_captions']} captions x {f['images']:,} images: "
             f"{f['scan_measured_seconds']:.1f} s, scaled)", f"{f['scan_seconds']:,.1f}"]]
    return (f"{command_lines(d)}\n\n" + table(["part", "seconds"], rows)
            + f"\n\n- Scoring alone, the cross-attention matcher costs **{f['ratio_scoring']:.0f}x** the dual "
            f"encoder; with the shared encoding counted on both sides, {f['ratio_with_encoding']:.1f}x.")


def summary(d: dict) -> str:
    """README's line."""
    f = d["figures"]
    return (f"- `{d['command']}`: scoring {f['images']:,} x {f['captions']:,} with SCAN's cross-attention costs "
            f"{f['ratio_scoring']:.0f}x the dual encoder's pooling + GEMM ({f['ratio_with_encoding']:.1f}x with the "
            f"shared encoding of both sides).")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    cfg = load_config(RetrievalTrainConfig, "flickr8k_user", ["run.device=cpu"])
    model = USERModel(cfg.model, cfg.loss).eval()
    tokenizer = HFTokenizer(resolve_text_model_dir(cfg.model.text_model))
    regions = torch.randn(args.images, 49, cfg.model.region_dim).half().float()
    captions = flickr_captions(args.captions)

    began = time.perf_counter()
    cells, cell_lengths = image_locals(model, regions)
    image_seconds = time.perf_counter() - began
    encoded = captions[: args.encode_captions]
    text_locals(model, tokenizer, encoded[:10])  # warm-up
    began = time.perf_counter()
    words = text_locals(model, tokenizer, encoded)
    text_seconds = (time.perf_counter() - began) * len(captions) / len(encoded)
    words = [words[i % len(words)] for i in range(-(-len(captions) // 250))]
    shared = image_seconds + text_seconds
    dual_scores(model, cells[:10], cell_lengths[:10], words[:1])  # warm-up

    began = time.perf_counter()
    dual_scores(model, cells, cell_lengths, words)
    dual = time.perf_counter() - began

    flat = [(local[i, : int(lengths[i])]) for local, lengths in words for i in range(len(lengths))]
    chosen = flat[: args.scan_captions]
    scan_t2i(cells, chosen[0])  # warm-up
    began = time.perf_counter()
    with torch.no_grad():
        torch.stack([scan_t2i(cells, w) for w in chosen], dim=1)
    measured = time.perf_counter() - began
    scan = measured * len(captions) / len(chosen)
    write_figures(args.out, "inference_cost", args, {
        "images": args.images, "captions": len(captions), "image_locals_seconds": image_seconds,
        "caption_locals_seconds": text_seconds, "dual_seconds": dual, "scan_measured_seconds": measured,
        "scan_captions": len(chosen), "scan_seconds": scan, "ratio_scoring": scan / dual,
        "ratio_with_encoding": (shared + scan) / (shared + dual)}, argv=argv, show=render)


if __name__ == "__main__":
    main()
