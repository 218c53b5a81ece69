"""Compress a context once, then ask it many questions; save it and load it back."""

from __future__ import annotations

import json
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import saved
from .layout import left_pad, pack
from .memory import release_freed_memory
from .cache import SqueezeCache
from .hooks import attached
from .inputs import as_method, check_fits, context_rows, pad_id
from .models import cache_argument
from .prompt import Prompt
from .quantizers import Quantizer, quantizer as as_quantizer


@dataclass
class CompressionStats:
    """What compression did, measured from the cache's tensors."""

    context_tokens: int  # real tokens, summed over the rows of a batch
    kept_per_layer_head: list[list[int]]  # tokens held per layer and KV head, summed over the rows of a batch
    bytes_held: int  # bytes held by the cache's tensors after compression
    bytes_uncompressed: int  # bytes the cache held before compression (the most each layer held)
    seconds: float  # prefill + compression, wall clock
    compressible_layers: list[int]  # layers methods act on (sliding-window layers are bounded by the model)
    quantizer: dict | None = None  # the quantizer storing the kept tokens, if any (its spec)

    @property
    def compression_ratio(self) -> float:
        """Fraction of the context's KV entries (token x KV head) removed in the compressible layers."""
        heads = [self.kept_per_layer_head[i] for i in self.compressible_layers]
        total = self.context_tokens * sum(len(h) for h in heads)
        return 1 - sum(sum(h) for h in heads) / total if total else 0.0

    @property
    def bytes_fraction(self) -> float:
        return self.bytes_held / self.bytes_uncompressed if self.bytes_uncompressed else 1.0


def prefill(model, ids: torch.Tensor, cache: SqueezeCache, method, spans: list[slice] | None = None,
            progress: bool = False, attention_mask: torch.Tensor | None = None, prompt: Prompt | None = None) -> None:
    """Run the context through the model, filling `cache`; `method` compresses it layer by layer.

    With several `spans` (chunks, see `pack`), the context goes one span per forward and the method
    compresses the running cache after each, so the cache never holds more than the method's budget
    plus one chunk. `attention_mask` marks padding: positions count real tokens only, and padding is
    never attended or kept. When the cache has a quantizer, what it holds is quantized after each span.
    Then `method.after_prefill` sees the whole context (`prompt`: its chat layout, for methods that prompt the model).
    """
    spans = spans or [slice(0, ids.shape[1])]
    if len(spans) > 1 and method is not None and method.has("whole_context"):
        raise ValueError(f"{type(method).__name__} decides once from the whole context and cannot compress "
                         "chunk by chunk: use it without chunk_size")
    base = model.base_model  # the decoder without the LM head: no logits are needed for the context
    if attention_mask is not None:
        attention_mask = attention_mask.to(model.device)
        positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad(), attached(model):
        with method.apply(model) if method is not None else nullcontext():
            for span in tqdm(spans, desc="prefill", disable=not progress or len(spans) == 1):
                padding = {} if attention_mask is None else {"attention_mask": attention_mask[:, :span.stop],
                                                             "position_ids": positions[:, span]}
                base(input_ids=ids[:, span].to(model.device), **{cache_argument(model): cache}, use_cache=True, **padding)
                cache.quantize()
        if method is not None:
            method.after_prefill(model, cache, ids, attention_mask, prompt)
            cache.quantize()


def measure(cache: SqueezeCache, rows: list[torch.Tensor], seconds: float, quantizer: Quantizer | None
            ) -> CompressionStats:
    """What the cache holds after compressing `rows`, measured from its tensors."""
    return CompressionStats(
        context_tokens=sum(len(row) for row in rows),
        kept_per_layer_head=[heads.sum(0).tolist() for heads in cache.kept_per_head()],
        bytes_held=cache.nbytes(), bytes_uncompressed=cache.peak_bytes(), seconds=seconds,
        compressible_layers=cache.compressible,
        quantizer=None if quantizer is None else quantizer.spec())


