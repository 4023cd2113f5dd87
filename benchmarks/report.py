"""The generated blocks of ``docs/results.md`` (and the summary lines of README's "Measured figures"): each rendered
from its figures files by a function beside its benchmark (``BLOCKS``, ``SUMMARIES``) and spliced in here.

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
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import cge_inference
import demo_run
import distill_probe
import distill_step
import eval_speed
import index_throughput
import inference_cost
import loop_overheads
import query_latency
import retrieval_quality
import rq_converged
import scaling
import search_latency
import serve_load
import sparse_conv_backends
import train_throughput
import uto_margins

REPO = Path(__file__).resolve().parent.parent
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
    Step("training steps against the hardware, locked text", "python benchmarks/train_throughput.py --locked",
         "throughput_locked"),
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
    Step("what a locked run spends outside its steps", "python benchmarks/loop_overheads.py --data runs/f8k_feats",
         "loop_overheads"),
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


def load(figures_dir: Path, key: str) -> dict | None:
    path = Path(figures_dir) / f"{key}.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else None


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
    Block("eval_speed", ("eval_speed",), eval_speed.render),
    Block("demo", ("demo",), demo_run.render),
    Block("throughput", ("throughput_bigru", "throughput_bert"), train_throughput.render),
    Block("throughput_f8k", ("throughput_f8k", "throughput_f8k_1thread"), train_throughput.render_flickr8k),
    Block("throughput_locked", ("throughput_locked",), train_throughput.render_locked),
    Block("loop_overheads", ("loop_overheads",), loop_overheads.render),
    Block("rq_shapes", ("rq_shapes",), retrieval_quality.render),
    Block("uto_margins", ("uto_margins",), uto_margins.render),
    Block("rq_f8k", ("rq_f8k",), retrieval_quality.render),
    Block("distill_probe", ("distill_probe",), distill_probe.render),
    Block("distill_step", ("distill_step",), distill_step.render),
    Block("distill_step_authors", ("distill_step_authors",), distill_step.render),
    Block("sparse_conv", ("sparse_conv",), sparse_conv_backends.render),
    Block("scaling", ("scaling",), scaling.render),
    Block("cge_shapes", ("cge_shapes",), cge_inference.render),
    Block("cge_f8k", ("cge_f8k",), cge_inference.render),
    Block("distill_tolerance", ("distill_tolerance",), distill_probe.render),
    Block("rq_converged_estimate", ("rq_converged_estimate", "rq_converged_estimate_1280"),
          rq_converged.render_estimate),
    Block("rq_converged_seed0", ("rq_converged_seed0",), rq_converged.render),
    Block("rq_converged", ("rq_converged",), rq_converged.render),
    Block("rq_converged_sweep", ("rq_converged_sweep",), rq_converged.render),
    Block("rq_converged_beyond", ("rq_converged_beyond",), rq_converged.render),
    Block("rq_converged_retune", ("rq_converged_retune",), rq_converged.render),
    Block("search", ("search_1024", "search_256"), search_latency.render),
    Block("inference_cost", ("inference_cost",), inference_cost.render),
    Block("index_throughput", ("index_throughput",), index_throughput.render),
    Block("query_latency", ("query_latency",), query_latency.render),
    Block("serve_load", ("serve_load",), serve_load.render),
)
SUMMARIES = (
    Block("eval_speed:summary", ("eval_speed",), eval_speed.summary),
    Block("throughput:summary", ("throughput_bigru", "throughput_bert"), train_throughput.summary),
    Block("rq_shapes:summary", ("rq_shapes",), retrieval_quality.summary),
    Block("rq_f8k:summary", ("rq_f8k",), retrieval_quality.summary),
    Block("rq_converged:summary", ("rq_converged",), rq_converged.summary),
    Block("rq_converged_retune:summary", ("rq_converged_retune",), rq_converged.summary),
    Block("distill_probe:summary", ("distill_probe",), distill_probe.summary),
    Block("distill_step:summary", ("distill_step",), distill_step.summary),
    Block("scaling:summary", ("scaling",), scaling.summary),
    Block("demo:summary", ("demo",), demo_run.summary),
    Block("search:summary", ("search_1024", "search_256"), search_latency.summary),
    Block("inference_cost:summary", ("inference_cost",), inference_cost.summary),
    Block("index_throughput:summary", ("index_throughput",), index_throughput.summary),
    Block("query_latency:summary", ("query_latency",), query_latency.summary),
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
