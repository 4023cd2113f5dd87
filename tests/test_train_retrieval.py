"""The retrieval trainer: exact resume, divergence handling, checkpoints and evaluation from a checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from xmcl.errors import CheckpointError, ConfigError, TrainingDiverged
from xmcl.metrics.retrieval import evaluate_embeddings
from xmcl.retrieval.inference import encode_split, evaluate_checkpoint
from xmcl.retrieval.model import USERModel
from xmcl.runtime.checkpoint import read_checkpoint
from xmcl.runtime.log import read_jsonl
from xmcl.training.retrieval_trainer import train_retrieval

from helpers import load_trained, retrieval_config, write_corpus

@pytest.fixture()
def corpus(tmp_path: Path) -> Path:
    root = tmp_path / "corpus"
    root.mkdir()
    return write_corpus(root, {"train": 20, "val": 6})


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return read_checkpoint(path)["model"]


@pytest.mark.slow
def test_resume_mid_run_reproduces_uninterrupted_run(corpus: Path, tmp_path: Path) -> None:
    cfg = retrieval_config(corpus)
    straight = train_retrieval(cfg, tmp_path / "straight", progress=False)
    train_retrieval(retrieval_config(corpus, "optim.epochs=1"), tmp_path / "split", progress=False)
    resumed = train_retrieval(cfg, tmp_path / "split", progress=False)
    a, b = _weights(straight["last"]), _weights(resumed["last"])
    assert a.keys() == b.keys()
    for key in a:  # model, key encoders and queues alike
        assert torch.equal(a[key], b[key]), key
    assert straight["best_rsum"] == resumed["best_rsum"]
    log = [json.loads(line) for line in (tmp_path / "split" / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log if "val_rsum" in r] == [1, 2]
    assert (tmp_path / "split" / "curves.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_crash_mid_epoch_then_resume_reproduces_uninterrupted_run(corpus: Path, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = retrieval_config(corpus, "run.checkpoint_every=2")
    straight = train_retrieval(cfg, tmp_path / "straight", progress=False)

    clip = torch.nn.utils.clip_grad_norm_
    calls = {"n": 0}

    def crash_on_step_four(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return clip(*args, **kwargs)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", crash_on_step_four)
    with pytest.raises(KeyboardInterrupt):
        train_retrieval(cfg, tmp_path / "crashed", progress=False)
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", clip)
    state = read_checkpoint(tmp_path / "crashed" / "last.pt")
    assert (state["epoch"], state["step_in_epoch"]) == (0, 2)
    resumed = train_retrieval(cfg, tmp_path / "crashed", progress=False)
    a, b = _weights(straight["last"]), _weights(resumed["last"])
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.slow
def test_compiled_towers_train_as_the_eager_ones(corpus: Path, tmp_path: Path) -> None:
    """``run.compile: true`` (no dropout, so no random draw that the compiler could take over): the same losses,
    weights and validation figures as the eager run, to float tolerance, under the same checkpoint keys."""
    eager = train_retrieval(retrieval_config(corpus, "optim.epochs=1"), tmp_path / "eager", progress=False)
    compiled = train_retrieval(retrieval_config(corpus, "optim.epochs=1", "run.compile=true"), tmp_path / "compiled",
                               progress=False)
    losses = [[r["loss"] for r in read_jsonl(tmp_path / name / "log.jsonl") if "loss" in r]
              for name in ("eager", "compiled")]
    assert len(losses[0]) == len(losses[1]) >= 2
    np.testing.assert_allclose(losses[1], losses[0], rtol=1e-4, atol=1e-5)
    a, b = _weights(eager["last"]), _weights(compiled["last"])
    assert a.keys() == b.keys()
    # SGE's scorer bias has no true gradient (the softmax over the locals takes it away): it moves with the rounding
    # noise that AdamW scales up to steps of about lr (3 steps of lr 1e-3); the biases under batch statistics get an
    # exact 0 (``batchnorm_of_linear``) and compare as the rest
    free = {key for key in a if key.endswith("sge.scorer.bias")}
    assert free
    for key in a:
        tolerance = {"rtol": 0.0, "atol": 3e-3} if key in free else {"rtol": 1e-3, "atol": 1e-4}
        torch.testing.assert_close(b[key], a[key], **tolerance, msg=key)
    assert compiled["best_rsum"] == pytest.approx(eager["best_rsum"], abs=1e-6)


def test_queue_and_key_encoders_are_in_the_checkpoint(corpus: Path, tmp_path: Path) -> None:
    train_retrieval(retrieval_config(corpus, "optim.epochs=1"), tmp_path / "run", progress=False)
    weights = _weights(tmp_path / "run" / "last.pt")
    assert int(weights["image_queue.filled"]) == 10 and int(weights["text_queue.filled"]) == 10
    assert any(k.startswith("image_key_encoder.") for k in weights)
    ids = weights["image_queue.ids"]
    assert ((ids >= 0) & (ids < 20)).all()


def test_resume_with_another_model_config_is_refused(corpus: Path, tmp_path: Path) -> None:
    train_retrieval(retrieval_config(corpus, "optim.epochs=1"), tmp_path / "run", progress=False)
    with pytest.raises(CheckpointError, match="model.embed_dim"):
        train_retrieval(retrieval_config(corpus, "model.embed_dim=8"), tmp_path / "run", progress=False)


def test_divergence_stops_with_message_and_keeps_last_good(corpus: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    train_retrieval(retrieval_config(corpus, "optim.epochs=1"), run, progress=False)
    before = _weights(run / "last.pt")
    features = np.load(corpus / "train_ims.npy")
    features[:] = np.nan  # corrupt features make the loss NaN on the next step
    np.save(corpus / "train_ims.npy", features)
    with pytest.raises(TrainingDiverged, match="epoch 2, step 1.*last good checkpoint is .*last.pt"):
        train_retrieval(retrieval_config(corpus), run, progress=False)
    after = _weights(run / "last.pt")
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_evaluate_checkpoint_matches_direct_encoding(corpus: Path, tmp_path: Path) -> None:
    summary = train_retrieval(retrieval_config(corpus, "optim.epochs=1"), tmp_path / "run", progress=False)
    metrics = evaluate_checkpoint(summary["best"], None, "val", ("all",))["all"]
    model, tokenizer, cfg = load_trained(summary["best"], torch.device("cpu"))
    from xmcl.data.open import open_split

    split = open_split(corpus, "val")
    img, txt = encode_split(model, split, tokenizer, None, torch.device("cpu"))
    expected = evaluate_embeddings(img, txt, split.caption_image)["all"]
    assert metrics.rsum == pytest.approx(expected.rsum)
    assert metrics.rsum == pytest.approx(summary["best_rsum"])


def test_model_input_mismatch_is_named(corpus: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="region_dim is 7"):
        train_retrieval(retrieval_config(corpus, "model.region_dim=7"), tmp_path / "run", progress=False)
    with pytest.raises(ConfigError, match="image_input='images'"):
        train_retrieval(retrieval_config(corpus, "model.image_input=images"), tmp_path / "run2", progress=False)


# Resume with the RNG in use: SGE dropout draws from torch's global generator at every training step, and caption
# augmentation is on, so a resume that does not restore the generators' state changes the weights. ``run.threads=1``:
# the module-scoped run below starts before the per-test single-thread fixture, and bit-exact comparisons need
# every run on the same thread count.
RANDOM_TRAINING = ("model.sge_dropout=0.4", "data.augment_captions=true", "run.checkpoint_every=2", "run.threads=1")


def _assert_same_weights(a_path: Path, b_path: Path) -> None:
    a, b = _weights(a_path), _weights(b_path)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.fixture(scope="module")
def dropout_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A corpus and the last checkpoint of an uninterrupted 2-epoch run with dropout on (shared by the tests below)."""
    root = tmp_path_factory.mktemp("dropout")
    corpus = root / "corpus"
    corpus.mkdir()
    write_corpus(corpus, {"train": 20, "val": 6})
    cfg = retrieval_config(corpus, *RANDOM_TRAINING)
    assert cfg.model.sge_dropout == 0.4 and cfg.model.sge and cfg.data.augment_captions  # the later override won
    return corpus, train_retrieval(cfg, root / "straight", progress=False)["last"]


