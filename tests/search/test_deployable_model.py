"""A trained model that serves: the encoders built apart from the training task, a locked-text model answering raw
captions through its recorded frozen text model, model directories (export, verification, loading without a
pickle), shipped models found by name, and the vocabulary warning of a BiGRU model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
from click.testing import CliRunner

from xmcl.cli import main
from xmcl.config import config_from_dict
from xmcl.data.precomputed import read_precomputed
from xmcl.errors import CheckpointError
from xmcl.retrieval import model_dir
from xmcl.retrieval.config import RetrievalTrainConfig
from xmcl.retrieval.dual_encoder import DualEncoder
from xmcl.retrieval.export import export_model_dir
from xmcl.retrieval.index.search import Searcher
from xmcl.retrieval.model import USERModel
from xmcl.retrieval.retriever import Retriever
from xmcl.retrieval.token_features import load_text_model
from xmcl.runtime.checkpoint import read_checkpoint, save_checkpoint

from search_world import save_tiny_bert

FLOAT16_TOLERANCE = 2e-3
TRAINING_PREFIXES = ("image_key_encoder.", "text_key_encoder.", "image_queue.", "text_queue.", "loss.")


def cached_text_embeddings(retriever: Retriever, features: Path, bert: Path) -> tuple[list[str], torch.Tensor]:
    """The val captions and their embeddings from the cached float16 token states (what training and evaluation
    read), computed by the text tower alone."""
    cached = read_precomputed(features, "val_text")
    _, _, tokenizer, _ = load_text_model(str(bert))
    lengths = torch.tensor([len(tokenizer.encode(caption)) for caption in cached.captions])
    states = torch.from_numpy(np.asarray(cached.region_features, dtype=np.float32))
    return cached.captions, retriever.model.encode_texts(states[:, : int(lengths.max())], lengths)


def test_a_locked_text_model_encodes_a_raw_caption_as_its_cached_states(locked_checkpoint: Path,
                                                                         locked_features: Path,
                                                                         tiny_bert: Path) -> None:
    retriever = Retriever.load(locked_checkpoint, "cpu")
    captions, from_cache = cached_text_embeddings(retriever, locked_features, tiny_bert)
    from_text = retriever.encode_texts(captions, batch_size=5)
    np.testing.assert_allclose(from_text.numpy(), from_cache.numpy(), atol=FLOAT16_TOLERANCE)
    assert not np.allclose(from_text[0].numpy(), from_text[1:].numpy(), atol=0.05)  # not one vector for all


def test_inference_builds_the_encoders_only_and_drops_a_checkpoints_training_keys(locked_checkpoint: Path) -> None:
    state = read_checkpoint(locked_checkpoint)
    training_keys = [key for key in state["model"] if key.startswith(TRAINING_PREFIXES)]
    assert training_keys  # the trainer's checkpoint holds key encoders and queues
    retriever = Retriever.load(locked_checkpoint, "cpu")
    assert type(retriever.model) is DualEncoder
    assert not any(key.startswith(TRAINING_PREFIXES) for key in retriever.model.state_dict())
    cfg = config_from_dict(RetrievalTrainConfig, state["config"])
    trained = USERModel(cfg.model, cfg.loss)  # the whole training model, loaded strictly: an independent reference
    trained.load_state_dict(state["model"])
    regions = torch.randn(3, 4, cfg.model.region_dim)
    torch.testing.assert_close(retriever.model.encode_images(regions), trained.encode_images(regions))


def test_a_checkpoint_without_the_text_record_reads_its_corpus_manifest(locked_checkpoint: Path,
                                                                         tmp_path: Path) -> None:
    state = read_checkpoint(locked_checkpoint)
    del state["inputs"]["text"]  # as written before checkpoints recorded the frozen text model
    older = tmp_path / "older.pt"
    save_checkpoint(older, state.pop("kind"), state.pop("version"), state)
    old, new = Retriever.load(older, "cpu"), Retriever.load(locked_checkpoint, "cpu")
    torch.testing.assert_close(old.encode_texts(["a red circle"]), new.encode_texts(["a red circle"]))


def test_another_or_a_missing_frozen_text_model_is_refused_naming_what_differs(locked_checkpoint: Path,
                                                                               tiny_bert: Path,
                                                                               tmp_path: Path) -> None:
    other = save_tiny_bert(tmp_path / "other_bert", seed=1)
    with pytest.raises(CheckpointError, match=r"weights_sha256: [0-9a-f]+ vs [0-9a-f]+"):
        Retriever.load(locked_checkpoint, "cpu", text_model=str(other))
    moved = tmp_path / "moved"
    shutil.move(tiny_bert, moved)
    try:  # the recorded directory is gone: the installed MiniLM is found, and refused
        with pytest.raises(CheckpointError, match=r"hidden_dim: 8 vs 384"):
            Retriever.load(locked_checkpoint, "cpu")
        moved_ok = Retriever.load(locked_checkpoint, "cpu", text_model=str(moved))
        assert moved_ok.encode_texts(["a red circle"]).shape == (1, 16)
    finally:
        shutil.move(moved, tiny_bert)


def test_a_locked_text_model_indexes_captions_and_answers_text_through_cli_and_api(
        world: Path, locked_checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "index"
    result = CliRunner().invoke(main, ["index", "--checkpoint", str(locked_checkpoint), "--images",
                                       str(world / "images"), "--out", str(out), "--captions",
                                       str(world / "dataset_shapes.json"), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    result = CliRunner().invoke(main, ["search", str(out), "a red circle", "-k", "3", "--json"])
    assert result.exit_code == 0, result.output
    answer = json.loads(result.stdout)
    searcher = Searcher.open(out, device="cpu")
    query = searcher.retriever.encode_texts(["a red circle"])[0].numpy()
    scores = {r["id"]: r["score"] for r in answer["results"]}
    assert len(scores) == 3
    for item, score in scores.items():  # each score is the dot product with the stored embedding
        assert score == pytest.approx(float(query @ searcher.index.item_vector(item)), abs=FLOAT16_TOLERANCE)
    assert [r["id"] for r in searcher.search(text="a red circle", k=3)] == list(scores)


@pytest.fixture(scope="module")
def exported(checkpoint: Path, tmp_path_factory) -> Path:
    return export_model_dir(checkpoint, tmp_path_factory.mktemp("export") / "shapes_model")


def test_an_exported_directory_holds_the_encoders_and_loads_to_the_checkpoints_embeddings(
        exported: Path, checkpoint: Path, retriever: Retriever, world: Path, monkeypatch) -> None:
    config = json.loads((exported / "config.json").read_text())
    assert set(config["files"]) == {"model.safetensors", "vocab.json"}
    for name, sha in config["files"].items():
        assert model_dir.file_sha256(exported / name) == sha
    weights = safetensors.torch.load_file(str(exported / "model.safetensors"))
    assert weights and all(key.startswith(("image_encoder.", "text_encoder.")) for key in weights)
    assert config["trained"]["checkpoint_sha256"] == model_dir.file_sha256(checkpoint)
    assert "rSum" in (exported / "README.md").read_text()

    torch_load = torch.load

    def no_pickles_of_the_directory(source, *args, **kwargs):  # the packaged backbone's .pth lies elsewhere
        if Path(source).resolve().is_relative_to(exported.resolve()):
            raise AssertionError(f"{source} of a model directory was loaded through torch.load")
        return torch_load(source, *args, **kwargs)

    monkeypatch.setattr(torch, "load", no_pickles_of_the_directory)
    loaded = Retriever.load(exported, "cpu")
    images = sorted((world / "images").glob("*.png"))[:5]
    torch.testing.assert_close(loaded.encode_images(images), retriever.encode_images(images))
    torch.testing.assert_close(loaded.encode_texts(["a red circle", "two squares"]),
                               retriever.encode_texts(["a red circle", "two squares"]))
    assert loaded.sha256 == model_dir.file_sha256(exported / "config.json")


def test_an_index_built_with_the_checkpoint_is_searched_with_its_exported_directory(
        exported: Path, built_index: Path) -> None:
    by_checkpoint = Searcher.open(built_index, device="cpu").search(text="a red circle", k=5)
    by_directory = Searcher.open(built_index, exported, device="cpu").search(text="a red circle", k=5)
    assert [r["id"] for r in by_directory] == [r["id"] for r in by_checkpoint]


@pytest.mark.parametrize("damage, message", [
    (lambda d: (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:-100]),
     "model.safetensors is truncated or altered"),
    (lambda d: (d / "vocab.json").unlink(), "vocab.json is missing"),
    (lambda d: (d / "config.json").write_text("{"), "config.json cannot be read"),
])
def test_a_damaged_model_directory_is_refused_naming_the_file(exported: Path, tmp_path: Path, damage,
                                                              message: str) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(exported, copy)
    damage(copy)
    with pytest.raises(CheckpointError, match=message):
        Retriever.load(copy, "cpu")


def test_export_refuses_a_used_folder_unless_overwrite(checkpoint: Path, exported: Path) -> None:
    with pytest.raises(CheckpointError, match="already exists"):
        export_model_dir(checkpoint, exported)
    assert export_model_dir(checkpoint, exported, overwrite=True) == exported
    assert (exported / "config.json").is_file()


def test_a_shipped_model_is_found_by_name(exported: Path, tmp_path: Path, monkeypatch) -> None:
    shipped = tmp_path / "models"
    shutil.copytree(exported, shipped / "tiny_shapes")
    monkeypatch.setattr(model_dir, "SHIPPED_MODELS", shipped)
    assert Retriever.load("tiny_shapes", "cpu").dim == 16
    with pytest.raises(CheckpointError, match=r"no_such_model does not exist.*shipped: tiny_shapes"):
        Retriever.load("no_such_model", "cpu")


def test_a_vocabulary_model_warns_when_most_query_words_are_unknown(built_index: Path) -> None:
    result = CliRunner().invoke(main, ["search", str(built_index), "dogs chase frisbees in the park", "--json"])
    assert result.exit_code == 0, result.output
    assert "unknown to this model's vocabulary (dogs, chase, frisbees, park)" in result.output
    result = CliRunner().invoke(main, ["search", str(built_index), "a red circle", "--json"])
    assert json.loads(result.stdout)["warning"] is None


def test_cli_export_then_evaluate_the_directory_gives_the_checkpoints_figures(locked_checkpoint: Path,
                                                                              locked_features: Path,
                                                                              tmp_path: Path) -> None:
    out = tmp_path / "model"
    result = CliRunner().invoke(main, ["export", str(locked_checkpoint), "--out", str(out)])
    assert result.exit_code == 0 and f"wrote {out}" in result.output, result.output
    figures = {}
    for name, model in (("checkpoint", locked_checkpoint), ("directory", out)):
        metrics = tmp_path / f"{name}.json"
        result = CliRunner().invoke(main, ["evaluate", "--checkpoint", str(model), "--data", str(locked_features),
                                           "--device", "cpu", "--out", str(metrics)])
        assert result.exit_code == 0, result.output
        figures[name] = json.loads(metrics.read_text())
    assert figures["directory"] == figures["checkpoint"]
    result = CliRunner().invoke(main, ["export", str(locked_checkpoint), "--out", str(out)])
    assert result.exit_code == 2 and "already exists" in result.output


def test_a_fine_tuned_bert_model_exports_its_text_model_config_and_tokenizer(features: Path, tiny_bert: Path,
                                                                             tmp_path: Path) -> None:
    from xmcl.training.retrieval_trainer import train_retrieval

    from search_world import tiny_config

    cfg = tiny_config(features, "model.text_encoder=bert", f"model.text_model={tiny_bert}",
                      "data.augment_captions=false")
    checkpoint = train_retrieval(cfg, tmp_path / "run", progress=False)["best"]
    out = export_model_dir(checkpoint, tmp_path / "model")
    config = json.loads((out / "config.json").read_text())
    assert {"text_model/config.json", "text_model/tokenizer.json"} <= set(config["files"])
    assert not any(name.startswith("text_model/") and name.endswith((".safetensors", ".bin"))
                   for name in config["files"])  # the fine-tuned weights live in model.safetensors
    shutil.move(tiny_bert, tmp_path / "moved_bert")  # the directory does not need the original text model
    try:
        from_dir = Retriever.load(out, "cpu").encode_texts(["a red circle", "a blue square"])
    finally:
        shutil.move(tmp_path / "moved_bert", tiny_bert)
    from_checkpoint = Retriever.load(checkpoint, "cpu").encode_texts(["a red circle", "a blue square"])
    torch.testing.assert_close(from_dir, from_checkpoint)
