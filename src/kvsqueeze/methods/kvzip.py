import torch

from ..budgets import Uniform, top_k_per_head
from ..context import LayerContext
from ..hooks import applied
from ..models import cache_argument
from .base import Budgeted
from .reconstruction import Reconstruction, attention_to

REPEAT_FIRST = "\n\nRepeat the previous context exactly."
REPEAT_NEXT = "\n\nRepeat the part of the previous context exactly, starting with"


def appended(attention_mask: torch.Tensor, n: int, start: "int | torch.Tensor") -> dict:
    """The forward arguments for `n` tokens after a cache whose left padding `attention_mask` marks: the mask
    extended over them, their positions from `start` (one for all rows, or [batch, 1]) on."""
    ones = attention_mask.new_ones(attention_mask.shape[0], n)
    return {"attention_mask": torch.cat([attention_mask, ones], 1),
            "position_ids": start + torch.arange(n, device=attention_mask.device)[None]}


def observe(model, cache, ids: torch.Tensor, callback, attention_mask=None, start: int = 0,
            attention: "Reconstruction | None" = None) -> None:
    """Run `ids` [1, q] after what `cache` holds, on a fork of it (the cache is left as it was), calling
    `callback(ctx)` after each compressible attention layer. `start`: the position of the first new token;
    `attention_mask` marks the cache's left padding (then extended over the new tokens); `attention`: the
    forward's attention on dense layers (a `Reconstruction`, which records what `attention_to` needs)."""
    extra = {} if attention_mask is None else appended(attention_mask.to(model.device), ids.shape[1], start)
    with applied(model, attention, callback):
        model.base_model(input_ids=ids.to(model.device), **{cache_argument(model): cache.fork()}, use_cache=True, **extra)


def rows(cache, ids: torch.Tensor, attention_mask: torch.Tensor | None):
    """For each batch row: (row, a fork of the cache holding that row only, its real ids, its padding mask or None)."""
    for b in range(ids.shape[0]):
        fork = cache.fork()
        if ids.shape[0] > 1:
            for layer in fork.layers:
                layer.batch_select_indices(torch.tensor([b]))
        mask = None if attention_mask is None else attention_mask[b:b + 1]
        real = ids[b] if mask is None else ids[b][mask[0].bool().cpu()]
        yield b, fork, real, None if mask is None or bool(mask.all()) else mask


def eviction_plan(cache, ids: torch.Tensor, budget) -> tuple[list[int], list[int]] | None:
    """(the compressible layers, each row's real length) when `budget` evicts something from the prefilled context;
    None when it keeps everything (then no extra forward runs, and the model is reproduced exactly)."""
    layers = cache.compressible
    if not layers:
        return None
    seen = cache.layers[layers[0]].row_lengths(ids.shape[0]).tolist()
    return None if all(budget.n_keep(n) >= n for n in seen) else (layers, seen)


class ReplayMethod(Budgeted):
    """A method that decides once the whole context is prefilled, from extra forwards over it (KVzip, KVCompose):
    nothing during the prefill, then `decide` evicts, unless the budget keeps everything (no extra forward)."""

    declares = frozenset({"whole_context", "changes_prefill", "after_prefill"})
    extra_work = ("second_forward",)

    def acts_on(self, ctx):
        return False

    def after_prefill(self, model, cache, ids, attention_mask=None, prompt=None):
        plan = eviction_plan(cache, ids, self.allocation)
        if plan is not None:
            self.decide(model, cache, ids, attention_mask, prompt, *plan)

    def decide(self, model, cache, ids, attention_mask, prompt, layers: list[int], seen: list[int]) -> None:
        raise NotImplementedError


def real_positions(ctx: LayerContext) -> torch.Tensor:
    """Stored positions of the context's real tokens (the stored tokens before this forward's), in order."""
    n_context = ctx.n_stored - ctx.n_new
    if ctx.real is None:
        return torch.arange(n_context, device=ctx.keys.device)
    return ctx.real[0, 0, :n_context].nonzero()[:, 0]  # every head holds the same tokens before compression


