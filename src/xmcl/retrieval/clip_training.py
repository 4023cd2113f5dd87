"""``xmcl train-clip``: a small CLIP trained from scratch on a corpus (the shapes world), so that CGE runs end to
end without outside weights.

The model is a ``transformers.CLIPModel`` (ViT image tower, causal text transformer) trained with symmetric InfoNCE
(``xmcl.contrast``, learnable temperature, captions of the same image are not negatives of each other). Its
tokenizer is CLIP's byte-level BPE layout (:mod:`xmcl.retrieval.clip_teacher`) with merges learned from the
training captions. The best model by validation rSum is saved in the transformers CLIP format (``config.json``,
``model.safetensors``, ``vocab.json``, ``merges.txt``), which ``load_clip_teacher`` reads; ``log.jsonl`` holds
the per-epoch loss and validation recall. Images go through CLIP's preprocessing without augmentation (flips
would swap "left of" and "right of"). A rerun starts afresh.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from tqdm import tqdm

from xmcl.contrast import build_retrieval_loss
from xmcl.data.corpus import CaptionSplit
from xmcl.data.open import open_split
from xmcl.device import resolve_device
from xmcl.errors import ConfigError, DataError
from xmcl.evaluation import Metrics, evaluate_embeddings
from xmcl.retrieval.clip_teacher import (
    END_OF_WORD,
    SPLIT_PATTERN,
    ClipImagePreprocess,
    ClipTokenizer,
    byte_alphabet,
    clip_image_features,
    clip_text_features,
    clip_vocabulary,
)
from xmcl.training.checkpoint import seed_everything
from xmcl.training.logging import JsonlLogger


@dataclass
class ClipTrainConfig:
    """Shapes of the small CLIP and its training budget (an epoch shows each training image once, with one of
    its captions drawn at random).

    Both towers are ``width`` wide with ``layers`` layers of ``heads`` heads; images are ``image_size`` pixels cut
    into ``patch_size`` patches; captions hold at most ``context_length`` ids; embeddings are ``embed_dim``-d.
    ``bpe_vocab_size`` bounds the BPE trainer's vocabulary (the saved one adds CLIP's 2 x 256 byte tokens).
    AdamW (``lr``, ``weight_decay``) with ``warmup_fraction`` of linear warm-up, then cosine decay to 0.
    """

    image_size: int = 64
    patch_size: int = 8
    width: int = 96
    layers: int = 2
    heads: int = 2
    embed_dim: int = 128
    context_length: int = 32
    bpe_vocab_size: int = 1000
    epochs: int = 40
    batch_size: int = 64
    lr: float = 5e-4
    weight_decay: float = 0.1
    warmup_fraction: float = 0.05
    temperature: float = 0.07
    seed: int = 0
    device: str = "auto"
    threads: int = 0


def train_bpe(captions: Sequence[str], vocab_size: int) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """CLIP-layout ``(vocab, merges)`` whose merges a byte-level BPE trainer learns from ``captions`` (with CLIP's
    normalisation, word split and ``</w>`` end-of-word suffix; merges of pairs seen at least twice)."""
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE(end_of_word_suffix=END_OF_WORD, continuing_subword_prefix=""))
    tokenizer.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, initial_alphabet=byte_alphabet(),
                                  end_of_word_suffix=END_OF_WORD, continuing_subword_prefix="", show_progress=False)
    tokenizer.train_from_iterator(list(captions), trainer)
    merges = [tuple(m.split()) if isinstance(m, str) else tuple(m)
              for m in json.loads(tokenizer.to_str())["model"]["merges"]]
    return clip_vocabulary(merges), merges


def new_clip_model(cfg: ClipTrainConfig, vocab_size: int):
    """A randomly initialised ``transformers.CLIPModel`` of ``cfg``; the start and end tokens are the last two
    ids of the vocabulary (CLIP's layout), and the text is pooled at the end token."""
    from transformers import CLIPConfig, CLIPModel

    if cfg.width % cfg.heads:
        raise ConfigError(f"train-clip: width {cfg.width} is not a multiple of heads {cfg.heads}")
    if cfg.image_size % cfg.patch_size:
        raise ConfigError(f"train-clip: image_size {cfg.image_size} is not a multiple of patch_size {cfg.patch_size}")
    tower = dict(hidden_size=cfg.width, intermediate_size=4 * cfg.width, num_hidden_layers=cfg.layers,
                 num_attention_heads=cfg.heads, hidden_act="quick_gelu")
    config = CLIPConfig(
        text_config=dict(tower, vocab_size=vocab_size, max_position_embeddings=cfg.context_length,
                         bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1, pad_token_id=0),
        vision_config=dict(tower, image_size=cfg.image_size, patch_size=cfg.patch_size),
        projection_dim=cfg.embed_dim, logit_scale_init_value=math.log(1 / cfg.temperature))
    return CLIPModel(config)


def save_clip(model, vocab: dict[str, int], merges: Sequence[tuple[str, str]], out: Path | str) -> Path:
    """Write ``model`` and its tokenizer in the transformers CLIP format to ``out`` (each file replaced whole)."""
    out = Path(out)
    staging = out.parent / f".{out.name}.saving"
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(str(staging))
    (staging / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (staging / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n",
                                        encoding="utf-8")
    out.mkdir(parents=True, exist_ok=True)
    for file in staging.iterdir():
        os.replace(file, out / file.name)
    staging.rmdir()
    return out


def _pixels(split: CaptionSplit, size: int) -> torch.Tensor:
    if split.image_paths is None:
        raise DataError(f"{split.source} (split '{split.name}') holds region features; train-clip needs raw images")
    preprocess = ClipImagePreprocess(size)
    return torch.stack([preprocess(path) for path in split.image_paths])


def _one_caption_per_image(caption_image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One caption index per image, drawn uniformly among its captions, the images in random order."""
    shuffled = rng.permutation(len(caption_image))
    _, first = np.unique(caption_image[shuffled], return_index=True)
    return rng.permutation(shuffled[first])


@torch.no_grad()
def _evaluate(model, pixels: torch.Tensor, tokenizer: ClipTokenizer, split: CaptionSplit,
              device: torch.device, batch_size: int = 256) -> Metrics:
    model.eval()
    img = torch.cat([clip_image_features(model, pixels[i: i + batch_size].to(device)).cpu()
                     for i in range(0, len(pixels), batch_size)])
    txt = torch.cat([clip_text_features(model, *(t.to(device) for t in tokenizer.batch(
        split.captions[i: i + batch_size]))).cpu() for i in range(0, split.num_captions, batch_size)])
    return evaluate_embeddings(img, txt, split.caption_image, protocols=("all",))["all"]


def train_clip(data: Path | str, out: Path | str, cfg: ClipTrainConfig | None = None, train_split: str = "train",
               val_split: str = "val", progress: bool = True) -> dict:
    """Train a small CLIP on ``data`` and save the best (validation rSum) into ``out``.

    Returns ``{"best_rsum", "best_epoch", "metrics" (the best epoch's Metrics), "out"}``.
    """
    cfg = cfg or ClipTrainConfig()
    out = Path(out)
    device = resolve_device(cfg.device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    seed_everything(cfg.seed)
    train, val = open_split(data, train_split), open_split(data, val_split)
    vocab, merges = train_bpe(train.captions, cfg.bpe_vocab_size)
    tokenizer = ClipTokenizer(vocab, merges, cfg.context_length, source=f"BPE of {train.source}")
    train_pixels, val_pixels = _pixels(train, cfg.image_size), _pixels(val, cfg.image_size)
    model = new_clip_model(cfg, len(vocab)).to(device)
    loss_fn = build_retrieval_loss("infonce", init_temperature=cfg.temperature).to(device)
    params = list(model.parameters()) + list(loss_fn.parameters())
    decay = [p for p in params if p.ndim > 1]
    no_decay = [p for p in params if p.ndim <= 1]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr)
    steps_per_epoch = max(1, train.num_images // cfg.batch_size)
    total = steps_per_epoch * cfg.epochs
    warmup = max(1, int(cfg.warmup_fraction * total))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(
        (step + 1) / warmup, 0.5 * (1 + math.cos(math.pi * min(1.0, step / total)))))
    caption_image = torch.as_tensor(train.caption_image)
    out.mkdir(parents=True, exist_ok=True)
    (out / "log.jsonl").unlink(missing_ok=True)
    logger = JsonlLogger(out / "log.jsonl")
    best: dict = {"best_rsum": -math.inf, "best_epoch": 0, "metrics": None, "out": out}
    for epoch in range(cfg.epochs):
        model.train()
        order = _one_caption_per_image(train.caption_image, np.random.default_rng([cfg.seed, epoch]))
        tic, losses = time.perf_counter(), []
        bar = tqdm(range(steps_per_epoch), disable=not progress, desc=f"train-clip {epoch + 1}/{cfg.epochs}",
                   unit="batch", dynamic_ncols=True)
        for step in bar:
            rows = order[step * cfg.batch_size: (step + 1) * cfg.batch_size]
            images = caption_image[rows]
            ids, mask = tokenizer.batch([train.captions[m] for m in rows])
            img = clip_image_features(model, train_pixels[images].to(device))
            txt = clip_text_features(model, ids.to(device), mask.to(device))
            loss = loss_fn(img, txt, images.to(device))["loss"]
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            scheduler.step()
            losses.append(loss.item())
            bar.set_postfix(loss=f"{loss.item():.3f}")
        bar.close()
        metrics = _evaluate(model, val_pixels, tokenizer, val, device)
        logger.log({"epoch": epoch + 1, "train_loss_mean": float(np.mean(losses)),
                    "seconds": time.perf_counter() - tic, **{f"val_{k}": v for k, v in metrics.as_dict().items()}})
        if progress:
            tqdm.write(f"epoch {epoch + 1}: loss {np.mean(losses):.3f}, val rSum {metrics.rsum:.1f}")
        if metrics.rsum > best["best_rsum"]:
            with torch.no_grad():
                model.logit_scale.copy_(loss_fn.log_scale.detach().clamp(max=loss_fn.max_log_scale))
            save_clip(model, vocab, merges, out)
            best.update(best_rsum=metrics.rsum, best_epoch=epoch + 1, metrics=metrics)
    return best
