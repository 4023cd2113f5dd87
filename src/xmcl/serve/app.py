"""The search service: a FastAPI app over named indexes (each a ``Searcher``), and the page at ``/``.

Routes::

    POST /search          JSON {"index", "text" | "embedding" | "item", "k", "target"} or a multipart form with an
                          "image" file and the same fields -> {"index", "target", "k", "results": [...],
                          "warning": null, or why the results may mislead (a text query's words unknown to the
                          model; an index whose new generation could not be opened)}; an item query leaves the
                          item out of its results
    GET  /search          ?text= or ?item=, with k, index, target: as the JSON POST
    GET  /items/{id}      an image item's metadata and captions          (?index=NAME, default the first)
    GET  /thumbs/{id}     a JPEG thumbnail of an item's image (?size=)
    GET  /images/{id}     the item's image file
    GET  /healthz         {"status": "ok" | "stale", "indexes": {name: {"images", "captions", "dim", "stale"}}}; an
                          index rebuilt in place is reopened; "stale" says why a new generation could not be
    GET  /metrics         Prometheus text: searches by index and status, latency quantiles, items per index
    GET  /                the search page (``static/``)

Every GET route answers HEAD. Bad input is a 4xx with ``{"detail": message}`` and the server goes on: 400 for an
empty text, an upload that is not an image, an embedding of the wrong width or out of float32's range, k out of
range, JSON nested too deep or a malformed request, and for a Host header not allowed; 401 without the API key a
server asks for; 404 for an unknown index or item; 408 for a body that does not arrive in time; 413 for a body or
upload over the limit; 415 for a POST that is neither JSON nor multipart (a cross-site "simple" request); 503 when
the query workers and their queue are full. Files are reached by item id only, inside the indexed folder; any other
path (``/thumbs/../../etc/passwd``, an id that is not a number) is a 404.
"""

from __future__ import annotations

import asyncio
import hmac
import io
import json
import re
import socket
import time
from functools import lru_cache
from pathlib import Path
from typing import Literal, Sequence

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from PIL import Image
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.trustedhost import TrustedHostMiddleware

from xmcl.data.images import open_image
from xmcl.errors import CheckpointError, ConfigError, DataError, XmclError
from xmcl.retrieval.index.search import Searcher
from xmcl.retrieval.retriever import decode_image_bytes
from xmcl import __version__
from xmcl.serve.admission import Admission, ServerBusy
from xmcl.serve.metrics import ServiceMetrics
from xmcl.serve.protocol import HeaderTimeoutProtocol
from xmcl.serve.schema import DEFAULT_K, SearchAnswer, SearchRequest, describe

STATIC = Path(__file__).parent / "static"
INDEX_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
FORM_OVERHEAD = 64 * 1024  # multipart boundaries and small fields on top of the image itself
THUMB_SIZES = (64, 512)
BODY_TIMEOUT_S = 30.0
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
OPEN_PATHS = ("/", "/docs", "/openapi.json")  # answered without the API key: the page and the API's description