def output_norms(ctx: LayerContext, positions: torch.Tensor) -> torch.Tensor:
    """[batch, heads, len(positions)]: ||W_o,h v|| of the stored values at `positions`, for each query head h:
    how much a token's value can move the residual stream through that head (KVzip+)."""
    o_proj = getattr(ctx.module, "o_proj", None)
    if o_proj is None:
        raise ValueError(f"{type(ctx.module).__name__} has no o_proj: KVzip+ normalisation needs the output projection")
    heads = ctx.queries.shape[1]
    weight = o_proj.weight.float().view(o_proj.weight.shape[0], heads, -1)  # [hidden, heads, head_dim]
    values = ctx.values[:, :, positions].float().repeat_interleave(ctx.group_size, 1)
    return torch.einsum("bhnd,ehd->bhne", values, weight).norm(dim=-1)


def sink_length(prompt, ids: torch.Tensor, n_sink: int) -> int:
    """Leading tokens that are always kept: the chat template's header (system prompt, user turn start) when the
    context starts with it, and at least `n_sink`."""
    header = 0
    if prompt is not None and prompt.templated:
        prefix = prompt.tokenizer(prompt.prefix, add_special_tokens=False, return_tensors="pt").input_ids[0]
        if len(prefix) <= len(ids) and torch.equal(ids[:len(prefix)].cpu(), prefix):
            header = len(prefix)
    return min(max(n_sink, header), len(ids))


def repeat_inputs(prompt, ids: torch.Tensor, sink: int, chunk_size: int, overlap: int
                  ) -> list[tuple[int, int, torch.Tensor]]:
    """KVzip's reconstruction inputs: (start, end, input ids [1, q]) per chunk of the context after the sinks; the
    input asks to repeat the context (from the last `overlap` tokens of the previous chunk) and then repeats the
    chunk, teacher-forced. Without a tokenizer (bare ids), the input is the chunk alone."""
    tokenizer = None if prompt is None else prompt.tokenizer
    encode = lambda text: tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids[0]
    suffix = None if tokenizer is None else encode(prompt.suffix if prompt.templated else "\n")
    inputs = []
    for start in range(sink, len(ids), chunk_size):
        end = min(start + chunk_size, len(ids))
        chunk = ids[start:end].cpu()
        if tokenizer is None:
            parts = [chunk]
        elif start == sink:
            parts = [encode(REPEAT_FIRST), suffix, chunk]
        else:
            parts = [encode(REPEAT_NEXT), ids[max(sink, start - overlap):start].cpu(), suffix, chunk]
        inputs.append((start, end, torch.cat(parts)[None]))
    return inputs


