"""Fault injection: run each fault a user or a machine inflicts on xmcl and print what happened.

Every fault runs the real command line (``python -m xmcl ...`` in a process of its own) on tiny generated data in a
temporary folder, except the lidar files, which go straight to the reader. The table prints, per fault, the
outcome (exit status and the line xmcl printed) and whether data was lost: a checkpoint, a log record, a best
model or a computed result that existed or was computed before the fault and is gone or wrong after it (for the
kills and signals: whether the resumed run's final weights differ from an uninterrupted run's).

    python benchmarks/fault_matrix.py            # about 5 minutes on 2 busy cores
"""

from __future__ import annotations

import json
import os
import pickle
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from xmcl.data.shapes import generate_shapes_world  # noqa: E402
from xmcl.distill.scene import read_points_bin  # noqa: E402
from xmcl.errors import DataError  # noqa: E402
from xmcl.runtime.checkpoint import read_checkpoint, save_checkpoint  # noqa: E402

ENV = dict(os.environ, PYTHONPATH=str(REPO / "src"), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
WORDS = ["red", "blue", "green", "circle", "square", "star", "left", "right", "big", "small"]
CONFIG = {"run": {"threads": 1, "device": "cpu", "progress": False, "checkpoint_every": 5},
          "data": {"val_split": "val"},
          "model": {"embed_dim": 16, "region_dim": 12, "text_encoder": "bigru", "word_dim": 8, "queue_size": 10},
          "optim": {"epochs": 2, "batch_size": 8, "lr": 1e-3, "lr_decay_epochs": [1]}}
# kill -9 halfway through the second checkpoint write (the rest of the run is the real CLI)
KILL_MID_WRITE = """
import io, os, signal, sys, torch
save, calls = torch.save, [0]
def killing_save(obj, handle, *a, **k):
    calls[0] += 1
    if calls[0] == 2:
        buffer = io.BytesIO(); save(obj, buffer); handle.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
        handle.flush(); os.kill(os.getpid(), signal.SIGKILL)
    return save(obj, handle, *a, **k)
torch.save = killing_save
from xmcl.cli import main
sys.argv = ["xmcl", *sys.argv[1:]]
main()
"""
HOLD_LOCK = "import sys, time; from xmcl.runtime.lock import RunLock; RunLock(sys.argv[1]).acquire(); " \
            "print('locked', flush=True); time.sleep(120)"


class Payload:
    """Building it calls ``open(marker, "w")``: proof that a loader ran code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def xmcl(*args: object, timeout: int = 600, limit_bytes: int | None = None) -> subprocess.CompletedProcess:
    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, resource.RLIM_INFINITY))

    return subprocess.run([sys.executable, "-m", "xmcl", *map(str, args)], env=ENV, capture_output=True, text=True,
                          timeout=timeout, preexec_fn=limit if limit_bytes else None)


def start(*args: object) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "xmcl", *map(str, args)], env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def step_records(folder: Path) -> int:
    try:
        return sum('"loss"' in line for line in (folder / "log.jsonl").read_text().splitlines())
    except FileNotFoundError:
        return 0


def wait_for_steps(folder: Path, steps: int, process: subprocess.Popen, timeout: float = 300) -> bool:
    """Whether the run logged ``steps`` steps while still running."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        if step_records(folder) >= steps:
            return True
        time.sleep(0.01)
    return False


def last_line(result: subprocess.CompletedProcess | str) -> str:
    text = result if isinstance(result, str) else (result.stderr.strip() or result.stdout.strip())
    lines = [line for line in text.splitlines() if line.strip() and not line.startswith(" ")]
    return lines[-1] if lines else ""


def same_weights(a: Path, b: Path) -> bool:
    wa, wb = read_checkpoint(a)["model"], read_checkpoint(b)["model"]
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def clean_log(folder: Path) -> bool:
    """log.jsonl holds each step once, in order."""
    steps = [json.loads(line)["step"] for line in (folder / "log.jsonl").read_text().splitlines() if '"loss"' in line]
    return steps == sorted(set(steps))


def write_corpus(root: Path, images: dict[str, int]) -> Path:
    rng = np.random.default_rng(0)
    root.mkdir(parents=True)
    for split, n in images.items():
        feats = rng.normal(size=(n, 4, 12)).astype(np.float32)
        caps = []
        for i in range(n):
            words = [WORDS[int(j)] for j in np.argsort(feats[i].mean(0))[-3:] % len(WORDS)]
            caps += [" ".join(rng.permutation(words)) for _ in range(2)]
        np.save(root / f"{split}_ims.npy", feats)
        (root / f"{split}_caps.txt").write_text("\n".join(caps) + "\n")
    return root


class Matrix:
    def __init__(self, work: Path) -> None:
        self.work, self.rows = work, []
        self.corpus = write_corpus(work / "corpus", {"train": 200, "val": 10})
        self.config = work / "tiny.yaml"
        config = json.loads(json.dumps(CONFIG))
        config["data"]["path"] = str(self.corpus)
        self.config.write_text(yaml.safe_dump(config))
        self.straight = work / "straight"
        result = xmcl("train", "--config", self.config, "--out", self.straight)
        assert result.returncode == 0, result.stderr

    def train(self, out: Path, *extra: object, **kwargs) -> subprocess.CompletedProcess:
        return xmcl("train", "--config", self.config, "--out", out, *extra, **kwargs)

    def fresh(self, name: str) -> Path:
        """A copy of the finished straight run."""
        target = self.work / name
        shutil.copytree(self.straight, target)
        return target

    def record(self, fault: str, check: Callable[[Path], tuple[str, bool]]) -> None:
        folder = self.work / fault.replace(" ", "_").replace("/", "_")[:40]
        began = time.perf_counter()
        try:
            outcome, lost = check(folder)
        except Exception as error:  # a fault the matrix did not foresee: report it, do not stop
            outcome, lost = f"UNEXPECTED {type(error).__name__}: {error}", True
        outcome = outcome.replace(str(folder), "OUT").replace(str(self.work), "TMP")
        self.rows.append((fault, outcome, "yes" if lost else "no", time.perf_counter() - began))
        print(f"  {fault}: {outcome} [{time.perf_counter() - began:.0f} s]", file=sys.stderr, flush=True)

    # --------------------------------------------------------------------------------------------- faults
    def payload(self, form: str) -> Callable[[Path], tuple[str, bool]]:
        def check(folder: Path) -> tuple[str, bool]:
            folder.mkdir()
            marker = folder / "payload_ran"
            state = {"kind": "xmcl.retrieval", "version": 3, "model": Payload(marker)}
            path = folder / "best.pt"
            if form == "torch":
                torch.save(state, path)
            else:
                path.write_bytes(pickle.dumps(state, protocol=2))
            evaluated = xmcl("evaluate", "--checkpoint", path, "--device", "cpu")
            run = folder / "run"
            run.mkdir()
            shutil.copy(path, run / "last.pt")
            resumed = self.train(run)
            ran = marker.exists()
            return (f"evaluate exit {evaluated.returncode}, train resume exit {resumed.returncode}: "
                    f"{last_line(evaluated)[7:130]}...; payload ran: {ran}"), ran
        return check

    def two_writers(self, folder: Path) -> tuple[str, bool]:
        first = start("train", "--config", self.config, "--out", folder, "--set", "optim.epochs=3")
        while not (folder / ".xmcl.lock").exists() and first.poll() is None:
            time.sleep(0.01)
        second = self.train(folder)
        first.wait(timeout=600)
        cfg = yaml.safe_load((folder / "config.yaml").read_text())
        consistent = cfg == read_checkpoint(folder / "last.pt")["config"] and clean_log(folder)
        return (f"second exit {second.returncode} at once ({last_line(second)[7:90]}...); first exit "
                f"{first.returncode}, its files consistent: {consistent}"), not (consistent and first.returncode == 0)

    def kill_mid_epoch(self, folder: Path) -> tuple[str, bool]:
        process = start("train", "--config", self.config, "--out", folder)
        reached = wait_for_steps(folder, 38, process)
        process.send_signal(signal.SIGKILL)
        process.wait()
        at = read_checkpoint(folder / "last.pt")["global_step"] if (folder / "last.pt").exists() else 0
        resumed = self.train(folder)
        exact = resumed.returncode == 0 and same_weights(folder / "last.pt", self.straight / "last.pt")
        return (f"killed mid-run: {reached}, last.pt at step {at}; resume exit {resumed.returncode}, weights "
                f"bit-identical: {exact}, log clean: {clean_log(folder)}"), not (exact and clean_log(folder))

    def kill_mid_write(self, folder: Path) -> tuple[str, bool]:
        killed = subprocess.run([sys.executable, "-c", KILL_MID_WRITE, "train", "--config", str(self.config),
                                 "--out", str(folder)], env=ENV, capture_output=True, text=True, timeout=600)
        at = read_checkpoint(folder / "last.pt")["global_step"]
        resumed = self.train(folder)
        exact = resumed.returncode == 0 and same_weights(folder / "last.pt", self.straight / "last.pt")
        leftovers = [p.name for p in folder.iterdir() if ".xmcl-" in p.name]
        return (f"exit {killed.returncode}, previous last.pt intact (step {at}); resume bit-identical: {exact}, "
                f"temporaries left: {len(leftovers)}"), not exact

    def signal_mid_epoch(self, name: str) -> Callable[[Path], tuple[str, bool]]:
        def check(folder: Path) -> tuple[str, bool]:
            process = start("train", "--config", self.config, "--out", folder)
            wait_for_steps(folder, 27, process)
            process.send_signal(getattr(signal, name))
            _, err = process.communicate(timeout=600)
            at = read_checkpoint(folder / "last.pt")["global_step"]
            resumed = self.train(folder)
            exact = resumed.returncode == 0 and same_weights(folder / "last.pt", self.straight / "last.pt")
            return (f"exit {process.returncode}, last.pt at step {at}: '{last_line(err)[7:60]}...'; resume "
                    f"bit-identical: {exact}"), not exact
        return check

    def no_resume(self, folder: Path) -> tuple[str, bool]:
        run = self.fresh(folder.name)
        best = (run / "best.pt").read_bytes()
        result = self.train(run, "--no-resume")
        return f"exit {result.returncode}: {last_line(result)[7:100]}...", (run / "best.pt").read_bytes() != best

    def changed_lr(self, folder: Path) -> tuple[str, bool]:
        run = self.fresh(folder.name)
        before = (run / "config.yaml").read_bytes()
        result = self.train(run, "--set", "optim.lr=0.01", "--set", "optim.epochs=3")
        return (f"exit {result.returncode}: {last_line(result)[7:95]}...",
                (run / "config.yaml").read_bytes() != before)

    def finished(self, folder: Path) -> tuple[str, bool]:
        run = self.fresh(folder.name)
        before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
        result = self.train(run)
        after = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
        note = next((line for line in result.stderr.splitlines() if "already finished" in line), "")
        return f"exit {result.returncode}: '{note[:95]}...'", before != after

    def bad_value(self, folder: Path) -> tuple[str, bool]:
        result = self.train(folder, "--set", "optim.batch_size=-4")
        return f"exit {result.returncode}: {last_line(result)[7:]}; folder created: {folder.exists()}", False

    def missing_data(self, folder: Path) -> tuple[str, bool]:
        result = self.train(folder, "--set", "data.path=no/such/corpus")
        return f"exit {result.returncode}: {last_line(result)[7:70]}...; folder left: {folder.exists()}", False

    def features_batch_zero(self, folder: Path) -> tuple[str, bool]:
        result = xmcl("features", "--data", self.corpus, "--batch-size", "0", "--out", folder)
        return f"exit {result.returncode}: {last_line(result)[:80]}", False

    def missing_weight(self, folder: Path) -> tuple[str, bool]:
        folder.mkdir()
        state = read_checkpoint(self.straight / "best.pt")
        del state["model"][next(k for k in state["model"] if k.endswith("weight"))]
        save_checkpoint(folder / "best.pt", state.pop("kind"), state.pop("version"), state)
        result = xmcl("evaluate", "--checkpoint", folder / "best.pt", "--device", "cpu")
        return f"exit {result.returncode}: {last_line(result)[7:140]}...", False

    def out_is_file(self, folder: Path) -> tuple[str, bool]:
        folder.mkdir()
        (folder / "file").write_text("precious")
        result = self.train(folder / "file")
        return f"exit {result.returncode}: {last_line(result)[7:]}", (folder / "file").read_text() != "precious"

    def evaluate_out_dir(self, folder: Path) -> tuple[str, bool]:
        folder.mkdir()
        began = time.perf_counter()
        result = xmcl("evaluate", "--checkpoint", self.straight / "best.pt", "--out", folder, "--device", "cpu")
        computed = "rSum" in result.stdout
        return (f"exit {result.returncode} in {time.perf_counter() - began:.0f} s, nothing computed: {not computed}: "
                f"{last_line(result)[7:]}"), False

    def write_fails(self, folder: Path) -> tuple[str, bool]:
        run = self.work / folder.name
        result = self.train(run, "--set", "optim.epochs=1")
        assert result.returncode == 0, result.stderr
        before = (run / "last.pt").read_bytes()
        limit = (run / "log.jsonl").stat().st_size + 8192  # the log may grow until the first checkpoint is due
        assert limit < len(before), (limit, len(before))
        result = self.train(run, "--set", "optim.epochs=2", limit_bytes=limit)
        kept = (run / "last.pt").read_bytes() == before
        return f"exit {result.returncode}: {last_line(result)[7:]}", not kept

    def checkpoint_dir(self, folder: Path) -> tuple[str, bool]:
        result = xmcl("evaluate", "--checkpoint", self.straight)
        return f"exit {result.returncode}: {last_line(result)[7:]}", False

    def stale_lock(self, folder: Path) -> tuple[str, bool]:
        holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(folder)], env=ENV, stdout=subprocess.PIPE,
                                  text=True)
        holder.stdout.readline()
        holder.send_signal(signal.SIGKILL)
        holder.wait()
        result = self.train(folder, "--set", "optim.epochs=1")
        note = next((line for line in result.stderr.splitlines() if "took over" in line), "")
        return f"exit {result.returncode}: '{note[:110]}...'", result.returncode != 0

    def small_folds(self, folder: Path) -> tuple[str, bool]:
        result = xmcl("evaluate", "--checkpoint", self.straight / "best.pt", "--protocol", "fold5", "--device",
                      "cpu")
        warning = next((line for line in result.stderr.splitlines() if line.startswith("warning")), "no warning")
        return f"exit {result.returncode}: {warning[:90]}...", False

    def corrupt_images(self, folder: Path) -> tuple[str, bool]:
        world = folder / "shapes"
        generate_shapes_world(world, num_images=20, seed=0, image_size=64, progress=False)
        split = json.loads((world / "dataset_shapes.json").read_text())
        val = [image["filename"] for image in split["images"] if image["split"] == "train"]
        for name in val[2:4]:
            (world / "images" / name).write_bytes(b"not an image")
        args = ["features", "--data", world, "--split", "train", "--backbone", "resnet18", "--backbone-weights",
                "none", "--image-size", "64", "--device", "cpu", "--out", folder / "feats"]
        failed = xmcl(*args)
        listed = (folder / "feats" / "train_unreadable.txt").read_text().splitlines()
        skipped = xmcl(*args, "--skip-unreadable")
        return (f"exit {failed.returncode}, {len(listed)} of 2 listed in one pass; --skip-unreadable exit "
                f"{skipped.returncode}"), False

    def lidar(self, kind: str) -> Callable[[Path], tuple[str, bool]]:
        def check(folder: Path) -> tuple[str, bool]:
            folder.mkdir()
            points = np.random.default_rng(0).uniform(-50, 50, (1000, 4)).astype(np.float32)
            points[:, 3] = np.abs(points[:, 3]) / 50
            path = folder / f"{kind}.bin"
            data = {"empty": b"", "float64": points.astype(np.float64).tobytes(),
                    "random bytes": np.random.default_rng(1).integers(0, 256, 16000, dtype=np.uint8).tobytes(),
                    "truncated": points.tobytes()[:-6]}[kind]
            path.write_bytes(data)
            try:
                read_points_bin(path, 4)
                return "accepted", False
            except DataError as error:
                return f"DataError: {str(error)[:120]}...", False
        return check


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="xmcl-faults-"))
    try:
        matrix = Matrix(work)
        faults = [
            ("crafted best.pt / last.pt (torch.save)", matrix.payload("torch")),
            ("crafted plain pickle as best.pt / last.pt", matrix.payload("pickle")),
            ("two train runs into one --out", matrix.two_writers),
            ("kill -9 mid-epoch, then resume", matrix.kill_mid_epoch),
            ("kill -9 halfway through a checkpoint write", matrix.kill_mid_write),
            ("Ctrl-C (SIGINT) mid-epoch, then resume", matrix.signal_mid_epoch("SIGINT")),
            ("SIGTERM mid-epoch, then resume", matrix.signal_mid_epoch("SIGTERM")),
            ("--no-resume into a finished run", matrix.no_resume),
            ("resume with a changed optim.lr", matrix.changed_lr),
            ("rerun a finished run", matrix.finished),
            ("optim.batch_size=-4", matrix.bad_value),
            ("data.path that does not exist", matrix.missing_data),
            ("features --batch-size 0", matrix.features_batch_zero),
            ("checkpoint missing a weight (evaluate)", matrix.missing_weight),
            ("train --out that is a file", matrix.out_is_file),
            ("evaluate --out that is a folder", matrix.evaluate_out_dir),
            ("checkpoint write fails (file too large)", matrix.write_fails),
            ("a run folder given as --checkpoint", matrix.checkpoint_dir),
            ("stale lock of a killed process", matrix.stale_lock),
            ("fold5 on a 10-image split", matrix.small_folds),
            ("2 corrupt images among 12 (features)", matrix.corrupt_images),
            ("empty lidar .bin", matrix.lidar("empty")),
            ("lidar .bin cut mid-point", matrix.lidar("truncated")),
            ("float64 lidar .bin", matrix.lidar("float64")),
            ("random bytes as lidar .bin", matrix.lidar("random bytes")),
        ]
        for fault, check in faults:
            matrix.record(fault, check)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    width = max(len(row[0]) for row in matrix.rows)
    print(f"{'fault':{width}}  {'data lost':9}  outcome")
    for fault, outcome, lost, _ in matrix.rows:
        print(f"{fault:{width}}  {lost:9}  {outcome}")
    print(f"\n{sum(row[2] == 'no' for row in matrix.rows)} of {len(matrix.rows)} faults lost no data; "
          f"{sum(row[3] for row in matrix.rows):.0f} s in all")


if __name__ == "__main__":
    main()
