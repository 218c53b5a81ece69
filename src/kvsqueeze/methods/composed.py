import torch

from ..hooks import LayerContext
from .base import Method


class Composed(Method):
    """Keeps what every method of a chain keeps: each compresses, in turn, what the previous one left.

    A structural wrapper (kvpress's ComposedPress): e.g. `Composed([SnapKV(ratio=0.5), ThinK()])` evicts
    tokens, then prunes key channels of the rest. Each budget counts from the tokens the layer has seen, as
    everywhere in kvsqueeze (so a chunked prefill ends at the same size): a later method evicts only where its
    budget is smaller than what the earlier ones left, so two evictors at 0.5 keep half, not a quarter as with
    kvpress's ComposedPress, whose ratios compound.
    Methods are instances or specs as the command line gives them ("snapkv", "think:key_channel_ratio=0.5").
    """

    name = "composed"
    phase = "both"

    def __init__(self, methods: list):
        from . import build

        self.methods = [build(m) if isinstance(m, str) else m for m in methods]
        if not self.methods:
            raise ValueError("Composed needs at least one method")
        self.needs_whole_context = any(m.needs_whole_context for m in self.methods)
        self.changes_prefill = any(m.changes_prefill for m in self.methods)

    def setup(self, model: torch.nn.Module) -> None:
        for method in self.methods:
            method.setup(model)

    def before_forward(self, kwargs: dict) -> None:
        for method in self.methods:
            method.before_forward(kwargs)

    def acts_on(self, ctx: LayerContext) -> bool:
        return any(method.acts_on(ctx) for method in self.methods)

    def compress(self, ctx: LayerContext) -> None:
        for method in self.methods:
            if method.acts_on(ctx):
                method.compress(ctx)

    def attend(self, module, query, key, value, mask, attend, **kwargs):
        for method in self.methods:  # the first method with its own attention for this layer takes it
            out = method.attend(module, query, key, value, mask, attend, **kwargs)
            if out is not None:
                return out
        return None

    def overrides_attention(self) -> bool:
        return any(method.overrides_attention() for method in self.methods)

    def after_prefill(self, model, cache, ids, attention_mask=None, prompt=None) -> None:
        for method in self.methods:
            method.after_prefill(model, cache, ids, attention_mask, prompt)

    def decides_after_prefill(self) -> bool:
        return any(method.decides_after_prefill() for method in self.methods)

    def describe(self):
        return {"methods": self.methods}
