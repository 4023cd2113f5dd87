"""The command line equals the library: ``xmcl evaluate`` prints and writes the figures an independent encoding of
the same checkpoint gives (``--split`` and ``--protocol`` honoured), and the success paths of ``train``,
``features``, ``distill pretrain``, ``distill probe`` and ``demo`` run once each on a tiny budget."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner, Result

from xmcl.cli import main
from xmcl.data.images import load_image
from xmcl.data.open import open_split
from xmcl.demo import DEMO_RUNS
from xmcl.metrics.retrieval import Metrics, evaluate_embeddings
from xmcl.nn.backbones import build_image_backbone
from xmcl.retrieval.clip.cache import split_guides
from xmcl.retrieval.inference import encode_split
from xmcl.runtime.checkpoint import read_checkpoint
from xmcl.training.retrieval_trainer import train_retrieval

from helpers import DISTILL_TINY, load_trained, retrieval_config, write_corpus

REPO = Path(__file__).resolve().parents[1]
TABLE_COLUMNS = ("i2t_r1", "i2t_r5", "i2t_r10", "i2t_medr", "i2t_meanr", "t2i_r1", "t2i_r5", "t2i_r10", "t2i_medr",
                 "t2i_meanr", "rsum")
PRINTED = 0.005 + 1e-9  # the table prints two decimals (one for the median ranks)


def invoke(*args: str) -> Result:
    """Run ``xmcl ARGS``; a non-zero exit fails the test with the command's output."""
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == 0, (result.output, result.exception)
    return result


def parse_table(text: str) -> dict[str, list[float]]:
    """The rows of a ``format_table`` table in ``text``: row name -> its 11 numbers (R@1/5/10, median and mean rank
    both ways, rSum)."""
    count = len(TABLE_COLUMNS)
    rows = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) < count + 1:
            continue
        try:
            values = [float(p) for p in parts[-count:]]
        except ValueError:
            continue
        rows[" ".join(parts[:-count])] = values
    return rows


def assert_row_is(printed: list[float], metrics: Metrics) -> None:
    """A printed row equals ``metrics`` at the printed precision."""
    for column, value in zip(TABLE_COLUMNS, printed):
        tolerance = 10 * PRINTED if column.endswith("medr") else PRINTED
        assert abs(value - getattr(metrics, column)) <= tolerance, (column, value, getattr(metrics, column))


def library_figures(checkpoint: Path, corpus: Path, split: str, protocols: tuple[str, ...]) -> dict[str, Metrics]:
    """The metrics of ``split`` computed without the CLI or ``evaluate_checkpoint``: load, encode, evaluate."""
    model, tokenizer, cfg = load_trained(checkpoint, torch.device("cpu"))
    data = open_split(corpus, split)
    guides = split_guides(cfg.model, data)  # the cached CLIP embeddings of a CGE model (none without CGE)
    img, txt = encode_split(model, data, tokenizer, None, torch.device("cpu"), guides=guides)
    return evaluate_embeddings(img, txt, data.caption_image, protocols)


def nested_yaml(items: list[str]) -> str:
    """``a.b=value`` items as a nested YAML document (values parsed as YAML)."""
    tree: dict = {}
    for item in items:
        key, value = item.split("=", 1)
        *parents, leaf = key.split(".")
        node = tree
        for parent in parents:
            node = node.setdefault(parent, {})
        node[leaf] = yaml.safe_load(value)
    return yaml.safe_dump(tree)


