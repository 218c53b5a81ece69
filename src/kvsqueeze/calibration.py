"""Offline calibration on the user's own model: what HeadKV, DuoAttention, QFilter and ExpectedAttention's
collected statistics need and nothing can download.

HeadKV's and DuoAttention's routines generate needle-in-a-haystack samples from the bundled essays and
return a [layers, kv_heads] table; `save_head_scores` writes it for `HeadKV(head_scores=...)` and
`DuoAttention(head_patterns=...)`. The query-statistics routines (Q-Filters, ExpectedAttention's mean and
covariance) read local text (the bundled essays by default); `save_calibration` writes their tensors as a
safetensors file for `QFilter(filters=...)` and `ExpectedAttention(stats=...)`. `kvsqueeze calibrate` runs
them all from the command line.
"""

from __future__ import annotations

import json
import random
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .cache import compressible_layers
from .context import LayerContext
from .evaluation.needle import haystack, needle_sample
from .hooks import attach, detach, observing
from .models import cache_argument, frozen
from .pipeline import compress
from .prompt import Prompt


def needle_token_span(tokenizer, prompt: Prompt, context: str, needle: str) -> torch.Tensor:
    """Token positions (in the compressed context's ids) covered by the needle sentence."""
    text = prompt.prefix + context if prompt.templated else context
    start = text.index(needle)
    offsets = tokenizer(text, add_special_tokens=not prompt.templated, return_offsets_mapping=True)["offset_mapping"]
    return torch.tensor([i for i, (a, b) in enumerate(offsets) if a < start + len(needle) and b > start])


class eager_attention:
    """Temporarily run the model with eager attention (attention weights are needed)."""

    def __init__(self, model):
        self.model = model

    def __enter__(self):
        self.previous = self.model.config._attn_implementation
        self.model.set_attn_implementation("eager")
        attach(self.model)  # the model reads kvsqueeze caches through kvsqueeze's attention, wrapping eager

    def __exit__(self, *exc):
        detach(self.model)
        self.model.set_attn_implementation(self.previous)


def retrieval_head_scores(model, tokenizer, samples: int = 8, lengths=(1000, 2000), seed: int = 0,
                          progress: bool = True) -> torch.Tensor:
    """HeadKV's retrieval-reasoning head scores, [layers, kv_heads].

    For needle samples the model answers correctly with its full cache, every answer token is decoded
    again with eager attention; a head scores the attention weight it puts on the needle among its
    top-k attended context tokens (k = the needle's length in tokens), averaged over answer tokens
    and samples (Fu et al., arXiv:2410.19258, after the retrieval heads of Wu et al., arXiv:2404.15574).
    Query heads are averaged per KV head, which is what the cache is made of.
    """
    config = model.config.get_text_config()
    totals = torch.zeros(config.num_hidden_layers, config.num_attention_heads)
    used = 0
    with eager_attention(model), torch.no_grad():
        for i in tqdm(range(samples), desc="retrieval head scores", disable=not progress):
            sample = needle_sample(tokenizer, lengths[i % len(lengths)], (i + 0.5) / samples, seed=seed + i)
            ctx = compress(model, tokenizer, sample.context)
            question = ctx.prompt.question_ids(sample.question)
            answer = ctx.generate(question, max_new_tokens=32)[0]
            if not sample.correct(tokenizer.decode(answer, skip_special_tokens=True)):
                continue
            span = needle_token_span(tokenizer, ctx.prompt, sample.context, sample.needle)
            ids = torch.cat([question[0], answer]).to(model.device)[None]
            out = model(ids, **{cache_argument(model): ctx.cache.fork()}, output_attentions=True)
            n_context, rows = ctx.logical_length, torch.arange(question.shape[1] - 1, ids.shape[1] - 1)
            for layer, weights in enumerate(out.attentions):
                on_context = weights[0][:, rows, :n_context].float()  # [heads, answer tokens, context]
                top = on_context.topk(min(len(span), n_context), dim=-1)
                in_span = torch.isin(top.indices, span.to(top.indices.device))
                totals[layer] += (top.values * in_span).sum(-1).mean(-1).cpu()
            used += 1
    if used == 0:
        raise RuntimeError("the model answered no calibration sample correctly: use shorter lengths")
    scores = totals / used
    return scores.view(config.num_hidden_layers, config.num_key_value_heads, -1).mean(-1)


