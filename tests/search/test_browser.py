"""The search page in a real headless Chromium (Debian's package, driven by Playwright) against ``xmcl serve`` on
127.0.0.1: type a query and see results, upload an image, drop one, click a result; usable at a phone's width."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from xmcl.retrieval.index.search import CollectionIndex, Searcher
from xmcl.retrieval.retriever import Retriever

pytestmark = pytest.mark.slow  # minutes of training, subprocesses or a browser: `make test-fast` leaves it out

SRC = Path(__file__).resolve().parents[2] / "src"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
TIMEOUT_MS = 30_000

playwright_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed "
                                     "(pip install -e '.[dev]')")
if CHROMIUM is None:
    pytest.skip("Chromium is not installed here (apt-get install chromium; .ci/run installs it)",
                allow_module_level=True)


@pytest.fixture(scope="module")
def served(built_index: Path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    process = subprocess.Popen([sys.executable, "-m", "xmcl", "serve", f"shapes={built_index}", "--port", str(port),
                                "--device", "cpu"], env={**os.environ, "PYTHONPATH": str(SRC)},
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"xmcl serve exited: {process.stdout.read()}")
        try:
            with urllib.request.urlopen(url + "/healthz", timeout=2) as response:
                if json.loads(response.read())["status"] == "ok":
                    break
        except OSError:
            time.sleep(0.2)
    else:
        process.kill()
        pytest.fail("xmcl serve did not answer /healthz within 120 s")
    yield url
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()


@pytest.fixture(scope="module")
def browser():
    with playwright_api.sync_playwright() as driver:
        chromium = driver.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        yield chromium
        chromium.close()


def first_path(page) -> str:
    return page.locator(".result").first.get_attribute("data-path")


def test_type_upload_drop_and_click(served: str, browser, built_index: Path, retriever: Retriever, world: Path,
                                    tmp_path: Path) -> None:
    expected = Searcher(CollectionIndex.open(built_index), retriever).search(text="a red circle", k=12)
    page = browser.new_page(viewport={"width": 1200, "height": 900})
    page.set_default_timeout(TIMEOUT_MS)
    page.goto(served + "/")
    page.wait_for_function("document.getElementById('status').textContent === 'ready'")
    assert page.locator("#index option").first.get_attribute("value") == "shapes"

    page.fill("#query", "a red circle")
    page.press("#query", "Enter")
    page.wait_for_function("document.querySelectorAll('.result').length === 12")
    assert [page.locator(".result").nth(n).get_attribute("data-path") for n in range(12)] == \
        [r["path"] for r in expected]
    assert page.locator(".result img").first.evaluate("img => img.complete && img.naturalWidth > 0 || "
                                                       "new Promise(done => img.onload = () => done(true))")
    assert "12 images from index shapes" in page.inner_text("#status")

    page.set_input_files("#upload", str(world / "images" / "shapes_000006.png"))
    page.wait_for_function("document.querySelector('.result')?.dataset.path === 'shapes_000006.png'")

    page.evaluate("""async () => {
        const blob = await (await fetch('/images/9')).blob();
        const transfer = new DataTransfer();
        transfer.items.add(new File([blob], 'dropped.png', {type: 'image/png'}));
        document.getElementById('dropzone').dispatchEvent(new DragEvent('drop', {dataTransfer: transfer}));
    }""")
    page.wait_for_function("document.querySelector('.result')?.dataset.id === '9'")

    third = page.locator(".result").nth(2)
    clicked, clicked_path = third.get_attribute("data-id"), third.get_attribute("data-path")
    similar = Searcher(CollectionIndex.open(built_index), retriever).search(item=int(clicked), k=12)
    third.click()
    expected_ids = ",".join(str(r["id"]) for r in similar)
    page.wait_for_function("[...document.querySelectorAll('.result')].map(r => r.dataset.id).join(',') === "
                           f"'{expected_ids}'")
    assert clicked not in expected_ids.split(",")
    assert page.inner_text("#query-view") == f"Similar to {clicked_path}" and page.input_value("#query") == ""
    link = page.locator(".result a.path").first
    assert link.inner_text() == similar[0]["path"]
    assert link.get_attribute("href").startswith(f"/images/{similar[0]['id']}")
    page.screenshot(path=str(tmp_path / "desktop.png"))

    page.select_option("#target", "captions")
    page.fill("#query", "a red circle")
    page.press("#query", "Enter")
    page.wait_for_function("document.getElementById('status').textContent.includes('captions from')")
    ids = [page.locator(".result").nth(n).get_attribute("data-id") for n in range(page.locator(".result").count())]
    assert len(ids) == len(set(ids))  # one card per photo, its matching captions listed on it
    assert page.locator(".result .caption").count() == 12
    assert page.inner_text("#query-view") == "Results for “a red circle”"

    page.fill("#query", "   ")
    page.press("#query", "Enter")
    page.wait_for_function("document.getElementById('status').classList.contains('error')")
    assert "empty" in page.inner_text("#status")
    assert page.locator(".result").count() == 0 and "empty" in page.inner_text(".error-card")
    page.close()


def test_the_page_fits_a_phone(served: str, browser) -> None:
    page = browser.new_page(viewport={"width": 390, "height": 844}, device_scale_factor=2, is_mobile=True)
    page.set_default_timeout(TIMEOUT_MS)
    page.goto(served + "/")
    page.wait_for_function("document.getElementById('status').textContent === 'ready'")
    page.fill("#query", "a blue square")
    page.press("#query", "Enter")
    page.wait_for_function("document.querySelectorAll('.result').length > 0")
    assert page.evaluate("document.documentElement.scrollWidth") <= 390
    columns = page.evaluate("new Set([...document.querySelectorAll('.result')].map(r => r.offsetLeft)).size")
    assert columns == 2
    page.close()
