"""What each quantizer really holds on the bundled model, how close it stays to the full cache, how fast it decodes.

Compresses one needle haystack (`--tokens`) with every quantizer alone, and reports from the cache's
tensors: bytes held (all layers, as a share of the full float32 cache), the bytes of the quantized
pages and their index as a share of the same tokens in float16, the full-precision window, and the
relative error of the decoded keys and values against the full cache. With `--evict`, each quantizer also
stores what a method kept (e.g. `knorm:ratio=0.75`). Decoding speed is compared at the same kept tokens: each
quantized cache against the float cache of the same eviction, `--rounds` rounds of `--decode-tokens` steps
alternated between them (medians). Prints JSON lines.

    python benchmarks/quantized_bytes.py --tokens 3000 --quant kivi-2,kivi-4,kvquant-4,gear-4 --evict 'none;knorm:ratio=0.75'
"""

import argparse
import json
import statistics

import torch

import kvsqueeze
from kvsqueeze.bench import seconds_per_token
from kvsqueeze.evaluation.needle import needle_sample


def eviction(spec: str):
    """`none`, or a method as the command line gives it (`knorm:ratio=0.75`)."""
    return None if spec == "none" else kvsqueeze.methods.build(spec)


def relative_errors(ctx, full) -> dict:
    errors = {"keys": [], "values": []}
    for layer, reference in zip(ctx.cache.layers, full.cache.layers):
        keys, values, _ = layer.dense_view()
        for name, got, expected in (("keys", keys, reference.keys), ("values", values, reference.values)):
            errors[name].append(((got - expected).norm() / expected.norm()).item())
    return {f"{name[:-1]}_error": round(sum(e) / len(e), 4) for name, e in errors.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=3000)
    parser.add_argument("--quant", default="kivi-2,kivi-4,kvquant-2,kvquant-4,gear-2,gear-4")
    parser.add_argument("--evict", default="none", help="separated by ';': none, or a method (knorm:ratio=0.75)")
    parser.add_argument("--decode-tokens", type=int, default=32, help="steps per timing (0: no decoding)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = kvsqueeze.load()
    sample = needle_sample(tokenizer, args.tokens, 0.5, seed=0)
    full = kvsqueeze.compress(model, tokenizer, sample.context)
    for evict in args.evict.split(";"):
        float_cache = kvsqueeze.compress(model, tokenizer, sample.context, eviction(evict))
        for spec in args.quant.split(","):
            ctx = kvsqueeze.compress(model, tokenizer, sample.context, eviction(evict), quantizer=spec)
            layers = ctx.cache.layers
            quantized_tokens = sum(int(layer.lengths.sum()) for layer in layers)
            page_bytes = sum(layer.pages_k.nbytes + layer.pages_v.nbytes + layer.page_segment.nbytes
                             + layer.page_fill.nbytes for layer in layers)
            window_bytes = sum(layer.tail_k.nbytes + layer.tail_v.nbytes for layer in layers)
            row = {"quantizer": spec, "evict": evict, "tokens": ctx.stats.context_tokens,
                   "bytes_held_mib": round(ctx.nbytes() / 2**20, 2), "full_cache_mib": round(full.nbytes() / 2**20, 2),
                   "share_of_full_fp32": round(ctx.nbytes() / full.nbytes(), 4),
                   "share_of_float_cache": round(ctx.nbytes() / float_cache.nbytes(), 4),
                   "quantized_tokens_per_head": quantized_tokens / (len(layers) * layers[0].heads),
                   "pages_share_of_fp16": round(page_bytes / (quantized_tokens * layers[0].head_dim * 2 * 2), 4),
                   "full_precision_window_mib": round(window_bytes / 2**20, 2)}
            if evict == "none":
                row |= relative_errors(ctx, full)
            if args.decode_tokens:
                times = {"quantized": [], "float": []}
                for _ in range(args.rounds):
                    times["quantized"].append(seconds_per_token(model, ctx, args.decode_tokens))
                    times["float"].append(seconds_per_token(model, float_cache, args.decode_tokens))
                medians = {name: statistics.median(t) for name, t in times.items()}
                row |= {"threads": torch.get_num_threads(), "decode_ms_quantized": round(1000 * medians["quantized"], 1),
                        "decode_ms_float": round(1000 * medians["float"], 1),
                        "decode_over_float": round(medians["quantized"] / medians["float"], 3)}
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    with torch.no_grad():
        main()
