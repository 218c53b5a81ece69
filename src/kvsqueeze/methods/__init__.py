"""Every compression method, one file each, registered by name."""

from .base import REGISTRY, Method, ScorerMethod
from .expected_attention import ExpectedAttention
from .keydiff import KeyDiff
from .knorm import KNorm, l2_compress
from .observed_attention import MissingAttentionWeights, ObservedAttention
from .pyramidkv import PyramidKV
from .random import Random
from .snapkv import SnapKV
from .streaming_llm import StreamingLLM
from .tova import TOVA


__all__ = ["ExpectedAttention", "KeyDiff", "KNorm", "ObservedAttention", "PyramidKV", "Random", "SnapKV",
           "StreamingLLM", "TOVA"]


class UnknownMethodError(KeyError):
    def __str__(self):
        return self.args[0]


def method(name: str, **kwargs) -> Method:
    """Build a method from its registry name, e.g. `method("snapkv", ratio=0.5)`."""
    key = name.lower().replace("-", "_")
    if key not in REGISTRY:
        raise UnknownMethodError(f"unknown method {name!r}; available: {', '.join(sorted(REGISTRY))}")
    return REGISTRY[key](**kwargs)


def available() -> dict[str, type[Method]]:
    """Registry name -> method class, sorted by name."""
    return dict(sorted(REGISTRY.items()))
