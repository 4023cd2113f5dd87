"""The typed request and answer of ``/search`` (pydantic models): what FastAPI validates and the OpenAPI schema
documents. A query is one of ``text``, ``embedding`` or ``item`` (or, in a multipart form, an ``image`` file)."""

from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

MAX_K = 1000
DEFAULT_K = 10  # as `xmcl search -k`
MAX_ID = 2**63 - 1  # SQLite's largest integer
MAX_TEXT_CHARS = 100_000  # the tokenizer keeps far fewer tokens; beyond this a text is refused, not cut
MAX_EMBEDDING_WIDTH = 4096
FLOAT32_MAX = 3.4028234663852886e38


class SearchRequest(BaseModel):
    """One search: the index (default: the server's first), the query, how many results and of what."""

    model_config = ConfigDict(extra="forbid")

    index: str | None = Field(None, max_length=64, description="a served index's name (default: the first)")
    text: str | None = Field(None, max_length=MAX_TEXT_CHARS, description="a caption-like query")
    embedding: list[float] | None = Field(None, max_length=MAX_EMBEDDING_WIDTH,
                                          description="a query vector of the index's width (normalised here)")
    item: int | None = Field(None, ge=0, le=MAX_ID, description="an indexed item: more like it (itself left out)")
    k: int = Field(DEFAULT_K, ge=1, le=MAX_K, description="how many results")
    target: Literal["images", "captions"] = Field("images", description="what to find")

    @field_validator("embedding")
    @classmethod
    def finite_float32(cls, values: list[float] | None) -> list[float] | None:
        if values is not None and not all(math.isfinite(v) and abs(v) <= FLOAT32_MAX for v in values):
            raise ValueError(f"values must be finite and within float32's range (|x| <= {FLOAT32_MAX:.3g})")
        return values


class Result(BaseModel):
    """One hit: its rank, score (cosine), item id, path, caption (and, for caption hits, the caption's id and text)."""

    rank: int
    score: float
    id: int
    path: str
    caption: str | None = None
    caption_id: int | None = None
    text: str | None = None


class SearchAnswer(BaseModel):
    index: str
    target: str
    k: int
    results: list[Result]
    warning: str | None = Field(None, description="why the results may mislead, if they may")


def describe(error: ValidationError) -> str:
    """The first problem of a request, in one line: ``invalid k: Input should be less than or equal to 1000``."""
    first = error.errors()[0]
    where = ".".join(str(part) for part in first.get("loc", ())) or "request"
    return f"invalid {where}: {first.get('msg', 'malformed')}"
