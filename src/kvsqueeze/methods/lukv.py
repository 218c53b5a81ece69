"""LU-KV: per-head budgets read from curves profiled offline on the user's model, and the profiling routine."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..budgets import Budget, Uniform, largest_remainder
from ..cache import compressible_layers, layer_types
from ..context import LayerContext
from ..evaluation.needle import needle_sample
from ..hooks import observing
from ..models import attention_modules, cache_argument
from .base import ScorerMethod, ScorerWrapper, as_scorer
from .expected_attention import ExpectedAttention

KIND = "lukv"
MAKE_ONE = ("make them with `kvsqueeze calibrate lukv --out FILE` "
            "(or kvsqueeze.methods.lukv.calibrate_lukv(model, tokenizer, FILE))")
GLOBAL_RATIOS = torch.arange(1, 100, dtype=torch.float32) / 100  # kvpress's grid: 0.01 ... 0.99

# Questions asked about every calibration context (besides its needle question): retrieval, summary, reasoning.
QUESTIONS = [
    "Summarize the text above in three sentences.",
    "What is the main argument of the text?",
    "Which examples does the author give to support the argument?",
    "What does the text say in its first paragraph?",
    "What does the text say in its last paragraph?",
    "List five specific details mentioned in the text.",
    "What question does the author raise, and how is it answered?",
    "Which statement in the text is the most surprising, and why?",
    "Give the text a title and explain your choice.",
    "What might a critic disagree with in the text?",
]


def default_scorer() -> ScorerMethod:
    """The scorer LU-KV's authors and kvpress use: Expected Attention with epsilon 0.02 (4 sinks kept)."""
    return ExpectedAttention(epsilon=0.02)


def protected_scores(scorer: ScorerMethod, ctx: LayerContext, window: int) -> torch.Tensor:
    """`scorer`'s scores with the last `window` tokens of every head made unevictable (+inf)."""
    scores = scorer.score(ctx).float()
    if window > 0:
        scores = scores.masked_fill(ctx.rank >= ctx.held[..., None] - window, float("inf"))
    return scores


# The offline part: oracle utilities -> convexified loss curves -> greedy allocation, averaged over queries.

def antitonic(gains: torch.Tensor) -> torch.Tensor:
    """The non-increasing sequence closest to `gains` [n] in least squares (pool adjacent violators).

    With gains[i] the loss removed by keeping the i-th ranked token, the cumulative sums of the result
    are the least concave majorant of gains' cumulative sums: the loss curve's convex hull."""
    sums, counts = [], []
    for value in gains.tolist():
        sums.append(value)
        counts.append(1)
        while len(sums) > 1 and sums[-2] * counts[-1] < sums[-1] * counts[-2]:  # previous mean < last mean
            last_sum, last_count = sums.pop(), counts.pop()
            sums[-1] += last_sum
            counts[-1] += last_count
    return torch.cat([torch.full((c,), s / c) for s, c in zip(sums, counts)]) if sums else gains.clone()


def allocate(gains: torch.Tensor, ratios: torch.Tensor) -> torch.Tensor:
    """Greedy marginal-utility allocation: for each global ratio, tokens kept by each head, [len(ratios), heads].

    `gains` [heads, n] must be non-increasing along n (see `antitonic`); the budget (1 - ratio) * heads * n
    goes, one token at a time, to the head whose next token removes the most loss: the globally highest
    gains, which, each head's gains decreasing, are a prefix of every head (optimal on the convex hull)."""
    heads, n = gains.shape
    order = gains.flatten().argsort(descending=True, stable=True)  # ties: earlier rank of the same head first
    owner = order // n
    totals = ((1 - ratios) * heads * n).round().long().clamp(0, heads * n)
    return torch.stack([torch.bincount(owner[:int(t)], minlength=heads) for t in totals])


