"""Every compression method, one file each, registered by name."""

import inspect
import json

from .adakv import AdaKV
from .base import REGISTRY, Method, ScorerMethod, as_scorer
from .cap import Cap
from .block import Block
from .chunk import Chunk
from .chunkkv import ChunkKV
from .compactor import Compactor
from .composed import Composed
from .critical_adakv import CriticalAdaKV
from .criticalkv import CriticalKV
from .cur import CUR
from .decoding_budget import DecodingBudget
from .dms import DMS
from .duo_attention import DuoAttention
from .entropy_gated_chunkkv import EntropyGatedChunkKV
from .expected_attention import ExpectedAttention
from .fastkvzip import FastKVzip
from .finch import Finch
from .h2o import H2O
from .headkv import HeadKV
from .key_rerotation import KeyRerotation
from .keydiff import KeyDiff
from .knorm import KNorm, l2_compress
from .kvgrad import KVgrad
from .lagkv import LagKV
from .lukv import LUKV
from .kvcompose import KVCompose
from .kvzap import KVzap
from .kvzip import KVzip
from .leverage_score import LeverageScore
from .merging import Merging
from .minicache import MiniCache
from .minference import MInference
from .cam import CAM
from .nacl import NACL
from .scissorhands import Scissorhands
from .non_causal_attention import NonCausalAttention
from .per_layer_compression import PerLayerCompression
from .observed_attention import MissingAttentionWeights, ObservedAttention
from .pyramidkv import PyramidKV
from .qfilter import QFilter
from .quest import Quest
from .simlayerkv import SimLayerKV
from .random import Random
from .restorekv import RestoreKV
from .rolling_streaming_llm import RollingStreamingLLM
from .snapkv import SnapKV
from .streaming_llm import StreamingLLM
from .think import ThinK
from .tova import TOVA


__all__ = ["AdaKV", "Block", "Chunk", "Finch", "KeyRerotation", "MInference", "Quest", "CAM", "MiniCache", "NACL", "Scissorhands", "Cap", "EntropyGatedChunkKV", "KVgrad", "ChunkKV", "Compactor", "Composed", "CriticalAdaKV", "CriticalKV", "CUR", "DecodingBudget", "DMS", "DuoAttention", "ExpectedAttention", "FastKVzip", "H2O",
           "HeadKV", "KeyDiff", "KNorm", "KVCompose", "KVzap", "KVzip", "LagKV", "LUKV", "LeverageScore", "Merging", "NonCausalAttention", "ObservedAttention", "PerLayerCompression", "PyramidKV", "QFilter", "Random", "RestoreKV", "RollingStreamingLLM", "SimLayerKV",
           "SnapKV", "StreamingLLM", "ThinK", "TOVA"]


class UnknownMethodError(KeyError):
    def __str__(self):
        return self.args[0]


def method(name: str, **kwargs) -> Method:
    """Build a method from its registry name, e.g. `method("snapkv", ratio=0.5)`."""
    key = name.lower().replace("-", "_")
    if key not in REGISTRY:
        raise UnknownMethodError(f"unknown method {name!r}; available: {', '.join(sorted(REGISTRY))}")
    return REGISTRY[key](**kwargs)


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
    key = name.lower().replace("-", "_")
    if key not in registry:
        raise UnknownMethodError(f"unknown method {name!r}; available: {', '.join(registry)}")
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
