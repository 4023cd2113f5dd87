"""The command line: commands delegate, and a bad input ends with one clear line and exit status 2."""

import json
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from xmcl.cli import main
from xmcl.runtime.checkpoint import read_checkpoint


def test_help_lists_the_commands() -> None:
    result = CliRunner().invoke(main, ["--help"])
    assert result.exit_code == 0
    for command in ("data", "features", "train", "evaluate", "demo", "distill", "train-clip", "clip-cache"):
        assert command in result.output


def test_data_shapes_writes_a_karpathy_corpus(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["data", "shapes", "--out", str(tmp_path / "w"), "--images", "20",
                                       "--seed", "3", "--size", "64"])
    assert result.exit_code == 0, result.output
    corpus = json.loads((tmp_path / "w" / "dataset_shapes.json").read_text())
    assert len(corpus["images"]) == 20
    assert all(len(image["sentences"]) == 5 for image in corpus["images"])


def test_missing_checkpoint_is_one_clear_line(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["evaluate", "--checkpoint", str(tmp_path / "absent.pt")])
    assert result.exit_code == 2
    assert "error:" in result.output and "absent.pt does not exist" in result.output
    assert "Traceback" not in result.output


def test_bad_override_names_the_key(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("optim:\n  epochs: 1\n")
    result = CliRunner().invoke(main, ["train", "--config", str(config), "--set", "optim.epoch=2",
                                       "--out", str(tmp_path / "run")])
    assert result.exit_code == 2
    assert "'optim.epoch'" in result.output


def test_train_clip_then_clip_cache(tmp_path: Path) -> None:
    world = tmp_path / "w"
    assert CliRunner().invoke(main, ["data", "shapes", "--out", str(world), "--images", "20", "--size", "64"]
                              ).exit_code == 0
    tiny = ["model.image_size=32", "model.patch_size=8", "model.width=32", "model.layers=1", "model.heads=1",
            "model.embed_dim=8", "model.context_length=24", "optim.batch_size=8", "optim.epochs=2", "run.device=cpu"]
    result = CliRunner().invoke(main, ["train-clip", "--data", str(world), "--out", str(tmp_path / "clip")]
                                + [arg for item in tiny for arg in ("--set", item)])
    assert result.exit_code == 0, result.output
    assert "best val rSum" in result.output and (tmp_path / "clip" / "model.safetensors").is_file()

    result = CliRunner().invoke(main, ["clip-cache", "--clip", str(tmp_path / "clip"), "--data", str(world),
                                       "--split", "val", "--out", str(tmp_path / "cache"), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / "cache" / "manifest.json").read_text())
    assert manifest["dim"] == 8 and list(manifest["splits"]) == ["val"] and manifest["splits"]["val"]["complete"]


def test_clip_cache_names_a_clip_folder_without_config(tmp_path: Path) -> None:
    world, clip = tmp_path / "w", tmp_path / "clip"
    CliRunner().invoke(main, ["data", "shapes", "--out", str(world), "--images", "20", "--size", "64"])
    clip.mkdir()
    result = CliRunner().invoke(main, ["clip-cache", "--clip", str(clip), "--data", str(world), "--out",
                                       str(tmp_path / "cache")])
    assert result.exit_code == 2
    assert f"CLIP directory {clip} has no config.json" in result.output and "Traceback" not in result.output


def test_the_cli_runs_as_a_module() -> None:
    """``python -m xmcl`` is the same CLI (``torchrun -m xmcl`` launches it that way)."""
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "xmcl", "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "train-clip" in result.stdout and "distill" in result.stdout


# ------------------------------------------------------------------------------- one-line refusals before any work
def _trained(tmp_path: Path) -> Path:
    """best.pt of a one-epoch tiny run on a 10-image val split (so that fold5 has folds of 2 images)."""
    from helpers import retrieval_config, write_corpus

    from xmcl.training.retrieval_trainer import train_retrieval

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    write_corpus(corpus, {"train": 20, "val": 10})
    return train_retrieval(retrieval_config(corpus, "optim.epochs=1", "run.threads=1"), tmp_path / "run",
                           progress=False)["best"]


def test_evaluate_refuses_a_folder_as_out_before_computing_and_warns_on_small_folds(tmp_path: Path,
                                                                                   monkeypatch) -> None:
    import xmcl.retrieval.inference as inference

    best = _trained(tmp_path)
    computed = {"n": 0}
    evaluate = inference.evaluate_checkpoint

    def counting(*args, **kwargs):
        computed["n"] += 1
        return evaluate(*args, **kwargs)

    monkeypatch.setattr(inference, "evaluate_checkpoint", counting)
    result = CliRunner().invoke(main, ["evaluate", "--checkpoint", str(best), "--out", str(tmp_path), "--device",
                                       "cpu"])
    assert result.exit_code == 2 and computed["n"] == 0
    assert f"--out {tmp_path} is a folder; give a file path" in result.output and "Traceback" not in result.output

    result = CliRunner().invoke(main, ["evaluate", "--checkpoint", str(best), "--protocol", "fold5", "--device",
                                       "cpu"])
    assert result.exit_code == 0 and computed["n"] == 1
    assert "warning: fold5: folds of 2 images, not the 1,000 of the COCO 1K protocol" in result.stderr
    assert result.stdout.splitlines()[1].split()[0] == "protocol"  # the table heads its rows by protocol


def test_a_run_folder_given_as_checkpoint_is_named(tmp_path: Path) -> None:
    best = _trained(tmp_path)
    result = CliRunner().invoke(main, ["evaluate", "--checkpoint", str(best.parent)])
    assert result.exit_code == 2
    assert f"checkpoint {best.parent} is a directory, not a checkpoint file; did you mean {best}?" in result.output


def test_no_resume_into_a_run_is_refused_without_overwrite(tmp_path: Path) -> None:
    best = _trained(tmp_path)
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(read_checkpoint(best)["config"]))
    before = best.read_bytes()
    result = CliRunner().invoke(main, ["train", "--config", str(config), "--out", str(best.parent), "--no-resume"])
    assert result.exit_code == 2 and "--overwrite" in result.output and "Traceback" not in result.output
    assert best.read_bytes() == before


