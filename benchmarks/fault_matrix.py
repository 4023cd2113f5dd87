"""The faults no test inflicts, run through the command line: SIGTERM sent to ``xmcl train`` mid-epoch, then the same
command again. Prints the exit status and the line xmcl printed, the step ``last.pt`` holds, and whether the resumed
run's final weights are bit-identical to an uninterrupted run's and its log holds each step once.

Every other fault a user or a machine inflicts is asserted by the tests: kill -9 anywhere (tests/test_kill_resume.py),
Ctrl-C, two writers, stale locks, changed settings, finished runs, output paths, weights that do not fit
(tests/test_run_folder.py), crafted checkpoints (tests/test_safe_loading.py), failed writes (tests/test_checkpoint.py),
bad options and folders as paths (tests/test_cli.py, tests/test_config.py), unreadable images
(tests/test_grid_features.py), garbage lidar files (tests/test_distill_readers.py).

    python benchmarks/fault_matrix.py            # about a minute on 2 busy cores
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml

from xmcl.runtime.checkpoint import read_checkpoint
from xmcl.runtime.log import read_jsonl

REPO = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, PYTHONPATH=str(REPO / "src"), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
WORDS = ["red", "blue", "green", "circle", "square", "star", "left", "right", "big", "small"]
CONFIG = {"run": {"threads": 1, "device": "cpu", "progress": False, "checkpoint_every": 5},
          "data": {"val_split": "val"},
          "model": {"embed_dim": 16, "region_dim": 12, "text_encoder": "bigru", "word_dim": 8, "queue_size": 10},
          "optim": {"epochs": 2, "batch_size": 8, "lr": 1e-3, "lr_decay_epochs": [1]}}


def write_corpus(root: Path, images: dict[str, int]) -> Path:
    """Precomputed features (4 regions of 12) and two captions per image, of words the features pick."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True)
    for split, n in images.items():
        feats = rng.normal(size=(n, 4, 12)).astype(np.float32)
        captions = []
        for i in range(n):
            words = [WORDS[int(j)] for j in np.argsort(feats[i].mean(0))[-3:] % len(WORDS)]
            captions += [" ".join(rng.permutation(words)) for _ in range(2)]
        np.save(root / f"{split}_ims.npy", feats)
        (root / f"{split}_caps.txt").write_text("\n".join(captions) + "\n")
    return root


def train(config: Path, out: Path) -> subprocess.Popen:
    """``xmcl train --config CONFIG --out OUT`` in a process of its own."""
    return subprocess.Popen([sys.executable, "-m", "xmcl", "train", "--config", str(config), "--out", str(out)],
                            env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def logged_steps(folder: Path) -> list[int]:
    """The steps of the run's step records in ``log.jsonl``, in the order logged."""
    path = folder / "log.jsonl"
    return [r["step"] for r in read_jsonl(path) if "loss" in r] if path.is_file() else []


def same_weights(a: Path, b: Path) -> bool:
    wa, wb = read_checkpoint(a)["model"], read_checkpoint(b)["model"]
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def last_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip() and not line.startswith(" ")]
    return lines[-1] if lines else ""


def signal_mid_epoch(config: Path, straight: Path, folder: Path, name: str) -> str:
    """``name`` sent to a training run after its 27th step, then the run resumed: what happened."""
    process = train(config, folder)
    deadline = time.monotonic() + 300
    while len(logged_steps(folder)) < 27 and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    process.send_signal(getattr(signal, name))
    _, err = process.communicate(timeout=600)
    at = read_checkpoint(folder / "last.pt")["global_step"]
    resumed = train(config, folder)
    resumed.communicate(timeout=600)
    exact = resumed.returncode == 0 and same_weights(folder / "last.pt", straight / "last.pt")
    steps = logged_steps(folder)
    return (f"exit {process.returncode}, last.pt at step {at}: '{last_line(err)}'; resume exit {resumed.returncode}, "
            f"weights bit-identical: {exact}, each step logged once: {steps == sorted(set(steps))}")


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="xmcl-faults-"))
    try:
        config = work / "tiny.yaml"
        config.write_text(yaml.safe_dump({**CONFIG, "data": {**CONFIG["data"], "path": str(
            write_corpus(work / "corpus", {"train": 200, "val": 10}))}}))
        straight = train(config, work / "straight")
        _, err = straight.communicate(timeout=600)
        assert straight.returncode == 0, err
        outcome = signal_mid_epoch(config, work / "straight", work / "sigterm", "SIGTERM")
        print(f"SIGTERM mid-epoch, then resume: {outcome.replace(str(work), 'TMP')}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
