"""Requests and responses in the OpenAI schema, plus the context routes' own."""

from __future__ import annotations

import time
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from .store import Record


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")  # name, tool_calls...: accepted, not used
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)


class ContextRequest(BaseModel):
    """POST /v1/contexts: a text (placed in a user turn) or messages (the start of a chat: system prompt and the
    user turn that holds the document) to prefill and compress once."""

    model_config = ConfigDict(extra="forbid")
    text: str | None = None
    messages: list[Message] | None = Field(None, min_length=1)
    method: str | None = None  # a registry name, "none" for no eviction; None: the server's default
    ratio: float | None = Field(None, ge=0, lt=1)
    quantizer: str | None = None  # "kivi-4", ...; "none" for none; None: the server's default
    chunk_size: int | None = Field(None, ge=2)
    ttl_seconds: float | None = Field(None, gt=0)
    model: str | None = None

    @model_validator(mode="after")
    def one_source(self):
        if (self.text is None) == (self.messages is None):
            raise ValueError("give the context as `text` or as `messages`, one of them")
        if self.text is not None and not self.text.strip():
            raise ValueError("the context text is empty")
        return self


class ChatRequest(BaseModel):
    """POST /v1/chat/completions, with `context_id` (sent by the openai client through `extra_body`)."""

    model_config = ConfigDict(extra="forbid")
    model: str
    messages: list[Message] = Field(min_length=1)
    context_id: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: dict | None = None
    n: Literal[1] | None = None
    user: str | None = None
    # accepted at their neutral values only, so that a client sending its defaults works
    presence_penalty: Literal[0] | None = None
    frequency_penalty: Literal[0] | None = None
    logprobs: Literal[False] | None = None

    @field_validator("stop")
    @classmethod
    def stop_strings(cls, stop):
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("stop is up to 4 non-empty strings")
        return stops

    @property
    def answer_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


def context_object(record: Record) -> dict:
    return {"id": record.id, "object": "context", "tokens": record.tokens, "bytes_held": record.bytes_held,
            "bytes_full": record.bytes_full, "bytes_on_disk": record.file_bytes, "method": record.method,
            "ratio": record.ratio, "quantizer": record.quantizer, "created_at": int(record.created_at),
            "expires_at": None if record.expires_at is None else int(record.expires_at)}


def usage(prompt_tokens: int, cached_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def completion(id: str, model: str, text: str, finish_reason: str, usage_: dict) -> dict:
    return {"id": id, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "finish_reason": finish_reason, "logprobs": None}],
            "usage": usage_}


def chunk(id: str, model: str, delta: dict, finish_reason: str | None = None, usage_: dict | None = None) -> dict:
    choices = [] if usage_ is not None else [{"index": 0, "delta": delta, "finish_reason": finish_reason,
                                              "logprobs": None}]
    body = {"id": id, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
            "choices": choices}
    if usage_ is not None:
        body["usage"] = usage_
    return body
