"""The server without HTTP: stored contexts and questions on them, for an owner, within limits.

`Service` ties the store, the model's thread (batcher), the API keys and the metrics together. It knows nothing
of any web framework, so the FastAPI app (`app.py`) or another host (a Ray Serve deployment, say) can wrap it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

import kvsqueeze

from .auth import Auth
from .batcher import Batcher, Generation, Sampling
from .errors import BadRequest, Gone, NotFound
from .metrics import Metrics
from .schemas import ChatRequest, ContextRequest
from .store import ContextUnreadable, LimitError, Record, Store

log = logging.getLogger("kvsqueeze.serve")

QUESTION_MARK = "<<kvsqueeze:question>>"  # where the question will continue the user turn of a context's messages


@dataclass
class Settings:
    store: Path
    model_name: str = "smollm2"
    method: str | None = kvsqueeze.methods.DEFAULT  # for contexts that name none; None: no eviction
    ratio: float = 0.5
    quantizer: str | None = None
    chunk_size: int | None = None
    memory_budget: int = 4 << 30  # bytes of contexts kept in memory
    api_keys: list[str] = field(default_factory=list)
    max_body_bytes: int = 8 << 20
    max_context_tokens: int | None = None  # None: the model's window
    max_tokens: int = 2048  # the most a request may ask for
    default_max_tokens: int = 128
    max_contexts_per_key: int = 100
    default_ttl: float | None = None  # seconds; None: contexts live until deleted
    max_batch: int = 8
    batch_window: float = 0.02  # seconds the model's thread waits for more questions to batch
    purge_interval: float = 60.0


def model_key(model) -> str:
    """What the store files a context under: the model's shape, dtype and a sample of its weights (so another
    model, or another checkpoint of the same shape, does not see it)."""
    config = model.config.get_text_config()
    shape = {name: getattr(config, name, None) for name in (
        "model_type", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "hidden_size", "head_dim",
        "vocab_size", "max_position_embeddings")}
    weights = model.get_input_embeddings().weight
    sample = [round(v, 4) for v in weights[:2, :8].float().flatten().tolist()]
    text = json.dumps([shape, str(weights.dtype), sample], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def model_window(model) -> int | None:
    return getattr(model.config.get_text_config(), "max_position_embeddings", None)


class Service:
    def __init__(self, model, tokenizer, settings: Settings):
        self.model, self.tokenizer, self.settings = model, tokenizer, settings
        self.auth = Auth(settings.api_keys)
        window = model_window(model)
        self.max_context_tokens = settings.max_context_tokens or window
        # contexts longer than the window (an operator's choice, with chunked prefill) take questions past it too
        self.past_window = window is not None and self.max_context_tokens is not None and self.max_context_tokens > window
        self.metrics = Metrics(self)
        self.store = Store(settings.store, model_key(model), self._load, settings.memory_budget)
        self.batcher = Batcher(model, tokenizer, self._open, default_max_tokens=settings.default_max_tokens,
                               max_batch=settings.max_batch, window=settings.batch_window,
                               on_batch=self.metrics.batch)
        if self.past_window:
            self.batcher.window_tokens = None
        self._stop = threading.Event()
        self._janitor = threading.Thread(target=self._purge, name="kvsqueeze-expiry", daemon=True)
        self._janitor.start()

    def close(self) -> None:
        self._stop.set()
        self.batcher.close()
        self.store.close()

    # -- contexts -------------------------------------------------------------------------------------------

    def create_context(self, owner: str, request: ContextRequest) -> Record:
        """Prefill and compress a context once, and store it (blocks until it is on disk)."""
        self._check_model(request.model)
        self._room(owner)
        method_name = request.method or self.settings.method or "none"
        method_name = method_name.lower().replace("-", "_")
        method, ratio = (None, None) if method_name == "none" else self._method(method_name, request.ratio)
        spec = request.quantizer if request.quantizer is not None else self.settings.quantizer
        spec = None if spec in (None, "", "none") else spec
        try:
            kvsqueeze.quantizer(spec)
        except (ValueError, TypeError) as error:
            raise BadRequest(str(error), param="quantizer", code="unknown_quantizer") from None
        chunk_size = request.chunk_size or self.settings.chunk_size
        context = self.batcher.call(self._compress, request, method, spec, chunk_size).result()
        ttl = request.ttl_seconds or self.settings.default_ttl
        try:
            return self.store.add(owner, context, method=method_name, ratio=ratio, quantizer=spec, ttl_seconds=ttl,
                                  write=lambda path: self.batcher.call(context.save, path).result(),
                                  max_per_owner=self.settings.max_contexts_per_key)
        except LimitError as error:
            raise BadRequest(str(error), code="context_limit_reached") from None

    def list_contexts(self, owner: str) -> list[Record]:
        return self.store.list(owner)

    def get_context(self, owner: str, id: str) -> Record:
        record = self.store.get(id, owner)  # another owner's context is unknown here, as is an invalid id
        if record is None:
            raise NotFound(f"no context {id[:64]!r}", param="context_id", code="context_not_found")
        return record

    def delete_context(self, owner: str, id: str) -> None:
        if not self.store.delete(id, owner):
            raise NotFound(f"no context {id[:64]!r}", param="context_id", code="context_not_found")

    # -- questions ------------------------------------------------------------------------------------------

    def chat(self, owner: str, request: ChatRequest, listener: Callable[[object], None]) -> Generation:
        """Queue a chat completion; `listener` is given its events (batcher.Started, Delta, Finished or Failed)
        from the model's thread. Raises ServeError for a request that cannot run."""
        self._check_model(request.model, required=True)
        limit = request.answer_limit
        if limit is not None and limit > self.settings.max_tokens:
            raise BadRequest(f"max_tokens is at most {self.settings.max_tokens} here; got {limit}",
                             param="max_tokens", code="max_tokens_too_large")
        sampling = Sampling(request.temperature, request.top_p, request.seed)
        generation = Generation(listener, max_tokens=limit, sampling=sampling, stop=tuple(request.stop or ()))
        if request.context_id is not None:
            generation.context = self.get_context(owner, request.context_id)
            if len(request.messages) != 1 or request.messages[0].role != "user":
                raise BadRequest("with a context_id, send the question as one user message: the stored context is "
                                 "the start of that user turn (give system prompts with the context)",
                                 param="messages")
            generation.question = request.messages[0].text()
            if not generation.question.strip():
                raise BadRequest("the question is empty", param="messages")
        else:
            if getattr(self.tokenizer, "chat_template", None) is None:
                raise BadRequest("this model has no chat template: ask with a context_id", param="messages")
            generation.messages = [{"role": m.role, "content": m.text()} for m in request.messages]
        return self.batcher.submit(generation)

    # -- the model's thread ---------------------------------------------------------------------------------

    def _compress(self, request: ContextRequest, method, quantizer: str | None, chunk_size: int | None):
        ids = self._context_ids(request)
        if self.max_context_tokens is not None and len(ids) > self.max_context_tokens:
            raise BadRequest(f"the context has {len(ids)} tokens, more than the {self.max_context_tokens} allowed "
                             "(the model's window unless the server sets --max-context-tokens)",
                             param="text" if request.text is not None else "messages",
                             code="context_length_exceeded")
        window = model_window(self.model)
        beyond = window is not None and len(ids) > window
        if beyond and chunk_size is None:
            raise BadRequest(f"the context has {len(ids)} tokens, more than the model's window of {window}: give a "
                             "chunk_size to prefill it in chunks", param="chunk_size", code="context_length_exceeded")
        try:
            return kvsqueeze.compress(self.model, self.tokenizer, ids[None], method, chunk_size=chunk_size,
                                      quantizer=quantizer, check_window=not beyond)
        except (kvsqueeze.ContextTooLongError, ValueError, TypeError) as error:
            raise BadRequest(f"cannot compress this context: {error}") from None

    def _context_ids(self, request: ContextRequest) -> torch.Tensor:
        """The context's token ids: `text` in a user turn of the chat template (as `kvsqueeze.compress` places a
        text), or `messages` rendered up to the end of the last user message, where the question will follow."""
        templated = getattr(self.tokenizer, "chat_template", None) is not None
        if request.messages is not None:
            if not templated:
                raise BadRequest("this model has no chat template: give the context as text", param="messages")
            messages = [{"role": m.role, "content": m.text()} for m in request.messages]
            if messages[-1]["role"] != "user":
                raise BadRequest("the context's messages end with the user message that holds the document (the "
                                 "question continues it)", param="messages")
        else:
            messages = [{"role": "user", "content": request.text}]
        if not templated:
            return self.tokenizer(request.text, add_special_tokens=True, return_tensors="pt").input_ids[0]
        messages[-1]["content"] += QUESTION_MARK
        rendered = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
        if rendered.count(QUESTION_MARK) != 1:
            raise BadRequest("the model's chat template changes message text; give the context as text",
                             param="messages")
        start = rendered.split(QUESTION_MARK)[0]
        return self.tokenizer(start, add_special_tokens=False, return_tensors="pt").input_ids[0]

    def _open(self, record: Record):
        try:
            return self.store.open(record)
        except ContextUnreadable as error:
            raise Gone(str(error), param="context_id", code="context_unreadable") from None
        except KeyError:
            raise NotFound(f"no context {record.id!r}", param="context_id", code="context_not_found") from None

    def _load(self, path: Path):
        context = kvsqueeze.CompressedContext.load(path, self.model, self.tokenizer)
        if self.past_window:
            context.check_window = False
        return context

    # -- the rest -------------------------------------------------------------------------------------------

    def _method(self, name: str, ratio: float | None):
        """(the method, its ratio): at `ratio`, or at the server's ratio, or, for a method that takes none and was
        given none, with its own settings."""
        try:
            try:
                return kvsqueeze.method(name, ratio=self.settings.ratio if ratio is None else ratio), \
                    self.settings.ratio if ratio is None else ratio
            except TypeError:
                if ratio is not None:
                    raise BadRequest(f"method {name!r} takes no ratio", param="ratio") from None
                return kvsqueeze.method(name), None
        except kvsqueeze.UnknownMethodError as error:
            raise BadRequest(str(error), param="method", code="unknown_method") from None
        except (TypeError, ValueError) as error:
            raise BadRequest(f"method {name!r}: {error}", param="method") from None

    def _room(self, owner: str) -> None:
        try:
            self.store.check_room(owner, self.settings.max_contexts_per_key)
        except LimitError as error:
            raise BadRequest(str(error), code="context_limit_reached") from None

    def _check_model(self, name: str | None, required: bool = False) -> None:
        if (name is not None or required) and name != self.settings.model_name:
            raise NotFound(f"the model {str(name)[:64]!r} does not exist: this server serves "
                           f"{self.settings.model_name!r}", param="model", code="model_not_found")

    def _purge(self) -> None:
        while not self._stop.wait(self.settings.purge_interval):
            try:
                self.store.purge_expired()
            except Exception:  # noqa: BLE001
                log.exception("removing expired contexts failed")

    def models(self) -> list[str]:
        return [self.settings.model_name]

    def health(self) -> dict:
        return {"status": "ok", "model": self.settings.model_name, "skipped_files": self.store.skipped}
