"""What several test modules share (no test module imports another): tiny configs and corpora of each loop, a
free port for spawned ranks, a tiny BERT saved like a pretrained one, and a run log without its timing fields."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import numpy as np
import torch

from xmcl.config import load_config
from xmcl.distill.config import DistillConfig
from xmcl.retrieval.clip.config import ClipTrainConfig
from xmcl.retrieval.config import RetrievalModelConfig, RetrievalTrainConfig
from xmcl.retrieval.inference import model_from_state, open_saved_model

# ------------------------------------------------------------------------------------------------ retrieval runs
CORPUS_WORDS = ["red", "blue", "green", "circle", "square", "star", "left", "right", "big", "small"]


def write_corpus(root: Path, images: dict[str, int], regions: int = 4, dim: int = 12, seed: int = 0) -> Path:
    """A precomputed-feature corpus whose captions name 3 words tied to each image's features."""
    rng = np.random.default_rng(seed)
    for split, n in images.items():
        feats = rng.normal(size=(n, regions, dim)).astype(np.float32)
        caps = []
        for i in range(n):
            words = [CORPUS_WORDS[int(j)] for j in np.argsort(feats[i].mean(0))[-3:] % len(CORPUS_WORDS)]
            caps += [" ".join(rng.permutation(words)) for _ in range(2)]
        np.save(root / f"{split}_ims.npy", feats)
        (root / f"{split}_caps.txt").write_text("\n".join(caps) + "\n")
        (root / f"{split}_ids.txt").write_text("\n".join(f"{split}{i}" for i in range(n)) + "\n")
    return root


def retrieval_config(data: Path, *extra: str) -> RetrievalTrainConfig:
    """A retrieval run of two tiny epochs on a ``write_corpus`` corpus (BiGRU text, 16-d embeddings)."""
    return load_config(RetrievalTrainConfig, None, [
        f"data.path={data}", "data.val_split=val", "model.embed_dim=16", "model.region_dim=12",
        "model.text_encoder=bigru", "model.word_dim=8", "model.queue_size=10", "model.sge_dropout=0.0",
        "optim.epochs=2", "optim.batch_size=8", "optim.lr=1e-3", "optim.lr_decay_epochs=[1]", "run.threads=1", *extra])


# ------------------------------------------------------------------------------------------ retrieval models
EMBED, REGION_DIM, VOCAB = 16, 12, 30


def model_config(**overrides) -> RetrievalModelConfig:
    """A tiny USER model (BiGRU text over a ``VOCAB``-word vocabulary, ``REGION_DIM``-d regions)."""
    values = dict(embed_dim=EMBED, region_dim=REGION_DIM, text_encoder="bigru", word_dim=8, queue_size=8,
                  sge_dropout=0.0, momentum=0.9)
    values.update(overrides)
    return RetrievalModelConfig(**values)


def region_batch(num=4, regions=5, lengths=None, tokens_len=6, seed=0):
    """A batch of ``num`` random region sets and captions for ``model_config`` models."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.tensor(lengths or [regions] * num)
    token_lengths = torch.randint(2, tokens_len + 1, (num,), generator=gen)
    token_lengths[0] = tokens_len
    tokens = torch.randint(5, VOCAB, (num, tokens_len), generator=gen)
    tokens[torch.arange(tokens_len)[None, :] >= token_lengths[:, None]] = 0
    return {
        "regions": torch.randn(num, regions, REGION_DIM, generator=gen),
        "region_lengths": lengths,
        "tokens": tokens,
        "token_lengths": token_lengths,
        "image_ids": torch.arange(num) + 10 * seed,
    }


BERT_WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "dog", "runs", "on", "the", "grass", "red", "ball"]


def save_tiny_bert(directory: Path, words: list[str] = BERT_WORDS, seed: int = 0, max_positions: int = 32) -> Path:
    """A randomly initialised one-layer BERT (8-d states) with a word-level vocabulary of ``words``, saved as a
    transformers directory (a frozen or fine-tuned text model for tests)."""
    from transformers import BertConfig, BertModel, BertTokenizer

    torch.manual_seed(seed)
    config = BertConfig(vocab_size=len(words), hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=16, max_position_embeddings=max_positions)
    BertModel(config).save_pretrained(str(directory))
    BertTokenizer(vocab={w: i for i, w in enumerate(words)}).save_pretrained(str(directory))
    return directory


# ---------------------------------------------------------------------------------------------- CLIP and distill
TINY_CLIP_MODEL = dict(image_size=32, patch_size=8, width=64, layers=1, heads=1, embed_dim=16, context_length=24)


def clip_config(data: Path, batch: int, epochs: int = 2) -> ClipTrainConfig:
    """A tiny CLIP run (``TINY_CLIP_MODEL``) on the corpus ``data``."""
    return load_config(ClipTrainConfig, None, [
        f"data.path={data}", f"optim.epochs={epochs}", f"optim.batch_size={batch}", "optim.lr=2e-3",
        "optim.warmup_fraction=0.0", "run.device=cpu", "run.threads=1", "run.log_every=1",
        *(f"model.{k}={v}" for k, v in TINY_CLIP_MODEL.items())])


DISTILL_TINY = [
    "data.pretrain_scenes=3", "data.probe_train_scenes=2", "data.eval_scenes=1", "data.num_points=1500",
    "data.image_size=[32,64]", "voxel.widths=[4,8]", "voxel.out_dim=8", "voxel.voxel_size=0.2",
    "image.backbone=resnet18", "image.weights=null", "image.resnet_width=8", "superpixels.n_segments=12",
    "optim.steps=4", "optim.batch_scenes=2", "run.checkpoint_every=2", "run.log_every=1",
    "run.progress=false", "run.device=cpu", "run.threads=1", "probe.linear_steps=20", "probe.finetune_steps=2",
]


def distill_config(*extra: str) -> DistillConfig:
    """A tiny ST-SLidR pretraining (and probe) on the built-in scenes."""
    return load_config(DistillConfig, None, DISTILL_TINY + list(extra))


# ------------------------------------------------------------------------------------------------ processes, logs
PER_RANK = 4  # the per-rank batch of the data-parallel tests
TIMING = {"seconds", "samples_per_s", "scenes_per_s", "peak_memory_mib"}  # they differ between any two runs


def free_port() -> int:
    """A TCP port of 127.0.0.1 free now (for a spawned job's rendezvous)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def log_without_timing(folder: Path) -> list[dict]:
    """A run's ``log.jsonl`` records without their wall-clock fields (``TIMING``)."""
    records = [json.loads(line) for line in (folder / "log.jsonl").read_text().splitlines()]
    return [{k: v for k, v in record.items() if k not in TIMING} for record in records]


def load_trained(checkpoint: Path, device: torch.device):
    """The encoders (eval mode), tokenizer and config of a trained model (``model_from_state`` of its saved state)."""
    return model_from_state(open_saved_model(checkpoint).state, str(checkpoint), device)


def assert_resumed_weights(straight: dict, resumed: dict) -> None:
    """A resumed run's weights are bit-identical to the uninterrupted run's; the message names each tensor that
    differs and by how much (a run whose thread count changed between its parts differs in the last bits of the sums
    an operator splits over threads, e.g. LayerNorm biases by 2e-10: the runs compared pin ``run.threads``)."""
    assert straight.keys() == resumed.keys()
    differing = {k: float((straight[k].double() - resumed[k].double()).abs().max())
                 for k in straight if not torch.equal(straight[k], resumed[k])}
    assert not differing, \
        f"resumed weights differ from the uninterrupted run's (max |difference|): {differing}"
