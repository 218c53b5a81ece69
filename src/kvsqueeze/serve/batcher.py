"""One thread owns the model: it compresses contexts and answers questions, batching those that arrive together.

Questions waiting when the thread is free (or arriving within `window` seconds of the first) and sharing their
sampling settings become the rows of ONE batched `generate`: on one context, its rows repeated; on several, the
contexts stacked (`CompressedContext.stack`) so that each row holds exactly its own context; contexts that cannot
share a batch (different quantizers, pruned key channels, sliding-window models) fall back to one batch per
context. Each row keeps its own `max_tokens` and stop strings, and streams its tokens as they are chosen: the
batched `generate` is fanned out to one event stream per request.
"""

from __future__ import annotations

import gc
import logging
import queue
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from .. import CompressedContext
from .errors import BadRequest, ServerError

log = logging.getLogger("kvsqueeze.serve")


# -- what a request is told, in order: Started, Delta*, then Finished or Failed ------------------------------------

@dataclass
class Started:
    prompt_tokens: int
    cached_tokens: int


@dataclass
class Delta:
    text: str


@dataclass
class Finished:
    text: str
    finish_reason: str  # "stop" (end of turn or a stop string) or "length"
    prompt_tokens: int
    cached_tokens: int  # of the prompt tokens, those of the stored (compressed) context
    completion_tokens: int


@dataclass
class Failed:
    error: Exception


@dataclass(frozen=True)
class Sampling:
    temperature: float | None = None  # None or 0: greedy
    top_p: float | None = None
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        return not self.temperature

    def key(self, generation) -> tuple:
        """Requests with equal keys may share a batch: greedy ones always; seeded ones never (their draws must not
        depend on who else is in the batch)."""
        if self.greedy:
            return ("greedy",)
        if self.seed is not None:
            return ("seeded", id(generation))
        return ("sample", self.temperature, self.top_p)

    def generate_kwargs(self) -> dict:
        if self.greedy:
            return {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
        return {"do_sample": True, "temperature": self.temperature, "top_p": self.top_p or 1.0, "top_k": None}


@dataclass(eq=False)
class Generation:
    """A question to answer: on a stored context (`context`, opened by the batcher's `open_context`) with
    `question`, or, without a context, a plain chat completion of `messages`."""

    listener: Callable[[object], None]  # called from the model's thread with each event
    context: object = None
    question: str | None = None
    messages: list[dict] | None = None
    max_tokens: int | None = None  # None: the server's default, shortened to fit the model's window
    sampling: Sampling = field(default_factory=Sampling)
    stop: tuple[str, ...] = ()
    _cancelled: threading.Event = field(default_factory=threading.Event, repr=False)

    def cancel(self) -> None:
        """The client has gone: its row stops at the next token (the others go on)."""
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()


def tell(generation: Generation, event) -> bool:
    """Hand an event to a request. One that cannot take it (its server loop is gone) is cancelled, without
    disturbing the others; returns False then."""
    try:
        generation.listener(event)
        return True
    except Exception:  # noqa: BLE001
        log.exception("a request could not be told of its answer; it is dropped")
        generation.cancel()
        return False


class Row:
    """One request's row of a batched generate: its tokens, its text so far, when it stops."""

    def __init__(self, generation: Generation, ids: torch.Tensor, max_tokens: int, prompt_tokens: int,
                 cached_tokens: int, context=None):
        self.generation, self.ids, self.max_tokens, self.context = generation, ids, max_tokens, context
        self.prompt_tokens, self.cached_tokens = prompt_tokens, cached_tokens
        self.tokens: list[int] = []
        self.sent = ""  # the text already streamed
        self.done = False

    def text(self, decode, final: bool) -> tuple[str, bool]:
        """(the answer as it may be shown now, whether a stop string ended it).

        The final text is the decoded answer stripped (as `CompressedContext.ask` returns it) and cut before the
        first stop string. Before the end, what could still change is held back: trailing whitespace (it may be
        stripped), an incomplete character, and the start of a stop string. So the streamed pieces add up to
        exactly the final text."""
        text = decode(self.tokens).lstrip()
        cuts = [i for i in (text.find(stop) for stop in self.generation.stop) if i >= 0]
        if cuts:
            return text[:min(cuts)].rstrip(), True
        if final:
            return text.rstrip(), False
        while True:
            held = text.rstrip().rstrip("\ufffd")
            for stop in self.generation.stop:
                for k in range(min(len(stop) - 1, len(held)), 0, -1):
                    if held.endswith(stop[:k]):
                        held = held[:-k]
                        break
            if held == text:
                return text, False
            text = held


class Rows(StoppingCriteria):
    """The rows of one batched generate. As a stopping criterion it sees every row's new token right after it is
    chosen, on every transformers release (a streamer's `put` comes before or after the criteria depending on the
    release): it streams the token to its request and says which rows are done."""

    def __init__(self, rows: list[Row], tokenizer, eos: set[int]):
        self.rows, self.tokenizer, self.eos = rows, tokenizer, eos

    def decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True)

    @staticmethod
    def tell(row: Row, event) -> None:
        if not tell(row.generation, event):
            row.done = True

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        for row, token in zip(self.rows, input_ids[:, -1].tolist()):
            if not row.done:
                self.advance(row, token)
        return torch.tensor([row.done for row in self.rows], device=input_ids.device)

    def advance(self, row: Row, token: int) -> None:
        if row.generation.cancelled:
            row.done = True
            return
        row.tokens.append(token)
        if token in self.eos:
            self.finish(row, "stop")
            return
        text, stopped = row.text(self.decode, final=False)
        if stopped:
            self.finish(row, "stop")
        elif len(row.tokens) >= row.max_tokens:
            self.finish(row, "length")
        elif len(text) > len(row.sent) and text.startswith(row.sent):
            self.tell(row, Delta(text[len(row.sent):]))
            row.sent = text

    def finish(self, row: Row, reason: str) -> None:
        row.done = True
        if row.generation.cancelled:
            return
        text, stopped = row.text(self.decode, final=True)
        if text.startswith(row.sent):
            if len(text) > len(row.sent):
                self.tell(row, Delta(text[len(row.sent):]))
        else:  # a tokenizer whose decoding of a prefix is not a prefix of the whole: the stream told a bit less
            log.warning("streamed text %r is not a prefix of the answer %r", row.sent, text)
        self.tell(row, Finished(text, "stop" if stopped else reason, row.prompt_tokens, row.cached_tokens,
                                len(row.tokens)))

    def close(self, error: Exception | None = None) -> None:
        """After generate: rows it stopped (its own length limit) finish; on an error every unfinished row fails."""
        for row in self.rows:
            if not row.done:
                if error is None:
                    self.finish(row, "length")
                else:
                    row.done = True
                    self.tell(row, Failed(error))


