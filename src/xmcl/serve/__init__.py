"""The HTTP side of search: a FastAPI app over one or more built indexes (``app``), its Prometheus metrics
(``metrics``) and the static search page (``static/``). Request parsing and status codes only: searching is
``xmcl.retrieval.index.search``."""
