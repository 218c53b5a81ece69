"""What every method costs: prefill+compress time against a plain transformers prefill, memory, bytes, decode speed.

For each context length and each registered method (at its defaults, ratio 0.5; calibration-dependent methods
with the bundled model's shipped tables or untrained modules of the right shape, which cost what trained ones
cost) and each quantizer alone: 3 prefill+compress times, each alternated with a plain transformers prefill of the
same tokens into a `DynamicCache` (no kvsqueeze at all), the median of the pairs' ratios; the peak resident memory
above the memory held before the context; the bytes the cache holds; and seconds per decoded token as a ratio of
the full cache's (both answering a question with 16 tokens, 3 alternated pairs, the median ratio). Every run's
time is kept in the row. Rows go to a JSON-lines file (a run resumes where it stopped); `--table` writes the
markdown table and a figure from them.

    python benchmarks/method_cost.py --lengths 2048,4096,16384 --out results/method_cost.jsonl
    python benchmarks/method_cost.py --table results/method_cost.jsonl --page docs/method-cost.md

`--page` writes the docs page (the table, how it was measured, and the figure beside it).
"""

import argparse
import gc
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import DynamicCache

import kvsqueeze
from kvsqueeze.bench import context_ids, rss_kib
from kvsqueeze.models import attention_modules, cache_argument, frozen

DECODE_TOKENS = 16


def method_at_defaults(name: str, model):
    """`name` at its defaults (ratio 0.5 where it takes one), given what it must load."""
    cls = kvsqueeze.available()[name]
    config = model.config.get_text_config()
    shape = (config.num_hidden_layers, config.num_key_value_heads)
    table = torch.rand(*shape, generator=torch.Generator().manual_seed(0))
    if name == "headkv":
        return cls(ratio=0.5, head_scores=table)
    if name == "duo_attention":
        return cls(head_patterns=table)
    if name == "qfilter":
        return cls(ratio=0.5, filters=torch.randn(*shape, config.head_dim, generator=torch.Generator().manual_seed(0)))
    if name == "lukv":
        from kvsqueeze.methods.lukv import budget_curves
        gains = (1 + table)[..., None] / torch.arange(1, 65)
        return cls(ratio=0.5, curves=budget_curves([gains], list(range(config.num_hidden_layers))))
    if name == "kvzap":
        from kvsqueeze.methods.kvzap import Surrogate
        return cls(ratio=0.5, surrogate=Surrogate.for_model(model))
    if name == "fastkvzip":
        from kvsqueeze.methods.fastkvzip import Gates
        return cls(ratio=0.5, gates=Gates.for_model(model))
    if name == "restorekv":
        from kvsqueeze.methods.restorekv import RestoreAdapter
        return cls(ratio=0.5, adapter=RestoreAdapter.for_model(model))
    if name == "dms":
        return cls(threshold=0.0)
    if name == "per_layer_compression":
        return cls(ratios=[0.5] * config.num_hidden_layers)
    if name == "composed":
        return cls(["snapkv", "think"])
    return kvsqueeze.methods.build(name)  # ratio 0.5 where it takes one


def configurations() -> list[tuple[str, str | None, str | None]]:
    """(label, method name, quantizer): the full cache, every method, every quantizer alone."""
    configs = [("full", None, None)]
    configs += [(name, name, None) for name in kvsqueeze.available()]
    configs += [(f"quant:{q}", None, q) for q in ("kivi-2", "kivi-4", "kvquant-4", "gear-4")]
    return configs


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def settle() -> None:
    """Every timed run starts from the same heap: what earlier runs freed is given back (as `compress` does at its
    end), so neither run reuses pages the other left and the peak above the memory before is the run's own."""
    gc.collect()
    kvsqueeze.release_freed_memory()


def plain_prefill(model, ids, cache: dict | None = None):
    with torch.no_grad():
        model.base_model(input_ids=ids, **(cache or {cache_argument(model): DynamicCache(config=model.config)}),
                         use_cache=True)


