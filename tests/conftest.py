"""Shared fixtures: tiny random models of several families (milliseconds to build) and the bundled SmolLM2."""

import contextlib
import inspect
import logging

import pytest
import torch
from transformers import (AutoModelForCausalLM, Gemma3TextConfig, LlamaConfig, LlamaModel, MistralConfig, Phi3Config,
                          Qwen2Config, Qwen3Config)

COMMON = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, max_position_embeddings=512, bos_token_id=1, eos_token_id=2,
              pad_token_id=0)

FAMILIES = {
    "llama": (LlamaConfig, {}),
    "mistral": (MistralConfig, {"sliding_window": None}),
    "qwen2": (Qwen2Config, {}),
    "qwen3": (Qwen3Config, {}),  # query/key norms
    "phi3": (Phi3Config, {}),  # fused qkv projection
    # sliding-window layers with a window shorter than the test contexts, and one global layer
    "gemma3": (Gemma3TextConfig, {"sliding_window": 16,
                                  "layer_types": ["sliding_attention", "full_attention", "sliding_attention",
                                                  "full_attention"]}),
}


def tiny_model(family: str = "llama", attn: str = "sdpa", seed: int = 0, **overrides):
    config_class, extra = FAMILIES[family]
    config = config_class(**(COMMON | extra | overrides))
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, attn_implementation=attn).eval()


def random_ids(n: int, seed: int = 0, vocab: int = 256) -> torch.Tensor:
    return torch.randint(3, vocab, (1, n), generator=torch.Generator().manual_seed(seed))


class Collected(logging.Handler):
    """The messages of the records a logger emits."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def deprecations(messages: list[str]) -> list[str]:
    return [m for m in messages if "deprecat" in m.lower()]


@contextlib.contextmanager
def no_logged_deprecation():
    """Fails (AssertionError) when transformers logs a deprecation inside the block. The handler sits on
    transformers' own logger, which does not pass its records on to the root logger that pytest captures."""
    logger, collected = logging.getLogger("transformers"), Collected()
    logger.addHandler(collected)
    try:
        yield collected
    finally:
        logger.removeHandler(collected)
    deprecated = deprecations(collected.messages)
    assert not deprecated, f"transformers deprecation: {deprecated[0]}"


@pytest.fixture(autouse=True)
def transformers_deprecations_fail():
    """A deprecation transformers logs (rather than warns) about something a test or kvsqueeze used fails the test,
    so that the next rename breaks the suite while the old name still works. (Warned deprecations are errors
    through pytest's filterwarnings, see pyproject.toml.)"""
    with no_logged_deprecation():
        yield


@pytest.fixture(params=list(FAMILIES))
def family(request):
    return request.param


@pytest.fixture(scope="session")
def bundled():
    import kvsqueeze
    return kvsqueeze.load()


def head_table(model, seed: int = 0) -> torch.Tensor:
    config = model.config.get_text_config()
    return torch.rand(config.num_hidden_layers, config.num_key_value_heads, generator=torch.Generator().manual_seed(seed))


def layer_types(config):
    from kvsqueeze.cache import layer_types as types

    return types(config)