class HTTPError(Exception):
    """An answer other than 200: ``status`` and a one-line ``message``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message




def _item_id(text: str) -> int:
    """An item id from a URL path segment: ASCII digits only ("²" is a digit to ``str.isdigit``), at most 18."""
    if not (text.isascii() and text.isdigit()) or len(text) > 18:
        raise HTTPError(404, f"no item {text!r}")
    return int(text)


async def _read_limited(request: Request, limit: int, timeout: float = BODY_TIMEOUT_S) -> bytes:
    """The request body, refused with 413 as soon as it passes ``limit`` bytes (declared or streamed), and with 408
    when it has not all arrived ``timeout`` seconds after the headers (a slow client does not hold a worker)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise HTTPError(413, f"the request body is {int(declared):,} bytes, over the limit of {limit:,}")

    async def read() -> bytes:
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise HTTPError(413, f"the request body is over the limit of {limit:,} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    try:
        return await asyncio.wait_for(read(), timeout)
    except asyncio.TimeoutError:
        raise HTTPError(408, f"the request body did not arrive within {timeout:.0f} s") from None


def create_app(searchers: dict[str, Searcher], max_upload_bytes: int = 10 << 20,
               workers: int = 2, queue: int = 16, allowed_hosts: Sequence[str] | None = None,
               api_key: str | None = None, body_timeout: float = BODY_TIMEOUT_S) -> FastAPI:
    """The app over ``searchers`` (name -> Searcher; the first is the default index). Queries run in at most
    ``workers`` threads with at most ``queue`` waiting (``Admission``; 503 beyond); ``allowed_hosts``: the Host
    headers answered (None: any; 400 otherwise: a DNS-rebinding page cannot reach a loopback server); ``api_key``:
    every route but the page and its static files asks for it (``X-API-Key`` header, ``Bearer`` token or ``?key=``);
    ``body_timeout``: seconds a request body may take to arrive (408 after)."""
    if not searchers:
        raise DataError("serve needs at least one index")
    for name in searchers:
        if not INDEX_NAME.match(name):
            raise DataError(f"index name {name!r} must be 1-64 letters, digits, '_', '.' or '-'")
    default_index = next(iter(searchers))
    metrics = ServiceMetrics()
    admission = Admission(workers, queue)
    app = FastAPI(title="xmcl search", version=__version__, docs_url="/docs", redoc_url=None,
                  openapi_url="/openapi.json")
    if allowed_hosts is not None:
        app.add_middleware(TrustedHostMiddleware, allowed_hosts=list(allowed_hosts))

    @app.middleware("http")
    async def require_key(request: Request, call_next):
        if api_key is None or request.url.path in OPEN_PATHS or request.url.path.startswith("/static/"):
            return await call_next(request)
        given = (request.headers.get("x-api-key") or request.query_params.get("key")
                 or request.headers.get("authorization", "").removeprefix("Bearer ").strip())
        if not hmac.compare_digest(given.encode(), api_key.encode()):
            return JSONResponse({"detail": "this server asks for an API key (X-API-Key header or ?key=)"},
                                status_code=401)
        return await call_next(request)

    def get_and_head(path: str, **options):
        """Register a GET route that also answers HEAD (the HEAD twin left out of the OpenAPI schema)."""
        def register(route):
            app.head(path, include_in_schema=False)(route)
            return app.get(path, **options)(route)
        return register

    def searcher_of(name: str | None) -> tuple[str, Searcher]:
        name = default_index if name in (None, "") else name
        if not isinstance(name, str) or name not in searchers:
            raise HTTPError(404, f"no index named {name!r} (served: {', '.join(searchers)})")
        return name, searchers[name]

    @app.exception_handler(HTTPError)
    async def http_error(_: Request, error: HTTPError) -> JSONResponse:
        return JSONResponse({"detail": error.message}, status_code=error.status)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_: Request, error: RequestValidationError) -> JSONResponse:
        first = error.errors()[0] if error.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()))
        return JSONResponse({"detail": f"invalid request: {where}: {first.get('msg', 'malformed')}"}, status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def not_found(_: Request, error: StarletteHTTPException) -> JSONResponse:
        return JSONResponse({"detail": str(error.detail)}, status_code=error.status_code)

    async def parse_search(request: Request) -> dict:
        content_type = request.headers.get("content-type", "")
        if content_type.startswith("multipart/form-data"):
            body = await _read_limited(request, max_upload_bytes + FORM_OVERHEAD, body_timeout)

            async def replay() -> dict:
                return {"type": "http.request", "body": body, "more_body": False}

            try:
                form = await Request(request.scope, replay).form(max_files=1, max_fields=16)
            except Exception as error:  # noqa: BLE001 - starlette raises several types for a malformed form
                raise HTTPError(400, f"malformed multipart form: {error}") from None
            upload = form.get("image")
            if upload is None or isinstance(upload, str):
                raise HTTPError(400, "the form has no 'image' file")
            data = await upload.read()
            if len(data) > max_upload_bytes:
                raise HTTPError(413, f"the image is {len(data):,} bytes, over the limit of {max_upload_bytes:,}")
            return {"index": form.get("index"), "k": form.get("k"), "target": form.get("target"), "upload": data}
        if not content_type.startswith("application/json"):
            raise HTTPError(415, f"send Content-Type: application/json, or a multipart form with an image, not "
                                 f"{content_type or 'no content type'!r}")
        body = await _read_limited(request, max_upload_bytes + FORM_OVERHEAD, body_timeout)
        try:
            payload = json.loads(body or b"null")
        except (UnicodeDecodeError, ValueError) as error:
            raise HTTPError(400, f"the body is not valid JSON ({error})") from None
        except RecursionError:
            raise HTTPError(400, "the body is JSON nested too deep") from None
        if not isinstance(payload, dict):
            raise HTTPError(400, "the body must be a JSON object")
        return payload

    def run_query(searcher: Searcher, target: str, k: int, forms: dict) -> list[dict]:
        """In a worker thread: decode an upload, encode the query, search."""
        upload = forms.pop("upload", None)
        if upload is not None:
            forms["image"] = decode_image_bytes(upload)
        return searcher.search(target=target, k=k, **forms)

    async def answer(query: dict) -> JSONResponse:
        began, name = time.perf_counter(), "?"
        try:
            upload = query.pop("upload", None)
            try:
                typed = SearchRequest.model_validate({key: value for key, value in query.items()
                                                      if value not in (None, "")})
            except ValidationError as error:
                raise HTTPError(400, describe(error)) from None
            name, searcher = searcher_of(typed.index)
            k, target = typed.k, typed.target
            forms = {"text": typed.text, "upload": upload, "embedding": typed.embedding, "item": typed.item}
            try:
                results = await admission.run(run_query, searcher, target, k, forms)
            except CheckpointError as error:  # the index's files, not the request
                raise HTTPError(500, f"the index is damaged: {error}; rerun `xmcl index` into it to repair "
                                     f"it") from None
            except XmclError as error:
                raise HTTPError(400, str(error)) from None
            except ServerBusy as error:
                raise HTTPError(503, str(error)) from None
        except HTTPError as error:
            metrics.observe(name if name in searchers else "?", error.status, time.perf_counter() - began)
            raise
        except Exception:  # a fault of the service: counted, then answered 500 by the framework
            metrics.observe(name if name in searchers else "?", 500, time.perf_counter() - began)
            raise
        metrics.observe(name, 200, time.perf_counter() - began)
        warning = searcher.retriever.vocabulary_warning(typed.text) if typed.text is not None else None
        warning = searcher.stale or warning
        return JSONResponse({"index": name, "target": target, "k": k, "results": results, "warning": warning})

    search_body = {"required": True, "content": {
        "application/json": {"schema": SearchRequest.model_json_schema()},
        "multipart/form-data": {"schema": {"type": "object", "required": ["image"], "properties": {
            "image": {"type": "string", "format": "binary"}, "index": {"type": "string"},
            "k": {"type": "integer"}, "target": {"type": "string", "enum": ["images", "captions"]}}}}}}

    @app.post("/search", response_model=SearchAnswer, openapi_extra={"requestBody": search_body})
    async def search(request: Request) -> JSONResponse:
        try:
            query = await parse_search(request)
        except HTTPError as error:
            metrics.observe("?", error.status, 0.0)
            raise
        return await answer(query)

    @get_and_head("/search", response_model=SearchAnswer)
    async def search_by_url(request: Request, text: str | None = None, item: int | None = None,
                            k: int = DEFAULT_K, index: str | None = None,
                            target: Literal["images", "captions"] = "images") -> JSONResponse:
        """``GET /search?text=...&k=&index=&target=`` (or ``item=``): a bookmarkable text or item query."""
        unknown = set(request.query_params) - {"index", "text", "item", "k", "target", "key"}
        if unknown:
            raise HTTPError(400, f"invalid {', '.join(sorted(unknown))}: Extra inputs are not permitted")
        return await answer({"index": index, "text": text, "item": item, "k": k, "target": target})

    @get_and_head("/items/{item_id}")
    def item(item_id: str, index: str | None = None) -> JSONResponse:
        name, searcher = searcher_of(index)
        found = searcher.index.item(_item_id(item_id))
        if found is None:
            raise HTTPError(404, f"no item {item_id} in index {name}")
        return JSONResponse({"index": name, **found})

    @lru_cache(maxsize=4096)
    def thumbnail(name: str, item_id: int, size: int) -> bytes | None:
        path = searchers[name].index.file_of(item_id)
        if path is None:
            return None
        try:
            image = open_image(path)
        except DataError:
            return None
        image.thumbnail((size, size), Image.Resampling.BICUBIC)
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=85)
        return buffer.getvalue()

    @get_and_head("/thumbs/{item_id}")
    def thumbs(item_id: str, index: str | None = None, size: int = 256) -> Response:
        name, _ = searcher_of(index)
        if not THUMB_SIZES[0] <= size <= THUMB_SIZES[1]:
            raise HTTPError(400, f"size must lie in [{THUMB_SIZES[0]}, {THUMB_SIZES[1]}], got {size}")
        data = thumbnail(name, _item_id(item_id), size)
        if data is None:
            raise HTTPError(404, f"no image for item {item_id} in index {name}")
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "max-age=3600"})

    @get_and_head("/images/{item_id}")
    def images(item_id: str, index: str | None = None) -> FileResponse:
        name, searcher = searcher_of(index)
        path = searcher.index.file_of(_item_id(item_id))
        if path is None:
            raise HTTPError(404, f"no image for item {item_id} in index {name}")
        return FileResponse(path)

    def gauges() -> dict[tuple[str, str], int]:
        return {(name, target): s.index.count(target) for name, s in searchers.items()
                for target in ("images", "captions")}

    @get_and_head("/healthz")
    def healthz() -> JSONResponse:
        indexes = {name: {"images": s.index.count("images"), "captions": s.index.count("captions"),
                          "dim": s.index.dim, "stale": s.stale} for name, s in searchers.items()}
        status = "stale" if any(entry["stale"] for entry in indexes.values()) else "ok"
        return JSONResponse({"status": status, "default": default_index, "indexes": indexes})

    @get_and_head("/metrics")
    def prometheus() -> Response:
        return Response(metrics.render(gauges()), media_type="text/plain; version=0.0.4; charset=utf-8")

    @get_and_head("/")
    def page() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


