"""The tables of ``docs/results.md`` (and the summary lines of README's "Measured figures"), made from the
benchmarks' figures files, each printed with the command that made it.

    python benchmarks/report.py                     # print every table with its command; list what is pending
    python benchmarks/report.py --collect runs      # first copy the figures files of the documented commands
                                                    # found under runs/ into docs/figures/
    python benchmarks/report.py --write             # rewrite the generated blocks of docs/results.md and README.md
    python benchmarks/report.py --check             # exit 1 if a document's block differs from its figures

``PLAN`` lists the documented commands in the order ``benchmarks/reproduce.py`` runs them: set-up commands (corpora,
features, the CLIP teacher) and benchmark commands, each of which writes one figures file (``figures.py``).
``docs/figures/KEY.json`` is the figures file behind the block ``KEY``: ``--collect`` finds it under a runs root by
its recorded command (``argv`` as documented), the newest of several. A document holds each block between
``<!-- figures:KEY -->`` and ``<!-- /figures:KEY -->`` (README: ``figures:KEY:summary``); ``--write`` replaces the
blocks whose figures files are all present and leaves the others (figures from earlier code, marked pending in
the text) as they are. Every number in a block comes from its files; nothing is typed by hand.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import shutil
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parent.parent
DOCUMENTS = ("docs/", "README.md")  # changes to these do not change a figure
FIGURES_DIR = REPO / "docs" / "figures"
RESULTS = REPO / "docs" / "results.md"
README = REPO / "README.md"


@dataclass(frozen=True)
class Step:
    """One documented command; ``key`` names its figures file (None for a set-up command, which writes none);
    ``long``: hours on 2 CPU cores (``reproduce.py --skip-long`` leaves it out)."""

    name: str
    command: str
    key: str | None = None
    long: bool = False

    @property
    def benchmark(self) -> str | None:
        words = shlex.split(self.command)
        if len(words) > 1 and words[0] == "python" and words[1].startswith("benchmarks/"):
            return Path(words[1]).stem
        return None

    @property
    def argv(self) -> list[str]:
        """The benchmark's arguments (after ``python benchmarks/NAME.py``)."""
        return shlex.split(self.command)[2:]


CONVERGED_RUNS = "docs/figures/rq_converged_runs"  # each finished run's result, tracked: the comparison resumes
SHAPES_VARIANTS = ("infonce vsepp user_uto_plain user_noqueue user_keep user user_plain user_cge user_sge_cge user_tolerant "
                   "user_cge_tolerant")
PLAN: tuple[Step, ...] = (
    Step("shapes corpus", "xmcl data shapes --out runs/shapes --images 2000 --seed 0"),
    Step("shapes features", "xmcl features --data runs/shapes --split train --split val --split test "
                            "--image-size 128 --out runs/shapes_feats"),
    Step("shapes CLIP teacher", "xmcl train-clip --data runs/shapes --out runs/clip_shapes"),
    Step("shapes CLIP cache", "xmcl clip-cache --clip runs/clip_shapes --data runs/shapes --split train --split val "
                              "--split test --out runs/clip_shapes_cache"),
    Step("evaluation speed", "python benchmarks/eval_speed.py", "eval_speed"),
    Step("training throughput, BiGRU", "python benchmarks/train_throughput.py", "throughput_bigru"),
    Step("training throughput, MiniLM", "python benchmarks/train_throughput.py --text-encoder bert",
         "throughput_bert"),
    Step("training throughput, Flickr8K shape", "python benchmarks/train_throughput.py --text-encoder bert --regions 49 "
         "--region-dim 1280 --queue-size 2048", "throughput_f8k"),
    Step("training throughput, Flickr8K shape, 1 thread", "python benchmarks/train_throughput.py --text-encoder bert "
         "--regions 49 --region-dim 1280 --queue-size 2048 --threads 1", "throughput_f8k_1thread"),
    Step("shapes retrieval quality",
         f"python benchmarks/retrieval_quality.py --data runs/shapes_feats --clip-cache runs/clip_shapes_cache "
         f"--variants {SHAPES_VARIANTS} --epochs 8 --embed-dim 256 --queue-size 1024 --set model.momentum=0.99 "
         f"--set model.word_dim=128 --out runs/rq_shapes", "rq_shapes"),
    Step("UTO margins", "python benchmarks/uto_margins.py " + " ".join(
        f"runs/rq_shapes/{v}/best.pt" for v in ("user", "user_plain", "user_uto_plain", "user_cge", "vsepp",
                                                 "infonce")), "uto_margins"),
    Step("CGE inference, shapes", "python benchmarks/cge_inference.py --data runs/shapes --clip runs/clip_shapes",
         "cge_shapes"),
    Step("CGE inference, Flickr8K", "python benchmarks/cge_inference.py --data ../shared/data/flickr8k --images 64 "
                                    "--image-size 224 --vit-b32", "cge_f8k"),
    Step("demo", "python benchmarks/demo_run.py", "demo"),
    Step("search latency, 1024-d and HTTP", "python benchmarks/search_latency.py --dims 1024 --http", "search_1024"),
    Step("search latency, 256-d", "python benchmarks/search_latency.py --dims 256", "search_256"),
    Step("inference cost", "python benchmarks/inference_cost.py", "inference_cost"),
    Step("indexing throughput", "python benchmarks/index_throughput.py --images 300", "index_throughput"),
    Step("query latency", "python benchmarks/query_latency.py", "query_latency"),
    Step("service under load", "python benchmarks/serve_load.py", "serve_load"),
    Step("ST-SLidR step", "python benchmarks/distill_step.py", "distill_step"),
    Step("ST-SLidR step, the authors' 3D network", "python benchmarks/distill_step.py --authors-net",
         "distill_step_authors"),
    Step("data-parallel scaling", "python benchmarks/scaling.py", "scaling"),
    Step("sparse-conv backends", "python benchmarks/sparse_conv_backends.py", "sparse_conv"),
    Step("Flickr8K features", "xmcl features --data ../shared/data/flickr8k --split train --split val --text "
                              "--out runs/f8k_feats", long=True),
    Step("Flickr8K retrieval quality",
         "python benchmarks/retrieval_quality.py --data runs/f8k_feats --text-encoder bert --epochs 4 "
         "--max-steps-per-epoch 50 --lambda-batch 20 --queue-size 2048 --set run.threads=1 --set model.momentum=0.99 "
         "--set loss.uto_warmup_epochs=1 --out runs/rq_f8k", "rq_f8k", long=True),
    Step("converged regime, step time", "python benchmarks/rq_converged.py --data runs/f8k_feats --estimate-steps 20",
         "rq_converged_estimate", long=True),
    Step("converged regime on 1280-d cells, step time", "python benchmarks/rq_converged.py --data runs/f8k_feats "
         "--estimate-steps 20 --set model.region_pca_dim=null", "rq_converged_estimate_1280", long=True),
    Step("Flickr8K converged, seed 0", f"python benchmarks/rq_converged.py --data runs/f8k_feats --seeds 0 "
                                       f"--keep {CONVERGED_RUNS}", "rq_converged_seed0", long=True),
    Step("Flickr8K converged, 3 seeds", f"python benchmarks/rq_converged.py --data runs/f8k_feats --seeds 0 1 2 "
                                        f"--keep {CONVERGED_RUNS}", "rq_converged", long=True),
    Step("Flickr8K converged, UTO sweep", f"python benchmarks/rq_converged.py --data runs/f8k_feats --sweep "
                                          f"--keep {CONVERGED_RUNS}", "rq_converged_sweep", long=True),
    Step("Flickr8K converged, past the sweep's best corner", "python benchmarks/rq_converged.py --data runs/f8k_feats "
         f"--sweep --points 0.5:30 0.7:30 0.5:15 --keep {CONVERGED_RUNS}", "rq_converged_beyond", long=True),
    Step("Flickr8K converged, the sweep's best on 3 seeds", f"python benchmarks/rq_converged.py --data runs/f8k_feats "
         f"--retune --keep {CONVERGED_RUNS}", "rq_converged_retune", long=True),
    Step("ST-SLidR linear probe", "python benchmarks/distill_probe.py --threads 1 --keep docs/figures/distill_probe_runs",
         "distill_probe", long=True),
    Step("tolerance rules", "python benchmarks/distill_probe.py --threads 1 --methods st_slidr st_authors st_soft "
                            "--keep docs/figures/distill_tolerance_runs", "distill_tolerance", long=True),
)
STEPS = {step.key: step for step in PLAN if step.key}


