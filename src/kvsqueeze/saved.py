"""Saved compressed contexts: the cache's layers, the context's token ids and provenance, in one safetensors file.

A file is verified, not trusted: its metadata lists every tensor with its dtype, shape and SHA-256, and
a fingerprint of the model's weights; loading checks all of them (`CorruptContextError`,
`ModelMismatchError` naming what differs). Files saved before verification existed load with a warning.
"""

from __future__ import annotations

import hashlib
import json
import math
import warnings
from pathlib import Path
from weakref import WeakKeyDictionary

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from .cache import SqueezeCache
from .layer import KINDS

FORMAT = "kvsqueeze-context/3"
UNVERIFIED = "kvsqueeze-context/2"  # before checksums and the weights' fingerprint
SAMPLES = 16  # entries of each weight sampled at a fixed stride, besides its sum and sum of squares


class ModelMismatchError(ValueError):
    """A saved context is loaded onto a model other than the one it was made with."""


class CorruptContextError(ValueError):
    """A saved context file is missing something, or something in it was cut or altered."""


class UnverifiedContextWarning(UserWarning):
    """A context saved before kvsqueeze verified its files: it loads, unchecked."""


def config_fingerprint(model) -> dict:
    """The configuration fields a cache depends on: architecture, shapes, rotary settings."""
    config = model.config.get_text_config()
    names = ("model_type", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "hidden_size",
             "head_dim", "vocab_size", "rope_theta", "rope_scaling", "rope_parameters", "partial_rotary_factor",
             "sliding_window", "layer_types", "max_position_embeddings")
    return {name: getattr(config, name) for name in names if _jsonable(getattr(config, name, None))}


def _jsonable(value) -> bool:
    try:
        json.dumps(value)
        return value is not None
    except (TypeError, ValueError):
        return False


_fingerprints: WeakKeyDictionary = WeakKeyDictionary()  # model -> (the weights' versions, their fingerprint)


