"""benchmarks/gpu_check.py: its plan runs end to end on the CPU (``--dry-run``), and a failing check is recorded,
not fatal."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from xmcl.nn.spconv_map import spconv_importable

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import gpu_check  # noqa: E402


def test_a_failing_check_keeps_its_output_and_the_plan_goes_on(tmp_path: Path) -> None:
    plan = gpu_check.Plan(tmp_path / "work", "cpu")
    assert not plan.run("broken", [sys.executable, "-c", "import sys; print('what went wrong'); sys.exit(3)"])
    assert plan.run("fine", [sys.executable, "-c", "pass"])
    assert plan.results["broken"]["ok"] is False and "what went wrong" in plan.results["broken"]["output_tail"]
    assert plan.results["fine"]["ok"] is True and "output_tail" not in plan.results["fine"]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_the_dry_run_passes_every_check_on_the_cpu(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, str(BENCHMARKS / "gpu_check.py"), "--dry-run", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=580)
    checks = json.loads((tmp_path / "figures.json").read_text())["figures"]["checks"]
    failed = {name: r.get("output_tail") for name, r in checks.items() if not r["ok"]}
    assert done.returncode == 0 and not failed, failed
    expected = {"corpus", "features", "torchrun", "resume-straight", "resume-first-epoch", "resume", "export", "index",
                "search", "serve"}
    expected |= {f"{loop}-{amp}" for loop in ("train", "clip", "distill") for amp in ("none", "bf16")}
    if spconv_importable():  # the CPU's "auto" kernels are torch's; the plan also runs the other ones
        expected.add("distill-spconv-kernels")
    assert set(checks) == expected
    assert checks["resume"]["largest_weight_difference"] == 0.0  # one thread on the CPU: bit for bit
    for loop, rate in (("train", "samples_per_s"), ("clip", "samples_per_s"), ("distill", "scenes_per_s")):
        assert checks[f"{loop}-bf16"][rate] > 0 and checks[f"{loop}-none"]["peak_memory_mib"] > 0
