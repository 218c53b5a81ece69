"""How far the compressed cache's answers drift from the full cache's, with and without RestoreKV's restore tokens.

On held-out essay pieces (seeds the default training does not use), the model repeats random spans of the
context (KVzip's reconstruction prompt, teacher-forced); the score is the mean KL divergence from the full
cache's next-token distributions, for KVzip alone and RestoreKV (untrained and trained adapters) at the same
budget. Usage: python benchmarks/restorekv_kl.py results/restorekv.safetensors [--ratios 0.5,0.75,0.9]
"""

import argparse
import random

import torch
import torch.nn.functional as F

import kvsqueeze
from kvsqueeze.budgets import Uniform
from kvsqueeze.evaluation.needle import haystack
from kvsqueeze.methods.kvzip import repeat_inputs, sink_length
from kvsqueeze.methods.restorekv import RestoreAdapter


def mean_kl(model, tokenizer, text, ctx, method, spans) -> float:
    compressed = kvsqueeze.compress(model, tokenizer, text, method)
    total = 0.0
    with torch.no_grad():
        for ids in spans:
            full = model(ids, past_key_values=ctx.cache.fork()).logits.float().log_softmax(-1)[0]
            ours = model(ids, past_key_values=compressed.cache.fork()).logits.float().log_softmax(-1)[0]
            total += F.kl_div(ours, full, log_target=True, reduction="batchmean").item()
    return total / len(spans)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("adapter", help="a file written by kvsqueeze calibrate restorekv")
    parser.add_argument("--ratios", default="0.5,0.75,0.9")
    parser.add_argument("--texts", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=1000)
    parser.add_argument("--spans", type=int, default=4)
    args = parser.parse_args()
    model, tokenizer = kvsqueeze.load()
    trained, _ = RestoreAdapter.load(args.adapter)
    untrained = RestoreAdapter.for_model(model)
    rng = random.Random(0)
    sums: dict[tuple, float] = {}
    for seed in range(100, 100 + args.texts):
        text = "\n\n".join(haystack(tokenizer, args.tokens, seed=seed))
        ctx = kvsqueeze.compress(model, tokenizer, text)
        ids = ctx.context_ids[0]
        inputs = repeat_inputs(ctx.prompt, ids, sink_length(ctx.prompt, ids, 4), 64, overlap=8)
        spans = [piece[2] for piece in rng.sample(inputs, min(args.spans, len(inputs)))]
        for ratio in map(float, args.ratios.split(",")):
            budget = Uniform(ratio=ratio).n_keep(len(ids))
            runs = {"kvzip": kvsqueeze.KVzip(budget=budget),
                    "restorekv untrained": kvsqueeze.RestoreKV(budget=budget, adapter=untrained),
                    "restorekv trained": kvsqueeze.RestoreKV(budget=budget, adapter=trained)}
            for name, method in runs.items():
                kl = mean_kl(model, tokenizer, text, ctx, method, spans)
                sums[ratio, name] = sums.get((ratio, name), 0.0) + kl / args.texts
    print("| ratio | KVzip | RestoreKV, untrained | RestoreKV, trained |\n|---|---|---|---|")
    for ratio in map(float, args.ratios.split(",")):
        cells = " | ".join(f"{sums[ratio, name]:.4f}" for name in ("kvzip", "restorekv untrained", "restorekv trained"))
        print(f"| {ratio} | {cells} |")


if __name__ == "__main__":
    main()
