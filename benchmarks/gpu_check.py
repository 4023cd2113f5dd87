"""Every CUDA path of xmcl in one command, as a user runs it: meant for a machine with one GPU (at most 8 minutes);
``--dry-run`` runs the same plan on the CPU at tiny sizes (the test suite does).

    python benchmarks/gpu_check.py [--dry-run] [--out runs/bench/gpu_check/default]

Each check is a real ``xmcl`` command (or ``torchrun``) in its own process, timed; a failing check is recorded with
the end of its output and the plan goes on. The plan:
  corpus      ``xmcl data shapes``, then ``xmcl features`` (the frozen backbone on the device)
  train-*     ``xmcl train`` (USER, shapes) for each precision: float32, bf16 and fp16 (fp16 and its GradScaler on
              CUDA only)
  clip-*      ``xmcl train-clip`` for each precision
  distill-*   ``xmcl distill pretrain`` (synthetic scenes) for each precision, on the sparse kernels
              ``voxel.sparse_backend: auto`` picks there, then in float32 on the other kernels (torch on CUDA;
              spconv on CPU when installed)
  torchrun    ``torchrun --standalone --nproc_per_node 1 -m xmcl train`` (NCCL on CUDA, gloo on CPU)
  resume      2 epochs straight against 1 epoch then resumed to 2: the final weights' largest difference
  serve       ``xmcl export``, ``xmcl index``, ``xmcl search`` and ``xmcl serve`` (one HTTP query) on the device
Figures (each check's status and seconds; the training checks' samples or scenes per second and peak memory, from
their logs) go to OUT/figures.json and are printed; the exit status is 1 when a check failed.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from figures import options, parse_with_out, table, write_figures
from timing import free_port

import torch

from xmcl.nn.spconv_map import resolve_sparse_backend, spconv_importable
from xmcl.runtime.checkpoint import read_checkpoint
from xmcl.runtime.log import read_jsonl

XMCL = [sys.executable, "-m", "xmcl"]
TAIL = 1500  # characters of a failing command's output kept in the figures


def sizes(dry_run: bool) -> dict:
    """How big each check is: tiny on the CPU, a few dozen steps on a GPU."""
    if dry_run:
        return {"images": 24, "steps": 2, "batch": 8, "clip_batch": 8, "distill_steps": 2,
                "distill": ["data.pretrain_scenes=2", "data.num_points=1500", "data.image_size=[32,64]",
                            "augmentation.crop_size=[32,64]", "augmentation.min_pairs=50", "voxel.widths=[4,8]",
                            "voxel.out_dim=8", "voxel.voxel_size=0.2", "image.backbone=resnet18",
                            "image.weights=null", "image.resnet_width=8", "superpixels.n_segments=12",
                            "optim.batch_scenes=1"]}
    return {"images": 512, "steps": 30, "batch": 128, "clip_batch": 64, "distill_steps": 30,
            "distill": ["data.pretrain_scenes=8", "optim.batch_scenes=2"]}


class Plan:
    """Runs the checks in ``work`` (emptied first) and keeps each one's figures (``results``)."""

    def __init__(self, work: Path, device: str) -> None:
        shutil.rmtree(work, ignore_errors=True)  # every check starts from nothing, as on a fresh machine
        self.work, self.device = work, device
        self.results: dict[str, dict] = {}

    def run(self, name: str, command: list[str], timeout: float = 600.0) -> bool:
        """Run ``command``; record its status and seconds under ``name``; True when it succeeded."""
        began = time.perf_counter()
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
            ok, output = done.returncode == 0, done.stdout + done.stderr
        except subprocess.TimeoutExpired as error:
            ok, output = False, f"timed out after {timeout:.0f} s: {error}"
        record = {"ok": ok, "seconds": round(time.perf_counter() - began, 2)}
        if not ok:
            record["output_tail"] = output[-TAIL:]
        self.results[name] = record
        print(f"{name}: {'ok' if ok else 'FAILED'} in {record['seconds']} s", flush=True)
        return ok

    def train_figures(self, name: str, run_dir: Path, rate_key: str) -> None:
        """Add the throughput and peak memory of the run's last log record that has them."""
        records = [r for r in read_jsonl(run_dir / "log.jsonl") if rate_key in r or "peak_memory_mib" in r] \
            if (run_dir / "log.jsonl").is_file() else []
        for record in records[-1:]:
            self.results[name].update({k: record[k] for k in (rate_key, "peak_memory_mib") if k in record})