def select(scores: list[torch.Tensor], totals: torch.Tensor, level: str, budget: Uniform, seen: list[int]
           ) -> list[torch.Tensor]:
    """Keep-masks from per-layer scores [batch, kv_heads, stored] (padding -inf): "pair" keeps each row's
    `totals` highest scores over all layers and heads, "layer" each layer's share over its heads, "head" every
    head's uniform share."""
    if level == "head":
        return [budget.select(s, torch.tensor(seen)) for s in scores]
    if level == "layer":
        return [top_k_per_head(s.flatten(1)[:, None], totals[:, None] // len(scores)).view_as(s) for s in scores]
    flat = torch.cat([s.flatten(1) for s in scores], 1)[:, None]
    keep = top_k_per_head(flat, totals[:, None])[:, 0].split([s[0].numel() for s in scores], 1)
    return [k.view_as(s) for k, s in zip(keep, scores)]


class KVzip(ReplayMethod):
    """Keeps the KV pairs the model attends to most when asked to repeat the context, chosen over all layers and heads.

    Kim et al., "KVzip: Query-Agnostic KV Cache Compression with Context Reconstruction", arXiv:2505.23416.
    After the prefill the model is given "Repeat the previous context exactly." and the context again
    (teacher-forced), chunk by chunk (`chunk_size` 2000 tokens as the authors' code; a chunk's prompt
    quotes the last 8 tokens of the one before), on the full cache; each KV pair scores the most
    attention any reconstruction query of its KV head's group pays it, the softmax being over the
    sinks, the chunk and the repeated tokens. The chat template's header (and at least `n_sink` tokens)
    is always kept. `level="pair"` (the paper's default, non-uniform) keeps the highest scores over all
    layers and heads, so heads and layers keep different numbers of tokens (stored ragged); "layer"
    shares each layer's budget among its heads; "head" keeps the same number in every head.
    `plus=True` is KVzip+ (arXiv:2601.07891): attention divided by the query's hidden-state norm and
    multiplied by ||W_o v||.

    Inherent cost: one more forward of the context (plus prompts) on a temporary fork of the full cache: the
    linear layers of a prefill again, and attention over the whole cache instead of a causal half, so about 2x a
    plain prefill where the linear layers dominate (large models), more where attention does (2.6-3.1x measured
    on the bundled 135M model at 2,048 tokens). The scores come from that forward's own attention
    (`reconstruction.Reconstruction` gives each query's softmax normaliser; `attention_to` one matrix product),
    so the method costs about that forward: within 1.1x of it, measured.
    """

    name = "kvzip"

    level: str = "pair"
    chunk_size: int = 2000
    n_sink: int = 4
    plus: bool = False

    def __post_init__(self):
        super().__post_init__()
        if self.level not in ("pair", "layer", "head"):
            raise ValueError(f"level is 'pair', 'layer' or 'head'; got {self.level!r}")
        if self.chunk_size < 1:
            raise ValueError(f"chunk_size must be positive; got {self.chunk_size}")

    def decide(self, model, cache, ids, attention_mask, prompt, layers, seen):
        scores = self.importance(model, cache, ids, attention_mask, prompt)
        self.evict(cache, [scores[i] for i in layers], layers, seen)

    def evict(self, cache, scores: list[torch.Tensor], layers: list[int], seen: list[int]) -> None:
        heads = scores[0].shape[1]
        totals = torch.tensor([self.allocation.n_keep(n) * heads * len(layers) for n in seen])
        for i, keep in zip(layers, select(scores, totals, self.level, self.allocation, seen)):
            cache.keep(i, keep)

    def importance(self, model, cache, ids, attention_mask=None, prompt=None) -> dict[int, torch.Tensor]:
        """KVzip scores of every stored token, {layer: [batch, kv_heads, stored]}: sinks +inf, padding -inf."""
        scores: dict[int, torch.Tensor] = {}
        for b, fork, real_ids, mask in rows(cache, ids, attention_mask):
            sink = sink_length(prompt, real_ids, self.n_sink)
            for start, end, repeat in repeat_inputs(prompt, real_ids, sink, self.chunk_size, overlap=8):
                attention = Reconstruction(sink, start, end)

                def on_layer(ctx, b=b, start=start, end=end, sink=sink, attention=attention):
                    weights = 1 / ctx.hidden_states.float().norm(dim=-1).clamp(min=1e-6) if self.plus else None
                    self.score_chunk(scores, ctx, b, ids.shape[0], sink, start, end, weights, self.plus, attention)
                observe(model, fork, repeat, on_layer, mask, start=len(real_ids), attention=attention)
        return scores

    @staticmethod
    def score_chunk(scores: dict[int, torch.Tensor], ctx: LayerContext, b: int, batch: int, sink: int, start: int,
                    end: int, query_weights: torch.Tensor | None = None, value_norms: bool = False,
                    attention: Reconstruction | None = None) -> None:
        """Fill row `b` of this layer's scores (a [batch, kv_heads, stored] table, made on first use, padding -inf)
        for the chunk [start, end) from its reconstruction forward: the most attention any query of the KV head's
        group pays each pair (each query's probabilities scaled by `query_weights`), times ||W_o v|| with
        `value_norms`; the sinks +inf. `attention`: the forward's, with the softmax normalisers it recorded."""
        positions = real_positions(ctx)
        if ctx.layer_idx not in scores:
            shape = (batch, ctx.n_kv_heads, ctx.n_stored - ctx.n_new)
            scores[ctx.layer_idx] = torch.full(shape, float("-inf"), device=ctx.keys.device)
        row = scores[ctx.layer_idx][b]
        row[:, positions[:sink]] = float("inf")
        columns = torch.cat([positions[:sink], positions[start:end]])
        normaliser = None if attention is None else attention.normaliser(ctx, columns)
        seen_by = attention_to(ctx, columns, query_weights, normaliser=normaliser)[..., sink:]
        if value_norms:
            seen_by = seen_by * output_norms(ctx, positions[start:end])
        row[:, positions[start:end]] = seen_by.view(1, ctx.n_kv_heads, ctx.group_size, -1).amax(2)[0]
