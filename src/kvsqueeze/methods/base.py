"""What every method is: a decision, after each attention layer, about what the cache layer keeps."""

from __future__ import annotations

import dataclasses
import inspect
import os
from contextlib import AbstractContextManager
from typing import ClassVar

import torch

from ..budgets import Uniform
from ..context import LayerContext
from ..hooks import applied

REGISTRY: dict[str, type["Method"]] = {}


class Method:
    """Base of all methods: after each attention layer, `compress(ctx)` decides what the layer keeps and asks the
    layer for it (`ctx.keep`...). Subclasses set `name` (their registry name) and implement `compress`.

    Settings are dataclass fields, declared once as annotated class attributes with their defaults: every
    subclass is made a dataclass, so they are the constructor's arguments, and `repr`, `settings()`, `kvsqueeze
    methods`, saved contexts and result files read them from there; `__post_init__` checks them (call
    `super().__post_init__()`). What the method needs or does is declared, not detected:

    - `phase`: "prefill" methods compress the tokens of a forward that adds several tokens (the context, or a
      chunk of it); "decode" methods act while generating; "both" do both;
    - `declares`: "whole_context" (it decides once from the whole context: no chunked prefill),
      "changes_prefill" (its prefill is not the plain model's: its own attention or extra forwards, so one
      prefill cannot serve it and other methods), "attention" (`attend` is its own attention for dense layers),
      "after_prefill" (`after_prefill` evicts, once the whole context is in the cache), "attention_weights" (it
      reads the attention weights, which only eager attention returns);
    - `extra_work`: what it computes beyond a plain prefill by design (its docstring's "Inherent cost"):
      "attention" (one more attention pass of the context's queries over its keys), "chunk_attention" (the same
      within each chunk of the context, without the causal mask), "output_projection" (the
      values through the output projection once more), "second_forward" (the context forwarded again after
      itself, on a fork of the cache), "short_forward" (a few tokens of its own forwarded after the context),
      "surrogate" (a small network over every layer's hidden states: KVzap's MLP), "similarity" (every evicted
      key against every kept key of its head, and the most similar: Merging), "backward" (what gradients add
      to that forward: recording it, and its backward). `benchmarks/method_cost.py`
      measures each and holds the method to 1.15x a plain prefill plus them (1.10x a plain prefill when there is
      none).

    A method holding other methods in its fields (a wrapper: Composed, AdaKV's scorer, KeyRerotation...) has their
    capabilities too (`has`), and passes `setup`, `before_forward`, `after_prefill` and `attend` on to them
    (`parts`); what it does with their decisions is its own `compress`.
    """

    name: ClassVar[str] = ""
    phase: ClassVar[str] = "prefill"
    declares: ClassVar[frozenset[str]] = frozenset()
    extra_work: ClassVar[tuple[str, ...]] = ()
    # the `kvsqueeze calibrate` kind that makes what the method loads (computed offline on the user's model), if any
    calibration: ClassVar[str | None] = None
    calibration_required: ClassVar[bool] = True  # False: the method also runs without it

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        dataclasses.dataclass(cls, repr=False, eq=False)
        if cls.name:
            if cls.name in REGISTRY:
                raise ValueError(f"two methods are named {cls.name!r}")
            REGISTRY[cls.name] = cls

    def __post_init__(self) -> None:
        """Check the settings (and derive what the method computes from them); subclasses call it first. Here: a
        setting whose default is a number, a flag or a text must be one (None where the default is None)."""
        for f in dataclasses.fields(self):
            value, default = getattr(self, f.name), f.default
            if value is None or default is dataclasses.MISSING or default is None:
                continue
            expected = (bool,) if isinstance(default, bool) else (int, float) if isinstance(default, (int, float)) \
                else (str,) if isinstance(default, str) else None
            wrong = expected is not None and (not isinstance(value, expected) or (
                isinstance(value, bool) and bool not in expected))
            if wrong and not (isinstance(default, str) and isinstance(value, Method)):
                kind = "flag" if bool in expected else "number" if int in expected else "text"
                raise TypeError(f"{type(self).__name__}'s {f.name} is a {kind} (default {default!r}); got {value!r}")

    @classmethod
    def summary(cls) -> str:
        """The one line of the docstring that says what the method keeps."""
        return inspect.getdoc(cls).splitlines()[0]

    # -- settings and parts --

    def given(self) -> dict:
        """The method's settings as given (None left out)."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return {name: value for name, value in values.items() if value is not None}

    def settings(self) -> dict:
        """The method's settings as JSON holds them (listings, result files, saved contexts): see `plain`."""
        return {name: plain(value) for name, value in self.given().items()}

    def __repr__(self):
        return f"{type(self).__name__}({', '.join(f'{k}={shown(v)}' for k, v in self.given().items())})"

    def parts(self) -> list["Method"]:
        """The methods this one wraps: those its settings hold."""
        found = []
        for value in (getattr(self, f.name) for f in dataclasses.fields(self)):
            for item in (value if isinstance(value, (list, tuple)) else [value]):
                if isinstance(item, Method):
                    found.append(item)
        return found

    def inherent_work(self) -> tuple[str, ...]:
        """The `extra_work` of the method and of those it wraps, each named once."""
        return tuple(dict.fromkeys(self.extra_work + sum((part.inherent_work() for part in self.parts()), ())))

    def has(self, capability: str) -> bool:
        """Whether the method, or one it wraps, declares `capability` (see the class docstring)."""
        return capability in self.declares or any(part.has(capability) for part in self.parts())

    # -- what the hooks call --

    def apply(self, model: torch.nn.Module) -> AbstractContextManager["Method"]:
        """`with method.apply(model): ...` compresses this thread's forwards of `model` while the block runs."""
        self.setup(model)
        return applied(model, self)

    def setup(self, model: torch.nn.Module) -> None:
        """Called once before the method is applied (load statistics, check the model...)."""
        for part in self.parts():
            part.setup(model)

    def before_forward(self, kwargs: dict) -> None:
        """Sees (and may edit) the keyword arguments of every forward of the model while applied."""
        for part in self.parts():
            part.before_forward(kwargs)

    def acts_on(self, ctx: LayerContext) -> bool:
        """Whether this forward is one the method compresses."""
        prefill = ctx.n_new > 1 or ctx.layer.seen == ctx.n_new
        return self.phase == "both" or (self.phase == "prefill") == prefill

    def compress(self, ctx: LayerContext) -> None:
        raise NotImplementedError

    def attend(self, layer, call) -> tuple | None:
        """The method's own attention for a dense kvsqueeze `layer` while it is applied (Quest reads only some pages,
        MInference computes a sparse prefill), for methods that declare "attention": the output as `call.run()`
        (the model's attention function with the layer's own mask) returns it, or None for the model's attention.
        By default, the first of its parts' that gives one."""
        for part in self.parts():
            out = part.attend(layer, call) if part.has("attention") else None
            if out is not None:
                return out
        return None

    def after_prefill(self, model: torch.nn.Module, cache, ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                      prompt=None) -> None:
        """Called once by `pipeline.prefill` when the whole context is in `cache`, after the method's hooks are done
        (no gradients). `ids` [batch, n] are the prefilled context ids, `attention_mask` marks their left padding
        (None: none), `prompt` is the chat layout (a `Prompt`, None for bare token ids). Methods that decide from
        extra forwards over the whole context (KVzip, KVCompose) do it here, on forks of the cache, and then evict
        with `cache.keep`; they declare "after_prefill". By default, its parts'."""
        for part in self.parts():
            part.after_prefill(model, cache, ids, attention_mask, prompt)


