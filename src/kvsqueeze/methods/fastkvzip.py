from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F
from tqdm.auto import tqdm

from ..context import LayerContext
from .base import Budgeted
from .kvzap import default_texts, kvzip_targets, read_module, save_module
from .kvzip import select

FORMAT = "kvsqueeze-fastkvzip/1"
LONG_CONTEXT = 32000  # from this length on, the window is `window_size` tokens rather than `window_ratio` (kvpress)


class Gate(nn.Module):
    """One layer's gate: the score in (0, 1) of a token's KV pair in each KV head, read from its hidden state alone.

    Low-rank sink attention: the token gives one key (`dim` channels, RMS-normed) per KV head and one query per
    query head of the group; each query's softmax runs over the token's key (plus a learned bias) and `sinks`
    learned keys, and the score is the token's probability, averaged over the group."""

    def __init__(self, hidden_size: int, kv_heads: int, group: int, dim: int = 16, sinks: int = 16):
        super().__init__()
        if sinks < 1:
            raise ValueError(f"a FastKVzip gate needs at least one sink key; got {sinks}")
        self.kv_heads, self.group, self.dim = kv_heads, group, dim
        self.q_proj = nn.Linear(hidden_size, kv_heads * group * dim)
        self.k_proj = nn.Linear(hidden_size, kv_heads * dim, bias=False)
        self.q_norm, self.k_norm = nn.RMSNorm(dim, eps=1e-6), nn.RMSNorm(dim, eps=1e-6)
        self.sink_keys = nn.Parameter(torch.zeros(kv_heads, sinks, dim))
        self.bias = nn.Parameter(torch.zeros(kv_heads, group))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Scores [batch, kv_heads, tokens] of hidden states [batch, tokens, hidden]."""
        batch, n, _ = hidden_states.shape
        queries = self.q_norm(self.q_proj(hidden_states).view(batch, n, self.kv_heads, self.group, self.dim))
        keys = self.k_norm(self.k_proj(hidden_states).view(batch, n, self.kv_heads, self.dim))
        scale = self.dim ** -0.5
        own = torch.einsum("bnhgd,bnhd->bhgn", queries, keys) * scale + self.bias[None, :, :, None]
        sinks = torch.einsum("bnhgd,hsd->bhgns", queries, self.sink_keys) * scale
        # exp(own) / (exp(own) + sum_s exp(sink_s))
        return torch.sigmoid(own - sinks.logsumexp(-1)).mean(2)


class Gates(nn.Module):
    """FastKVzip's gates, one per layer of a model, with their file format."""

    def __init__(self, n_layers: int, hidden_size: int, kv_heads: int, group: int, dim: int = 16, sinks: int = 16):
        super().__init__()
        self.shape, self.dim, self.sinks = (n_layers, hidden_size, kv_heads, group), dim, sinks
        self.layers = nn.ModuleList(Gate(hidden_size, kv_heads, group, dim, sinks) for _ in range(n_layers))

    @classmethod
    def for_model(cls, model, dim: int = 16, sinks: int = 16, seed: int = 0) -> "Gates":
        """Untrained gates shaped for `model` (random projections, zero sink keys and biases)."""
        torch.manual_seed(seed)
        return cls(*model_shape(model), dim, sinks)

    def forward(self, layer: int, hidden_states: torch.Tensor) -> torch.Tensor:
        gate = self.layers[layer]
        weight = gate.q_proj.weight
        return gate(hidden_states.to(weight.device, weight.dtype)).float()

    def save(self, path: str | Path, model=None) -> None:
        save_module(self, path, FORMAT, model, {"shape": ",".join(map(str, self.shape)), "dim": str(self.dim),
                                                "sinks": str(self.sinks)})

    @classmethod
    def load(cls, path: str | Path) -> "Gates":
        tensors, metadata = read_module(path, FORMAT, "FastKVzip gate", "kvsqueeze.methods.fastkvzip.train_gates")
        gates = cls(*map(int, metadata["shape"].split(",")), int(metadata["dim"]), int(metadata["sinks"]))
        gates.load_state_dict(tensors)
        return gates.eval()


def model_shape(model) -> tuple[int, int, int, int]:
    """(layers, hidden size, KV heads, query heads per KV head): what a model's gates are shaped by."""
    config = model.config.get_text_config()
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    return config.num_hidden_layers, config.hidden_size, kv_heads, heads // kv_heads