def precisions(device: str) -> list[str]:
    """float32 ("none"), bf16, and fp16 where it runs (CUDA)."""
    return ["none", "bf16", "fp16"] if device == "cuda" else ["none", "bf16"]


def retrieval_args(plan: Plan, size: dict, amp: str, epochs: int = 1) -> list[str]:
    """``--set`` options of a short USER run on the check's shapes features."""
    sets = [f"data.path={plan.work / 'features'}", f"run.device={plan.device}", f"run.amp={amp}",
            f"optim.epochs={epochs}", f"optim.max_steps_per_epoch={size['steps']}", f"optim.batch_size={size['batch']}",
            "optim.lr_decay_epochs=[10]", "data.val_max_images=64", "run.progress=false", "run.threads=1"]
    return ["--config", "shapes_user", *(arg for s in sets for arg in ("--set", s))]


def check_training(plan: Plan, size: dict) -> None:
    """Each loop for a few steps in each precision."""
    for amp in precisions(plan.device):
        out = plan.work / f"train-{amp}"
        if plan.run(f"train-{amp}", [*XMCL, "train", *retrieval_args(plan, size, amp), "--out", str(out)]):
            plan.train_figures(f"train-{amp}", out, "samples_per_s")
        out = plan.work / f"clip-{amp}"
        sets = [f"run.device={plan.device}", f"run.amp={amp}", "optim.epochs=1",
                f"optim.batch_size={size['clip_batch']}", "run.progress=false", "run.threads=1"]
        if plan.run(f"clip-{amp}", [*XMCL, "train-clip", "--data", str(plan.work / "shapes"),
                                    *(arg for s in sets for arg in ("--set", s)), "--out", str(out)]):
            plan.train_figures(f"clip-{amp}", out, "samples_per_s")
        check_distill(plan, size, f"distill-{amp}", [f"run.amp={amp}"])
    auto = resolve_sparse_backend("auto", torch.device(plan.device))
    other = "torch" if auto == "spconv" else "spconv"
    if other == "torch" or spconv_importable():
        check_distill(plan, size, f"distill-{other}-kernels", [f"voxel.sparse_backend={other}"])


def check_distill(plan: Plan, size: dict, name: str, sets: list[str]) -> None:
    """``xmcl distill pretrain`` for a few steps with the settings ``sets``."""
    out = plan.work / name
    sets = [f"run.device={plan.device}", f"optim.steps={size['distill_steps']}", "run.log_every=1",
            "run.progress=false", "run.threads=1", f"superpixels.cache_dir={plan.work / 'superpixels'}",
            *size["distill"], *sets]
    if plan.run(name, [*XMCL, "distill", "pretrain", "--config", "distill_synthetic",
                       *(arg for s in sets for arg in ("--set", s)), "--out", str(out)]):
        plan.train_figures(name, out, "scenes_per_s")


def check_resume(plan: Plan, size: dict) -> None:
    """2 epochs straight against 1 epoch then 2: the final weights' largest difference (0 on CPU with fixed threads;
    float tolerance on CUDA)."""
    straight, resumed = plan.work / "resume-straight", plan.work / "resume-resumed"
    ok = plan.run("resume-straight", [*XMCL, "train", *retrieval_args(plan, size, "none", epochs=2),
                                      "--out", str(straight)])
    ok = ok and plan.run("resume-first-epoch", [*XMCL, "train", *retrieval_args(plan, size, "none", epochs=1),
                                                "--out", str(resumed)])
    ok = ok and plan.run("resume", [*XMCL, "train", *retrieval_args(plan, size, "none", epochs=2),
                                    "--out", str(resumed)])
    if not ok:
        return
    a, b = (read_checkpoint(path / "last.pt")["model"] for path in (straight, resumed))
    difference = max(float((a[k].double() - b[k].double()).abs().max()) for k in a if a[k].is_floating_point())
    tolerance = 0.0 if plan.device == "cpu" else 1e-3
    plan.results["resume"].update(largest_weight_difference=difference, ok=difference <= tolerance)


