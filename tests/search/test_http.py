"""The HTTP API on a real uvicorn server on 127.0.0.1: searches by text, upload, embedding and item on two named
indexes; every 4xx the service promises (the server keeps serving); items, thumbnails, and files reached only by id
inside the indexed folder; Prometheus metrics."""

from __future__ import annotations

import http.client
import io
import json
import socket
import sqlite3
import threading
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
import uvicorn
from PIL import Image

from xmcl.retrieval.index.build import IndexOptions, build_index
from xmcl.retrieval.index.search import CollectionIndex, Searcher
from xmcl.retrieval.retriever import Retriever
from xmcl.serve.app import create_app, default_allowed_hosts

from search_world import copy_images

UPLOAD_LIMIT = 100_000


class Server:
    def __init__(self, url: str, port: int, secret_item: int, world: Path, locked_index: Path) -> None:
        self.url, self.port, self.secret_item, self.world = url, port, secret_item, world
        self.locked_index = locked_index

    def request(self, method: str, path: str, body: bytes | None = None,
                headers: dict[str, str] | None = None) -> tuple[int, bytes, str]:
        """Status, body and content type; the path is sent as written (no normalisation)."""
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            connection.request(method, path, body=body, headers=headers or {})
            response = connection.getresponse()
            return response.status, response.read(), response.getheader("content-type", "")
        finally:
            connection.close()

    def post_json(self, payload) -> tuple[int, dict]:
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        status, body, _ = self.request("POST", "/search", data, {"Content-Type": "application/json"})
        return status, json.loads(body)

    def post_form(self, fields: dict[str, str], image: bytes | None, filename: str = "q.png") -> tuple[int, dict]:
        boundary = "xmcltestboundary"
        parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
                 for k, v in fields.items()]
        if image is not None:
            parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{filename}"\r\n'
                         f"Content-Type: image/png\r\n\r\n".encode() + image + b"\r\n")
        body = b"".join(parts) + f"--{boundary}--\r\n".encode()
        status, data, _ = self.request("POST", "/search", body,
                                       {"Content-Type": f"multipart/form-data; boundary={boundary}"})
        return status, json.loads(data)


@pytest.fixture(scope="module")
def server(world: Path, built_index: Path, retriever: Retriever, locked_checkpoint: Path, tmp_path_factory) -> Server:
    base = tmp_path_factory.mktemp("http")
    photos = copy_images(world, base / "photos", [f"shapes_{n:06d}.png" for n in range(4)])
    secret = base / "secret.png"
    Image.new("RGB", (8, 8), (255, 0, 0)).save(secret)
    (photos / "escape.png").symlink_to(secret)  # points outside the folder: never indexed
    build_index(retriever, photos, base / "small", options=IndexOptions(progress=False))
    with sqlite3.connect(base / "small" / "items.sqlite") as db:  # an item whose path leads out of the folder
        secret_item = db.execute("SELECT MAX(id) FROM items").fetchone()[0]
        db.execute("UPDATE items SET path = '../secret.png' WHERE id = ?", (secret_item,))
    locked = Retriever.load(locked_checkpoint, "cpu")  # a locked-text model: its frozen text model runs per query
    build_index(locked, photos, base / "locked", options=IndexOptions(progress=False))
    searchers = {"shapes": Searcher(CollectionIndex.open(built_index), retriever),
                 "small": Searcher(CollectionIndex.open(base / "small"), retriever),
                 "locked": Searcher(CollectionIndex.open(base / "locked"), locked)}
    app = create_app(searchers, max_upload_bytes=UPLOAD_LIMIT, allowed_hosts=default_allowed_hosts("127.0.0.1"))
    with running(app) as port:
        yield Server(f"http://127.0.0.1:{port}", port, secret_item, world, base / "locked")