def budget_curves(gains: list[torch.Tensor], layers: list[int] | None = None,
                  ratios: torch.Tensor = GLOBAL_RATIOS) -> torch.Tensor:
    """LU-KV's budget curves, [len(ratios), layers, kv_heads]: the fraction each head removes at each global ratio.

    `gains` has one tensor [layers, kv_heads, n] per calibration query: the oracle utility of each head's
    tokens in the order its scorer ranks them (best first). Each head's loss curve is convexified, the
    global budget allocated greedily (`allocate`) among the heads of `layers` (default: all), and the
    per-head fractions removed are averaged over the queries. Other layers remove nothing."""
    if not gains:
        raise ValueError("LU-KV curves need the gains of at least one calibration query")
    n_layers, n_heads = gains[0].shape[:2]
    layers = list(range(n_layers)) if layers is None else list(layers)
    total = torch.zeros(len(ratios), n_layers, n_heads)
    for query in gains:
        chosen = query[layers].float().flatten(0, 1)  # [heads of those layers, n]
        convex = torch.stack([antitonic(row) for row in chosen])
        kept = allocate(convex, ratios).float() / chosen.shape[-1]
        total[:, layers] += (1 - kept).view(len(ratios), len(layers), n_heads)
    return total / len(gains)


class ScoreRecorder:
    """Observes (see `hooks.observing`): records each compressible layer's protected scores of the prefilled context."""

    def __init__(self, scorer: ScorerMethod, window: int):
        self.scorer, self.window, self.scores = scorer, window, {}

    def __call__(self, ctx: LayerContext) -> None:
        self.scores[ctx.layer_idx] = protected_scores(self.scorer, ctx, self.window)[0].cpu()


def oracle_importance(model, compressed, question_ids: torch.Tensor, answer: torch.Tensor,
                      layers: list[int]) -> dict[int, torch.Tensor]:
    """{layer: [kv_heads, context]}: the most any decoding step of `answer` moves the residual stream through
    each context token, max_k A[k, j] * ||W_o,h v_j|| (LU-KV's oracle importance), max over the query heads
    of a KV head. `compressed` holds the whole context (nothing evicted); attention is recomputed eagerly."""
    from ..calibration import eager_attention  # calibration imports the pipeline, which imports methods

    config = model.config.get_text_config()
    group = config.num_attention_heads // config.num_key_value_heads
    ids = torch.cat([question_ids[0].to(answer.device), answer])[None].to(model.device)
    steps = torch.arange(question_ids.shape[1] - 1, ids.shape[1] - 1)  # the queries that produce the answer
    n = compressed.logical_length
    modules = attention_modules(model)
    with eager_attention(model), torch.no_grad():
        attentions = model(ids, **{cache_argument(model): compressed.cache.fork()}, output_attentions=True).attentions
        oracle = {}
        for i in layers:
            weights = attentions[i][0][:, steps, :n].float().amax(1)  # [heads, context]
            values = compressed.cache.layers[i].values[0].float().repeat_interleave(group, 0)  # [heads, n, d]
            o_proj = getattr(modules[i], "o_proj", None)
            if o_proj is None:
                norms = values.norm(dim=-1)
            else:
                out = o_proj.weight.float().view(o_proj.weight.shape[0], values.shape[0], -1)  # [hidden, heads, d]
                norms = torch.einsum("hnd,ehd->hne", values, out).norm(dim=-1)
            oracle[i] = (weights * norms).view(-1, group, n).amax(1).cpu()
    return oracle