# ------------------------------------------------------------------------------------------------ helpers
def load(figures_dir: Path, key: str) -> dict | None:
    path = Path(figures_dir) / f"{key}.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else None


def provenance(data: dict) -> str:
    """``commit 1234567, 2026-12-02, 2 torch threads, 2 cores, load average 3.1 → 2.9``: where and when a figures
    file was made."""
    m = data["machine"]
    code_changed = m.get("dirty") and any(not path.startswith(DOCUMENTS) for path in m.get("changed") or ["?"])
    commit = (m.get("commit") or "unknown")[:7] + (" with uncommitted code changes" if code_changed else "")
    threads = f"{m['torch_threads']} torch thread{'s' if m['torch_threads'] != 1 else ''}"
    return f"commit {commit}, {data['date'][:10]}, {threads}, {conditions(data)}"


def conditions(data: dict) -> str:
    """``2 cores, load average 7.1 → 6.5, nice 10``: what a timing shared the machine with (the 1-minute load
    average when the benchmark started and when it wrote its figures)."""
    m = data["machine"]
    load = m["load_average"][0]
    if "load_average_start" in m:
        load = f"{m['load_average_start'][0]} → {load}"
    nice = f", nice {m['nice']}" if m.get("nice") else ""
    return f"{m['cores_usable']} cores, load average {load}{nice}"


def command_lines(*datas: dict) -> str:
    return "\n".join(f"```\n{d['command']}\n```\n({provenance(d)})" for d in datas)


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def f2(value: float) -> str:
    return f"{value:.2f}"


def signed(value: float, digits: int = 1) -> str:
    return f"{value:+.{digits}f}".replace("-", "−")


HUGE_SIDE_TEXT = "7000 x 7000 (49-megapixel)"
RECALLS = ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10")
RECALL_HEADER = ["i2t R@1", "R@5", "R@10", "t2i R@1", "R@5", "R@10", "rSum"]


def recall_rows(runs: dict[str, dict], labels: dict[str, str] | None = None) -> list[list[str]]:
    """One row per run (R@1/5/10 both ways, rSum), the best rSum in bold."""
    best = max(m["rsum"] for m in runs.values())
    rows = []
    for name, m in runs.items():
        rsum = f"**{f2(m['rsum'])}**" if m["rsum"] == best and len(runs) > 1 else f2(m["rsum"])
        rows.append([(labels or {}).get(name, name), *(f2(m[k]) for k in RECALLS), rsum])
    return rows


# ------------------------------------------------------------------------------------------------ blocks
def eval_speed(d: dict) -> str:
    f = d["figures"]
    rows = [["bare GEMM", f"{f['gemm_s']:.3f} s"],
            [f"full protocol ({' + '.join(f['protocols'])}, GEMM included)", f"{f['protocol_s']:.3f} s"],
            ["ranking alone, ours", f"{f['ranking_ours_s']:.3f} s"],
            ["ranking alone, classic per-query argsort loop", f"{f['ranking_classic_s']:.3f} s"]]
    same = "the same" if f["same_recalls"] else "different"
    return (f"{command_lines(d)}\n\n{f['num_images']:,} × {f['num_captions']:,} unit embeddings, dim "
            f"{d['config']['dim']}:\n\n{table(['what', 'time'], rows)}\n\n"
            f"- protocol / GEMM = **{f['protocol_over_gemm']:.2f}x** (target ≤ 1.5).\n"
            f"- loop / ours = **{f['classic_over_ours']:.1f}x** (target ≥ 20).\n"
            f"- The two rankings give {same} R@K; ranks differing: i2t {f['ranks_differing']['i2t']}, t2i "
            f"{f['ranks_differing']['t2i']} (only exact ties can differ, which numpy's unstable default sort orders "
            f"as it likes).")


def eval_speed_summary(d: dict) -> str:
    f = d["figures"]
    return (f"- `{d['command']}`: for {f['num_images']:,} × {f['num_captions']:,} similarities, the full protocol "
            f"takes {f['protocol_over_gemm']:.2f}x the bare GEMM, and ranking is {f['classic_over_ours']:.1f}x "
            f"faster than the classic per-query argsort loop ({conditions(d)}).")


def demo(d: dict) -> str:
    f = d["figures"]
    minutes, seconds = divmod(round(f["wall_s"]), 60)
    fresh = "a fresh folder" if f["fresh"] else "a folder that already held part of the demo (resumed)"
    return (f"{command_lines(d)}\n\nIn {fresh} the demo took **{minutes}:{seconds:02d} wall** with "
            f"{f['peak_rss_mib']:.0f} MiB peak RSS. It generates 1,500 images, extracts features, trains a small CLIP "
            f"teacher and caches its embeddings, then trains {' and '.join(f['runs'])} for 8 epochs each.\n\n"
            f"Shapes-world {f['split']} split:\n\n"
            f"{table(['run', *RECALL_HEADER], recall_rows(f['runs']))}")


def demo_summary(d: dict) -> str:
    f = d["figures"]
    rsums = ", ".join(f"{name} {m['rsum']:.1f}" for name, m in f["runs"].items())
    return (f"- `{d['command']}` (what `make demo` runs): {f['wall_s'] / 60:.0f} minutes wall ({conditions(d)}); "
            f"test rSum {rsums}.")


def throughput(bigru: dict, bert: dict) -> str:
    rows = []
    for name, d in (("BiGRU", bigru), ("MiniLM", bert)):
        models = d["figures"]["models"]
        cells = [f"{m['samples_per_s']:.1f} samples/s ({m['ms_per_step']:.0f} ms/step)" for m in models.values()]
        ratios = d["figures"]["user_over"]
        rows.append([name, *cells, f"{ratios['vsepp']:.2f}x", f"{ratios['infonce']:.2f}x"])
    c = bigru["config"]
    labels = [m["label"] for m in bigru["figures"]["models"].values()]
    return (f"{command_lines(bigru, bert)}\n\nBatch {c['batch_size']}, {c['regions']} × {c['region_dim']} regions, "
            f"queue {c['queue_size']}, embed {c['embed_dim']}. Each model is its `retrieval_quality.py` variant: "
            f"the baselines without SGE or queues, USER with SGE, momentum encoders, queues and UTO. Target: USER "
            f"step time ≤ 1.6x the baseline's.\n\n"
            f"{table(['text encoder', *labels, 'USER / VSE++', 'USER / InfoNCE'], rows)}")


