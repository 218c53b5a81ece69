"""Every compression method, one file each, registered by name."""

from .adakv import AdaKV
from .base import REGISTRY, Method, ScorerMethod, as_scorer
from .critical_adakv import CriticalAdaKV
from .criticalkv import CriticalKV
from .dms import DMS
from .duo_attention import DuoAttention
from .expected_attention import ExpectedAttention
from .headkv import HeadKV
from .keydiff import KeyDiff
from .knorm import KNorm, l2_compress
from .observed_attention import MissingAttentionWeights, ObservedAttention
from .pyramidkv import PyramidKV
from .simlayerkv import SimLayerKV
from .random import Random
from .snapkv import SnapKV
from .streaming_llm import StreamingLLM
from .think import ThinK
from .tova import TOVA


__all__ = ["AdaKV", "CriticalAdaKV", "CriticalKV", "DMS", "DuoAttention", "ExpectedAttention", "HeadKV", "KeyDiff",
           "KNorm", "ObservedAttention", "PyramidKV", "Random", "SimLayerKV", "SnapKV", "StreamingLLM", "ThinK", "TOVA"]


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
