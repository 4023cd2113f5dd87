"""The GPU path, checked on CPU: ``run.amp`` (bf16 autocast runs on CPU and gives the float32 loss to bfloat16
tolerance; fp16 is refused off CUDA, naming the key), each loop trains under bf16, and no code pins a device with a
hard-coded ``.cuda()``."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch

from xmcl.config import load_config
from xmcl.data.shapes import generate_shapes_world
from xmcl.errors import ConfigError
from xmcl.retrieval.config import RetrievalTrainConfig
from xmcl.retrieval.model import USERModel
from xmcl.runtime.precision import Precision, cuda_layout
from xmcl.training.clip_trainer import train_clip
from xmcl.training.distill_trainer import pretrain_distill
from xmcl.training.retrieval_trainer import train_retrieval

from helpers import clip_config, distill_config, retrieval_config, write_corpus

CPU = torch.device("cpu")
ROOT = Path(__file__).resolve().parent.parent


def _losses(run: Path) -> list[float]:
    return [r["loss"] for r in map(json.loads, (run / "log.jsonl").read_text().splitlines()) if "loss" in r]


def test_fp16_is_refused_off_cuda_naming_the_key() -> None:
    with pytest.raises(ConfigError, match="run.amp: fp16 needs CUDA .* use run.amp=bf16"):
        Precision("fp16", CPU)
    with pytest.raises(ConfigError, match="run.amp"):
        load_config(RetrievalTrainConfig, None, ["run.amp=fp32"])
    assert Precision("none", CPU).scaler is None and Precision("none", CPU).state_dict() == {}


def test_a_bf16_autocast_step_on_cpu_gives_the_float32_loss_to_bfloat16_tolerance() -> None:
    cfg = load_config(RetrievalTrainConfig, None, [
        "model.embed_dim=32", "model.region_dim=24", "model.text_encoder=bigru", "model.word_dim=16",
        "model.queue_size=16", "model.sge_dropout=0.0", "loss.name=infonce"])
    g = torch.Generator().manual_seed(0)
    batch = {"regions": torch.randn(8, 5, 24, generator=g), "region_lengths": torch.full((8,), 5),
             "tokens": torch.randint(1, 40, (8, 6), generator=g), "token_lengths": torch.full((8,), 6),
             "image_ids": torch.arange(8)}
    losses, grads = {}, {}
    for amp in ("none", "bf16"):
        torch.manual_seed(0)
        model = USERModel(cfg.model, cfg.loss, vocab_size=40).train()
        precision = Precision(amp, CPU)
        with precision.autocast():
            loss = model(batch)["loss"]
        precision.backward(loss)
        losses[amp] = loss.item()
        grads[amp] = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    assert math.isfinite(losses["bf16"]) and losses["bf16"] != losses["none"]  # autocast did run in bfloat16
    assert losses["bf16"] == pytest.approx(losses["none"], rel=3e-2)
    cosine = torch.nn.functional.cosine_similarity(grads["bf16"].float(), grads["none"], dim=0)
    assert cosine > 0.98, cosine  # the same descent direction, to bfloat16 rounding


@pytest.mark.slow
def test_every_loop_trains_under_bf16_on_cpu_with_finite_losses(tmp_path: Path) -> None:
    corpus = write_corpus(tmp_path, {"train": 12, "val": 6})
    train_retrieval(retrieval_config(corpus, "optim.epochs=1", "run.amp=bf16", "run.threads=1"), tmp_path / "r",
                    progress=False)
    pretrain_distill(distill_config(f"superpixels.cache_dir={tmp_path / 'sp'}", "optim.steps=2", "run.amp=bf16",
                                    "run.threads=1"), tmp_path / "d", progress=False)
    shapes = tmp_path / "shapes"
    generate_shapes_world(shapes, num_images=12, seed=0, image_size=64, progress=False)
    cfg = clip_config(shapes, 4, epochs=1)
    cfg.run.amp = "bf16"
    train_clip(cfg, tmp_path / "c", progress=False)
    for run in ("r", "d", "c"):
        losses = _losses(tmp_path / run)
        assert losses and all(math.isfinite(v) for v in losses), (run, losses)
    # run.amp is a run control: a finished bf16 run resumes (says it is done) in float32
    train_retrieval(retrieval_config(corpus, "optim.epochs=1", "run.threads=1"), tmp_path / "r", progress=False)


def test_cuda_layout_is_a_no_op_off_cuda_and_no_code_hard_codes_cuda() -> None:
    conv = torch.nn.Conv2d(3, 4, 3)
    assert cuda_layout(conv, CPU).weight.is_contiguous()
    pinned = [f"{path.relative_to(ROOT)}:{number}" for folder in ("src", "benchmarks")
              for path in sorted((ROOT / folder).rglob("*.py"))
              for number, line in enumerate(path.read_text().splitlines(), 1) if re.search(r"\.cuda\(\)", line)]
    assert pinned == []