def throughput_summary(bigru: dict, bert: dict) -> str:
    r = [d["figures"]["user_over"] for d in (bigru, bert)]
    return (f"- `python benchmarks/train_throughput.py [--text-encoder bert]`: a USER step (SGE, momentum encoders, "
            f"queues, UTO) takes {r[0]['vsepp']:.2f}x the VSE++ baseline's step (no SGE, no queues) with BiGRU, "
            f"{r[1]['vsepp']:.2f}x with MiniLM ({r[0]['infonce']:.2f}x and {r[1]['infonce']:.2f}x InfoNCE's; "
            f"{conditions(bigru)}).")


def throughput_f8k(two: dict, one: dict) -> str:
    """The fine-tuned regime on Flickr8K's shapes: step times on 2 threads and 1, their FLOP counts and ratios."""
    rows = []
    for d in (two, one):
        models = d["figures"]["models"]
        rows.append([str(d["machine"]["torch_threads"]),
                     *(f"{m['ms_per_step']:.0f} ms ({m['gflop_per_step']:.0f} GFLOP)" for m in models.values()),
                     f"{d['figures']['user_over']['infonce']:.2f}x", f"{d['figures']['user_over_flops']['infonce']:.2f}x"])
    speedups = ", ".join(f"{m['label']} {one['figures']['models'][k]['ms_per_step'] / m['ms_per_step']:.2f}x"
                         for k, m in two["figures"]["models"].items())
    labels = [m["label"] for m in two["figures"]["models"].values()]
    c = two["config"]
    return (f"{command_lines(two, one)}\n\nBatch {c['batch_size']}, {c['regions']} × {c['region_dim']} cells, MiniLM "
            f"fine-tuned, queue {c['queue_size']}, embed {c['embed_dim']}; each model as its `retrieval_quality.py` "
            f"variant (median step; GFLOP of one forward and backward, `torch.utils.flop_counter`). Target: USER ≤ 1.6x "
            f"InfoNCE.\n\n"
            + table(["threads", *labels, "USER / InfoNCE", "FLOP ratio"], rows)
            + f"\n\n2 threads over 1 (speed-up): {speedups}.")


LABELS = {
    "user_uto_plain": "user_uto_plain (UTO alone: no SGE, no queues)",
    "user_noqueue": "user_noqueue (SGE, UTO)",
    "user_keep": "user_keep (+queues, authors' false negatives)",
    "user": "user (+queues, id mask)",
    "user_plain": "user_plain (queues, no SGE/CGE)",
    "user_cge": "user_cge (queues, CGE, no SGE)",
    "user_sge_cge": "user_sge_cge (queues, SGE, CGE)",
    "user_tolerant": "user_tolerant (user + tolerant queues)",
    "user_cge_tolerant": "user_cge_tolerant (user_cge + tolerant queues, CLIP similarity)",
}
DIFFERENCES = (  # what changes from the second variant to the first, one component at a time
    ("UTO instead of the hinge (neither has SGE or queues)", "user_uto_plain", "vsepp"),
    ("UTO instead of InfoNCE (neither has SGE or queues)", "user_uto_plain", "infonce"),
    ("SGE, without queues", "user_noqueue", "user_uto_plain"),
    ("momentum queues with the id mask, with SGE", "user", "user_noqueue"),
    ("the id mask instead of the authors' false negatives", "user", "user_keep"),
    ("SGE, with queues", "user", "user_plain"),
    ("CGE, with queues", "user_cge", "user_plain"),
    ("SGE + CGE, with queues", "user_sge_cge", "user_plain"),
    ("tolerant queues, with SGE", "user_tolerant", "user"),
    ("tolerant queues, with CGE", "user_cge_tolerant", "user_cge"),
)


def train_minutes(run: dict) -> str:
    """``12.5 min``, or for a run resumed across processes the part its last process trained."""
    if "train_seconds" in run:
        return f"{run['train_seconds'] / 60:.1f} min"
    return f"{run['train_seconds_this_session'] / 60:.1f} min in its last process (resumed)"


def quality(d: dict) -> str:
    f = d["figures"]
    runs = {name: v["metrics"] for name, v in f["variants"].items()}
    c = d["config"]
    budget = f"{c['epochs']} epochs" + (f" × {c['max_steps_per_epoch']} steps" if c["max_steps_per_epoch"] else "")
    parts = [command_lines(d),
             f"{c['data']} / {f['split']} ({f['num_images']:,} images, {f['num_captions']:,} captions), best epoch by "
             f"{f['val_split']} rSum; {budget} of batch {c['batch_size']}, seed {c['seed']}, text encoder "
             f"{c['text_encoder']}:",
             table(["variant", *RECALL_HEADER], recall_rows(runs, LABELS))]
    diffs = [f"- {what}: {signed(runs[a]['rsum'] - runs[b]['rsum'])} rSum ({a} against {b})"
             for what, a, b in DIFFERENCES if a in runs and b in runs]
    if diffs:
        parts.append("One component at a time, from the table:\n\n" + "\n".join(diffs))
    epochs = sorted({int(e) for v in f["variants"].values() for e in v["val_rsum_per_epoch"]})
    curve_rows = [[name, *(f"{v['val_rsum_per_epoch'].get(str(e), float('nan')):.1f}" for e in epochs)]
                  for name, v in f["variants"].items()]
    parts.append(f"{f['val_split'].capitalize()} rSum per epoch:\n\n"
                 + table(["variant", *(f"epoch {e}" for e in epochs)], curve_rows))
    times = ", ".join(f"{name} {train_minutes(v)}" for name, v in f["variants"].items())
    parts.append(f"Train time per variant: {times}.")
    teacher = f.get("teacher")
    if teacher:
        parts.append(f"The CLIP teacher itself (`{teacher['checkpoint']}`, its cached embeddings ranked by the same "
                     f"protocol): rSum {teacher['rsum']:.2f} (R@1 {teacher['i2t_r1']:.1f} / {teacher['t2i_r1']:.1f}).")
    return "\n\n".join(parts)


def quality_summary(d: dict) -> str:
    f = d["figures"]
    rsums = ", ".join(f"{name} {v['metrics']['rsum']:.1f}" for name, v in f["variants"].items())
    c = d["config"]
    budget = f"{c['epochs']} epochs" + (f" × {c['max_steps_per_epoch']} steps" if c["max_steps_per_epoch"] else "")
    return f"- `benchmarks/retrieval_quality.py` on `{c['data']}` ({budget}), {f['split']} rSum: {rsums}."


CONVERGED_LABELS = {
    "infonce": "InfoNCE", "vsepp": "VSE++ (hinge)", "user_noqueue": "USER without queue (SGE, UTO)",
    "user": "USER (SGE, UTO, queues)", "user_authors": "USER, the authors' key modes, init and decay",
    "user_tolerant": "USER + tolerant queues", "infonce_tolerant": "InfoNCE + tolerance",
}
POINT_LABELS = {"user": "USER", "user_tolerant": "USER + tolerant queues"}  # a variant at another UTO point


def converged_label(name: str) -> str:
    """The table label of an ``rq_converged.py`` run name; a point ``user_g0.3_mu30`` is USER at γ 0.3, μ 30
    (``user_tolerant_g0.3_mu30``: USER + tolerant queues there)."""
    point = re.fullmatch(r"(user\w*?)_g([\d.]+)_mu([\d.]+)", name)
    if point is None:
        return CONVERGED_LABELS.get(name, name)
    return f"{POINT_LABELS.get(point[1], point[1])}, UTO γ {point[2]}, μ {point[3]}"


