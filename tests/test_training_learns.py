"""Wiring of the trainers, checked against independent computations.

* Training learns: the retrieval trainer, ST-SLidR pretraining (through the linear probe) and ``train-clip`` each end
  clearly above the same network left untrained (built from the same seed, so it is the run's own starting point).
* The trainer drives the epoch: the hinge's sum-of-violations warm-up gives way to the hardest negative, and UTO's
  hinge warm start to UTO, at the epoch the config names (loss values recomputed by hand from the loss inputs).
* Trainer behaviours: ``TrainingStalled`` on a zero-gradient first step, the step decay of the learning rate, gradient
  clipping before the optimiser step (the log keeps the raw norm) and the dropped final batch of one.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
from PIL import Image
from torch import Tensor
from torch.optim.optimizer import register_optimizer_step_pre_hook

import xmcl.training.run as run_pieces
from xmcl.config import load_config
from xmcl.contrast import HingeLoss, UTOLoss
from xmcl.data.open import open_split
from xmcl.data.text import Vocabulary
from xmcl.distill.config import DistillConfig
from xmcl.errors import TrainingStalled
from xmcl.metrics.retrieval import evaluate_embeddings
from xmcl.retrieval.clip.config import ClipTrainConfig
from xmcl.retrieval.clip.preprocess import ClipImagePreprocess
from xmcl.retrieval.clip.small import new_clip_model
from xmcl.retrieval.clip.teacher import clip_image_features, clip_text_features
from xmcl.retrieval.clip.tokenizer import ClipTokenizer, train_bpe
from xmcl.retrieval.config import RetrievalTrainConfig
from xmcl.retrieval.inference import build_tokenizer, encode_split
from xmcl.retrieval.model import USERModel
from xmcl.runtime.checkpoint import read_checkpoint
from xmcl.runtime.log import read_jsonl
from xmcl.runtime.rng import seed_everything
from xmcl.training.clip_trainer import train_clip
from xmcl.training.distill_trainer import pretrain_distill
from xmcl.training.probe_trainer import run_probe
from xmcl.training.retrieval_trainer import train_retrieval

from helpers import retrieval_config as shared_retrieval_config

pytestmark = pytest.mark.slow  # minutes of training, subprocesses or a browser: `make test-fast` leaves it out

WORDS = ["red", "blue", "green", "circle", "square", "star", "left", "right", "big", "small"]
CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def no_plots(monkeypatch: pytest.MonkeyPatch) -> None:
    """The PNG curves cost seconds per epoch and are not under test here."""
    monkeypatch.setattr(run_pieces, "plot_curves", lambda *args, **kwargs: None)


# ------------------------------------------------------------------------------------------------ corpora, configs


def write_word_corpus(root: Path, images: dict[str, int], regions: int = 4, dim: int = 12, seed: int = 0) -> Path:
    """A precomputed-feature corpus that is learnable: each image names 3 of ``WORDS``; 3 of its regions carry those
    words' fixed random prototypes (plus noise), and its 2 captions are the 3 words in random orders."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    prototypes = rng.normal(size=(len(WORDS), dim))
    for split, n in images.items():
        features = rng.normal(scale=0.3, size=(n, regions, dim))
        captions = []
        for i in range(n):
            words = rng.choice(len(WORDS), 3, replace=False)
            features[i, :3] += prototypes[words]
            captions += [" ".join(WORDS[j] for j in rng.permutation(words)) for _ in range(2)]
        np.save(root / f"{split}_ims.npy", features.astype(np.float32))
        (root / f"{split}_caps.txt").write_text("\n".join(captions) + "\n")
        (root / f"{split}_ids.txt").write_text("\n".join(f"{split}{i}" for i in range(n)) + "\n")
    return root


def retrieval_config(data: Path, *extra: str) -> RetrievalTrainConfig:
    """A tiny region-feature USER model (BiGRU text tower, 16-d embeddings, 16-key queues), no lr decay."""
    return shared_retrieval_config(data, "model.queue_size=16", "optim.lr_decay_epochs=[100]", *extra)


def step_records(run: Path) -> list[dict]:
    """The per-step records of a run's ``log.jsonl`` (the per-epoch ones hold ``val_rsum`` instead)."""
    return [r for r in read_jsonl(run / "log.jsonl") if "loss" in r]


def epoch_records(run: Path) -> list[dict]:
    return [r for r in read_jsonl(run / "log.jsonl") if "val_rsum" in r]


