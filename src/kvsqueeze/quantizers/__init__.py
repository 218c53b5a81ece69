"""Quantizers a cache layer stores its kept tokens with, one file each, registered by name."""

from .base import REGISTRY, QuantizedPages, Quantizer
from .gear import GEAR
from .kivi import KIVI
from .kvquant import KVQuant

__all__ = ["GEAR", "KIVI", "KVQuant", "QuantizedPages", "Quantizer", "quantizer"]


def quantizer(spec: "str | dict | Quantizer | None") -> Quantizer | None:
    """A quantizer from its name and bits, as the command line gives it ("kivi-2", "gear-4", "kvquant"), from
    a saved spec ({"name": "kivi", "bits": 2, ...}), or an instance (returned as it is)."""
    if spec is None or isinstance(spec, Quantizer):
        return spec
    if isinstance(spec, dict):
        settings = dict(spec)
        name = settings.pop("name")
        if name not in REGISTRY:
            raise ValueError(f"unknown quantizer {name!r}; available: {', '.join(sorted(REGISTRY))}")
        return REGISTRY[name](**settings)
    name, _, bits = spec.lower().partition("-")
    if name not in REGISTRY:
        raise ValueError(f"unknown quantizer {spec!r}; available: {', '.join(sorted(REGISTRY))} "
                         "(with the bits after a dash, e.g. kivi-2)")
    if bits and not bits.isdigit():
        raise ValueError(f"the bits of a quantizer are a number, as in kivi-2; got {spec!r}")
    return REGISTRY[name](**({"bits": int(bits)} if bits else {}))