def mean_std(cell: dict, digits: int = 1) -> str:
    return f"{cell['mean']:.{digits}f} ± {cell['std']:.{digits}f}" if cell["n"] > 1 else f"{cell['mean']:.{digits}f}"


def run_threads(run: dict) -> str:
    """``, 1 thread``: the torch threads a kept run trained with (empty when it does not say)."""
    threads = run.get("threads")
    return "" if threads is None else f", {threads} thread{'s' if threads != 1 else ''}"


def converged(d: dict) -> str:
    """The converged comparison (``rq_converged.py``): mean ± std over seeds per variant, per-seed rSum, curves."""
    f = d["figures"]
    runs, summary = f["runs"], f["summary"]
    cfg = next(r["config"] for r in runs.values())
    model, optim = cfg["model"], cfg["optim"]
    rows = []
    for name, row in summary.items():
        if "rsum" not in row:
            continue
        rows.append([converged_label(name), str(row["rsum"]["n"]),
                     *(mean_std(row[k]) for k in RECALLS), mean_std(row["rsum"], 2)])
    seeds = []
    for name in summary:
        done = [(key.split("/seed")[1], r) for key, r in runs.items() if key.split("/seed")[0] == name]
        cells = [f"seed {seed}: " + (f"{r['metrics']['rsum']:.1f} (best epoch {r['best_epoch']}{run_threads(r)})"
                                     if "metrics" in r else "stalled at its first step") for seed, r in done]
        seeds.append(f"- {name}: " + "; ".join(cells))
    width = f"a frozen {model['region_dim']} → {model['region_pca_dim']} PCA" if model.get("region_pca_dim") else \
        f"{model['region_dim']}-d cells"
    return "\n\n".join(part for part in [
        command_lines(d),
        f"Flickr8K {f['split']}, best-validation checkpoint of each run. Every variant alike: locked text (the frozen "
        f"MiniLM's cached token states), frozen EfficientNet-Lite0 grid features through {width}, embed "
        f"{model['embed_dim']}, MLP {model['head_hidden_dim']}, queue {model['queue_size']}, momentum "
        f"{model['momentum']}, batch {optim['batch_size']}, {optim['epochs']} epochs, lr {optim['lr']:g} × 0.1 at "
        f"epoch {optim['lr_decay_epochs'][0]}, no hinge warm-up. Mean ± std over seeds:",
        table(["variant", "seeds", *RECALL_HEADER], rows),
        "Per seed (rSum, best epoch, torch threads; a one-thread run shared the 2 cores with another one-thread "
        "run, which gives more runs an hour than one run on two threads):\n\n" + "\n".join(seeds),
        best_against_baselines(runs, summary),
        f"Val rSum per epoch, every run: ![curves](figures/rq_converged_runs/{f['kept_curves']})"
        if f.get("kept_curves") else "",
    ] if part)


CONVERGED_BASELINES = ("infonce", "vsepp")
R1_TARGET = {"i2t_r1": 33.0, "t2i_r1": 24.0}  # the USER-at-convergence issue's target for the best variant


def best_against_baselines(runs: dict[str, dict], summary: dict[str, dict]) -> str:
    """The best variant by mean rSum against each baseline, paired by seed (rSum difference per seed, its mean and
    how many seeds it is positive on, beside both spreads), and its mean R@1 against ``R1_TARGET``; empty when
    the baselines were not run (the sweep)."""
    scored = {name: row for name, row in summary.items() if "rsum" in row}
    baselines = [name for name in CONVERGED_BASELINES if name in scored]
    if not baselines:
        return ""
    best = max(scored, key=lambda name: scored[name]["rsum"]["mean"])
    label = converged_label(best)
    rsum: dict[str, dict[str, float]] = {}  # variant -> seed -> rSum of the finished runs
    for key, run in runs.items():
        if "metrics" in run:
            variant, seed = key.split("/seed")
            rsum.setdefault(variant, {})[seed] = run["metrics"]["rsum"]
    lines = []
    for base in baselines:
        if base == best:
            continue
        pairs = [(seed, value - rsum[base][seed]) for seed, value in rsum.get(best, {}).items() if seed in rsum[base]]
        if not pairs:
            continue
        diffs = [diff for _, diff in pairs]
        lines.append(f"- against {converged_label(base)}: " + ", ".join(
            f"seed {seed} {signed(diff)}" for seed, diff in pairs) + f" (mean {signed(sum(diffs) / len(diffs))}, "
            f"positive on {sum(diff > 0 for diff in diffs)} of {len(diffs)} seeds; std over seeds "
            f"{scored[best]['rsum']['std']:.1f} and {scored[base]['rsum']['std']:.1f})")
    r1 = ", ".join(f"{key[:3]} {scored[best][key]['mean']:.1f} (target ≥ {target:g}: "
                   f"{'met' if scored[best][key]['mean'] >= target else 'not met'})" for key, target in R1_TARGET.items())
    return (f"The best variant by mean rSum, {label}, paired by seed (rSum difference):\n\n" + "\n".join(lines)
            + f"\n\nIts mean R@1: {r1}.")


def converged_summary(d: dict) -> str:
    """README's line: mean ± std val rSum per variant, and the best variant's R@1 both ways (the command's
    ``--retune`` named where it ran with it)."""
    summary = {name: row for name, row in d["figures"]["summary"].items() if "rsum" in row}
    best = max(summary, key=lambda name: summary[name]["rsum"]["mean"])
    seeds = "-".join(map(str, d["config"]["seeds"]))
    rsums = ", ".join(f"{converged_label(name)} {mean_std(row['rsum'])}" for name, row in summary.items())
    retune = " --retune" if d["config"].get("retune") else ""
    return (f"- `benchmarks/rq_converged.py{retune}` (Flickr8K, locked text, 20 epochs, seeds {seeds}), val rSum mean ± std: "
            f"{rsums}; the best, {converged_label(best)}, has R@1 "
            f"{summary[best]['i2t_r1']['mean']:.1f} / {summary[best]['t2i_r1']['mean']:.1f}.")


def converged_estimate(reduced: dict, full: dict) -> str:
    """Step time against the FLOP bound of each variant, with the PCA and on the 1280-d cells."""
    rows = []
    for label, d in (("256-d (PCA)", reduced), ("1280-d cells", full)):
        f = d["figures"]["estimate"]
        for name, v in f.items():
            if isinstance(v, dict):
                rows.append([label, converged_label(name), f"{v['step_gflop']:.1f}",
                             f"{v['flop_bound_seconds']:.3f} s", f"{v['seconds_per_step']:.3f} s",
                             f"{v['seconds_per_step'] / v['flop_bound_seconds']:.1f}x", f"{v['run_minutes']:.0f} min"])
    rate = reduced["figures"]["estimate"]["gemm_gflops"]
    return (f"{command_lines(reduced, full)}\n\nBare GEMM rate {rate:.0f} GFLOP/s. GFLOP: one step's forward and "
            f"backward (`torch.utils.flop_counter`, 49 cells, 14 tokens); bound: GFLOP over the GEMM rate; step: "
            f"measured inside the training loop (data included); run: a 20-epoch run's steps at that time "
            f"(validation not counted). Target: a run in ≤ 15 min.\n\n"
            + table(["cells", "variant", "GFLOP", "FLOP bound", "step", "step / bound", "20-epoch run"], rows))