# ------------------------------------------------------------------------------------------------ 1. training learns


def untrained_retrieval_rsum(cfg: RetrievalTrainConfig) -> float:
    """Validation rSum of the model the trainer starts from: same seed, same vocabulary, no step taken."""
    seed_everything(cfg.run.seed)
    train, val = open_split(cfg.data.path, cfg.data.train_split), open_split(cfg.data.path, cfg.data.val_split)
    tokenizer = build_tokenizer(cfg.model, cfg.data.max_caption_tokens,
                                Vocabulary.build(train.captions, cfg.data.vocab_min_count))
    model = USERModel(cfg.model, cfg.loss, vocab_size=tokenizer.vocab_size)
    img, txt = encode_split(model, val, tokenizer, None, CPU)
    return evaluate_embeddings(img, txt, val.caption_image, protocols=("all",))["all"].rsum


def test_retrieval_training_beats_the_untrained_model(tmp_path: Path) -> None:
    """Three epochs of VSE++ training lift val rSum (32 images; chance is about 100 of 600) far above the untrained
    model's; without optimiser steps the two would be equal."""
    data = write_word_corpus(tmp_path / "corpus", {"train": 64, "val": 32})
    cfg = retrieval_config(data, "loss.name=hinge", "optim.epochs=3", "optim.batch_size=16", "optim.lr=1e-2")
    untrained = untrained_retrieval_rsum(cfg)
    summary = train_retrieval(cfg, tmp_path / "run", progress=False)
    final = epoch_records(tmp_path / "run")[-1]["val_rsum"]
    assert final > untrained + 100, (untrained, final)
    assert summary["best_rsum"] >= final


def distill_config(cache: Path) -> DistillConfig:
    """Tiny synthetic scenes, a random-weight 2D backbone as teacher, 30 pretraining steps, a 100-step linear probe.
    ``run.seed == probe.seed``, so pretraining starts from the very network the random-init probe scores."""
    return load_config(DistillConfig, None, [
        "data.pretrain_scenes=3", "data.probe_train_scenes=2", "data.eval_scenes=2", "data.num_points=1500",
        "data.image_size=[32,64]", "voxel.widths=[4,8]", "voxel.out_dim=8", "voxel.voxel_size=0.2",
        "image.backbone=resnet18", "image.weights=null", "image.resnet_width=8", "superpixels.n_segments=12",
        f"superpixels.cache_dir={cache}", "optim.steps=30", "optim.warmup_steps=2", "optim.batch_scenes=2",
        "run.checkpoint_every=30", "run.log_every=10", "run.progress=false", "run.device=cpu",
        "run.seed=0", "probe.seed=0", "probe.linear_steps=100",
        # 30 steps on 3 tiny scans: cubic voxels and no image augmentation learn fastest (cylindrical cells and
        # the authors' crops need a longer run to pay off; their wiring is tested in test_distill_augment)
        "voxel.coordinates=cubic", "augmentation.drop_cuboids=false", "augmentation.resized_crop=false",
        "augmentation.flip_horizontal=false"])


def test_distill_pretraining_beats_a_random_network_in_the_linear_probe(tmp_path: Path) -> None:
    """The linear probe on the pretrained 3D network scores a clearly higher mIoU than on its random initialisation
    (about 0.19 against 0.14 here); without pretraining steps the two probes would score the same."""
    cfg = distill_config(tmp_path / "superpixels")
    random_init = run_probe(cfg, None, tmp_path / "probe_random", mode="linear")
    checkpoint = pretrain_distill(cfg, tmp_path / "pretrain")
    pretrained = run_probe(cfg, checkpoint, tmp_path / "probe_pretrained", mode="linear")
    assert random_init["points"] == pretrained["points"] > 0
    assert pretrained["miou"] > random_init["miou"] + 0.02, (random_init["miou"], pretrained["miou"])


COLOURS = {"red": (220, 30, 30), "green": (30, 180, 60), "blue": (40, 70, 230), "yellow": (240, 220, 30),
           "black": (20, 20, 20), "white": (240, 240, 240)}


