"""Compress a context once, then ask it many questions; save it and load it back."""

from __future__ import annotations

import json
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from . import attention
from .cache import EvictingLayer, SlidingWindowLayer, SqueezeCache
from .hooks import attention_modules
from .methods import Method
from .prompt import Prompt

FORMAT = "kvsqueeze-context/1"


class ContextTooLongError(ValueError):
    """The context does not fit in the model's window."""


class ModelMismatchError(ValueError):
    """A saved context is loaded onto a model other than the one it was made with."""


class CorruptContextError(ValueError):
    """A saved context file cannot be read back."""


@dataclass
class CompressionStats:
    """What compression did, measured from the cache's tensors."""

    context_tokens: int
    kept_per_layer_head: list[list[int]]  # tokens held per layer and KV head (first batch row)
    bytes_held: int  # bytes held by the cache's tensors after compression
    bytes_uncompressed: int  # bytes the cache held before compression (the most each layer held)
    seconds: float  # prefill + compression, wall clock
    compressible_layers: list[int]  # layers methods act on (sliding-window layers are bounded by the model)

    @property
    def compression_ratio(self) -> float:
        """Fraction of the context's KV entries (token x KV head) removed in the compressible layers."""
        heads = [self.kept_per_layer_head[i] for i in self.compressible_layers]
        total = self.context_tokens * sum(len(h) for h in heads)
        return 1 - sum(sum(h) for h in heads) / total if total else 0.0

    @property
    def bytes_fraction(self) -> float:
        return self.bytes_held / self.bytes_uncompressed if self.bytes_uncompressed else 1.0


def model_fingerprint(model) -> dict:
    """What a saved context must agree on with the model it is loaded onto."""
    config = model.config.get_text_config()
    weights = model.get_input_embeddings().weight
    return {
        "model_type": config.model_type,
        "num_hidden_layers": config.num_hidden_layers,
        "num_key_value_heads": config.num_key_value_heads,
        "hidden_size": config.hidden_size,
        "vocab_size": config.vocab_size,
        "name_or_path": getattr(model.config, "_name_or_path", ""),
        "embedding_sample": [round(v, 4) for v in weights[:2, :8].float().flatten().tolist()],
    }


def check_fits(model, n_tokens: int) -> None:
    window = getattr(model.config.get_text_config(), "max_position_embeddings", None)
    if window is not None and n_tokens > window:
        raise ContextTooLongError(f"the context has {n_tokens} tokens, more than the model's window of {window}; "
                                  "shorten it (or use a model with a longer window)")


def chunks(n_tokens: int, chunk_size: int | None) -> list[slice]:
    """Consecutive slices of at most `chunk_size` tokens; a last chunk of one token joins the one before, so
    every forward is a multi-token (prefill) forward."""
    if chunk_size is None or chunk_size >= n_tokens:
        return [slice(0, n_tokens)]
    if chunk_size < 2:
        raise ValueError(f"chunk_size must be at least 2 tokens; got {chunk_size}")
    starts = list(range(0, n_tokens, chunk_size))
    if n_tokens - starts[-1] == 1:
        starts.pop()
    return [slice(a, b) for a, b in zip(starts, starts[1:] + [n_tokens])]


def prefill(model, ids: torch.Tensor, cache: SqueezeCache, method: Method | None, chunk_size: int | None = None,
            progress: bool = False) -> None:
    """Run the context through the model, filling `cache`; `method` compresses it layer by layer.

    With `chunk_size`, the context goes in chunks and the method compresses the running cache after each,
    so the cache never holds more than the method's budget plus one chunk.
    """
    parts = chunks(ids.shape[1], chunk_size)
    if len(parts) > 1 and method is not None and method.needs_whole_context:
        raise ValueError(f"{type(method).__name__} decides once from the whole context and cannot compress "
                         "chunk by chunk: use it without chunk_size")
    attention.install(model)
    base = model.base_model  # the decoder without the LM head: no logits are needed for the context
    with torch.no_grad(), (method.apply(model) if method is not None else nullcontext()):
        for part in tqdm(parts, desc="prefill", disable=not progress or len(parts) == 1):
            base(input_ids=ids[:, part].to(model.device), past_key_values=cache, use_cache=True)


