from __future__ import annotations

import math
import random
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F
from tqdm.auto import tqdm

from ..hooks import attached
from ..models import cache_argument, frozen
from .kvzip import KVzip, appended, eviction_plan, repeat_inputs, sink_length

COMMAND = "`kvsqueeze calibrate restorekv --out FILE`"


def projections(model) -> dict[str, nn.Linear]:
    """The decoder's linear projections (attention and MLP of every layer; not the LM head), by name."""
    return {name: module for name, module in model.base_model.named_modules() if isinstance(module, nn.Linear)}


class RestoreAdapter(nn.Module):
    """RestoreKV's trained parts for one model: `n_tokens` restore embeddings and a LoRA pair per decoder projection.

    The low-rank update W + (alpha / rank) B A of every projection is applied by forward hooks, only while
    `active(model)` runs: the user's model is never modified (a LoRA library would inject layers into it).
    """

    def __init__(self, embeddings: torch.Tensor, shapes: dict[str, tuple[int, int]], rank: int = 16,
                 alpha: float = 32.0, plus: bool = False):
        super().__init__()
        if rank < 1 or len(embeddings) < 1:
            raise ValueError(f"RestoreKV needs a positive LoRA rank and restore tokens; got rank {rank}, "
                             f"{len(embeddings)} tokens")
        self.rank, self.alpha, self.names = rank, alpha, list(shapes)
        self.plus = plus  # the KVzip+ setting of the scores it was trained with, and is used with
        self.embeddings = nn.Parameter(embeddings.float())
        self.lora_a = nn.ParameterList(nn.Parameter(torch.zeros(rank, n_in)) for n_in, _ in shapes.values())
        self.lora_b = nn.ParameterList(nn.Parameter(torch.zeros(n_out, rank)) for _, n_out in shapes.values())

    @property
    def n_tokens(self) -> int:
        return self.embeddings.shape[0]

    @classmethod
    def for_model(cls, model, n_tokens: int = 8, rank: int = 16, alpha: float = 32.0, seed: int = 0,
                  plus: bool = False) -> "RestoreAdapter":
        """Untrained: restore embeddings are those of random vocabulary tokens, A as a linear layer's initial
        weights, B zero (the adapted model starts as the model itself)."""
        generator = torch.Generator().manual_seed(seed)
        embedding = model.get_input_embeddings()
        tokens = torch.randint(embedding.num_embeddings, (n_tokens,), generator=generator)
        with torch.no_grad():
            embeddings = embedding(tokens.to(model.device)).float().cpu()
        shapes = {name: (m.in_features, m.out_features) for name, m in projections(model).items()}
        adapter = cls(embeddings, shapes, rank, alpha, plus)
        for a in adapter.lora_a:
            bound = 1 / math.sqrt(a.shape[1])
            a.data.uniform_(-bound, bound, generator=generator)
        return adapter

    def check(self, model) -> None:
        """Raises ValueError, saying how to make a fitting one, when this adapter was made for another model."""
        hidden = model.get_input_embeddings().embedding_dim
        found = projections(model)
        for name, a, b in zip(self.names, self.lora_a, self.lora_b):
            module = found.get(name)
            if module is None or (module.in_features, module.out_features) != (a.shape[1], b.shape[0]):
                raise ValueError(f"this RestoreKV adapter was made for another model (its projection {name!r} does "
                                 f"not fit this one); make one with {COMMAND}")
        if self.embeddings.shape[1] != hidden or len(self.names) != len(found):
            raise ValueError(f"this RestoreKV adapter was made for another model; make one with {COMMAND}")

    @contextmanager
    def active(self, model):
        """The model runs with the low-rank updates while the block runs."""
        scale = self.alpha / self.rank
        found = projections(model)

        def adapted(a, b):
            def hook(module, args, output):
                delta = (args[0].to(a.dtype) @ a.T) @ b.T
                return output + (scale * delta).to(output.dtype)
            return hook

        handles = [found[name].register_forward_hook(adapted(a.to(model.device), b.to(model.device)))
                   for name, a, b in zip(self.names, self.lora_a, self.lora_b)]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def tensors(self) -> dict[str, torch.Tensor]:
        """Everything trained, by the names the file stores: the embeddings and each projection's A and B."""
        tensors = {"embeddings": self.embeddings}
        for name, a, b in zip(self.names, self.lora_a, self.lora_b):
            tensors |= {f"{name}.lora_a": a, f"{name}.lora_b": b}
        return tensors

    def save(self, path: str | Path, model, settings: dict | None = None) -> None:
        from ..calibration import save_calibration

        save_calibration(path, "restorekv", self.tensors(), model,
                         (settings or {}) | {"rank": self.rank, "alpha": self.alpha, "plus": self.plus})

    @classmethod
    def load(cls, path: str | Path) -> tuple["RestoreAdapter", dict]:
        """(the adapter, the settings it was trained with) from a file `save` wrote."""
        from ..calibration import read_calibration

        tensors, settings = read_calibration(path, "restorekv", f"make one with {COMMAND}", "RestoreKV")
        names = [key[:-len(".lora_a")] for key in tensors if key.endswith(".lora_a")]
        try:
            shapes = {name: (tensors[f"{name}.lora_a"].shape[1], tensors[f"{name}.lora_b"].shape[0]) for name in names}
            adapter = cls(tensors["embeddings"], shapes, int(settings["rank"]), float(settings["alpha"]),
                          bool(settings.get("plus", False)))
            for name, a, b in zip(names, adapter.lora_a, adapter.lora_b):
                a.data.copy_(tensors[f"{name}.lora_a"])
                b.data.copy_(tensors[f"{name}.lora_b"])
        except (KeyError, RuntimeError, IndexError) as error:
            raise ValueError(f"{path} is a damaged RestoreKV adapter ({error}); make one with {COMMAND}") from error
        return adapter, settings


