"""Needle-in-a-haystack accuracy of methods at several ratios on the bundled model.

Query-agnostic protocol: the haystack is compressed without the question, then the question is
asked. Depths are spread evenly over the context. Methods are registry names or specs with
parameters ("think:key_channel_ratio=0.5"); `--ratios` applies to those that take a ratio, the
others run once with their own settings. Each row reports the compression really measured.
Results are appended to `--out` (JSON lines); samples already there are skipped, so an interrupted
run resumes. Each haystack is prefilled once for every configuration that can share the prefill. `--chunk` prefills in chunks with in-loop compression (compared with a full prefill).
`--quant` stores what is kept quantized (each quantizer is one more configuration; "none" is eviction
alone); benchmarks/score_vs_bytes.py plots the score against the bytes held.

    python benchmarks/needle_table.py --tokens 3000 --samples 10 --ratios 0.25,0.5,0.75
    python benchmarks/needle_table.py --tokens 7800 --methods knorm,snapkv --ratios 0.5 --chunk 2048
    python benchmarks/needle_table.py --methods full,snapkv --ratios 0.5 --quant none,kivi-2
"""

import argparse
import json
import time
from pathlib import Path

import kvsqueeze
from kvsqueeze.evaluation.runner import compressed, configurations
from kvsqueeze.evaluation.needle import needle_sample


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None)
    parser.add_argument("--tokens", type=int, default=3000)
    parser.add_argument("--samples", type=int, default=10)
    parser.add_argument("--ratios", default="0.25,0.5,0.75")
    parser.add_argument("--methods", default="full," + ",".join(kvsqueeze.available()),
                        help="comma-separated; parameters after ':' joined by '+', e.g. think:key_channel_ratio=0.5")
    parser.add_argument("--chunk", type=int, default=None, help="prefill in chunks of this many tokens")
    parser.add_argument("--quant", default="none", help="comma-separated quantizers (none, kivi-2, kvquant-4, gear-4...)")
    parser.add_argument("--out", default="results/needle_table.jsonl")
    args = parser.parse_args()
    ratios = [float(r) for r in args.ratios.split(",")]
    specs = [spec.replace("+", ",") for spec in args.methods.split(",")]
    out_path = Path(args.out)
    quants = [None if q == "none" else q for q in args.quant.split(",")]
    done = {(r["method"], r["ratio"], r.get("chunk"), r.get("quant"), r["depth"]) for r in map(json.loads, out_path.open())
            } if out_path.exists() else set()
    models = {attn: kvsqueeze.load(args.model, attn_implementation=attn) for attn in ("sdpa", "eager")}
    tokenizer = models["sdpa"][1]
    samples = [needle_sample(tokenizer, args.tokens, i / max(args.samples - 1, 1), seed=i) for i in range(args.samples)]
    grid = configurations(specs, ratios, quants)
    with out_path.open("a") as out:
        for sample in samples:
            todo = [c for c in grid if (c.method, c.ratio, args.chunk, c.quant, sample.depth) not in done]
            for attn in ("sdpa", "eager"):
                group = [c for c in todo if c.method.startswith("observed_attention") == (attn == "eager")]
                if group:
                    start = time.perf_counter()
                    for c, ctx in zip(group, compressed(models[attn][0], tokenizer, sample.context, group,
                                                        chunk_size=args.chunk)):
                        answer = ctx.ask(sample.question, max_new_tokens=24)
                        out.write(json.dumps({"method": c.method, "ratio": c.ratio, "chunk": args.chunk,
                                              "quant": c.quant,
                                              "depth": sample.depth, "answer": answer,
                                              "expected": sample.answer, "correct": sample.correct(answer),
                                              "tokens": ctx.stats.context_tokens,
                                              "compression_ratio": ctx.stats.compression_ratio,
                                              "bytes_held": ctx.stats.bytes_held,
                                              "bytes_uncompressed": ctx.stats.bytes_uncompressed}) + "\n")
                        out.flush()
                    print(f"depth {sample.depth:.2f}, {len(group)} configurations ({attn}): "
                          f"{time.perf_counter() - start:.0f} s", flush=True)
    for quant in quants:
        print_table(out_path, specs, ratios, args.chunk, quant)


def print_table(path, specs, ratios, chunk=None, quant=None):
    rows = [row for row in map(json.loads, path.open()) if row.get("chunk") == chunk and row.get("quant") == quant]
    if quant:
        print(f"\nquantized with {quant}:")

    def cell(spec, ratio):
        hits = [r for r in rows if r["method"] == spec and r["ratio"] == ratio]
        if not hits:
            return "—"
        measured = sum(r["bytes_held"] / r["bytes_uncompressed"] for r in hits) / len(hits)
        return f"{sum(r['correct'] for r in hits)}/{len(hits)} ({measured:.0%} bytes)"

    print("\n| method | " + " | ".join(f"ratio {r}" for r in ratios) + " |")
    print("|---|" + "---|" * len(ratios))
    for spec in specs:
        if any(r["method"] == spec and r["ratio"] is None for r in rows):
            print(f"| {spec} | {cell(spec, None)} |" + " |" * (len(ratios) - 1))
        else:
            print(f"| {spec} | " + " | ".join(cell(spec, r) for r in ratios) + " |")


if __name__ == "__main__":
    main()