def test_training_config_draws_from_torchs_generator(dropout_run: tuple[Path, Path]) -> None:
    """Precondition of the resume tests below: in training mode the model with that config draws dropout masks
    from torch's global generator, so the same input encodes differently unless the generator is reset."""
    corpus, _ = dropout_run
    cfg = retrieval_config(corpus, *RANDOM_TRAINING)
    encoder = USERModel(cfg.model, cfg.loss, vocab_size=20).train().image_encoder  # the online tower, as trained
    regions = torch.from_numpy(np.load(corpus / "train_ims.npy")[:4])
    with torch.no_grad():
        torch.manual_seed(1)
        first = encoder(regions)
        torch.manual_seed(1)
        assert torch.equal(first, encoder(regions))
        assert not torch.equal(first, encoder(regions))


@pytest.mark.slow
def test_resume_at_epoch_end_with_dropout_reproduces_uninterrupted_run(dropout_run: tuple[Path, Path],
                                                                       tmp_path: Path) -> None:
    """Dropout on: 1 epoch, then a resume to 2, gives bit for bit the weights of 2 epochs straight."""
    corpus, straight = dropout_run
    train_retrieval(retrieval_config(corpus, *RANDOM_TRAINING, "optim.epochs=1"), tmp_path / "split", progress=False)
    assert read_checkpoint(tmp_path / "split" / "last.pt")["epoch"] == 1
    resumed = train_retrieval(retrieval_config(corpus, *RANDOM_TRAINING), tmp_path / "split", progress=False)
    _assert_same_weights(straight, resumed["last"])


