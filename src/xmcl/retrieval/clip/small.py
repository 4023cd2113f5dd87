"""The small CLIP that ``xmcl train-clip`` trains from scratch (a CGE teacher for the shapes world), and saving a
CLIP in the transformers format that ``load_clip_teacher`` reads."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Sequence

from xmcl.retrieval.clip.config import ClipModelConfig
from xmcl.runtime.files import atomic_files_into


def new_clip_model(cfg: ClipModelConfig, vocab_size: int):
    """A randomly initialised ``transformers.CLIPModel`` of ``cfg``; the start and end tokens are the last two
    ids of the vocabulary (CLIP's layout), and the text is pooled at the end token."""
    from transformers import CLIPConfig, CLIPModel

    tower = dict(hidden_size=cfg.width, intermediate_size=4 * cfg.width, num_hidden_layers=cfg.layers,
                 num_attention_heads=cfg.heads, hidden_act="quick_gelu")
    config = CLIPConfig(
        text_config=dict(tower, vocab_size=vocab_size, max_position_embeddings=cfg.context_length,
                         bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1, pad_token_id=0),
        vision_config=dict(tower, image_size=cfg.image_size, patch_size=cfg.patch_size),
        projection_dim=cfg.embed_dim, logit_scale_init_value=math.log(1 / cfg.temperature))
    return CLIPModel(config)


def save_clip(model, vocab: dict[str, int], merges: Sequence[tuple[str, str]], out: Path | str) -> Path:
    """Write ``model`` and its tokenizer in the transformers CLIP format (``config.json``, ``model.safetensors``,
    ``vocab.json``, ``merges.txt``) into ``out``, each file replaced whole; other files of ``out`` are kept."""
    out = Path(out)
    with atomic_files_into(out) as staging:
        model.save_pretrained(str(staging))
        (staging / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
        (staging / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n",
                                            encoding="utf-8")
    return out