def margins(d: dict) -> str:
    f = d["figures"]
    rows = []
    for name, run in f["runs"].items():
        for direction in ("i2t", "t2i"):
            r = run[direction]
            rows.append([name, run["loss"], direction, f"{r['positive_mean']:.3f}", f"{r['wrong_mean']:.3f}",
                         *(f"{r[k]:.1f}%" for k in ("positives_below_gamma", "rank1_failures", "failures_quiet",
                                                   "failures_band", "failures_above"))])
    gamma = next(iter(f["runs"].values()))["gamma"]
    q = f["quiet_below"]
    return (f"{command_lines(d)}\n\nShapes {f['split']}, γ = {gamma}:\n\n"
            + table(["run", "loss", "dir", "best positive (mean)", "best wrong (mean)", "positives < γ",
                     "R@1 failures", f"winner < γ−{q}", f"winner in [γ−{q}, γ)", "winner ≥ γ"], rows))


def cge(d: dict) -> str:
    f = d["figures"]
    c = d["config"]
    rows = [[str(batch), *(f"{r[k]:.2f}" for k in ("without_ms", "hit_ms", "miss_ms")),
             f"{r['hit_over_without']:.2f}x", f"{r['miss_over_without']:.2f}x"]
            for batch, r in f["ms_per_image"].items()]
    return (f"{command_lines(d)}\n\n{f['num_images']} {f['split']} images of `{c['data']}`, USER at "
            f"{c['image_size']} px, teacher {f['teacher']} at {f['teacher_image_size']} px ({f['teacher_dim']}-d), "
            f"ms per image:\n\n"
            + table(["batch", "without CGE", "CGE, cache hit", "CGE, cache miss", "hit / without",
                     "miss / without"], rows))


PROBE_METHOD_LABELS = {"random": "random init", "slidr": "SLidR", "tolerant": "tolerant only",
                       "st_slidr": "ST-SLidR (tolerant + balancing)",
                       "st_authors": "ST-SLidR, the authors' rule (dropped logits zeroed)",
                       "st_soft": "ST-SLidR, soft weights 1 − s"}
PROBE_LABELS = {"ours": "our probe (BatchNorm re-estimated, AdamW on cross-entropy)",
                "authors": "the authors' probe (BatchNorm frozen, CE + Lovasz, SGD)"}


def probe_setting(d: dict) -> str:
    """The pretraining setting the figures come from: q, voxels, 3D network, 2D backbone and its weights."""
    c = d["config"]["distill_config"]
    voxel, image = c["voxel"], c["image"]
    network = (f"Res16UNet34C-shaped ({', '.join(map(str, voxel['planes']))})" if voxel["architecture"] == "res16unet"
               else f"sparse U-Net ({', '.join(map(str, voxel['widths']))}, {voxel['blocks']} block per level)")
    return (f"q = {c['loss']['q']} ({c['loss']['quantile_variant']}), {voxel['coordinates']} voxels, 3D network "
            f"{network}, 2D {image['backbone']} with {image['weights']} weights (the authors distil self-supervised "
            f"ResNet-50s, which cannot be fetched here), augmentations {'on' if c['data']['augment'] else 'off'}")


def probe(d: dict) -> str:
    """Per probe: mIoU mean ± std per method with every seed, ST-SLidR − SLidR paired by seed, IoU per class."""
    f = d["figures"]
    b = f["budget"]
    seeds = " / ".join(str(s) for s in f["seeds"])
    parts = [f"{command_lines(d)}\n\n{b['pretrain_scenes']} pretraining scenes × {b['num_points']:,} points, "
             f"{b['steps']} steps of {b['batch_scenes']} scenes; the probe trains on {b['probe_train_scenes']} scenes "
             f"and scores on {b['eval_scenes']}. {probe_setting(d)}."]
    for probe_name, methods in f["probes"].items():
        rows = [[PROBE_METHOD_LABELS[name], f"{m['miou_mean']:.1f}",
                 f"{m['miou_std']:.1f}" if m["miou_std"] is not None else "-",
                 " / ".join(f"{v:.1f}" for v in m["miou_per_seed"])] for name, m in methods.items()]
        classes = list(next(iter(methods.values()))["iou_per_class"])
        class_rows = [[PROBE_METHOD_LABELS[name],
                       *("-" if m["iou_per_class"][c] is None else f"{m['iou_per_class'][c]:.1f}" for c in classes)]
                      for name, m in methods.items()]
        parts.append(f"**{PROBE_LABELS[probe_name]}**, mIoU (%):\n\n"
                     + table(["method", "mIoU mean", "std", f"seeds {seeds}"], rows))
        if "slidr" in methods and "st_slidr" in methods:
            diffs = [b - a for a, b in zip(methods["slidr"]["miou_per_seed"], methods["st_slidr"]["miou_per_seed"])]
            spread = f" ± {statistics.stdev(diffs):.1f}" if len(diffs) > 1 else ""
            parts.append(f"ST-SLidR − SLidR, paired by seed: {' / '.join(f'{x:+.1f}' for x in diffs)} (mean "
                         f"{statistics.mean(diffs):+.1f}{spread}, positive on {sum(x > 0 for x in diffs)} of "
                         f"{len(diffs)} seeds).")
        parts.append("Mean IoU per class:\n\n" + table(["method", *classes], class_rows))
    return "\n\n".join(parts)


def probe_summary(d: dict) -> str:
    f = d["figures"]
    per_probe = "; ".join(
        f"{name} probe " + ", ".join(f"{PROBE_METHOD_LABELS[m]} {v['miou_mean']:.1f}" for m, v in methods.items())
        for name, methods in f["probes"].items())
    return (f"- `{d['command']}` (built-in scenes, seeds {', '.join(map(str, f['seeds']))}), linear-probe mIoU: "
            f"{per_probe}.")


def distill_step(d: dict) -> str:
    f = d["figures"]
    rows = [["training step, 1 scene", f"median {f['step_median_ms']:.0f} ms, min {f['step_min_ms']:.0f} ms → "
                                       f"{f['scenes_per_s']:.2f} scenes/s"],
            ["frozen 2D backbone on the augmented images (every step: not cacheable)",
             f"{f['augment_backbone_ms']:.0f} ms"],
            ["3D network forward", f"{f['forward_ms']:.0f} ms"],
            ["3D network forward + backward", f"{f['forward_backward_ms']:.0f} ms"],
            ["one-off preparation (SLIC, backbone, z)", f"{f['preparation_s']:.2f} s"],
            ["peak RSS after building the models", f"{f['rss_models_mib']:.0f} MiB"],
            ["peak RSS after preparation", f"{f['rss_prepared_mib']:.0f} MiB"],
            ["peak RSS after the steps", f"{f['rss_steps_mib']:.0f} MiB"]]
    return (f"{command_lines(d)}\n\nCloud: {f['points']:,} points → {f['voxels']:,} voxels of {f['voxel_size']} m; "
            f"{f['cameras']} cameras at {f['image_size'][0]}×{f['image_size'][1]}; {f['superpixels']} superpixels with "
            f"points. 3D network: {f['network']}, {f['parameters'] / 1e6:.2f} M parameters.\n\n"
            + table(["what", "figure"], rows))


def distill_step_summary(d: dict) -> str:
    f = d["figures"]
    return (f"- `{d['command']}`: an ST-SLidR step on a {f['points']:,}-point cloud takes "
            f"{f['step_median_ms'] / 1000:.1f} s on {d['machine']['torch_threads']} torch thread(s), with "
            f"{f['rss_steps_mib'] / 1024:.1f} GiB peak RSS ({conditions(d)}).")


