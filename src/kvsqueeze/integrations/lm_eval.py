"""An lm-evaluation-harness model, registered as "kvsqueeze": any lm-eval task, answered on a compressed KV cache.

    import lm_eval
    import kvsqueeze.integrations.lm_eval  # registers the model name "kvsqueeze" with lm-eval

    lm_eval.simple_evaluate(model="kvsqueeze", tasks=["..."],
                            model_args="pretrained=bundled,method=snapkv,ratio=0.5,quantizer=kivi-4")

From the command line, `kvsqueeze lm-eval ARGS` is lm-eval's own command line with this model registered
(lm-eval 0.4 finds models only in its registry, with no plugin entry point):
`kvsqueeze lm-eval run --model kvsqueeze --model_args method=snapkv,ratio=0.5 --tasks ...`.

Protocol (what is compressed):

- `generate_until`: the prompt is prefilled and compressed except its last `query_tokens` tokens (default 64),
  or, with `split=TEXT`, except everything from the last occurrence of TEXT on (TEXT included: the question
  header stays with its question); a prompt without TEXT falls back to `query_tokens`. The uncompressed end
  is then fed on the compressed cache and the answer generated there (`CompressedContext.generate`). A prompt
  of at most `query_tokens` tokens has nothing to compress and is answered with the model alone.
- `loglikelihood`: the context is compressed, all of it but its last token, whose logits predict the first
  token of the continuation; the last context token and the continuation are then fed on the compressed cache
  in one forward and the continuation scored there. A context of one token has nothing to compress and is
  scored with the model alone. `loglikelihood_rolling` (perplexity tasks) is scored by lm-eval in windows of
  `max_length` tokens, each from the context its window leaves: one token for a full window, so only a last,
  shorter window has a context to compress (`kvsqueeze eval -b perplexity` compresses as the cache grows).

Decode-time methods (`phase == "decode"`, e.g. `decoding_budget`, `h2o`) keep the cache within their budget
while `generate_until` generates; nothing is compressed at prefill then. With `method=none` nothing is
evicted: the results equal lm-eval's own `hf` model (tested); `quantizer=` alone quantizes the cache.

Model arguments, besides HFLM's (`dtype`, `device`, `max_length`, ...): `pretrained` (a hub id or local folder;
`bundled`, the default, is kvsqueeze's bundled SmolLM2-135M-Instruct), `method` (a registry name, see
`kvsqueeze methods`; `none` for no eviction), `ratio` or `budget`, any setting of the method prefixed with
`method_` (`method_window_size=32`), `quantizer` (`kivi-4`, ...), `chunk_size` (chunked prefill),
`query_tokens`, `split` (`\\n` in it stands for a newline). `batch_size` must be a number.
"""

from __future__ import annotations

import inspect
import sys
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM
from tqdm import tqdm

import kvsqueeze
from kvsqueeze.layout import left_pad
from kvsqueeze.methods import UnknownMethodError, registry_name
from kvsqueeze.models import cache_argument

BUNDLED = (None, "", "bundled", "smollm2")


def build_method(name: str | None, ratio: float | None, budget: int | None, settings: dict):
    """The method an lm-eval model argument names (None for `none` / `full`), with its ratio or budget and settings."""
    if name is None or str(name).lower() in ("none", "full"):
        if ratio is not None or budget is not None or settings:
            raise ValueError("method=none compresses nothing: it takes no ratio, budget or method_ settings")
        return None
    try:
        key = registry_name(str(name))
    except UnknownMethodError as error:
        raise ValueError(f"{error} (or none)") from error
    accepted = inspect.signature(kvsqueeze.available()[key]).parameters
    kwargs = dict(settings)
    for argument, value in (("ratio", ratio), ("budget", budget)):
        if value is not None:
            if argument not in accepted:
                raise ValueError(f"{key} takes no {argument}; its settings are {', '.join(accepted)} "
                                 "(give them as method_NAME=VALUE)")
            kwargs[argument] = value
    unknown = set(kwargs) - set(accepted)
    if unknown:
        raise ValueError(f"{key} has no setting {', '.join(sorted(unknown))}; it takes {', '.join(accepted)}")
    return kvsqueeze.method(key, **kwargs)


def split_point(tokenizer, ids: list[int], marker: str) -> int | None:
    """How many leading tokens of `ids` end before the last occurrence of `marker` in their text (None: absent)."""
    at = tokenizer.decode(ids).rfind(marker)
    if at < 0:
        return None
    low, high = 0, len(ids)  # the largest k whose decoded prefix ends at or before `at`
    while low < high:
        middle = (low + high + 1) // 2
        if len(tokenizer.decode(ids[:middle])) <= at:
            low = middle
        else:
            high = middle - 1
    return low


