"""Asking a running ``xmcl serve`` instead of loading a model: ``xmcl search --server URL ...``.

``search_remote`` posts one query to ``URL/search`` (JSON for a text, a multipart form for an image file) and
returns the server's answer (``{"index", "target", "k", "results", "warning"}``); the server's 4xx / 5xx message,
or why it cannot be reached, comes back as a ``DataError``.
"""

from __future__ import annotations

import json
import mimetypes
import urllib.error
import urllib.request
import uuid
from pathlib import Path

from xmcl.errors import DataError

TIMEOUT_S = 30.0


def search_remote(url: str, index: str | None, text: str | None = None, image: Path | None = None,
                  item: int | None = None, k: int = 10, target: str = "images", timeout: float = TIMEOUT_S,
                  api_key: str | None = None) -> dict:
    """The answer of the server at ``url`` to one text, image or item query on its index named ``index`` (None: its
    default index); ``api_key`` for a server started with one."""
    if not url.startswith(("http://", "https://")):
        raise DataError(f"--server must be an http:// or https:// address, got {url!r}")
    fields = {"k": k, "target": target, **({"index": index} if index else {})}
    if image is None:
        body = json.dumps({**fields, **({"item": item} if item is not None else {"text": text})}).encode()
        content_type = "application/json"
    else:
        body, content_type = _multipart(fields, Path(image))
    headers = {"Content-Type": content_type, "Accept": "application/json"}
    if api_key:
        headers["X-API-Key"] = api_key
    request = urllib.request.Request(url.rstrip("/") + "/search", data=body, method="POST", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as error:
        raise DataError(f"{url} answered {error.code}: {_detail(error.read())}") from None
    except (urllib.error.URLError, OSError) as error:
        reason = getattr(error, "reason", error)
        raise DataError(f"cannot reach the search server at {url} ({reason}); start it with `xmcl serve INDEX`") \
            from None


def _multipart(fields: dict, image: Path) -> tuple[bytes, str]:
    try:
        data = image.read_bytes()
    except OSError as error:
        raise DataError(f"cannot read the query image {image}: {error.strerror or error}") from None
    boundary = uuid.uuid4().hex
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode()
             for name, value in fields.items()]
    kind = mimetypes.guess_type(image.name)[0] or "application/octet-stream"
    parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="query{image.suffix}"\r\n'
                 f"Content-Type: {kind}\r\n\r\n".encode() + data + b"\r\n")
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def _detail(body: bytes) -> str:
    try:
        return str(json.loads(body).get("detail", body[:200].decode(errors="replace")))
    except (ValueError, AttributeError):
        return body[:200].decode(errors="replace")