SCALING_MODES = {"1x1": "1 process × 1 thread", "1x2": "1 process × 2 threads", "2x1": "2 processes × 1 thread"}


def scaling(d: dict) -> str:
    f = d["figures"]
    modes = f["modes"]
    rows = [[label, f"{modes[name]['samples_per_s']:.1f}", f"{modes[name]['ms_per_step']:.0f}",
             f"{modes[name]['cpu_per_wall']:.2f} of {modes[name]['threads_each']}"
             if "cpu_per_wall" in modes[name] else "not measured"] for name, label in SCALING_MODES.items()]
    two = modes["2x1"]
    return (f"{command_lines(d)}\n\nUSER of `configs/shapes_user.yaml` on random batches shaped like the shapes "
            f"features, global batch {d['config']['batch_size']}; 2 processes: gloo on 127.0.0.1, half the batch "
            f"each.\n\n" + table(["mode", "samples/s", "ms/step (median)", "CPU s per wall s (rank 0)"], rows)
            + f"\n\n2 processes × 1 thread / 1 process × 2 threads: **{f['ratio_2x1_over_1x2']:.2f}x**. Of a "
            f"2-process step of {two['ms_per_step']:.0f} ms, the gradient all-reduce ({two['gradient_mb']:.1f} MB) "
            f"takes {two['allreduce_ms']:.1f} ms: {two['allreduce_alone_ms']:.1f} ms of transfer (the same all-reduce "
            f"alone after a barrier) and {f['allreduce_waiting_ms']:.1f} ms waiting for the other rank; the rest "
            f"({two['rest_ms']:.0f} ms) is compute and the forward's gathers.")


def scaling_summary(d: dict) -> str:
    f = d["figures"]
    modes = f["modes"]
    return (f"- `{d['command']}`: for one global batch, 2 processes × 1 thread train "
            f"{modes['2x1']['samples_per_s']:.1f} samples/s, 1 process × 2 threads {modes['1x2']['samples_per_s']:.1f} "
            f"({f['ratio_2x1_over_1x2']:.2f}x), 1 × 1 {modes['1x1']['samples_per_s']:.1f}; the gradient all-reduce is "
            f"{modes['2x1']['allreduce_ms']:.0f} ms of a {modes['2x1']['ms_per_step']:.0f} ms step "
            f"({conditions(d)}).")


def sparse_conv(d: dict) -> str:
    f = d["figures"]
    with_spconv = f["spconv"] is not None
    header = ["layer", "width", "map ours"] + (["map spconv"] if with_spconv else []) + ["fwd+bwd ours"]
    header += ["fwd+bwd spconv", "spconv / ours", "max rel. diff"] if with_spconv else []
    rows = []
    for layer in f["layers"]:
        row = [layer["kind"], str(layer["channels"]), f"{layer['map_ms'][0]:.1f}"]
        if with_spconv:
            row.append(f"{layer['map_ms'][1]:.1f}")
        row.append(f"{layer['forward_backward_ms'][0]:.1f}")
        if with_spconv:
            row += [f"{layer['forward_backward_ms'][1]:.1f}", f"{layer['spconv_over_ours']:.2f}",
                    f"{max(layer['max_rel_diff']):.1e}"]
        rows.append(row)
    note = (f"spconv {f['spconv']}" if with_spconv else f"spconv not importable ({f['spconv_error']}): xmcl only")
    return f"{command_lines(d)}\n\n{f['voxels']:,} voxels; {note}; ms, medians:\n\n" + table(header, rows)


def gib(n_bytes: float) -> str:
    return f"{n_bytes / 2**30:.2f} GiB"


def quantile_cell(q: dict) -> str:
    return f"{q['p50']:.2f} / {q['p95']:.2f} / {q['p99']:.2f} ms"


def search(*datas: dict) -> str:
    """Exact search against the chosen index, per dimension (``search_latency.py``), then the HTTP figures."""
    rows, notes = [], []
    for d in datas:
        for r in d["figures"]["dims"]:
            size = f"{r['n']:,} x {r['dim']}"
            e, c = r["exact"], r["chosen"]
            rows.append([size, "exact (Flat)", f"{e['build_seconds']:.1f} s", gib(e["bytes"]), "1.000",
                         quantile_cell(e["one_thread_ms"]), f"{e['batched_qps']:,.0f} q/s"])
            tuning = c["tuning"]
            name = c["factory"] + (f", {tuning['parameter']} {tuning['value']}" if tuning["parameter"] else "")
            rows.append([size, name, f"{c['build_seconds']:.1f} s",
                         f"{gib(c['bytes'])} ({gib(c['bytes_per_million'])} per million)",
                         f"{c['recall_at_10']:.3f}", quantile_cell(c["one_thread_ms"]), f"{c['batched_qps']:,.0f} q/s"])
            met = c["one_thread_ms"]["p95"] <= 5 and c["recall_at_10"] >= 0.95
            tuned = (f"its {tuning['parameter']} was tuned on {tuning['queries']:,} held-out vectors of the "
                     f"collection to recall {tuning['recall']:.3f}" if tuning["parameter"] else
                     "it is exact search at this size (nothing to tune)")
            notes.append(f"- {size}: the chosen index {'meets' if met else 'misses'} the target (p95 ≤ 5 ms at "
                         f"recall@10 ≥ 0.95); {tuned}, and {c['queries']:,} fresh queries give "
                         f"{c['recall_at_10']:.3f}.")
    config = datas[0]["config"]
    text = (f"{command_lines(*datas)}\n\nVectors: {config['clusters']:,} clusters, spread {config['spread']}; "
            f"recall@10 against exact search on {config['queries']:,} fresh queries; single queries on one thread "
            f"(p50 / p95 / p99), batched on every thread.\n\n"
            + table(["vectors", "index", "build", "memory", "recall@10", "one query", "batched"], rows)
            + "\n\n" + "\n".join(notes))
    http = [r for d in datas for r in d["figures"]["dims"] if "http" in r]
    for r in http:
        h, ip = r["http"], r["in_process"]
        one, many = h["one_client"], h["concurrent"]
        loads = [[f"one client, {one['queries']} queries", quantile_cell(one), f"{one['qps']:.1f}"],
                 [f"{many['clients']} concurrent clients, {many['queries']} queries", quantile_cell(many),
                  f"{many['qps']:.1f}"]]
        text += (f"\n\nEnd to end over HTTP on 127.0.0.1 ({r['n']:,}-item index, untrained "
                 f"`configs/flickr8k_user.yaml` model with its MiniLM text tower; Flickr8K val captions as queries, "
                 f"text -> encode -> search -> JSON; the server runs each query on one thread):\n\n"
                 + table(["load", "p50 / p95 / p99", "queries/s"], loads)
                 + f"\n\n- One-client p95 {one['p95']:.1f} ms against the 25 ms target: "
                 f"{'met' if one['p95'] <= 25 else 'not met'}. In process, encoding the query alone takes "
                 f"{quantile_cell(ip['encode_ms'])}, and encode + search + metadata "
                 f"{quantile_cell(ip['encode_search_metadata_ms'])}: encoding is "
                 f"{100 * ip['encode_ms']['p50'] / one['p50']:.0f}% of the one-client p50.")
    return text