def calibrate_lukv(model, tokenizer, path: str | Path | None = None, texts: list[str] | None = None,
                   samples: int = 3, tokens: int = 2000, questions: list[str] | None = None,
                   max_new_tokens: int = 64, scorer: str | ScorerMethod | None = None, window: int = 1,
                   seed: int = 0, progress: bool = True) -> dict[str, torch.Tensor]:
    """LU-KV's offline profiling on `model`: {"prune_ratios": [99, layers, kv_heads], "global_ratios": [99]},
    written to `path` (safetensors) when given, for `LUKV(curves=path)`.

    Contexts are `texts`, or `samples` needle-in-a-haystack texts of about `tokens` tokens made from the
    bundled essays (each also asked its needle question). Every question of `questions` (default: ten
    generic ones, `QUESTIONS`) is answered by the model with its full cache (greedy, `max_new_tokens`);
    the oracle importance of each context token for each KV head is the most it moves the residual
    stream at any answer step (`oracle_importance`). Ranked by `scorer` (default Expected Attention,
    epsilon 0.02, 4 sinks; the last `window` tokens kept), each head's loss curve (oracle utility of the
    evicted tokens) is convexified and the global budget allocated greedily over all heads of all
    compressible layers, for every global ratio 0.01 ... 0.99; the fractions are averaged over queries
    (Tang et al., arXiv:2602.08585: a ~4k-token synthetic context and 30 queries; the defaults, 3 contexts
    of 2000 tokens x 11 questions, are about that many queries and take minutes on a CPU).
    """
    from ..pipeline import compress  # the pipeline imports the methods

    scorer = default_scorer() if scorer is None else as_scorer(scorer)
    questions = QUESTIONS if questions is None else list(questions)
    if texts is None:
        needles = [needle_sample(tokenizer, tokens, (i + 0.5) / samples, seed=seed + i) for i in range(samples)]
        contexts = [(s.context, [s.question] + questions) for s in needles]
    else:
        contexts = [(text, questions) for text in texts]
    if not any(asked for _, asked in contexts):
        raise ValueError("LU-KV calibration needs at least one question")
    layers = compressible_layers(model.config)
    gains = []
    bar = tqdm(total=sum(len(asked) for _, asked in contexts), desc="LU-KV profiling", disable=not progress)
    for context, asked in contexts:
        recorder = ScoreRecorder(scorer, window)
        scorer.setup(model)
        with observing(model, recorder):
            compressed = compress(model, tokenizer, context)
        order = {i: recorder.scores[i].argsort(dim=-1, descending=True, stable=True) for i in layers}
        for question in asked:
            question_ids = compressed.prompt.question_ids(question)
            answer = compressed.generate(question_ids, max_new_tokens=max_new_tokens)[0]
            oracle = oracle_importance(model, compressed, question_ids, answer, layers)
            n = compressed.logical_length
            ranked = torch.zeros(len(layer_types(model.config)), oracle[layers[0]].shape[0], n)
            for i in layers:
                ranked[i] = oracle[i].gather(-1, order[i])
            gains.append(ranked)
            bar.update()
    bar.close()
    curves = {"prune_ratios": budget_curves(gains, layers), "global_ratios": GLOBAL_RATIOS.clone()}
    if path is not None:
        from ..calibration import save_calibration

        settings = {"scorer": scorer.name, "scorer_settings": scorer.settings(), "window": window,
                    "queries": len(gains), "tokens": tokens if texts is None else None,
                    "max_new_tokens": max_new_tokens}
        save_calibration(path, KIND, curves, model, settings)
    return curves


