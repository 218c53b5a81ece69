"""Helpers for the `kvsqueeze serve` tests: a tiny random model that speaks through the bundled tokenizer, and a
real server on a free local port (uvicorn in a thread of the test process)."""

from __future__ import annotations

import socket
import threading
import time
from functools import lru_cache
from importlib.resources import files

import httpx
import openai
import uvicorn
from transformers import AutoTokenizer

from conftest import tiny_model
from kvsqueeze.models import bundled_model_path
from kvsqueeze.serve import Service, Settings, create_app

MODEL = "tiny"
DOCUMENT = files("kvsqueeze").joinpath("data/document.txt").read_text()


@lru_cache(maxsize=None)
def tokenizer():
    return AutoTokenizer.from_pretrained(bundled_model_path())


def served_model(seed: int = 0):
    """A tiny random Llama with the bundled tokenizer's vocabulary; a wide initialisation makes its (meaningless)
    answers depend on the context and the question."""
    return tiny_model("llama", seed=seed, vocab_size=49152, max_position_embeddings=1024, initializer_range=0.3)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A kvsqueeze server on 127.0.0.1, on a free port; `with Server(...) as server:` stops it at the end."""

    def __init__(self, model, store, *, tokenizer_=None, model_name: str = MODEL, **settings):
        self.service = Service(model, tokenizer_ or tokenizer(),
                               Settings(store=store, model_name=model_name, **settings))
        self.app = create_app(self.service)
        self.uvicorn = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=0, log_level="warning"))
        self.thread = threading.Thread(target=self.uvicorn.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.uvicorn.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "the server did not start"
            time.sleep(0.01)
        port = self.uvicorn.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"

    def openai(self, key: str = "none") -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0, timeout=120)

    def http(self, key: str | None = None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=120)

    def close(self) -> None:
        self.uvicorn.should_exit = True
        self.thread.join(30)
        self.service.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def ask(client: openai.OpenAI, context_id: str | None, question: str, **kwargs):
    extra = {"context_id": context_id} if context_id else None
    return client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": question}],
                                          extra_body=extra, **kwargs)


def streamed(client: openai.OpenAI, context_id: str | None, question: str, **kwargs) -> tuple[str, list]:
    """(the concatenated text, the chunks) of a streamed answer."""
    chunks = list(ask(client, context_id, question, stream=True, **kwargs))
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices), chunks
