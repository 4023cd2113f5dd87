"""The frozen PCA of region features: its fit against numpy's SVD, and its place in the model, trainer and checkpoint."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from xmcl.config import load_config
from xmcl.errors import ConfigError, DataError
from xmcl.nn.pca import FrozenPCA
from xmcl.retrieval.config import RetrievalTrainConfig
from xmcl.retrieval.inference import evaluate_checkpoint
from xmcl.runtime.checkpoint import read_checkpoint
from xmcl.training.retrieval_trainer import train_retrieval

from helpers import load_trained, retrieval_config, write_corpus


def _numpy_pca(rows: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean and the k leading right singular vectors of the centred rows, sign-fixed as FrozenPCA documents."""
    mean = rows.mean(0)
    _, _, vt = np.linalg.svd(rows - mean, full_matrices=False)
    basis = vt[:k].T
    signs = np.sign(basis[np.abs(basis).argmax(0), np.arange(k)])
    return mean, basis * signs


def test_fit_equals_numpy_svd_and_projects_centred_rows():
    rng = np.random.default_rng(0)
    scales = np.array([5.0, 3.0, 2.0, 1.0, 0.5, 0.2, 0.1, 0.05])  # distinct variances: a unique basis
    rows = rng.normal(size=(400, 8)) * scales @ np.linalg.qr(rng.normal(size=(8, 8)))[0] + 3.0
    pca = FrozenPCA(8, 3)
    pca.fit(torch.from_numpy(block).float() for block in np.array_split(rows, 7))  # blocks of uneven size
    mean, basis = _numpy_pca(rows, 3)
    np.testing.assert_allclose(pca.mean.numpy(), mean, atol=1e-5)
    np.testing.assert_allclose(pca.basis.numpy(), basis, atol=1e-4)
    x = torch.from_numpy(rows[:5]).float()
    np.testing.assert_allclose(pca(x).numpy(), (rows[:5] - mean) @ basis, atol=1e-4)
    assert pca(x.view(5, 1, 8)).shape == (5, 1, 3)


def test_unfitted_or_misshapen_use_is_refused():
    pca = FrozenPCA(6, 2)
    with pytest.raises(ConfigError, match="never fitted"):
        pca(torch.zeros(1, 6))
    with pytest.raises(DataError, match=r"\(n, 6\)"):
        pca.fit([torch.zeros(4, 5)])
    with pytest.raises(DataError, match="at least 2 rows"):
        pca.fit([torch.zeros(1, 6)])
    with pytest.raises(ConfigError, match="must reduce"):
        FrozenPCA(6, 6)


def test_config_range_and_input_kind_are_checked(tmp_path: Path):
    with pytest.raises(ConfigError, match="model.region_pca_dim. = 12 is out of range"):
        retrieval_config(tmp_path, "model.region_pca_dim=12")
    with pytest.raises(ConfigError, match="image_input"):
        load_config(RetrievalTrainConfig, None, ["model.image_input=images", "model.region_pca_dim=8"])


@pytest.fixture()
def corpus(tmp_path: Path) -> Path:
    root = tmp_path / "corpus"
    root.mkdir()
    return write_corpus(root, {"train": 20, "val": 6})


def test_training_fits_the_projection_on_the_train_split_and_the_checkpoint_carries_it(corpus: Path, tmp_path: Path):
    cfg = retrieval_config(corpus, "model.region_pca_dim=5", "optim.epochs=1")
    train_retrieval(cfg, tmp_path / "run", progress=False)
    state = read_checkpoint(tmp_path / "run" / "last.pt")["model"]
    train = np.load(corpus / "train_ims.npy").reshape(-1, 12)
    mean, basis = _numpy_pca(train.astype(np.float64), 5)
    np.testing.assert_allclose(state["image_encoder.reduction.basis"].numpy(), basis, atol=1e-4)
    np.testing.assert_allclose(state["image_encoder.reduction.mean"].numpy(), mean, atol=1e-5)
    assert torch.equal(state["image_key_encoder.reduction.basis"], state["image_encoder.reduction.basis"])
    # the loaded model reads the raw 12-d features, and they equal the features projected by hand
    model, _, _ = load_trained(tmp_path / "run" / "last.pt", torch.device("cpu"))
    raw = torch.from_numpy(np.load(corpus / "val_ims.npy"))
    projected = (raw.double() - torch.from_numpy(mean)) @ torch.from_numpy(basis)
    torch.testing.assert_close(model.encode_images(raw), model.encode_images(projected.float()), atol=1e-5, rtol=1e-4)
    assert evaluate_checkpoint(tmp_path / "run" / "best.pt", corpus, "val", ("all",))["all"].rsum >= 0


def test_a_resumed_run_keeps_its_projection_rather_than_refitting(corpus: Path, tmp_path: Path):
    train_retrieval(retrieval_config(corpus, "model.region_pca_dim=5", "optim.epochs=1"), tmp_path / "run", progress=False)
    before = read_checkpoint(tmp_path / "run" / "last.pt")["model"]["image_encoder.reduction.basis"]
    features = corpus / "train_ims.npy"
    np.save(features, np.load(features) * 3.0 + 1.0)  # a refit would now find another mean
    train_retrieval(retrieval_config(corpus, "model.region_pca_dim=5", "optim.epochs=2"), tmp_path / "run", progress=False)
    after = read_checkpoint(tmp_path / "run" / "last.pt")["model"]
    assert torch.equal(after["image_encoder.reduction.basis"], before)


def test_the_trainer_projects_the_training_split_once_as_the_encoder_would(corpus: Path):
    from xmcl.data.open import open_split
    from xmcl.training.retrieval_trainer import project_regions, region_rows

    split = open_split(corpus, "train")
    pca = FrozenPCA(12, 5)
    pca.fit(region_rows(split, images_per_block=3))
    projected = project_regions(split, pca, images_per_block=3)
    raw = np.load(corpus / "train_ims.npy").astype(np.float64)
    expected = (raw - pca.mean.double().numpy()) @ pca.basis.double().numpy()
    np.testing.assert_allclose(projected.region_features, expected, atol=1e-5)
    assert projected.captions == split.captions and projected.region_features.dtype == np.float32


def test_a_tolerant_model_with_the_pca_gives_one_loss_for_raw_and_projected_regions():
    from xmcl.retrieval.config import RetrievalLossConfig, RetrievalModelConfig
    from xmcl.retrieval.model import USERModel

    torch.manual_seed(0)
    cfg = RetrievalModelConfig(embed_dim=8, region_dim=12, region_pca_dim=5, text_encoder="bigru", word_dim=8,
                               queue_size=6, sge_dropout=0.0)
    model = USERModel(cfg, RetrievalLossConfig(tolerance="quantile", tolerance_q=0.3, balance=True), vocab_size=20)
    model.fit_region_reduction([torch.randn(50, 12)])
    twin = USERModel(cfg, RetrievalLossConfig(tolerance="quantile", tolerance_q=0.3, balance=True), vocab_size=20)
    twin.load_state_dict(model.state_dict())
    raw = torch.randn(4, 3, 12)
    batch = {"region_lengths": torch.tensor([3, 2, 3, 1]), "tokens": torch.randint(1, 20, (4, 5)),
             "token_lengths": torch.tensor([5, 3, 4, 2]), "image_ids": torch.arange(4)}
    with torch.no_grad():
        got = model({**batch, "regions": raw})
        want = twin({**batch, "regions": model.image_encoder.reduction(raw)})
    for key in want:
        torch.testing.assert_close(got[key], want[key])
    torch.testing.assert_close(model.semantic_queue.keys, twin.semantic_queue.keys)