@dataclass(eq=False)
class _Call:
    fn: Callable
    future: Future

    def run(self) -> None:
        if self.future.set_running_or_notify_cancel():
            try:
                self.future.set_result(self.fn())
            except BaseException as error:  # noqa: BLE001  handed to the caller
                self.future.set_exception(error)


_STOP = object()


class Batcher:
    """The model's thread. `call(fn)` runs anything that touches the model (compressing, saving, loading) there;
    `submit(generation)` queues a question, batched with others."""

    def __init__(self, model, tokenizer, open_context: Callable[[object], CompressedContext], *,
                 default_max_tokens: int = 128, max_batch: int = 8, window: float = 0.02,
                 on_batch: Callable[[int, int, float], None] | None = None):
        self.model, self.tokenizer, self.open_context = model, tokenizer, open_context
        self.default_max_tokens, self.max_batch, self.window = default_max_tokens, max_batch, window
        self.on_batch = on_batch  # (rows, generated tokens, seconds) after each batched generate
        config = model.config.get_text_config()
        self.window_tokens = getattr(config, "max_position_embeddings", None)
        eos = model.generation_config.eos_token_id
        self.eos = {e for e in ([eos] if isinstance(eos, int) else eos or []) + [tokenizer.eos_token_id]
                    if e is not None}
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.pad = 0 if pad is None else pad
        self._queue: queue.Queue = queue.Queue()
        self._held: deque = deque()  # taken from the queue while gathering a batch, but not part of it
        self._thread = threading.Thread(target=self._work, name="kvsqueeze-model", daemon=True)
        self._thread.start()

    def call(self, fn: Callable, *args, **kwargs) -> Future:
        future: Future = Future()
        self._queue.put(_Call(lambda: fn(*args, **kwargs), future))
        return future

    def submit(self, generation: Generation) -> Generation:
        self._queue.put(generation)
        return generation

    def pending(self) -> int:
        return self._queue.qsize() + len(self._held)

    def close(self, timeout: float = 30) -> None:
        self._queue.put(_STOP)
        self._thread.join(timeout)

    # -- the model's thread ---------------------------------------------------------------------------------

    def _work(self) -> None:
        while True:
            item = self._held.popleft() if self._held else self._queue.get()
            if item is _STOP:
                self._drain()
                return
            try:
                if isinstance(item, _Call):
                    item.run()
                elif not item.cancelled:
                    self._answer(self._gather(item))
                    # a generate leaves reference cycles that hold cache tensors (hundreds of MB for a batch of real
                    # contexts) until the cyclic collector happens to run: free them now, so memory stays flat
                    gc.collect()
            except Exception:  # noqa: BLE001  the thread must outlive any one request
                log.exception("unexpected error in the model's thread")

    def _drain(self) -> None:
        while True:
            try:
                item = self._held.popleft() if self._held else self._queue.get_nowait()
            except queue.Empty:
                return
            if isinstance(item, _Call):
                item.future.cancel()
            elif isinstance(item, Generation):
                tell(item, Failed(ServerError("the server is shutting down", status=503)))

    def _gather(self, first: Generation) -> list[Generation]:
        key = self._key(first)
        batch, others = [first], deque()
        while self._held and len(batch) < self.max_batch:
            item = self._held.popleft()
            (batch if self._fits(item, key) else others).append(item)
        deadline = time.monotonic() + self.window
        while len(batch) < self.max_batch:
            try:
                item = self._queue.get(timeout=max(deadline - time.monotonic(), 0))
            except queue.Empty:
                break
            if self._fits(item, key):
                batch.append(item)
            else:
                others.append(item)
                if item is _STOP:
                    break
        self._held.extendleft(reversed(others))
        return batch

    def _key(self, generation: Generation) -> tuple:
        return (generation.context is not None,) + generation.sampling.key(generation)

    def _fits(self, item, key) -> bool:
        return isinstance(item, Generation) and not item.cancelled and self._key(item) == key

    def _answer(self, batch: list[Generation]) -> None:
        rows = []
        for generation in batch:
            try:
                rows.append(self._prepare(generation))
            except Exception as error:  # noqa: BLE001  this request fails, the others go on
                tell(generation, Failed(error))
        if not rows:
            return
        if rows[0].context is None:
            self._generate(None, rows)
            return
        contexts = {id(row.context): row.context for row in rows}
        if len(contexts) == 1:
            self._generate(rows[0].context, rows)
            return
        try:
            stacked = CompressedContext.stack([row.context for row in rows])
        except ValueError:  # contexts that cannot share a batch: one batch per context
            for context in contexts.values():
                self._generate(context, [row for row in rows if row.context is context])
            return
        self._generate(stacked, rows)

    def _prepare(self, generation: Generation) -> Row:
        """Open the context, tokenize, and check that the prompt and answer fit the model's window."""
        if generation.context is not None:
            context = self.open_context(generation.context)
            ids = context.prompt.question_ids(generation.question).reshape(-1)
            cached = context.logical_length
        else:
            context, cached = None, 0
            ids = self.tokenizer.apply_chat_template(generation.messages, add_generation_prompt=True,
                                                     return_dict=True, return_tensors="pt")["input_ids"].reshape(-1)
        prompt = cached + len(ids)
        room = None if self.window_tokens is None else self.window_tokens - prompt
        max_tokens = generation.max_tokens
        if room is not None and room < 1:
            raise BadRequest(f"the prompt has {prompt} tokens, the model's window {self.window_tokens}: "
                             "shorten the question", param="messages", code="context_length_exceeded")
        if max_tokens is None:
            max_tokens = self.default_max_tokens if room is None else min(self.default_max_tokens, room)
        elif room is not None and max_tokens > room:
            raise BadRequest(f"the prompt has {prompt} tokens and the model's window is {self.window_tokens}: at most "
                             f"{room} new tokens fit; got max_tokens={max_tokens}", param="max_tokens",
                             code="context_length_exceeded")
        return Row(generation, ids, max_tokens, prompt, cached, context)

    def _generate(self, context: CompressedContext | None, rows: list[Row]) -> None:
        tracker = Rows(rows, self.tokenizer, self.eos)
        for row in rows:
            tracker.tell(row, Started(row.prompt_tokens, row.cached_tokens))
        sampling = rows[0].generation.sampling
        kwargs = sampling.generate_kwargs() | {"max_new_tokens": max(row.max_tokens for row in rows),
                                               "stopping_criteria": StoppingCriteriaList([tracker])}
        start, error = time.perf_counter(), None
        try:
            if sampling.seed is not None:
                torch.manual_seed(sampling.seed)
            if context is not None:
                context.generate([row.ids for row in rows], **kwargs)
            else:
                self._plain(rows, kwargs)
        except Exception as failure:  # noqa: BLE001  handed to the batch's requests
            log.exception("generate failed for a batch of %d", len(rows))
            error = failure if isinstance(failure, BadRequest) else ServerError(f"generation failed: {failure}")
        finally:
            tracker.close(error)
        if self.on_batch is not None:
            self.on_batch(len(rows), sum(len(row.tokens) for row in rows), time.perf_counter() - start)

    def _plain(self, rows: list[Row], kwargs: dict) -> None:
        longest = max(len(row.ids) for row in rows)
        ids = torch.full((len(rows), longest), self.pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, row in enumerate(rows):
            ids[i, longest - len(row.ids):], mask[i, longest - len(row.ids):] = row.ids, 1
        device = self.model.device
        with torch.no_grad():
            self.model.generate(ids.to(device), attention_mask=mask.to(device), pad_token_id=self.pad, **kwargs)