def extra_work_seconds(model, ids, kind: str, reps: int) -> float:
    """Seconds of one kind of `Method.extra_work` on these tokens, best of `reps`: "attention" (the model's attention
    over the context in every layer: its shapes, `scaled_dot_product_attention`), "chunk_attention" (the same
    within each 256-token chunk, without the causal mask), "output_projection" (every
    layer's o_proj over the context), "second_forward" (the context forwarded again after itself, on a cache
    holding it), "short_forward" (eight new tokens forwarded after the context, on a cache holding it: every
    weight read once more), "surrogate" (KVzap's surrogate at its defaults, untrained, over the context's hidden
    states in every layer), "similarity" (half the context's keys against the other half in every layer and KV head,
    and the largest of each row: Merging's evicted x kept cosines at ratio 0.5) or "backward" (what gradients add
    to that forward: its recording for autograd and its backward, to the activations: the weights frozen)."""
    modules = attention_modules(model)
    config = model.config.get_text_config()
    heads, kv_heads, n = config.num_attention_heads, config.num_key_value_heads, ids.shape[1]
    dim = getattr(config, "head_dim", None) or config.hidden_size // heads

    def attention():
        query, keys = torch.randn(1, heads, n, dim), torch.randn(1, kv_heads, n, dim)
        return timed(lambda: [F.scaled_dot_product_attention(query, keys, keys, is_causal=True, enable_gqa=True)
                              for _ in modules])

    def chunk_attention(size: int = 256):
        query, keys = torch.randn(1, heads, n, dim), torch.randn(1, kv_heads, n, dim)
        chunks = [slice(start, start + size) for start in range(0, n, size)]
        return timed(lambda: [F.scaled_dot_product_attention(query[:, :, c], keys[:, :, c], keys[:, :, c],
                                                             enable_gqa=True) for _ in modules for c in chunks])

    def output_projection():
        states = torch.randn(1, n, heads * dim)
        with torch.no_grad():
            return timed(lambda: [module.o_proj(states) for module in modules])

    def holding_the_context() -> dict:
        held = {cache_argument(model): DynamicCache(config=model.config)}
        plain_prefill(model, ids, held)
        return held

    def short_forward(tokens: int = 8):
        held = holding_the_context()
        with torch.no_grad():
            return timed(lambda: model.base_model(input_ids=ids[:, :tokens], **held, use_cache=True))

    def second_forward(with_gradients: bool = False):
        held = holding_the_context()
        embeds = model.get_input_embeddings()(ids).detach().requires_grad_(with_gradients)
        with frozen(model), torch.set_grad_enabled(with_gradients):
            start = time.perf_counter()
            hidden = model.base_model(inputs_embeds=embeds, **held, use_cache=True).last_hidden_state
            forward = time.perf_counter() - start
            return forward + timed(hidden.pow(2).sum().backward) if with_gradients else forward

    def surrogate():
        from kvsqueeze.methods.kvzap import Surrogate

        states, net = torch.randn(1, n, config.hidden_size), Surrogate.for_model(model)
        with torch.no_grad():
            return timed(lambda: [net(layer, states) for layer in range(len(modules))])

    def similarity():  # into one buffer: the products, not the fresh pages of a new matrix per layer
        evicted, kept = torch.randn(1, kv_heads, n // 2, dim), torch.randn(1, kv_heads, n - n // 2, dim)
        products = torch.empty(1, kv_heads, n // 2, n - n // 2)
        return timed(lambda: [torch.matmul(evicted, kept.transpose(-1, -2), out=products).max(-1) for _ in modules])

    def backward():  # what gradients add to that forward: recording it for autograd, and the backward
        without = second_forward()
        settle()
        return second_forward(with_gradients=True) - without

    once = {"attention": attention, "chunk_attention": chunk_attention, "output_projection": output_projection,
            "second_forward": second_forward, "short_forward": short_forward, "surrogate": surrogate,
            "similarity": similarity,
            "backward": backward}[kind]
    seconds = []
    for _ in range(reps):
        settle()
        seconds.append(once())
    return min(seconds)


def bound(row: dict, extra: dict) -> float:
    """The most a configuration's prefill may cost over a plain prefill: 1.10x without extra work, else 1.15x a
    plain prefill plus its extra work (measured at the same length)."""
    if not row.get("extra_work"):
        return 1.10
    return 1.15 * (row["plain_prefill_s"] + sum(extra[kind] for kind in row["extra_work"])) / row["plain_prefill_s"]


def decode_seconds(ctx, question, method) -> float:
    """Seconds per generated token: the question, then DECODE_TOKENS tokens."""
    return timed(lambda: ctx.generate(question, method, max_new_tokens=DECODE_TOKENS,
                                      min_new_tokens=DECODE_TOKENS)) / DECODE_TOKENS


def measure(model, ids, question, name, quant, reps: int, full) -> dict:
    method = None if name is None else method_at_defaults(name, model)
    if method is not None and method.has("attention_weights"):  # against a plain prefill of eager attention too
        usual = model.config._attn_implementation
        model.set_attn_implementation("eager")
        try:
            full = kvsqueeze.compress(model, None, ids, check_window=False)
            return measured(model, ids, question, method, quant, reps, full) | {"attention": "eager"}
        finally:
            model.set_attn_implementation(usual)
    return measured(model, ids, question, method, quant, reps, full)


def measured(model, ids, question, method, quant, reps: int, full) -> dict:
    decode_method = method if method is not None and method.phase == "decode" else None
    prefill_method = None if decode_method is not None else method
    compress = lambda: kvsqueeze.compress(model, None, ids, prefill_method, quantizer=quant, check_window=False)
    plain, mine = [], []
    for _ in range(reps):
        settle()
        plain.append(timed(lambda: plain_prefill(model, ids)))
        settle()
        Path("/proc/self/clear_refs").write_text("5")  # peak RSS := current RSS
        before = rss_kib("VmRSS")
        start = time.perf_counter()
        ctx = compress()
        mine.append(time.perf_counter() - start)
        peak = rss_kib("VmHWM") - before
        if len(mine) < reps:
            del ctx
    decode, full_decode = [], []
    for _ in range(reps):  # alternated with the full cache, which sees the same machine load
        full_decode.append(decode_seconds(full, question, None))
        decode.append(decode_seconds(ctx, question, decode_method))
    return {"extra_work": list(method.inherent_work()) if method is not None else [],
            "prefill_s": min(mine), "plain_prefill_s": min(plain), "prefill_ratio": pair_ratio(mine, plain),
            "prefill_runs_s": mine, "plain_prefill_runs_s": plain,
            "peak_mib": round(peak / 1024, 1), "bytes_held_mib": round(ctx.nbytes() / 2**20, 2),
            "bytes_share": ctx.stats.bytes_held / ctx.stats.bytes_uncompressed if ctx.stats.bytes_uncompressed else 1,
            "decode_s_per_token": min(decode), "decode_ratio": pair_ratio(decode, full_decode),
            "decode_runs_s": decode, "full_decode_runs_s": full_decode}


def pair_ratio(mine: list[float], baseline: list[float]) -> float:
    """The median of the ratios of alternated pairs: each run over the baseline run beside it, which saw the same
    machine load. A ratio of two bests is moved by one lucky run of either side; this is not."""
    return statistics.median(m / b for m, b in zip(mine, baseline, strict=True))


def run(args):
    model, tokenizer = kvsqueeze.load()
    torch.set_num_threads(args.threads)
    question = tokenizer("\n\nWhat is this text about?", add_special_tokens=False, return_tensors="pt").input_ids
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    previous = list(map(json.loads, out.open())) if out.exists() else []
    done = {(r["length"], r["config"]) for r in previous}
    extra = {(r["length"], r["config"].split(":", 1)[1]): r["seconds"] for r in previous
             if r["config"].startswith("extra_work:")}
    only = set(args.only.split(",")) if args.only else None
    kvsqueeze.compress(model, None, context_ids(tokenizer, 64))  # warm up
    for length in map(int, args.lengths.split(",")):
        ids = context_ids(tokenizer, length)
        full = kvsqueeze.compress(model, None, ids, check_window=False)  # the decoding reference
        for label, name, quant in configurations():
            if (length, label) in done or (only and label not in only and label != "full"):
                continue
            try:
                row = measure(model, ids, question, name, quant, args.reps, full)
            except Exception as error:  # noqa: BLE001  a method that cannot run at this length is reported, not fatal
                row = {"error": f"{type(error).__name__}: {error}"[:300]}
            for kind in row.get("extra_work", []):  # what the bound needs, measured once per length in this run
                if (length, kind) not in extra:
                    extra[length, kind] = extra_work_seconds(model, ids, kind, args.reps)
                    record(out, {"length": length, "config": f"extra_work:{kind}", "threads": args.threads,
                                 "reps": args.reps, "seconds": extra[length, kind]})
            if row.get("extra_work"):  # the row carries the work it is allowed, measured beside its own baseline
                row["extra_work_s"] = {kind: extra[length, kind] for kind in row["extra_work"]}
            record(out, {"length": length, "config": label, "threads": args.threads, "reps": args.reps} | row)


def record(out: Path, row: dict) -> None:
    with out.open("a") as f:
        f.write(json.dumps(row) + "\n")
    print(json.dumps(row), flush=True)


def page(path: str, page_path: str, reps: int) -> None:
    """The docs page: how it was measured, the table, and its figure (`<page stem>.png` beside it)."""
    page_path = Path(page_path)
    figure = page_path.with_suffix(".png")
    text = table(path, str(figure))
    rows = [r for r in map(json.loads, Path(path).open()) if not r["config"].startswith("extra_work:")]
    threads = "; ".join(f"{n:,} tokens: {len({r['config'] for r in rows if r['length'] == n})} configurations, torch "
                        "threads " + "/".join(map(str, sorted({r.get("threads", 2) for r in rows if r["length"] == n})))
                        for n in sorted({r["length"] for r in rows}))
    repetitions = "/".join(map(str, sorted({r.get("reps", reps) for r in rows if r["config"] != "full"})))
    page_path.write_text(f"""# What each method costs

Made by `python benchmarks/method_cost.py` on the bundled SmolLM2-135M-Instruct (float32, CPU;
{threads}). **prefill** is the time of a prefill+compress by `kvsqueeze.compress` (each method at its defaults,
ratio 0.5 where it takes one) over the time of a plain transformers prefill of the same tokens into a `DynamicCache`
run just before it, the median over {repetitions} such alternated pairs (each run starting from a heap whose freed
memory was given back to the system, as `compress` leaves it; every run's time is in the data file): 1.00x is no
cost at all (every row carries its own plain prefill and full cache, so rows from separate runs, e.g. one per
length, stand side by side). **decode** is seconds per generated token on the compressed cache over the full
cache's (the question and 16 tokens, alternated with the full cache, the median pair ratio). **bytes held** is what the cache really holds, as a share of the full cache's; **peak MiB** the
resident memory the prefill+compress added at its peak (both at the shortest length). A method with no
**extra work** by design is held to 1.10x; one whose paper needs more (its docstring's "Inherent cost",
`Method.extra_work`) to 1.15x of a plain prefill plus that work, measured in the same run at the same length
(the bound is shown beside its ratio): *attention* is the model's attention over the context in every layer,
*chunk_attention* the same within each 256-token chunk without the causal mask, *output_projection* every layer's
o_proj over the context, *second_forward* the context forwarded again after itself on a cache holding it,
*short_forward* eight new tokens forwarded after the context (every weight read once more), *surrogate* KVzap's
surrogate (an MLP: hidden size -> 512 -> KV heads) over the context's hidden states in every layer, *similarity*
half the context's keys against the other half in every layer and KV head and each row's largest (Merging's
evicted x kept cosines), *backward* what gradients add to that forward (recording it, and its backward).
Methods that need calibration run with untrained tables or modules of the right shape, which cost what trained
ones cost. A method that reads the attention weights (ObservedAttention) runs, as do
its plain prefill and full cache, under eager attention, the only one that returns them.

![prefill+compress time over a plain prefill]({figure.name})

{text}
""")


def table(path: str, figure: str | None) -> str:
    rows = [json.loads(line) for line in Path(path).open()]
    extra = {}  # length -> {kind: seconds}
    for r in rows:
        if r["config"].startswith("extra_work:"):
            extra.setdefault(r["length"], {})[r["config"].split(":", 1)[1]] = r["seconds"]
    rows = [r for r in rows if not r["config"].startswith("extra_work:")]
    lengths = sorted({r["length"] for r in rows})
    configs = list(dict.fromkeys(r["config"] for r in rows))
    cell = {(r["length"], r["config"]): r for r in rows}
    head = ("| configuration | extra work | " + " | ".join(f"prefill {n:,}" for n in lengths) + " | "
            + " | ".join(f"decode {n:,}" for n in lengths) + f" | bytes held | peak MiB ({lengths[0]:,}) |")
    lines = [head, "|---|---|" + "---|" * (2 * len(lengths) + 2)]
    ratio = lambda r, key: "—" if r is None else "error" if "error" in r else f"{r[key]:.2f}x"
    # the extra work measured beside the row's own baseline (older rows: their run's, by length)
    allowed = lambda r: bound(r, r.get("extra_work_s") or extra.get(r["length"], {}))

    def prefill(r):  # the ratio, its bound where the method has extra work, and whether it is over
        if r is None or "error" in r:
            return ratio(r, "prefill_ratio")
        limit = allowed(r)
        shown = f"{r['prefill_ratio']:.2f}x" + (f" (≤ {limit:.2f}x)" if r.get("extra_work") else "")
        return shown + (" **over**" if r["prefill_ratio"] > limit else "")

    for config in configs:
        found = [cell.get((n, config)) for n in lengths]
        first = found[0] if found[0] and "error" not in found[0] else None
        share = "—" if first is None else f"{first['bytes_share']:.0%}"
        peak = "—" if first is None else f"{first['peak_mib']:.0f}"
        work = ", ".join(next((r.get("extra_work") for r in found if r and r.get("extra_work")), [])) or "—"
        lines.append(f"| {config} | {work} | " + " | ".join(prefill(r) for r in found) + " | "
                     + " | ".join(ratio(r, "decode_ratio") for r in found) + f" | {share} | {peak} |")
    text = "\n".join(lines)
    if figure:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(12, 5))
        width = 0.8 / len(lengths)
        for i, n in enumerate(lengths):
            values = [cell.get((n, c), {}).get("prefill_ratio", float("nan")) for c in configs]
            ax.bar([j + i * width for j in range(len(configs))], values, width, label=f"{n:,} tokens")
        ax.axhline(1.10, color="black", linestyle="--", linewidth=0.8, label="1.10x")
        limits = [(j, allowed(cell[lengths[0], c])) for j, c in enumerate(configs)
                  if cell.get((lengths[0], c), {}).get("extra_work")]
        if limits:
            ax.scatter(*zip(*limits), marker="_", s=120, color="black",
                       label=f"bound with extra work ({lengths[0]:,} tokens)")
        ax.set_xticks([j + 0.4 for j in range(len(configs))], configs, rotation=90, fontsize=7)
        ax.set_ylabel("prefill+compress / plain prefill")
        ax.legend()
        fig.tight_layout()
        fig.savefig(figure, dpi=120)
    return text


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", default="2048,4096,16384")
    parser.add_argument("--out", default="results/method_cost.jsonl")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--only", help="comma-separated configurations (the full cache is always measured)")
    parser.add_argument("--table", metavar="JSONL", help="print the table of a finished run (and --figure)")
    parser.add_argument("--figure")
    parser.add_argument("--page", help="with --table: write the docs page (and its figure beside it)")
    args = parser.parse_args()
    if args.table and args.page:
        page(args.table, args.page, args.reps)
    elif args.table:
        print(table(args.table, args.figure))
    else:
        run(args)


if __name__ == "__main__":
    main()