# ------------------------------------------------------------------------------------------- evaluate
@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(corpus, best.pt): a tiny model trained on a precomputed corpus whose val (10 images) and test (15 images,
    other features and captions) splits both allow the 5-fold protocol."""
    root = tmp_path_factory.mktemp("evaluate")
    corpus = root / "corpus"
    corpus.mkdir()
    write_corpus(corpus, {"train": 20, "val": 10, "test": 15})
    summary = train_retrieval(retrieval_config(corpus, "optim.epochs=1", "run.threads=1"), root / "run", progress=False)
    return corpus, summary["best"]


def test_evaluation_splits_and_protocols_differ(trained: tuple[Path, Path]) -> None:
    """Precondition of the evaluate tests: the figures tell val from test, and fold5 from all."""
    corpus, best = trained
    val = library_figures(best, corpus, "val", ("all", "fold5"))
    test = library_figures(best, corpus, "test", ("all", "fold5"))
    assert val["all"].as_dict() != test["all"].as_dict()
    assert val["fold5"].rsum != test["fold5"].rsum
    assert test["fold5"].rsum != test["all"].rsum and len(test["fold5"].folds) == 5


@pytest.mark.parametrize(("options", "split", "protocols"), [
    ((), "val", ("all",)),
    (("--split", "test", "--protocol", "fold5"), "test", ("fold5",)),
    (("--split", "test", "--protocol", "all", "--protocol", "fold5", "--data", "CORPUS"), "test", ("all", "fold5")),
], ids=["defaults", "test-fold5", "test-all-fold5-data"])
def test_evaluate_prints_and_writes_the_library_figures(trained: tuple[Path, Path], tmp_path: Path,
                                                        options: tuple[str, ...], split: str,
                                                        protocols: tuple[str, ...]) -> None:
    corpus, best = trained
    out = tmp_path / "metrics.json"
    options = tuple(str(corpus) if o == "CORPUS" else o for o in options)
    result = invoke("evaluate", "--checkpoint", best, *options, "--out", out, "--device", "cpu")
    expected = library_figures(best, corpus, split, protocols)

    written = json.loads(out.read_text())
    assert list(written) == list(protocols)
    for protocol in protocols:
        figures = expected[protocol].as_dict()
        assert written[protocol].keys() == figures.keys()
        for name in Metrics.__dataclass_fields__:
            if name != "folds":
                assert written[protocol][name] == pytest.approx(figures[name], abs=1e-9), (protocol, name)
        if protocol == "fold5":
            assert len(written[protocol]["folds"]) == 5
            for got, want in zip(written[protocol]["folds"], figures["folds"]):
                assert got == pytest.approx(want, abs=1e-9)

    rows = parse_table(result.stdout)
    expected_rows = []
    for protocol in protocols:  # a row per protocol, then one per fold under fold5's
        expected_rows += [protocol] + [f"fold {i + 1}" for i in range(len(expected[protocol].folds))]
    assert list(rows) == expected_rows
    for protocol in protocols:
        assert_row_is(rows[protocol], expected[protocol])
        for i, fold in enumerate(expected[protocol].folds):
            assert_row_is(rows[f"fold {i + 1}"], fold)
    assert f"wrote {out}" in result.stdout


# ---------------------------------------------------------------------------------------------- train
def test_train_prints_the_best_checkpoints_rsum(tmp_path: Path) -> None:
    """A YAML config plus --set overrides (which win over the file) trains; the printed best rSum is best.pt's."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    write_corpus(corpus, {"train": 20, "val": 6})
    config = tmp_path / "tiny.yaml"
    config.write_text(nested_yaml([
        "data.path=/nonexistent", "data.val_split=val", "model.embed_dim=16", "model.region_dim=12",
        "model.text_encoder=bigru", "model.word_dim=8", "model.queue_size=10", "optim.epochs=5",
        "optim.batch_size=8", "optim.lr=1e-3", "optim.lr_decay_epochs=[1]", "run.threads=1"]))
    run = tmp_path / "run"
    result = invoke("train", "--config", config, "--set", f"data.path={corpus}", "--set", "optim.epochs=2",
                    "--out", run)
    found = re.search(r"best val rSum (\d+\.\d\d) at epoch (\d+); checkpoints in (\S+)", result.stdout)
    assert found, result.stdout
    for name in ("last.pt", "best.pt", "config.yaml", "log.jsonl", "curves.png"):
        assert (run / name).is_file(), name
    assert Path(found.group(3)) == run

    best, last = read_checkpoint(run / "best.pt"), read_checkpoint(run / "last.pt")
    assert last["epoch"] == 2 and last["config"]["optim"]["epochs"] == 2  # --set won over the YAML's 5
    assert last["config"]["data"]["path"] == str(corpus) and best["config"]["model"]["embed_dim"] == 16
    assert abs(float(found.group(1)) - best["best_rsum"]) <= PRINTED
    assert int(found.group(2)) == best["best_epoch"] == best["epoch"]
    evaluated = library_figures(run / "best.pt", corpus, "val", ("all",))["all"]
    assert abs(float(found.group(1)) - evaluated.rsum) <= PRINTED
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert max(r["val_rsum"] for r in log if "val_rsum" in r) == pytest.approx(best["best_rsum"])