@pytest.mark.parametrize("command", [
    ["features", "--data", "DATA", "--batch-size", "0", "--out", "OUT"],
    ["clip-cache", "--clip", "DATA", "--data", "DATA", "--shard-size", "0", "--out", "OUT"],
    ["data", "shapes", "--out", "OUT", "--images", "0"],
], ids=["features-batch-size", "clip-cache-shard-size", "shapes-images"])
def test_out_of_range_options_are_one_line(tmp_path: Path, command: list[str]) -> None:
    args = [str(tmp_path) if a == "DATA" else str(tmp_path / "out") if a == "OUT" else a for a in command]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2 and "is not in the range" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "out").exists()


def test_library_feature_extraction_refuses_a_batch_size_of_zero(tmp_path: Path) -> None:
    from xmcl.errors import ConfigError
    from xmcl.retrieval.grid_features import extract_corpus_features

    with pytest.raises(ConfigError, match=r"batch size \(--batch-size\) = 0 is out of range: must be >= 1"):
        extract_corpus_features(tmp_path, ("val",), "resnet18", "none", tmp_path / "out", batch_size=0)
    assert not (tmp_path / "out").exists()


def test_out_under_a_file_is_one_line(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    result = CliRunner().invoke(main, ["features", "--data", str(tmp_path), "--out", str(blocker / "feats")])
    assert result.exit_code == 2
    assert f"features folder {blocker / 'feats'} cannot be created: {blocker} is a file" in result.output


def test_shapes_into_a_non_empty_folder_names_the_overwrite_flag(tmp_path: Path) -> None:
    out = tmp_path / "w"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    result = CliRunner().invoke(main, ["data", "shapes", "--out", str(out), "--images", "20", "--size", "64"])
    assert result.exit_code == 2 and "pass --overwrite to replace it" in result.output
    result = CliRunner().invoke(main, ["data", "shapes", "--out", str(out), "--images", "20", "--size", "64",
                                       "--overwrite"])
    assert result.exit_code == 0, result.output
    assert (out / "dataset_shapes.json").is_file() and not (out / "keep.txt").exists()
