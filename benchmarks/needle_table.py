"""Needle-in-a-haystack accuracy of every method at several ratios on the bundled model.

Query-agnostic protocol: the haystack is compressed without the question, then the question is
asked. Depths are spread evenly over the context. Prints a markdown table and writes JSON lines.

    python benchmarks/needle_table.py --tokens 3000 --samples 10 --ratios 0.25,0.5,0.75
"""

import argparse
import json
import time

import kvsqueeze
from kvsqueeze.evaluation.needle import needle_sample


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None)
    parser.add_argument("--tokens", type=int, default=3000)
    parser.add_argument("--samples", type=int, default=10)
    parser.add_argument("--ratios", default="0.25,0.5,0.75")
    parser.add_argument("--methods", default=",".join(kvsqueeze.available()))
    parser.add_argument("--out", default="needle_table.jsonl")
    args = parser.parse_args()
    ratios = [float(r) for r in args.ratios.split(",")]
    names = args.methods.split(",")
    models = {attn: kvsqueeze.load(args.model, attn_implementation=attn) for attn in ("sdpa", "eager")}
    tokenizer = models["sdpa"][1]
    samples = [needle_sample(tokenizer, args.tokens, i / max(args.samples - 1, 1), seed=i) for i in range(args.samples)]
    scores = {}
    with open(args.out, "w") as out:
        for name, ratio in [("full", 0.0)] + [(n, r) for n in names for r in ratios]:
            model = models["eager" if name == "observed_attention" else "sdpa"][0]
            method = None if name == "full" else kvsqueeze.method(name, ratio=ratio)
            hits, start = 0, time.perf_counter()
            for sample in samples:
                ctx = kvsqueeze.compress(model, tokenizer, sample.context, method)
                answer = ctx.ask(sample.question, max_new_tokens=24)
                hits += sample.correct(answer)
                out.write(json.dumps({"method": name, "ratio": ratio, "depth": sample.depth, "answer": answer,
                                      "expected": sample.answer, "correct": sample.correct(answer),
                                      "tokens": ctx.stats.context_tokens, "bytes_held": ctx.stats.bytes_held,
                                      "bytes_uncompressed": ctx.stats.bytes_uncompressed}) + "\n")
                out.flush()
            scores[name, ratio] = hits
            print(f"{name} {ratio}: {hits}/{len(samples)} ({time.perf_counter() - start:.0f} s)", flush=True)
    print(f"\n| method | " + " | ".join(f"ratio {r}" for r in ratios) + " |")
    print("|---|" + "---|" * len(ratios))
    print(f"| full cache | " + " | ".join(f"{scores['full', 0.0]}/{len(samples)}" for _ in ratios) + " |")
    for name in names:
        print(f"| {name} | " + " | ".join(f"{scores[name, r]}/{len(samples)}" for r in ratios) + " |")


if __name__ == "__main__":
    main()