def write_colour_corpus(root: Path, images: dict[str, int], seed: int = 0) -> Path:
    """A Karpathy-style corpus of 32 x 32 noisy images, left half one colour and right half another, each with two
    captions naming both colours and their sides (30 possible pairs)."""
    (root / "images").mkdir(parents=True)
    rng = np.random.default_rng(seed)
    names, entries = list(COLOURS), []
    for split, n in images.items():
        for i in range(n):
            left, right = (names[j] for j in rng.choice(len(names), 2, replace=False))
            pixels = np.empty((32, 32, 3))
            pixels[:, :16], pixels[:, 16:] = COLOURS[left], COLOURS[right]
            pixels = np.clip(pixels + rng.normal(0, 20, pixels.shape), 0, 255).astype(np.uint8)
            filename = f"{split}{i}.png"
            Image.fromarray(pixels).save(root / "images" / filename)
            captions = [f"{left} on the left and {right} on the right", f"{right} right of {left}"]
            entries.append({"filename": filename, "split": split, "sentences": [{"raw": c} for c in captions]})
    (root / "dataset_colours.json").write_text(json.dumps({"images": entries}))
    return root


def untrained_clip_rsum(cfg: ClipTrainConfig) -> float:
    """Validation rSum of the CLIP ``train_clip`` starts from: same seed, same BPE, no step taken."""
    seed_everything(cfg.run.seed)
    train, val = open_split(cfg.data.path, "train"), open_split(cfg.data.path, "val")
    vocab, merges = train_bpe(train.captions, cfg.model.bpe_vocab_size)
    tokenizer = ClipTokenizer(vocab, merges, cfg.model.context_length)
    model = new_clip_model(cfg.model, len(vocab)).eval()
    preprocess = ClipImagePreprocess(cfg.model.image_size)
    with torch.no_grad():
        img = clip_image_features(model, torch.stack([preprocess(path) for path in val.image_paths]))
        txt = clip_text_features(model, *tokenizer.batch(val.captions))
    return evaluate_embeddings(img, txt, val.caption_image, protocols=("all",))["all"].rsum


def test_train_clip_beats_the_untrained_clip(tmp_path: Path) -> None:
    """Six epochs of train-clip lift val rSum (30 images; chance is about 100) far above the untrained CLIP's."""
    data = write_colour_corpus(tmp_path / "colours", {"train": 64, "val": 30})
    cfg = load_config(ClipTrainConfig, None, [
        f"data.path={data}", "model.image_size=32", "model.patch_size=8", "model.width=64", "model.layers=1",
        "model.heads=1", "model.embed_dim=16", "model.context_length=24", "optim.batch_size=16", "optim.lr=5e-4",
        "optim.warmup_fraction=0.0", "optim.epochs=6", "run.device=cpu", "run.seed=0"])
    untrained = untrained_clip_rsum(cfg)
    summary = train_clip(cfg, tmp_path / "clip", progress=False)
    final = epoch_records(tmp_path / "clip")[-1]
    assert final["val_rsum"] > untrained + 150, (untrained, final["val_rsum"])
    assert summary["best_rsum"] >= final["val_rsum"]


# ------------------------------------------------------------------------------------------------ 2. the epoch


@dataclass
class LossCall:
    """One forward of a retrieval loss during training: which loss, its hinge mode, and its inputs (float64)."""

    kind: str
    max_violation: bool | None
    inputs: dict[str, Tensor | None]


def spy_on_losses(monkeypatch: pytest.MonkeyPatch) -> list[LossCall]:
    """Record every forward of a ``HingeLoss`` or ``UTOLoss`` (the trainer's loss, or the parts of a warm start)."""
    calls: list[LossCall] = []

    def make_spy(original: Callable) -> Callable:
        def spy(self, img: Tensor, txt: Tensor, image_ids: Tensor, **queue: Tensor | None) -> dict[str, Tensor]:
            inputs = {"img": img, "txt": txt, "image_ids": image_ids, **queue}
            kept = {k: None if v is None else (v.detach().clone().double() if v.is_floating_point()
                                               else v.detach().clone()) for k, v in inputs.items()}
            kept.setdefault("img_queue", None)
            calls.append(LossCall(type(self).__name__, getattr(self, "max_violation", None), kept))
            return original(self, img, txt, image_ids, **queue)
        return spy

    for cls in (HingeLoss, UTOLoss):
        monkeypatch.setattr(cls, "forward", make_spy(cls.forward))
    return calls


