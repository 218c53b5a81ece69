"""`kvsqueeze serve`: a compressed context cache behind an OpenAI-compatible HTTP API.

    store.py    contexts on disk (atomic safetensors files, SQLite index) and in memory (LRU within a budget)
    batcher.py  the one thread that uses the model; questions that arrive together answered in one generate
    auth.py     API keys; a context belongs to the key that made it
    service.py  the server without HTTP (store + batcher + auth + limits), for any host to wrap
    schemas.py  requests and responses in the OpenAI schema
    metrics.py  Prometheus metrics
    app.py      create_app(service): the FastAPI routes
    cli.py      the command

Needs the `serve` extra: pip install 'kvsqueeze[serve]'.
"""

from .service import Service, Settings

__all__ = ["Service", "Settings", "create_app"]


def create_app(service: Service, close_service: bool = False):
    from .app import create_app as create

    return create(service, close_service)
