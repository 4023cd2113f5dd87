"""keep_freed_memory: a loop that allocates and frees the same temporaries every step stops faulting their pages
in again (page faults counted by the kernel, ``getrusage``)."""

import subprocess
import sys

import pytest

from xmcl.runtime.allocator import keep_freed_memory

STEPS = """
import resource, sys, torch
from xmcl.runtime.allocator import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()
torch.set_num_threads(1)
x, w = torch.randn(6272, 256, requires_grad=True), torch.randn(256, 256, requires_grad=True)
def step():  # a training step's shapes: 128 x 49 cells of 256 dimensions
    y = torch.sigmoid(x @ w) * x
    (y.view(128, 49, 256).transpose(1, 2).contiguous().sum() + (y * y).mean()).backward()
for _ in range(10):  # past the heap's growth
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    step()
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 20)
"""


def faults_per_step(mode: str) -> float:
    done = subprocess.run([sys.executable, "-c", STEPS, mode], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return float(done.stdout.split()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_a_step_reuses_its_freed_blocks_instead_of_faulting_pages_in() -> None:
    default, kept = faults_per_step("default"), faults_per_step("keep")
    assert default > 500  # glibc's own thresholds: the freed temporaries go back to the kernel
    assert kept < default / 2


def test_it_says_whether_glibc_took_the_settings() -> None:
    assert keep_freed_memory() is sys.platform.startswith("linux")
