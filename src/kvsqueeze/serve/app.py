"""The HTTP routes (FastAPI): an OpenAI-compatible API over a `Service`.

`create_app(service)` returns the FastAPI app, so more routers and static mounts can be added to it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .batcher import Delta, Failed, Finished, Started
from .errors import ServeError, ServerError, TooLarge
from .schemas import ChatRequest, ContextRequest, chunk, completion, context_object, usage
from .service import Service

log = logging.getLogger("kvsqueeze.serve")

OPEN_PATHS = {"/health"}


def error_response(error: ServeError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if error.status == 401 else None
    return JSONResponse(error.body(), status_code=error.status, headers=headers)


def route_label(method: str, path: str) -> str:
    """The route a request belongs to, for metrics (ids left out)."""
    if path.startswith("/v1/contexts/"):
        path = "/v1/contexts/{id}"
    elif path not in ("/health", "/metrics", "/v1/models", "/v1/contexts", "/v1/chat/completions"):
        path = "other"
    return f"{method} {path}"


class Guard:
    """ASGI middleware, before anything else: the API key (401 on every route but /health), the body size (413,
    read in full before the route sees it, so a chunked upload cannot slip past), and the request's metrics."""

    def __init__(self, app, service: Service):
        self.app, self.service = app, service

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), [500]

        async def send_and_note(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self._guarded(scope, receive, send_and_note)
        finally:
            self.service.metrics.request(route_label(scope["method"], scope["path"]), status[0], time.perf_counter() - start)

    async def _guarded(self, scope, receive, send):
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        try:
            if scope["path"] not in OPEN_PATHS:
                scope.setdefault("state", {})["owner"] = self.service.auth.owner(headers.get("authorization"))
            limit = self.service.settings.max_body_bytes
            too_large = TooLarge(f"the request body is larger than {limit} bytes", code="request_too_large")
            if int(headers.get("content-length") or 0) > limit:
                raise too_large
            body, more = [], True
            while more:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return
                body.append(message.get("body", b""))
                more = message.get("more_body", False)
                if sum(map(len, body)) > limit:
                    raise too_large
        except ServeError as error:
            return await error_response(error)(scope, receive, send)
        except ValueError:  # a Content-Length that is not a number
            return await error_response(ServeError("bad Content-Length"))(scope, receive, send)
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()  # after the body: wait for the client to disconnect
            replayed = True
            return {"type": "http.request", "body": b"".join(body), "more_body": False}

        await self.app(scope, replay, send)


def validation_message(error: RequestValidationError) -> tuple[str, str | None]:
    first = error.errors()[0]
    where = [str(part) for part in first.get("loc", ()) if part != "body"]
    if first.get("type") == "json_invalid":
        return f"the body is not valid JSON: {first.get('ctx', {}).get('error', first.get('msg'))}", None
    param = ".".join(where) or None
    return (f"{param}: {first.get('msg')}" if param else str(first.get("msg"))), param


def create_app(service: Service, close_service: bool = False) -> FastAPI:
    """The app; `close_service`: the service is closed when the app shuts down (the command's server owns it)."""

    @asynccontextmanager
    async def lifespan(app):
        try:
            yield
        finally:
            if close_service:
                await run_in_threadpool(service.close)

    app = FastAPI(title="kvsqueeze", summary="Compressed context cache behind an OpenAI-compatible API",
                  docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.service = service
    app.add_middleware(Guard, service=service)

    @app.exception_handler(ServeError)
    async def serve_error(request: Request, error: ServeError):
        return error_response(error)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, error: RequestValidationError):
        message, param = validation_message(error)
        return error_response(ServeError(message, param=param, code="invalid_request"))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException):
        kind = "not_found_error" if error.status_code == 404 else "invalid_request_error"
        body = ServeError(str(error.detail), status=error.status_code)
        body.type = kind
        return error_response(body)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, error: Exception):
        log.exception("unexpected error on %s", request.url.path)
        return error_response(ServerError("the server failed on this request; it keeps serving others"))

    def owner(request: Request) -> str:
        return request.state.owner

    @app.get("/health")
    async def health():
        return service.health()

    @app.get("/metrics")
    async def metrics():
        return Response(service.metrics.exposition(), media_type=service.metrics.content_type)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": name, "object": "model", "created": 0, "owned_by": "kvsqueeze"}
                                           for name in service.models()]}

    @app.post("/v1/contexts")
    def create_context(body: ContextRequest, request: Request):  # plain def: runs in a worker thread, may block
        return context_object(service.create_context(owner(request), body))

    @app.get("/v1/contexts")
    def list_contexts(request: Request):
        return {"object": "list", "data": [context_object(r) for r in service.list_contexts(owner(request))]}

    @app.get("/v1/contexts/{context_id}")
    def get_context(context_id: str, request: Request):
        return context_object(service.get_context(owner(request), context_id))

    @app.delete("/v1/contexts/{context_id}")
    def delete_context(context_id: str, request: Request):
        service.delete_context(owner(request), context_id)
        return {"id": context_id, "object": "context.deleted", "deleted": True}

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, request: Request):
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        generation = await run_in_threadpool(
            service.chat, owner(request), body, lambda event: loop.call_soon_threadsafe(events.put_nowait, event))
        try:
            first = await events.get()
        except BaseException:
            generation.cancel()
            raise
        if isinstance(first, Failed):
            raise first.error if isinstance(first.error, ServeError) else ServerError(str(first.error))
        id, model = "chatcmpl-" + secrets.token_hex(12), body.model
        if body.stream:
            include_usage = bool((body.stream_options or {}).get("include_usage"))
            return StreamingResponse(stream(id, model, first, events, generation, include_usage),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        try:
            while not isinstance(event := await events.get(), (Finished, Failed)):
                pass
        finally:
            generation.cancel()  # a no-op once it has finished; stops its row if the client went away
        if isinstance(event, Failed):
            raise event.error if isinstance(event.error, ServeError) else ServerError(str(event.error))
        return completion(id, model, event.text, event.finish_reason,
                          usage(event.prompt_tokens, event.cached_tokens, event.completion_tokens))

    return app


async def stream(id: str, model: str, first: Started, events: asyncio.Queue, generation, include_usage: bool):
    """Server-sent events in the OpenAI chunk format, ending with `data: [DONE]`."""

    def sse(body: dict) -> str:
        return f"data: {json.dumps(body)}\n\n"

    try:
        yield sse(chunk(id, model, {"role": "assistant", "content": ""}))
        while True:
            event = await events.get()
            if isinstance(event, Delta):
                yield sse(chunk(id, model, {"content": event.text}))
            elif isinstance(event, Finished):
                yield sse(chunk(id, model, {}, event.finish_reason))
                if include_usage:
                    yield sse(chunk(id, model, {}, usage_=usage(event.prompt_tokens, event.cached_tokens,
                                                                 event.completion_tokens)))
                break
            elif isinstance(event, Failed):
                error = event.error if isinstance(event.error, ServeError) else ServerError(str(event.error))
                yield sse(error.body())
                break
        yield "data: [DONE]\n\n"
    finally:
        generation.cancel()
