
from ..context import LayerContext
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

    methods: list

    def __post_init__(self):
        super().__post_init__()
        from . import build

        self.methods = [build(m) if isinstance(m, str) else m for m in self.methods]
        if not self.methods:
            raise ValueError("Composed needs at least one method")

    def acts_on(self, ctx: LayerContext) -> bool:
        return any(method.acts_on(ctx) for method in self.methods)

    def compress(self, ctx: LayerContext) -> None:
        for method in self.methods:
            if method.acts_on(ctx):
                method.compress(ctx)