def _directions(c: dict[str, Tensor | None]) -> list[tuple[Tensor, Tensor, Tensor]]:
    """(scores, positives, negative mask) of each directional term: batch i2t, batch t2i, then the queue's two."""
    img, txt, ids = c["img"], c["txt"], c["image_ids"]
    sim = img @ txt.T
    negatives = ids[:, None] != ids[None, :]
    terms = [(sim, sim.diagonal(), negatives), (sim.T, sim.diagonal(), negatives.T)]
    if c["img_queue"] is not None:
        queue_negatives = c["queue_valid"][None, :] & (c["queue_ids"][None, :] != ids[:, None])
        terms.append((img @ c["txt_queue"].T, (img * c["txt_key"]).sum(1), queue_negatives))
        terms.append((txt @ c["img_queue"].T, (txt * c["img_key"]).sum(1), queue_negatives))
    return terms


def hand_hinge(c: dict[str, Tensor | None], margin: float, hardest: bool, batch_weight: float = 1.0) -> float:
    """VSE++ by hand: per query, the sum (or the largest) of [margin + s_qk - p_q]_+ over its negatives; summed."""
    totals = []
    for scores, positives, negatives in _directions(c):
        total = 0.0
        for q in range(scores.shape[0]):
            violations = [max(0.0, margin + float(scores[q, k]) - float(positives[q]))
                          for k in range(scores.shape[1]) if negatives[q, k]]
            if violations:
                total += max(violations) if hardest else sum(violations)
        totals.append(total)
    return batch_weight * (totals[0] + totals[1]) + sum(totals[2:])


def hand_uto(c: dict[str, Tensor | None], mu: float, gamma: float, batch_weight: float = 1.0) -> float:
    """UTO by hand: (1/mu) log(1 + sum_neg exp(mu (s - gamma))) averaged per direction, minus the mean
    log(1 + relu(positive)) (counted once for the batch, once per queue direction)."""

    def negative_part(scores: Tensor, negatives: Tensor, q: int) -> float:
        return math.log1p(sum(math.exp(mu * (float(scores[q, k]) - gamma))
                              for k in range(scores.shape[1]) if negatives[q, k])) / mu

    def positive_part(p: float) -> float:
        return math.log1p(max(p, 0.0))

    terms = _directions(c)
    (sim, diagonal, negatives), (sim_t, _, negatives_t) = terms[:2]
    b = sim.shape[0]
    batch = (sum(negative_part(sim, negatives, q) for q in range(b)) / b
             + sum(negative_part(sim_t, negatives_t, q) for q in range(b)) / b
             - sum(positive_part(float(diagonal[q])) for q in range(b)) / b)
    queue = sum(sum(negative_part(scores, mask, q) - positive_part(float(positives[q])) for q in range(b)) / b
                for scores, positives, mask in terms[2:])
    return batch_weight * batch + queue