DUO_IMPLEMENTATION = "kvsqueeze_duo_calibration"


@dataclass
class DuoGates:
    """What DuoAttention's training attention mixes with: the gates [layers, kv_heads] (None: full attention) and
    the streaming heads' window."""

    gates: torch.Tensor | None
    sink: int
    recent: int
    full_layers: list[int]


_duo_gates: ContextVar[DuoGates | None] = ContextVar("kvsqueeze_duo_gates", default=None)


def duo_mixed_attention(module, query, key, value, attention_mask, scaling=None, **kwargs):
    """Per head, gate * full attention + (1 - gate) * streaming attention (sink + recent tokens)."""
    duo = _duo_gates.get()
    if duo is None or module.layer_idx not in duo.full_layers:
        return ALL_ATTENTION_FUNCTIONS["sdpa"](module, query, key, value, attention_mask, scaling=scaling, **kwargs)
    q_len, kv_len = query.shape[-2], key.shape[-2]
    group = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(group, 1), value.repeat_interleave(group, 1)
    rows = torch.arange(q_len, device=query.device)[:, None] + (kv_len - q_len)
    cols = torch.arange(kv_len, device=query.device)[None, :]
    causal = cols <= rows
    full = F.scaled_dot_product_attention(query, key, value, attn_mask=causal, scale=scaling)
    gates = duo.gates
    if gates is None:
        return full.transpose(1, 2), None
    streaming_mask = causal & ((cols < duo.sink) | (rows - cols < duo.recent))
    streaming = F.scaled_dot_product_attention(query, key, value, attn_mask=streaming_mask, scale=scaling)
    gate = gates[module.layer_idx].repeat_interleave(group)[None, :, None, None]
    return (gate * full + (1 - gate) * streaming).transpose(1, 2), None


