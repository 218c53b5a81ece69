"""How kvsqueeze runs inside a model's forward: hooks on the model and on its attention modules.

`attached(model)` routes the model's attention through kvsqueeze and registers three hooks, once per
model however many threads use it, and undoes all of it when the last user exits: a pre-hook on the model
that starts each forward's `Forward` state (finding or making its `SqueezeCache`), a hook on every
attention module that hands the layer, once it has attended, to the forward's method and observer, and
a hook on the model that ends the forward and raises if the method missed a layer it compresses.
What a forward does depends only on the thread (or task) running it: `applied(model, method)` and
`observing(model, callback)` say which method compresses, and which callback observes, the forwards of
this thread. Nothing in the model's code is patched.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Callable
from weakref import WeakKeyDictionary

import torch
import transformers
from torch import nn

from . import attention, forward, models
from .cache import SqueezeCache
from .context import LayerContext
from .convert import squeeze_cache_for
from .forward import CompressionNotAppliedError, Forward


@dataclass(frozen=True)
class Role:
    """What this thread's forwards of `model` run: a method compressing, a callback observing (either may be None)."""

    model: nn.Module
    method: Any = None
    observer: Callable | None = None


_roles: ContextVar[tuple[Role, ...]] = ContextVar("kvsqueeze_roles", default=())
_calls: ContextVar[tuple[Forward | None, ...]] = ContextVar("kvsqueeze_calls", default=())


def role_of(model: nn.Module) -> Role | None:
    """The innermost role this thread gave `model`, if any."""
    return next((role for role in reversed(_roles.get()) if role.model is model), None)


def model_hooks(model: nn.Module):
    """The pre-hook that starts each forward of `model` (its cache, its `Forward` state, the method's look at its
    arguments) and the hook that ends it, raising if the method or observer missed a compressible layer."""
    name = models.cache_argument(model)

    def pre_hook(module, args, kwargs):
        # first of all, so that the hook below (always called, even when this one raises) ends this call
        _calls.set(_calls.get() + (None,))
        role = role_of(model)
        given = [kwargs.pop(alias) for alias in models.CACHE_ARGUMENTS if kwargs.get(alias) is not None]
        cache = given[0] if given else None
        if role is not None and kwargs.get("use_cache") is not False:
            cache = squeeze_cache_for(model, cache)
        if cache is not None:
            kwargs[name] = cache
        if isinstance(cache, SqueezeCache):
            state = forward.begin(Forward(cache, role and role.method, role and role.observer))
            _calls.set(_calls.get()[:-1] + (state,))
        if role is not None and role.method is not None:
            role.method.before_forward(kwargs)
        return args, kwargs

    def hook(module, args, kwargs, output):
        state = end_call()
        missed = [] if state is None or not state.watched else state.unreached()
        if output is not None and missed:
            who = type(state.method or state.observer).__name__
            raise CompressionNotAppliedError(
                f"{who} was applied but did not reach layers {missed} of {type(model).__name__} "
                f"(transformers {transformers.__version__}): nothing was compressed there. This transformers release "
                "may route attention differently from the releases kvsqueeze supports.")

    return pre_hook, hook


def end_call() -> Forward | None:
    """End the innermost forward this thread started on a hooked model; its state, if it had one."""
    calls = _calls.get()
    _calls.set(calls[:-1])
    state = calls[-1] if calls else None
    if state is not None:
        forward.end(state)
    return state


def layer_hook(rotary: nn.Module | None):
    """The hook after each attention module: the forward's observer, then its method, see the layer; then what the
    layer holds is stored as its quantizer says."""

    def after_attention(module, args, kwargs, output):
        state = forward.current()
        if state is None:
            return
        index = module.layer_idx
        queries = state.queries.pop(index, None)
        layer = state.layer(index)
        if not state.watched or layer is None or not layer.compressible or not layer.is_initialized:
            return  # only read, or a layer bounded by the model itself (a sliding window)
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        if not isinstance(hidden, torch.Tensor):
            raise attention.UnsupportedModelError(
                f"{type(module).__name__} got no hidden states as its first argument (transformers "
                f"{transformers.__version__}): kvsqueeze cannot hand them to a method")
        weights = output[1] if isinstance(output, tuple) and len(output) > 1 else None
        ctx = LayerContext(module, state.cache, hidden, kwargs.get("position_embeddings"), weights, queries, rotary)
        with torch.no_grad():
            if state.observer is not None:
                state.observer(ctx)
            if state.method is not None and state.method.acts_on(ctx):
                state.method.compress(ctx)
        state.cache.quantize(index)
        state.reached.add(index)

    return after_attention


@dataclass
class Attachment:
    users: int
    implementation: str  # the model's own attention implementation, given back at the end
    handles: list


_attachments: WeakKeyDictionary = WeakKeyDictionary()
_lock = threading.Lock()


def attach(model: nn.Module) -> None:
    """Route `model` through kvsqueeze (see the module's docstring); counted: `detach` as many times to undo it."""
    with _lock:
        attachment = _attachments.get(model)
        if attachment is not None:
            attachment.users += 1
            return
        modules = models.attention_modules(model)
        decoder = getattr(model, "base_model", model)  # model(...), generate and kvsqueeze's prefill go through it
        pre_hook, hook = model_hooks(model)
        implementation = attention.install(model)
        handles = [decoder.register_forward_pre_hook(pre_hook, with_kwargs=True),
                   decoder.register_forward_hook(hook, with_kwargs=True, always_call=True)]
        after_attention = layer_hook(models.rotary_embedding(model))
        handles += [module.register_forward_hook(after_attention, with_kwargs=True) for module in modules]
        _attachments[model] = Attachment(1, implementation, handles)


def detach(model: nn.Module) -> None:
    with _lock:
        attachment = _attachments[model]
        attachment.users -= 1
        if attachment.users == 0:
            for handle in attachment.handles:
                handle.remove()
            attention.uninstall(model, attachment.implementation)
            del _attachments[model]


@contextmanager
def attached(model: nn.Module):
    """While the block runs, the model's forwards over a kvsqueeze cache read it through kvsqueeze (its compressed
    layers, their masks); the model is given back as it was when the last user exits."""
    attach(model)
    try:
        yield model
    finally:
        detach(model)


@contextmanager
def applied(model: nn.Module, method=None, observer: Callable | None = None):
    """While the block runs, this thread's forwards of `model` are compressed by `method` after every attention layer
    and observed by `observer(ctx)` (either may be None)."""
    with attached(model):
        token = _roles.set(_roles.get() + (Role(model, method, observer),))
        try:
            yield method
        finally:
            _roles.reset(token)


def observing(model: nn.Module, callback: Callable[[LayerContext], None]):
    """While the block runs, `callback(ctx)` sees every compressible attention layer of this thread's forwards of
    `model`; nothing is compressed."""
    return applied(model, observer=callback)