@contextmanager
def running(app, **config) -> Iterator[int]:
    """``app`` served by uvicorn (with ``config``) in a thread on a free port of 127.0.0.1 (its port), stopped on
    exit."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    uv = uvicorn.Server(uvicorn.Config(app, log_level="warning", **config))
    thread = threading.Thread(target=uv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not uv.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert uv.started, "the server did not start within 30 s"
    try:
        yield sock.getsockname()[1]
    finally:
        uv.should_exit = True
        thread.join(timeout=10)


def png_bytes(path: Path) -> bytes:
    buffer = io.BytesIO()
    Image.open(path).save(buffer, format="PNG")
    return buffer.getvalue()


def test_health_lists_every_index(server: Server) -> None:
    with urllib.request.urlopen(server.url + "/healthz", timeout=30) as response:
        health = json.loads(response.read())
    assert health["status"] == "ok" and health["default"] == "shapes"
    assert health["indexes"]["shapes"]["images"] == 30 and health["indexes"]["shapes"]["captions"] == 150
    assert health["indexes"]["small"]["images"] == 4 and health["indexes"]["small"]["captions"] == 0
    assert health["indexes"]["locked"]["images"] == 4


def test_a_locked_text_model_answers_a_text_query_over_http(server: Server, locked_checkpoint: Path) -> None:
    text = "a red circle above a blue square"
    status, body = server.post_json({"index": "locked", "text": text, "k": 4})
    assert status == 200 and body["warning"] is None and len(body["results"]) == 4
    query = Retriever.load(locked_checkpoint, "cpu").encode_texts([text])[0].numpy()
    index = CollectionIndex.open(server.locked_index)
    brute = {r["id"]: float(query @ index.item_vector(r["id"])) for r in body["results"]}  # exact dot products
    assert [r["id"] for r in body["results"]] == sorted(brute, key=brute.get, reverse=True)
    for result in body["results"]:
        assert result["score"] == pytest.approx(brute[result["id"]], abs=2e-3)


def test_searches_by_text_upload_embedding_and_item(server: Server, built_index: Path, retriever: Retriever) -> None:
    searcher = Searcher(CollectionIndex.open(built_index), retriever)
    status, body = server.post_json({"text": "a red circle", "k": 5})
    assert status == 200 and body["index"] == "shapes" and body["k"] == 5
    assert [r["id"] for r in body["results"]] == [r["id"] for r in searcher.search(text="a red circle", k=5)]

    image = server.world / "images" / "shapes_000006.png"
    status, body = server.post_form({"k": "3", "index": "shapes"}, png_bytes(image))
    assert status == 200 and body["results"][0]["path"] == "shapes_000006.png" and body["results"][0]["score"] > 0.999
    status, captions = server.post_form({"k": "4", "target": "captions"}, png_bytes(image))
    assert status == 200 and captions["target"] == "captions" and len(captions["results"]) == 4

    item = body["results"][1]["id"]
    status, by_item = server.post_json({"item": item, "k": 2})
    nearest = searcher.search(embedding=searcher.index.item_vector(item), k=3)  # the item itself, then the others
    assert nearest[0]["id"] == item  # "more like this" leaves the item out of its own results:
    assert status == 200 and [r["id"] for r in by_item["results"]] == [r["id"] for r in nearest[1:]]
    assert [r["rank"] for r in by_item["results"]] == [1, 2]
    vector = searcher.index.item_vector(item)
    status, by_vector = server.post_json({"embedding": (3.0 * vector).tolist(), "k": 2})
    assert status == 200 and by_vector["results"][0]["id"] == item
    assert by_vector["results"][0]["score"] == pytest.approx(float(vector @ vector) / np.linalg.norm(vector), abs=1e-3)

    status, small = server.post_json({"index": "small", "text": "a red circle", "k": 10})
    assert status == 200 and len(small["results"]) == 4  # k above the collection's size: all of it


@pytest.mark.parametrize("payload, status, message", [
    ({"text": "   "}, 400, "the query text is empty"),
    ({"text": "a cat", "k": 0}, 400, "invalid k: Input should be greater than or equal to 1"),
    ({"text": "a cat", "k": 1001}, 400, "invalid k: Input should be less than or equal to 1000"),
    ({"text": "a cat", "k": "many"}, 400, "invalid k: Input should be a valid integer"),
    ({"embedding": [0.1] * 5}, 400, "the embedding must be a list of 16 numbers"),
    ({"embedding": [0.0] * 16}, 400, "finite and not all zero"),
    ({"embedding": "abc"}, 400, "invalid embedding: Input should be a valid list"),
    ({"text": "a cat", "index": "nope"}, 404, "no index named 'nope'"),
    ({"text": "a cat", "target": "sounds"}, 400, "invalid target: Input should be 'images' or 'captions'"),
    ({"item": 999999}, 400, "no item 999999"),
    ({}, 400, "give exactly one of text, image, embedding, item"),
    ({"text": "a", "item": 1}, 400, "give exactly one of"),
    ({"text": "a", "colour": "red"}, 400, "invalid colour: Extra inputs are not permitted"),
    (b"{not json", 400, "not valid JSON"),
    (b"[1, 2]", 400, "must be a JSON object"),
    (b'{"text": ' + b"[" * 10000 + b"]" * 10000 + b"}", 400, "nested too deep"),
    ({"item": 2**63}, 400, "invalid item: Input should be less than or equal to 9223372036854775807"),
    (b'{"embedding": [1' + b"0" * 400 + b"]}", 400, "invalid embedding.0: Input should be a valid number"),
    ({"embedding": [1e39] * 16}, 400, "within float32's range"),
    ({"text": "x" * 100_001}, 400, "invalid text: String should have at most 100000 characters"),
])
def test_bad_json_requests_get_a_4xx_and_the_server_keeps_serving(server: Server, payload, status: int,
                                                                  message: str) -> None:
    got, body = server.post_json(payload)
    assert got == status and message in body["detail"]
    assert server.post_json({"text": "a blue star", "k": 1})[0] == 200


def test_bad_uploads_get_a_4xx(server: Server) -> None:
    got, body = server.post_form({"k": "3"}, b"GIF89a but not really an image")
    assert got == 400 and "not an image" in body["detail"]
    got, body = server.post_form({"k": "3"}, None)
    assert got == 400 and "no 'image' file" in body["detail"]
    noise = np.random.default_rng(0).integers(0, 256, (200, 200, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(noise).save(buffer, format="PNG")
    assert len(buffer.getvalue()) > UPLOAD_LIMIT
    got, body = server.post_form({"k": "3"}, buffer.getvalue())
    assert got == 413 and "over the limit" in body["detail"]
    got, data, _ = server.request("POST", "/search", b"x" * (UPLOAD_LIMIT + 70_000),
                                  {"Content-Type": "application/json"})
    assert got == 413
    got, data, _ = server.request("POST", "/search", b"text=a", {"Content-Type": "text/plain"})
    assert got == 415 and b"send Content-Type: application/json" in data
    got, data, _ = server.request("POST", "/search", b'{"text": "a cat"}')  # a cross-site "simple" request
    assert got == 415 and b"no content type" in data
    assert server.post_json({"text": "a blue star", "k": 1})[0] == 200


def test_items_and_thumbnails(server: Server) -> None:
    got, data, kind = server.request("GET", "/items/3?index=shapes")
    item = json.loads(data)
    assert got == 200 and item["id"] == 3 and item["path"] == "shapes_000002.png" and len(item["captions"]) == 5
    assert item["fields"]["split"] in ("train", "val", "test")
    got, data, kind = server.request("GET", "/thumbs/3?size=64")
    assert got == 200 and kind == "image/jpeg" and max(Image.open(io.BytesIO(data)).size) <= 64
    got, data, kind = server.request("GET", "/images/3")
    assert got == 200 and data == (server.world / "images" / "shapes_000002.png").read_bytes()
    assert server.request("GET", "/items/999999")[0] == 404
    assert server.request("GET", "/thumbs/3?size=4000")[0] == 400
    got, data, kind = server.request("GET", "/")
    assert got == 200 and b'id="query"' in data and kind.startswith("text/html")
    assert server.request("GET", "/static/app.js")[0] == 200


@pytest.mark.parametrize("path", [
    "/thumbs/../../etc/passwd", "/images/../../../etc/passwd", "/items/..%2F..%2Fetc%2Fpasswd",
    "/thumbs/%2e%2e%2fsecret.png", "/images/-1", "/images/1e3", "/static/../../../../etc/passwd",
    "/static/%2e%2e/%2e%2e/app.py", "/images/..%2fsecret.png?index=small",
])
def test_path_traversal_gets_404(server: Server, path: str) -> None:
    got, data, _ = server.request("GET", path)
    assert got == 404 and b"root:" not in data


def test_files_outside_the_indexed_folder_are_never_served(server: Server) -> None:
    got, data, _ = server.request("GET", "/items/1?index=small")
    assert got == 200 and "escape.png" not in data.decode()  # the symbolic link out of the folder was not indexed
    for route in ("thumbs", "images"):
        got, data, _ = server.request("GET", f"/{route}/{server.secret_item}?index=small")
        assert got == 404, route  # its stored path leads out of the folder


def test_metrics_count_searches_in_prometheus_format(server: Server) -> None:
    def counts() -> dict[str, float]:
        with urllib.request.urlopen(server.url + "/metrics", timeout=30) as response:
            assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
            text = response.read().decode()
        samples = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, value = line.rsplit(" ", 1)
                samples[name] = float(value)
        return samples

    before = counts()
    for _ in range(3):
        assert server.post_json({"index": "small", "text": "a green square", "k": 2})[0] == 200
    assert server.post_json({"index": "small", "text": "", "k": 2})[0] == 400
    after = counts()
    ok, bad = 'xmcl_search_requests_total{index="small",status="200"}', \
        'xmcl_search_requests_total{index="small",status="400"}'
    assert after[ok] - before.get(ok, 0) == 3 and after[bad] - before.get(bad, 0) == 1
    count = 'xmcl_search_latency_seconds_count{index="small"}'
    assert after[count] - before.get(count, 0) == 3
    quantiles = [after[f'xmcl_search_latency_seconds{{index="small",quantile="{q}"}}'] for q in (0.5, 0.9, 0.99)]
    assert 0 < quantiles[0] <= quantiles[1] <= quantiles[2]
    assert after['xmcl_index_items{index="shapes",target="captions"}'] == 150
    with pytest.raises(urllib.error.HTTPError):
        urllib.request.urlopen(server.url + "/nothing-here", timeout=30)


def test_cli_search_asks_a_running_server_instead_of_loading_the_model(server: Server, built_index: Path,
                                                                      retriever: Retriever, monkeypatch) -> None:
    from click.testing import CliRunner

    from xmcl.cli import main

    def no_model(*args, **kwargs):
        raise AssertionError("search --server loaded a model")

    monkeypatch.setattr(Retriever, "load", no_model)
    local = Searcher(CollectionIndex.open(built_index), retriever)
    result = CliRunner().invoke(main, ["search", "shapes", "a red circle", "-k", "4", "--json", "--server", server.url])
    assert result.exit_code == 0, result.output
    assert [r["id"] for r in json.loads(result.stdout)["results"]] == [
        r["id"] for r in local.search(text="a red circle", k=4)]
    image = server.world / "images" / "shapes_000006.png"
    result = CliRunner().invoke(main, ["search", "small", "--image", str(image), "-k", "2", "--server", server.url])
    assert result.exit_code == 0 and "rank" in result.stdout, result.output
    result = CliRunner().invoke(main, ["search", "nowhere", "a red circle", "--server", server.url])
    assert result.exit_code == 2 and "404" in result.output and "no index named 'nowhere'" in result.output
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        free = closed.getsockname()[1]
    result = CliRunner().invoke(main, ["search", "shapes", "a cat", "--server", f"http://127.0.0.1:{free}"])
    assert result.exit_code == 2 and "cannot reach the search server" in result.output


def test_odd_item_ids_are_404_and_huge_embeddings_are_normalised_exactly(server: Server, built_index: Path,
                                                                        retriever: Retriever) -> None:
    assert server.request("GET", "/items/%C2%B2")[0] == 404  # "²".isdigit() is true, but it is no id
    searcher = Searcher(CollectionIndex.open(built_index), retriever)
    vector = searcher.index.item_vector(3)
    status, body = server.post_json({"embedding": (vector / abs(vector).max() * 3e38).tolist(), "k": 1})
    assert status == 200 and body["results"][0]["id"] == 3  # the float32 norm would overflow to inf and score 0
    assert body["results"][0]["score"] == pytest.approx(float(vector @ vector) / np.linalg.norm(vector), abs=1e-3)


def test_other_host_headers_are_refused_and_head_and_get_search_answer(server: Server, built_index: Path,
                                                                       retriever: Retriever) -> None:
    got, data, _ = server.request("GET", "/images/3", headers={"Host": "attacker.example"})
    assert got == 400 and data != (server.world / "images" / "shapes_000002.png").read_bytes()
    assert server.request("GET", "/healthz", headers={"Host": "localhost:1234"})[0] == 200
    for path in ("/healthz", "/images/3", "/items/3", "/thumbs/3", "/"):
        got, data, _ = server.request("HEAD", path)
        assert got == 200 and data == b"", path
    got, data, _ = server.request("GET", "/search?text=a+red+circle&k=4")
    by_url = json.loads(data)
    searcher = Searcher(CollectionIndex.open(built_index), retriever)
    assert got == 200 and [r["id"] for r in by_url["results"]] == [
        r["id"] for r in searcher.search(text="a red circle", k=4)]
    assert server.request("GET", "/search?text=a&colour=red")[0] == 400


def test_an_api_key_guards_every_route_but_the_page(server: Server, built_index: Path, retriever: Retriever) -> None:
    app = create_app({"shapes": Searcher(CollectionIndex.open(built_index), retriever)}, api_key="s3cret")
    with running(app) as port:
        guarded = Server(f"http://127.0.0.1:{port}", port, 0, server.world, server.locked_index)
        assert guarded.request("GET", "/")[0] == 200
        for path in ("/healthz", "/images/3", "/search?text=a+red+circle"):
            assert guarded.request("GET", path)[0] == 401, path
            assert guarded.request("GET", path, headers={"X-API-Key": "wrong"})[0] == 401, path
            assert guarded.request("GET", path, headers={"X-API-Key": "s3cret"})[0] == 200, path
        assert guarded.request("GET", "/images/3?key=s3cret")[0] == 200
        assert guarded.request("GET", "/healthz", headers={"Authorization": "Bearer s3cret"})[0] == 200


def test_admission_runs_at_most_workers_and_refuses_past_the_queue() -> None:
    import asyncio

    from xmcl.serve.admission import Admission, ServerBusy

    release = threading.Event()
    running_now, peak = [0], [0]
    lock = threading.Lock()

    def hold() -> None:
        with lock:
            running_now[0] += 1
            peak[0] = max(peak[0], running_now[0])
        release.wait(timeout=10)
        with lock:
            running_now[0] -= 1

    async def scenario() -> list:
        admission = Admission(workers=2, queue=1)
        tasks = [asyncio.create_task(admission.run(hold)) for _ in range(3)]
        await asyncio.sleep(0.2)
        with pytest.raises(ServerBusy, match="busy"):
            await admission.run(hold)  # 2 running + 1 waiting: the fourth is refused at once
        release.set()
        return await asyncio.gather(*tasks)

    assert asyncio.run(scenario()) == [None, None, None] and peak[0] == 2


def whole_response(client: socket.socket) -> bytes:
    """Read one HTTP response: its head, then as many body bytes as its Content-Length says.

    The head and the body may arrive in separate segments, so one recv is not enough.
    """
    answer = b""
    while b"\r\n\r\n" not in answer or len(answer.partition(b"\r\n\r\n")[2]) < body_length(answer):
        chunk = client.recv(4096)
        if not chunk:
            break
        answer += chunk
    return answer


def body_length(answer: bytes) -> int:
    """The Content-Length a response head declares (0 when it declares none)."""
    for line in answer.partition(b"\r\n\r\n")[0].split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value)
    return 0


def test_a_body_that_does_not_arrive_in_time_is_408(built_index: Path, retriever: Retriever) -> None:
    app = create_app({"shapes": Searcher(CollectionIndex.open(built_index), retriever)}, body_timeout=1.0)
    with running(app) as port, socket.create_connection(("127.0.0.1", port), timeout=10) as client:
        client.sendall(b"POST /search HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                       b"Content-Length: 100\r\n\r\n{")  # and nothing more
        began = time.monotonic()
        answer = whole_response(client)
    assert answer.startswith(b"HTTP/1.1 408") and b"did not arrive within 1 s" in answer
    assert 0.8 < time.monotonic() - began < 8


def test_the_api_is_described_by_its_openapi_schema(server: Server) -> None:
    got, data, kind = server.request("GET", "/openapi.json")
    schema = json.loads(data)
    assert got == 200 and {"/search", "/items/{item_id}", "/thumbs/{item_id}", "/healthz"} <= set(schema["paths"])
    body = schema["paths"]["/search"]["post"]["requestBody"]["content"]
    assert body["application/json"]["schema"]["properties"]["k"]["maximum"] == 1000
    assert "image" in body["multipart/form-data"]["schema"]["properties"]
    assert server.request("GET", "/docs")[0] == 200


def test_a_connection_whose_headers_do_not_arrive_in_time_is_closed(built_index: Path, retriever: Retriever,
                                                                    monkeypatch) -> None:
    from xmcl.serve.protocol import HeaderTimeoutProtocol

    monkeypatch.setattr(HeaderTimeoutProtocol, "header_timeout", 1.0)
    app = create_app({"shapes": Searcher(CollectionIndex.open(built_index), retriever)})
    with running(app, http=HeaderTimeoutProtocol) as port:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as slow:
            slow.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # and the headers never end
            began = time.monotonic()
            assert slow.recv(4096) == b""  # closed by the server
            assert 0.8 < time.monotonic() - began < 8
        with socket.create_connection(("127.0.0.1", port), timeout=10) as kept:  # a normal request, kept alive
            kept.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            assert kept.recv(4096).startswith(b"HTTP/1.1 200")


def test_a_damaged_index_file_is_a_500_that_says_how_to_repair(world: Path, retriever: Retriever,
                                                              tmp_path: Path) -> None:
    photos = copy_images(world, tmp_path / "photos", [f"shapes_{n:06d}.png" for n in range(3)])
    build_index(retriever, photos, tmp_path / "index", options=IndexOptions(progress=False))
    searcher = Searcher(CollectionIndex.open(tmp_path / "index"), retriever)
    file, _ = searcher.index.store.vector_location("images", 1)
    (tmp_path / "index" / "shards" / file).write_bytes(b"damaged")
    with running(create_app({"photos": searcher})) as port:
        damaged = Server(f"http://127.0.0.1:{port}", port, 0, world, tmp_path / "index")
        status, body = damaged.post_json({"item": 1, "k": 2})
    assert status == 500 and "the index is damaged" in body["detail"] and "rerun `xmcl index`" in body["detail"]