def compress(model, tokenizer, context: str | torch.Tensor, method: Method | None = None, *,
             chunk_size: int | None = None, chat_template: bool = True, check_window: bool = True,
             progress: bool = False) -> "CompressedContext":
    """Prefill `context` and compress its cache with `method` (None keeps everything).

    `context` is text (placed in the user turn of the chat template, when the tokenizer has one) or
    token ids [1, n] used as they are. `chunk_size` prefills in chunks, compressing after each (peak
    memory bounded by the budget plus one chunk). `check_window=False` allows contexts longer than the
    model's window (for memory measurements: the model was not trained on such positions).
    """
    if not isinstance(model, PreTrainedModel):
        raise attention.UnsupportedModelError(f"kvsqueeze compresses transformers models; got {type(model).__name__}")
    attention_modules(model)  # raises if nothing can be hooked
    prompt = Prompt.for_tokenizer(tokenizer, chat_template) if tokenizer is not None else None
    if isinstance(context, str):
        if prompt is None:
            raise ValueError("a text context needs a tokenizer")
        ids = prompt.context_ids(context)
    else:
        ids = torch.as_tensor(context).reshape(1, -1)
    if ids.shape[1] == 0:
        raise ValueError("the context is empty")
    if check_window:
        check_fits(model, ids.shape[1])
    cache = SqueezeCache(model.config)
    start = time.perf_counter()
    prefill(model, ids, cache, method, chunk_size, progress)
    seconds = time.perf_counter() - start
    stats = CompressionStats(
        context_tokens=ids.shape[1],
        kept_per_layer_head=[heads[0].tolist() for heads in cache.kept_per_head()],
        bytes_held=cache.nbytes(), bytes_uncompressed=cache.peak_bytes(), seconds=seconds,
        compressible_layers=[i for i, layer in enumerate(cache.layers) if not isinstance(layer, SlidingWindowLayer)])
    return CompressedContext(model, tokenizer, cache, ids, method, prompt, stats)


