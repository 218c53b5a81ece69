"""How far the compressed cache's answers drift from the full cache's, with and without RestoreKV's restore tokens.

On held-out essay pieces (seeds the default training does not use), the model repeats random spans of the
context (KVzip's reconstruction prompt, teacher-forced); the score is the mean KL divergence from the full
cache's next-token distributions, for KVzip alone and RestoreKV (untrained and trained adapters) at the same
budget. Each text is prefilled and scored by KVzip once; every configuration evicts from a fork of that cache.
Usage: python benchmarks/restorekv_kl.py results/restorekv.safetensors [--ratios 0.5,0.75,0.9]
"""

import argparse
import random

import torch
import torch.nn.functional as F

import kvsqueeze
from kvsqueeze.evaluation.needle import haystack
from kvsqueeze.methods.kvzip import eviction_plan, repeat_inputs, sink_length
from kvsqueeze.methods.restorekv import RestoreAdapter

RUNS = ("kvzip", "restorekv untrained", "restorekv trained")


def log_probs(model, cache, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(ids, past_key_values=cache.fork()).logits.float().log_softmax(-1)[0]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("adapter", help="a file written by kvsqueeze calibrate restorekv")
    parser.add_argument("--ratios", default="0.5,0.75,0.9")
    parser.add_argument("--texts", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=1000)
    parser.add_argument("--spans", type=int, default=4)
    args = parser.parse_args()
    model, tokenizer = kvsqueeze.load()
    adapters = {"restorekv untrained": RestoreAdapter.for_model(model),
                "restorekv trained": RestoreAdapter.load(args.adapter)[0]}
    ratios = [float(r) for r in args.ratios.split(",")]
    rng = random.Random(0)
    sums = dict.fromkeys(((ratio, run) for ratio in ratios for run in RUNS), 0.0)
    for seed in range(100, 100 + args.texts):
        ctx = kvsqueeze.compress(model, tokenizer, "\n\n".join(haystack(tokenizer, args.tokens, seed=seed)))
        ids = ctx.context_ids
        with torch.no_grad():
            scores = kvsqueeze.KVzip().importance(model, ctx.cache, ids, None, ctx.prompt)
        inputs = repeat_inputs(ctx.prompt, ids[0], sink_length(ctx.prompt, ids[0], 4), 64, overlap=8)
        spans = [piece[2] for piece in rng.sample(inputs, min(args.spans, len(inputs)))]
        full = [log_probs(model, ctx.cache, span) for span in spans]
        for ratio in ratios:
            for run in RUNS:
                method = (kvsqueeze.KVzip(ratio=ratio) if run == "kvzip"
                          else kvsqueeze.RestoreKV(ratio=ratio, adapter=adapters[run]))
                layers, seen = eviction_plan(ctx.cache, ids, method.allocation)
                cache = ctx.cache.fork()
                with torch.no_grad():
                    if run == "kvzip":
                        method.evict(cache, [scores[i] for i in layers], layers, seen)
                    else:
                        method.restore_and_evict(model, cache, scores, layers, seen)
                kl = sum(F.kl_div(log_probs(model, cache, span), reference, log_target=True,
                                  reduction="batchmean").item() for span, reference in zip(spans, full))
                sums[ratio, run] += kl / len(spans) / args.texts
    print("| ratio | KVzip | RestoreKV, untrained | RestoreKV, trained |\n|---|---|---|---|")
    for ratio in ratios:
        print(f"| {ratio} | " + " | ".join(f"{sums[ratio, run]:.4f}" for run in RUNS) + " |")


if __name__ == "__main__":
    main()