def build_method(name: str, ratio: float, model):
    """Any registered method at a compression ratio; methods without a ratio get settings that remove about as much
    (at ratio 0: nothing at all)."""
    import kvsqueeze

    cls = kvsqueeze.available()[name]
    if name == "dms":
        return cls(threshold=float("-inf") if ratio == 0 else float("inf"), window_size=8)
    if name == "simlayerkv":
        return cls(lazy_threshold=2.0 if ratio == 0 else 0.0, n_initial=4, n_recent=8)
    if name == "think":
        return cls(key_channel_ratio=ratio)
    if name == "duo_attention":
        return cls(head_patterns=head_table(model), sparsity=ratio, sink_size=4, recent_size=8)
    if name == "lukv":  # curves from random head utilities over 64 ranks (real ones: kvsqueeze calibrate lukv)
        from kvsqueeze.methods.lukv import budget_curves
        full = [i for i, kind in enumerate(layer_types(model.config)) if kind == "full_attention"]
        gains = (1 + head_table(model, seed=1))[..., None] / torch.arange(1, 65)  # [layers, kv heads, ranks]
        return cls(ratio=ratio, curves=budget_curves([gains], full))
    if name == "headkv":
        return cls(ratio=ratio, head_scores=head_table(model))
    if name == "qfilter":  # random filters of the model's shape (real ones: kvsqueeze calibrate qfilter)
        config = model.config.get_text_config()
        return cls(ratio=ratio, filters=torch.randn(config.num_hidden_layers, config.num_key_value_heads,
                                                    config.head_dim, generator=torch.Generator().manual_seed(0)))
    if name in ("decoding_budget", "h2o", "scissorhands"):
        return cls(budget=10**6 if ratio == 0 else 64)
    if name == "minicache":  # at ratio 0 every token is retained unmerged
        return cls(retention=1.0 if ratio == 0 else 0.05)
    if name == "per_layer_compression":  # the ratio on average: half of it in the first layers, 1.5x in the last
        n = sum(kind == "full_attention" for kind in layer_types(model.config))
        return cls(ratios=[ratio * (0.5 + i / max(n - 1, 1)) for i in range(n)])
    if name == "composed":  # evicts tokens, then prunes key channels of the rest
        return cls([kvsqueeze.SnapKV(ratio=ratio), kvsqueeze.ThinK(key_channel_ratio=ratio / 2)])
    if name == "quest":  # reads a budget of tokens while decoding; holds everything
        return cls(budget=10**6 if ratio == 0 else 64)
    if name == "minference":  # sparse prefill attention; holds everything
        return cls(vertical_size=64, slash_size=10**6 if ratio == 0 else 64)
    if name == "kvzap":  # an untrained surrogate: the tests need its shape, not its skill
        from kvsqueeze.methods.kvzap import Surrogate
        return cls(ratio=ratio, surrogate=Surrogate.for_model(model))
    if name == "fastkvzip":  # untrained gates: the tests need their shape, not their skill
        from kvsqueeze.methods.fastkvzip import Gates
        return cls(ratio=ratio, gates=Gates.for_model(model))
    if name == "restorekv":  # untrained restore tokens and adapter: the tests need their shape, not their skill
        from kvsqueeze.methods.restorekv import RestoreAdapter
        return cls(ratio=ratio, adapter=RestoreAdapter.for_model(model))
    if name == "rolling_streaming_llm":
        return cls(window=10**6 if ratio == 0 else 64, interval=8)
    return cls(ratio=ratio)


RATIO_METHODS = ["lukv", "adakv", "block", "chunk", "finch", "key_rerotation", "cam", "nacl", "cap", "entropy_gated_chunkkv", "kvgrad", "chunkkv", "critical_adakv", "criticalkv", "cur", "expected_attention", "headkv", "keydiff", "knorm", "kvcompose", "kvzip", "restorekv",
                 "lagkv", "leverage_score", "non_causal_attention", "compactor", "merging", "observed_attention", "pyramidkv", "random", "snapkv", "streaming_llm", "tova"]


CACHE_ARGUMENT = "cache" if "cache" in inspect.signature(LlamaModel.forward).parameters else "past_key_values"


def cached(cache) -> dict:
    """The keyword arguments that hand `cache` to a model under the installed transformers (`cache=` from 5.24)."""
    return {CACHE_ARGUMENT: cache}


def forward_cache(kwargs: dict):
    """The cache a model's forward was called with, from a hook's kwargs."""
    return kwargs[CACHE_ARGUMENT]


def output_cache(out):
    """The cache a model's (or generate's) output carries."""
    return out[CACHE_ARGUMENT]
