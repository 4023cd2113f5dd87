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
from typing import Any

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
