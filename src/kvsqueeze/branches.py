"""One prefill, several compressions: every method compresses its own copy of each layer.

In a prefill done in one forward, a layer's method acts after that layer has attended to the whole
context, so what the model computes (every layer's keys, values, queries and outputs) does not depend on
the method. One prefill can therefore serve any number of methods: after each attention layer, each
branch takes a copy of the layer (sharing its tensors until it evicts) and compresses it as if it ran
alone. The result is exactly what a separate `compress` per method gives, at the cost of one prefill;
`kvsqueeze eval` uses it to score a grid of methods and ratios on each sample.

Not for methods that change the prefill itself (that declare "changes_prefill") nor for chunked prefill,
where each chunk attends to the already compressed cache: those need their own prefill.
"""

from __future__ import annotations

import time

import torch

from .cache import SqueezeCache
from .context import LayerContext
from .methods.base import Method
from .layout import pack
from .memory import release_freed_memory
from .inputs import context_rows, pad_id
from .pipeline import CompressedContext, measure, prefill
from .quantizers import Quantizer, quantizer as as_quantizer


def shares_prefill(method: Method | None) -> bool:
    """Whether `method` compresses what a plain prefill computes, so that one prefill can serve it and others."""
    return method is None or not (method.has("changes_prefill") or method.has("after_prefill"))


class Branches(Method):
    """Hands each attention layer of a prefill to several methods, each compressing its own cache."""

    def __init__(self, methods: list[Method | None], caches: list[SqueezeCache], isolate: bool = False):
        """With `isolate`, a branch whose method raises stops there and keeps its exception in `failures`; the
        others go on. Without, the exception ends the prefill."""
        for method in methods:
            if not shares_prefill(method):
                raise ValueError(f"{type(method).__name__} changes the prefill itself or acts after it: it needs a "
                                 "prefill of its own")
        self.methods, self.caches, self.isolate = methods, caches, isolate
        self.seconds = [0.0] * len(methods)  # each branch's own compression time
        self.failures: list[Exception | None] = [None] * len(methods)

    def each(self, step) -> None:
        """`step(i, method)` for every branch still running; with `isolate`, a branch that raises is stopped."""
        for i, method in enumerate(self.methods):
            if self.failures[i] is not None:
                continue
            try:
                step(i, method)
            except Exception as error:
                if not self.isolate:
                    raise
                self.failures[i] = error

    def setup(self, model: torch.nn.Module) -> None:
        self.each(lambda i, method: method is not None and method.setup(model))

    def before_forward(self, kwargs: dict) -> None:
        def check(i, method):
            if method is None:
                return
            seen = dict(kwargs)
            method.before_forward(seen)
            if seen.keys() != kwargs.keys() or any(seen[k] is not kwargs[k] for k in kwargs):
                raise ValueError(f"{type(method).__name__} edits the forward's arguments: it needs a prefill of its own")

        self.each(check)

    def acts_on(self, ctx: LayerContext) -> bool:
        return True

    def compress(self, ctx: LayerContext) -> None:
        def branch(i, method):
            start = time.perf_counter()
            cache = self.caches[i]
            layer = ctx.layer.fork()  # shares the tensors; a compression replaces them, never edits them
            layer.quantizer = cache.layers[ctx.layer_idx].quantizer
            cache.layers[ctx.layer_idx] = layer
            own = ctx.for_cache(cache)  # this branch's layer, untouched
            if method is not None and method.acts_on(own):
                method.compress(own)
            cache.quantize(ctx.layer_idx)
            self.seconds[i] += time.perf_counter() - start

        self.each(branch)

    def finish(self, shared: SqueezeCache) -> None:
        """Give every branch the layers no method compresses (sliding windows): the shared prefill's."""
        for cache in self.caches:
            for i, layer in enumerate(shared.layers):
                if not layer.compressible:
                    cache.layers[i] = layer.fork()


def compress_each(model, tokenizer, context, methods: list[Method | None], *,
                  quantizers: list[str | Quantizer | None] | None = None, chat_template: bool = True,
                  check_window: bool = True, errors: str = "raise") -> list[CompressedContext | Exception]:
    """`compress(model, tokenizer, context, method, quantizer=q)` for every (method, q) pair, from one prefill.

    `methods[i]` (None: the full cache) goes with `quantizers[i]` (default: none). Each context's
    `stats.seconds` is the shared prefill plus its own compression. With `errors="return"`, a method that raises
    gets its exception in its place in the list and the others finish (a sweep records it and goes on).
    """
    if errors not in ("raise", "return"):
        raise ValueError(f"errors={errors!r}: 'raise' or 'return'")
    quantizers = [None] * len(methods) if quantizers is None else list(quantizers)
    if len(quantizers) != len(methods):
        raise ValueError(f"{len(methods)} methods but {len(quantizers)} quantizers")
    quantizers = [as_quantizer(q) for q in quantizers]
    prompt, rows = context_rows(model, tokenizer, context, chat_template, check_window)
    shared = SqueezeCache(model.config)
    caches = [SqueezeCache(model.config, quantizer=quantizer) for quantizer in quantizers]
    branches = Branches(methods, caches, isolate=errors == "return")
    ids, mask, _ = pack(rows, None, pad_id(model, tokenizer))
    start = time.perf_counter()
    prefill(model, ids, shared, branches, None, False, mask)
    branches.finish(shared)
    prefill_seconds = time.perf_counter() - start - sum(branches.seconds)
    release_freed_memory()
    return [failure or CompressedContext(model, tokenizer, cache, ids, method, prompt,
                                         measure(cache, rows, prefill_seconds + own, quantizer), mask, check_window)
            for method, cache, quantizer, own, failure in zip(methods, caches, quantizers, branches.seconds,
                                                              branches.failures)]
