"""The state of one forward of a model under kvsqueeze, set by whatever starts the forward.

The model-level pre-hook (see `hooks`) finds or makes the forward's `SqueezeCache` and sets a `Forward`;
the layer hooks read the cache from it, so nothing depends on how transformers names the arguments of
its attention modules. Each thread, and each asyncio task, sees its own.
"""

from __future__ import annotations

from contextvars import ContextVar, Token
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .cache import SqueezeCache


class CompressionNotAppliedError(RuntimeError):
    """A method was applied to a forward but did not reach every layer it compresses (nothing is silently kept)."""


@dataclass(eq=False)
class Forward:
    """One forward: its cache, the method compressing it, and the layers the method's hooks reached."""

    cache: SqueezeCache
    method: Any = None
    reached: set[int] = field(default_factory=set)
    _token: Token | None = field(default=None, repr=False)

    def unreached(self) -> list[int]:
        """The compressible layers of the cache the method's layer hooks did not see in this forward."""
        return [i for i in self.cache.compressible if i not in self.reached]


_current: ContextVar[Forward | None] = ContextVar("kvsqueeze_forward", default=None)


def current() -> Forward | None:
    """The forward this thread (or task) is running under kvsqueeze, if any."""
    return _current.get()


def begin(forward: Forward) -> Forward:
    forward._token = _current.set(forward)
    return forward


def end(forward: Forward) -> None:
    if forward._token is not None:
        _current.reset(forward._token)
        forward._token = None
