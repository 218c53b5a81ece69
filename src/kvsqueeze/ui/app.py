"""The page that shows what a method kept: a self-contained Starlette application.

`create_app(model, tokenizer)` returns it; `kvsqueeze ui` serves it with uvicorn, and a larger server mounts it
(`app.mount("/ui", create_app(model, tokenizer))`): every URL the page uses is relative to where it is mounted.

    GET  /               the page (static/index.html, static/app.js: plain HTML and a small script, no build step)
    GET  /api/options    methods (those that run without a calibration file), quantizers, the demo document
    POST /api/compress   {text, method, ratio, quantizer} -> tokens, per-layer and per-head kept tokens, bytes
    POST /api/ask        {id, question, max_new_tokens} -> Server-Sent Events: both answers, full and compressed
"""

from __future__ import annotations

import inspect
import json
import queue
import threading
import time
import uuid
from collections import OrderedDict
from importlib.resources import files

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from transformers import TextIteratorStreamer

import kvsqueeze

from ..kept import kept_positions

STATIC = files("kvsqueeze.ui").joinpath("static")
DEFAULT_METHOD = kvsqueeze.methods.DEFAULT
KEPT_CONTEXTS = 2  # compressed documents kept for questions (each with its full cache): the most recent ones


class BadRequest(ValueError):
    """Input the page sent that cannot be used; its message is shown to the user."""


def method_options() -> list[dict]:
    """The methods the page offers: those that take a ratio and need no calibration file."""
    options = []
    for name, cls in kvsqueeze.available().items():
        if "ratio" in inspect.signature(cls).parameters and not (cls.calibration and cls.calibration_required):
            options.append({"name": name, "class": cls.__name__, "summary": cls.summary(), "phase": cls.phase})
    return options


def quantizer_options() -> list[str]:
    return [f"{name}-{bits}" for name in ("kivi", "kvquant", "gear") for bits in (4, 2)]


class Workbench:
    """The model, and the documents compressed for the page (full and compressed caches), one request at a time."""

    def __init__(self, model=None, tokenizer=None, model_name: str | None = None):
        self.model, self.tokenizer, self.model_name = model, tokenizer, model_name
        self.lock = threading.Lock()
        self.contexts: OrderedDict[str, tuple] = OrderedDict()

    def loaded(self):
        if self.model is None:
            self.model, self.tokenizer = kvsqueeze.load(self.model_name)
        return self.model, self.tokenizer

    def compress(self, text: str, method_name: str, ratio: float, quantizer: str | None) -> dict:
        if not text.strip():
            raise BadRequest("the document is empty: paste or upload a text")
        if not 0 <= ratio < 1:
            raise BadRequest(f"the ratio is the share of the cache removed, in [0, 1); got {ratio}")
        try:
            method = None if method_name in ("none", "") else kvsqueeze.method(method_name, ratio=ratio)
            codec = kvsqueeze.quantizer(quantizer or None)
        except (ValueError, KeyError, TypeError) as error:
            raise BadRequest(str(error)) from error
        with self.lock:
            model, tokenizer = self.loaded()
            try:
                full = kvsqueeze.compress(model, tokenizer, text, None)
                compressed = kvsqueeze.compress(model, tokenizer, text, method, quantizer=codec)
            except ValueError as error:  # too long for the model, a method that cannot run here...
                raise BadRequest(str(error)) from error
            kept = kept_positions(compressed, reference=full)
        key = uuid.uuid4().hex
        self.contexts[key] = (full, compressed)
        while len(self.contexts) > KEPT_CONTEXTS:
            self.contexts.popitem(last=False)
        return self.describe(key, full, compressed, kept)

    def describe(self, key: str, full, compressed, kept) -> dict:
        ids = compressed.context_ids[0].tolist()
        special = set(self.tokenizer.all_special_ids)
        stats = compressed.stats
        return {
            "id": key,
            "method": repr(compressed.method) if compressed.method is not None else "none",
            "quantizer": stats.quantizer,
            "tokens": [{"text": self.tokenizer.decode([i]), "special": i in special} for i in ids],
            # per layer, one string per KV head: "1" where it holds the token, "0" where it was evicted
            "kept": [["".join("1" if k else "0" for k in head.tolist()) for head in layer] for layer in kept],
            "layers": kept.shape[0], "kv_heads": kept.shape[1],
            "compressible_layers": stats.compressible_layers,
            "bytes": {"compressed": compressed.nbytes(), "full": full.nbytes()},
            "kept_share": 1 - stats.compression_ratio,
            "seconds": stats.seconds,
        }

    def answers(self, key: str, question: str, max_new_tokens: int):
        """Server-Sent Events: the answers with the full and the compressed cache, generated side by side."""
        if key not in self.contexts:
            raise BadRequest("this document is no longer held: compress it again")
        if not question.strip():
            raise BadRequest("ask a question")
        contexts = dict(zip(("full", "compressed"), self.contexts[key]))
        events: queue.Queue = queue.Queue()

        def generate(side: str, ctx) -> None:
            started, failures = time.perf_counter(), []
            streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)

            def ask() -> None:
                try:
                    ctx.ask(question, streamer=streamer, max_new_tokens=max_new_tokens)
                except Exception as error:  # shown in the page rather than lost in a thread
                    failures.append(error)
                    streamer.end()

            worker = threading.Thread(target=ask)
            worker.start()
            for piece in streamer:
                events.put({"side": side, "text": piece})
            worker.join()
            done = {"side": side, "done": True, "seconds": round(time.perf_counter() - started, 2)}
            events.put(done | ({"error": str(failures[0])} if failures else {}))

        def run() -> None:  # runs to the end even if the page goes away, so the lock is always released
            with self.lock:
                threads = [threading.Thread(target=generate, args=item) for item in contexts.items()]
                for thread in threads:
                    thread.start()
                for thread in threads:
                    thread.join()

        def stream():
            finished = 0
            while finished < len(contexts):
                event = events.get()
                finished += bool(event.get("done"))
                yield f"data: {json.dumps(event)}\n\n"

        threading.Thread(target=run, daemon=True).start()
        return stream()