def inference_cost(d: dict) -> str:
    f = d["figures"]
    rows = [[f"shared local features: {f['images']:,} images (SGE + projection on 49 x 1280 cells)",
             f"{f['image_locals_seconds']:.1f}"],
            [f"shared local features: {f['captions']:,} captions (MiniLM + projection; timed on "
             f"{d['config']['encode_captions']}, scaled)", f"{f['caption_locals_seconds']:.1f}"],
            [f"dual encoder: GPO pooling of both sides + one GEMM -> {f['images']:,} x {f['captions']:,} scores",
             f"{f['dual_seconds']:.1f}"],
            [f"SCAN t2i cross-attention, lambda 9 (timed on {f['scan_captions']} captions x {f['images']:,} images: "
             f"{f['scan_measured_seconds']:.1f} s, scaled)", f"{f['scan_seconds']:,.1f}"]]
    return (f"{command_lines(d)}\n\n" + table(["part", "seconds"], rows)
            + f"\n\n- Scoring alone, the cross-attention matcher costs **{f['ratio_scoring']:.0f}x** the dual "
            f"encoder; with the shared encoding counted on both sides, {f['ratio_with_encoding']:.1f}x.")


def index_throughput(d: dict) -> str:
    f = d["figures"]
    floor = f["flop_floor_images_per_second"]
    rows = [[r["runtime"], str(r["workers"]), f"{r['images_per_second']:.1f}", f2(r["images_per_second"] / floor)]
            for r in f["rates"]]
    million = f["million"]
    shards, store = f["shard_bytes_per_image"] * 1e6, f["store_bytes_per_image"] * 1e6
    return (f"{command_lines(d)}\n\n{f['images']} Flickr8K val photos through `build_index` (the `xmcl index` "
            f"path) with model `{d['config']['model']}` ({f['dim']}-d), {d['config']['threads']} threads, batch "
            f"{d['config']['batch_size']}. The image path costs {f['gflop_per_image']:.3f} GFLOP per image; at the "
            f"{f['gemm_gflops']:.1f} GFLOP/s of a 1024^3 GEMM on those threads, its FLOP floor is {floor:.0f} "
            f"images/s.\n\n" + table(["runtime", "decoding workers", "images/s", "of the floor"], rows)
            + f"\n\n- On disk per image: {f['shard_bytes_per_image']:,.0f} B of float16 shard, "
            f"{f['store_bytes_per_image']:,.0f} B of SQLite metadata; a million images take {gib(shards)} of shards "
            f"+ {gib(store)} of store + {gib(million['faiss_bytes'])} for the {million['factory']} index that size "
            f"gets (estimate) = {gib(million['total_bytes'])}.")


def query_latency(d: dict) -> str:
    f = d["figures"]
    rsum = f.get("val_rsum") or {}
    torch_p50 = f["encode_p50_ms"]["torch"]
    rows = []
    for runtime, encode in f["encode_ms"].items():
        http = f["http"][runtime]
        quality = f"{rsum[runtime]:.2f}" if runtime in rsum else "-"
        change = f"{rsum[runtime] - rsum['torch']:+.2f}" if runtime in rsum and "torch" in rsum else "-"
        rows.append([runtime, f2(encode["p50"]), f2(encode["p95"]), f2(torch_p50 / encode["p50"]), quality, change,
                     f2(http["one_client"]["p50"]), f2(http["one_client"]["p95"]),
                     f2(http["concurrent"]["p50"]), f2(http["concurrent"]["p95"])])
    clients = next(iter(f["http"].values()))["concurrent"]["clients"]
    return (f"{command_lines(d)}\n\nModel `{d['config']['model']}`; text queries are Flickr8K val captions, raw text "
            f"to unit embedding on one thread. The text path costs {f['text_gflop']:.3f} GFLOP for the median caption: "
            f"at {f['gemm_gflops']:.1f} GFLOP/s (a 1024^3 GEMM on one thread) its compute floor is "
            f"**{f['compute_floor_ms']:.2f} ms**. HTTP: `xmcl serve --runtime` over {f['index']['n']:,} "
            f"{f['index']['dim']}-d vectors ({f['index']['factory']}).\n\n"
            + table(["runtime", "encode p50 ms", "p95", "x torch", "val rSum", "vs torch", "HTTP 1 client p50",
                     "p95", f"{clients} clients p50", "p95"], rows))


def query_latency_summary(d: dict) -> str:
    f = d["figures"]
    parts = [f"{runtime} {p50:.1f} ms" for runtime, p50 in f["encode_p50_ms"].items()]
    http = ", ".join(f"{runtime} {p95:.1f} ms" for runtime, p95 in f["http_p95_ms"].items())
    return (f"- `{d['command']}` ({conditions(d)}): query encoding p50 {', '.join(parts)} (compute floor "
            f"{f['compute_floor_ms']:.1f} ms); HTTP one-client p95 {http} over {f['index']['n']:,} vectors.")


def serve_load(d: dict) -> str:
    f, c = d["figures"], d["config"]
    rows = []
    for number, r in enumerate(f["rounds"], start=1):
        latency = r["latency_ms"]
        rows.append([str(number), f"{r['requests']:,}", str(r["errors"]), f"{r['requests_per_second']:.1f}",
                     *[f"{latency[kind]['p50']:.0f} / {latency[kind]['p99']:.0f}" for kind in
                       ("text", "image", "item", "thumb")],
                     f"{r['rss_before_mib']:.0f} → {r['rss_after_mib']:.0f}"])
    huge = f["huge_uploads"]
    return (f"{command_lines(d)}\n\n`xmcl serve` (model `{c['model']}`, runtime {c['runtime']}, {c['workers']} query "
            f"workers) over {c['images']} Flickr8K val photos and their captions; each round {c['clients']} clients "
            f"for {c['seconds']:.0f} s, each sending in turn a text query, an image upload, an item query and a "
            f"thumbnail request:\n\n"
            + table(["round", "requests", "errors", "requests/s", "text p50 / p99 ms", "image", "item", "thumb",
                     "server RSS MiB"], rows)
            + f"\n\n- While {huge['uploads']} uploads of a {HUGE_SIDE_TEXT} PNG ({huge['upload_bytes'] / 1024:.0f} KB "
            f"each; answered {huge['upload_statuses']}) were processed, /healthz answered in p50 "
            f"{huge['healthz_ms']['p50']:.1f} ms, p99 **{huge['healthz_ms']['p99']:.1f} ms** over {huge['polls']} "
            f"polls ({huge['healthz_failures']} failed); server RSS after them {huge['rss_after_mib']:.0f} MiB.")


def search_summary(*datas: dict) -> str:
    parts = []
    for d in datas:
        for r in d["figures"]["dims"]:
            c = r["chosen"]
            parts.append(f"{r['n']:,} x {r['dim']}: {c['factory']} p95 {c['one_thread_ms']['p95']:.2f} ms at recall@10 "
                         f"{c['recall_at_10']:.3f}, exact p95 {r['exact']['one_thread_ms']['p95']:.0f} ms")
            if "http" in r:
                parts.append(f"HTTP one client p95 {r['http']['one_client']['p95']:.1f} ms (target 25 ms), query "
                             f"encoding alone p50 {r['in_process']['encode_ms']['p50']:.1f} ms")
    return f"- `benchmarks/search_latency.py` ({conditions(datas[0])}): " + "; ".join(parts) + "."


def inference_cost_summary(d: dict) -> str:
    f = d["figures"]
    return (f"- `{d['command']}`: scoring {f['images']:,} x {f['captions']:,} with SCAN's cross-attention costs "
            f"{f['ratio_scoring']:.0f}x the dual encoder's pooling + GEMM ({f['ratio_with_encoding']:.1f}x with the "
            f"shared encoding of both sides).")