def duo_attention_gates(model, tokenizer, steps: int = 40, tokens: int = 1200, sink_size: int = 64,
                        recent_size: int = 256, lr: float = 0.02, regularization: float = 0.05, seed: int = 0,
                        progress: bool = True) -> torch.Tensor:
    """DuoAttention's head gates, [layers, kv_heads], optimised on local passkey-style samples.

    Each KV head gets a gate in [0, 1] mixing full attention with streaming attention (the first
    `sink_size` and last `recent_size` tokens). The gates minimise the squared distance between the
    final hidden states of the gated model and the full model at the answer tokens, plus
    `regularization` * mean(gate), with AdamW at lr 0.02 (Xiao et al., arXiv:2410.10819, which trains
    2000 steps on up to 32k-token contexts on GPUs; the defaults here fit a CPU). Heads that keep a
    high gate need the whole context: retrieval heads.
    """
    config = model.config.get_text_config()
    full_layers = compressible_layers(model.config)
    if DUO_IMPLEMENTATION not in ALL_ATTENTION_FUNCTIONS:
        AttentionInterface.register(DUO_IMPLEMENTATION, duo_mixed_attention)
        ALL_MASK_ATTENTION_FUNCTIONS.register(DUO_IMPLEMENTATION, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
    gates = torch.ones(config.num_hidden_layers, config.num_key_value_heads, requires_grad=True)
    optimiser = torch.optim.AdamW([gates], lr=lr, weight_decay=0.0)
    previous = model.config._attn_implementation
    prompt, rng = Prompt.for_tokenizer(tokenizer), random.Random(seed)
    duo = DuoGates(None, sink_size, recent_size, full_layers)
    token = _duo_gates.set(duo)
    try:
        model.set_attn_implementation(DUO_IMPLEMENTATION)
        with frozen(model):
            for step in tqdm(range(steps), desc="DuoAttention gates", disable=not progress):
                sample = needle_sample(tokenizer, tokens, rng.uniform(0.05, 0.95), seed=seed + step)
                answer = tokenizer(sample.answer, add_special_tokens=False, return_tensors="pt").input_ids
                ids = torch.cat([prompt.context_ids(sample.context), prompt.question_ids(sample.question), answer], 1)
                ids = ids.to(model.device)
                targets = torch.arange(ids.shape[1] - answer.shape[1] - 1, ids.shape[1] - 1)
                with torch.no_grad():
                    duo.gates = None
                    reference = model.base_model(input_ids=ids).last_hidden_state[:, targets]
                duo.gates = gates
                with torch.enable_grad():
                    mixed = model.base_model(input_ids=ids).last_hidden_state[:, targets]
                    loss = (mixed - reference).pow(2).mean() + regularization * gates[duo.full_layers].mean()
                    optimiser.zero_grad()
                    loss.backward()
                optimiser.step()
                with torch.no_grad():
                    gates.clamp_(0, 1)
    finally:
        _duo_gates.reset(token)
        model.set_attn_implementation(previous)
    return gates.detach()


# Query statistics for Q-Filters and ExpectedAttention, saved as safetensors.

CALIBRATION_FORMAT = "kvsqueeze-calibration/1"


def head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def calibration_ids(tokenizer, samples: int, tokens: int, text: str | None = None, seed: int = 0) -> list[torch.Tensor]:
    """Up to `samples` consecutive pieces of `tokens` token ids [1, tokens] of `text` (default: the bundled essays)."""
    if text is None:
        text = "\n\n".join(haystack(tokenizer, (samples + 1) * tokens, seed=seed))
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids[0]
    if len(ids) < tokens:
        raise ValueError(f"the calibration text has {len(ids)} tokens, fewer than one sample of {tokens}")
    return [ids[i * tokens:(i + 1) * tokens][None] for i in range(min(samples, len(ids) // tokens))]


class QueryMoments:
    """Observes (see `hooks.observing`): sums, per compressible layer and query head, the queries of every forward and
    their outer products, post-RoPE as attention saw them or pre-RoPE, the first `skip` tokens of a forward left out."""

    def __init__(self, pre_rope: bool, skip: int = 0):
        self.pre_rope, self.skip = pre_rope, skip
        self.count: dict[int, int] = {}
        self.sum: dict[int, torch.Tensor] = {}
        self.outer: dict[int, torch.Tensor] = {}

    def __call__(self, ctx: LayerContext) -> None:
        queries = (ctx.rope.queries if self.pre_rope else ctx.queries)[0, :, self.skip:].double()  # [heads, n, d]
        i = ctx.layer_idx
        self.count[i] = self.count.get(i, 0) + queries.shape[1]
        self.sum[i] = self.sum.get(i, 0) + queries.sum(1).cpu()
        self.outer[i] = self.outer.get(i, 0) + (queries.transpose(-1, -2) @ queries).cpu()


def query_moments(model, tokenizer, pre_rope: bool, samples: int, tokens: int, text: str | None, seed: int,
                  skip: int = 0, progress: bool = True) -> QueryMoments:
    moments = QueryMoments(pre_rope, skip)
    with observing(model, moments), torch.no_grad():
        for ids in tqdm(calibration_ids(tokenizer, samples, tokens, text, seed), desc="query statistics",
                        disable=not progress):
            model(ids.to(model.device), use_cache=True)
    if not moments.count:
        raise RuntimeError("no layer of the model was observed: it has no compressible (full attention) layer")
    return moments


def qfilter_filters(model, tokenizer, samples: int = 12, tokens: int = 1500, text: str | None = None, seed: int = 0,
                    progress: bool = True) -> torch.Tensor:
    """Q-Filters of `model`, [layers, kv_heads, head_dim], from its queries on local text.

    Per layer and KV head, the filter is the first right singular vector of the matrix of the queries of the
    query heads that share the KV head (post-RoPE, as attention sees them, so that it applies to the stored
    post-RoPE keys), signed so that the queries' mean projection on it is positive: a key with a higher
    projection then gets, on average, a higher attention logit (Godey et al., arXiv:2503.02812).
    Layers that are never compressed (sliding-window) get a zero filter. On the bundled SmolLM2 (4 x 1000
    tokens of essays, scored on another document), keeping the half of the keys that project highest keeps
    93% of the attention mass of the last 256 queries; filters from pre-RoPE queries keep 87%, the opposite
    sign 7%.
    """
    moments = query_moments(model, tokenizer, False, samples, tokens, text, seed, progress=progress)
    config = model.config.get_text_config()
    kv_heads, dim = config.num_key_value_heads, head_dim(config)
    filters = torch.zeros(config.num_hidden_layers, kv_heads, dim)
    for layer, outer in moments.outer.items():
        gram = outer.view(kv_heads, -1, dim, dim).sum(1)  # Q^T Q of the stacked queries of each KV head's group
        direction = torch.linalg.eigh(gram).eigenvectors[..., -1]  # [kv_heads, dim]
        mean_projection = (moments.sum[layer].view(kv_heads, -1, dim).sum(1) * direction).sum(-1)
        filters[layer] = (direction * torch.where(mean_projection < 0, -1.0, 1.0)[:, None]).float()
    return filters


def expected_attention_statistics(model, tokenizer, samples: int = 12, tokens: int = 1500, n_sink: int = 4,
                                  text: str | None = None, seed: int = 0, progress: bool = True) -> dict:
    """ExpectedAttention's query statistics of `model` on local text: {"mean": [layers, heads, head_dim],
    "covariance": [layers, heads, head_dim, head_dim]} of the pre-RoPE queries (after any query norm), the first
    `n_sink` tokens of every sample left out, covariance unbiased, as kvpress's expected_attention_with_stats
    collects them. Layers that are never compressed get zeros."""
    moments = query_moments(model, tokenizer, True, samples, tokens, text, seed, skip=n_sink, progress=progress)
    config = model.config.get_text_config()
    heads, dim = config.num_attention_heads, head_dim(config)
    mean = torch.zeros(config.num_hidden_layers, heads, dim)
    covariance = torch.zeros(config.num_hidden_layers, heads, dim, dim)
    for layer, outer in moments.outer.items():
        n = moments.count[layer]
        mu = moments.sum[layer] / n
        mean[layer] = mu.float()
        covariance[layer] = ((outer - n * mu[..., :, None] * mu[..., None, :]) / max(n - 1, 1)).float()
    return {"mean": mean, "covariance": covariance}


def calibration_shapes(kind: str, model) -> dict[str, tuple[int, ...]]:
    """The tensors a calibration file of `kind` holds for `model`, with their shapes."""
    config = model.config.get_text_config()
    layers, dim = config.num_hidden_layers, head_dim(config)
    if kind == "qfilter":
        return {"filters": (layers, config.num_key_value_heads, dim)}
    if kind == "expected_attention":
        return {"mean": (layers, config.num_attention_heads, dim),
                "covariance": (layers, config.num_attention_heads, dim, dim)}
    raise ValueError(f"no calibration file kind {kind!r}")


def save_calibration(path: str | Path, kind: str, tensors: dict[str, torch.Tensor], model,
                     settings: dict | None = None) -> None:
    """Write calibration tensors made on `model` as a safetensors file, with what they are in its metadata."""
    metadata = {"format": CALIBRATION_FORMAT, "kind": kind, "model": str(getattr(model.config, "_name_or_path", "")),
                "settings": json.dumps(settings or {})}
    save_file({name: t.detach().float().cpu().contiguous() for name, t in tensors.items()}, str(path), metadata)


def read_calibration(path: str | Path, kind: str, how: str, what: str | None = None) -> tuple[dict, dict]:
    """(tensors, settings) of a file `save_calibration` wrote with `kind`; every error ends with `how` to make one
    (`what` names the kind in them)."""
    path, what = Path(path), what or kind
    if not path.is_file():
        raise FileNotFoundError(f"no {what} calibration file at {path}; {how}")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except (SafetensorError, OSError, ValueError) as error:
        raise ValueError(f"{path} is not a readable kvsqueeze calibration file ({error}); {how}")
    if metadata.get("format") != CALIBRATION_FORMAT:
        raise ValueError(f"{path} is not a kvsqueeze calibration file; {how}")
    if metadata.get("kind") != kind:
        raise ValueError(f"{path} holds {metadata.get('kind')} calibration, not {what}; {how}")
    return tensors, json.loads(metadata.get("settings", "{}"))


def load_calibration(source, kind: str, model) -> dict[str, torch.Tensor]:
    """The tensors of a file written by `save_calibration` (or given as a dict), checked against `model`."""
    command = f"`kvsqueeze calibrate {kind} --out FILE`"
    if isinstance(source, dict):
        tensors = {name: torch.as_tensor(t, dtype=torch.float32) for name, t in source.items()}
    else:
        tensors, _ = read_calibration(source, kind, f"make one with {command}")
    for name, shape in calibration_shapes(kind, model).items():
        if name not in tensors:
            raise ValueError(f"the {kind} calibration has no {name!r} tensor; make it with {command}")
        if tuple(tensors[name].shape) != shape:
            raise ValueError(f"the {kind} calibration's {name} has shape {tuple(tensors[name].shape)}, but this model "
                             f"needs {shape}: it was made for another model; make one with {command}")
    return tensors