class CompressedContext:
    """A compressed context: its cache, its token ids (the logical length), and the method that made it.

    Ask it questions with `ask` / `ask_many`: each question runs on a fork of the cache that shares
    its tensors, so the context is exactly as it was before every question.
    """

    def __init__(self, model, tokenizer, cache: SqueezeCache, context_ids: torch.Tensor, method: Method | None,
                 prompt: Prompt | None, stats: CompressionStats):
        self.model, self.tokenizer, self.cache = model, tokenizer, cache
        self.context_ids, self.method, self.prompt, self.stats = context_ids, method, prompt, stats

    @property
    def logical_length(self) -> int:
        return self.context_ids.shape[1]

    def nbytes(self) -> int:
        return self.cache.nbytes()

    def generate(self, question_ids: torch.Tensor, decode_method: Method | None = None,
                 **generate_kwargs) -> torch.Tensor:
        """`model.generate` on a fork of the cache; returns only the new tokens, [sequences, new].

        `decode_method` (e.g. `DecodingBudget`, `H2O`, `RollingStreamingLLM`) keeps compressing while generating.
        """
        ids = torch.cat([self.context_ids, question_ids.reshape(1, -1)], dim=1)
        check_fits(self.model, ids.shape[1])
        ids = ids.to(self.model.device)
        kwargs = {"max_new_tokens": 128, "do_sample": False}
        if self.tokenizer is not None:
            kwargs["pad_token_id"] = self.tokenizer.pad_token_id or self.tokenizer.eos_token_id
        kwargs |= generate_kwargs
        if not kwargs["do_sample"]:
            kwargs.setdefault("temperature", None)
            kwargs.setdefault("top_p", None)
            kwargs.setdefault("top_k", None)
        cache = self.cache.fork()
        # generate expands the inputs for beams and multiple sequences, but not a cache it is given
        defaults = self.model.generation_config
        expand = max(kwargs.get("num_beams", defaults.num_beams or 1),
                     kwargs.get("num_return_sequences", defaults.num_return_sequences or 1))
        if expand > 1:
            cache.batch_repeat_interleave(expand)
        attention.install(self.model)
        with torch.no_grad(), (decode_method.apply(self.model) if decode_method is not None else nullcontext()):
            out = self.model.generate(ids, attention_mask=torch.ones_like(ids), past_key_values=cache, **kwargs)
        return out[:, ids.shape[1]:]

    def ask(self, question: str, answer_prefix: str = "", decode_method: Method | None = None,
            **generate_kwargs) -> str | list[str]:
        """Answer `question` about the context (greedy, 128 new tokens unless generate kwargs say otherwise).

        Returns one string, or a list of strings when `num_return_sequences` > 1. `decode_method` keeps
        compressing while the answer is generated.
        """
        if self.prompt is None:
            raise ValueError("this context has no tokenizer: use generate() with token ids")
        new = self.generate(self.prompt.question_ids(question, answer_prefix), decode_method, **generate_kwargs)
        answers = [self.tokenizer.decode(row, skip_special_tokens=True).strip() for row in new]
        return answers if generate_kwargs.get("num_return_sequences", 1) > 1 else answers[0]

    def ask_many(self, questions: list[str], answer_prefix: str = "", decode_method: Method | None = None,
                 **generate_kwargs) -> list[str]:
        """Answer each question on the same compressed context (restored exactly between questions)."""
        return [self.ask(q, answer_prefix, decode_method, **generate_kwargs) for q in questions]

    def save(self, path: str | Path) -> None:
        """Write the cache, token ids and provenance to a safetensors file."""
        tensors = {"context_ids": self.context_ids.contiguous()}
        layers = []
        for i, layer in enumerate(self.cache.layers):
            kind = "sliding" if isinstance(layer, SlidingWindowLayer) else "evicting"
            entry = {"kind": kind, "length": layer.get_seq_length(), "peak_bytes": layer.peak_bytes}
            if kind == "sliding":
                entry["sliding_window"] = layer.sliding_window
            if layer.is_initialized:
                tensors[f"layers.{i}.keys"] = layer.keys.contiguous()
                tensors[f"layers.{i}.values"] = layer.values.contiguous()
            layers.append(entry)
        metadata = {"format": FORMAT, "model": json.dumps(model_fingerprint(self.model)),
                    "layers": json.dumps(layers), "method": repr(self.method),
                    "stats": json.dumps(asdict(self.stats))}
        save_file({k: v.cpu() for k, v in tensors.items()}, str(path), metadata=metadata)

    @classmethod
    def load(cls, path: str | Path, model, tokenizer=None, chat_template: bool = True) -> "CompressedContext":
        """Read a context saved by `save`, checking that `model` is the model it was made with."""
        try:
            from safetensors import safe_open
            with safe_open(str(path), "pt") as f:
                metadata = f.metadata() or {}
            tensors = load_file(str(path), device=str(model.device))
        except (SafetensorError, OSError, ValueError) as error:
            raise CorruptContextError(f"{path} is not a readable kvsqueeze context: {error}") from error
        if metadata.get("format") != FORMAT:
            raise CorruptContextError(f"{path} is not a kvsqueeze context (format {metadata.get('format')!r})")
        try:
            saved_model = json.loads(metadata["model"])
            layers = json.loads(metadata["layers"])
            stats = CompressionStats(**json.loads(metadata["stats"]))
            context_ids = tensors["context_ids"].cpu()
        except (KeyError, TypeError, json.JSONDecodeError) as error:
            raise CorruptContextError(f"{path} has missing or damaged metadata: {error}") from error
        current = model_fingerprint(model)
        different = [k for k in saved_model if k not in ("name_or_path", "embedding_sample")
                     and saved_model[k] != current.get(k)]
        sample_differs = not torch.allclose(torch.tensor(saved_model["embedding_sample"]),
                                            torch.tensor(current["embedding_sample"]), atol=1e-2, rtol=1e-2)
        if different or sample_differs:
            what = ", ".join(f"{k}: saved {saved_model[k]} vs {current.get(k)}" for k in different) or "weights differ"
            raise ModelMismatchError(f"{path} was made with another model ({saved_model['name_or_path']}): {what}")
        cache = SqueezeCache(layers=[cls._layer(tensors, i, entry, path) for i, entry in enumerate(layers)])
        prompt = Prompt.for_tokenizer(tokenizer, chat_template) if tokenizer is not None else None
        return cls(model, tokenizer, cache, context_ids, None, prompt, stats)

    @staticmethod
    def _layer(tensors, index, entry, path):
        layer = (SlidingWindowLayer(sliding_window=entry["sliding_window"]) if entry["kind"] == "sliding"
                 else EvictingLayer())
        keys, values = tensors.get(f"layers.{index}.keys"), tensors.get(f"layers.{index}.values")
        if keys is not None:
            if values is None or keys.shape[:-1] != values.shape[:-1] or keys.dim() != 4:
                raise CorruptContextError(f"{path}: layer {index} has inconsistent keys and values")
            layer.lazy_initialization(keys, values)
            layer.keys, layer.values = keys, values
        if entry["kind"] == "sliding":
            layer.cumulative_length = entry["length"]
        else:
            layer.seen = entry["length"]
        layer.peak_bytes = entry["peak_bytes"]
        return layer