def index_throughput_summary(d: dict) -> str:
    f = d["figures"]
    best = max(f["rates"], key=lambda r: r["images_per_second"])
    return (f"- `{d['command']}`: {best['images_per_second']:.1f} images/s from raw 224-px photos ({best['runtime']}; "
            f"FLOP floor {f['flop_floor_images_per_second']:.0f}; {conditions(d)}); an index of a million "
            f"{f['dim']}-d images takes about {gib(f['million']['total_bytes'])} (float16 shards, SQLite, "
            f"{f['million']['factory']}).")


def setup_commands() -> str:
    return "```\n" + "\n".join(step.command for step in PLAN if step.key is None) + "\n```"


@dataclass(frozen=True)
class Block:
    """A generated block of a document: ``render(*figures files of keys)``."""

    name: str
    keys: tuple[str, ...]
    render: Callable[..., str]


BLOCKS = (
    Block("setup", (), setup_commands),
    Block("eval_speed", ("eval_speed",), eval_speed),
    Block("demo", ("demo",), demo),
    Block("throughput", ("throughput_bigru", "throughput_bert"), throughput),
    Block("throughput_f8k", ("throughput_f8k", "throughput_f8k_1thread"), throughput_f8k),
    Block("rq_shapes", ("rq_shapes",), quality),
    Block("uto_margins", ("uto_margins",), margins),
    Block("rq_f8k", ("rq_f8k",), quality),
    Block("distill_probe", ("distill_probe",), probe),
    Block("distill_step", ("distill_step",), distill_step),
    Block("distill_step_authors", ("distill_step_authors",), distill_step),
    Block("sparse_conv", ("sparse_conv",), sparse_conv),
    Block("scaling", ("scaling",), scaling),
    Block("cge_shapes", ("cge_shapes",), cge),
    Block("cge_f8k", ("cge_f8k",), cge),
    Block("distill_tolerance", ("distill_tolerance",), probe),
    Block("rq_converged_estimate", ("rq_converged_estimate", "rq_converged_estimate_1280"), converged_estimate),
    Block("rq_converged_seed0", ("rq_converged_seed0",), converged),
    Block("rq_converged", ("rq_converged",), converged),
    Block("rq_converged_sweep", ("rq_converged_sweep",), converged),
    Block("rq_converged_beyond", ("rq_converged_beyond",), converged),
    Block("rq_converged_retune", ("rq_converged_retune",), converged),
    Block("search", ("search_1024", "search_256"), search),
    Block("inference_cost", ("inference_cost",), inference_cost),
    Block("index_throughput", ("index_throughput",), index_throughput),
    Block("query_latency", ("query_latency",), query_latency),
    Block("serve_load", ("serve_load",), serve_load),
)
SUMMARIES = (
    Block("eval_speed:summary", ("eval_speed",), eval_speed_summary),
    Block("throughput:summary", ("throughput_bigru", "throughput_bert"), throughput_summary),
    Block("rq_shapes:summary", ("rq_shapes",), quality_summary),
    Block("rq_f8k:summary", ("rq_f8k",), quality_summary),
    Block("rq_converged:summary", ("rq_converged",), converged_summary),
    Block("rq_converged_retune:summary", ("rq_converged_retune",), converged_summary),
    Block("distill_probe:summary", ("distill_probe",), probe_summary),
    Block("distill_step:summary", ("distill_step",), distill_step_summary),
    Block("scaling:summary", ("scaling",), scaling_summary),
    Block("demo:summary", ("demo",), demo_summary),
    Block("search:summary", ("search_1024", "search_256"), search_summary),
    Block("inference_cost:summary", ("inference_cost",), inference_cost_summary),
    Block("index_throughput:summary", ("index_throughput",), index_throughput_summary),
    Block("query_latency:summary", ("query_latency",), query_latency_summary),
)


def render_blocks(figures_dir: Path, blocks: tuple[Block, ...]) -> tuple[dict[str, str], dict[str, list[str]]]:
    """The text of each block whose figures files all exist, and the missing keys of the others."""
    rendered, pending = {}, {}
    for block in blocks:
        datas = [load(figures_dir, key) for key in block.keys]
        if all(datas):
            rendered[block.name] = block.render(*datas)
        else:
            pending[block.name] = [key for key, data in zip(block.keys, datas) if data is None]
    return rendered, pending


def _marker(name: str) -> re.Pattern:
    return re.compile(rf"<!-- figures:{re.escape(name)} -->\n.*?<!-- /figures:{re.escape(name)} -->", re.S)


def update_document(text: str, rendered: dict[str, str]) -> str:
    """``text`` with each block named in ``rendered`` replaced; blocks it does not name stay as they are."""
    for name, body in rendered.items():
        block = f"<!-- figures:{name} -->\n{body}\n<!-- /figures:{name} -->"
        text, count = _marker(name).subn(lambda m: block, text)
        if count != 1:
            raise SystemExit(f"error: the document has {count} blocks '{name}' (expected one)")
    return text


# ------------------------------------------------------------------------------------------------ collect
def documented(record: dict) -> Step | None:
    """The plan step whose command made this figures file (by benchmark and documented argv), if any."""
    for step in PLAN:
        if step.key and step.benchmark == record.get("benchmark") and step.argv == record.get("argv"):
            return step
    return None


def collect(root: Path, figures_dir: Path) -> list[str]:
    """Copy the newest figures file of each documented command found under ``root`` to ``figures_dir/KEY.json``
    (unless that one is newer); returns the keys copied."""
    newest: dict[str, tuple[str, Path]] = {}
    for path in sorted(Path(root).rglob("figures.json")):
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            continue
        step = documented(record)
        if step and (step.key not in newest or record["date"] > newest[step.key][0]):
            newest[step.key] = (record["date"], path)
    copied = []
    for key, (date, path) in sorted(newest.items()):
        current = load(figures_dir, key)
        if current is None or date > current["date"]:
            Path(figures_dir).mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, Path(figures_dir) / f"{key}.json")
            copied.append(key)
    return copied


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--figures", type=Path, default=FIGURES_DIR, help="folder of KEY.json figures files")
    parser.add_argument("--collect", type=Path, action="append", default=[], metavar="ROOT",
                        help="first copy the documented commands' figures files found under ROOT")
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--readme", type=Path, default=README)
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--write", action="store_true", help="rewrite the generated blocks of both documents")
    group.add_argument("--check", action="store_true", help="exit 1 if a document's block is not what it generates")
    args = parser.parse_args(argv)

    for root in args.collect:
        copied = collect(root, args.figures)
        print(f"collected from {root}: {', '.join(copied) or 'nothing newer'}")
    stale = []
    for path, blocks in ((args.results, BLOCKS), (args.readme, SUMMARIES)):
        rendered, pending = render_blocks(args.figures, blocks)
        if not (args.write or args.check):
            for name, body in rendered.items():
                print(f"\n## {name}\n\n{body}")
        for name, keys in pending.items():
            print(f"\npending ({path.name}, block {name}): no figures yet; run "
                  + "; ".join(f"`{STEPS[key].command}`" for key in keys))
        text = path.read_text(encoding="utf-8")
        updated = update_document(text, rendered)
        if args.write and updated != text:
            path.write_text(updated, encoding="utf-8")
            print(f"rewrote {path}")
        if args.check and updated != text:
            stale.append(str(path))
    if stale:
        print(f"out of date with their figures files: {', '.join(stale)} (run benchmarks/report.py --write)")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
