"""Shared fixtures: tiny random models of several families (milliseconds to build) and the bundled SmolLM2."""

import pytest
import torch
from transformers import (AutoModelForCausalLM, Gemma3TextConfig, LlamaConfig, MistralConfig, Phi3Config, Qwen2Config,
                          Qwen3Config)

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


@pytest.fixture(params=list(FAMILIES))
def family(request):
    return request.param


@pytest.fixture(scope="session")
def bundled():
    import kvsqueeze
    return kvsqueeze.load()