@pytest.mark.slow
def test_crash_mid_epoch_with_dropout_then_resume_reproduces_uninterrupted_run(
        dropout_run: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Dropout on: a crash during step 4 of epoch 1, resumed from the step-2 checkpoint, gives the straight run's
    weights bit for bit."""
    corpus, straight = dropout_run
    cfg = retrieval_config(corpus, *RANDOM_TRAINING)
    clip = torch.nn.utils.clip_grad_norm_
    calls = {"n": 0}

    def crash_on_step_four(*args: object, **kwargs: object) -> torch.Tensor:
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return clip(*args, **kwargs)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", crash_on_step_four)
    with pytest.raises(KeyboardInterrupt):
        train_retrieval(cfg, tmp_path / "crashed", progress=False)
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", clip)
    state = read_checkpoint(tmp_path / "crashed" / "last.pt")
    assert (state["epoch"], state["step_in_epoch"]) == (0, 2)
    resumed = train_retrieval(cfg, tmp_path / "crashed", progress=False)
    _assert_same_weights(straight, resumed["last"])


def test_on_two_threads_reading_batches_ahead_trains_what_reading_them_in_turn_does(
        dropout_run: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With 2 threads each next batch is read on a side thread during the step (``fetched_ahead``) and the key towers
    run beside the online ones: the same weights as with the batches read in turn, dropout and augmentation on."""
    import xmcl.training.retrieval_trainer as trainer

    corpus, _ = dropout_run
    cfg = retrieval_config(corpus, *RANDOM_TRAINING, "run.threads=2")
    reads = []
    real = trainer.fetched_ahead

    def counted(items, enabled):
        reads.append(enabled)
        return real(items, enabled)

    monkeypatch.setattr(trainer, "fetched_ahead", counted)
    ahead = train_retrieval(cfg, tmp_path / "ahead", progress=False)["last"]
    assert reads == [True, True]  # one epoch each
    monkeypatch.setattr(trainer, "fetched_ahead", lambda items, enabled: iter(items))
    in_turn = train_retrieval(cfg, tmp_path / "in_turn", progress=False)["last"]
    _assert_same_weights(ahead, in_turn)
