"""Decoding speed on a ragged (head-wise) cache vs a dense cache holding the same number of tokens.

Compresses one long context twice on the bundled model, with AdaKV (per-head budgets: ragged layers)
and with SnapKV (the same budget in every head: dense layers) at the same ratio, so both caches hold
the same number of tokens. Then decodes `--tokens` steps on each, alternating the two `--rounds`
times so that both see the same machine load, and reports the median time per token and the ratio.

    python benchmarks/ragged_decode.py --context 8000 --ratio 0.5
"""

import argparse
import json
import statistics

import torch

import kvsqueeze
from kvsqueeze.bench import seconds_per_token
from kvsqueeze.evaluation.needle import needle_sample


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--context", type=int, default=8000)
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = kvsqueeze.load()
    sample = needle_sample(tokenizer, args.context, 0.5, seed=0)
    contexts = {"ragged (AdaKV)": kvsqueeze.compress(model, tokenizer, sample.context, kvsqueeze.AdaKV(ratio=args.ratio)),
                "dense (SnapKV)": kvsqueeze.compress(model, tokenizer, sample.context, kvsqueeze.SnapKV(ratio=args.ratio))}
    tokens = {name: int(sum(layer.kept_per_head().sum() for layer in ctx.cache.layers)) for name, ctx in contexts.items()}
    times = {name: [] for name in contexts}
    for _ in range(args.rounds):
        for name, ctx in contexts.items():
            times[name].append(seconds_per_token(model, ctx, args.tokens))
    medians = {name: statistics.median(t) for name, t in times.items()}
    result = {"context_tokens": contexts["dense (SnapKV)"].logical_length, "ratio": args.ratio,
              "threads": torch.get_num_threads(),
              "configs": {name: {"tokens_held": tokens[name], "bytes_held": ctx.nbytes(),
                                 "ms_per_token": 1000 * medians[name], "all_ms": [1000 * t for t in times[name]]}
                          for name, ctx in contexts.items()},
              "ragged_over_dense": medians["ragged (AdaKV)"] / medians["dense (SnapKV)"]}
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