@torch.no_grad()
def weights_fingerprint(model) -> dict[str, list[float]]:
    """Per weight of the model that shapes the cache (all but an untied output head): its sum, its sum of squares
    and `SAMPLES` entries at a fixed stride, in float64. Any change of a layer's weights alters it (a scaled
    projection, another model of the same shape); it is computed where the weights are, once per state of the
    weights (an in-place change bumps a tensor's version)."""
    head = model.get_output_embeddings()
    base = getattr(model, "base_model_prefix", "")
    weights = [(name, w) for name, w in model.named_parameters()
               if head is None or name.startswith(base) or all(w is not p for p in head.parameters())]
    versions = tuple((w.data_ptr(), w._version) for _, w in weights)
    cached = _fingerprints.get(model)
    if cached is not None and cached[0] == versions:
        return cached[1]
    found = {}
    for name, weight in weights:
        flat = weight.detach().reshape(-1)
        values = flat.double()
        found[name] = [values.sum().item(), values.square().sum().item()] + \
            values[::max(1, flat.numel() // SAMPLES)][:SAMPLES].tolist()
        del values
    _fingerprints[model] = (versions, found)
    return found


def model_fingerprint(model) -> dict:
    """What a saved context must agree on with the model it is loaded onto."""
    return {"config": config_fingerprint(model), "weights": weights_fingerprint(model),
            "name_or_path": getattr(model.config, "_name_or_path", "")}


def checksum(tensor: torch.Tensor) -> str:
    return hashlib.sha256(tensor.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy()).hexdigest()


def write(path: str | Path, model, cache: SqueezeCache, context_ids: torch.Tensor, context_mask: torch.Tensor | None,
          method: dict | None, stats: dict) -> None:
    """Write `cache` (made by `model` from `context_ids`, left-padded as `context_mask` says, by `method`: its name,
    repr and settings) to `path`, with every tensor's dtype, shape and checksum."""
    tensors = {"context_ids": context_ids.contiguous()}
    if context_mask is not None:
        tensors["context_mask"] = context_mask.contiguous()
    layers = []
    for i, layer in enumerate(cache.layers):
        layer_tensors, numbers = layer.to_saved()
        tensors |= {f"layers.{i}.{name}": t.contiguous() for name, t in layer_tensors.items()}
        layers.append({"kind": layer.kind, "numbers": numbers})
    tensors = {name: t.cpu() for name, t in tensors.items()}
    listing = {name: {"dtype": str(t.dtype), "shape": list(t.shape), "sha256": checksum(t)} for name, t in tensors.items()}
    metadata = {"format": FORMAT, "model": json.dumps(model_fingerprint(model)), "layers": json.dumps(layers),
                "tensors": json.dumps(listing), "method": json.dumps(method), "stats": json.dumps(stats)}
    save_file(tensors, str(path), metadata=metadata)


def read(path: str | Path, model) -> tuple[SqueezeCache, torch.Tensor, torch.Tensor | None, dict]:
    """(cache, context ids, context mask, statistics) of a context `write` saved, verified, checking that `model`
    made it."""
    try:
        with safe_open(str(path), "pt") as f:
            metadata = f.metadata() or {}
        tensors = load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as error:
        raise CorruptContextError(f"{path} is not a readable kvsqueeze context (cut or damaged?): {error}") from error
    if metadata.get("format") not in (FORMAT, UNVERIFIED):
        raise CorruptContextError(f"{path} is not a kvsqueeze context (format {metadata.get('format')!r})")
    try:
        saved_model = json.loads(metadata["model"])
        layers = json.loads(metadata["layers"])
        stats = json.loads(metadata["stats"])
        listing = json.loads(metadata["tensors"]) if metadata["format"] == FORMAT else None
    except (KeyError, TypeError, json.JSONDecodeError) as error:
        raise CorruptContextError(f"{path} has missing or damaged metadata: {error}") from error
    if listing is None:
        warnings.warn(f"{path} was saved by an earlier kvsqueeze, without checksums or the model's weights: it cannot "
                      "be verified. Load it where you trust it, and save it again (ctx.save) to verify it from now on.",
                      UnverifiedContextWarning, stacklevel=3)
    else:
        try:
            verify(path, tensors, listing)
            check_model(path, saved_model, model)
        except (KeyError, TypeError, AttributeError, IndexError) as error:
            raise CorruptContextError(f"{path} has damaged metadata: {error!r}") from error
    tensors = {name: t.to(model.device) for name, t in tensors.items()}
    if "context_ids" not in tensors:
        raise CorruptContextError(f"{path} holds no context token ids")
    context_ids, context_mask = tensors["context_ids"].cpu(), tensors.get("context_mask")
    cache = SqueezeCache(layers=[layer_of(tensors, i, entry, path) for i, entry in enumerate(layers)])
    if len(cache.layers) != model.config.get_text_config().num_hidden_layers:
        raise ModelMismatchError(f"{path} holds {len(cache.layers)} layers; the model has "
                                 f"{model.config.get_text_config().num_hidden_layers}")
    lengths = {cache.layers[i].seen for i in cache.compressible}
    if lengths and lengths != {context_ids.shape[1]}:
        raise CorruptContextError(f"{path}: the cache has seen {sorted(lengths)} tokens but holds "
                                  f"{context_ids.shape[1]} context token ids")
    return cache, context_ids, None if context_mask is None else context_mask.cpu(), stats


def verify(path, tensors: dict[str, torch.Tensor], listing: dict[str, dict]) -> None:
    """Every tensor the metadata names is there, with its dtype, shape and checksum; nothing else is."""
    missing = sorted(set(listing) - set(tensors))
    if missing:
        raise CorruptContextError(f"{path} is missing {', '.join(missing)}")
    unexpected = sorted(set(tensors) - set(listing))
    if unexpected:
        raise CorruptContextError(f"{path} holds tensors its metadata does not list: {', '.join(unexpected)}")
    for name, expected in listing.items():
        tensor = tensors[name]
        if str(tensor.dtype) != expected["dtype"] or list(tensor.shape) != expected["shape"]:
            raise CorruptContextError(f"{path}: {name} is {tensor.dtype} {list(tensor.shape)}, saved as "
                                      f"{expected['dtype']} {expected['shape']}")
        if checksum(tensor) != expected["sha256"]:
            raise CorruptContextError(f"{path}: the bytes of {name} were altered (checksum)")


def check_model(path, saved: dict, model) -> None:
    """The model's configuration and weights are the ones the context was made with."""
    current = model_fingerprint(model)
    config = {k: (v, current["config"].get(k)) for k, v in saved["config"].items() if current["config"].get(k) != v}
    if config:
        what = ", ".join(f"{k}: saved {a} vs {b}" for k, (a, b) in config.items())
        raise ModelMismatchError(f"{path} was made with another model ({saved['name_or_path']}): {what}")
    weights = saved["weights"]
    differing = [name for name in weights if name not in current["weights"]
                 or not all(math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-9)
                            for a, b in zip(weights[name], current["weights"][name]))]
    if differing or set(weights) != set(current["weights"]):
        named = differing[:3] or sorted(set(current["weights"]) ^ set(weights))[:3]
        raise ModelMismatchError(f"{path} was made with other weights ({saved['name_or_path']}): "
                                 f"{', '.join(named)}{' ...' if len(differing) > 3 else ''} differ")


def layer_of(tensors: dict, index: int, entry: dict, path) -> object:
    prefix = f"layers.{index}."
    try:
        kind = KINDS[entry["kind"]]
        return kind.from_saved({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)},
                               entry["numbers"])
    except (KeyError, TypeError, ValueError, AttributeError, RuntimeError) as error:
        raise CorruptContextError(f"{path}: layer {index} cannot be rebuilt: {error}") from error
