"""The state of one forward of a model under kvsqueeze, set by whatever starts the forward.

The model-level pre-hook (see `hooks`) finds or makes the forward's `SqueezeCache` and sets a `Forward`
holding it, the method compressing it and what the layers observe; the attention function and the layer
hooks read it, so nothing depends on how transformers names the arguments of its attention modules, and
nothing passes through tensors or module-level registries. Each thread, and each asyncio task, sees its own.
"""

from __future__ import annotations

from contextvars import ContextVar, Token
from dataclasses import dataclass, field
from typing import Any, Callable


class CompressionNotAppliedError(RuntimeError):
    """A method was applied to a forward but did not reach every layer it compresses (nothing is silently kept)."""


@dataclass(eq=False)
class Forward:
    """One forward over a kvsqueeze cache: the cache, the method compressing it and the callback observing its
    layers (either may be None), each layer's queries as attention saw them, and the layers the hooks reached."""

    cache: Any  # the SqueezeCache
    method: Any = None
    observer: Callable | None = None
    queries: dict = field(default_factory=dict)  # layer index -> its queries [batch, heads, new, head_dim]
    reached: set[int] = field(default_factory=set)
    _token: Token | None = field(default=None, repr=False)

    def layer(self, index: int):
        return self.cache.layers[index] if index < len(self.cache.layers) else None

    @property
    def watched(self) -> bool:
        """Whether a method or an observer acts after each layer (else the forward only reads the cache)."""
        return self.method is not None or self.observer is not None

    def unreached(self) -> list[int]:
        """The compressible layers of the cache the layer hooks did not see in this forward."""
        return [i for i in self.cache.compressible if i not in self.reached]


_current: ContextVar[Forward | None] = ContextVar("kvsqueeze_forward", default=None)


def current() -> Forward | None:
    """The forward this thread (or task) is running over a kvsqueeze cache, if any."""
    return _current.get()


def begin(forward: Forward) -> Forward:
    forward._token = _current.set(forward)
    return forward


def end(forward: Forward) -> None:
    if forward._token is not None:
        _current.reset(forward._token)
        forward._token = None
