"""Saved compressed contexts: the cache's layers, the context's token ids and provenance, in one safetensors file."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from .cache import SqueezeCache
from .layer import KINDS

FORMAT = "kvsqueeze-context/2"


class ModelMismatchError(ValueError):
    """A saved context is loaded onto a model other than the one it was made with."""


class CorruptContextError(ValueError):
    """A saved context file cannot be read back."""


def model_fingerprint(model) -> dict:
    """What a saved context must agree on with the model it is loaded onto."""
    config = model.config.get_text_config()
    weights = model.get_input_embeddings().weight
    return {
        "model_type": config.model_type,
        "num_hidden_layers": config.num_hidden_layers,
        "num_key_value_heads": config.num_key_value_heads,
        "hidden_size": config.hidden_size,
        "vocab_size": config.vocab_size,
        "name_or_path": getattr(model.config, "_name_or_path", ""),
        "embedding_sample": [round(v, 4) for v in weights[:2, :8].float().flatten().tolist()],
    }


def write(path: str | Path, model, cache: SqueezeCache, context_ids: torch.Tensor, context_mask: torch.Tensor | None,
          method: dict | None, stats: dict) -> None:
    """Write `cache` (made by `model` from `context_ids`, left-padded as `context_mask` says, by `method`: its name,
    repr and settings) to `path`."""
    tensors = {"context_ids": context_ids.contiguous()}
    if context_mask is not None:
        tensors["context_mask"] = context_mask.contiguous()
    layers = []
    for i, layer in enumerate(cache.layers):
        layer_tensors, numbers = layer.to_saved()
        tensors |= {f"layers.{i}.{name}": t.contiguous() for name, t in layer_tensors.items()}
        layers.append({"kind": layer.kind, "numbers": numbers})
    metadata = {"format": FORMAT, "model": json.dumps(model_fingerprint(model)), "layers": json.dumps(layers),
                "method": json.dumps(method), "stats": json.dumps(stats)}
    save_file({k: v.cpu() for k, v in tensors.items()}, str(path), metadata=metadata)


def read(path: str | Path, model) -> tuple[SqueezeCache, torch.Tensor, torch.Tensor | None, dict]:
    """(cache, context ids, context mask, statistics) of a context `write` saved, checking that `model` made it."""
    try:
        with safe_open(str(path), "pt") as f:
            metadata = f.metadata() or {}
        tensors = load_file(str(path), device=str(model.device))
    except (SafetensorError, OSError, ValueError) as error:
        raise CorruptContextError(f"{path} is not a readable kvsqueeze context: {error}") from error
    if metadata.get("format") != FORMAT:
        raise CorruptContextError(f"{path} is not a kvsqueeze context (format {metadata.get('format')!r})")
    try:
        saved_model = json.loads(metadata["model"])
        layers = json.loads(metadata["layers"])
        stats = json.loads(metadata["stats"])
        context_ids = tensors["context_ids"].cpu()
        context_mask = tensors["context_mask"].cpu() if "context_mask" in tensors else None
    except (KeyError, TypeError, json.JSONDecodeError) as error:
        raise CorruptContextError(f"{path} has missing or damaged metadata: {error}") from error
    current = model_fingerprint(model)
    different = [k for k in saved_model if k not in ("name_or_path", "embedding_sample")
                 and saved_model[k] != current.get(k)]
    sample_differs = not torch.allclose(torch.tensor(saved_model["embedding_sample"]),
                                        torch.tensor(current["embedding_sample"]), atol=1e-2, rtol=1e-2)
    if different or sample_differs:
        what = ", ".join(f"{k}: saved {saved_model[k]} vs {current.get(k)}" for k in different) or "weights differ"
        raise ModelMismatchError(f"{path} was made with another model ({saved_model['name_or_path']}): {what}")
    cache = SqueezeCache(layers=[layer_of(tensors, i, entry, path) for i, entry in enumerate(layers)])
    return cache, context_ids, context_mask, stats


def layer_of(tensors: dict, index: int, entry: dict, path) -> object:
    prefix = f"layers.{index}."
    try:
        kind = KINDS[entry["kind"]]
        return kind.from_saved({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)},
                               entry["numbers"])
    except (KeyError, TypeError, ValueError, AttributeError, RuntimeError) as error:
        raise CorruptContextError(f"{path}: layer {index} cannot be rebuilt: {error}") from error