async def read_json(request: Request) -> dict:
    try:
        body = await request.json()
    except ValueError as error:
        raise BadRequest(f"the request is not JSON: {error}") from error
    if not isinstance(body, dict):
        raise BadRequest("the request is a JSON object")
    return body


def create_app(model=None, tokenizer=None, model_name: str | None = None) -> Starlette:
    """The page's application. `model`/`tokenizer` are used as given; else `model_name` (a hub id or folder; None:
    the bundled SmolLM2) is loaded at the first request."""
    bench = Workbench(model, tokenizer, model_name)

    async def page(request):
        return FileResponse(str(STATIC.joinpath("index.html")))

    async def options(request):
        document = files("kvsqueeze").joinpath("data/document.txt").read_text(encoding="utf-8")
        return JSONResponse({"methods": method_options(), "quantizers": quantizer_options(),
                             "default_method": DEFAULT_METHOD, "default_ratio": 0.5,
                             "demo_document": document, "version": kvsqueeze.__version__})

    async def compress(request):
        body = await read_json(request)
        try:
            ratio = float(body.get("ratio", 0.5))
        except (TypeError, ValueError):
            raise BadRequest(f"the ratio is a number; got {body.get('ratio')!r}") from None
        from starlette.concurrency import run_in_threadpool

        result = await run_in_threadpool(bench.compress, str(body.get("text", "")),
                                         str(body.get("method", DEFAULT_METHOD)), ratio, body.get("quantizer"))
        return JSONResponse(result)

    async def ask(request):
        body = await read_json(request)
        try:
            max_new_tokens = int(body.get("max_new_tokens", 64))
        except (TypeError, ValueError):
            raise BadRequest("max_new_tokens is a number") from None
        if not 1 <= max_new_tokens <= 1024:
            raise BadRequest("max_new_tokens is between 1 and 1024")
        events = bench.answers(str(body.get("id", "")), str(body.get("question", "")), max_new_tokens)
        return StreamingResponse(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    async def bad_request(request, error):
        return JSONResponse({"error": str(error)}, status_code=400)

    routes = [Route("/", page), Route("/api/options", options), Route("/api/compress", compress, methods=["POST"]),
              Route("/api/ask", ask, methods=["POST"]),
              Mount("/static", app=StaticFiles(directory=str(STATIC)), name="static")]
    app = Starlette(routes=routes, exception_handlers={BadRequest: bad_request})
    app.state.workbench = bench
    return app