def listen(host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``host:port`` (before any model loads, so that a port in use is said at once);
    ``ConfigError`` naming the address and the reason when it cannot be bound."""
    try:
        address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(address[0], socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address[4])
    except OSError as error:
        raise ConfigError(f"cannot listen on {host}:{port}: {error.strerror or error}") from None
    return sock


def default_allowed_hosts(host: str) -> list[str] | None:
    """The Host headers a server bound to ``host`` answers by default: the loopback names for a loopback bind (a
    page on another site, rebinding its name to 127.0.0.1, then gets 400), any for another bind."""
    return list(LOOPBACK_HOSTS) if host in LOOPBACK_HOSTS else None


def serve(searchers: dict[str, Searcher], sock: socket.socket, max_upload_bytes: int = 10 << 20,
          threads: int = 1, workers: int = 2, allowed_hosts: Sequence[str] | None = None,
          api_key: str | None = None) -> None:
    """Run the app with uvicorn on the bound ``sock`` until interrupted (see ``create_app`` for ``workers``,
    ``allowed_hosts`` and ``api_key``). Each query runs on ``threads`` torch and FAISS threads (1: one small query
    gains nothing from more, and concurrent queries then use the other cores). At most 64 connections are served at
    once (503 beyond), an idle kept-alive connection is closed after 5 s, and one whose request headers take more
    than 10 s (``HeaderTimeoutProtocol``)."""
    import torch
    import uvicorn

    from xmcl.retrieval.index.vectors import set_search_threads

    set_search_threads(threads)
    torch.set_num_threads(threads)
    app = create_app(searchers, max_upload_bytes, workers=workers, allowed_hosts=allowed_hosts, api_key=api_key)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", limit_concurrency=64, timeout_keep_alive=5,
                                           http=HeaderTimeoutProtocol))
    server.run(sockets=[sock])
