"""Every compression method, one file each, registered by name."""

import difflib
import importlib
import inspect
import json
import pkgutil

from .base import REGISTRY, Method, ScorerMethod, as_scorer

# every module of this package is a method's (or what methods share): importing them registers the methods, so a
# new method is one file dropped here
for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

from .knorm import l2_compress  # noqa: E402  the L2-norm paper's own entry point
from .observed_attention import MissingAttentionWeights  # noqa: E402

globals().update({cls.__name__: cls for cls in REGISTRY.values()})
__all__ = sorted(cls.__name__ for cls in REGISTRY.values())


# the method the demo, `kvsqueeze ask`, the ui and the server use when none is named: chosen by measurement, the best
# on the leaderboard (docs/leaderboard.md) among the methods within 1.10x of a plain prefill (docs/method-cost.md)
DEFAULT = "leverage_score"


class UnknownMethodError(KeyError):
    def __str__(self):
        return self.args[0]


def registry_name(name: str) -> str:
    """The registry name `name` spells, whatever its case and separators ("SnapKV", "snap-kv", "streaming-llm");
    raises UnknownMethodError with the closest names when none."""
    if not isinstance(name, str):
        raise TypeError(f"a method name is a string; got {type(name).__name__}")
    squeezed = {key.replace("_", ""): key for key in REGISTRY}
    key = squeezed.get(name.lower().replace("-", "").replace("_", "").replace(" ", ""))
    if key is None:
        close = difflib.get_close_matches(name.lower().replace("-", "_"), list(REGISTRY), n=3, cutoff=0.6)
        hint = f"did you mean {' or '.join(repr(c) for c in close)}? " if close else ""
        raise UnknownMethodError(f"unknown method {name!r}; {hint}available: {', '.join(sorted(REGISTRY))}")
    return key


def method(name: str, **kwargs) -> Method:
    """Build a method from its registry name, e.g. `method("snapkv", ratio=0.5)`."""
    return REGISTRY[registry_name(name)](**kwargs)


def parse_params(params: list[str] | None) -> dict:
    """`key=value` pairs; values are read as JSON when they parse (numbers, booleans), else as strings."""
    parsed = {}
    for item in params or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"a method parameter is key=value; got {item!r}")
        try:
            parsed[key] = json.loads(value)
        except json.JSONDecodeError:
            parsed[key] = value
    return parsed


def build(spec: str, ratio: float | None = None, budget: int | None = None, params: list[str] | None = None) -> Method:
    """A method from text, as the command line and the evaluation give it: "snapkv", or
    "think:key_channel_ratio=0.5,window_size=32"; `ratio` / `budget` go to methods that take them."""
    name, _, inline = spec.partition(":")
    registry = available()
    key = registry_name(name)
    accepted = inspect.signature(registry[key]).parameters
    kwargs = parse_params([p for p in inline.split(",") if p]) | parse_params(params)
    if budget is not None:
        kwargs["budget"] = budget
    elif "ratio" in accepted and "ratio" not in kwargs:
        kwargs["ratio"] = 0.5 if ratio is None else ratio
    elif ratio is not None and "ratio" not in accepted:
        raise ValueError(f"{key} takes no ratio; set its parameters instead ({', '.join(accepted)})")
    unknown = set(kwargs) - set(accepted)
    if unknown:
        raise ValueError(f"{key} has no parameter {', '.join(sorted(unknown))}; it takes {', '.join(accepted)}")
    return registry[key](**kwargs)


def available() -> dict[str, type[Method]]:
    """Registry name -> method class, sorted by name."""
    return dict(sorted(REGISTRY.items()))
