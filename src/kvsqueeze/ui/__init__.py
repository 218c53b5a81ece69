"""`kvsqueeze ui`: a page that shows which tokens a method kept, and the answers with the full and the compressed
cache side by side. Needs `pip install 'kvsqueeze[ui]'` (Starlette and uvicorn)."""

from .app import create_app

__all__ = ["create_app", "serve"]


def serve(host: str = "127.0.0.1", port: int = 8000, model_name: str | None = None) -> None:
    """Serve the page with uvicorn until interrupted; the model is loaded before the first request."""
    import uvicorn

    import kvsqueeze

    model, tokenizer = kvsqueeze.load(model_name)
    print(f"kvsqueeze ui: http://{host}:{port}/", flush=True)
    uvicorn.run(create_app(model, tokenizer), host=host, port=port, log_level="warning")