def check_serving(plan: Plan) -> None:
    """Export the float32 run's model, index the corpus' photos, search them, and serve one HTTP query."""
    model, index = plan.work / "model", plan.work / "index"
    shapes = plan.work / "shapes"
    if not (plan.run("export", [*XMCL, "export", str(plan.work / "train-none" / "best.pt"), "--out", str(model)])
            and plan.run("index", [*XMCL, "index", "--checkpoint", str(model), "--images", str(shapes / "images"),
                                   "--captions", str(shapes / "dataset_shapes.json"), "--out", str(index),
                                   "--device", plan.device])
            and plan.run("search", [*XMCL, "search", str(index), "a red circle", "--json",
                                    "--device", plan.device])):
        return
    port = free_port()
    began = time.perf_counter()
    server = subprocess.Popen([*XMCL, "serve", str(index), "--port", str(port), "--device", plan.device],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    answer, error = None, "the server did not answer within 120 s"
    try:
        while time.perf_counter() - began < 120 and server.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/search?text=a+red+circle&k=3", timeout=10) as r:
                    answer = json.loads(r.read())
                break
            except OSError:
                time.sleep(0.5)
        if server.poll() is not None:
            error = f"the server exited with status {server.returncode}"
    finally:
        server.terminate()
        try:
            _, stderr = server.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            _, stderr = server.communicate()
    ok = bool(answer and answer.get("results"))
    plan.results["serve"] = {"ok": ok, "seconds": round(time.perf_counter() - began, 2)}
    if not ok:
        plan.results["serve"]["output_tail"] = (error + "\n" + (stderr or ""))[-TAIL:]
    print(f"serve: {'ok' if ok else 'FAILED'}", flush=True)


def render(d: dict) -> str:
    """Each check's status, seconds, throughput and peak memory."""
    f = d["figures"]
    rows = []
    for name, r in f["checks"].items():
        rate = r.get("samples_per_s", r.get("scenes_per_s"))
        rows.append([name, "ok" if r["ok"] else "FAILED", f"{r['seconds']:.1f}", "" if rate is None else f"{rate:.1f}",
                     "" if "peak_memory_mib" not in r else f"{r['peak_memory_mib']:.0f}"])
    return (f"`{d['command']}` on {f['device_name']}\n\n"
            + table(["check", "status", "seconds", "samples (scenes) / s", "peak MiB"], rows)
            + f"\n\n{sum(r['ok'] for r in f['checks'].values())} of {len(f['checks'])} checks passed.")


def main() -> None:
    parser = options(__doc__)
    parser.add_argument("--dry-run", action="store_true", help="the same plan on the CPU at tiny sizes")
    args = parse_with_out(parser, "gpu_check", naming=("dry_run",))
    device = "cpu" if args.dry_run else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        sys.exit("gpu_check: no CUDA device here; use --dry-run to run the plan on the CPU")
    size = sizes(args.dry_run)
    plan = Plan(args.out / "work", device)
    plan.run("corpus", [*XMCL, "data", "shapes", "--out", str(plan.work / "shapes"), "--images", str(size["images"]),
                        "--overwrite"])
    plan.run("features", [*XMCL, "features", "--data", str(plan.work / "shapes"), "--split", "train", "--split",
                          "val", "--image-size", "128", "--device", device, "--out", str(plan.work / "features")])
    check_training(plan, size)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1", "-m", "xmcl"]
    plan.run("torchrun", [*torchrun, "train", *retrieval_args(plan, size, "none"), "--out",
                          str(plan.work / "torchrun")])
    check_resume(plan, size)
    check_serving(plan)
    name = torch.cuda.get_device_name(0) if device == "cuda" else "CPU (dry run)"
    write_figures(args.out, "gpu_check", args, {"device_name": name, "checks": plan.results}, show=render)
    sys.exit(0 if all(r["ok"] for r in plan.results.values()) else 1)


if __name__ == "__main__":
    main()
