"""xmcl: cross-modal contrastive learning (USER image-text retrieval, ST-SLidR image-to-point distillation).

The public API of the quickstart::

    from xmcl import Retriever, Searcher

    model = Retriever.load("flickr8k")          # a checkpoint, a model directory or a shipped model's name
    hits = Searcher.open("runs/photos").search(text="a dog runs on the beach", k=5)

``Retriever`` (``xmcl.retrieval.retriever``) encodes raw images and captions; ``Searcher``
(``xmcl.retrieval.index.search``) searches an index made by ``xmcl index``. Both are imported on first use
(``__getattr__``), so ``import xmcl`` stays light: the command line and every lower module import this package
without loading torch or the retrieval layer.
"""

from __future__ import annotations

import importlib
import os
from typing import Any

# OpenMP threads that wait for work spin before they sleep, for as long as libgomp read from the environment when
# torch was first imported (so this takes effect where xmcl is imported first, as the command line does). A short
# spin costs nothing on idle cores and keeps a run from burning a core that another process needs, or that the
# numpy work beside torch's threads needs (docs/training.md, threads).
os.environ.setdefault("GOMP_SPINCOUNT", "3000")

__version__ = "0.1.0"

__all__ = ["Retriever", "Searcher", "__version__"]

_LAZY = {
    "Retriever": "xmcl.retrieval.retriever",
    "Searcher": "xmcl.retrieval.index.search",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'xmcl' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
