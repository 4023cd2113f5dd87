"""A checkpoint from someone else never runs code: a harmless payload (building it would create a file in
tmp_path) written as a torch ``.pt`` and as a plain pickle is refused by every loader, with one line naming the
file, and the file it would create never appears."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from xmcl.cli import main
from xmcl.data.shapes import generate_shapes_world
from xmcl.retrieval.clip.config import ClipModelConfig
from xmcl.retrieval.clip.small import new_clip_model

from helpers import DISTILL_TINY, write_corpus

RETRIEVAL_YAML = """
data: {val_split: val}
model: {embed_dim: 16, region_dim: 12, text_encoder: bigru, word_dim: 8, queue_size: 10}
optim: {epochs: 1, batch_size: 8}
run: {threads: 1, device: cpu}
"""


class Payload:
    """Unpickling this calls ``open(marker, "w")``: it would create ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def write_payload(path: Path, marker: Path, form: str, kind: str = "xmcl.retrieval", version: int = 3) -> Path:
    """A file at ``path`` whose loading with a full unpickler creates ``marker``; it looks like a checkpoint of
    ``kind`` and ``version`` (the current ones, so that only its payload is at fault)."""
    state = {"kind": kind, "version": version, "config": {}, "model": Payload(marker)}
    path.parent.mkdir(parents=True, exist_ok=True)
    if form == "torch":
        torch.save(state, path)
    else:
        path.write_bytes(pickle.dumps(state, protocol=2))
    return path


@pytest.fixture(scope="module")
def corpora(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("safe")
    features = root / "features"
    features.mkdir()
    write_corpus(features, {"train": 20, "val": 6})
    config = root / "retrieval.yaml"
    config.write_text(RETRIEVAL_YAML.replace("{val_split: val}", f"{{val_split: val, path: '{features}'}}"))
    distill = root / "distill.yaml"
    distill.write_text("\n".join(f"{k}: {v}" for k, v in _nested(DISTILL_TINY).items()))
    generate_shapes_world(root / "shapes", num_images=20, seed=0, image_size=64, progress=False)
    clip = root / "clip_dir"
    new_clip_model(ClipModelConfig(image_size=32, patch_size=8, width=32, layers=1, heads=1, embed_dim=8,
                                   context_length=24), vocab_size=600).save_pretrained(str(clip))
    (clip / "model.safetensors").unlink()
    return {"features": features, "retrieval": config, "distill": distill, "shapes": root / "shapes", "clip": clip}


def _nested(items: list[str]) -> dict[str, str]:
    """``a.b=v`` items as one YAML flow mapping per top-level key."""
    tree: dict[str, dict[str, str]] = {}
    for item in items:
        key, value = item.split("=", 1)
        section, leaf = key.split(".", 1)
        tree.setdefault(section, {})[leaf] = value
    return {section: "{" + ", ".join(f"{k}: {v}" for k, v in leaves.items()) + "}" for section, leaves in tree.items()}


LOADERS = ["evaluate", "train-resume", "distill-probe", "distill-resume", "train-clip-resume", "features-weights",
           "clip-cache-pt", "clip-cache-directory"]


def invocation(loader: str, corpora: dict[str, Path], tmp_path: Path, marker: Path, form: str) -> list[str]:
    """The command line that makes ``loader`` read a payload file (written here)."""
    run = tmp_path / "run"
    if loader == "evaluate":
        return ["evaluate", "--checkpoint", str(write_payload(tmp_path / "best.pt", marker, form)), "--device", "cpu"]
    if loader == "train-resume":
        write_payload(run / "last.pt", marker, form)
        return ["train", "--config", str(corpora["retrieval"]), "--out", str(run)]
    if loader == "distill-probe":
        payload = write_payload(tmp_path / "pre.pt", marker, form, "xmcl.distill.pretrain", 3)
        return ["distill", "probe", "--config", str(corpora["distill"]), "--checkpoint", str(payload), "--out",
                str(tmp_path / "probe")]
    if loader == "distill-resume":
        write_payload(run / "last.pt", marker, form, "xmcl.distill.pretrain", 3)
        return ["distill", "pretrain", "--config", str(corpora["distill"]), "--out", str(run)]
    if loader == "train-clip-resume":
        write_payload(run / "last.pt", marker, form, "xmcl.clip.train", 2)
        return ["train-clip", "--data", str(corpora["shapes"]), "--out", str(run), "--set", "run.device=cpu"]
    if loader == "features-weights":
        weights = write_payload(tmp_path / "weights.pt", marker, form)
        return ["features", "--data", str(corpora["shapes"]), "--split", "val", "--backbone", "resnet18",
                "--backbone-weights", str(weights), "--out", str(tmp_path / "feats"), "--device", "cpu"]
    if loader == "clip-cache-pt":
        return ["clip-cache", "--clip", str(write_payload(tmp_path / "clip.pt", marker, form)), "--data",
                str(corpora["shapes"]), "--out", str(tmp_path / "cache"), "--device", "cpu"]
    clip = tmp_path / "clip"
    clip.mkdir()
    (clip / "config.json").write_bytes((corpora["clip"] / "config.json").read_bytes())
    write_payload(clip / "pytorch_model.bin", marker, form)
    return ["clip-cache", "--clip", str(clip), "--data", str(corpora["shapes"]), "--out", str(tmp_path / "cache"),
            "--device", "cpu"]


@pytest.mark.parametrize("form", ["torch", "pickle"])
@pytest.mark.parametrize("loader", LOADERS)
def test_every_loader_refuses_a_payload_without_running_it(loader: str, form: str, corpora: dict[str, Path],
                                                           tmp_path: Path) -> None:
    marker = tmp_path / "payload_ran"
    args = invocation(loader, corpora, tmp_path, marker, form)
    result = CliRunner().invoke(main, args)
    assert not marker.exists(), "the payload ran"
    assert result.exit_code == 2, (result.output, result.exception)
    assert "error:" in result.output and "Traceback" not in result.output
    assert "refused" in result.output or "cannot be read" in result.output or "cannot load" in result.output, \
        result.output