def shown(value) -> str:
    """A setting as `repr` shows it: a method as its repr, a tensor by its shape, an object by its type."""
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(shown(v) for v in value) + "]"
    if isinstance(value, (str, int, float, bool, Method, os.PathLike)):
        return repr(value) if not isinstance(value, os.PathLike) else repr(str(value))
    return f"tensor{list(value.shape)}" if isinstance(value, torch.Tensor) else f"<{type(value).__name__}>"


def plain(value):
    """A setting as JSON holds it (result files, saved contexts): what `shown` shows, as text or numbers."""
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value if isinstance(value, (str, int, float, bool)) or value is None else shown(value).strip("'")


def as_scorer(scorer: "str | ScorerMethod") -> "ScorerMethod":
    """A scorer given by registry name or instance (wrappers such as AdaKV take one)."""
    if isinstance(scorer, str):
        if scorer not in REGISTRY:
            raise ValueError(f"unknown scorer {scorer!r}; available: {', '.join(sorted(REGISTRY))}")
        scorer = REGISTRY[scorer]()
    if not isinstance(scorer, ScorerMethod):
        raise TypeError(f"{type(scorer).__name__} is not a scorer (a method with score())")
    return scorer


class TopScores(Method):
    """A method that keeps, per head, the stored tokens with the best scores (higher = keep), as many as its
    `allocation` (a `budgets.Budget`) gives each head."""

    def score(self, ctx: LayerContext) -> torch.Tensor:
        """Scores of shape [batch, kv_heads, stored]."""
        raise NotImplementedError

    def scores(self, ctx: LayerContext) -> torch.Tensor:
        """`score`, with the padding of a ragged layer's view made unkeepable."""
        scores = self.score(ctx)
        return scores if ctx.real is None else scores.masked_fill(~ctx.real, float("-inf"))

    def compress(self, ctx: LayerContext) -> None:
        over = self.rows_over_budget(ctx)
        if bool(over.any()):  # else skip scoring: ratio 0 reproduces the model exactly
            ctx.keep(self.keep_mask(ctx), rows=over)

    def keep_mask(self, ctx: LayerContext) -> torch.Tensor:
        """What the layer keeps: [batch, kv_heads, stored]."""
        return self.allocation.select(self.scores(ctx), ctx.row_lengths, *ctx.depth)

    def rows_over_budget(self, ctx: LayerContext) -> torch.Tensor:
        """[batch]: the rows with a head holding more than the budget's per-head share; the others are left as
        they are (in a batch as alone)."""
        targets = torch.tensor([self.allocation.n_keep(int(n), *ctx.depth) for n in ctx.row_lengths])
        return ctx.held.amax(-1).cpu() > targets


class Budgeted(Method):
    """A method every head of which keeps as many tokens: `ratio` of them removed or `budget` tokens kept (ratio 0.5
    when neither is given); `allocation` is that budget (methods may refine it: PyramidKV, AdaKV...)."""

    ratio: float | None = None
    budget: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.ratio is None and self.budget is None:
            self.ratio = 0.5
        self.allocation = Uniform(ratio=self.ratio, tokens=self.budget)


class ScorerMethod(Budgeted, TopScores):
    """A scorer: every head keeps its best-scored tokens, within its budget."""


class ScorerWrapper(ScorerMethod):
    """A method that keeps tokens by another scorer's scores (a registry name or an instance) and decides
    differently where: across heads (AdaKV), by chunks (ChunkKV), by merging (Merging)."""

    scorer: "str | ScorerMethod" = "snapkv"

    def __post_init__(self) -> None:
        super().__post_init__()
        self.scorer = as_scorer(self.scorer)

    def score(self, ctx: LayerContext) -> torch.Tensor:
        return self.scorer.score(ctx)