# ------------------------------------------------------------------------------------------- features
def test_features_writes_the_requested_splits_of_the_given_backbone(tmp_path: Path) -> None:
    """``--split``, ``--backbone``, ``--backbone-weights`` (a local state dict) and ``--image-size`` reach the
    extraction: one (h * w, C) float16 grid per image of each requested split, equal to the backbone's own."""
    world, out = tmp_path / "world", tmp_path / "features"
    invoke("data", "shapes", "--out", world, "--images", "10", "--size", "64")
    torch.manual_seed(3)
    weights = tmp_path / "resnet18.pth"
    torch.save(build_image_backbone("resnet18", None).net.state_dict(), weights)

    result = invoke("features", "--data", world, "--split", "val", "--split", "test", "--backbone", "resnet18",
                    "--backbone-weights", weights, "--image-size", "64", "--batch-size", "4", "--device", "cpu",
                    "--out", out)
    assert f"wrote {out / 'val_ims.npy'}" in result.stdout and f"wrote {out / 'test_ims.npy'}" in result.stdout
    assert not (out / "train_ims.npy").exists()
    corpus = json.loads((world / "dataset_shapes.json").read_text())
    backbone = build_image_backbone("resnet18", weights).eval()
    for split in ("val", "test"):
        images = [im for im in corpus["images"] if im["split"] == split]
        features = np.load(out / f"{split}_ims.npy")
        # ResNet-18: output stride 32 (64 px -> a 2 x 2 grid), 512 channels in its last stage
        assert features.shape == (len(images), 2 * 2, 512) and features.dtype == np.float16
        assert len((out / f"{split}_caps.txt").read_text().splitlines()) == sum(len(im["sentences"])
                                                                                for im in images)
        paths = open_split(world, split).image_paths
        pixels = torch.from_numpy(np.stack([load_image(p, 64) for p in paths]))
        with torch.no_grad():
            expected = backbone(backbone.preprocess(pixels)).flatten(2).transpose(1, 2)
        torch.testing.assert_close(torch.from_numpy(features.astype(np.float32)), expected, rtol=2e-3, atol=2e-3)


# -------------------------------------------------------------------------------------------- distill


def test_distill_pretrain_then_probe(tmp_path: Path) -> None:
    """Pretrain (YAML + a --set that wins) writes its checkpoint; the probe of it prints the mIoU its JSON holds
    and records the options it was given."""
    config = tmp_path / "distill.yaml"
    config.write_text(nested_yaml(DISTILL_TINY))
    run = tmp_path / "run"
    result = invoke("distill", "pretrain", "--config", config, "--set", "optim.steps=3", "--out", run)
    assert result.stdout.strip().splitlines()[-1] == f"wrote {run / 'last.pt'}"
    state = read_checkpoint(run / "last.pt")
    assert state["global_step"] == 3 and state["config"]["voxel"]["widths"] == [4, 8]

    probe = tmp_path / "probe"
    result = invoke("distill", "probe", "--config", config, "--checkpoint", run / "last.pt", "--mode", "linear",
                    "--label-fraction", "0.5", "--out", probe)
    written = json.loads((probe / "probe_linear.json").read_text())
    assert written["mode"] == "linear" and written["label_fraction"] == 0.5
    assert written["checkpoint"] == str(run / "last.pt") and written["train_scenes"] == 1  # round(0.5 * 2) scenes
    found = re.search(r"^\s*mIoU\s+(\d+\.\d)$", result.stdout, re.MULTILINE)
    assert found, result.stdout
    assert abs(float(found.group(1)) - 100 * written["miou"]) <= 0.05 + 1e-9
    defined = [iou for iou in written["iou"].values() if iou is not None]
    assert written["miou"] == pytest.approx(sum(defined) / len(defined))


# ----------------------------------------------------------------------------------------------- demo
@pytest.mark.slow
def test_demo_with_a_tiny_budget(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``--images`` and ``--epochs`` reach the demo, and its table holds each run's test figures."""
    monkeypatch.chdir(REPO)  # the demo reads configs/ from the current folder
    out = tmp_path / "demo"
    result = invoke("demo", "--out", out, "--images", "20", "--epochs", "1")
    corpus = json.loads((out / "shapes" / "dataset_shapes.json").read_text())
    assert len(corpus["images"]) == 20
    rows = parse_table(result.stdout)
    assert list(rows) == [f"{name} (test)" for name in DEMO_RUNS]
    for name, (folder, _) in DEMO_RUNS.items():
        assert read_checkpoint(out / folder / "last.pt")["epoch"] == 1
        assert_row_is(rows[f"{name} (test)"],
                      library_figures(out / folder / "best.pt", out / "features", "test", ("all",))["all"])
    # the CGE run's teacher: trained with the same budget, its cache read by that run
    assert read_checkpoint(out / "clip" / "last.pt")["epoch"] == 1
    assert read_checkpoint(out / "user_cge_tolerant" / "last.pt")["config"]["model"]["clip_cache"] == str(
        out / "clip_cache")