class FastKVzip(Budgeted):
    """Keeps the KV pairs that small trained gates, reading each token's hidden state, predict KVzip would keep.

    Kim, Han and Yun, "Fast KVzip: Efficient and Accurate LLM Inference with Gated KV Eviction",
    arXiv:2601.17668. Each attention layer has a gate (low-rank sink attention: the token's own key
    and queries, 16 channels, against 16 learned sink keys) trained offline on the frozen model by
    `train_gates` to predict KVzip's scores (the most attention a KV pair gets when the model repeats
    the context); it scores every token during the prefill, without extra forwards. The first `n_sink`
    tokens (4, as kvpress; the authors keep the system prompt) and a recent window (the last 2% of the
    context, `window_size` 4096 tokens from 32k tokens on, as kvpress) are always kept. `level="pair"` (the paper's default, as KVzip) keeps the
    highest scores over all layers and heads (heads ragged), "layer" shares each layer's budget among
    its heads, "head" keeps as many in every head. `gates` is the file `train_gates` saved (or `Gates`).
    The whole context is scored before anything is evicted, as kvpress does; the authors' chunked
    prefill and decode-time eviction are not reproduced.
    """

    name = "fastkvzip"
    calibration = "fastkvzip"  # train_gates
    declares = frozenset({"whole_context"})  # selection over all layers: the scores of earlier chunks' tokens are not kept

    gates: "str | Path | Gates | None" = None
    level: str = "pair"
    n_sink: int = 4
    window_ratio: float = 0.02
    window_size: int = 4096

    def __post_init__(self):
        super().__post_init__()
        if self.gates is None:
            raise ValueError("FastKVzip needs gates trained on your model: gates=FILE from "
                             "kvsqueeze.methods.fastkvzip.train_gates(model, tokenizer, out=FILE)")
        if self.level not in ("pair", "layer", "head"):
            raise ValueError(f"level is 'pair', 'layer' or 'head'; got {self.level!r}")
        # this prefill's scores and real tokens (not padding), per layer, until the last layer has been seen
        self.scores: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def setup(self, model):
        self.trained = self.gates if isinstance(self.gates, Gates) else Gates.load(self.gates)
        if self.trained.shape != model_shape(model):
            raise ValueError(f"these FastKVzip gates were made for {self.trained.shape} (layers, hidden size, KV heads, "
                             f"group), not this model's {model_shape(model)}: train gates with train_gates")
        self.scores = {}

    def window(self, seen: int) -> int:
        return int(self.window_ratio * seen) if seen < LONG_CONTEXT else self.window_size

    def compress(self, ctx: LayerContext) -> None:
        if ctx.n_stored != ctx.n_new:
            raise ValueError("FastKVzip scores the tokens of the forward that adds them: compress the whole "
                             "context at once")
        seen = ctx.row_lengths.tolist()
        if all(self.allocation.n_keep(n) >= n for n in seen):
            return  # nothing to evict: ratio 0 reproduces the model exactly
        scores = self.trained(ctx.layer_idx, ctx.hidden_states).to(ctx.keys.device)
        rank = ctx.rank  # position among the row's real tokens, -1 for padding
        recent = torch.tensor([n - self.window(n) for n in seen], device=rank.device)[:, None, None]
        protected = (rank >= 0) & ((rank < self.n_sink) | (rank >= recent))
        scores = scores.masked_fill(protected, float("inf")).masked_fill(rank < 0, float("-inf"))
        self.scores[ctx.layer_idx] = scores, rank >= 0
        index, n_layers = ctx.depth
        if index == n_layers - 1:  # every layer is scored: choose over all of them
            layers = sorted(self.scores)
            scores, real = zip(*(self.scores.pop(i) for i in layers))
            totals = torch.tensor([self.allocation.n_keep(n) * scores[0].shape[1] * len(layers) for n in seen])
            for i, keep, then in zip(layers, select(list(scores), totals, self.level, self.allocation, seen), real):
                now = ctx.cache.layers[i].dense_view()[2]
                if now is not None:  # quantized since it was scored: the same real tokens, laid out anew
                    keep = torch.zeros_like(now).masked_scatter_(now, keep[then])
                ctx.cache.keep(i, keep)


def train_gates(model, tokenizer, texts: list[str] | None = None, out: str | Path | None = None, dim: int = 16,
                sinks: int = 16, samples: int = 16, tokens: int = 2000, steps: int = 5000, batch_size: int = 1000,
                lr: float = 0.2, momentum: float = 0.9, seed: int = 0, progress: bool = True) -> Gates:
    """Train FastKVzip's gates on `model`, offline (the model stays frozen); save them to `out` when given.

    Targets are the KVzip scores of the tokens of `texts` (default: `samples` pieces of `tokens` tokens of
    the bundled essays), from KVzip's reconstruction on the full cache; inputs are the hidden states the
    attention layers read. Every gate is fitted to its layer by binary cross-entropy (mean over tokens,
    summed over heads) with SGD, momentum 0.9, lr 0.2, 5000 steps of 1000 tokens, the rate warmed up over
    the first 1% of steps and halved at 50% and 75%: the authors' settings. They trained on 34 FineWeb-Edu
    texts of about 10k tokens; the default here is smaller, since every layer's hidden states are held
    in memory (tokens x layers x hidden size floats).
    """
    if texts is None:
        texts = default_texts(tokenizer, samples, tokens)
    data = kvzip_targets(model, tokenizer, texts, plus=False, progress=progress)
    gates = Gates.for_model(model, dim, sinks, seed)
    for layer, (x, scores) in tqdm(data.items(), desc="FastKVzip gates", disable=not progress):
        fit_gate(gates.layers[layer], x, scores.clamp(0, 1), steps, batch_size, lr, momentum, seed)
    gates.eval()
    if out is not None:
        gates.save(out, model)
    return gates


def fit_gate(gate: Gate, x: torch.Tensor, y: torch.Tensor, steps: int, batch_size: int, lr: float, momentum: float,
             seed: int) -> None:
    """Fit `gate` to targets y [n, kv_heads] in [0, 1] from hidden states x [n, hidden], in random batches."""
    generator = torch.Generator().manual_seed(seed)
    optimiser = torch.optim.SGD(gate.parameters(), lr=lr, momentum=momentum)
    warmup = max(steps // 100, 1)
    batches: list[torch.Tensor] = []
    with torch.enable_grad():
        for step in range(steps):
            if not batches:
                batches = list(torch.randperm(len(x), generator=generator).split(batch_size))
            batch = batches.pop(0)
            rate = min(1.0, (step + 1) / warmup) * (1.0 if step < steps / 2 else 0.5 if step < 0.75 * steps else 0.25)
            for group in optimiser.param_groups:
                group["lr"] = lr * rate
            scores = gate(x[batch][None])[0]  # [kv_heads, batch]
            loss = F.binary_cross_entropy(scores, y[batch].T, reduction="none").mean(-1).sum()
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
