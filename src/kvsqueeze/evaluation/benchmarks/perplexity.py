"""Perplexity while the cache is compressed, as in the L2-norm paper (Devoto et al. 2024, arXiv:2406.11430).

The text goes through the model chunk by chunk (or token by token) into a kvsqueeze cache that the method
compresses after each forward, so every later token is predicted from the compressed cache of what came
before it. With no method this is the model's ordinary perplexity.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import torch
import torch.nn.functional as F

from ...cache import SqueezeCache
from ...hooks import attached
from ...models import cache_argument
from ...methods import Method
from ...inputs import check_fits
from ..base import Benchmark, Question, Sample
from ..needle import essays, split_sentences


def token_ids(tokenizer, text: str | torch.Tensor) -> torch.Tensor:
    """Token ids [1, n] of a text (with the tokenizer's special tokens, e.g. BOS), or given ids as they are."""
    if isinstance(text, str):
        if tokenizer is None:
            raise ValueError("a text needs a tokenizer (or give token ids)")
        return tokenizer(text, return_tensors="pt").input_ids
    return torch.as_tensor(text).reshape(1, -1)


def token_nlls(model, tokenizer, text: str | torch.Tensor, method: Method | None = None, chunk_size: int = 512,
               check_window: bool = True) -> torch.Tensor:
    """The negative log-likelihood of every token after the first, [n - 1], given all those before it.

    The text goes `chunk_size` tokens per forward; after each forward `method` compresses the cache, so a
    chunk's tokens see the compressed cache of the earlier chunks and the chunk's own earlier tokens in full.
    Prefill methods compress forwards of several tokens (chunk_size >= 2); decoding methods (H2O,
    DecodingBudget...) compress one-token forwards, so chunk_size=1 measures them token by token.
    """
    ids = token_ids(tokenizer, text)
    if ids.shape[1] < 2:
        raise ValueError("perplexity needs at least 2 tokens")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be at least 1; got {chunk_size}")
    if method is not None:
        if chunk_size == 1 and method.phase == "prefill":
            raise ValueError(f"{type(method).__name__} compresses forwards of several tokens only: use chunk_size >= 2")
        if chunk_size < ids.shape[1] and method.has("whole_context"):
            raise ValueError(f"{type(method).__name__} decides once from the whole context and cannot compress "
                             "chunk by chunk: use a chunk_size of at least the text's length")
    if check_window:
        check_fits(model, ids.shape[1])
    cache = SqueezeCache(model.config)
    nlls, last_logits = [], None
    with torch.no_grad(), (method.apply(model) if method is not None else attached(model)):
        for start in range(0, ids.shape[1], chunk_size):
            chunk = ids[:, start:start + chunk_size].to(model.device)
            logits = model(input_ids=chunk, **{cache_argument(model): cache}, use_cache=True).logits.float()
            predicting = logits[:, :-1] if last_logits is None else torch.cat([last_logits, logits[:, :-1]], 1)
            targets = chunk[:, 1:] if last_logits is None else chunk
            nlls.append(F.cross_entropy(predicting[0], targets[0], reduction="none").cpu())
            last_logits = logits[:, -1:]
    return torch.cat(nlls)


def perplexity(model, tokenizer, text: str | torch.Tensor, method: Method | None = None, chunk_size: int = 512,
               check_window: bool = True) -> float:
    """exp(mean negative log-likelihood) of the text's tokens, its cache compressed by `method` as it goes in
    (see `token_nlls`). `text` is a string, or token ids used as they are (then `tokenizer` may be None)."""
    return math.exp(token_nlls(model, tokenizer, text, method, chunk_size, check_window).mean().item())


class Perplexity(Benchmark):
    """Pieces of a local text for perplexity under compression (Devoto et al. 2024, arXiv:2406.11430).

    Not question answering: the samples have no questions (a plain sweep skips them). The runner measures
    each sample with `perplexity(model, tokenizer, sample.context, method, chunk_size)`, or, for one
    perplexity over all samples weighted by tokens, exp of the mean of the concatenated `token_nlls`.
    The pieces are the text in order (the bundled essays, or the UTF-8 file at `path`), consecutive
    paragraphs of at most `length` tokens each (special tokens included); a last piece shorter than half
    of that is dropped unless it is the only one. `seed` does not change them.
    """

    name = "perplexity"

    def __init__(self, length: int = 4096, path: str | Path | None = None):
        if length < 2:
            raise ValueError(f"length must be at least 2 tokens; got {length}")
        self.length = length
        self.path = None if path is None else str(path)
        self.tasks = ("essays" if path is None else Path(path).stem,)

    def text(self) -> str:
        return "\n\n".join(essays()) if self.path is None else Path(self.path).read_text(encoding="utf-8")

    def pieces(self, tokenizer) -> list[str]:
        def n_tokens(text: str) -> int:
            return len(tokenizer(text).input_ids)

        units = []
        for paragraph in (p.strip() for p in re.split(r"\n\s*\n", self.text()) if p.strip()):
            units.extend([paragraph] if n_tokens(paragraph) <= self.length else split_sentences(paragraph))
        pieces, current = [], []
        for unit in units:
            if n_tokens(unit) > self.length:
                raise ValueError(f"length {self.length} is too small: a sentence of the text alone takes "
                                 f"{n_tokens(unit)} tokens")
            if current and n_tokens("\n\n".join(current + [unit])) > self.length:
                pieces.append("\n\n".join(current))
                current = []
            current.append(unit)
        if current and (not pieces or n_tokens("\n\n".join(current)) >= self.length // 2):
            pieces.append("\n\n".join(current))
        return pieces

    def samples(self, tokenizer, n: int | None = None, seed: int = 0) -> list[Sample]:
        task = self.tasks[0]
        return [Sample(f"{task}-{i}", task, piece, [],
                       {"length": self.length, "tokens": len(tokenizer(piece).input_ids)})
                for i, piece in enumerate(self.pieces(tokenizer)[:n])]

    def score(self, prediction: str, question: Question, task: str) -> float:
        raise NotImplementedError("perplexity has no answers to score: measure each sample with perplexity()")

    def describe(self) -> dict:
        return {"length": self.length, "path": self.path}
