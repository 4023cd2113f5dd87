"""Rerun every documented command, in order, into fresh folders; then regenerate the documents' tables.

    python benchmarks/reproduce.py [--root runs/reproduce-YYYYmmdd-HHMMSS] [--skip-long] [--only KEY_OR_NAME ...]
        [--dry-run] [--no-report]

Runs the steps of ``report.PLAN`` (set-up commands, then the benchmarks; hours on 2 CPU cores, the ``long`` ones
most of it) with ``runs/`` in every command moved to ROOT (a new folder by default), ``XMCL_RUNS=ROOT`` so that
the benchmarks' default output folders land there too, and ``xmcl`` / ``python`` run by this interpreter. Each
step's output goes to ROOT/logs/NN-name.log; ROOT/reproduce.json records the steps done, so rerunning with the
same ``--root`` continues after the last finished step (each command also resumes its own work). When every
selected step has run, ``report.py --collect ROOT --write`` copies the new figures files into docs/figures and
rewrites the tables of docs/results.md and README.md. ``make figures`` runs this script; it is never part of
``make test``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

from report import PLAN, REPO, Step
from report import main as report_main

from xmcl.runtime.files import atomic_write_text


def relocated(step: Step, root: Path) -> list[str]:
    """The step's command with ``runs/`` moved to ``root`` and the programs replaced by this interpreter."""
    words = [str(root / word[len("runs/"):]) if word.startswith("runs/") else word for word in shlex.split(
        step.command)]
    if words[0] == "xmcl":
        return [sys.executable, "-m", "xmcl", *words[1:]]
    if words[0] == "python":
        return [sys.executable, *words[1:]]
    raise SystemExit(f"error: plan step '{step.name}' runs {words[0]!r}; expected xmcl or python")


def selected(only: list[str], skip_long: bool) -> list[Step]:
    steps = [step for step in PLAN if not (skip_long and step.long)]
    if only:
        unknown = [name for name in only if not any(name in (step.key, step.name) for step in PLAN)]
        if unknown:
            raise SystemExit(f"error: no plan step named {unknown}; steps: "
                             + ", ".join(step.key or step.name for step in PLAN))
        steps = [step for step in steps if step.key in only or step.name in only]
    return steps


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    parser.add_argument("--root", type=Path, default=Path(f"runs/reproduce-{stamp}"),
                        help="where the documented runs/ folders go (an existing one is continued)")
    parser.add_argument("--skip-long", action="store_true", help="leave out the steps that take hours")
    parser.add_argument("--only", nargs="+", default=[], metavar="KEY", help="run only these steps (key or name)")
    parser.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    parser.add_argument("--no-report", action="store_true", help="do not regenerate the documents at the end")
    args = parser.parse_args()
    root = args.root if args.root.is_absolute() else REPO / args.root
    steps = selected(args.only, args.skip_long)
    state_path = root / "reproduce.json"
    done = json.loads(state_path.read_text())["done"] if state_path.exists() else []
    env = {**os.environ, "XMCL_RUNS": str(root), "PYTHONPATH": os.pathsep.join(
        p for p in (str(REPO / "src"), os.environ.get("PYTHONPATH", "")) if p)}
    for number, step in enumerate(steps, 1):
        command = relocated(step, root)
        if args.dry_run:
            print(shlex.join(command))
            continue
        if step.name in done:
            print(f"[{number}/{len(steps)}] {step.name}: done before, skipped")
            continue
        log = root / "logs" / f"{PLAN.index(step):02d}-{step.name.replace(' ', '_').replace(',', '')}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        print(f"[{number}/{len(steps)}] {step.name}: {step.command}  (log {log})", flush=True)
        with log.open("a", encoding="utf-8") as handle:
            code = subprocess.run(command, cwd=REPO, env=env, stdout=handle, stderr=subprocess.STDOUT).returncode
        if code:
            print(f"error: step '{step.name}' exited with {code}; see {log}. Rerun with --root {args.root} to "
                  f"continue from it.")
            return code
        done.append(step.name)
        atomic_write_text(state_path, json.dumps({"done": done}, indent=1) + "\n")
    if args.dry_run or args.no_report:
        return 0
    return report_main(["--collect", str(root), "--write"])


if __name__ == "__main__":
    sys.exit(main())
