"""Prefill time of MInference's vertical-slash sparse attention vs the model's dense SDPA, on the bundled model.

For each context length, in one process: the whole prefill (30 layers) with dense attention and with
each MInference setting, `--repeats` times each, alternating, keeping the fastest; then the attention
alone, on the queries, keys and values one middle layer really had in the dense prefill (dense SDPA
vs pattern estimate + sparse attention), with the share of the causal attention matrix the pattern
reads and the output's relative error (a setting whose diagonals cover the whole context makes the
method attend densely in the prefill; the sparse kernel is timed anyway). One needle sample per length (depth 0.5) is asked after each
prefill: found or not. Run single-threaded, as other people share the machine.

    python benchmarks/sparse_prefill.py --lengths 2000,4000,7800 --repeats 3
"""

import argparse
import json
import time

import torch

import kvsqueeze
from kvsqueeze.evaluation.needle import needle_sample
from kvsqueeze.methods.minference import covered_keys, vertical_slash_attention, vertical_slash_pattern


class Capture(kvsqueeze.MInference):
    """Records one layer's prefill queries, keys and values and lets the model attend densely."""

    name = ""

    def __init__(self, layer: int):
        super().__init__()
        self.layer, self.seen = layer, {}

    def attend(self, module, query, key, value, mask, attend, **kwargs):
        if module.layer_idx == self.layer and query.shape[-2] > 1:
            self.seen.update(query=query, key=key, value=value, scaling=kwargs.get("scaling"))


def fastest(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def attention_alone(model, tokenizer, context, settings, repeats):
    """Dense SDPA vs MInference on one middle layer's real tensors: seconds, density, relative error."""
    capture = Capture(model.config.num_hidden_layers // 2)
    kvsqueeze.compress(model, tokenizer, context, capture)
    query, key, value, scaling = (capture.seen[k] for k in ("query", "key", "value", "scaling"))
    group = query.shape[1] // key.shape[1]
    keys, values = key.repeat_interleave(group, 1), value.repeat_interleave(group, 1)
    n = query.shape[2]
    dense = torch.nn.functional.scaled_dot_product_attention(query, keys, values, is_causal=True, scale=scaling)
    rows = {"dense": {"seconds": fastest(lambda: torch.nn.functional.scaled_dot_product_attention(
        query, key, value, is_causal=True, scale=scaling, enable_gqa=True), repeats)}}
    for name, method in settings.items():
        def sparse():
            columns, offsets = vertical_slash_pattern(query, keys, scaling, method.vertical_size, method.slash_size,
                                                      method.last_q)
            return vertical_slash_attention(query, keys, values, columns, offsets, scaling), columns, offsets

        out, columns, offsets = sparse()
        covered = covered_keys(n, n, columns, offsets)
        causal = sum(min(64 * (i + 1), n) for i in range(covered.shape[2])) * query.shape[1]
        rows[name] = {"seconds": fastest(sparse, repeats), "density": covered.sum().item() / causal,
                      "relative_error": ((out - dense).norm() / dense.norm()).item(),
                      "prefill_attends_densely": max(method.slash_size, 50) >= n}  # every diagonal is read
    for row in rows.values():
        row["over_dense"] = row["seconds"] / rows["dense"]["seconds"]
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", default="2000,4000,7800")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--settings", default="1000:6096,256:512", help="vertical_size:slash_size, comma-separated")
    parser.add_argument("--out", default="results/sparse_prefill.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer = kvsqueeze.load()
    settings = {}
    for spec in args.settings.split(","):
        vertical, slash = (int(x) for x in spec.split(":"))
        settings[f"minference {vertical}/{slash}"] = kvsqueeze.MInference(vertical_size=vertical, slash_size=slash)
    results = []
    for length in (int(n) for n in args.lengths.split(",")):
        sample = needle_sample(tokenizer, length, 0.5, seed=0)
        methods = {"dense": None} | settings
        seconds = {name: [] for name in methods}
        answers = {}
        for _ in range(args.repeats):  # alternate, so that every configuration sees the same machine load
            for name, method in methods.items():
                start = time.perf_counter()
                ctx = kvsqueeze.compress(model, tokenizer, sample.context, method)
                seconds[name].append(time.perf_counter() - start)
                if name not in answers:
                    answers[name] = ctx.ask(sample.question, max_new_tokens=24)
        prefill = {name: {"seconds": min(times), "all_seconds": times, "over_dense": min(times) / min(seconds["dense"]),
                          "needle_found": sample.correct(answers[name]), "answer": answers[name]}
                   for name, times in seconds.items()}
        row = {"tokens": ctx.logical_length, "threads": torch.get_num_threads(), "prefill": prefill,
               "attention_one_layer": attention_alone(model, tokenizer, sample.context, settings, args.repeats)}
        results.append(row)
        print(json.dumps(row, indent=1), flush=True)
    with open(args.out, "w") as out:
        json.dump(results, out, indent=1)


if __name__ == "__main__":
    main()
