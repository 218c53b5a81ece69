"""What each quantizer really holds on the bundled model, and how close it stays to the full cache.

Compresses one needle haystack (`--tokens`) with every quantizer alone, and reports from the cache's
tensors: bytes held (all layers, as a share of the full float32 cache), the bytes of the quantized
pages and their index as a share of the same tokens in float16, the full-precision window, and the
relative error of the decoded keys and values against the full cache. Prints JSON lines.

    python benchmarks/quantized_bytes.py --tokens 3000 --quant kivi-2,kivi-4,kvquant-4,gear-4
"""

import argparse
import json

import torch

import kvsqueeze
from kvsqueeze.evaluation.needle import needle_sample


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=3000)
    parser.add_argument("--quant", default="kivi-2,kivi-4,kvquant-2,kvquant-4,gear-2,gear-4")
    args = parser.parse_args()
    model, tokenizer = kvsqueeze.load()
    sample = needle_sample(tokenizer, args.tokens, 0.5, seed=0)
    full = kvsqueeze.compress(model, tokenizer, sample.context)
    for spec in args.quant.split(","):
        ctx = kvsqueeze.compress(model, tokenizer, sample.context, quantizer=spec)
        layers = ctx.cache.layers
        quantized_tokens = sum(int(layer.lengths.sum()) for layer in layers)
        head_dim = layers[0].head_dim
        page_bytes = sum(layer.pages_k.nbytes + layer.pages_v.nbytes + layer.page_segment.nbytes
                         + layer.page_fill.nbytes for layer in layers)
        window_bytes = sum(layer.tail_k.nbytes + layer.tail_v.nbytes for layer in layers)
        errors = {"keys": [], "values": []}
        for layer, reference in zip(layers, full.cache.layers):
            keys, values, _ = layer.dense_view()
            for name, got, expected in (("keys", keys, reference.keys), ("values", values, reference.values)):
                errors[name].append(((got - expected).norm() / expected.norm()).item())
        print(json.dumps({
            "quantizer": spec, "tokens": ctx.stats.context_tokens,
            "bytes_held_mib": round(ctx.nbytes() / 2**20, 2), "full_cache_mib": round(full.nbytes() / 2**20, 2),
            "share_of_full_fp32": round(ctx.nbytes() / full.nbytes(), 4),
            "quantized_tokens_per_head": quantized_tokens / (len(layers) * layers[0].heads),
            "pages_share_of_fp16": round(page_bytes / (quantized_tokens * head_dim * 2 * 2), 4),
            "full_precision_window_mib": round(window_bytes / 2**20, 2),
            "key_error": round(sum(errors["keys"]) / len(layers), 4),
            "value_error": round(sum(errors["values"]) / len(layers), 4)}), flush=True)


if __name__ == "__main__":
    kvsqueeze.release_freed_memory()  # freed cache memory goes back to the OS
    with torch.no_grad():
        main()
