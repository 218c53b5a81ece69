"""Offline calibration on the user's own model: what HeadKV and DuoAttention need and nothing can download.

Both routines generate their data locally (needle-in-a-haystack samples from the bundled essays) and
return a [layers, kv_heads] table; `save_head_scores` writes it for `HeadKV(head_scores=...)` and
`DuoAttention(head_patterns=...)`. `kvsqueeze calibrate` runs them from the command line.
"""

from __future__ import annotations

import random

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from . import attention
from .cache import layer_types
from .evaluation.needle import needle_sample
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
        attention.install(self.model)

    def __exit__(self, *exc):
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
            out = model(ids, past_key_values=ctx.cache.fork(), output_attentions=True)
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
duo_gates: dict[str, torch.Tensor] = {}


def duo_mixed_attention(module, query, key, value, attention_mask, scaling=None, **kwargs):
    """Per head, gate * full attention + (1 - gate) * streaming attention (sink + recent tokens)."""
    if layer_types(module.config)[module.layer_idx] != "full_attention":
        return ALL_ATTENTION_FUNCTIONS["sdpa"](module, query, key, value, attention_mask, scaling=scaling, **kwargs)
    q_len, kv_len = query.shape[-2], key.shape[-2]
    group = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(group, 1), value.repeat_interleave(group, 1)
    rows = torch.arange(q_len, device=query.device)[:, None] + (kv_len - q_len)
    cols = torch.arange(kv_len, device=query.device)[None, :]
    causal = cols <= rows
    full = F.scaled_dot_product_attention(query, key, value, attn_mask=causal, scale=scaling)
    gates = duo_gates["gates"]
    if gates is None:
        return full.transpose(1, 2), None
    streaming_mask = causal & ((cols < duo_gates["sink"]) | (rows - cols < duo_gates["recent"]))
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
    types = layer_types(model.config)
    if DUO_IMPLEMENTATION not in ALL_ATTENTION_FUNCTIONS:
        AttentionInterface.register(DUO_IMPLEMENTATION, duo_mixed_attention)
        ALL_MASK_ATTENTION_FUNCTIONS.register(DUO_IMPLEMENTATION, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
    gates = torch.ones(config.num_hidden_layers, config.num_key_value_heads, requires_grad=True)
    optimiser = torch.optim.AdamW([gates], lr=lr, weight_decay=0.0)
    previous = model.config._attn_implementation
    trainable = [p for p in model.parameters() if p.requires_grad]
    for p in trainable:
        p.requires_grad_(False)
    prompt, rng = Prompt.for_tokenizer(tokenizer), random.Random(seed)
    duo_gates.update(sink=sink_size, recent=recent_size)
    try:
        for step in tqdm(range(steps), desc="DuoAttention gates", disable=not progress):
            sample = needle_sample(tokenizer, tokens, rng.uniform(0.05, 0.95), seed=seed + step)
            answer = tokenizer(sample.answer, add_special_tokens=False, return_tensors="pt").input_ids
            ids = torch.cat([prompt.context_ids(sample.context), prompt.question_ids(sample.question), answer], 1)
            ids = ids.to(model.device)
            targets = torch.arange(ids.shape[1] - answer.shape[1] - 1, ids.shape[1] - 1)
            model.set_attn_implementation(DUO_IMPLEMENTATION)
            with torch.no_grad():
                duo_gates["gates"] = None
                reference = model.base_model(input_ids=ids).last_hidden_state[:, targets]
            duo_gates["gates"] = gates
            with torch.enable_grad():
                mixed = model.base_model(input_ids=ids).last_hidden_state[:, targets]
                full_layers = torch.tensor([t == "full_attention" for t in types])
                loss = (mixed - reference).pow(2).mean() + regularization * gates[full_layers].mean()
                optimiser.zero_grad()
                loss.backward()
            optimiser.step()
            with torch.no_grad():
                gates.clamp_(0, 1)
    finally:
        duo_gates["gates"] = None
        model.set_attn_implementation(previous)
        for p in trainable:
            p.requires_grad_(True)
    return gates.detach()