class RestoreKV(KVzip):
    """Keeps KVzip's best KV pairs plus 8 learned restore tokens that read the whole context before eviction, in the same budget.

    RestoreKV, arXiv:2608.01247 (as kvpress's RestoreKVPress describes it; the paper itself could not be
    read here). After KVzip has scored the full cache, `n_tokens` trained restore embeddings (8) are run
    once through the model with a LoRA adapter on, attending to the whole context; their KV pairs join
    the cache (positions right after the context, so the question follows them) and always stay, taking
    n x layers x heads slots of the budget (budget-matched); KVzip's eviction fills the rest. The adapter
    is active for that one pass only. The embeddings and the adapter are trained offline on the frozen
    model by `train_restore` (`kvsqueeze calibrate restorekv`), by self-distillation from the full
    cache; `adapter` is that file (or a `RestoreAdapter`). The adapter's KVzip+ setting (`plus`) is the
    one it was trained with. Other settings as KVzip. Inherent cost: KVzip's (one more forward of the context) and
    one forward of the restore tokens over the full cache: few tokens, but every weight is read once more (0.2 s on
    the bundled model, 1 thread: 4% of a 2,048-token prefill).
    """

    name = "restorekv"
    calibration = "restorekv"
    extra_work = ("second_forward", "short_forward")

    adapter: "str | Path | RestoreAdapter | None" = None

    def __post_init__(self):
        super().__post_init__()
        if self.adapter is None:
            raise ValueError(f"RestoreKV needs restore tokens and an adapter trained on your model: adapter=FILE from "
                             f"{COMMAND}")
        self.trained = self.adapter if isinstance(self.adapter, RestoreAdapter) else None  # a file: loaded by setup

    def setup(self, model):
        if self.trained is None:
            self.trained = RestoreAdapter.load(self.adapter)[0]
        self.trained.check(model)
        self.plus = self.trained.plus

    def decide(self, model, cache, ids, attention_mask, prompt, layers, seen):
        n, smallest = self.trained.n_tokens, min(self.allocation.n_keep(s) for s in seen)
        if smallest < n:
            raise ValueError(f"RestoreKV's {n} restore tokens take {n} of every head's budget, but the budget keeps "
                             f"{smallest} tokens of this context: use a smaller ratio")
        scores = self.importance(model, cache, ids, attention_mask, prompt)
        self.restore_and_evict(model, cache, scores, layers, seen, attention_mask)

    def restore_and_evict(self, model, cache, scores: dict[int, torch.Tensor], layers: list[int], seen: list[int],
                          attention_mask=None) -> None:
        """Append the restore tokens, then evict by KVzip `scores` ({layer: [batch, kv_heads, stored]}), the restore
        tokens always kept within the budget."""
        self.restore(model, cache, attention_mask)
        n = self.trained.n_tokens
        restored = [torch.cat([scores[i], scores[i].new_full((*scores[i].shape[:2], n), float("inf"))], -1)
                    for i in layers]
        self.evict(cache, restored, layers, seen)

    def restore(self, model, cache, attention_mask=None) -> None:
        """Append the restore tokens' KV pairs to every layer of `cache`, computed with the adapter on."""
        batch, n = cache.layers[0].keys.shape[0], self.trained.n_tokens
        embeds = self.trained.embeddings.to(model.device, model.dtype)[None].expand(batch, -1, -1)
        extra = {}
        if attention_mask is not None:
            attention_mask = attention_mask.to(model.device)
            extra = appended(attention_mask, n, attention_mask.sum(-1, keepdim=True))
        with self.trained.active(model), attached(model):
            model.base_model(inputs_embeds=embeds, **{cache_argument(model): cache}, use_cache=True, **extra)