def test_hinge_switches_from_summed_to_hardest_negative_after_its_warmup(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """With ``loss.warmup_epochs=1`` every step of epoch 1 logs the sum-of-violations hinge of its inputs and every
    step of epoch 2 the hardest-negative hinge (recomputed by hand, queue terms included)."""
    data = write_word_corpus(tmp_path / "corpus", {"train": 16, "val": 4})
    cfg = retrieval_config(data, "loss.name=hinge", "loss.warmup_epochs=1")
    calls = spy_on_losses(monkeypatch)
    train_retrieval(cfg, tmp_path / "run", progress=False)
    steps = step_records(tmp_path / "run")
    assert len(calls) == len(steps) == 2 * 4  # 32 captions in batches of 8, two epochs; evaluation runs no loss
    assert all(call.kind == "HingeLoss" for call in calls)
    assert any(call.inputs["img_queue"] is not None and bool(call.inputs["queue_valid"].any()) for call in calls)
    for epoch in (1, 2):
        hardest = epoch > cfg.loss.warmup_epochs
        mine = [(call, step) for call, step in zip(calls, steps) if step["epoch"] == epoch]
        assert len(mine) == 4
        assert [call.max_violation for call, _ in mine] == [hardest] * 4
        for call, step in mine:
            expected = hand_hinge(call.inputs, cfg.loss.margin, hardest, cfg.loss.batch_weight)
            assert step["loss"] == pytest.approx(expected, rel=1e-4, abs=1e-4), (epoch, step["step"])
        # the two modes are told apart by these inputs
        assert any(abs(hand_hinge(call.inputs, cfg.loss.margin, not hardest) - step["loss"]) > 1e-2
                   for call, step in mine)


def test_uto_warm_start_runs_the_hinge_then_uto(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With ``loss.name=uto`` and ``loss.uto_warmup_epochs=1``, epoch 1 steps log the summed hinge of their inputs and
    epoch 2 steps log UTO (both recomputed by hand)."""
    data = write_word_corpus(tmp_path / "corpus", {"train": 16, "val": 4})
    cfg = retrieval_config(data, "loss.name=uto", "loss.uto_warmup_epochs=1")
    calls = spy_on_losses(monkeypatch)
    train_retrieval(cfg, tmp_path / "run", progress=False)
    steps = step_records(tmp_path / "run")
    assert len(calls) == len(steps) == 2 * 4
    first = [(c, s) for c, s in zip(calls, steps) if s["epoch"] == 1]
    second = [(c, s) for c, s in zip(calls, steps) if s["epoch"] == 2]
    assert [(c.kind, c.max_violation) for c, _ in first] == [("HingeLoss", False)] * 4
    assert [c.kind for c, _ in second] == ["UTOLoss"] * 4
    for call, step in first:
        expected = hand_hinge(call.inputs, cfg.loss.margin, hardest=False, batch_weight=cfg.loss.batch_weight)
        assert step["loss"] == pytest.approx(expected, rel=1e-4, abs=1e-4), step["step"]
    for call, step in second:
        expected = hand_uto(call.inputs, cfg.loss.mu, cfg.loss.gamma, cfg.loss.batch_weight)
        assert step["loss"] == pytest.approx(expected, rel=1e-4, abs=1e-4), step["step"]
        assert abs(hand_hinge(call.inputs, cfg.loss.margin, hardest=False) - step["loss"]) > 1e-2


# ------------------------------------------------------------------------------------------------ 3. behaviours


def test_zero_gradient_first_step_raises_training_stalled(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """UTO whose first batch has every positive similarity <= 0 and every negative far below the margin has exactly
    zero gradient: the trainer stops before any step with ``TrainingStalled``; the hinge warm start it suggests runs."""
    data = write_word_corpus(tmp_path / "corpus", {"train": 16, "val": 4})
    # seed 0 starts with both first-batch pairs pointing apart; gamma 1.5 puts every negative score s so far below
    # it that exp(mu (s - gamma)) underflows to 0 in float32, so the gradient is exactly zero, not just tiny
    stalled = ["loss.name=uto", "loss.gamma=1.5", "optim.batch_size=2", "optim.epochs=1", "run.seed=0"]
    cfg = retrieval_config(data, *stalled)
    calls = spy_on_losses(monkeypatch)
    with pytest.raises(TrainingStalled, match="no gradient at the first step"):
        train_retrieval(cfg, tmp_path / "run", progress=False)
    # the premise, checked on the first batch the loss saw
    assert len(calls) == 1
    c = calls[0].inputs
    sim = c["img"] @ c["txt"].T
    off_diagonal = sim[c["image_ids"][:, None] != c["image_ids"][None, :]]
    assert (sim.diagonal() <= 0).all() and ((c["img"] * c["txt_key"]).sum(1) <= 0).all()
    assert ((c["txt"] * c["img_key"]).sum(1) <= 0).all() and not c["queue_valid"].any()
    assert (cfg.loss.mu * (off_diagonal - cfg.loss.gamma) < -110).all()
    log = tmp_path / "run" / "log.jsonl"
    assert not log.exists() or step_records(tmp_path / "run") == []  # no step was taken
    assert not (tmp_path / "run" / "last.pt").exists()

    warm = train_retrieval(retrieval_config(data, *stalled, "loss.uto_warmup_epochs=1", "optim.max_steps_per_epoch=2"),
                           tmp_path / "warm", progress=False)
    assert warm["last"].exists()
    assert [r["grad_norm"] > 0 for r in step_records(tmp_path / "warm")] == [True, True]


def test_lr_drops_by_the_decay_factor_at_the_decay_epochs(tmp_path: Path) -> None:
    """The lr logged at every step is ``optim.lr * factor ** (number of decay epochs <= the 0-based epoch)``, and the
    optimiser state saved at the end holds the lr decayed at every milestone in each parameter group."""
    data = write_word_corpus(tmp_path / "corpus", {"train": 8, "val": 4})
    cfg = retrieval_config(data, "loss.name=hinge", "optim.epochs=4", "optim.lr=2e-3",
                           "optim.lr_decay_epochs=[1,3]", "optim.lr_decay_factor=0.3")
    train_retrieval(cfg, tmp_path / "run", progress=False)
    steps = step_records(tmp_path / "run")
    assert Counter(r["epoch"] for r in steps) == {1: 2, 2: 2, 3: 2, 4: 2}
    for record in steps:
        decays = sum(1 for m in cfg.optim.lr_decay_epochs if m <= record["epoch"] - 1)
        assert record["lr"] == pytest.approx(cfg.optim.lr * cfg.optim.lr_decay_factor ** decays, rel=1e-9)
    assert len({r["lr"] for r in steps}) == 3  # lr, lr x 0.3 (epochs 2-3), lr x 0.09 (epoch 4)
    groups = read_checkpoint(tmp_path / "run" / "last.pt")["optimizer"]["param_groups"]
    assert len(groups) > 1
    for group in groups:  # every group of this model runs at the base lr (no BERT, no CNN backbone)
        assert group["initial_lr"] == pytest.approx(cfg.optim.lr)
        assert group["lr"] == pytest.approx(cfg.optim.lr * cfg.optim.lr_decay_factor ** 2)


def test_gradient_is_clipped_before_the_step_and_the_log_holds_the_raw_norm(tmp_path: Path,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """With a tiny ``optim.grad_clip``, the gradient the optimiser steps with is the backward's gradient scaled to
    norm ``grad_clip``, and the logged ``grad_norm`` is the backward's (pre-clip) norm."""
    data = write_word_corpus(tmp_path / "corpus", {"train": 8, "val": 4})
    cfg = retrieval_config(data, "loss.name=hinge", "optim.epochs=1", "optim.grad_clip=0.001")
    models: list[USERModel] = []
    raw: list[Tensor] = []
    stepped: list[Tensor] = []

    def gradient(model: USERModel) -> Tensor:
        return torch.cat([p.grad.detach().double().flatten() for p in model.parameters() if p.grad is not None])

    original_forward, original_backward = USERModel.forward, Tensor.backward

    def forward(self: USERModel, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        if not models:
            models.append(self)
        return original_forward(self, batch)

    def backward(self: Tensor, *args, **kwargs) -> None:
        original_backward(self, *args, **kwargs)
        raw.append(gradient(models[0]))

    monkeypatch.setattr(USERModel, "forward", forward)
    monkeypatch.setattr(Tensor, "backward", backward)
    hook = register_optimizer_step_pre_hook(
        lambda optimizer, args, kwargs: stepped.append(gradient(models[0])))
    try:
        train_retrieval(cfg, tmp_path / "run", progress=False)
    finally:
        hook.remove()
    steps = step_records(tmp_path / "run")
    assert len(steps) == len(raw) == len(stepped) == 2
    for record, before, after in zip(steps, raw, stepped):
        norm = float(before.norm())
        assert norm > 10 * cfg.optim.grad_clip  # the clip is active at every step
        assert record["grad_norm"] == pytest.approx(norm, rel=1e-4)
        assert float(after.norm()) == pytest.approx(cfg.optim.grad_clip, rel=1e-3)
        torch.testing.assert_close(after, before * (cfg.optim.grad_clip / norm), rtol=1e-3, atol=1e-9)


@pytest.mark.parametrize("batch_size", [7, 4])
def test_a_final_batch_of_one_is_dropped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, batch_size: int) -> None:
    """22 captions in batches of 7 leave a final batch of one, which has no negative and is dropped (3 steps per
    epoch); in batches of 4 the final batch of two is kept (6 steps)."""
    data = write_word_corpus(tmp_path / "corpus", {"train": 11, "val": 4})
    cfg = retrieval_config(data, "loss.name=hinge", f"optim.batch_size={batch_size}")
    calls = spy_on_losses(monkeypatch)
    train_retrieval(cfg, tmp_path / "run", progress=False)
    captions = 2 * 11
    full, rest = divmod(captions, batch_size)
    expected_sizes = [batch_size] * full + ([rest] if rest >= 2 else [])
    assert rest == {7: 1, 4: 2}[batch_size]
    assert Counter(r["epoch"] for r in step_records(tmp_path / "run")) == {1: len(expected_sizes),
                                                                           2: len(expected_sizes)}
    assert [call.inputs["img"].shape[0] for call in calls] == expected_sizes * 2
