"""What every method is: a decision, after each attention layer, about what the cache layer keeps."""

from __future__ import annotations

import inspect
from contextlib import AbstractContextManager
from typing import ClassVar

import torch

from ..budgets import Uniform
from ..hooks import LayerContext, hooked

REGISTRY: dict[str, type["Method"]] = {}


class Method:
    """Base of all methods. Subclasses set `name` (their registry name) and implement `compress`.

    `phase` says when the method acts: "prefill" methods compress the tokens of a forward that adds
    several tokens (the context, or a chunk of it); "decode" methods act while generating; "both" do both.
    """

    name: ClassVar[str] = ""
    phase: ClassVar[str] = "prefill"
    needs_whole_context: ClassVar[bool] = False  # True: cannot compress a context chunk by chunk
    # True: the method changes the prefill itself (its attention, or extra forwards), so the context's
    # activations are not those of the plain model and one prefill cannot serve it and other methods
    changes_prefill: ClassVar[bool] = False
    # the `kvsqueeze calibrate` kind that makes what the method loads (computed offline on the user's model), if any
    calibration: ClassVar[str | None] = None
    calibration_required: ClassVar[bool] = True  # False: the method also runs without it

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls.name:
            if cls.name in REGISTRY:
                raise ValueError(f"two methods are named {cls.name!r}")
            REGISTRY[cls.name] = cls

    @classmethod
    def summary(cls) -> str:
        """The one line of the docstring that says what the method keeps."""
        return inspect.getdoc(cls).splitlines()[0]

    def apply(self, model: torch.nn.Module) -> AbstractContextManager["Method"]:
        """`with method.apply(model): ...` compresses while the block runs, then removes every hook."""
        self.setup(model)
        return hooked(model, self)

    def setup(self, model: torch.nn.Module) -> None:
        """Called once before the hooks are registered (load statistics, check the model...)."""

    def before_forward(self, kwargs: dict) -> None:
        """Sees (and may edit) the keyword arguments of every forward of the model while applied."""

    def acts_on(self, ctx: LayerContext) -> bool:
        """Whether this forward is one the method compresses."""
        prefill = ctx.n_new > 1 or ctx.layer.seen == ctx.n_new
        return self.phase == "both" or (self.phase == "prefill") == prefill

    def compress(self, ctx: LayerContext) -> None:
        raise NotImplementedError

    def attend(self, module, query, key, value, mask, attend, **kwargs) -> torch.Tensor | None:
        """The method's own attention for a dense kvsqueeze layer while it is applied (Quest reads only some pages,
        MInference computes a sparse prefill): the output as `attend` (the model's attention function) returns it,
        or None for the model's attention. See `attention.attention_overrides`."""
        return None

    def overrides_attention(self) -> bool:
        """Whether `attend` is the method's own (then `apply` routes the model's attention through it)."""
        return type(self).attend is not Method.attend

    def after_prefill(self, model: torch.nn.Module, cache, ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                      prompt=None) -> None:
        """Called once by `pipeline.prefill` when the whole context is in `cache`, after the attention hooks are
        removed (no gradients). `ids` [batch, n] are the prefilled context ids, `attention_mask` marks their left
        padding (None: none), `prompt` is the chat layout (a `Prompt`, None for bare token ids). Methods that decide
        from extra forwards over the whole context (KVzip, KVCompose) do it here, on forks of the cache, and then
        evict with `cache.keep`; they set `changes_prefill` and `needs_whole_context`. By default, nothing."""

    def decides_after_prefill(self) -> bool:
        """Whether `after_prefill` is the method's own (it evicts once the whole context is in the cache)."""
        return type(self).after_prefill is not Method.after_prefill

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in self.describe().items())
        return f"{type(self).__name__}({args})"

    def describe(self) -> dict:
        """The method's settings, as given to its constructor."""
        return {}


def as_scorer(scorer: "str | ScorerMethod") -> "ScorerMethod":
    """A scorer given by registry name or instance (wrappers such as AdaKV take one)."""
    if isinstance(scorer, str):
        if scorer not in REGISTRY:
            raise ValueError(f"unknown scorer {scorer!r}; available: {', '.join(sorted(REGISTRY))}")
        scorer = REGISTRY[scorer]()
    if not isinstance(scorer, ScorerMethod):
        raise TypeError(f"{type(scorer).__name__} is not a scorer (a method with score())")
    return scorer


class ScorerMethod(Method):
    """A method that scores every stored token (higher = keep) and lets a budget choose the kept ones."""

    def __init__(self, ratio: float | None = None, budget: int | None = None):
        self.budget = Uniform(ratio=0.5 if ratio is None and budget is None else ratio, tokens=budget)

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
        return self.budget.select(self.scores(ctx), ctx.seen, *ctx.depth)

    def rows_over_budget(self, ctx: LayerContext) -> torch.Tensor:
        """[batch]: the rows with a head holding more than the budget's per-head share; the others are left as
        they are (in a batch as alone)."""
        targets = torch.tensor([self.budget.n_keep(int(n), *ctx.depth) for n in ctx.seen])
        return ctx.held.amax(-1).cpu() > targets

    def describe(self) -> dict:
        return self.budget.describe() | self.settings()

    def settings(self) -> dict:
        """Method-specific settings for `describe()`."""
        return {}


class ScorerWrapper(ScorerMethod):
    """A method that keeps tokens by another scorer's scores (a registry name or an instance) and decides
    differently where: across heads (AdaKV), by chunks (ChunkKV), per layer (PerLayerCompression)."""

    def __init__(self, ratio=None, budget=None, scorer="snapkv"):
        super().__init__(ratio, budget)
        self.scorer = as_scorer(scorer)

    def setup(self, model):
        self.scorer.setup(model)

    def score(self, ctx: LayerContext) -> torch.Tensor:
        return self.scorer.score(ctx)

    def settings(self) -> dict:
        return {"scorer": self.scorer.name}
