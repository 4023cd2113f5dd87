"""The thread budget of a run (a fixed count as given, or the usable cores minus those other processes keep busy), and
work run beside a block on a share of the threads."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import pytest
import torch

from xmcl.runtime import threads as threads_module
from xmcl.runtime.device import usable_cores
from xmcl.runtime.threads import ThreadBudget, _side_thread, alongside, busy_cores_elsewhere, fetched_ahead


@pytest.fixture(autouse=True)
def _restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_a_requested_count_is_used_as_given(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(threads_module, "busy_cores_elsewhere", lambda: pytest.fail("a fixed count reads no load"))
    assert ThreadBudget(3).update() == 3 and torch.get_num_threads() == 3


def test_auto_takes_the_usable_cores_minus_the_busy_ones_and_rechecks_when_due(
        monkeypatch: pytest.MonkeyPatch) -> None:
    busy = {"cores": 1, "reads": 0}

    def fake_busy() -> int:
        busy["reads"] += 1
        return busy["cores"]

    monkeypatch.setattr(threads_module, "usable_cores", lambda: 4)
    monkeypatch.setattr(threads_module, "busy_cores_elsewhere", fake_busy)
    budget = ThreadBudget(0, recheck_s=3600.0)
    assert budget.threads == 3 == torch.get_num_threads() and busy["reads"] == 1
    busy["cores"] = 9  # more busy cores than usable ones: still one thread
    assert budget.update() == 3 and busy["reads"] == 1  # not due yet
    budget.recheck_s = 0.0
    assert budget.update() == 1 == torch.get_num_threads() and busy["reads"] == 2


def test_a_busy_process_is_seen() -> None:
    if not os.path.isdir("/proc"):
        pytest.skip("no /proc on this platform")
    spin = "import time\nend = time.time() + 20\nwhile time.time() < end: pass"  # stops by itself
    spinner = subprocess.Popen([sys.executable, "-c", spin])
    try:
        time.sleep(0.5)
        assert busy_cores_elsewhere(samples=7) >= 1
    finally:
        spinner.kill()
        spinner.wait()
    assert 1 <= usable_cores() <= (os.cpu_count() or 1)


@pytest.mark.parametrize("entry", ["xmcl.cli", "xmcl.training.retrieval_trainer"])
def test_importing_xmcl_shortens_openmp_spinning_before_torch_loads(entry: str) -> None:
    env = {k: v for k, v in os.environ.items() if k != "GOMP_SPINCOUNT"}
    spin = "os.environ['GOMP_SPINCOUNT']"
    # the library's entry (which loads torch itself) finds the spin set by then, as libgomp reads it at torch's load
    code = (f"import sys, os, builtins; real = builtins.__import__; seen = []\n"
            f"def look(name, *a, **k):\n"
            f"    if name == 'torch' and not seen: seen.append({spin})\n"
            f"    return real(name, *a, **k)\n"
            f"builtins.__import__ = look; import {entry}; print(seen[0] if seen else {spin}, 'torch' in sys.modules)")
    loads_torch = str(entry != "xmcl.cli")  # the command line loads torch only when a command runs
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["3000", loads_torch]
    env["GOMP_SPINCOUNT"] = "777"  # a user's own setting wins
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["777", loads_torch]


def _where() -> tuple[str, int]:
    return threading.current_thread().name, torch.get_num_threads()


@pytest.mark.parametrize(("threads", "side", "block"), [(2, 1, 1), (4, 2, 2), (3, 1, 2)])
def test_alongside_splits_the_threads_between_the_work_and_the_block(threads: int, side: int, block: int) -> None:
    torch.set_num_threads(threads)
    with alongside(_where) as result:
        inside = _where()
    name, side_threads = result()
    assert name != threading.current_thread().name and name.startswith("xmcl-side")
    assert side_threads == side and inside == (threading.current_thread().name, block)
    assert torch.get_num_threads() == threads  # restored after the block
    assert _side_thread(side).submit(torch.get_num_threads).result() == side  # the side thread keeps its count


@pytest.mark.parametrize(("threads", "enabled"), [(1, True), (2, False)])
def test_without_threads_to_split_the_work_runs_here_once_when_its_result_is_asked(threads: int,
                                                                                   enabled: bool) -> None:
    torch.set_num_threads(threads)
    calls = []

    def work() -> tuple[str, int]:
        calls.append(1)
        return _where()

    with alongside(work, enabled) as result:
        assert not calls and _where()[1] == threads  # nothing ran yet; the block keeps every thread
    assert result() == (threading.current_thread().name, threads) and result() == result() and len(calls) == 1


def test_an_error_in_the_work_reaches_the_caller_and_one_in_the_block_waits_for_the_work() -> None:
    torch.set_num_threads(2)

    def failing() -> None:
        raise ValueError("from the side")

    with alongside(failing) as result:
        pass
    with pytest.raises(ValueError, match="from the side"):
        result()
    finished = threading.Event()

    def slow() -> None:
        time.sleep(0.3)
        finished.set()

    with pytest.raises(KeyError):
        with alongside(slow):
            raise KeyError("in the block")
    assert finished.is_set()  # the work ended before the block's error left the context


def test_fetched_ahead_reads_the_next_item_on_a_side_thread_while_the_caller_works() -> None:
    torch.set_num_threads(2)
    reads, second_read = [], threading.Event()

    def items():
        for i in range(4):
            reads.append(threading.current_thread().name)
            if i == 1:
                second_read.set()
            yield i

    got = []
    for item in fetched_ahead(items()):
        if item == 0:  # item 1 is read while the caller holds item 0 (plain iteration would wait here in vain)
            assert second_read.wait(5)
        got.append(item)
    assert got == [0, 1, 2, 3] and len(reads) == 4
    assert all(name.startswith("xmcl-side") for name in reads)


@pytest.mark.parametrize(("threads", "enabled"), [(1, True), (2, False)])
def test_fetched_ahead_is_plain_iteration_without_threads_to_spare(threads: int, enabled: bool) -> None:
    torch.set_num_threads(threads)
    here = threading.current_thread().name
    seen = []

    def items():
        for i in range(3):
            seen.append(threading.current_thread().name)
            yield i

    assert list(fetched_ahead(items(), enabled)) == [0, 1, 2] and seen == [here] * 3


def test_a_read_error_reaches_the_caller_and_closing_early_waits_for_the_read_in_flight() -> None:
    torch.set_num_threads(2)

    def failing():
        yield 0
        raise ValueError("item 1 is unreadable")

    with pytest.raises(ValueError, match="item 1 is unreadable"):
        list(fetched_ahead(failing()))
    finished = threading.Event()

    def slow():
        yield 0
        time.sleep(0.3)
        finished.set()
        yield 1

    ahead = fetched_ahead(slow())
    assert next(ahead) == 0
    ahead.close()  # item 1 is being read
    assert finished.is_set()