def load_curves(source, model) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(prune ratios [R, layers, kv_heads], global ratios [R], settings) from a file written by `calibrate_lukv`,
    a kvpress / LU-KV `.npy` curve ([99, layers, kv_heads] for ratios 0.01 ... 0.99), a dict as
    `calibrate_lukv` returns, or a tensor like the `.npy` curves."""
    settings = {}
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"no LU-KV budget curves at {path}; {MAKE_ONE}")
        if path.suffix == ".npy":
            import numpy as np

            source = torch.from_numpy(np.load(path)).float()
        else:
            from ..calibration import read_calibration

            source, settings = read_calibration(path, KIND, MAKE_ONE, what="LU-KV curves")
    if isinstance(source, dict):
        prune = torch.as_tensor(source["prune_ratios"], dtype=torch.float32)
        ratios = torch.as_tensor(source.get("global_ratios", GLOBAL_RATIOS), dtype=torch.float32)
    else:
        prune = torch.as_tensor(source, dtype=torch.float32)
        ratios = GLOBAL_RATIOS[:prune.shape[0]]
    config = model.config.get_text_config()
    expected = (config.num_hidden_layers, config.num_key_value_heads)
    if prune.dim() != 3 or tuple(prune.shape[1:]) != expected or len(ratios) != prune.shape[0]:
        raise ValueError(f"LU-KV curves of shape {tuple(prune.shape)} do not fit this model ([ratios, {expected[0]} "
                         f"layers, {expected[1]} KV heads]): they were made for another model; {MAKE_ONE}")
    return prune, ratios, settings


class CurveBudget(Budget):
    """Per-head budgets read from LU-KV curves: at global ratio r, head (l, h) removes curve(r)[l, h] of its tokens.

    The curve is interpolated linearly between its grid ratios (0 removes nothing); each layer's heads keep
    round(sum of their shares) tokens, split by largest remainder, at least one each."""

    def __init__(self, base: Uniform, prune: torch.Tensor, ratios: torch.Tensor):
        self.base = base
        self.ratios = torch.cat([torch.zeros(1), ratios.float()])
        self.prune = torch.cat([torch.zeros(1, *prune.shape[1:]), prune.float()]).clamp(0, 1)  # [R+1, layers, heads]

    def n_keep(self, n_tokens, layer_idx=0, n_layers=1):
        return self.base.n_keep(n_tokens)

    def local_ratios(self, ratio: float, layer_idx: int) -> torch.Tensor:
        """Fraction each head of layer `layer_idx` removes at global ratio `ratio`."""
        upper = int(torch.searchsorted(self.ratios, torch.tensor(ratio)).clamp(1, len(self.ratios) - 1))
        low, high = self.ratios[upper - 1], self.ratios[upper]
        weight = float(((ratio - low) / (high - low)).clamp(0, 1))
        return torch.lerp(self.prune[upper - 1, layer_idx], self.prune[upper, layer_idx], weight)

    def layer_counts(self, n_tokens: int, layer_idx: int) -> torch.Tensor:
        keep = self.base.n_keep(n_tokens)
        if keep >= n_tokens:
            return torch.full((self.prune.shape[-1],), n_tokens)
        shares = (1 - self.local_ratios(1 - keep / n_tokens, layer_idx)) * n_tokens
        counts = largest_remainder(shares[None], shares.sum().round().long()[None])[0]
        return counts.clamp(1, n_tokens)

    def head_counts(self, scores, seen, layer_idx=0, n_layers=1):
        if n_layers != self.prune.shape[1]:
            raise ValueError(f"LU-KV curves for {self.prune.shape[1]} compressible layers, the model has {n_layers}")
        return torch.stack([self.layer_counts(int(n), layer_idx) for n in seen]).to(scores.device)

    def describe(self):
        return self.base.describe()


class LUKV(ScorerWrapper):
    """Keeps a scorer's best tokens per head, with per-head budgets profiled offline for long-horizon utility.

    Tang et al., "Predicting Future Utility: Global Combinatorial Optimization for Task-Agnostic KV Cache
    Eviction" (LU-KV), arXiv:2602.08585. Offline, on the same model (`calibrate_lukv`, `kvsqueeze calibrate
    lukv`): the oracle importance of a context token for a head is the most it moves the residual stream at
    any step of answers decoded with the full cache; each head's eviction loss as a function of its budget
    (tokens ranked by the scorer) is convexified, and a greedy marginal-utility solver shares the global
    budget among all heads of all layers, for global ratios 0.01 ... 0.99, averaged over queries. Online, the
    curves give each KV head the fraction it removes (stored ragged, so memory is really freed); within a
    head the scorer's best tokens are kept. Defaults are the authors' and kvpress's LUKVPress: Expected
    Attention with epsilon 0.02, 4 sinks and the last token always kept. `curves` is a file from
    `calibrate_lukv`, an LU-KV/kvpress `.npy` curve [99, layers, kv_heads], or such a tensor; without
    curves, every head keeps the same number of tokens (with a warning), as kvpress falls back to.
    """

    name = "lukv"
    calibration = "lukv"

    curves: "str | Path | None" = None
    scorer: "str | ScorerMethod | None" = None
    window: int = 1

    def __post_init__(self):
        if self.scorer is None:
            self.scorer = default_scorer()
        super().__post_init__()
        if self.window < 0:
            raise ValueError(f"window must be >= 0; got {self.window}")
        self.uniform = self.allocation

    def setup(self, model):
        super().setup(model)
        if self.curves is None:  # as kvpress: uniform budgets, said loudly
            warnings.warn(f"LU-KV without budget curves keeps the same number of tokens in every head; {MAKE_ONE} "
                          "and pass curves=FILE", stacklevel=2)
            self.allocation = self.uniform
            return
        prune, ratios, settings = load_curves(self.curves, model)
        if settings.get("scorer", self.scorer.name) != self.scorer.name:
            warnings.warn(f"these LU-KV curves were profiled with the {settings['scorer']} scorer, "
                          f"not {self.scorer.name}", stacklevel=2)
        compressible = compressible_layers(model.config)
        self.allocation = CurveBudget(self.uniform, prune[:, compressible], ratios)

    def score(self, ctx: LayerContext) -> torch.Tensor:
        return protected_scores(self.scorer, ctx, self.window)