@register_model("kvsqueeze")
class KVSqueezeLM(HFLM):
    """lm-eval's `HFLM`, with every context compressed by a kvsqueeze method (see the module's protocol)."""

    def __init__(self, pretrained: str | None = "bundled", method: str | None = None, ratio: float | None = None,
                 budget: int | None = None, quantizer: str | None = None, query_tokens: int = 64,
                 split: str | None = None, chunk_size: int | None = None, batch_size: int | str = 1, **kwargs):
        settings = {key[len("method_"):]: kwargs.pop(key) for key in list(kwargs) if key.startswith("method_")}
        self.method = build_method(method, ratio, budget, settings)
        self.quantizer = kvsqueeze.quantizer(quantizer)
        if not isinstance(query_tokens, int) or query_tokens < 1:
            raise ValueError(f"query_tokens is a number of tokens, at least 1; got {query_tokens!r}")
        if split is not None and not str(split):
            raise ValueError("split= is the text the uncompressed query starts with; got an empty string")
        if str(batch_size).startswith("auto"):
            raise ValueError("the kvsqueeze model takes a number as batch_size, not 'auto'")
        self.query_tokens, self.chunk_size = query_tokens, chunk_size
        self.split = None if split is None else str(split).replace("\\n", "\n").replace("\\t", "\t")
        if pretrained in BUNDLED:
            model, tokenizer = kvsqueeze.load()
            kwargs.pop("device", None)  # the bundled model is placed by kvsqueeze.load
            super().__init__(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, **kwargs)
        else:
            super().__init__(pretrained=pretrained, batch_size=batch_size, **kwargs)

    @property
    def prefill_method(self):
        return None if self.method is None or self.method.phase == "decode" else self.method

    @property
    def decode_method(self):
        return self.method if self.method is not None and self.method.phase == "decode" else None

    def compress(self, prefixes: list[list[int]]) -> kvsqueeze.CompressedContext:
        return kvsqueeze.compress(self.model, self.tokenizer, [torch.tensor(p) for p in prefixes], self.prefill_method,
                                  quantizer=self.quantizer, chunk_size=self.chunk_size)

    # -- loglikelihood --

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs: int | None = None):
        """(log-probability, greedy) of each continuation, scored on its compressed context (see the protocol)."""
        size = int(override_bs or self.batch_size)
        order = sorted(range(len(requests)), key=lambda i: -(len(requests[i][1]) + len(requests[i][2])))
        results: list = [None] * len(requests)
        progress = tqdm(total=len(requests), disable=disable_tqdm or self.rank != 0,
                        desc="Running loglikelihood requests (kvsqueeze)")
        for start in range(0, len(order), size):
            batch = order[start:start + size]
            for i, answer in zip(batch, self.score([requests[i][1:] for i in batch])):
                results[i] = answer
                if requests[i][0] is not None:
                    self.cache_hook.add_partial("loglikelihood", requests[i][0], answer)
                progress.update(1)
        progress.close()
        return results

    def score(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """Score each (context, continuation) pair of token ids: the context compressed but its last token."""
        prefixes, fed, continuations = [], [], []
        for context, continuation in pairs:
            if not context or not continuation:
                raise ValueError("a loglikelihood request has an empty context or continuation")
            tokens = (context + continuation)[-(self.max_length + 1):]  # truncated from the left, as HFLM does
            kept_context = len(tokens) - len(continuation)
            prefixes.append(tokens[:kept_context - 1])
            fed.append(tokens[kept_context - 1:-1])
            continuations.append(continuation)
        compressible = [i for i, prefix in enumerate(prefixes) if prefix]
        whole = [i for i, prefix in enumerate(prefixes) if not prefix]
        logits: dict[int, torch.Tensor] = {}
        if compressible:
            ctx = self.compress([prefixes[i] for i in compressible])
            logits |= dict(zip(compressible, self.logits_on(ctx, [fed[i] for i in compressible])))
        if whole:  # nothing to compress: the model alone
            logits |= dict(zip(whole, self.logits_on(None, [fed[i] for i in whole])))
        answers = []
        for i, continuation in enumerate(continuations):
            scores = F.log_softmax(logits[i], dim=-1, dtype=self.softmax_dtype)
            target = torch.tensor(continuation, device=scores.device)
            greedy = bool((scores.argmax(-1) == target).all())
            answers.append((float(scores.gather(-1, target[:, None]).sum()), greedy))
        return answers

    def logits_on(self, ctx: kvsqueeze.CompressedContext | None, rows: list[list[int]]) -> list[torch.Tensor]:
        """Each row's logits [len(row), vocab] when it is fed after its compressed context (None: no context)."""
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        ids, mask = left_pad([torch.tensor(row, dtype=torch.long) for row in rows], pad)
        kwargs = {}
        if ctx is not None:
            context_mask = torch.ones_like(ctx.context_ids) if ctx.context_mask is None else ctx.context_mask
            mask = torch.cat([context_mask.cpu(), mask], dim=1)
            kwargs[cache_argument(self.model)] = ctx.cache.fork()  # the compressed context stays as it was
        positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, -ids.shape[1]:]
        device = self.model.device
        with torch.no_grad(), kvsqueeze.attached(self.model):  # a compressed cache is read through kvsqueeze
            out = self.model(input_ids=ids.to(device), attention_mask=mask.to(device),
                             position_ids=positions.to(device), use_cache=ctx is not None, **kwargs)
        return [row_logits[ids.shape[1] - len(row):] for row_logits, row in zip(out.logits, rows)]

    # -- generate_until --

    def query_start(self, ids: list[int]) -> int:
        """Where the uncompressed end of a prompt starts: at `split`'s last occurrence, else `query_tokens` tokens
        from its end."""
        if self.split is not None:
            found = split_point(self.tokenizer, ids, self.split)
            if found is not None:
                return found
        return max(len(ids) - self.query_tokens, 0)

    def _model_generate(self, context: torch.Tensor, max_length: int, stop: list[str], **generation_kwargs):
        """Generate for a left-padded batch of prompts (as HFLM's), each compressed but its query (see the protocol).

        Returns [batch, context width + new tokens]: the prompts as given, then the new tokens, padded on the right.
        """
        mask = generation_kwargs.pop("attention_mask", None)
        mask = torch.ones_like(context) if mask is None else mask
        rows = [row[real.bool()].tolist() for row, real in zip(context.cpu(), mask.cpu())]
        starts = [self.query_start(row) for row in rows]
        kwargs = dict(generation_kwargs)
        temperature = kwargs.pop("temperature", 0.0)
        if kwargs.get("do_sample") is None:  # as HFLM: temperature 0 (the default) is greedy
            kwargs["do_sample"] = bool(temperature)
        if kwargs["do_sample"]:
            kwargs["temperature"] = temperature
        kwargs |= {"max_new_tokens": max_length - context.shape[1], "stop_strings": stop or None,
                   "tokenizer": self.tokenizer}
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        new: dict[int, list[int]] = {}
        compressible = [i for i, start in enumerate(starts) if start > 0]
        if compressible:
            ctx = self.compress([rows[i][:starts[i]] for i in compressible])
            out = ctx.generate([torch.tensor(rows[i][starts[i]:]) for i in compressible],
                               decode_method=self.decode_method, **kwargs)
            new |= {i: tokens.tolist() for i, tokens in zip(compressible, out)}
        for i in (i for i, start in enumerate(starts) if start == 0):  # nothing to compress: the model alone
            ids = torch.tensor([rows[i]], device=self.model.device)
            decoding = self.decode_method.apply(self.model) if self.decode_method is not None else nullcontext()
            with torch.no_grad(), decoding:
                out = self.model.generate(ids, attention_mask=torch.ones_like(ids), pad_token_id=pad, **kwargs)
            new[i] = out[0, ids.shape[1]:].tolist()
        width = max(len(tokens) for tokens in new.values())
        generated = torch.tensor([new[i] + [pad] * (width - len(new[i])) for i in range(len(rows))], dtype=torch.long)
        return torch.cat([context, generated.to(context.device)], dim=1)

    def get_model_info(self) -> dict:
        protocol = {"query_tokens": self.query_tokens, "split": self.split, "chunk_size": self.chunk_size}
        return super().get_model_info() | {
            "kvsqueeze_method": repr(self.method), "kvsqueeze_protocol": protocol,
            "kvsqueeze_quantizer": None if self.quantizer is None else self.quantizer.spec()}


def command_line(argv: list[str]) -> int:
    """`kvsqueeze lm-eval ARGS`: lm-eval's command line (`lm-eval ARGS`) with the "kvsqueeze" model registered."""
    from lm_eval.__main__ import cli_evaluate

    saved = sys.argv
    sys.argv = ["lm-eval", *argv]  # lm-eval's parser reads sys.argv itself
    try:
        cli_evaluate()
    except SystemExit as done:
        return done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
    finally:
        sys.argv = saved
    return 0