def train_restore(model, tokenizer, texts: list[str] | None = None, out: str | Path | None = None,
                  samples: int = 8, tokens: int = 1000, steps: int = 200, n_tokens: int = 8, rank: int = 16,
                  alpha: float = 32.0, ratios: tuple[float, ...] = (0.5, 0.75, 0.9), span: int = 64,
                  lr: float = 1e-3, plus: bool = False, seed: int = 0, progress: bool = True) -> RestoreAdapter:
    """Train RestoreKV's restore embeddings and LoRA adapter on `model` (frozen), offline; save them to `out`.

    Self-distillation from the full cache: each step takes one of `texts` (default: `samples` pieces of
    `tokens` tokens of the bundled essays), a ratio from `ratios` in turn, and a random span of `span`
    context tokens that the model is asked to repeat (KVzip's reconstruction prompt, teacher-forced, as
    the method is query-agnostic); the loss is the KL divergence from the full cache's next-token
    distributions to those of the KVzip-compressed cache with the restore tokens, over that input. AdamW,
    lr 1e-3. The paper's training data, rank and schedule could not be read here: rank 16 on every
    projection (alpha 32) is about 0.5% of an 8B model, near the ~0.4% kvpress reports.
    """
    from ..pipeline import compress
    from .kvzap import default_texts

    if texts is None:
        texts = default_texts(tokenizer, samples, tokens)
    adapter = RestoreAdapter.for_model(model, n_tokens, rank, alpha, seed, plus)
    methods, scorer = [RestoreKV(ratio=r, adapter=adapter) for r in ratios], KVzip(plus=plus)
    contexts = []
    for text in tqdm(texts, desc="KVzip scores", disable=not progress):
        ctx = compress(model, tokenizer, text)
        ids = ctx.context_ids
        with torch.no_grad():
            scores = scorer.importance(model, ctx.cache, ids, None, ctx.prompt)
        sink = sink_length(ctx.prompt, ids[0], scorer.n_sink)
        contexts.append((ctx, scores, repeat_inputs(ctx.prompt, ids[0], sink, span, overlap=8)))
    rng = random.Random(seed)
    optimiser = torch.optim.AdamW(adapter.parameters(), lr=lr, weight_decay=0.0)
    bar = tqdm(range(steps), desc="RestoreKV", disable=not progress)
    with frozen(model), attached(model):  # the contexts' caches are read through kvsqueeze
        for step in bar:
            ctx, scores, inputs = contexts[step % len(contexts)]
            method = methods[step % len(methods)]
            repeat = rng.choice(inputs)[2].to(model.device)
            with torch.no_grad():
                teacher = model(input_ids=repeat, **{cache_argument(model): ctx.cache.fork()}).logits.float().log_softmax(-1)
            with torch.enable_grad():
                student_cache = ctx.cache.fork()
                method.restore_and_evict(model, student_cache, scores, *eviction_plan(ctx.cache, ctx.context_ids,
                                                                                      method.allocation))
                student = model(input_ids=repeat, **{cache_argument(model): student_cache}).logits.float().log_softmax(-1)
                loss = F.kl_div(student[0], teacher[0], log_target=True, reduction="batchmean")
                optimiser.zero_grad()
                loss.backward()
            optimiser.step()
            bar.set_postfix(kl=f"{loss.item():.4f}")
    if out is not None:
        adapter.save(out, model, {"samples": len(texts), "tokens": tokens, "steps": steps,
                                  "ratios": list(ratios), "span": span, "seed": seed})
    return adapter