def cover_appended(cache: SqueezeCache, ids: torch.Tensor, mask: torch.Tensor | None, pad: int
                   ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The context ids and mask, widened by placeholder columns for tokens a method appended to the cache after
    the context (RestoreKV's restore tokens): they are in the cache but not in the text, and `generate` must feed
    the question after them."""
    extra = cache.get_seq_length() - ids.shape[1]
    if extra <= 0:
        return ids, mask
    ids = torch.cat([ids, ids.new_full((ids.shape[0], extra), pad)], 1)
    return ids, None if mask is None else torch.cat([mask, mask.new_ones(mask.shape[0], extra)], 1)


def compress(model, tokenizer, context: str | torch.Tensor | list, method = None, *,
             chunk_size: int | None = None, quantizer: str | Quantizer | None = None, chat_template: bool = True,
             check_window: bool = True, progress: bool = False) -> "CompressedContext":
    """Prefill `context` and compress its cache with `method` (None keeps everything).

    `context` is text (placed in the user turn of the chat template, when the tokenizer has one) or
    token ids ([n] or [1, n]) used as they are; a list of them, or ids [batch, n], is a batch, compressed at
    once (left-padded: each row gets what compressing it alone gives). `method` is a Method, a registry name
    ("snapkv") or a method class (built with its defaults). `chunk_size` prefills in chunks, compressing after each
    (peak memory bounded by the budget plus one chunk). `check_window=False` allows contexts longer than
    the model's window (for memory measurements: the model was not trained on such positions).
    `quantizer` ("kivi-2", "kvquant-4", "gear-4" or a Quantizer) stores what is kept quantized; it composes
    with any method, and later tokens (question, answer) are quantized too, past its full-precision window.
    """
    quantizer = as_quantizer(quantizer)
    method = as_method(method)
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 2):
        raise ValueError(f"chunk_size is a number of tokens, at least 2; got {chunk_size!r}")
    prompt, rows = context_rows(model, tokenizer, context, chat_template, check_window)
    cache = SqueezeCache(model.config, quantizer=quantizer)
    # sliding windows count positions, padding included: no padding may sit in the middle of them
    aligned = len(cache.compressible) == len(cache.layers)
    pad = pad_id(model, tokenizer)
    ids, mask, spans = pack(rows, chunk_size, pad, aligned)
    start = time.perf_counter()
    prefill(model, ids, cache, method, spans, progress, mask, prompt)
    stats = measure(cache, rows, time.perf_counter() - start, quantizer)
    ids, mask = cover_appended(cache, ids, mask, pad)
    release_freed_memory()  # what the method evicted and the prefill's temporaries
    return CompressedContext(model, tokenizer, cache, ids, method, prompt, stats, mask, check_window)


class CompressedContext:
    """A compressed context: its cache, its token ids (the logical length), and the method that made it.

    Ask it questions with `ask` / `ask_many`: each question runs on a fork of the cache that shares
    its tensors, so the context is exactly as it was before every question. A batch of contexts
    (`context_ids` [batch, longest], left-padded as `context_mask` says) answers one question per row.
    """

    def __init__(self, model, tokenizer, cache: SqueezeCache, context_ids: torch.Tensor, method,
                 prompt: Prompt | None, stats: CompressionStats, context_mask: torch.Tensor | None = None,
                 check_window: bool = True):
        self.model, self.tokenizer, self.cache = model, tokenizer, cache
        self.context_ids, self.method, self.prompt, self.stats = context_ids, method, prompt, stats
        self.context_mask = context_mask
        self.check_window = check_window  # False: questions may go past the model's window too (measurements)

    @classmethod
    def stack(cls, contexts: list["CompressedContext"]) -> "CompressedContext":
        """Single contexts of one model as one batch, a row each in order (a context may appear several times):
        `generate` / `ask` with one question per row then answers them all in one batched `generate`. Each row
        holds exactly its context's cache (see `SqueezeCache.stack`), so it answers as its context alone does.
        Raises ValueError for contexts that cannot share a batch (another model, a batch, sliding-window layers,
        different quantizers)."""
        if not contexts:
            raise ValueError("no context to stack")
        first = contexts[0]
        for ctx in contexts:
            if ctx.model is not first.model:
                raise ValueError("contexts of different models cannot share a batch")
            if ctx.batch_size != 1:
                raise ValueError(f"stack takes single contexts; got a batch of {ctx.batch_size}")
            if ctx.cache.get_seq_length() != ctx.logical_length:
                raise ValueError("a context whose positions follow its cache (a rolling window) cannot share a batch")
        cache = SqueezeCache.stack([ctx.cache for ctx in contexts])
        rows = [ctx.context_ids[0] for ctx in contexts]
        ids, mask = left_pad(rows, pad_id(first.model, first.tokenizer))
        quantizers = {json.dumps(ctx.stats.quantizer) for ctx in contexts}
        stats = measure(cache, rows, sum(ctx.stats.seconds for ctx in contexts), None)
        stats.quantizer = first.stats.quantizer if len(quantizers) == 1 else None
        return cls(first.model, first.tokenizer, cache, ids, None, first.prompt, stats,
                   None if bool(mask.all()) else mask, all(ctx.check_window for ctx in contexts))

    @property
    def batch_size(self) -> int:
        return self.context_ids.shape[0]

    @property
    def logical_length(self) -> int:
        return self.context_ids.shape[1]

    def nbytes(self) -> int:
        return self.cache.nbytes()

    def generate(self, question_ids: torch.Tensor | list[torch.Tensor], decode_method = None,
                 **generate_kwargs) -> torch.Tensor:
        """`model.generate` on a fork of the cache; returns only the new tokens, [sequences, new].

        `question_ids` is one question for every row, or a list with one per row of a batch (for a single context, a
        list of several questions is answered at once, one batch row each).
        `decode_method` (e.g. `DecodingBudget`, `H2O`, `RollingStreamingLLM`) keeps compressing while generating.
        """
        questions = list(question_ids) if isinstance(question_ids, (list, tuple)) else [question_ids] * self.batch_size
        cache, context_ids, context_mask = self.cache.fork(), self.context_ids, self.context_mask
        if len(questions) != self.batch_size:
            if self.batch_size != 1:
                raise ValueError(f"{len(questions)} questions for a batch of {self.batch_size} contexts")
            cache.batch_repeat_interleave(len(questions))  # one context, several questions at once
            context_ids = context_ids.expand(len(questions), -1)
            context_mask = None if context_mask is None else context_mask.expand(len(questions), -1)
        cached = cache.get_seq_length()
        if cached < context_ids.shape[1]:  # positions follow the cache (a rolling window): generate reads from there
            context_ids = context_ids[:, context_ids.shape[1] - cached:]
            context_mask = None if context_mask is None else context_mask[:, context_mask.shape[1] - cached:]
        pad = pad_id(self.model, self.tokenizer)
        question, question_mask = left_pad([torch.as_tensor(q).reshape(-1) for q in questions], pad)
        ids = torch.cat([context_ids, question], dim=1)
        mask = torch.cat([torch.ones_like(context_ids) if context_mask is None else context_mask,
                          question_mask], dim=1)
        if self.check_window:
            check_fits(self.model, int(mask.sum(-1).max()))
        ids, mask = ids.to(self.model.device), mask.to(self.model.device)
        kwargs = {"max_new_tokens": 128, "do_sample": False, "pad_token_id": pad} | generate_kwargs
        if not kwargs["do_sample"]:
            kwargs.setdefault("temperature", None)
            kwargs.setdefault("top_p", None)
            kwargs.setdefault("top_k", None)
        # generate expands the inputs for beams and multiple sequences, but not a cache it is given
        defaults = self.model.generation_config
        expand = max(kwargs.get("num_beams", defaults.num_beams or 1),
                     kwargs.get("num_return_sequences", defaults.num_return_sequences or 1))
        if expand > 1:
            cache.batch_repeat_interleave(expand)
        with torch.no_grad(), (decode_method.apply(self.model) if decode_method is not None else attached(self.model)):
            out = self.model.generate(ids, attention_mask=mask, **{cache_argument(self.model): cache}, **kwargs)
        return out[:, ids.shape[1]:]

    def ask(self, question: str | list[str], answer_prefix: str = "", decode_method=None,
            **generate_kwargs) -> str | list[str]:
        """Answer `question` about the context (greedy, 128 new tokens unless generate kwargs say otherwise).

        Returns one string; a list when `num_return_sequences` > 1 or the context is a batch (one answer per
        row, then per sequence). For a batch, `question` is asked of every row, or is a list of one per row.
        `decode_method` keeps compressing while the answer is generated. When the question was compressed with
        the context (query-aware), use `answer` instead.
        """
        questions = [question] if isinstance(question, str) else list(question) if isinstance(question, list) else []
        if not questions or not all(isinstance(q, str) and q.strip() for q in questions):
            raise ValueError(f"a question is a non-empty text (or a list of them); got {question!r} (when the context "
                             "ends with its question, use answer())")
        return self._reply(question, answer_prefix, decode_method, generate_kwargs)

    def answer(self, answer_prefix: str = "", decode_method=None, **generate_kwargs) -> str | list[str]:
        """Answer the question the context itself ends with (query-aware: it was compressed with the context): the
        end of the user turn and the assistant header are added, then `answer_prefix`."""
        return self._reply("", answer_prefix, decode_method, generate_kwargs)

    def _reply(self, question, answer_prefix, decode_method, generate_kwargs):
        if self.prompt is None:
            raise ValueError("this context has no tokenizer: use generate() with token ids")
        if isinstance(question, str):
            ids = self.prompt.question_ids(question, answer_prefix)
        else:
            ids = [self.prompt.question_ids(q, answer_prefix) for q in question]
        new = self.generate(ids, decode_method, **generate_kwargs)
        answers = [self.tokenizer.decode(row, skip_special_tokens=True).strip() for row in new]
        return answers if len(answers) > 1 or generate_kwargs.get("num_return_sequences", 1) > 1 else answers[0]

    def ask_many(self, questions: list[str], answer_prefix: str = "", decode_method = None,
                 **generate_kwargs) -> list[str]:
        """Answer each question on the same compressed context (restored exactly between questions)."""
        return [self.ask(q, answer_prefix, decode_method, **generate_kwargs) for q in questions]

    def save(self, path: str | Path) -> None:
        """Write the cache, token ids and provenance to a safetensors file (see `saved`)."""
        method = None if self.method is None else {"name": self.method.name, "repr": repr(self.method),
                                                   "settings": self.method.settings()}
        saved.write(path, self.model, self.cache, self.context_ids, self.context_mask, method, asdict(self.stats))

    @classmethod
    def load(cls, path: str | Path, model, tokenizer=None, chat_template: bool = True) -> "CompressedContext":
        """Read a context saved by `save`, checking that `model` is the model it was made with."""
        cache, context_ids, context_mask, stats = saved.read(path, model)
        try:
            stats = CompressionStats(**stats)
        except TypeError as error:
            raise saved.CorruptContextError(f"{path} has damaged statistics: {error}") from error
        prompt = Prompt.for_tokenizer(tokenizer, chat_template) if tokenizer is not None else None
        return cls(model, tokenizer, cache, context_ids, None, prompt, stats, context_mask)
